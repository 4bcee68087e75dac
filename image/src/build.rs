//! `gemin-image build`: the steps in order. Expensive steps are keyed by a
//! hash of their inputs: a Debian base is reused from the cache, downloads are
//! reused by digest, and when nothing changed since the last build in the
//! output directory the whole build is skipped.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use geminik8s::upgrade::bundle::{Components, Release};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::base;
use crate::cache::{Cache, FetchError, Request, hash_local};
use crate::disk;
use crate::manifest::{self, BuildManifest, RootfsSize};
use crate::output::{self, OutputFile};
use crate::progress::{Event, Progress};
use crate::rootfs;
use crate::spec::{ArtifactSource, ImageSpec, OutputFormat, Platform};

/// Used when neither a flag, `SOURCE_DATE_EPOCH` nor the spec sets one
/// (2024-01-01T00:00:00Z). Not 0: a shadow "last changed" day of 0 forces a
/// password change at first login.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub spec: ImageSpec,
    /// The root directory the image is assembled in.
    pub target: PathBuf,
    /// Where the outputs and the manifest are written.
    pub out_dir: PathBuf,
    pub source_date_epoch: u64,
    /// Empty a non-empty `target` instead of refusing.
    pub replace_target: bool,
    /// Rebuild the Debian base even when cached.
    pub refresh_base: bool,
    /// Rebuild even when the outputs are up to date.
    pub force: bool,
    /// `ref.name` of the OCI archive; defaults to `<name>:latest`.
    pub tag: Option<String>,
}

impl BuildOptions {
    pub fn manifest_path(&self) -> PathBuf {
        self.out_dir.join(format!("{}-manifest.json", self.spec.name))
    }

    pub fn output_path(&self, format: OutputFormat) -> PathBuf {
        match format {
            OutputFormat::RootfsTar => self.out_dir.join(format!("{}-rootfs.tar", self.spec.name)),
            OutputFormat::OciArchive => self.out_dir.join(format!("{}-oci.tar", self.spec.name)),
            disk => crate::disk::output_path(&self.out_dir, &self.spec.name, disk),
        }
    }
}

/// The epoch to use: an explicit value, else `SOURCE_DATE_EPOCH`, else the
/// spec, else [`DEFAULT_SOURCE_DATE_EPOCH`].
pub fn resolve_epoch(flag: Option<u64>, spec: &ImageSpec) -> anyhow::Result<u64> {
    if let Some(e) = flag {
        return Ok(e);
    }
    if let Ok(text) = std::env::var("SOURCE_DATE_EPOCH") {
        return text.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH=`{text}` is not a Unix timestamp"));
    }
    Ok(spec.source_date_epoch.unwrap_or(DEFAULT_SOURCE_DATE_EPOCH))
}

/// Hash a directory tree: paths, modes, file contents and link targets.
fn hash_tree(hasher: &mut Sha256, root: &Path, rel: &Path) -> anyhow::Result<()> {
    let dir = root.join(rel);
    let mut children = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let child_rel = rel.join(child.file_name());
        let path = root.join(&child_rel);
        let meta = fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        hasher.update(child_rel.as_os_str().as_encoded_bytes());
        hasher.update((meta.mode() & 0o7777).to_le_bytes());
        if meta.is_dir() {
            hasher.update(b"d");
            hash_tree(hasher, root, &child_rel)?;
        } else if meta.file_type().is_symlink() {
            hasher.update(b"l");
            hasher.update(fs::read_link(&path)?.as_os_str().as_encoded_bytes());
        } else {
            hasher.update(b"f");
            hasher.update(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
        }
    }
    Ok(())
}

struct FetchedArtifact {
    file: PathBuf,
    sha256: String,
}

fn is_empty_dir(dir: &Path) -> anyhow::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// A previous manifest whose inputs and outputs still match.
fn up_to_date(opts: &BuildOptions, inputs_key: &str) -> Option<BuildManifest> {
    let text = fs::read(opts.manifest_path()).ok()?;
    let previous: BuildManifest = serde_json::from_slice(&text).ok()?;
    let outputs_present = previous.outputs.iter().all(|o| fs::metadata(&o.path).is_ok_and(|m| m.len() == o.bytes))
        && opts.spec.outputs.iter().all(|f| previous.outputs.iter().any(|o| o.path.starts_with(opts.output_path(*f))));
    (previous.inputs_key == inputs_key && outputs_present).then_some(previous)
}

/// Build the image described by `opts.spec`.
pub async fn build(opts: &BuildOptions, cache: &Cache, progress: &Progress) -> anyhow::Result<BuildManifest> {
    let spec = &opts.spec;
    let epoch = opts.source_date_epoch;
    let target = &opts.target;
    anyhow::ensure!(
        fs::canonicalize(target).map_or(true, |p| p != Path::new("/")),
        "refusing to assemble an image over /"
    );
    anyhow::ensure!(
        spec.version.is_some() || !spec.wants(OutputFormat::Upgrade),
        "the upgrade output needs the image's version: add `version: 1.0.0` (any version name) to the spec; a node compares it with the one it runs"
    );
    fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;

    let step = progress.step("artifacts: fetch and verify");
    let mut fetched = Vec::new();
    for artifact in &spec.artifacts {
        let (file, sha256) = match &artifact.source {
            ArtifactSource::Url { url, sha256 } => {
                let request = Request {
                    name: artifact.name.clone(),
                    url: url.clone(),
                    sha256: sha256.clone(),
                    authorization: None,
                };
                let file = match cache.fetch(&request, progress).await {
                    Ok(file) => file,
                    Err(e @ (FetchError::Http { .. } | FetchError::Status { .. } | FetchError::Offline { .. })) => {
                        return Err(anyhow::Error::new(e).context(format!(
                            "artifact `{0}` is not available: give a local copy with `--artifact {0}=PATH`",
                            artifact.name
                        )));
                    }
                    Err(e) => return Err(e.into()),
                };
                (file, sha256.clone())
            }
            ArtifactSource::Path { path, sha256 } => {
                let actual = hash_local(&artifact.name, path, sha256.as_deref())?;
                (path.clone(), actual)
            }
        };
        fetched.push(FetchedArtifact { file, sha256 });
    }
    step.done(format!("{} artifacts", fetched.len()));

    let step = progress.step("base");
    let prepared = base::prepare(spec, cache, epoch, opts.refresh_base, progress).await?;
    if prepared.info.cached {
        step.skipped(format!("(cached {} base {})", prepared.info.kind, &prepared.info.key[..12]));
    } else {
        step.done(format!("({} {})", prepared.info.kind, prepared.info.key));
    }

    let mut hasher = Sha256::new();
    hasher.update(
        serde_json::to_vec(&json!({
            "builder": env!("CARGO_PKG_VERSION"),
            "spec": spec,
            "base": prepared.info.key,
            "artifacts": fetched.iter().map(|f| &f.sha256).collect::<Vec<_>>(),
            "epoch": epoch,
            "tag": opts.tag,
        }))
        .expect("inputs serialise"),
    );
    for overlay in &spec.overlays {
        anyhow::ensure!(overlay.is_dir(), "overlay directory {} does not exist", overlay.display());
        hash_tree(&mut hasher, overlay, Path::new(""))?;
    }
    if let Some(cc) = &spec.cloud_config {
        hasher.update(fs::read(&cc.path).with_context(|| format!("reading {}", cc.path.display()))?);
    }
    let inputs_key = hex::encode(hasher.finalize());
    // A Debian base is keyed by its inputs, not its contents: one built just
    // now (cold cache or --refresh-base) may hold newer packages.
    let base_rebuilt = prepared.info.kind == "debian" && !prepared.info.cached;
    if !opts.force
        && !base_rebuilt
        && let Some(previous) = up_to_date(opts, &inputs_key)
    {
        progress.step("assemble and write outputs").skipped(format!("(inputs {} unchanged)", &inputs_key[..12]));
        return Ok(previous);
    }

    let step = progress.step("unpack base");
    if !opts.replace_target && !is_empty_dir(target)? {
        anyhow::bail!("target {} is not empty; pass --replace-target to empty it first", target.display());
    }
    let layers = base::apply(&prepared, target)?;
    let skipped_devices: u64 = layers.iter().map(|l| l.skipped_devices).sum();
    if skipped_devices > 0 {
        progress.emit(Event::Warning {
            message: format!("{skipped_devices} device nodes were not created (not running as root)"),
        });
    }
    step.done(format!("({} layers into {})", layers.len(), target.display()));

    let step = progress.step("artifacts: place");
    let mut placed = Vec::new();
    for (artifact, f) in spec.artifacts.iter().zip(&fetched) {
        placed.push(rootfs::place_artifact(target, artifact, &f.file, &f.sha256)?);
    }
    step.done("");

    let step = progress.step("overlays");
    let mut files = 0;
    for overlay in &spec.overlays {
        files += rootfs::apply_overlay(target, overlay)?;
    }
    step.done(format!("({files} files)"));

    let mut notes = Vec::new();
    if let Some(cc) = &spec.cloud_config {
        let step = progress.step("default cloud-config");
        notes.extend(rootfs::install_cloud_config(target, cc)?);
        step.done(format!("({})", cc.dest));
    }
    let step = progress.step("users, units and immutable layout");
    rootfs::add_users(target, &spec.users, epoch)?;
    rootfs::disable_units(target, &spec.disable_units)?;
    rootfs::enable_units(target, &spec.enable_units)?;
    notes.extend(rootfs::immutable_layout(target)?);
    step.done("");

    let step = progress.step("initramfs");
    if disk::regenerate_initramfs(target, epoch).await? {
        step.done("(rebuilt with the geminik8s boot script)");
    } else {
        step.skipped("(no geminik8s boot script in the tree)");
    }

    let packages = manifest::installed_packages(target)?;
    let release = release(spec, target, &placed)?;
    rootfs::write_release(target, &release)?;

    let step = progress.step("rootfs tarball");
    let tar_path = opts.output_path(OutputFormat::RootfsTar);
    let (tarball, stats) = output::write_rootfs_tar(target, epoch, &tar_path)?;
    for socket in &stats.skipped_sockets {
        progress.emit(Event::Warning { message: format!("socket {} left out of the tarball", socket.display()) });
    }
    step.done(format!("({} entries, {} bytes)", stats.entries, tarball.bytes));

    let mut outputs: Vec<OutputFile> = Vec::new();
    if spec.wants(OutputFormat::OciArchive) {
        let step = progress.step("OCI archive");
        let tag = opts.tag.clone().unwrap_or_else(|| format!("{}:latest", spec.name));
        let labels = json!({"org.opencontainers.image.title": spec.name, "io.geminik8s.inputs": inputs_key});
        let path = opts.output_path(OutputFormat::OciArchive);
        let archive = output::write_oci_archive(&tarball, &Platform::host(), epoch, &tag, &labels, &path)?;
        step.done("");
        outputs.push(archive);
    }
    let disk_formats: Vec<OutputFormat> = spec.outputs.iter().copied().filter(|f| f.is_disk()).collect();
    if !disk_formats.is_empty() {
        let job = disk::DiskJob {
            tree: target,
            rootfs_tar: &tar_path,
            out_dir: &opts.out_dir,
            name: &spec.name,
            epoch,
            sizes: &spec.sizes,
            labels: &spec.labels,
            seed: &inputs_key,
            formats: disk_formats,
            release: &release,
        };
        outputs.extend(disk::write(&job, &opts.out_dir.join(".disk-work"), progress).await?);
    }
    if spec.wants(OutputFormat::RootfsTar) {
        outputs.insert(0, tarball);
    } else {
        fs::remove_file(&tar_path).with_context(|| format!("removing {}", tar_path.display()))?;
    }
    for o in &outputs {
        progress.emit(Event::Output {
            format: o.format.clone(),
            path: o.path.display().to_string(),
            sha256: o.sha256.clone(),
            bytes: o.bytes,
        });
    }

    let manifest = BuildManifest {
        schema: manifest::SCHEMA,
        name: spec.name.clone(),
        builder: format!("gemin-image {}", env!("CARGO_PKG_VERSION")),
        inputs_key,
        source_date_epoch: epoch,
        spec: serde_json::to_value(spec).expect("spec serialises"),
        base: prepared.info.clone(),
        packages,
        artifacts: placed,
        rootfs: RootfsSize { entries: stats.entries, content_bytes: stats.content_bytes },
        outputs,
        notes,
    };
    let mut text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    text.push(b'\n');
    geminik8s::fsutil::write_atomic(&opts.manifest_path(), &text, 0o644)?;
    Ok(manifest)
}

/// What the image is and runs, recorded in it (`/usr/lib/geminik8s/image.json`)
/// and in its upgrade bundle: the spec's name and version, PostgreSQL's major
/// version (the highest in `/usr/lib/postgresql`, 0 for none), and the
/// agent, Kine and K3s artifacts by digest.
fn release(spec: &ImageSpec, root: &Path, placed: &[rootfs::PlacedArtifact]) -> anyhow::Result<Release> {
    let pg_dir = root.join("usr/lib/postgresql");
    let postgresql_major = match fs::read_dir(&pg_dir) {
        Ok(entries) => entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).max().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", pg_dir.display())),
    };
    let digest = |name: &str| {
        placed.iter().find(|a| a.name == name).map_or_else(|| "none".to_string(), |a| format!("sha256:{}", a.sha256))
    };
    Ok(Release {
        name: spec.name.clone(),
        version: spec.version.clone().unwrap_or_default(),
        components: Components {
            postgresql_major,
            agent: digest("gemin_k8s"),
            kine: digest("kine"),
            k3s: digest("k3s"),
        },
    })
}
