//! `backup --type incremental`. PostgreSQL 15 has no incremental base
//! backup (PostgreSQL 17's `pg_basebackup --incremental` is one), so here an
//! incremental backup is the WAL since the last full backup: the command
//! closes the leader's current WAL file (`pg_switch_wal()`) and waits until
//! the destination's archive holds it, continuous from the newest full
//! backup. From then on every time up to the switch can be restored with
//! `restore --target-time`. The archive itself is the agent's continuous
//! WAL archiving (`backup.archive_wal`); this command stores nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::create::Source;
use super::store::Store;
use super::stream::{Phase, Progress};
use super::{BackupError, Result, verify, wal};

/// How often the archive is listed while waiting.
const POLL: Duration = Duration::from_secs(2);

/// What an incremental backup made restorable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Incremental {
    /// The newest full backup: the start of the restorable range.
    pub base: String,
    /// Its first WAL segment.
    pub from_segment: String,
    /// The segment the switch closed: archived, with every one before it.
    pub through_segment: String,
    /// Where the switch ended the WAL.
    pub switch_lsn: String,
    /// The server's time just before the switch (RFC 3339 UTC): every
    /// transaction committed by then is in the archive.
    pub restorable_to: String,
    /// Archived WAL files from the base's first segment to the last one.
    pub wal_files: usize,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Close the current WAL file on `source` (the leader) and wait up to
/// `timeout` for `store`'s archive to hold it, continuous from the newest
/// full backup.
pub async fn take(
    source: &Source,
    store: Arc<dyn Store>,
    timeout: Duration,
    progress: &dyn Progress,
) -> Result<Incremental> {
    let started = Instant::now();
    let what = "an incremental backup (the WAL since the last full backup)".to_string();
    let base = match verify::latest(store.as_ref()) {
        Ok(m) => m,
        Err(BackupError::NoBackups { destination }) => {
            return Err(BackupError::Refused {
                what,
                detail: format!("no full backup in {destination} to start from; take one first (--type full)"),
            });
        }
        Err(e) => return Err(e),
    };
    let p = &base.postgres;
    let from_segment = wal::segment_of(p.timeline, &p.start_lsn).ok_or_else(|| BackupError::BadManifest {
        id: base.id.clone(),
        destination: store.url(),
        detail: format!("start LSN {:?} is not an LSN", p.start_lsn),
    })?;

    let (client, driver) = source.connect().await?;
    let query = |q: &'static str| {
        let client = &client;
        async move {
            client.query_one(q, &[]).await.map_err(|e| BackupError::Postgres {
                what: format!("{q} on {}", source.describe()),
                detail: e.to_string(),
            })
        }
    };
    let in_recovery: bool = query("SELECT pg_is_in_recovery()").await?.get(0);
    if in_recovery {
        driver.abort();
        return Err(BackupError::Refused {
            what,
            detail: format!(
                "{} is a standby; WAL is closed on the leader: run this on the node holding the VIP",
                source.describe()
            ),
        });
    }
    let restorable_to: String =
        query("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
            .await?
            .get(0);
    let row = query("SELECT pg_walfile_name(l), l::text FROM pg_switch_wal() AS l").await?;
    let (through_segment, switch_lsn): (String, String) = (row.get(0), row.get(1));
    driver.abort();
    tracing::info!(event = "wal_switched", segment = %through_segment, lsn = %switch_lsn, "closed the current WAL file");

    let waiting = progress.phase(Phase::WaitingForArchive, None);
    let deadline = Instant::now() + timeout;
    let mut last_seen = None;
    loop {
        let names: Vec<String> = store.list_wal()?.into_iter().map(|e| e.name).collect();
        let archived = |segment: &str| names.iter().any(|n| wal::strip_stored_suffixes(n) == segment);
        if archived(&through_segment) {
            let missing = wal::missing_segments(&names, &from_segment);
            if !missing.is_empty() {
                return Err(BackupError::Refused {
                    what,
                    detail: format!(
                        "WAL is missing from {} after backup {}: {}; point-in-time recovery cannot cross it. \
                         Take a full backup (--type full)",
                        store.url(),
                        base.id,
                        missing.join(", ")
                    ),
                });
            }
            drop(waiting);
            let wal_files = names
                .iter()
                .map(|n| wal::strip_stored_suffixes(n))
                .filter(|n| n.len() == 24 && !wal::older_than(n, &from_segment) && *n <= through_segment.as_str())
                .count();
            return Ok(Incremental {
                base: base.id,
                from_segment,
                through_segment,
                switch_lsn,
                restorable_to,
                wal_files,
                elapsed: started.elapsed(),
            });
        }
        last_seen = names
            .iter()
            .map(|n| wal::strip_stored_suffixes(n))
            .filter(|n| n.len() == 24)
            .max()
            .map(String::from)
            .or(last_seen);
        if Instant::now() >= deadline {
            return Err(BackupError::Refused {
                what,
                detail: format!(
                    "WAL file {through_segment} did not reach {} within {}; the newest archived there is {}. Is WAL \
                     archived to it? (backup.archive_wal and backup.destination in the cloud-config; the `WAL archive` \
                     line of `gemin_k8s status` says how archiving goes)",
                    store.url(),
                    humantime::format_duration(timeout),
                    last_seen.as_deref().unwrap_or("none"),
                ),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
