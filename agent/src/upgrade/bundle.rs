//! The upgrade bundle: what `gemin-image build` writes for its `upgrade`
//! output and what a node writes into its passive root slot. A directory:
//!
//! ```text
//! upgrade.json     the manifest: the release (image name, version, component
//!                  versions) and each file's size and SHA-256
//! vmlinuz          the kernel
//! initrd.img       the initramfs
//! root.squashfs    the read-only root filesystem
//! ```
//!
//! Every file is pinned by its digest in the manifest; [`Bundle::verify`]
//! checks them all before anything is written to a disk.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's file name in a bundle.
pub const MANIFEST: &str = "upgrade.json";
/// The kernel's file name in a bundle.
pub const KERNEL: &str = "vmlinuz";
/// The initramfs's file name in a bundle.
pub const INITRD: &str = "initrd.img";
/// The root filesystem's file name in a bundle.
pub const ROOT: &str = "root.squashfs";
/// The files every bundle carries besides its manifest.
pub const FILES: [&str; 3] = [KERNEL, INITRD, ROOT];
/// The manifest format this agent reads and writes.
pub const FORMAT: u32 = 1;

/// Where an image records its release (written by `gemin-image build`).
pub const RELEASE_FILE: &str = "usr/lib/geminik8s/image.json";

/// The versions of what an image runs, as the upgrade compatibility check
/// compares them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Components {
    /// PostgreSQL's major version (`15`): a change needs its own procedure.
    pub postgresql_major: u32,
    /// The agent (`gemin_k8s`): its version, or `sha256:...` of the binary.
    pub agent: String,
    /// Kine: its version, or `sha256:...` of the binary.
    pub kine: String,
    /// K3s: its version, or `sha256:...` of the binary.
    pub k3s: String,
}

/// An image's release: its name, the version its spec gave it, and what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub version: String,
    pub components: Components,
}

impl Release {
    /// The release of the system whose root is `root` (`/` on a node), or
    /// `None` for an image built before releases were recorded.
    pub fn of_root(root: &Path) -> anyhow::Result<Option<Release>> {
        let path = root.join(RELEASE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).map(Some).with_context(|| format!("parsing {}", path.display()))
    }

    /// Why a node running `self` must not take `next`, if it must not.
    pub fn refuses(&self, next: &Release) -> Option<String> {
        if next.name != self.name {
            return Some(format!(
                "the bundle is image {:?}, this node runs image {:?}: build the upgrade from the same spec",
                next.name, self.name
            ));
        }
        if next.version == self.version {
            return Some(format!("this node already runs version {}", self.version));
        }
        let (from, to) = (self.components.postgresql_major, next.components.postgresql_major);
        if from != to {
            return Some(format!(
                "the bundle changes PostgreSQL's major version ({from} -> {to}): that needs its own procedure (a dump and restore, or pg_upgrade), which upgrade does not do; build the new version with PostgreSQL {from}"
            ));
        }
        None
    }
}

/// One file of a bundle, as the manifest pins it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `upgrade.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub release: Release,
    pub files: Vec<BundleFile>,
}

/// An upgrade bundle on disk, its manifest read.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Read the bundle in `dir`: its manifest parses, is of a format this
    /// agent knows, and names every file a bundle carries (nothing else).
    pub fn open(dir: &Path) -> anyhow::Result<Bundle> {
        let path = dir.join(MANIFEST);
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {}: is {} an upgrade bundle?", path.display(), dir.display()))?;
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            manifest.format == FORMAT,
            "{} is of format {}, this agent reads format {FORMAT}: use a gemin_k8s of the same release as the bundle",
            path.display(),
            manifest.format
        );
        let mut names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        let mut wanted = FILES.to_vec();
        wanted.sort_unstable();
        ensure!(names == wanted, "{} lists the files {names:?}, a bundle carries {wanted:?}", path.display());
        Ok(Bundle { dir: dir.to_path_buf(), manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn release(&self) -> &Release {
        &self.manifest.release
    }

    /// The path of one of the bundle's [`FILES`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The manifest's record of one of the bundle's [`FILES`].
    pub fn file(&self, name: &str) -> &BundleFile {
        self.manifest.files.iter().find(|f| f.name == name).expect("open checked every file is listed")
    }

    /// Check every file's size and digest against the manifest.
    pub fn verify(&self) -> anyhow::Result<()> {
        for file in &self.manifest.files {
            let path = self.path(&file.name);
            let (bytes, sha256) = sha256_file(&path).with_context(|| format!("reading {}", path.display()))?;
            if bytes != file.bytes || sha256 != file.sha256 {
                bail!(
                    "{} is {bytes} bytes with SHA-256 {sha256}, the manifest says {} bytes with {}: the bundle is damaged or was changed; copy it again",
                    path.display(),
                    file.bytes,
                    file.sha256
                );
            }
        }
        Ok(())
    }

    /// Write the manifest for the [`FILES`] already in `dir`, pinning each
    /// by its digest, for `release`.
    pub fn seal(dir: &Path, release: &Release) -> anyhow::Result<Manifest> {
        let mut files = Vec::new();
        for name in FILES {
            let path = dir.join(name);
            let (bytes, sha256) = sha256_file(&path).with_context(|| format!("reading {}", path.display()))?;
            files.push(BundleFile { name: name.to_string(), bytes, sha256 });
        }
        let manifest = Manifest { format: FORMAT, release: release.clone(), files };
        let mut text = serde_json::to_vec_pretty(&manifest).expect("the manifest serialises");
        text.push(b'\n');
        crate::fsutil::write_atomic(&dir.join(MANIFEST), &text, 0o644)?;
        Ok(manifest)
    }
}

/// The size and lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    sha256_reader(File::open(path)?)
}

/// The number of bytes and lowercase hex SHA-256 of everything `reader` gives.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn release(version: &str) -> Release {
        Release {
            name: "geminik8s".into(),
            version: version.into(),
            components: Components {
                postgresql_major: 15,
                agent: "0.1.0".into(),
                kine: "sha256:aa".into(),
                k3s: "sha256:bb".into(),
            },
        }
    }

    /// A sealed bundle in `dir` whose root filesystem is `root`.
    pub(crate) fn bundle(dir: &Path, version: &str, root: &[u8]) -> Bundle {
        fs::write(dir.join(KERNEL), b"kernel ".repeat(100)).unwrap();
        fs::write(dir.join(INITRD), b"initrd ".repeat(100)).unwrap();
        fs::write(dir.join(ROOT), root).unwrap();
        Bundle::seal(dir, &release(version)).unwrap();
        Bundle::open(dir).unwrap()
    }

    #[test]
    fn a_sealed_bundle_verifies_and_a_changed_byte_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(dir.path(), "2", &[7u8; 5000]);
        b.verify().unwrap();
        assert_eq!(b.release().version, "2");
        assert_eq!(b.file(ROOT).bytes, 5000);
        let mut root = fs::read(dir.path().join(ROOT)).unwrap();
        root[4000] ^= 1;
        fs::write(dir.path().join(ROOT), &root).unwrap();
        let err = format!("{:#}", b.verify().unwrap_err());
        assert!(err.contains("root.squashfs is 5000 bytes") && err.contains("damaged"), "{err}");
    }

    #[test]
    fn open_refuses_another_format_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        bundle(dir.path(), "2", b"root");
        let path = dir.path().join(MANIFEST);
        let mut manifest: Manifest = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        manifest.format = 2;
        fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
        let err = format!("{:#}", Bundle::open(dir.path()).unwrap_err());
        assert!(err.contains("format 2") && err.contains("reads format 1"), "{err}");
        manifest.format = FORMAT;
        manifest.files.retain(|f| f.name != INITRD);
        fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
        let err = format!("{:#}", Bundle::open(dir.path()).unwrap_err());
        assert!(err.contains("initrd.img"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = format!("{:#}", Bundle::open(empty.path()).unwrap_err());
        assert!(err.contains("upgrade bundle?"), "{err}");
    }

    #[test]
    fn a_release_refuses_its_own_version_another_image_and_another_postgresql_major() {
        let running = release("1");
        assert_eq!(running.refuses(&release("2")), None);
        assert!(running.refuses(&release("1")).unwrap().contains("already runs version 1"));
        let mut other = release("2");
        other.name = "site".into();
        assert!(running.refuses(&other).unwrap().contains("image \"site\""));
        let mut pg16 = release("2");
        pg16.components.postgresql_major = 16;
        let why = running.refuses(&pg16).unwrap();
        assert!(why.contains("15 -> 16") && why.contains("pg_upgrade"), "{why}");
    }

    #[test]
    fn the_release_of_a_root_is_read_and_an_older_image_has_none() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(Release::of_root(root.path()).unwrap(), None);
        let path = root.path().join(RELEASE_FILE);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, serde_json::to_string(&release("3")).unwrap()).unwrap();
        assert_eq!(Release::of_root(root.path()).unwrap(), Some(release("3")));
    }
}
