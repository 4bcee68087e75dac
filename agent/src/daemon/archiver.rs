//! The agent's half of continuous WAL archiving (see `backup::wal`):
//! PostgreSQL's `archive_command` spools each finished WAL file; every
//! few seconds this task stores what is spooled in the destination and
//! publishes what is left (`status`, `/metrics`).
//!
//! Which node uploads: the follower while it streams, so the leader's
//! uplink and shutdown never wait for the archive; the leader when it is
//! alone, or when its own spool holds a file longer than
//! [`TAKE_OVER_AFTER`] (one the follower lacks, or it is not keeping up). A node that does
//! not upload only removes from its spool what the destination holds.
//! Both nodes uploading the same file at once is harmless: the content is
//! the same.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use super::scheduler::Taker;
use crate::backup::crypto::Keys;
use crate::backup::manifest::Compression;
use crate::backup::wal::{self, Role};
use crate::backup::{Store, s3::S3Options};
use crate::config::GeminiConfig;
use crate::peer::{ArchiveView, Shared};

/// How often the spool is looked at.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// The leader uploads itself when a file waited this long in its spool:
/// the follower uploads within seconds what it has, so an older file is one
/// it lacks (written before it joined) or it is not keeping up.
pub const TAKE_OVER_AFTER: Duration = Duration::from_secs(30);

pub struct Archiver {
    spool: PathBuf,
    destination: String,
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    compression: Compression,
}

impl Archiver {
    /// The archiver `cfg` asks for (`None` when archiving is off).
    pub fn from_config(cfg: &GeminiConfig) -> anyhow::Result<Option<Archiver>> {
        let b = &cfg.backup;
        let Some(destination) = b.destination.clone().filter(|_| b.archiving()) else { return Ok(None) };
        let s3 = S3Options {
            endpoint: b.s3_endpoint.clone(),
            region: b.s3_region.clone(),
            credentials: b.s3_credentials.clone(),
        };
        let store: Arc<dyn Store> = Arc::from(crate::backup::store::open(&destination, &s3)?);
        let keys = Keys::parse(&b.encryption_keys)?;
        if matches!(keys, Keys::None) && !b.no_encryption {
            anyhow::bail!("backup.encryption_keys is empty and backup.no_encryption is not set");
        }
        Ok(Some(Archiver {
            spool: b.spool_dir.clone(),
            destination: store.url(),
            store,
            keys: Arc::new(keys),
            compression: Compression::Zstd { level: 3 },
        }))
    }

    /// Upload, publish, repeat.
    pub async fn run(self, shared: Shared) {
        let this = Arc::new(self);
        let mut view = ArchiveView { destination: this.destination.clone(), ..ArchiveView::default() };
        let mut failing = false;
        loop {
            let (role_name, streaming) = {
                let p = shared.read().unwrap_or_else(|p| p.into_inner());
                (p.status.role.to_lowercase(), p.status.replication.as_ref().is_some_and(|r| r.streaming))
            };
            let oldest = wal::spooled(&this.spool).ok().and_then(|files| files.iter().map(|(_, _, t)| *t).min());
            let waited = oldest.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_default();
            let role = choose(&role_name, streaming, waited);
            let a = this.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let done = wal::upload(&a.spool, a.store.as_ref(), &a.keys, a.compression, role)?;
                if done.gap.is_some() {
                    a.close_gap_after_a_backup()?;
                }
                Ok::<_, crate::backup::BackupError>(done)
            })
            .await;
            let now = crate::backup::now_rfc3339();
            view.uploading = role == Role::Archive;
            match pass {
                Ok(Ok(done)) => {
                    if failing {
                        tracing::info!(event = "wal_archive_resumed", destination = %view.destination, "WAL archiving works again");
                        failing = false;
                    }
                    if let Some(last) = done.files.last() {
                        view.last_archived = Some(last.clone());
                        view.last_archived_at = Some(now.clone());
                        view.archived_files += done.files.len() as u64;
                    }
                    if done.gap.is_some() && view.gap.is_none() {
                        tracing::error!(event = "wal_archive_gap", gap = ?done.gap, "the WAL spool was full: point-in-time recovery has a gap until the next full backup");
                    }
                    view.gap = done.gap;
                    view.pending_files = done.pending as u64;
                    view.oldest_pending = done.oldest_pending;
                    view.last_error = None;
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!(event = "wal_archive_failing", destination = %view.destination, error = %e, "WAL archiving fails; the files stay spooled");
                        failing = true;
                    }
                    view.last_error = Some(format!("{now}: {e}"));
                    if let Ok(files) = wal::spooled(&this.spool) {
                        view.pending_files = files.len() as u64;
                    }
                    view.gap = wal::read_gap(&this.spool).ok().flatten();
                }
                Err(e) => view.last_error = Some(format!("{now}: the archiving task: {e}")),
            }
            view.oldest_pending_seconds = wal::spooled(&this.spool)
                .ok()
                .and_then(|files| files.iter().map(|(_, _, t)| *t).min())
                .map(|t| SystemTime::now().duration_since(t).unwrap_or_default().as_secs());
            {
                // The schedule's part of the view is the scheduler's.
                let mut p = shared.write().unwrap_or_else(|p| p.into_inner());
                let schedule = p.archive.take().and_then(|a| a.schedule);
                p.archive = Some(ArchiveView { schedule, ..view.clone() });
            }
            tokio::time::sleep(INTERVAL).await;
        }
    }

    /// A full backup that started after the gap began closes it: recovery
    /// to any later time starts from that backup.
    fn close_gap_after_a_backup(&self) -> crate::backup::Result<()> {
        let Some(gap) = wal::read_gap(&self.spool)? else { return Ok(()) };
        let Ok(since) = humantime::parse_rfc3339_weak(&gap.since) else { return Ok(()) };
        let newest = crate::backup::verify::latest(self.store.as_ref()).ok();
        if let Some(m) = newest
            && m.start().is_some_and(|start| start > since)
        {
            wal::clear_gap(&self.spool)?;
            tracing::info!(event = "wal_archive_gap_closed", backup = %m.id, "a full backup after the gap closed it");
        }
        Ok(())
    }
}

/// Start archiving and the backup schedule as `cfg` asks (`socket_dir`:
/// where this node's PostgreSQL listens), and give the API what takes a
/// backup on request (`backups`). A destination that cannot be set up
/// (credentials missing, say) does not stop the agent: it is logged and
/// shown in `status`, and the WAL stays spooled until it is fixed.
pub fn start(cfg: &GeminiConfig, shared: &Shared, socket_dir: PathBuf, backups: &OnceLock<Arc<Taker>>) {
    let result = (|| {
        let Some(archiver) = Archiver::from_config(cfg)? else { return Ok(()) };
        let taker = Arc::new(Taker::new(cfg, archiver.store.clone(), archiver.keys.clone(), &socket_dir)?);
        let _ = backups.set(taker.clone()); // Set once, at start.
        if let Some(scheduler) = super::scheduler::Scheduler::from_config(cfg, taker)? {
            tokio::spawn(scheduler.run(shared.clone()));
        }
        tokio::spawn(archiver.run(shared.clone()));
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(e) = result {
        let error = format!("{e:#}");
        tracing::error!(event = "wal_archive_unusable", error = %error, "WAL archiving cannot start; the WAL stays spooled");
        shared.write().unwrap_or_else(|p| p.into_inner()).archive = Some(ArchiveView {
            destination: cfg.backup.destination.clone().unwrap_or_default(),
            last_error: Some(format!("{}: {error}", crate::backup::now_rfc3339())),
            ..ArchiveView::default()
        });
    }
}

/// Whether this node uploads, from its role as published, whether
/// replication streams (on the leader: the follower streams from it; on a
/// follower: it streams from the leader), and how long the oldest spooled
/// file has waited.
fn choose(role: &str, streaming: bool, waited: Duration) -> Role {
    match role {
        "follower" if streaming => Role::Archive,
        "leader" if !streaming || waited >= TAKE_OVER_AFTER => Role::Archive,
        _ => Role::Tidy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_follower_uploads_and_the_leader_when_alone_or_left_waiting() {
        let short = Duration::from_secs(10);
        assert_eq!(choose("follower", true, short), Role::Archive);
        assert_eq!(choose("leader", true, short), Role::Tidy, "its follower uploads");
        assert_eq!(choose("leader", false, short), Role::Archive, "alone");
        assert_eq!(choose("leader", true, TAKE_OVER_AFTER), Role::Archive, "the follower is not keeping up");
        assert_eq!(choose("follower", false, short), Role::Tidy, "not streaming: the leader uploads");
        assert_eq!(choose("fenced", false, TAKE_OVER_AFTER), Role::Tidy, "a fenced node never writes the archive");
        assert_eq!(choose("unknown", true, short), Role::Tidy);
    }
}
