//! Applying image layers (tar, optionally gzip) onto a root directory.
//!
//! OCI whiteouts are honoured: `dir/.wh.name` deletes `dir/name` from the
//! layers below, `dir/.wh..wh..opq` empties `dir` of what the layers below
//! put there. Ownership (when running as root), modes, mtimes, symlinks,
//! hard links and device nodes are kept.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading layer {layer}: {source}")]
    Read {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: unpacking {path}: {source}")]
    Entry {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry `{path}` points outside the root")]
    Escape { layer: String, path: String },
    #[error("layer {layer} is zstd-compressed; only plain and gzip layers are supported")]
    Zstd { layer: String },
}

/// What applying a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Device nodes that could not be created (not running as root).
    pub skipped_devices: u64,
}

/// Open a layer file, undoing gzip when its magic says so.
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, UnpackError> {
    let layer = path.display().to_string();
    let file = fs::File::open(path).map_err(|source| UnpackError::Read { layer: layer.clone(), source })?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = reader.fill_buf().map_err(|source| UnpackError::Read { layer: layer.clone(), source })?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(GzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(UnpackError::Zstd { layer })
    } else {
        Ok(Box::new(reader))
    }
}

/// Clean relative path of an entry; `None` for the root itself.
fn relative(path: &Path) -> Option<Result<PathBuf, ()>> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Some(Err(())),
        }
    }
    if out.as_os_str().is_empty() { None } else { Some(Ok(out)) }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Apply one layer onto `root`. `layer` names it in errors.
pub fn apply_layer(reader: impl Read, root: &Path, layer: &str) -> Result<LayerStats, UnpackError> {
    let owners = nix::unistd::geteuid().is_root();
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(owners);
    archive.set_overwrite(true);
    let mut stats = LayerStats::default();
    // Paths this layer wrote: an opaque marker only hides what lies below.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let read_err = |source| UnpackError::Read { layer: layer.to_string(), source };
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry.path().map_err(read_err)?.into_owned();
        let rel = match relative(&raw) {
            None => continue,
            Some(Err(())) => return Err(UnpackError::Escape { layer: layer.into(), path: raw.display().to_string() }),
            Some(Ok(rel)) => rel,
        };
        let entry_err =
            |source| UnpackError::Entry { layer: layer.to_string(), path: rel.display().to_string(), source };
        stats.entries += 1;
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == OPAQUE {
            stats.opaque_dirs += 1;
            let dir = root.join(parent);
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children {
                    let child = child.map_err(entry_err)?;
                    let child_rel = parent.join(child.file_name());
                    if !written.contains(&child_rel) {
                        remove_any(&child.path()).map_err(entry_err)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            stats.whiteouts += 1;
            remove_any(&root.join(parent).join(hidden)).map_err(entry_err)?;
            continue;
        }
        let dest = root.join(&rel);
        let kind = entry.header().entry_type();
        // Replace what a lower layer had, unless both are directories.
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() && kind.is_dir() => {}
            Ok(_) => remove_any(&dest).map_err(entry_err)?,
            Err(_) => {}
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            if make_node(&entry, &dest, owners).map_err(entry_err)? {
                written.insert(rel);
            } else {
                stats.skipped_devices += 1;
            }
            continue;
        }
        if !entry.unpack_in(root).map_err(entry_err)? {
            return Err(UnpackError::Escape { layer: layer.into(), path: rel.display().to_string() });
        }
        written.insert(rel);
    }
    Ok(stats)
}

/// Create a device node or FIFO; `false` when not allowed (not root).
fn make_node<R: Read>(entry: &tar::Entry<R>, dest: &Path, owners: bool) -> io::Result<bool> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let header = entry.header();
    let kind = header.entry_type();
    let mode = Mode::from_bits_truncate(header.mode()?);
    if kind.is_fifo() {
        nix::unistd::mkfifo(dest, mode).map_err(io::Error::from)?;
    } else {
        if !owners {
            return Ok(false);
        }
        let flag = if kind.is_block_special() { SFlag::S_IFBLK } else { SFlag::S_IFCHR };
        let major = header.device_major()?.unwrap_or(0);
        let minor = header.device_minor()?.unwrap_or(0);
        mknod(dest, flag, mode, makedev(u64::from(major), u64::from(minor))).map_err(io::Error::from)?;
    }
    if owners {
        let uid = nix::unistd::Uid::from_raw(header.uid()? as u32);
        let gid = nix::unistd::Gid::from_raw(header.gid()? as u32);
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            dest,
            Some(uid),
            Some(gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
