//! The host subsystems the role machine's actions act on, as small traits:
//! the datastore ([`Database`]), the virtual IP ([`VipControl`]) and the
//! local services ([`ServiceControl`]). Each is optional: a node where one is
//! not wired runs without it and `status` says so.

use std::future::Future;
use std::pin::Pin;

use crate::election::{Component, WalPosition};
use crate::peer::ReplicationView;

/// A boxed future returning `anyhow::Result<T>`, so the traits stay usable
/// as `Arc<dyn ...>`.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// The local PostgreSQL as the role machine needs it.
pub trait Database: Send + Sync {
    /// Timeline and LSN, when the server answers.
    fn position(&self) -> BoxFut<'_, Option<WalPosition>>;
    /// `SELECT 1` works.
    fn healthy(&self) -> BoxFut<'_, bool>;
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
}

/// The virtual IP.
pub trait VipControl: Send + Sync {
    fn take(&self) -> BoxFut<'_, ()>;
    fn release(&self) -> BoxFut<'_, ()>;
    fn held(&self) -> BoxFut<'_, bool>;
}

/// Local services the agent restarts when they fail.
pub trait ServiceControl: Send + Sync {
    fn restart(&self, component: Component) -> BoxFut<'_, ()>;
    /// Whether the component's service is running, `None` when not managed.
    fn running(&self, component: Component) -> BoxFut<'_, Option<bool>>;
}
