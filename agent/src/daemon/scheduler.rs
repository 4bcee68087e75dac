//! Scheduled full backups (`backup.schedule`, `backup.retention`), as K3s
//! takes etcd snapshots: at each time of the cron expression (UTC) a full
//! backup goes to `backup.destination`, then only the newest
//! `backup.retention` backups are kept (and the archived WAL that only the
//! removed ones could use goes too).
//!
//! Both agents run the schedule; the node that archives WAL takes the
//! backup (the streaming follower, or the leader alone: see
//! [`super::archiver`]), so each time gives one backup and the leader's
//! disk and uplink are spared while it has a follower.
//!
//! [`Taker`] takes one backup; the agent API's `POST /v1/backup` (`upgrade
//! --backup`) uses it too, whether or not a schedule is set.

use std::sync::Arc;
use std::time::Duration;

use crate::backup::crypto::Keys;
use crate::backup::manifest::Compression;
use crate::backup::{self, Store};
use crate::config::GeminiConfig;
use crate::peer::Shared;

/// The longest single sleep: the clock is looked at again at least this
/// often, so a clock set forward or back does not skip or double a backup.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Takes a full backup of this node's PostgreSQL to `backup.destination`
/// and publishes it in the status (`archive.schedule.last`).
pub struct Taker {
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    source: backup::create::Source,
    labels: backup::create::Labels,
    /// One backup at a time.
    busy: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Taker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taker").field("destination", &self.store.url()).finish_non_exhaustive()
    }
}

impl Taker {
    /// `socket_dir`: where this node's PostgreSQL listens.
    pub fn new(
        cfg: &GeminiConfig,
        store: Arc<dyn Store>,
        keys: Arc<Keys>,
        socket_dir: &std::path::Path,
    ) -> anyhow::Result<Taker> {
        let settings = crate::postgres::Settings::from_config(cfg);
        Ok(Taker {
            store,
            keys,
            source: backup::create::Source {
                bin_dir: settings.bin_dir.clone(),
                host: socket_dir.display().to_string(),
                port: settings.node.port,
                user: crate::postgres::render::SUPERUSER.into(),
            },
            labels: backup::create::Labels {
                cluster: cfg.cluster.name.clone(),
                node: cfg.node.name.clone(),
                node_config: Some(backup::node::render(cfg).map_err(|e| anyhow::anyhow!("the node bundle: {e}"))?),
            },
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// Where backups go (for messages).
    pub fn destination(&self) -> String {
        self.store.url()
    }

    /// Take one full backup now (waiting for one already running), and
    /// publish its id or the failure.
    pub async fn take(&self, shared: &Shared) -> anyhow::Result<backup::create::Created> {
        let _one = self.busy.lock().await;
        let at = backup::now_rfc3339();
        let created = backup::create::create(
            &self.source,
            self.store.clone(),
            &self.labels,
            Compression::Zstd { level: 3 },
            self.keys.clone(),
            Arc::new(()),
        )
        .await;
        match &created {
            Ok(c) => publish(shared, |v| {
                v.last = Some(c.manifest.id.clone());
                v.last_at = Some(at.clone());
                v.last_error = None;
            }),
            Err(e) => publish(shared, |v| v.last_error = Some(format!("{at}: {e}"))),
        }
        Ok(created?)
    }
}

pub struct Scheduler {
    cron: croner::Cron,
    retention: usize,
    taker: Arc<Taker>,
}

impl Scheduler {
    /// The scheduler `cfg` asks for (`None` with `schedule: off`).
    pub fn from_config(cfg: &GeminiConfig, taker: Arc<Taker>) -> anyhow::Result<Option<Scheduler>> {
        let b = &cfg.backup;
        let cron = match b.schedule() {
            None => return Ok(None),
            Some(Ok(cron)) => cron,
            Some(Err(e)) => anyhow::bail!("backup.schedule {:?}: {e}", b.schedule),
        };
        Ok(Some(Scheduler { cron, retention: b.retention.max(1) as usize, taker }))
    }

    /// Take a backup at each time of the schedule, on the node that archives.
    pub async fn run(self, shared: Shared) {
        loop {
            let now = chrono::Utc::now();
            let next = match self.cron.find_next_occurrence(&now, false) {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(event = "backup_schedule_failed", error = %e, "no next time in the backup schedule; scheduled backups stop");
                    return;
                }
            };
            publish(&shared, |v| v.next = Some(next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));
            // Sleep in steps, looking at the clock again each time.
            loop {
                let left = (next - chrono::Utc::now()).to_std().unwrap_or_default();
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(MAX_SLEEP)).await;
            }
            let uploads = {
                let p = shared.read().unwrap_or_else(|p| p.into_inner());
                p.archive.as_ref().is_some_and(|a| a.uploading)
            };
            if !uploads {
                tracing::info!(
                    event = "backup_skipped",
                    "scheduled backup: the other node takes it (this one does not archive now)"
                );
                continue;
            }
            self.take(&shared).await;
        }
    }

    async fn take(&self, shared: &Shared) {
        match self.taker.take(shared).await {
            Ok(_) => {
                let (store, keep) = (self.taker.store.clone(), self.retention);
                let pruned = tokio::task::spawn_blocking(move || {
                    backup::prune::prune(store.as_ref(), backup::prune::Retention::Count(keep), false)
                })
                .await;
                match pruned {
                    Ok(Ok(p)) if !p.removed.is_empty() => {
                        tracing::info!(event = "backups_pruned", removed = ?p.removed, wal_removed = p.wal_removed, keep, "kept the newest backups")
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "pruning after a scheduled backup failed"),
                    Err(e) => tracing::warn!(error = %e, "the pruning task failed"),
                }
            }
            Err(e) => tracing::error!(event = "scheduled_backup_failed", error = %e, "the scheduled backup failed"),
        }
    }
}

/// Change the published schedule view (made if not there yet).
fn publish(shared: &Shared, change: impl FnOnce(&mut crate::peer::ScheduleView)) {
    let mut p = shared.write().unwrap_or_else(|p| p.into_inner());
    let archive = p.archive.get_or_insert_with(Default::default);
    change(archive.schedule.get_or_insert_with(Default::default));
}
