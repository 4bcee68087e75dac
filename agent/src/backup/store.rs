//! Where backups live. A [`Store`] holds backups by id, each a set of
//! objects plus its manifest; the manifest is written last and atomically,
//! so a backup is complete exactly when its manifest is there. Deleting
//! removes the manifest first, so a half-deleted backup is never listed as
//! complete either.
//!
//! [`LocalDir`] is a directory (a mounted USB disk, an NFS share, the
//! node's state partition); [`S3Store`] is a bucket of an S3-compatible
//! object store. The trait is sized for an object store (put, get, list,
//! delete; no rename across objects), so the operations are the same for both.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::manifest::{MANIFEST_FILE, is_plain_name};
pub use super::s3::{S3Options, S3Store};
use super::{BackupError, Result, io};

/// An object being written; [`ObjectWriter::commit`] makes it visible
/// under its name. Dropped without commit, it leaves nothing under the name.
pub trait ObjectWriter: Write + Send {
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Backups by id.
pub trait Store: Send + Sync {
    /// The destination as a user gives it (`file:///mnt/usb/backups`).
    fn url(&self) -> String;
    /// Start a new backup `id`; fails if one with that id exists.
    fn begin(&self, id: &str) -> Result<()>;
    /// Write object `name` of backup `id`.
    fn put_object(&self, id: &str, name: &str) -> Result<Box<dyn ObjectWriter>>;
    /// Read object `name` of backup `id`.
    fn get_object(&self, id: &str, name: &str) -> Result<Box<dyn Read + Send>>;
    /// Write (or replace) the manifest of `id` atomically: from now on the
    /// backup is complete.
    fn put_manifest(&self, id: &str, bytes: &[u8]) -> Result<()>;
    /// The manifest of `id`; `None` when the backup is missing or incomplete.
    fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>>;
    /// Every backup, complete or not.
    fn list(&self) -> Result<Vec<Entry>>;
    /// Remove backup `id`: the manifest first, then its objects.
    fn delete(&self, id: &str) -> Result<()>;

    /// Write archived WAL file `name` (a segment such as
    /// `000000010000000000000003` or a timeline history file such as
    /// `00000002.history`) under the destination's `wal/`.
    fn put_wal(&self, name: &str) -> Result<Box<dyn ObjectWriter>>;
    /// Read archived WAL file `name`; `None` when it is not there.
    fn get_wal(&self, name: &str) -> Result<Option<Box<dyn Read + Send>>>;
    /// Every archived WAL file, sorted by name.
    fn list_wal(&self) -> Result<Vec<WalEntry>>;
    /// Remove archived WAL file `name` (absent is not an error).
    fn delete_wal(&self, name: &str) -> Result<()>;
}

/// The prefix (directory) archived WAL lives under in a destination; never a backup id.
pub const WAL_PREFIX: &str = "wal";

/// An archived WAL file as listed by a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEntry {
    pub name: String,
    /// Stored bytes.
    pub size: u64,
    pub modified: SystemTime,
}

/// A backup as listed by a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// Whether its manifest is there.
    pub complete: bool,
    /// When it was last written to (for incomplete backups, which have no manifest).
    pub modified: SystemTime,
}

/// Open the destination `dest`: `s3://BUCKET/PREFIX` (reached with `s3`,
/// then the environment), `file:///path`, or a plain path. Other schemes
/// are refused with what exists.
pub fn open(dest: &str, s3: &S3Options) -> Result<Box<dyn Store>> {
    if dest.starts_with("s3://") {
        return Ok(Box::new(S3Store::open(dest, s3)?));
    }
    if let Some(path) = dest.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(BackupError::Refused {
                what: format!("destination {dest}"),
                detail: "a file:// URL needs an absolute path (file:///mnt/backups)".into(),
            });
        }
        return Ok(Box::new(LocalDir::new(path)));
    }
    if let Some((scheme, _)) = dest.split_once("://") {
        return Err(BackupError::NotBuilt(format!(
            "the {scheme}:// destination ({dest}); use s3://BUCKET/PREFIX or a local directory (a path or file:///path)"
        )));
    }
    Ok(Box::new(LocalDir::new(dest)))
}

/// Whether `dest` names a destination the agent can use from its
/// configuration (absolute, of a known scheme), without reaching it.
pub fn check_destination(dest: &str) -> Result<()> {
    let refused = |detail: &str| BackupError::Refused { what: format!("destination {dest}"), detail: detail.into() };
    if dest.starts_with("s3://") {
        return super::s3::config::parse_destination(dest).map(|_| ());
    }
    let path = dest.strip_prefix("file://").unwrap_or(dest);
    if dest.contains("://") && !dest.starts_with("file://") {
        return Err(refused("use s3://BUCKET/PREFIX or a local directory (a path or file:///path)"));
    }
    if !path.starts_with('/') {
        return Err(refused("a local destination is an absolute path (/mnt/usb/backups)"));
    }
    Ok(())
}

/// Backups in a local directory: `<root>/<id>/<object>` and
/// `<root>/<id>/manifest.json`. Directories are 0700 and files 0600 (the
/// objects are encrypted, but an unencrypted backup may be asked for).
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> LocalDir {
        LocalDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.root.join(plain_id(id)?))
    }

    fn object_path(&self, id: &str, name: &str) -> Result<PathBuf> {
        Ok(self.dir(id)?.join(plain_object_name(name)?))
    }

    fn wal_dir(&self) -> PathBuf {
        self.root.join(WAL_PREFIX)
    }
}

/// A new file at `path` (0600), written under `.<name>.partial` until
/// committed: synced, renamed into place, its directory synced.
pub fn local_object(path: PathBuf) -> Result<Box<dyn ObjectWriter>> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.partial"));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io("creating", &partial))?;
    Ok(Box::new(LocalObject { file, partial, path, committed: false }))
}

/// `id` when it is a plain name (no separators, not hidden): what backups
/// are called in every store.
pub fn plain_id(id: &str) -> Result<&str> {
    if !is_plain_name(id) || id.starts_with('.') {
        return Err(BackupError::Refused {
            what: format!("backup id {id:?}"),
            detail: "an id is a plain name such as 20260821T101502Z".into(),
        });
    }
    Ok(id)
}

/// `name` when it is a plain file name (no separators, not hidden): what
/// objects and WAL files are called in every store.
pub fn plain_object_name(name: &str) -> Result<&str> {
    if !is_plain_name(name) || name.starts_with('.') {
        return Err(BackupError::Refused {
            what: format!("object name {name:?}"),
            detail: "object names are plain file names".into(),
        });
    }
    Ok(name)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing directory", dir))
}

/// A file written under `.<name>.partial`, synced and renamed on commit.
struct LocalObject {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Write for LocalObject {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter for LocalObject {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.file.sync_all().map_err(io("syncing", &self.partial))?;
        fs::rename(&self.partial, &self.path).map_err(io("renaming into place", &self.partial))?;
        self.committed = true;
        sync_dir(self.path.parent().unwrap_or(Path::new("/")))
    }
}

impl Drop for LocalObject {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = fs::remove_file(&self.partial)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.partial.display(), error = %e, "could not remove a partial backup object");
        }
    }
}

impl Store for LocalDir {
    fn url(&self) -> String {
        let path = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("file://{}", path.display())
    }

    fn begin(&self, id: &str) -> Result<()> {
        let dir = self.dir(id)?;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.root).map_err(io("creating", &self.root))?;
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(io("creating the backup directory", &dir))?;
        sync_dir(&self.root)
    }

    fn put_object(&self, id: &str, name: &str) -> Result<Box<dyn ObjectWriter>> {
        local_object(self.object_path(id, name)?)
    }

    fn get_object(&self, id: &str, name: &str) -> Result<Box<dyn Read + Send>> {
        let path = self.object_path(id, name)?;
        let file = File::open(&path).map_err(io("opening", &path))?;
        Ok(Box::new(file))
    }

    fn put_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir(id)?.join(MANIFEST_FILE);
        crate::fsutil::write_atomic(&path, bytes, 0o600).map_err(|e| BackupError::Io {
            action: "writing the manifest".into(),
            path: path.clone(),
            cause: std::io::Error::other(format!("{e:#}")),
        })
    }

    fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let path = self.dir(id)?.join(MANIFEST_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("reading", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir || name.starts_with('.') || name == WAL_PREFIX {
                continue;
            }
            let path = entry.path();
            let modified = entry.metadata().and_then(|m| m.modified()).map_err(io("reading", &path))?;
            let complete = path.join(MANIFEST_FILE).is_file();
            out.push(Entry { id: name, complete, modified });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn delete(&self, id: &str) -> Result<()> {
        let dir = self.dir(id)?;
        let manifest = dir.join(MANIFEST_FILE);
        match fs::remove_file(&manifest) {
            Ok(()) => sync_dir(&dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &manifest)(e)),
        }
        fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
        sync_dir(&self.root)
    }

    fn put_wal(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let dir = self.wal_dir();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io("creating", &dir))?;
        local_object(dir.join(plain_object_name(name)?))
    }

    fn get_wal(&self, name: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let path = self.wal_dir().join(plain_object_name(name)?);
        match File::open(&path) {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("opening", &path)(e)),
        }
    }

    fn list_wal(&self) -> Result<Vec<WalEntry>> {
        let dir = self.wal_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("reading", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let meta = entry.metadata().map_err(io("reading", entry.path()))?;
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().map_err(io("reading", entry.path()))?;
            out.push(WalEntry { name, size: meta.len(), modified });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete_wal(&self, name: &str) -> Result<()> {
        let path = self.wal_dir().join(plain_object_name(name)?);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }
}

/// Make a directory private (0700), as backups hold every Secret.
pub fn make_private(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("setting permissions", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_backup_is_listed_complete_only_once_its_manifest_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path().join("backups"));
        assert_eq!(store.list().unwrap(), vec![], "a missing root is an empty destination");
        store.begin("20260821T101502Z").unwrap();
        assert!(store.begin("20260821T101502Z").is_err(), "an id is never reused");

        let mut w = store.put_object("20260821T101502Z", "base.tar.zst.age").unwrap();
        w.write_all(b"half").unwrap();
        // Mid-write: nothing under the final name, the backup incomplete.
        let dir = tmp.path().join("backups/20260821T101502Z");
        assert_eq!(names(&dir), [".base.tar.zst.age.partial"]);
        let listed = store.list().unwrap();
        assert_eq!((listed.len(), listed[0].complete), (1, false));
        assert_eq!(store.get_manifest("20260821T101502Z").unwrap(), None);

        w.write_all(b" and the rest").unwrap();
        w.commit().unwrap();
        assert_eq!(names(&dir), ["base.tar.zst.age"]);
        assert!(!store.list().unwrap()[0].complete, "objects alone do not make a backup");

        store.put_manifest("20260821T101502Z", b"{}").unwrap();
        assert!(store.list().unwrap()[0].complete);
        let mut text = String::new();
        store.get_object("20260821T101502Z", "base.tar.zst.age").unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "half and the rest");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode(&dir), mode(&dir.join("base.tar.zst.age")), mode(&dir.join(MANIFEST_FILE))),
            (0o700, 0o600, 0o600)
        );

        store.delete("20260821T101502Z").unwrap();
        assert_eq!(store.list().unwrap(), vec![]);
    }

    #[test]
    fn archived_wal_lives_apart_from_the_backups() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path().join("backups"));
        assert_eq!(store.list_wal().unwrap(), vec![]);
        assert!(store.get_wal("000000010000000000000003").unwrap().is_none());
        let mut w = store.put_wal("000000010000000000000003").unwrap();
        w.write_all(b"segment").unwrap();
        assert_eq!(store.list_wal().unwrap(), vec![], "an uncommitted file is not listed");
        w.commit().unwrap();
        let listed = store.list_wal().unwrap();
        assert_eq!((listed.len(), listed[0].name.as_str(), listed[0].size), (1, "000000010000000000000003", 7));
        assert_eq!(store.list().unwrap(), vec![], "wal/ is not a backup");
        let mut text = String::new();
        store.get_wal("000000010000000000000003").unwrap().unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "segment");
        assert!(store.put_wal("../x").is_err());
        store.delete_wal("000000010000000000000003").unwrap();
        store.delete_wal("000000010000000000000003").unwrap();
        assert_eq!(store.list_wal().unwrap(), vec![]);
    }

    #[test]
    fn an_abandoned_object_leaves_nothing_under_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path());
        store.begin("20260821T101502Z").unwrap();
        let mut w = store.put_object("20260821T101502Z", "base.tar").unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(names(&tmp.path().join("20260821T101502Z")), Vec::<String>::new());
    }

    #[test]
    fn names_cannot_escape_the_destination_and_unknown_schemes_say_what_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path());
        assert!(store.get_manifest("../etc").is_err());
        assert!(store.get_object("20260821T101502Z", "../../x").is_err());
        assert!(store.put_object("20260821T101502Z", ".hidden").is_err());
        let none = S3Options::default();
        let err = open("gs://bucket/backups", &none).err().unwrap().to_string();
        assert!(err.contains("gs:// destination") && err.contains("use s3://BUCKET/PREFIX"), "{err}");
        assert!(open("file://relative", &none).is_err());
        assert_eq!(open(&format!("file://{}", tmp.path().display()), &none).unwrap().url(), store.url());
    }
}
