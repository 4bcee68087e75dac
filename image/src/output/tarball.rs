//! A reproducible tarball of a directory tree.
//!
//! Entries are sorted by name (parents first), mtimes are clamped to
//! `SOURCE_DATE_EPOCH`, uid/gid and modes are kept, user and group names are
//! left out, and no atime/ctime or other per-run PAX records are written:
//! the same tree and epoch always give the same bytes.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarStats {
    pub entries: u64,
    /// Sum of regular file sizes (the unpacked size of the tree).
    pub content_bytes: u64,
    /// Sockets cannot be archived and are left out.
    pub skipped_sockets: Vec<PathBuf>,
}

/// Write `root` as a tar stream into `out`.
pub fn write_tree<W: Write>(root: &Path, epoch: u64, out: W) -> io::Result<(W, TarStats)> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut stats = TarStats::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    walk(root, Path::new(""), epoch, &mut builder, &mut stats, &mut links)?;
    Ok((builder.into_inner()?, stats))
}

fn sorted_children(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    let mut children = fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
    children.sort_by_key(|e| e.file_name());
    Ok(children)
}

fn walk<W: Write>(
    root: &Path,
    rel: &Path,
    epoch: u64,
    builder: &mut tar::Builder<W>,
    stats: &mut TarStats,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    for child in sorted_children(&root.join(rel))? {
        let child_rel = rel.join(child.file_name());
        let path = root.join(&child_rel);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_socket() {
            stats.skipped_sockets.push(child_rel);
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(u64::from(meta.uid()));
        header.set_gid(u64::from(meta.gid()));
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0).min(epoch));
        header.set_size(0);
        stats.entries += 1;
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut header, &child_rel, io::empty())?;
            walk(root, &child_rel, epoch, builder, stats, links)?;
        } else if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(&path)?;
            builder.append_link(&mut header, &child_rel, &target)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                    header.set_entry_type(tar::EntryType::Link);
                    builder.append_link(&mut header, &child_rel, first)?;
                    continue;
                }
                links.insert((meta.dev(), meta.ino()), child_rel.clone());
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            stats.content_bytes += meta.len();
            builder.append_data(&mut header, &child_rel, fs::File::open(&path)?)?;
        } else {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            header.set_entry_type(kind);
            if !ft.is_fifo() {
                let rdev = meta.rdev();
                header.set_device_major(nix::sys::stat::major(rdev) as u32)?;
                header.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
            }
            builder.append_data(&mut header, &child_rel, io::empty())?;
        }
    }
    Ok(())
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// The inner writer, the sha256 (hex) and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
