//! The host subsystems the role machine's actions act on. The VIP
//! ([`crate::netlink::Vip`]) and the services ([`crate::services::Services`])
//! have their own traits; the datastore's is here. Each is optional: a node
//! where one is not wired runs without it and `status` says so.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::election::{Replication, WalPosition};
use crate::peer::ReplicationView;

/// A boxed future returning `anyhow::Result<T>`, so the trait stays usable
/// as `Arc<dyn Database>`.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// A promotion's proof failed: the standby did not replay past the old
/// primary's shutdown checkpoint in time. Nothing was promoted.
#[derive(Debug, thiserror::Error)]
#[error(
    "the standby did not replay past the old primary's shutdown checkpoint ({timeline}/{checkpoint}) within {waited:?}; \
     last seen: {last}"
)]
pub struct CatchUpFailed {
    pub timeline: u32,
    pub checkpoint: crate::hostmeta::Lsn,
    pub waited: Duration,
    pub last: String,
}

/// One look at the local PostgreSQL.
#[derive(Debug, Clone, Default)]
pub struct DbReport {
    /// The server answers queries; `None` while it is not meant to run (not
    /// set up yet, demoted, fenced), so it is not restarted behind the role
    /// machine's back.
    pub healthy: Option<bool>,
    /// Timeline and LSN: from the server when it runs, else from the data
    /// directory's control file.
    pub position: Option<WalPosition>,
    /// On a primary, its replication as PostgreSQL reports it.
    pub replication: Option<Replication>,
    /// Replication for `status`.
    pub view: Option<ReplicationView>,
    /// Why it is not healthy, for the log.
    pub problem: Option<String>,
}

/// The local PostgreSQL as the role machine needs it.
pub trait Database: Send + Sync {
    /// Whether the data directory holds a cluster (or archives of one): a
    /// node with data but no hostMeta must not start a new cluster.
    fn has_data(&self) -> bool;
    /// Health, position and replication, read in one session.
    fn observe(&self) -> BoxFut<'_, DbReport>;
    /// Start the server again after it failed.
    fn restart(&self) -> BoxFut<'_, ()>;
    /// Become (or stay) the primary, recording `epoch`. Only `bootstrap`
    /// (the cluster's first formation) may create an empty datastore; a
    /// standby is not promoted after `not_after`, nor before it has
    /// replayed past `catch_up` (a hand-over's shutdown checkpoint): when
    /// it does not get there in time the error is [`CatchUpFailed`] and the
    /// standby is left as it was.
    fn promote(
        &self,
        epoch: u64,
        bootstrap: bool,
        not_after: Option<Instant>,
        catch_up: Option<WalPosition>,
    ) -> BoxFut<'_, ()>;
    /// Stop acting as primary.
    fn demote(&self) -> BoxFut<'_, ()>;
    /// Stop acting as primary for a planned hand-over: writes are refused
    /// from the start, then a clean shutdown within `budget` (made
    /// immediate after it). Returns where the shutdown checkpoint starts,
    /// `None` when the shutdown was not clean.
    fn hand_over(&self, budget: Duration) -> BoxFut<'_, Option<WalPosition>>;
    /// Become a standby of the node called `leader`.
    fn rejoin(&self, leader: &str) -> BoxFut<'_, ()>;
    /// Stop accepting writes at once. Never waits for another datastore
    /// operation: the fence timer calls it whatever the agent loop is doing.
    fn fence(&self) -> BoxFut<'_, ()>;
    /// Accept writes again.
    fn unfence(&self) -> BoxFut<'_, ()>;
    /// One write through `host` (the VIP); how long its commit took.
    fn probe_write(&self, host: std::net::IpAddr) -> BoxFut<'_, Duration>;
    /// Make commits wait for the peer, or not.
    fn set_durability(&self, synchronous: bool) -> BoxFut<'_, ()>;
    /// The peer moved to `ip` (`replace-node`): replication is let in from
    /// there (the files rewritten and re-read, the server not restarted),
    /// and a follower copies from there.
    fn set_peer(&self, ip: std::net::IpAddr) -> BoxFut<'_, ()>;
    /// On the primary: drop the replaced peer's replication slot (refused
    /// while it streams). The WAL bytes it held, `None` without a slot.
    fn drop_peer_slot(&self) -> BoxFut<'_, Option<u64>>;
    /// Stop the server cleanly (a release: the node leaves the cluster).
    fn stop(&self) -> BoxFut<'_, ()>;
}
