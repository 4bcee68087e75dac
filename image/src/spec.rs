//! The image spec: what goes into an image, as YAML.
//!
//! Parsed with the cloud-config parser so errors look the same: file, line,
//! column, dotted key, message and a hint (with "did you mean" for unknown
//! keys). Every error in a file is reported, not just the first.

mod check;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use geminik8s::config::diag::Diagnostic;
use serde::Serialize;

pub use check::parse_size;

/// Where the cloud-config baked into the image goes when the spec does not
/// say. `/oem` is read before `/etc/geminik8s` and later sources win, so a
/// default here is overridden by anything a node is given.
pub const DEFAULT_CLOUD_CONFIG_DEST: &str = "/oem/00_geminik8s-default.yaml";

/// A validated image spec. Relative paths are resolved against the spec's
/// directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageSpec {
    pub name: String,
    /// The image's version, recorded in it and in its upgrade bundle.
    pub version: Option<String>,
    pub base: Base,
    pub packages: Vec<String>,
    pub artifacts: Vec<ArtifactSpec>,
    pub overlays: Vec<PathBuf>,
    pub cloud_config: Option<CloudConfigSpec>,
    pub users: Vec<User>,
    /// systemd units enabled in the image (from the base or the overlays).
    pub enable_units: Vec<String>,
    /// systemd units a package enabled that must not start at boot.
    pub disable_units: Vec<String>,
    pub outputs: Vec<OutputFormat>,
    pub sizes: Sizes,
    pub labels: Labels,
    /// Timestamp every file in the outputs is clamped to, unless the
    /// `SOURCE_DATE_EPOCH` environment variable or a flag overrides it.
    pub source_date_epoch: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Base {
    Debian(DebianBase),
    Oci(OciBase),
    Tarball { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DebianBase {
    pub suite: String,
    pub mirror: String,
    /// mmdebstrap variant: minbase, apt, important, required, standard.
    pub variant: String,
    pub components: Vec<String>,
    /// Directory where downloaded `.deb` files are kept between builds.
    pub apt_cache: Option<PathBuf>,
    /// Paths (globs) dpkg does not install, e.g. `/usr/share/doc/*`.
    pub exclude: Vec<String>,
    /// Paths (globs) installed even when `exclude` matches them.
    pub keep: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OciBase {
    pub source: OciSource,
    /// `os/arch[/variant]`; defaults to linux and the build host's arch.
    pub platform: Platform,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OciSource {
    /// `registry/repository:tag` or `registry/repository@sha256:...`.
    Registry { reference: String, plain_http: bool },
    /// An OCI layout (directory or tar) or a `docker save` archive.
    Archive { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// linux and the architecture this builder runs on, in OCI names.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: None }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArtifactSpec {
    pub name: String,
    pub source: ArtifactSource,
    /// Absolute path inside the image. A path ending in `/` is a directory
    /// the file is placed into under its own file name.
    pub dest: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactSource {
    Url {
        url: String,
        sha256: String,
    },
    /// A local file; `sha256`, when given, is checked.
    Path {
        path: PathBuf,
        sha256: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloudConfigSpec {
    pub path: PathBuf,
    pub dest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub name: String,
    pub uid: Option<u32>,
    pub groups: Vec<String>,
    pub shell: String,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    RootfsTar,
    OciArchive,
    /// GPT disk image with A/B root slots.
    Raw,
    Qcow2,
    /// Hybrid UEFI ISO booting live.
    Iso,
    /// Kernel, initramfs, root initrd and iPXE script.
    Pxe,
    /// Kernel, initramfs and root squashfs with a digest-pinned manifest,
    /// which a node writes into its passive root slot.
    Upgrade,
}

impl OutputFormat {
    pub const ALL: [(&'static str, OutputFormat); 7] = [
        ("rootfs-tar", OutputFormat::RootfsTar),
        ("oci-archive", OutputFormat::OciArchive),
        ("raw", OutputFormat::Raw),
        ("qcow2", OutputFormat::Qcow2),
        ("iso", OutputFormat::Iso),
        ("pxe", OutputFormat::Pxe),
        ("upgrade", OutputFormat::Upgrade),
    ];

    /// The format the spec and the command line call `name`.
    pub fn named(name: &str) -> Option<OutputFormat> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    /// Built by the disk builder from the rootfs.
    pub fn is_disk(self) -> bool {
        matches!(
            self,
            OutputFormat::Raw | OutputFormat::Qcow2 | OutputFormat::Iso | OutputFormat::Pxe | OutputFormat::Upgrade
        )
    }
}

/// Partition sizes in bytes, for the disk images built from the rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Sizes {
    pub esp: Option<u64>,
    /// Each of the A and B root slots.
    pub root: Option<u64>,
    pub oem: Option<u64>,
    pub persistent: Option<u64>,
}

/// GPT partition names of the disk images, by key (`esp`, `oem`,
/// `root_a`, `root_b`, `persistent`); a key not set takes its default.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Labels(pub BTreeMap<String, String>);

impl Labels {
    pub const DEFAULTS: [(&'static str, &'static str); 5] = [
        ("esp", "gemin-esp"),
        ("oem", "gemin-oem"),
        ("root_a", "gemin-root-a"),
        ("root_b", "gemin-root-b"),
        ("persistent", "gemin-persistent"),
    ];

    /// Set the label of `key` (one of [`Labels::DEFAULTS`]' keys).
    pub fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }

    /// The label of `key`, or its default.
    pub fn get(&self, key: &str) -> &str {
        let default = Self::DEFAULTS.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        self.0.get(key).map(String::as_str).or(default).unwrap_or_else(|| unreachable!("not a label key: {key}"))
    }

    /// Every (key, label), defaults filled in.
    pub fn resolved(&self) -> Vec<(&'static str, &str)> {
        Self::DEFAULTS.iter().map(|(k, _)| (*k, self.get(k))).collect()
    }
}

/// Everything wrong with a spec file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub Vec<Diagnostic>);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "invalid image spec ({n} error{}):", if n == 1 { "" } else { "s" })?;
        for d in &self.0 {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

impl ImageSpec {
    /// Read and validate a spec file.
    pub fn load(path: &Path) -> Result<ImageSpec, SpecError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError(vec![check::diag(&name, 0, 0, "", format!("cannot read the spec: {e}"), None)]))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::parse(&text, &name, dir)
    }

    /// Validate spec text; `name` is used in errors, relative paths are
    /// resolved against `dir`.
    pub fn parse(text: &str, name: &str, dir: &Path) -> Result<ImageSpec, SpecError> {
        check::parse(text, name, dir)
    }

    pub fn wants(&self, format: OutputFormat) -> bool {
        self.outputs.contains(&format)
    }
}

#[cfg(test)]
mod tests;
