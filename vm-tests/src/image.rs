//! Building the shipped default image for the tests and the QEMU lab: the
//! spec in `image/specs/default.yaml`, pointed at this machine's Debian
//! mirror and the artifacts at hand (the workspace's `gemin_k8s`, the
//! installed Kine, and the K3s stand-in in place of K3s, which cannot be
//! downloaded on every build host, with the `kube-apiserver` it runs when
//! `just deps` built one).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use gemin_image::build::{BuildOptions, build};
use gemin_image::cache::Cache;
use gemin_image::manifest::BuildManifest;
use gemin_image::progress::{Mode, Progress};
use gemin_image::spec::{ArtifactSource, ArtifactSpec, Base, ImageSpec, OutputFormat};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vm-tests sits in the workspace").to_path_buf()
}

/// `CARGO_TARGET_DIR`, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// The Debian mirror from the host's apt sources (`GEMIN_IMAGE_TEST_MIRROR`
/// wins), so image builds use the same mirror as the machine.
pub fn host_mirror() -> String {
    if let Ok(m) = std::env::var("GEMIN_IMAGE_TEST_MIRROR") {
        return m;
    }
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        texts.extend(paths.iter().filter_map(|p| fs::read_to_string(p).ok()));
    }
    for text in texts {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let uri = match words.as_slice() {
                ["URIs:", uri, ..] => *uri,
                ["deb", rest @ ..] => rest.iter().find(|w| w.starts_with("http")).copied().unwrap_or(""),
                _ => "",
            };
            if uri.trim_end_matches('/').ends_with("/debian") {
                return uri.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// `GEMIN_IMAGE_TEST_AGENT`, else the workspace's debug or release
/// `gemin_k8s`.
pub fn agent_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("GEMIN_IMAGE_TEST_AGENT") {
        return Some(PathBuf::from(path));
    }
    ["debug", "release"].iter().map(|p| target_dir().join(p).join("gemin_k8s")).find(|p| p.is_file())
}

/// `GEMIN_IMAGE_TEST_K3S`, else the workspace's K3s stand-in
/// (`k3s-standin`, debug or release build).
pub fn k3s_standin_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("GEMIN_IMAGE_TEST_K3S") {
        return Some(PathBuf::from(path));
    }
    ["debug", "release"].iter().map(|p| target_dir().join(p).join("k3s-standin")).find(|p| p.is_file())
}

/// Write `binary` without its symbols to `dest`, as a release image carries it.
pub fn strip_into(binary: &Path, dest: &Path) -> anyhow::Result<()> {
    let out = Command::new("strip").arg("-o").arg(dest).arg(binary).output().context("running strip")?;
    anyhow::ensure!(out.status.success(), "strip {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// What goes into a test or lab image as K3s (artifact `k3s`), at `dir/k3s`:
/// the K3s stand-in, stripped, or when it is not built, a placeholder script
/// that says so and fails.
pub fn k3s_artifact(dir: &Path) -> anyhow::Result<PathBuf> {
    let dest = dir.join("k3s");
    match k3s_standin_binary() {
        Some(standin) => strip_into(&standin, &dest)?,
        None => {
            use std::os::unix::fs::PermissionsExt;
            let text = concat!(
                "#!/bin/sh\n",
                "# Placeholder for K3s in a test image: the K3s stand-in was not built.\n",
                "echo 'k3s: placeholder; build the K3s stand-in: cargo build -p geminik8s-vm-tests --bin k3s-standin' >&2\n",
                "exit 1\n",
            );
            fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(dest)
}

/// Where the tests and the QEMU lab build the default image (kept between
/// runs: an unchanged build is skipped).
pub fn default_image_dir() -> PathBuf {
    target_dir().join("image-boot")
}

/// The build cache of [`build_default_image`] in `dir`.
pub fn image_cache_dir(dir: &Path) -> PathBuf {
    dir.join("cache")
}

/// The apt cache the tests share, so only the first build downloads.
pub fn test_apt_cache() -> PathBuf {
    std::env::temp_dir().join("gemin-image-test-apt")
}

/// The shipped default spec, as an operator builds it, pointed at `mirror`,
/// the apt cache `apt` and the given Kine, agent and K3s binaries (as
/// `--artifact NAME=PATH` does).
pub fn default_spec(mirror: &str, kine: &Path, agent: &Path, k3s: &Path, apt: &Path) -> anyhow::Result<ImageSpec> {
    let path = workspace().join("image/specs/default.yaml");
    let mut spec = ImageSpec::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    match &mut spec.base {
        Base::Debian(debian) => {
            debian.mirror = mirror.to_string();
            debian.apt_cache = Some(apt.to_path_buf());
        }
        other => anyhow::bail!("the default spec is not Debian-based: {other:?}"),
    }
    for artifact in &mut spec.artifacts {
        let path = match artifact.name.as_str() {
            "kine" => kine,
            "gemin_k8s" => agent,
            "k3s" => k3s,
            other => anyhow::bail!("unexpected artifact {other} in the default spec"),
        };
        artifact.source = ArtifactSource::Path { path: path.to_path_buf(), sha256: None };
    }
    Ok(spec)
}

/// A built default image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub out_dir: PathBuf,
    pub manifest: BuildManifest,
}

impl BuiltImage {
    pub fn path(&self, format: OutputFormat) -> PathBuf {
        gemin_image::disk::output_path(&self.out_dir, "geminik8s", format)
    }

    /// Whether K3s can serve in this image: it carries the stand-in's
    /// `kube-apiserver` (a real K3s needs nothing more, but cannot be
    /// downloaded where these images are built).
    pub fn runs_kubernetes(&self) -> bool {
        self.manifest.artifacts.iter().any(|a| a.name == "kube-apiserver")
    }
}

/// Where a test or lab image carries the stand-in's `kube-apiserver` (on
/// the K3s unit's `PATH`).
pub const KUBE_APISERVER_DEST: &str = "/usr/local/bin/kube-apiserver";

/// Build the default image with its bootable outputs into `dir` (kept
/// between runs: an unchanged build is skipped). The agent goes in
/// stripped, as a release image would carry it; K3s is [`k3s_artifact`],
/// and with the stand-in comes the `kube-apiserver` it runs, when there is
/// one ([`BuiltImage::runs_kubernetes`]).
pub async fn build_default_image(dir: &Path, progress: &Progress) -> anyhow::Result<BuiltImage> {
    build_version(dir, &image_cache_dir(dir), LAB_VERSION, None, |_| {}, progress).await
}

/// The version of the default test and lab image (`version:` in its spec).
pub const LAB_VERSION: &str = "1.0.0";

/// The upgrade bundle of the default image at `version` (the `upgrade`
/// output only), built into `dir` with the default image's build cache;
/// `change` edits the spec first (a broken release for the rollback tests).
/// Returns the bundle's directory.
pub async fn build_upgrade_bundle(
    dir: &Path,
    version: &str,
    change: impl FnOnce(&mut ImageSpec),
    progress: &Progress,
) -> anyhow::Result<PathBuf> {
    let cache = image_cache_dir(&default_image_dir());
    let built = build_version(dir, &cache, version, Some(vec![OutputFormat::Upgrade]), change, progress).await?;
    Ok(built.path(OutputFormat::Upgrade))
}

/// [`build_upgrade_bundle`] with plain progress lines, from sync code.
pub fn build_upgrade_bundle_blocking(
    dir: &Path,
    version: &str,
    change: impl FnOnce(&mut ImageSpec),
) -> anyhow::Result<PathBuf> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(build_upgrade_bundle(dir, version, change, &Progress::new(Mode::Plain)))
}

async fn build_version(
    dir: &Path,
    cache: &Path,
    version: &str,
    outputs: Option<Vec<OutputFormat>>,
    change: impl FnOnce(&mut ImageSpec),
    progress: &Progress,
) -> anyhow::Result<BuiltImage> {
    let agent = agent_binary().context("no gemin_k8s in target/: run `cargo build -p geminik8s-agent`")?;
    let kine = crate::skip::find_tool("kine").context("kine is not installed: run `just deps`")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stripped = dir.join("gemin_k8s");
    strip_into(&agent, &stripped)?;
    let k3s = k3s_artifact(dir)?;
    let mut spec = default_spec(&host_mirror(), &kine, &stripped, &k3s, &test_apt_cache())?;
    if let Some(apiserver) = k3s_standin_binary().and(crate::k3s_standin::apiserver_binary().ok()) {
        spec.artifacts.push(ArtifactSpec {
            name: "kube-apiserver".into(),
            source: ArtifactSource::Path { path: apiserver, sha256: None },
            dest: KUBE_APISERVER_DEST.into(),
            mode: 0o755,
        });
    }
    spec.version = Some(version.to_string());
    if let Some(outputs) = outputs {
        spec.outputs = outputs;
    }
    change(&mut spec);
    let cache = Cache::new(cache.to_path_buf())?;
    let out_dir = dir.join("out");
    let opts = BuildOptions {
        spec,
        target: out_dir.join("rootfs"),
        out_dir: out_dir.clone(),
        source_date_epoch: 1_735_689_600,
        replace_target: true,
        refresh_base: false,
        force: false,
        tag: None,
    };
    let manifest = build(&opts, &cache, progress).await?;
    Ok(BuiltImage { out_dir, manifest })
}

/// [`build_default_image`] with plain progress lines, from sync code.
pub fn build_default_image_blocking(dir: &Path) -> anyhow::Result<BuiltImage> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(build_default_image(dir, &Progress::new(Mode::Plain)))
}
