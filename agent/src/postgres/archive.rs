//! Timestamped `.tar.gz` archives of a data directory, taken before anything
//! in it is discarded, in `<data_dir>-archives/` next to it.
//!
//! An archive holds every Kubernetes Secret and the replication password, so
//! the directory is 0700 and each archive 0600 (root's: the agent writes
//! them). Each new archive prunes the oldest beyond the configured number
//! (`postgres.archive_keep`), never the one just written. Archives an
//! earlier version left next to the data directory are moved in (and made
//! 0600) first, so they are counted and pruned too.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use super::{PgError, Result};

fn dir_name(data_dir: &Path) -> String {
    data_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pgdata".into())
}

/// Where the archives of `data_dir` go: `<data_dir>-archives`, next to it.
pub fn archive_dir(data_dir: &Path) -> PathBuf {
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    parent.join(format!("{}-archives", dir_name(data_dir)))
}

/// `<archive_dir>/<name>-<UTC timestamp>.tar.gz`; a numeric suffix keeps
/// two archives taken within one second apart.
pub fn archive_path(data_dir: &Path, now: time::OffsetDateTime) -> PathBuf {
    let stamp = crate::fsutil::utc_stamp(now);
    let name = dir_name(data_dir);
    let dir = archive_dir(data_dir);
    let mut candidate = dir.join(format!("{name}-{stamp}.tar.gz"));
    let mut n = 1;
    while candidate.exists() {
        candidate = dir.join(format!("{name}-{stamp}.{n}.tar.gz"));
        n += 1;
    }
    candidate
}

/// The archives of `data_dir`, oldest first: those in its archive
/// directory, and any an earlier version left next to it.
pub fn list(data_dir: &Path) -> Vec<PathBuf> {
    let name = dir_name(data_dir);
    let mut found: Vec<((String, u32), PathBuf)> =
        [Some(archive_dir(data_dir)), data_dir.parent().map(Path::to_path_buf)]
            .into_iter()
            .flatten()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flat_map(|entries| entries.filter_map(|e| e.ok()))
            .filter_map(|e| archive_order(&e.file_name().to_string_lossy(), &name).map(|order| (order, e.path())))
            .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// The age order of an archive of the data directory `name` from its file
/// name (`<name>-<stamp>[.<n>].tar.gz`): later stamps, then higher `n`, are
/// newer. `None` for anything else.
fn archive_order(file_name: &str, name: &str) -> Option<(String, u32)> {
    let rest = file_name.strip_prefix(name)?.strip_prefix('-')?.strip_suffix(".tar.gz")?;
    let (stamp, n) = match rest.split_once('.') {
        Some((stamp, n)) => (stamp, n.parse().ok()?),
        None => (rest, 0),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let well_formed =
        stamp.len() == 16 && digits(&stamp[..8]) && &stamp[8..9] == "T" && digits(&stamp[9..15]) && &stamp[15..] == "Z";
    well_formed.then(|| (stamp.to_string(), n))
}

/// Of `files` (archive file names of `name`, in any order), those to delete
/// so that the newest `keep` remain, oldest first; `just_written` is never
/// among them.
pub fn to_prune(files: &[String], name: &str, keep: usize, just_written: &str) -> Vec<String> {
    let mut archives: Vec<((String, u32), &String)> =
        files.iter().filter_map(|f| archive_order(f, name).map(|order| (order, f))).collect();
    archives.sort();
    let excess = archives.len().saturating_sub(keep.max(1));
    archives.into_iter().take(excess).map(|(_, f)| f.clone()).filter(|f| f != just_written).collect()
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PgError + use<> {
    let path = path.to_path_buf();
    move |source| PgError::Io { action, path, source }
}

/// Create the archive directory, 0700, and move in (0600) archives an
/// earlier version left next to the data directory.
fn prepare_archive_dir(data_dir: &Path) -> Result<PathBuf> {
    let dir = archive_dir(data_dir);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io("creating directory", &dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("setting permissions", &dir))?;
    let name = dir_name(data_dir);
    let Some(parent) = data_dir.parent() else { return Ok(dir) };
    for entry in fs::read_dir(parent).map_err(io("reading directory", parent))? {
        let entry = entry.map_err(io("reading directory", parent))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if archive_order(&file_name, &name).is_none() {
            continue;
        }
        let (from, to) = (entry.path(), dir.join(&file_name));
        fs::set_permissions(&from, fs::Permissions::from_mode(0o600)).map_err(io("setting permissions", &from))?;
        fs::rename(&from, &to).map_err(io("moving an archive into the archive directory", &from))?;
        tracing::info!(from = %from.display(), to = %to.display(), "moved an earlier archive into the archive directory");
    }
    Ok(dir)
}

/// Delete the oldest archives of `data_dir` beyond `keep`, never `just_written`.
fn prune(data_dir: &Path, keep: usize, just_written: &Path) -> Result<Vec<PathBuf>> {
    let dir = archive_dir(data_dir);
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io("reading directory", &dir))? {
        files.push(entry.map_err(io("reading directory", &dir))?.file_name().to_string_lossy().into_owned());
    }
    let written = just_written.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut removed = Vec::new();
    for file in to_prune(&files, &dir_name(data_dir), keep, &written) {
        let path = dir.join(file);
        fs::remove_file(&path).map_err(io("removing an old archive", &path))?;
        tracing::info!(event = "postgres_archive_pruned", archive = %path.display(), keep, "removed an old data directory archive");
        removed.push(path);
    }
    Ok(removed)
}

/// Archive `data_dir` (the server must be stopped) and return the tarball's
/// path; then prune older archives so that `keep` remain. The archive is
/// complete and synced to disk before this returns; on error nothing is
/// left half-written under the final name. A failed pruning is logged, not
/// returned: the archive itself is safe.
pub async fn archive_data_dir(data_dir: &Path, keep: usize) -> Result<PathBuf> {
    let data_dir = data_dir.to_path_buf();
    prepare_archive_dir(&data_dir)?;
    let archive = archive_path(&data_dir, time::OffsetDateTime::now_utc());
    let (d, a) = (data_dir.clone(), archive.clone());
    let result = tokio::task::spawn_blocking(move || write_archive(&d, &a))
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(format!("archive task failed: {join}"))));
    match result {
        Ok(()) => {
            tracing::info!(event = "postgres_archived", data_dir = %data_dir.display(), archive = %archive.display(), "archived PostgreSQL data directory");
            if let Err(e) = prune(&data_dir, keep, &archive) {
                tracing::warn!(error = %e, dir = %archive_dir(&data_dir).display(), "pruning old archives failed; they stay");
            }
            Ok(archive)
        }
        Err(source) => Err(PgError::Archive { data_dir, archive, source }),
    }
}

fn write_archive(data_dir: &Path, archive: &Path) -> std::io::Result<()> {
    let partial = archive.with_extension("gz.partial");
    let result = (|| {
        let file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
        // A leftover partial file keeps its old mode: make sure.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        let gz = GzEncoder::new(BufWriter::new(file), Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.follow_symlinks(false);
        let root = data_dir.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("pgdata"));
        tar.append_dir_all(&root, data_dir)?;
        let mut writer = tar.into_inner()?.finish()?;
        writer.flush()?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&partial, archive)?;
        if let Some(parent) = archive.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err()
        && let Err(e) = fs::remove_file(&partial)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %partial.display(), error = %e, "could not remove partial archive");
    }
    result
}

/// Remove everything inside `dir`, keeping `dir` itself. Only called after
/// [`archive_data_dir`] succeeded.
pub fn clear_dir(dir: &Path) -> Result<()> {
    let entries =
        fs::read_dir(dir).map_err(|source| PgError::Io { action: "reading directory", path: dir.into(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| PgError::Io { action: "reading directory", path: dir.into(), source })?;
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(|source| PgError::Io { action: "removing", path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_name_is_timestamped_in_the_archive_dir() {
        let now = time::Date::from_calendar_date(2026, time::Month::November, 27)
            .unwrap()
            .with_hms(7, 3, 9)
            .unwrap()
            .assume_utc();
        let p = archive_path(Path::new("/nonexistent/pg/main"), now);
        assert_eq!(p, PathBuf::from("/nonexistent/pg/main-archives/main-20261127T070309Z.tar.gz"));
    }

    #[test]
    fn pruning_keeps_the_newest_and_never_the_one_just_written() {
        let files: Vec<String> = [
            "main-20260102T000000Z.tar.gz",
            "main-20260101T000000Z.1.tar.gz",
            "main-20260101T000000Z.tar.gz",
            "main-20260103T000000Z.tar.gz",
            "main-20260101T000000Z.gz.partial",
            "other-20250101T000000Z.tar.gz",
            "main-notastamp.tar.gz",
        ]
        .map(String::from)
        .to_vec();
        let newest = "main-20260103T000000Z.tar.gz";
        assert_eq!(
            to_prune(&files, "main", 2, newest),
            ["main-20260101T000000Z.tar.gz", "main-20260101T000000Z.1.tar.gz"],
            "oldest first, a suffixed archive after its unsuffixed twin"
        );
        assert_eq!(to_prune(&files, "main", 4, newest), Vec::<String>::new());
        assert_eq!(to_prune(&files, "main", 0, newest).len(), 3, "at least the newest stays");
        // A clock set back: the one just written sorts oldest and still stays.
        let just = "main-20260101T000000Z.tar.gz";
        assert!(!to_prune(&files, "main", 1, just).contains(&just.to_string()));
    }

    #[tokio::test]
    async fn archives_are_private_pruned_and_clear_empties_the_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("main");
        fs::create_dir_all(data.join("global")).unwrap();
        fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        fs::write(data.join("global/pg_control"), b"\x01\x02").unwrap();
        // An archive an earlier version left next to the data directory, world-readable.
        let legacy = tmp.path().join("main-20200101T000000Z.tar.gz");
        fs::write(&legacy, b"old").unwrap();
        fs::set_permissions(&legacy, fs::Permissions::from_mode(0o644)).unwrap();

        let archive = archive_data_dir(&data, 2).await.unwrap();
        let dir = tmp.path().join("main-archives");
        assert_eq!(archive.parent(), Some(dir.as_path()));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir), mode(&archive)), (0o700, 0o600));
        let moved = dir.join("main-20200101T000000Z.tar.gz");
        assert!(!legacy.exists() && moved.is_file(), "the earlier archive was not moved in");
        assert_eq!(mode(&moved), 0o600);

        let mut names: Vec<String> = tar::Archive::new(flate2::read::GzDecoder::new(File::open(&archive).unwrap()))
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(names.contains(&"main/PG_VERSION".to_string()), "{names:?}");
        assert!(names.contains(&"main/global/pg_control".to_string()), "{names:?}");

        clear_dir(&data).unwrap();
        assert!(data.is_dir());
        assert_eq!(fs::read_dir(&data).unwrap().count(), 0);
        let second = archive_data_dir(&data, 2).await.unwrap();
        assert_ne!(second, archive, "a second archive must not overwrite the first");
        let mut left: Vec<PathBuf> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        left.sort();
        let mut want = vec![archive.clone(), second.clone()];
        want.sort();
        assert_eq!(left, want, "the oldest (the moved one) is pruned, the two newest stay");
    }
}
