//! The host subsystems the role machine's actions act on. The VIP
//! ([`crate::netlink::Vip`]) and the services ([`crate::services::Services`])
//! have their own traits; the datastore's is here. Each is optional: a node
//! where one is not wired runs without it and `status` says so.

use std::future::Future;
use std::pin::Pin;

use crate::election::WalPosition;
use crate::peer::ReplicationView;

/// A boxed future returning `anyhow::Result<T>`, so the trait stays usable
/// as `Arc<dyn Database>`.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// The local PostgreSQL as the role machine needs it.
pub trait Database: Send + Sync {
    /// Timeline and LSN, when the server answers.
    fn position(&self) -> BoxFut<'_, Option<WalPosition>>;
    /// `SELECT 1` works; `None` while the server is not meant to run (not
    /// set up yet, demoted, fenced), so it is not restarted behind the
    /// role machine's back.
    fn healthy(&self) -> BoxFut<'_, Option<bool>>;
    /// Start the server again after it failed.
    fn restart(&self) -> BoxFut<'_, ()>;
    /// Become (or stay) the primary, recording `epoch`.
    fn promote(&self, epoch: u64) -> BoxFut<'_, ()>;
    /// Stop acting as primary.
    fn demote(&self) -> BoxFut<'_, ()>;
    /// Become a standby of the node called `leader`.
    fn rejoin(&self, leader: &str) -> BoxFut<'_, ()>;
    /// Stop accepting writes.
    fn fence(&self) -> BoxFut<'_, ()>;
    /// Accept writes again.
    fn unfence(&self) -> BoxFut<'_, ()>;
    /// Replication state for `status`.
    fn replication(&self) -> BoxFut<'_, Option<ReplicationView>>;
    /// Periodic upkeep once per heartbeat interval (the primary's durability mode).
    fn tick(&self, leading: bool) -> BoxFut<'_, ()>;
}
