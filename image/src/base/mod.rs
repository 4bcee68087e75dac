//! The base root filesystem: Debian through mmdebstrap, an OCI image (from a
//! registry or an archive), or a rootfs tarball. Each is reduced to a list of
//! layers (tar files) applied in order onto the target directory.

mod offline_repo;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use geminik8s::cmd::Tool;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cache::{Cache, sha256_bytes, sha256_file};
use crate::oci::{self, Reference, unpack};
use crate::progress::Progress;
use crate::spec::{Base, DebianBase, ImageSpec, OciSource, Platform};

/// What the base was made from, for the manifest and cache keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseInfo {
    pub kind: String,
    /// sha256 over every input of the base; the key of a cached Debian base.
    pub key: String,
    /// Whether a cached result was reused.
    pub cached: bool,
    pub inputs: serde_json::Value,
}

/// A base ready to apply.
pub struct PreparedBase {
    pub layers: Vec<PathBuf>,
    pub info: BaseInfo,
    /// Keeps an extracted archive alive until the layers are applied.
    _scratch: Option<tempfile::TempDir>,
}

/// Make the base available as layers, from the cache when its inputs have not
/// changed (`refresh` rebuilds a Debian base anyway).
pub async fn prepare(
    spec: &ImageSpec,
    cache: &Cache,
    epoch: u64,
    refresh: bool,
    progress: &Progress,
) -> anyhow::Result<PreparedBase> {
    match &spec.base {
        Base::Debian(debian) => debian_base(debian, &spec.packages, cache, epoch, refresh).await,
        Base::Tarball { path } => {
            let sha = sha256_file(path).with_context(|| format!("reading the base tarball {}", path.display()))?;
            let info = BaseInfo {
                kind: "tarball".into(),
                key: sha.clone(),
                cached: false,
                inputs: json!({"path": path, "sha256": sha}),
            };
            Ok(PreparedBase { layers: vec![path.clone()], info, _scratch: None })
        }
        Base::Oci(base) => match &base.source {
            OciSource::Archive { path } => {
                let scratch = tempfile::Builder::new().prefix(".oci-archive-").tempdir_in(cache_tmp(cache)?)?;
                let dir = oci::layout::open_archive(path, scratch.path())?;
                let image = oci::layout::resolve(&dir, &base.platform)
                    .with_context(|| format!("reading the OCI base {}", path.display()))?;
                let info = BaseInfo {
                    kind: "oci-archive".into(),
                    key: image.manifest_digest.clone(),
                    cached: false,
                    inputs: json!({"archive": path, "manifest": image.manifest_digest, "platform": base.platform.to_string()}),
                };
                Ok(PreparedBase { layers: image.layers, info, _scratch: Some(scratch) })
            }
            OciSource::Registry { reference, plain_http } => {
                anyhow::ensure!(
                    !cache.is_offline(),
                    "the OCI base {reference} is pulled from a registry, which an offline build cannot do; use an `archive:` base"
                );
                let parsed = Reference::parse(reference).map_err(anyhow::Error::msg)?;
                let mut registry = oci::registry::Registry::new(cache, &parsed, *plain_http);
                let image = registry
                    .pull(&parsed.reference, &base.platform, progress)
                    .await
                    .with_context(|| format!("pulling the OCI base {reference}"))?;
                let info = BaseInfo {
                    kind: "oci-registry".into(),
                    key: image.manifest_digest.clone(),
                    cached: false,
                    inputs: json!({"ref": reference, "manifest": image.manifest_digest, "platform": base.platform.to_string()}),
                };
                Ok(PreparedBase { layers: image.layers, info, _scratch: None })
            }
        },
    }
}

fn cache_tmp(cache: &Cache) -> anyhow::Result<PathBuf> {
    let dir = cache.root().join("tmp");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The mmdebstrap command line for a Debian base written to `output`;
/// `mirror` is a URL or a whole `deb ...` sources line; `extra` options go
/// before the positional arguments.
pub fn mmdebstrap_command(
    debian: &DebianBase,
    packages: &[String],
    epoch: u64,
    mirror: &str,
    extra: &[String],
    output: &Path,
) -> Tool {
    let mut tool = Tool::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .arg(format!("--variant={}", debian.variant))
        .arg(format!("--components={}", debian.components.join(",")))
        .arg("--format=tar");
    for glob in &debian.exclude {
        tool = tool.arg(format!("--dpkgopt=path-exclude={glob}"));
    }
    for glob in &debian.keep {
        tool = tool.arg(format!("--dpkgopt=path-include={glob}"));
    }
    if !packages.is_empty() {
        tool = tool.arg(format!("--include={}", packages.join(",")));
    }
    if let Some(cache) = &debian.apt_cache {
        let dir = cache.display().to_string();
        tool = tool
            .arg("--skip=download/empty")
            .arg("--skip=essential/unlink")
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!("--setup-hook=sync-in {dir} /var/cache/apt/archives/"))
            .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {dir}"))
            // mmdebstrap picks packages by the archive's priorities, which the
            // .deb files do not carry (or carry differently): keep them for
            // an offline build.
            .arg(format!(
                "--customize-hook=for f in \"$1\"/var/lib/apt/lists/*_Packages*; do /usr/lib/apt/apt-helper cat-file \"$f\"; done | grep -E '^(Package|Priority):' > {dir}/{}",
                offline_repo::ARCHIVE_PRIORITIES
            ))
            .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb");
    }
    tool.args(extra).arg(&debian.suite).arg(output).arg(mirror)
}

async fn debian_base(
    debian: &DebianBase,
    packages: &[String],
    cache: &Cache,
    epoch: u64,
    refresh: bool,
) -> anyhow::Result<PreparedBase> {
    let mut sorted = packages.to_vec();
    sorted.sort();
    sorted.dedup();
    let inputs = json!({
        "suite": debian.suite,
        "mirror": debian.mirror,
        "variant": debian.variant,
        "components": debian.components,
        "exclude": debian.exclude,
        "keep": debian.keep,
        "packages": sorted,
        "architecture": Platform::host().architecture,
        "source_date_epoch": epoch,
    });
    let key = sha256_bytes(&serde_json::to_vec(&inputs).expect("inputs serialise"));
    let bases = cache.bases_dir();
    fs::create_dir_all(&bases).with_context(|| format!("creating {}", bases.display()))?;
    let tar = bases.join(format!("debian-{key}.tar"));
    let cached = tar.is_file() && !refresh;
    if !cached {
        if let Some(dir) = &debian.apt_cache {
            fs::create_dir_all(dir).with_context(|| format!("creating the apt cache {}", dir.display()))?;
        }
        // Offline, the apt cache stands in for the mirror.
        let mut _repo = None;
        let mirror = match (&debian.apt_cache, cache.is_offline()) {
            (_, false) => debian.mirror.clone(),
            (Some(apt_cache), true) => {
                let repo = tempfile::Builder::new().prefix(".offline-repo-").tempdir_in(cache_tmp(cache)?)?;
                let count = offline_repo::write_flat_repo(apt_cache, repo.path(), &debian.suite).await?;
                anyhow::ensure!(
                    count > 0,
                    "the build is offline and the apt cache {} holds no packages; build once online first",
                    apt_cache.display()
                );
                let line = format!("deb [trusted=yes] file://{} ./", repo.path().display());
                _repo = Some(repo);
                line
            }
            (None, true) => anyhow::bail!(
                "the Debian base (suite {}, {} packages) is not in the cache at {} and the build is offline; set base.debian.apt_cache to build from downloaded packages",
                debian.suite,
                sorted.len(),
                bases.display()
            ),
        };
        let tmp = bases.join(format!(".debian-{key}.tar.partial-{}", std::process::id()));
        let mut extra = Vec::new();
        if _repo.is_some() {
            // The image names the real mirror, as an online build would.
            let line = format!("deb {} {} {}", debian.mirror, debian.suite, debian.components.join(" "));
            extra.push(format!("--customize-hook=echo '{line}' > \"$1/etc/apt/sources.list\""));
        }
        let tool = mmdebstrap_command(debian, &sorted, epoch, &mirror, &extra, &tmp);
        let result = tool.run().await;
        if let Err(e) = result {
            if let Err(rm) = fs::remove_file(&tmp)
                && rm.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %tmp.display(), error = %rm, "could not remove a partial base");
            }
            return Err(e).context(format!(
                "building the Debian base with mmdebstrap (suite {}, mirror {mirror})",
                debian.suite
            ));
        }
        fs::rename(&tmp, &tar).with_context(|| format!("renaming {} to {}", tmp.display(), tar.display()))?;
        if let Some(apt_cache) = &debian.apt_cache {
            offline_repo::record_priorities(apt_cache)?;
        }
    }
    let info = BaseInfo { kind: "debian".into(), key, cached, inputs };
    Ok(PreparedBase { layers: vec![tar], info, _scratch: None })
}

/// Empty `target` (keeping the directory itself) and apply the base layers.
pub fn apply(base: &PreparedBase, target: &Path) -> anyhow::Result<Vec<unpack::LayerStats>> {
    clear_dir(target)?;
    let mut stats = Vec::new();
    for layer in &base.layers {
        let name = layer.display().to_string();
        let reader = unpack::open_layer(layer)?;
        stats.push(unpack::apply_layer(reader, target, &name)?);
    }
    Ok(stats)
}

/// Remove everything inside `dir`, creating it when missing.
pub fn clear_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let result =
            if path.is_dir() && !path.is_symlink() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        result.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}
