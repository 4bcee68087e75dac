//! The agent API: what agents tell each other (heartbeats, hostMeta) and
//! what operators ask (status, metrics), over mutual TLS; the same status
//! on a local Unix socket for `gemin_k8s status` on the node.
//!
//! - [`tls`]: certificates from `gemin_k8s init` into rustls configurations;
//! - [`identity`]: who a client certificate names (a node, the operator, the witness);
//! - [`server`]: the axum routes and the TLS / Unix socket listeners;
//! - [`client`]: calls to a peer or a node;
//! - [`metrics`]: the Prometheus text rendering.

pub mod client;
pub mod identity;
pub mod metrics;
pub mod server;
pub mod tls;

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::election::PeerStatus;
use crate::hostmeta::HostMeta;

/// `POST /v1/peer` (operator): the peer is now a new machine under the same
/// name at `ip` (`gemin_k8s replace-node`); `crl` revokes the old
/// machine's certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerChange {
    pub name: String,
    pub ip: std::net::IpAddr,
    pub api_port: u16,
    /// PEM revocation list signed by the cluster CA.
    pub crl: String,
    /// Keep the old machine's replication slot (`--preserve-data`: the new
    /// machine has its disk and catches up from where it stopped).
    #[serde(default)]
    pub keep_slot: bool,
}

/// What the leader did for a [`PeerChange`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerChanged {
    /// False: it already had this peer and revocation list (nothing done).
    pub changed: bool,
    /// Bytes of WAL the dropped slot of the old machine held back; `None`
    /// when it had no slot.
    pub slot_held_bytes: Option<u64>,
    /// The old machine's Kubernetes objects that were deleted.
    pub kubernetes_removed: Vec<String>,
    /// The cloud-config file that keeps the change across restarts.
    pub persisted: String,
}

/// Answer to `POST /v1/backup`: the full backup a node took on request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupTaken {
    pub node: String,
    /// The backup's id (`backup list`, `restore --backup ID`).
    pub id: String,
    pub destination: String,
    pub seconds: f64,
}

/// Answer to `GET /v1/health`: the heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub cluster: String,
    pub node: String,
    pub role: String,
    pub state: String,
    pub epoch: u64,
    pub healthy: bool,
    pub components: Vec<ComponentHealth>,
    /// The role state machine's view, which the peer's machine consumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election: Option<PeerStatus>,
}

/// One local component (PostgreSQL, Kine, K3s, the VIP...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub name: String,
    /// `ok`, `failed`, `starting`, `absent` (not wired on this host) or `disabled`.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl ComponentHealth {
    pub fn is_ok(&self) -> bool {
        matches!(self.state.as_str(), "ok" | "disabled")
    }
}

/// Answer to `GET /v1/status`: everything `gemin_k8s status` shows for a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub cluster: String,
    pub node: String,
    pub address: String,
    pub agent_version: String,
    pub role: String,
    pub state: String,
    pub epoch: u64,
    pub peer: PeerView,
    pub witness: WitnessView,
    pub vip: VipView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationView>,
    /// Who may take over without the peer: on the leader, the follower it
    /// tells it is the synchronous standby; on a follower, whether it was told
    /// (recently enough) that it is.
    #[serde(default)]
    pub takeover: TakeoverView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverView>,
    pub components: Vec<ComponentHealth>,
    /// Why the node or cluster is degraded; empty when all is well.
    pub degraded: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<DatastoreView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandOverView>,
    /// Wall-clock time the answer was served, in milliseconds since the
    /// Unix epoch (0 when unknown): operators compare the nodes' clocks.
    #[serde(default)]
    pub served_at_unix_ms: u64,
    /// Continuous WAL archiving on this node, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveView>,
    /// The root slots and upgrade state, on a node booted from a geminik8s disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::upgrade::BootState>,
}

/// Continuous WAL archiving as this node's agent last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchiveView {
    pub destination: String,
    /// Whether this node uploads (the streaming follower, or the leader alone).
    pub uploading: bool,
    /// WAL files waiting in this node's spool.
    pub pending_files: u64,
    /// When the oldest of them was finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending: Option<String>,
    /// Its age in seconds: how far point-in-time recovery lags behind now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_seconds: Option<u64>,
    /// WAL files this agent stored since it started.
    pub archived_files: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_at: Option<String>,
    /// The last failure to reach the destination (cleared by a success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// WAL the spool could not keep: point-in-time recovery has a gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<crate::backup::wal::Gap>,
    /// Scheduled full backups (`backup.schedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleView>,
}

/// Scheduled full backups as this node's agent last saw them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    /// The next time of the schedule (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// The last backup this node took, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
    /// Why the last scheduled backup this node tried failed (cleared by a success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// An uploading node whose oldest spooled WAL is older than this is reported degraded.
pub const ARCHIVE_LAG_WARNING_SECS: u64 = 300;

impl ArchiveView {
    /// What `status` lists as degraded about archiving.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(gap) = &self.gap {
            out.push(format!(
                "point-in-time recovery gap since {}: {} WAL files from {} were not archived (the spool was full); take a full backup to close it",
                gap.since, gap.files, gap.first
            ));
        }
        if let Some(e) = &self.last_error {
            out.push(format!("WAL archiving to {} fails: {e}", self.destination));
        }
        if let Some(e) = self.schedule.as_ref().and_then(|s| s.last_error.as_ref()) {
            out.push(format!("the scheduled full backup failed: {e}"));
        }
        if let Some(age) = self.oldest_pending_seconds.filter(|a| self.uploading && *a > ARCHIVE_LAG_WARNING_SECS) {
            out.push(format!(
                "WAL archiving lags: the oldest unarchived WAL is {age} s old ({} files spooled)",
                self.pending_files
            ));
        }
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TakeoverView {
    /// Leader: the standby that holds every acknowledged write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_standby: Option<String>,
    /// Follower: it may promote on its own if the leader failed now.
    #[serde(default)]
    pub eligible: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub address: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Milliseconds since the last heartbeat answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WitnessView {
    pub mode: String,
    /// `n/a`, `reachable`, `unreachable`, `lease held`, `lease held by <node>`...
    pub state: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    pub address: String,
    pub held_here: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationView {
    /// Read from PostgreSQL, not believed: `synchronous` (commits wait for
    /// the peer and it has every acknowledged write), `synchronous, waiting
    /// for the standby` (commits wait; the peer is not in sync: writes
    /// stall), `degraded (async)` (configured synchronous, commits do not
    /// wait), `async`, or `standby` on a follower.
    pub durability: String,
    pub streaming: bool,
    /// Primary: `synchronous_standby_names` as the server applies it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous_standby_names: Option<String>,
    /// Primary: the peer's `sync_state` in `pg_stat_replication`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Primary: WAL written here that the peer has not flushed, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_lag_bytes: Option<u64>,
    /// The settings a standby needs at least as large as its primary's.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub settings: std::collections::BTreeMap<String, i64>,
}

/// The local datastore as the agent last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatastoreView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Primary: where it writes; standby: how far it replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Free and total bytes on the data directory's file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<u64>,
}

/// A planned switchover under way on this node (the leader handing over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandOverView {
    /// `stopping` (clean shutdown under way), `clean` (shut down; the peer
    /// promotes once it has replayed past `checkpoint`) or `withdrawn`
    /// (aborted: this node resumes once the peer is heard still following).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverView {
    /// RFC 3339 wall-clock time, for people.
    pub at: String,
    pub from: String,
    pub to: String,
    /// From the promotion decision to the datastore primary with the VIP
    /// here (the VIP is taken as the promotion starts).
    pub duration_ms: u64,
    /// Silence before the decision: from the last word from the peer (heartbeat,
    /// second path or its calls) to the decision to promote. `None` at bootstrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_ms: Option<u64>,
    /// Making the datastore primary.
    #[serde(default)]
    pub promote_ms: u64,
    /// Adding the VIP and sending the first announcements.
    #[serde(default)]
    pub vip_ms: u64,
}

/// `ComponentHealth::state` values.
pub const OK: &str = "ok";
pub const FAILED: &str = "failed";
pub const ABSENT: &str = "absent";
pub const DISABLED: &str = "disabled";

/// Counters behind `/metrics` that the status does not carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub failovers_total: u64,
    pub heartbeats_missed_total: u64,
}

/// What the agent publishes; the API serves it. The agent loop replaces it
/// each tick; handlers only read.
#[derive(Debug, Clone)]
pub struct Published {
    pub hostmeta: Option<HostMeta>,
    pub status: NodeStatus,
    pub counters: Counters,
    pub election: Option<PeerStatus>,
    /// Written by the WAL archiver (`daemon::archiver`), not by the heartbeat loop.
    pub archive: Option<ArchiveView>,
}

impl Published {
    pub fn health(&self) -> HealthReport {
        let s = &self.status;
        HealthReport {
            cluster: s.cluster.clone(),
            node: s.node.clone(),
            role: s.role.clone(),
            state: s.state.clone(),
            epoch: s.epoch,
            healthy: s.components.iter().all(ComponentHealth::is_ok),
            components: s.components.clone(),
            election: self.election.clone(),
        }
    }
}

pub type Shared = Arc<RwLock<Published>>;
