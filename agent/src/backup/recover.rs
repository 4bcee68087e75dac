//! The last step of a restore: a private PostgreSQL server on the restored
//! files replays the WAL (to the end of the base backup, or through the
//! archive to a target time), and Kine's revision counter is moved past
//! every revision a client could have seen before the restore.
//!
//! Why the revision jump: Kubernetes clients (the API server's watch cache,
//! informers, `kubectl get -w`) remember revisions. After a restore the
//! datastore's newest revision is older than what they saw, so new writes
//! would reuse revision numbers they already hold, and a watch resumed from
//! one would silently miss changes. As etcd's `--bump-revision
//! --mark-compacted`, the newest revision jumps by `bump` (one deleted
//! record at the new revision, Kine's own gap form) and everything before it
//! is marked compacted, so a watch from an old revision gets "compacted"
//! and its client lists again. The record sits at the top, so Kine, which
//! starts watching at the newest revision, never waits on the ids skipped.
//!
//! The server listens on no address: only a socket in a private directory,
//! with archiving, synchronous replication and TLS off.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::stream::{Phase, Progress};
use super::{BackupError, Result, io};
use crate::cmd::Tool;
use crate::postgres::files::Owner;
use crate::postgres::render::{KINE_DB, KINE_TABLE};

/// How far Kine's revision jumps after a restore by default: the figure
/// Kubernetes' documentation gives for etcd (a billion writes since the
/// backup would be needed to reach it).
pub const DEFAULT_BUMP: i64 = 1_000_000_000;

/// The recovery log kept in the restored data directory.
pub const RECOVERY_LOG: &str = "geminik8s-restore.log";

/// Point-in-time recovery settings.
#[derive(Debug, Clone)]
/// Where a recovery stops, and what it reads besides the backup's own WAL.
pub struct Target {
    /// `recovery_target_time`, as PostgreSQL reads it (RFC 3339 works);
    /// `None`: the end of the backup.
    pub time: Option<String>,
    /// The directory the fetched WAL is in (`restore_command` copies from
    /// it): the archived WAL for a point in time, or only the timeline
    /// history files.
    pub wal_dir: PathBuf,
}

/// Kine's revisions before and after the jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Bumped {
    /// The newest revision the restored data held.
    pub newest: i64,
    /// The revision after the jump; everything before it reads as compacted.
    pub revision: i64,
}

/// What the recovery did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovered {
    /// The time of the last transaction replayed, as PostgreSQL reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transaction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kine: Option<Bumped>,
    pub timeline: u32,
    /// `restore --verify`: what the check of the restored data found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked: Option<Checked>,
}

/// The restored data checked: `pg_amcheck` found no corruption in these
/// databases (every table, every B-tree index, every heap tuple in its
/// indexes), and Kine's table holds this many live keys.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    pub databases: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kine_keys: Option<i64>,
}

/// A PostgreSQL server on `data_dir` reachable only through `socket_dir`.
struct Private {
    child: tokio::process::Child,
    socket_dir: PathBuf,
    bin_dir: PathBuf,
    owner: Owner,
    log: PathBuf,
}

impl Private {
    async fn start(data_dir: &Path, bin_dir: &Path, owner: Owner, target: &Target) -> Result<Private> {
        let socket_dir = tempfile::Builder::new()
            .prefix("gk8s-restore-")
            .tempdir()
            .map_err(io("creating a socket directory", std::env::temp_dir()))?
            .keep();
        std::os::unix::fs::chown(&socket_dir, Some(owner.uid), Some(owner.gid))
            .map_err(io("changing owner", &socket_dir))?;
        let log = data_dir.join(RECOVERY_LOG);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io("creating the recovery log", &log))?;
        std::os::unix::fs::chown(&log, Some(owner.uid), Some(owner.gid)).map_err(io("changing owner", &log))?;
        let mut settings = vec![
            "listen_addresses=".to_string(),
            format!("unix_socket_directories={}", socket_dir.display()),
            "port=5432".into(),
            "archive_mode=off".into(),
            "synchronous_standby_names=".into(),
            "ssl=off".into(),
            "hot_standby=on".into(),
            "logging_collector=off".into(),
            "wal_level=replica".into(),
        ];
        // Always an archive recovery, which ends on a new timeline: the
        // restored server's WAL must never continue the timeline another
        // server (the other node) wrote on after the backup, or a standby of
        // it would take the two histories for one. PostgreSQL reads the
        // archive's history files through restore_command and takes the
        // timeline after the newest.
        settings.push(format!("restore_command=cp '{}/%f' '%p'", target.wal_dir.display()));
        settings.push("recovery_target_action=promote".into());
        match &target.time {
            Some(time) => {
                settings.push(format!("recovery_target_time={time}"));
                settings.push("recovery_target_timeline=latest".into());
            }
            None => settings.push("recovery_target_timeline=current".into()),
        }
        let signal = data_dir.join("recovery.signal");
        std::fs::write(&signal, b"").map_err(io("writing", &signal))?;
        std::os::unix::fs::chown(&signal, Some(owner.uid), Some(owner.gid)).map_err(io("changing owner", &signal))?;
        let mut cmd = tokio::process::Command::new(bin_dir.join("postgres"));
        cmd.arg("-D").arg(data_dir);
        for s in &settings {
            cmd.arg("-c").arg(s);
        }
        cmd.uid(owner.uid)
            .gid(owner.gid)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io("opening", &log))?)
            .stderr(log_file)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(io("starting PostgreSQL on the restored files", bin_dir.join("postgres")))?;
        Ok(Private { child, socket_dir, bin_dir: bin_dir.to_path_buf(), owner, log })
    }

    fn psql(&self, db: &str, sql: &str) -> Tool {
        Tool::new(self.bin_dir.join("psql"))
            .user(self.owner.uid, self.owner.gid)
            .current_dir("/")
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", "5432", "-U", "postgres", "-d", db, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
    }

    async fn query(&self, db: &str, sql: &str) -> Result<String> {
        self.psql(db, sql)
            .run()
            .await
            .map(|o| o.stdout.trim().to_string())
            .map_err(|source| BackupError::Tool { action: "querying the restored server".into(), cause: source })
    }

    /// `pg_amcheck` over every database that takes connections, with the
    /// amcheck extension installed for the check where it was missing and
    /// removed again, so the restored data is left as it was.
    async fn amcheck(&self) -> Result<Vec<String>> {
        let databases: Vec<String> = self
            .query("postgres", "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")
            .await?
            .lines()
            .map(str::to_string)
            .collect();
        let mut installed_here = Vec::new();
        for db in &databases {
            if self.query(db, "SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'").await? == "0" {
                installed_here.push(db.clone());
            }
        }
        let checked = Tool::new(self.bin_dir.join("pg_amcheck"))
            .user(self.owner.uid, self.owner.gid)
            .current_dir("/")
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", "5432", "-U", "postgres", "--all", "--install-missing", "--heapallindexed"])
            .run()
            .await;
        for db in &installed_here {
            self.query(db, "DROP EXTENSION IF EXISTS amcheck").await?;
        }
        checked.map_err(|source| BackupError::Tool {
            action: "checking the restored data with pg_amcheck (tables, B-tree indexes)".into(),
            cause: source,
        })?;
        Ok(databases)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        crate::cmd::tail(&text, 12)
    }

    /// Wait until the server answers and has left recovery. Replay takes
    /// as long as the WAL needs: no deadline while the server runs.
    async fn wait_promoted(&mut self, progress: &dyn Progress) -> Result<()> {
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(io("waiting for PostgreSQL", &self.log))? {
                return Err(BackupError::Postgres {
                    what: "recovering the restored files".into(),
                    detail: format!(
                        "PostgreSQL exited ({status}); its log ({}) ends:\n{}",
                        self.log.display(),
                        self.log_tail()
                    ),
                });
            }
            if let Ok(out) = self.psql("postgres", "SELECT pg_is_in_recovery()").run().await
                && out.stdout.trim() == "f"
            {
                return Ok(());
            }
            if said.elapsed() > Duration::from_secs(10) {
                progress.suspend(&mut || {
                    tracing::info!(
                        event = "restore_recovering",
                        seconds = started.elapsed().as_secs(),
                        "PostgreSQL is still replaying WAL"
                    )
                });
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fast shutdown (a checkpoint, then exit) and wait for it.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT);
        }
        let status = self.child.wait().await.map_err(io("waiting for PostgreSQL to stop", &self.log))?;
        if let Err(e) = std::fs::remove_dir_all(&self.socket_dir) {
            tracing::debug!(error = %e, "removing the restore socket directory");
        }
        if !status.success() {
            return Err(BackupError::Postgres {
                what: "stopping PostgreSQL on the restored files".into(),
                detail: format!("it exited with {status}; its log ends:\n{}", self.log_tail()),
            });
        }
        Ok(())
    }
}

/// The SQL that moves Kine's newest revision `bump` further and marks
/// everything before it compacted, in one transaction.
fn bump_sql(bump: i64) -> String {
    let t = KINE_TABLE;
    format!(
        "DO $$ DECLARE r bigint; BEGIN \
           LOCK TABLE {t} IN EXCLUSIVE MODE; \
           SELECT COALESCE(max(id), 0) + {bump} INTO r FROM {t}; \
           IF EXISTS (SELECT 1 FROM {t} WHERE name = 'compact_rev_key') THEN \
             INSERT INTO {t} (id, name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
               VALUES (r, 'gap-' || r, 0, 1, 0, 0, 0, NULL, NULL); \
             UPDATE {t} SET prev_revision = r WHERE name = 'compact_rev_key'; \
           ELSE \
             INSERT INTO {t} (id, name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
               VALUES (r, 'compact_rev_key', 1, 0, r, r, 0, ''::bytea, ''::bytea); \
           END IF; \
           PERFORM setval(pg_get_serial_sequence('public.{t}', 'id'), r, true); \
         END $$"
    )
}

/// Recover the restored files in `data_dir` (owned by `owner`), then move
/// Kine's revision `bump` past the newest one (when the Kine table is there).
/// The replay is a phase of `progress`.
pub async fn recover(
    data_dir: &Path,
    bin_dir: &Path,
    owner: Owner,
    target: &Target,
    bump: i64,
    verify: bool,
    progress: &dyn Progress,
) -> Result<Recovered> {
    let mut server = Private::start(data_dir, bin_dir, owner, target).await?;
    let result = async {
        let replaying = progress.phase(Phase::Replaying, None);
        server.wait_promoted(progress).await?;
        drop(replaying);
        let databases = if verify {
            let checking = progress.phase(Phase::Checking, None);
            let databases = server.amcheck().await?;
            drop(checking);
            Some(databases)
        } else {
            None
        };
        let last = server.query("postgres", "SELECT COALESCE(pg_last_xact_replay_timestamp()::text, '')").await?;
        let has_kine = server
            .query("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{KINE_DB}'"))
            .await?
            == "1"
            && server.query(KINE_DB, &format!("SELECT to_regclass('public.{KINE_TABLE}') IS NOT NULL")).await? == "t";
        let kine_keys = match (&databases, has_kine) {
            (Some(_), true) => Some(
                server
                    .query(
                        KINE_DB,
                        &format!(
                            "SELECT count(*) FROM (SELECT DISTINCT ON (name) name, deleted FROM {KINE_TABLE} \
                             ORDER BY name, id DESC) k WHERE deleted = 0 AND name <> 'compact_rev_key'"
                        ),
                    )
                    .await?
                    .parse()
                    .unwrap_or(0),
            ),
            _ => None,
        };
        let checked = databases.map(|databases| Checked { databases, kine_keys });
        let kine = if has_kine {
            let newest: i64 = server
                .query(KINE_DB, &format!("SELECT COALESCE(max(id), 0) FROM {KINE_TABLE}"))
                .await?
                .parse()
                .unwrap_or(0);
            server.query(KINE_DB, &bump_sql(bump)).await?;
            let revision: i64 =
                server.query(KINE_DB, &format!("SELECT max(id) FROM {KINE_TABLE}")).await?.parse().unwrap_or(0);
            tracing::info!(
                event = "restore_revision_bumped",
                newest,
                revision,
                "Kine's revision moved past the old ones"
            );
            Some(Bumped { newest, revision })
        } else {
            None
        };
        server.query("postgres", "CHECKPOINT").await?;
        // After the checkpoint: a promotion's own checkpoint may still be pending before it.
        let timeline: u32 =
            server.query("postgres", "SELECT timeline_id FROM pg_control_checkpoint()").await?.parse().unwrap_or(0);
        Ok::<_, BackupError>(Recovered {
            last_transaction: (!last.is_empty()).then_some(last),
            kine,
            timeline,
            checked,
        })
    }
    .await;
    match result {
        Ok(r) => {
            server.stop().await?;
            Ok(r)
        }
        Err(e) => {
            // kill_on_drop ends it; the staging directory is removed by the caller.
            let socket_dir = server.socket_dir.clone();
            drop(server);
            if let Err(cleanup) = std::fs::remove_dir_all(&socket_dir) {
                tracing::debug!(error = %cleanup, "removing the restore socket directory");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jump_is_one_transaction_that_marks_the_old_revisions_compacted() {
        let sql = bump_sql(1000);
        assert!(sql.starts_with("DO $$") && sql.ends_with("END $$"));
        assert!(sql.contains("max(id), 0) + 1000"));
        assert!(sql.contains("SET prev_revision = r WHERE name = 'compact_rev_key'"));
        assert!(
            sql.contains("'gap-' || r, 0, 1"),
            "the record at the new revision is deleted, as Kine's gap records are"
        );
    }
}
