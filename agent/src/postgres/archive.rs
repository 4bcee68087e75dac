//! Timestamped `.tar.gz` archives of a data directory, written next to it
//! before anything in it is discarded.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use super::{PgError, Result};

/// `<data_dir>-<UTC timestamp>.tar.gz`, next to `data_dir`; a numeric
/// suffix keeps two archives taken within one second apart.
pub fn archive_path(data_dir: &Path, now: time::OffsetDateTime) -> PathBuf {
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let name = data_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pgdata".into());
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    let mut candidate = parent.join(format!("{name}-{stamp}.tar.gz"));
    let mut n = 1;
    while candidate.exists() {
        candidate = parent.join(format!("{name}-{stamp}.{n}.tar.gz"));
        n += 1;
    }
    candidate
}

/// The archives of `data_dir` next to it, oldest first (their names sort by time).
pub fn list(data_dir: &Path) -> Vec<PathBuf> {
    let name = data_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pgdata".into());
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    let prefix = format!("{name}-");
    let mut found: Vec<PathBuf> = fs::read_dir(parent)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".tar.gz"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Archive `data_dir` (the server must be stopped) and return the tarball's
/// path. The archive is complete and synced to disk before this returns; on
/// error nothing is left half-written under the final name.
pub async fn archive_data_dir(data_dir: &Path) -> Result<PathBuf> {
    let data_dir = data_dir.to_path_buf();
    let archive = archive_path(&data_dir, time::OffsetDateTime::now_utc());
    let (d, a) = (data_dir.clone(), archive.clone());
    let result = tokio::task::spawn_blocking(move || write_archive(&d, &a))
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(format!("archive task failed: {join}"))));
    match result {
        Ok(()) => {
            tracing::info!(event = "postgres_archived", data_dir = %data_dir.display(), archive = %archive.display(), "archived PostgreSQL data directory");
            Ok(archive)
        }
        Err(source) => Err(PgError::Archive { data_dir, archive, source }),
    }
}

fn write_archive(data_dir: &Path, archive: &Path) -> std::io::Result<()> {
    let partial = archive.with_extension("gz.partial");
    let result = (|| {
        let file = File::create(&partial)?;
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
    fn archive_name_is_timestamped_next_to_the_data_dir() {
        let now = time::Date::from_calendar_date(2026, time::Month::November, 27)
            .unwrap()
            .with_hms(7, 3, 9)
            .unwrap()
            .assume_utc();
        let p = archive_path(Path::new("/nonexistent/pg/main"), now);
        assert_eq!(p, PathBuf::from("/nonexistent/pg/main-20261127T070309Z.tar.gz"));
    }

    #[tokio::test]
    async fn archive_holds_the_files_and_clear_empties_the_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("main");
        fs::create_dir_all(data.join("global")).unwrap();
        fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        fs::write(data.join("global/pg_control"), b"\x01\x02").unwrap();
        let archive = archive_data_dir(&data).await.unwrap();
        assert_eq!(archive.parent(), Some(tmp.path()));

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
        let second = archive_data_dir(&data).await.unwrap();
        assert_ne!(second, archive, "a second archive must not overwrite the first");
    }
}
