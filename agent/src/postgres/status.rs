//! What the server reports: role, timeline, LSN, replication lag, whether a
//! standby streams. Serialisable for `status` and metrics.

use serde::Serialize;

use super::Result;
use super::render::SUBSCRIPTION;
use super::server::Manager;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PgRole {
    /// Read-write (also a logical-mode follower, which is not in recovery).
    Primary,
    /// In recovery: a streaming standby.
    Standby,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PgStatus {
    pub role: PgRole,
    /// The timeline the server writes (primary) or receives/replays (standby).
    pub timeline: i64,
    /// Current WAL position (primary) or last replayed position (standby), as PostgreSQL prints it.
    pub lsn: String,
    /// The same position in bytes since 0/0, for comparisons and metrics.
    pub lsn_bytes: i64,
    pub synchronous_standby_names: String,
    /// Servers streaming from this one (`pg_stat_replication`).
    pub replicas: Vec<ReplicaStatus>,
    /// This standby's WAL receiver (`pg_stat_wal_receiver`), when it runs.
    pub receiver: Option<ReceiverStatus>,
    /// The logical-mode subscription, when there is one.
    pub subscription: Option<SubscriptionStatus>,
    /// The settings a hot standby needs at least as large as its primary's
    /// ([`HOT_STANDBY_SETTINGS`]), as the server applies them.
    pub settings: std::collections::BTreeMap<String, i64>,
}

/// Settings a standby must have at least as large as its primary's, or it
/// stops replaying (and an old primary with larger ones cannot follow).
pub const HOT_STANDBY_SETTINGS: [&str; 5] = [
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
];

impl PgStatus {
    /// Whether this standby is streaming from its primary.
    pub fn streaming(&self) -> bool {
        self.receiver.as_ref().is_some_and(|r| r.status == "streaming")
            || self.subscription.as_ref().is_some_and(|s| s.enabled && s.worker_running)
    }

    /// The replica with this application name (node name).
    pub fn replica(&self, name: &str) -> Option<&ReplicaStatus> {
        self.replicas.iter().find(|r| r.application_name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    pub application_name: String,
    pub client_addr: Option<String>,
    /// `startup`, `catchup`, `streaming`...
    pub state: Option<String>,
    /// `async`, `sync`, `potential`, `quorum`.
    pub sync_state: Option<String>,
    pub sent_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    /// How far the standby has flushed WAL to disk, in bytes since 0/0.
    pub flush_lsn_bytes: Option<i64>,
    /// WAL bytes written here but not yet replayed there.
    pub lag_bytes: Option<i64>,
    pub write_lag_seconds: Option<f64>,
    pub flush_lag_seconds: Option<f64>,
    pub replay_lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiverStatus {
    /// `streaming`, `starting`, `waiting`, `restarting`, `stopping`.
    pub status: String,
    pub received_timeline: Option<i64>,
    pub flushed_lsn: Option<String>,
    pub sender_host: Option<String>,
    pub sender_port: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriptionStatus {
    pub name: String,
    pub enabled: bool,
    /// Whether the apply worker runs (connected to the publisher).
    pub worker_running: bool,
    pub received_lsn: Option<String>,
}

/// Where a stopped server's data ends, from its control file
/// (`pg_controldata`): the later of the latest checkpoint and the minimum
/// recovery point, with its timeline. A crashed primary may hold WAL past
/// its last checkpoint, so this is a lower bound; it is fresh, unlike the
/// position recorded in hostMeta at the last role change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlPosition {
    pub timeline: u32,
    pub lsn_bytes: u64,
    /// A primary shut down cleanly (`Database cluster state: shut down`):
    /// its WAL ends with the shutdown checkpoint, which starts at `lsn_bytes`.
    pub clean_shutdown: bool,
}

/// Parse `pg_controldata` output (`LC_ALL=C`).
pub fn parse_controldata(text: &str) -> Option<ControlPosition> {
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')).map(str::trim))
    };
    let lsn = |name: &str| field(name).and_then(|v| v.parse::<crate::hostmeta::Lsn>().ok()).map(|l| l.0);
    let tli = |name: &str| field(name).and_then(|v| v.parse::<u32>().ok());
    let checkpoint = lsn("Latest checkpoint location")?;
    let checkpoint_tli = tli("Latest checkpoint's TimeLineID")?;
    let min_recovery = lsn("Minimum recovery ending location").unwrap_or(0);
    let min_recovery_tli = tli("Min recovery ending loc's timeline").unwrap_or(0);
    Some(if min_recovery > checkpoint && min_recovery_tli >= checkpoint_tli {
        ControlPosition { timeline: min_recovery_tli, lsn_bytes: min_recovery, clean_shutdown: false }
    } else {
        let clean_shutdown = field("Database cluster state") == Some("shut down");
        ControlPosition { timeline: checkpoint_tli, lsn_bytes: checkpoint, clean_shutdown }
    })
}

impl Manager {
    /// The position recorded in the control file of the data directory
    /// (the server may be stopped); `None` when there is no cluster.
    pub async fn control_position(&self) -> Result<Option<ControlPosition>> {
        if !super::files::has_cluster(&self.settings.data_dir) {
            return Ok(None);
        }
        let out = self
            .tool("pg_controldata")
            .arg(&self.settings.data_dir)
            .env("LC_ALL", "C")
            .timeout(self.settings.tool_timeout)
            .run()
            .await
            .map_err(|source| super::PgError::Tool {
                action: format!("pg_controldata {}", self.settings.data_dir.display()),
                source,
            })?;
        Ok(parse_controldata(&out.stdout))
    }

    /// The server's status; it must be running.
    pub async fn status(&self) -> Result<PgStatus> {
        let db = self.connect("postgres").await?;
        let row = db
            .query_one(
                "reading role and position",
                "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names')",
                &[],
            )
            .await?;
        let in_recovery: bool = row.get(0);
        let synchronous_standby_names: String = row.get(1);

        let receiver = db
            .query_opt(
                "reading pg_stat_wal_receiver",
                "SELECT status, received_tli::int8, flushed_lsn::text, sender_host, sender_port FROM pg_stat_wal_receiver",
                &[],
            )
            .await?
            .map(|r| ReceiverStatus {
                status: r.get(0),
                received_timeline: r.get(1),
                flushed_lsn: r.get(2),
                sender_host: r.get(3),
                sender_port: r.get(4),
            });

        let (timeline, lsn, lsn_bytes) = if in_recovery {
            let r = db
                .query_one(
                    "reading the replay position",
                    "SELECT (pg_control_checkpoint()).timeline_id::int8, \
                            COALESCE(pg_last_wal_replay_lsn(), '0/0')::text, \
                            pg_wal_lsn_diff(COALESCE(pg_last_wal_replay_lsn(), '0/0'), '0/0')::int8",
                    &[],
                )
                .await?;
            let checkpoint_tli: i64 = r.get(0);
            let tli = receiver.as_ref().and_then(|x| x.received_timeline).unwrap_or(checkpoint_tli).max(checkpoint_tli);
            (tli, r.get(1), r.get(2))
        } else {
            let r = db
                .query_one(
                    "reading the WAL position",
                    "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8, \
                            pg_current_wal_lsn()::text, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
                    &[],
                )
                .await?;
            (r.get(0), r.get(1), r.get(2))
        };

        let replicas = db
            .query(
                "reading pg_stat_replication",
                "SELECT application_name, client_addr::text, state, sync_state, sent_lsn::text, replay_lsn::text, \
                        CASE WHEN pg_is_in_recovery() THEN NULL \
                             ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::int8 END, \
                        EXTRACT(epoch FROM write_lag)::float8, EXTRACT(epoch FROM flush_lag)::float8, \
                        EXTRACT(epoch FROM replay_lag)::float8, pg_wal_lsn_diff(flush_lsn, '0/0')::int8 \
                 FROM pg_stat_replication ORDER BY application_name",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| ReplicaStatus {
                application_name: r.get(0),
                client_addr: r.get(1),
                state: r.get(2),
                sync_state: r.get(3),
                sent_lsn: r.get(4),
                replay_lsn: r.get(5),
                lag_bytes: r.get(6),
                write_lag_seconds: r.get(7),
                flush_lag_seconds: r.get(8),
                replay_lag_seconds: r.get(9),
                flush_lsn_bytes: r.get(10),
            })
            .collect();

        let subscription = db
            .query_opt(
                "reading the subscription",
                "SELECT s.subname::text, s.subenabled, \
                        EXISTS (SELECT 1 FROM pg_stat_subscription st WHERE st.subid = s.oid AND st.relid IS NULL \
                                AND st.pid IS NOT NULL), \
                        (SELECT st.received_lsn::text FROM pg_stat_subscription st \
                         WHERE st.subid = s.oid AND st.relid IS NULL LIMIT 1) \
                 FROM pg_subscription s WHERE s.subname = $1",
                &[&SUBSCRIPTION],
            )
            .await?
            .map(|r| SubscriptionStatus {
                name: r.get(0),
                enabled: r.get(1),
                worker_running: r.get(2),
                received_lsn: r.get(3),
            });

        let names: Vec<String> = HOT_STANDBY_SETTINGS.iter().map(|s| s.to_string()).collect();
        let settings = db
            .query(
                "reading the hot standby settings",
                "SELECT name, setting::int8 FROM pg_settings WHERE name = ANY($1)",
                &[&names],
            )
            .await?
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();

        Ok(PgStatus {
            settings,
            role: if in_recovery { PgRole::Standby } else { PgRole::Primary },
            timeline,
            lsn,
            lsn_bytes,
            synchronous_standby_names,
            replicas,
            receiver,
            subscription,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = "pg_control version number:            1300
Database cluster state:               shut down
Latest checkpoint location:           0/3000060
Latest checkpoint's REDO location:    0/3000028
Latest checkpoint's TimeLineID:       2
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
";

    #[test]
    fn controldata_position_is_the_checkpoint_or_the_later_recovery_point() {
        assert_eq!(
            parse_controldata(PRIMARY),
            Some(ControlPosition { timeline: 2, lsn_bytes: 0x3000060, clean_shutdown: true })
        );
        let crashed = PRIMARY.replace("shut down", "in production");
        assert_eq!(
            parse_controldata(&crashed),
            Some(ControlPosition { timeline: 2, lsn_bytes: 0x3000060, clean_shutdown: false })
        );
        let standby = PRIMARY
            .replace("0/0\n", "0/5000100\n")
            .replace("timeline:   0", "timeline:   2")
            .replace("shut down", "shut down in recovery");
        assert_eq!(
            parse_controldata(&standby),
            Some(ControlPosition { timeline: 2, lsn_bytes: 0x5000100, clean_shutdown: false })
        );
        let standby_at_checkpoint = PRIMARY.replace("shut down", "shut down in recovery");
        assert!(!parse_controldata(&standby_at_checkpoint).unwrap().clean_shutdown);
        assert_eq!(parse_controldata("garbage"), None);
    }
}
