//! Restoring a full backup into a data directory PostgreSQL starts from.
//!
//! The backup is decrypted, decompressed and unpacked into a staging
//! directory next to the target, checked against the manifest and with
//! `pg_verifybackup` (PostgreSQL's own manifest, and the WAL it needs),
//! handed to the server's OS user with mode 0700, and only then renamed
//! into place. A target that holds data is refused unless `force` is
//! given, and then moved aside, never deleted.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::crypto::Identities;
use super::manifest::{Manifest, TAR};
use super::recover::{self, Recovered, Target};
use super::store::{ObjectWriter, Store, WalEntry};
use super::stream::{Counting, ObjectSource, Phase, Progress};
use super::verify;
use super::wal;
use super::{BackupError, Result, io};
use crate::cmd::Tool;
use crate::postgres::files::Owner;

#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Move a data directory that holds data aside instead of refusing.
    pub force: bool,
    /// The server's OS account (the data directory's owner).
    pub owner: Owner,
    /// Directory of `pg_verifybackup` and `pg_waldump`.
    pub bin_dir: PathBuf,
    /// Verify the backup end to end and say what would be done; write nothing.
    pub dry_run: bool,
    /// Point-in-time recovery to this time (RFC 3339), through the archived WAL.
    pub target_time: Option<String>,
    /// How far Kine's revision jumps ([`super::recover::DEFAULT_BUMP`]).
    pub bump: i64,
    /// Check the restored data with `pg_amcheck` before it is put in place.
    pub verify: bool,
    /// This node's PostgreSQL settings (from its cloud-config): the restored
    /// directory gets this node's configuration files, not those of the node
    /// the backup was taken on. `None` keeps the backup's.
    pub node: Option<crate::postgres::Settings>,
}

/// What [`restore`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    pub backup: String,
    pub data_dir: PathBuf,
    /// Where the data directory that was there went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_aside: Option<PathBuf>,
    pub content_bytes: u64,
    /// Archived WAL files fetched for point-in-time recovery.
    pub wal_files: usize,
    /// What the recovery replayed and Kine's revision jump (not on a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovered>,
    pub dry_run: bool,
    #[serde(skip)]
    pub elapsed: Duration,
}

fn name_of(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pgdata".into())
}

fn sibling(dir: &Path, name: String) -> PathBuf {
    dir.parent().unwrap_or(Path::new("/")).join(name)
}

/// The name a data directory is moved aside to: `<dir>.pre-restore-<stamp>`.
pub fn aside_path(data_dir: &Path, now: time::OffsetDateTime) -> PathBuf {
    let base = format!("{}.pre-restore-{}", name_of(data_dir), super::backup_id(now));
    let mut candidate = sibling(data_dir, base.clone());
    let mut n = 1;
    while candidate.exists() {
        candidate = sibling(data_dir, format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

/// The PostgreSQL major version of the tools in `bin_dir`.
async fn tools_major(bin_dir: &Path) -> Result<u32> {
    let tool = Tool::new(bin_dir.join("pg_verifybackup")).arg("--version");
    let out = tool.run().await.map_err(|source| BackupError::Tool {
        action: format!("asking the PostgreSQL tools in {} for their version (--pg-bin-dir)", bin_dir.display()),
        cause: source,
    })?;
    // "pg_verifybackup (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
    out.stdout.split_whitespace().nth(2).and_then(|v| v.split('.').next()).and_then(|m| m.parse().ok()).ok_or_else(
        || BackupError::Postgres {
            what: format!("reading the version of {}", tool.display()),
            detail: format!("unexpected output {:?}", out.stdout.trim()),
        },
    )
}

/// Restore backup `m` from `store` into `opts.data_dir`, telling
/// `progress` how far each phase is.
pub async fn restore(
    store: std::sync::Arc<dyn Store>,
    m: &Manifest,
    identities: std::sync::Arc<Identities>,
    opts: &Options,
    progress: std::sync::Arc<dyn Progress>,
) -> Result<Restored> {
    let started = Instant::now();
    let target = opts.data_dir.clone();
    let what = format!("restoring backup {} into {}", m.id, target.display());
    let running = crate::postgres::is_running(&target).map_err(|e| BackupError::Refused {
        what: what.clone(),
        detail: format!("cannot tell whether a server runs on it: {e}"),
    })?;
    if running {
        return Err(BackupError::Refused {
            what,
            detail: "a PostgreSQL server runs on this data directory; stop the agent (systemctl stop geminik8s-agent) and the server first".into(),
        });
    }
    let major = tools_major(&opts.bin_dir).await?;
    if major != m.postgres.major {
        return Err(BackupError::Refused {
            what,
            detail: format!(
                "the backup is of PostgreSQL {} and the tools in {} are PostgreSQL {major}; use the same major version",
                m.postgres.major,
                opts.bin_dir.display()
            ),
        });
    }
    let holds_data = match std::fs::read_dir(&target) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io("reading", &target)(e)),
    };
    if holds_data && !opts.force {
        return Err(BackupError::Refused {
            what,
            detail: "the data directory is not empty; give --force to move it aside (to <dir>.pre-restore-<time>, nothing is deleted), or choose another --data-dir".into(),
        });
    }
    let aside = holds_data.then(|| aside_path(&target, time::OffsetDateTime::now_utc()));

    if opts.dry_run {
        let (s, m2, ids) = (store.clone(), m.clone(), identities.clone());
        let checking = progress.phase(Phase::Checking, None);
        tokio::task::spawn_blocking(move || verify::verify(s.as_ref(), &m2, &ids, true))
            .await
            .map_err(|e| BackupError::Postgres { what: "the verify task".into(), detail: e.to_string() })??;
        drop(checking);
        return Ok(Restored {
            backup: m.id.clone(),
            data_dir: target,
            moved_aside: aside,
            content_bytes: m.objects.iter().map(|o| o.content_size).sum(),
            wal_files: 0,
            recovered: None,
            dry_run: true,
            elapsed: started.elapsed(),
        });
    }

    let staging = sibling(&target, format!(".{}.restoring-{}", name_of(&target), m.id));
    remove_staging(&staging)?;
    std::fs::create_dir_all(target.parent().unwrap_or(Path::new("/"))).map_err(io("creating", &target))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&staging).map_err(io("creating", &staging))?;
    }
    let result = async {
        let (s, m2, ids, dir, p) = (store.clone(), m.clone(), identities.clone(), staging.clone(), progress.clone());
        let content_bytes = tokio::task::spawn_blocking(move || unpack(s.as_ref(), &m2, &ids, &dir, p.as_ref()))
            .await
            .map_err(|e| BackupError::Postgres { what: "the restore task".into(), detail: e.to_string() })??;
        chown_tree(&staging, opts.owner)?;
        super::store::make_private(&staging)?;
        let checking = progress.phase(Phase::Checking, None);
        Tool::new(opts.bin_dir.join("pg_verifybackup")).arg(&staging).current_dir("/").run().await.map_err(
            |source| BackupError::Tool {
                action: format!("checking the restored files of backup {} with pg_verifybackup", m.id),
                cause: source,
            },
        )?;
        drop(checking);
        // A backup taken on a standby carries its `standby.signal`: the
        // restored server is not that standby, and a signal left behind
        // would keep it in recovery.
        for signal in ["standby.signal", "recovery.signal"] {
            match std::fs::remove_file(staging.join(signal)) {
                Ok(()) => tracing::debug!(file = signal, "removed the source's signal file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", staging.join(signal))(e)),
            }
        }
        // To a point in time: the archived WAL from the backup's start on;
        // to the backup's end: the timeline history files only.
        let start = match &opts.target_time {
            Some(_) => {
                let label = wal::read_text(&staging.join("backup_label"))?;
                Some(wal::start_file(&label).ok_or_else(|| BackupError::Corrupt {
                    id: m.id.clone(),
                    object: "backup_label".into(),
                    detail: "it names no start WAL file".into(),
                })?)
            }
            None => None,
        };
        let wal_dir = wal::restore_wal_dir(&staging);
        let (ids, dir) = (identities.clone(), wal_dir.clone());
        let s = WalFetchCount { inner: store.clone(), progress: progress.clone() };
        let fetching = progress.phase(Phase::FetchingWal, None);
        let (files, bytes) =
            tokio::task::spawn_blocking(move || wal::fetch_for_restore(&s, &ids, start.as_deref(), &dir))
                .await
                .map_err(|e| BackupError::Postgres { what: "the WAL fetch task".into(), detail: e.to_string() })??;
        drop(fetching);
        tracing::info!(event = "restore_wal_fetched", files, bytes, "fetched the archived WAL");
        chown_tree(&wal_dir, opts.owner)?;
        let target = Target { time: opts.target_time.clone(), wal_dir };
        let recovered =
            recover::recover(&staging, &opts.bin_dir, opts.owner, &target, opts.bump, opts.verify, progress.as_ref())
                .await?;
        std::fs::remove_dir_all(&target.wal_dir).map_err(io("removing the fetched WAL", &target.wal_dir))?;
        // Segments count as fetched WAL; history files only steer the timeline.
        let wal_files = if opts.target_time.is_some() { files } else { 0 };
        if let Some(node) = &opts.node {
            let settings = crate::postgres::Settings { data_dir: staging.clone(), ..node.clone() };
            crate::postgres::files::write_config(&settings, crate::postgres::render::ServerRole::Primary, opts.owner)
                .map_err(|e| BackupError::Postgres {
                what: format!("writing this node's configuration into {}", staging.display()),
                detail: e.to_string(),
            })?;
        }
        Ok::<_, BackupError>((content_bytes, wal_files, recovered))
    }
    .await;
    let (content_bytes, wal_files, recovered) = match result {
        Ok(n) => n,
        Err(e) => {
            if let Err(cleanup) = remove_staging(&staging) {
                tracing::warn!(error = %cleanup, "could not remove the staging directory");
            }
            return Err(e);
        }
    };
    if let Some(aside) = &aside {
        std::fs::rename(&target, aside)
            .map_err(io(format!("moving the old data directory aside to {}", aside.display()), &target))?;
        tracing::info!(event = "restore_moved_aside", from = %target.display(), to = %aside.display(), "moved the old data directory aside");
    } else if target.exists() {
        std::fs::remove_dir(&target).map_err(io("removing the empty data directory", &target))?;
    }
    std::fs::rename(&staging, &target).map_err(io(format!("renaming {} into place", staging.display()), &target))?;
    let parent = target.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io("syncing directory", parent))?;
    tracing::info!(event = "restore_done", backup = %m.id, data_dir = %target.display(), "restored a backup");
    Ok(Restored {
        backup: m.id.clone(),
        data_dir: target,
        moved_aside: aside,
        content_bytes,
        wal_files,
        recovered: Some(recovered),
        dry_run: false,
        elapsed: started.elapsed(),
    })
}

fn remove_staging(staging: &Path) -> Result<()> {
    match std::fs::remove_dir_all(staging) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing the staging directory", staging)(e)),
    }
}

/// Decrypt, decompress and unpack every tar object of `m` into `dir`, checking
/// both ends against the manifest and telling `progress` the content bytes
/// as they are unpacked. Returns the content bytes.
fn unpack(
    store: &dyn Store,
    m: &Manifest,
    identities: &Identities,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<u64> {
    let tars = || m.objects.iter().filter(|o| o.content == TAR);
    let unpacking = progress.phase(Phase::Unpacking, Some(tars().map(|o| o.content_size).sum()));
    let mut total = 0;
    for o in tars() {
        let corrupt = |detail: String| BackupError::Corrupt { id: m.id.clone(), object: o.name.clone(), detail };
        let reader = store.get_object(&m.id, &o.name)?;
        let mut source = ObjectSource::new(reader, m.compression, &m.encryption, identities, &m.id, &o.name)?;
        {
            let mut archive = tar::Archive::new(Counting::new(&mut source, |n| unpacking.advance(n)));
            archive.set_preserve_permissions(true);
            archive.set_overwrite(false);
            archive.unpack(dir).map_err(|e| corrupt(format!("unpacking into {}: {e}", dir.display())))?;
            io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|e| corrupt(format!("reading: {e}")))?;
        }
        let got = source.finish();
        verify::check_read(o, &got).map_err(corrupt)?;
        total += got.content_size;
    }
    Ok(total)
}

/// The store as the WAL fetch sees it, telling `progress` of each archived
/// WAL file opened (the fetch reads each one whole).
struct WalFetchCount {
    inner: std::sync::Arc<dyn Store>,
    progress: std::sync::Arc<dyn Progress>,
}

impl Store for WalFetchCount {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn begin(&self, id: &str) -> Result<()> {
        self.inner.begin(id)
    }
    fn put_object(&self, id: &str, name: &str) -> Result<Box<dyn ObjectWriter>> {
        self.inner.put_object(id, name)
    }
    fn get_object(&self, id: &str, name: &str) -> Result<Box<dyn io::Read + Send>> {
        self.inner.get_object(id, name)
    }
    fn put_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        self.inner.put_manifest(id, bytes)
    }
    fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get_manifest(id)
    }
    fn list(&self) -> Result<Vec<super::store::Entry>> {
        self.inner.list()
    }
    fn delete(&self, id: &str) -> Result<()> {
        self.inner.delete(id)
    }
    fn put_wal(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        self.inner.put_wal(name)
    }
    fn get_wal(&self, name: &str) -> Result<Option<Box<dyn io::Read + Send>>> {
        let got = self.inner.get_wal(name)?;
        if got.is_some() {
            self.progress.advance(1);
        }
        Ok(got)
    }
    fn list_wal(&self) -> Result<Vec<WalEntry>> {
        self.inner.list_wal()
    }
    fn delete_wal(&self, name: &str) -> Result<()> {
        self.inner.delete_wal(name)
    }
}

/// Give `root` and everything under it to `owner` (symlinks themselves, not their targets).
fn chown_tree(root: &Path, owner: Owner) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        std::os::unix::fs::lchown(&path, Some(owner.uid), Some(owner.gid)).map_err(io("changing owner", &path))?;
        let meta = std::fs::symlink_metadata(&path).map_err(io("reading", &path))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io("reading", &path))? {
                stack.push(entry.map_err(io("reading", &path))?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_moved_aside_to_a_new_name() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("main");
        let now = time::OffsetDateTime::from_unix_timestamp(1_787_307_302).unwrap();
        let first = aside_path(&data, now);
        assert_eq!(first, tmp.path().join("main.pre-restore-20260821T101502Z"));
        std::fs::create_dir(&first).unwrap();
        assert_eq!(aside_path(&data, now), tmp.path().join("main.pre-restore-20260821T101502Z.1"));
    }
}
