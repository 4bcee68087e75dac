//! The [`Database`] the agent drives: the PostgreSQL [`Manager`], with the
//! role machine's verbs mapped onto its operations.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;

use super::subsystems::{BoxFut, Database};
use crate::config::Durability;
use crate::election::WalPosition;
use crate::hostmeta::Lsn;
use crate::peer::ReplicationView;
use crate::postgres::files::has_cluster;
use crate::postgres::{DurabilityController, DurabilityMode, Manager, PgRole, StopMode, Tail};

pub struct Postgres {
    mgr: Manager,
    /// One datastore operation at a time: a promotion, a rejoin and the
    /// per-tick upkeep must not interleave.
    op: tokio::sync::Mutex<()>,
    durability: tokio::sync::Mutex<DurabilityController>,
    /// Whether this standby was streaming when last looked at: a promotion
    /// after that may only trust the tail if it was (and commits waited for it).
    was_streaming: Mutex<bool>,
    /// Whether the server should be running: false until it is set up, and
    /// while demoted or fenced.
    expected: std::sync::atomic::AtomicBool,
}

impl Postgres {
    pub fn new(mgr: Manager) -> Self {
        let s = mgr.settings();
        let initial = match s.durability {
            Durability::Synchronous => DurabilityMode::Degraded,
            Durability::Async => DurabilityMode::Async,
        };
        let controller = DurabilityController::new(s.durability, s.degrade_after, initial);
        Postgres {
            mgr,
            op: tokio::sync::Mutex::new(()),
            durability: tokio::sync::Mutex::new(controller),
            was_streaming: Mutex::new(false),
            expected: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn data_dir_has_cluster(&self) -> bool {
        has_cluster(&self.mgr.settings().data_dir)
    }

    /// Start the server through the service manager unless it runs there
    /// (a server left behind outside it is taken over: stopped and started).
    async fn ensure_running(&self) -> anyhow::Result<()> {
        self.mgr.start().await?;
        Ok(())
    }

    async fn mode(&self) -> DurabilityMode {
        self.durability.lock().await.mode()
    }

    /// On the primary, once per tick: degrade to async when the follower has
    /// been gone for `degrade_after`, and back when it streams again.
    pub async fn durability_tick(&self) -> anyhow::Result<DurabilityMode> {
        let mut controller = self.durability.lock().await;
        Ok(self.mgr.durability_tick(&mut controller, Instant::now()).await?)
    }
}

impl Database for Postgres {
    fn position(&self) -> BoxFut<'_, Option<WalPosition>> {
        Box::pin(async move {
            if !self.mgr.is_running()? {
                return Ok(None);
            }
            let st = self.mgr.status().await?;
            if st.role == PgRole::Standby {
                *self.was_streaming.lock().unwrap_or_else(|p| p.into_inner()) = st.streaming();
            }
            let timeline = u32::try_from(st.timeline).context("timeline out of range")?;
            let lsn = Lsn(u64::try_from(st.lsn_bytes).context("LSN out of range")?);
            Ok(Some(WalPosition { timeline, lsn }))
        })
    }

    fn healthy(&self) -> BoxFut<'_, Option<bool>> {
        Box::pin(async move {
            if !self.expected.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let ok = match self.mgr.connect("postgres").await {
                Ok(db) => db.query_one("health check", "SELECT 1", &[]).await.is_ok(),
                Err(e) => {
                    tracing::debug!(error = %e, "PostgreSQL health check failed");
                    false
                }
            };
            Ok(Some(ok))
        })
    }

    fn restart(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.mgr.is_running()? {
                self.mgr.stop(StopMode::Fast).await?;
            }
            self.mgr.start().await?;
            Ok(())
        })
    }

    fn promote(&self, epoch: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            // A logical-mode follower is a primary too, but with a subscription.
            let primary = self.data_dir_has_cluster() && {
                self.ensure_running().await?;
                let st = self.mgr.status().await?;
                st.role == PgRole::Primary && st.subscription.is_none()
            };
            if !self.data_dir_has_cluster() || primary {
                // A fresh cluster, or this node already was the primary (an
                // agent restart, or a first bootstrap cut short): converge.
                self.mgr.bootstrap_leader().await.context("bootstrapping PostgreSQL")?;
            } else {
                let streamed = *self.was_streaming.lock().unwrap_or_else(|p| p.into_inner());
                let synchronous = self.mgr.settings().durability == Durability::Synchronous;
                let tail = if synchronous && streamed { Tail::Complete } else { Tail::MayBeLost };
                self.mgr.promote(tail).await.context("promoting PostgreSQL")?;
            }
            self.expected.store(true, Ordering::SeqCst);
            tracing::debug!(epoch, "datastore is primary");
            Ok(())
        })
    }

    fn demote(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            // Writes stop now; the rejoin that follows makes it a standby.
            // Immediate: a fast stop waits for the walsender to flush to a
            // standby that may be unreachable; crash recovery is safe here.
            self.expected.store(false, Ordering::SeqCst);
            self.mgr.stop(StopMode::Immediate).await.context("stopping PostgreSQL to demote")?;
            Ok(())
        })
    }

    fn rejoin(&self, leader: &str) -> BoxFut<'_, ()> {
        let leader = leader.to_string();
        Box::pin(async move {
            let _op = self.op.lock().await;
            if !self.data_dir_has_cluster() {
                self.mgr.init_follower().await.with_context(|| format!("copying the datastore from {leader}"))?;
                self.expected.store(true, Ordering::SeqCst);
                return Ok(());
            }
            if self.mgr.is_running()? {
                let st = self.mgr.status().await?;
                if st.role == PgRole::Standby {
                    // Already a standby (agent restart): nothing to rewind.
                    self.expected.store(true, Ordering::SeqCst);
                    return Ok(());
                }
            }
            let outcome = self.mgr.rejoin().await.with_context(|| format!("rejoining {leader}"))?;
            if let Some(archive) = outcome.archive() {
                tracing::warn!(event = "datastore_archived", archive = %archive.display(), "the old data directory was kept as an archive");
            }
            self.expected.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn fence(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            // Immediate, as for a demotion: the fence must hold before the
            // peer's promotion timer fires, even when the standby is cut off.
            self.expected.store(false, Ordering::SeqCst);
            self.mgr.stop(StopMode::Immediate).await.context("stopping PostgreSQL to fence")?;
            Ok(())
        })
    }

    fn unfence(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.ensure_running().await?;
            self.expected.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn replication(&self) -> BoxFut<'_, Option<ReplicationView>> {
        Box::pin(async move {
            if !self.mgr.is_running()? {
                return Ok(None);
            }
            let st = self.mgr.status().await?;
            let peer = &self.mgr.settings().peer.name;
            // A logical-mode follower is a primary with a subscription.
            let view = match st.role {
                PgRole::Primary if st.subscription.is_none() => {
                    let replica = st.replica(peer);
                    ReplicationView {
                        durability: match self.mode().await {
                            DurabilityMode::Synchronous => "synchronous",
                            DurabilityMode::Degraded => "degraded (async)",
                            DurabilityMode::Async => "async",
                        }
                        .into(),
                        streaming: replica.is_some_and(|r| r.state.as_deref() == Some("streaming")),
                        lag_bytes: replica.and_then(|r| r.lag_bytes).and_then(|b| u64::try_from(b).ok()),
                        lag_seconds: replica.and_then(|r| r.replay_lag_seconds),
                    }
                }
                _ => ReplicationView {
                    durability: "standby".into(),
                    streaming: st.streaming(),
                    lag_bytes: None,
                    lag_seconds: None,
                },
            };
            Ok(Some(view))
        })
    }

    fn tick(&self, leading: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            // Skip the upkeep while a promotion or rejoin is under way.
            let Ok(_op) = self.op.try_lock() else { return Ok(()) };
            if leading && self.mgr.is_running()? {
                let st = self.mgr.status().await?;
                if st.role == PgRole::Primary {
                    self.durability_tick().await?;
                }
            }
            Ok(())
        })
    }
}
