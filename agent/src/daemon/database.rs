//! The [`Database`] the agent drives: the PostgreSQL [`Manager`], with the
//! role machine's verbs mapped onto its operations.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::subsystems::{BoxFut, CatchUpFailed, Database, DbReport};
use crate::config::Durability;
use crate::election::{Replication, WalPosition};
use crate::hostmeta::Lsn;
use crate::peer::ReplicationView;
use crate::postgres::files::has_cluster;
use crate::postgres::{Manager, PgRole, PgStatus, ServerRole, StopMode, archive};

pub struct Postgres {
    /// Replaced as a whole when the peer moves (`replace-node`); an
    /// operation in flight keeps the one it started with.
    mgr: std::sync::RwLock<Arc<Manager>>,
    /// One datastore operation at a time: a promotion, a rejoin and a
    /// durability change must not interleave. (A fence does not wait for it.)
    op: tokio::sync::Mutex<()>,
    /// On the primary: the WAL position when commits were first seen
    /// waiting for the peer. The peer holds every acknowledged write once it
    /// has flushed past it (writes acknowledged before may not have waited).
    sync_from: Mutex<Option<i64>>,
    /// Whether the server should be running: false until it is set up, and
    /// while demoted or fenced.
    expected: std::sync::atomic::AtomicBool,
    /// A hand-over shut the primary down cleanly here: the rejoin that
    /// follows tries to follow the new primary without `pg_rewind`.
    handed_over: Mutex<Option<WalPosition>>,
}

/// How long a standby may take to replay past a hand-over's shutdown
/// checkpoint before it refuses to promote (the old leader then resumes).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the standby's replay position is read while catching up.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);

impl Postgres {
    fn mgr(&self) -> Arc<Manager> {
        self.mgr.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn new(mgr: Manager) -> Self {
        Postgres {
            mgr: std::sync::RwLock::new(Arc::new(mgr)),
            op: tokio::sync::Mutex::new(()),
            sync_from: Mutex::new(None),
            expected: std::sync::atomic::AtomicBool::new(false),
            handed_over: Mutex::new(None),
        }
    }

    /// Wait until this standby has replayed past `checkpoint` (the end of
    /// the last replayed record lies beyond the start of the shutdown
    /// checkpoint record: that whole record, and every commit before it,
    /// is here) on the same timeline.
    ///
    /// A standby shows its timeline through its WAL receiver, which exits
    /// when the primary shuts down; without it, the control file's (the
    /// last restartpoint's) may still name the timeline before. Then a
    /// restartpoint (`CHECKPOINT` on the standby) settles it: it lands on
    /// the last replayed checkpoint record, the old primary's shutdown
    /// checkpoint, with its timeline.
    async fn replay_past(&self, checkpoint: WalPosition) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut restartpoint = false;
        loop {
            let last = match self.mgr().status().await {
                Ok(st) if st.role == PgRole::Standby => {
                    let past = u64::try_from(st.lsn_bytes).is_ok_and(|l| l > checkpoint.lsn.0);
                    if past && st.timeline < i64::from(checkpoint.timeline) && !restartpoint {
                        restartpoint = true;
                        let db = self.mgr().connect("postgres").await?;
                        db.batch("a restartpoint to settle the replayed timeline", "CHECKPOINT").await?;
                        continue;
                    }
                    if past && st.timeline == i64::from(checkpoint.timeline) {
                        tracing::info!(event = "handover_caught_up", timeline = st.timeline, replayed = %st.lsn,
                            checkpoint = %checkpoint.lsn, waited_ms = started.elapsed().as_millis() as u64,
                            "replayed past the old primary's shutdown checkpoint");
                        return Ok(());
                    }
                    format!("replayed {} on timeline {}", st.lsn, st.timeline)
                }
                Ok(st) => format!("the server is {:?}", st.role),
                Err(e) => e.to_string(),
            };
            if started.elapsed() >= CATCH_UP_TIMEOUT {
                return Err(CatchUpFailed {
                    timeline: checkpoint.timeline,
                    checkpoint: checkpoint.lsn,
                    waited: CATCH_UP_TIMEOUT,
                    last,
                }
                .into());
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }

    fn data_dir_has_cluster(&self) -> bool {
        has_cluster(&self.mgr().settings().data_dir)
    }

    /// The machine's view of the primary's replication, from `st`.
    fn replication_of(&self, st: &PgStatus) -> Replication {
        let peer = &self.mgr().settings().peer.name.clone();
        let replica = st.replica(peer);
        let sync_configured = self.mgr().waits_for_peer(&st.synchronous_standby_names);
        let peer_streaming = replica.is_some_and(|r| r.state.as_deref() == Some("streaming"));
        let sync = replica.is_some_and(|r| r.sync_state.as_deref() == Some("sync"));
        let mut from = self.sync_from.lock().unwrap_or_else(|p| p.into_inner());
        if !(sync_configured && sync) {
            *from = None;
        } else if from.is_none() {
            *from = Some(st.lsn_bytes);
        }
        let flushed_past = match (*from, replica.and_then(|r| r.flush_lsn_bytes)) {
            (Some(from), Some(flushed)) => flushed >= from,
            _ => false,
        };
        Replication { sync_configured, peer_streaming, peer_in_sync: sync_configured && peer_streaming && flushed_past }
    }
}

impl Postgres {
    /// The primary's replication for the role machine, and the view for
    /// `status` (a standby gets only the view).
    fn replication_of_status(&self, st: &PgStatus) -> (Option<Replication>, ReplicationView) {
        let peer = &self.mgr().settings().peer.name.clone();
        // A logical-mode follower is a primary with a subscription.
        if st.role != PgRole::Primary || st.subscription.is_some() {
            let view = ReplicationView {
                durability: "standby".into(),
                streaming: st.streaming(),
                settings: st.settings.clone(),
                ..ReplicationView::default()
            };
            return (None, view);
        }
        let r = self.replication_of(st);
        let replica = st.replica(peer);
        let durability = match (self.mgr().settings().durability, r.sync_configured, r.peer_in_sync) {
            (_, true, true) => "synchronous",
            (_, true, false) => "synchronous, waiting for the standby",
            (Durability::Synchronous, false, _) => "degraded (async)",
            (Durability::Async, false, _) => "async",
        };
        let view = ReplicationView {
            durability: durability.into(),
            streaming: r.peer_streaming,
            synchronous_standby_names: Some(st.synchronous_standby_names.clone()),
            sync_state: replica.and_then(|r| r.sync_state.clone()),
            lag_bytes: replica.and_then(|r| r.lag_bytes).and_then(|b| u64::try_from(b).ok()),
            lag_seconds: replica.and_then(|r| r.replay_lag_seconds),
            flush_lag_bytes: replica.and_then(|r| r.flush_lsn_bytes).map(|f| flush_lag(st.lsn_bytes, f)),
            settings: st.settings.clone(),
        };
        (Some(r), view)
    }
}

/// How far the standby's flushed position `flushed` is behind the primary's
/// `current`. The two are read one after the other, so under writes the
/// standby may have flushed past the position read first: nothing is
/// missing then.
fn flush_lag(current: i64, flushed: i64) -> u64 {
    u64::try_from(current.saturating_sub(flushed)).unwrap_or(0)
}

/// How long a release waits for PostgreSQL's clean stop.
const RELEASE_STOP: Duration = Duration::from_secs(30);

impl Database for Postgres {
    fn has_data(&self) -> bool {
        let data = &self.mgr().settings().data_dir.clone();
        let empty = crate::postgres::files::is_empty_or_missing(data).unwrap_or(false);
        has_cluster(data) || !empty || !archive::list(data).is_empty()
    }

    fn observe(&self) -> BoxFut<'_, DbReport> {
        Box::pin(async move {
            let expected = self.expected.load(Ordering::SeqCst);
            if !self.mgr().is_running()? {
                // Stopped (after a reboot, before the election): the control
                // file is fresher than the position hostMeta recorded.
                // A control file that cannot be read (a failing disk) is
                // still a datastore that should run and does not: the role
                // machine must hear it.
                let (position, problem) = match self.mgr().control_position().await {
                    Ok(c) => {
                        (c.map(|c| WalPosition { timeline: c.timeline, lsn: Lsn(c.lsn_bytes) }), "not running".into())
                    }
                    Err(e) => (None, format!("not running, and its control file cannot be read: {e:#}")),
                };
                return Ok(DbReport {
                    healthy: expected.then_some(false),
                    position,
                    problem: Some(problem),
                    ..DbReport::default()
                });
            }
            // One session answers everything: health, position, replication.
            let st = match self.mgr().status().await {
                Ok(st) => st,
                Err(e) => {
                    tracing::debug!(error = %e, "PostgreSQL does not answer");
                    return Ok(DbReport {
                        healthy: expected.then_some(false),
                        problem: Some(format!("does not answer: {e}")),
                        ..DbReport::default()
                    });
                }
            };
            let timeline = u32::try_from(st.timeline).context("timeline out of range")?;
            let lsn = Lsn(u64::try_from(st.lsn_bytes).context("LSN out of range")?);
            let (replication, view) = self.replication_of_status(&st);
            Ok(DbReport {
                healthy: expected.then_some(true),
                position: Some(WalPosition { timeline, lsn }),
                replication,
                view: Some(view),
                problem: None,
            })
        })
    }

    fn restart(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            if !self.expected.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.mgr().is_running()? {
                // Immediate: a fast stop waits for standbys that may be unreachable.
                self.mgr().stop(StopMode::Immediate).await?;
            }
            self.mgr().start().await?;
            Ok(())
        })
    }

    fn promote(
        &self,
        epoch: u64,
        bootstrap: bool,
        not_after: Option<Instant>,
        catch_up: Option<WalPosition>,
    ) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            if !self.data_dir_has_cluster() {
                if !bootstrap {
                    anyhow::bail!(
                        "{} holds no PostgreSQL cluster; refusing to start an empty datastore at epoch {epoch} \
                         (only the cluster's first formation does that). Rejoin this node to its peer, or restore \
                         a backup",
                        self.mgr().settings().data_dir.display()
                    );
                }
                self.mgr().bootstrap_leader().await.context("bootstrapping PostgreSQL")?;
            } else {
                self.mgr().start().await?;
                let st = self.mgr().status().await?;
                // A logical-mode follower is a primary too, but with a subscription.
                if st.role == PgRole::Primary && st.subscription.is_none() {
                    // Already the primary (an agent restart, or a first
                    // bootstrap cut short): converge.
                    self.mgr().bootstrap_leader().await.context("converging PostgreSQL as primary")?;
                } else {
                    if let Some(checkpoint) = catch_up {
                        self.replay_past(checkpoint).await?;
                    }
                    if let Some(deadline) = not_after
                        && Instant::now() > deadline
                    {
                        anyhow::bail!(
                            "this standby's entitlement to take over ended {:?} ago: the leader may have \
                             acknowledged writes it lacks; not promoting",
                            deadline.elapsed()
                        );
                    }
                    self.mgr().promote().await.context("promoting PostgreSQL")?;
                }
            }
            *self.sync_from.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
            self.mgr().stop(StopMode::Immediate).await.context("stopping PostgreSQL to demote")?;
            Ok(())
        })
    }

    fn hand_over(&self, budget: Duration) -> BoxFut<'_, Option<WalPosition>> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            self.expected.store(false, Ordering::SeqCst);
            // A clean (fast) shutdown disconnects every client, writes the
            // shutdown checkpoint and lets the walsender send it to the
            // standby before it exits. The walsender waits for a standby
            // that does not take it, hence the budget.
            let started = Instant::now();
            match tokio::time::timeout(budget, self.mgr().stop(StopMode::Fast)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the clean shutdown for the hand-over failed"),
                Err(_) => {
                    tracing::warn!(?budget, "the clean shutdown for the hand-over took too long; stopping at once")
                }
            }
            if self.mgr().is_running()? {
                self.mgr().stop(StopMode::Immediate).await.context("stopping PostgreSQL to hand over")?;
            }
            let control = self.mgr().control_position().await.context("reading the control file after the shutdown")?;
            let checkpoint = control
                .filter(|c| c.clean_shutdown)
                .map(|c| WalPosition { timeline: c.timeline, lsn: Lsn(c.lsn_bytes) });
            tracing::info!(event = "handover_shutdown", clean = checkpoint.is_some(), checkpoint = ?checkpoint,
                shutdown_ms = started.elapsed().as_millis() as u64, "PostgreSQL stopped for the hand-over");
            *self.handed_over.lock().unwrap_or_else(|p| p.into_inner()) = checkpoint;
            Ok(checkpoint)
        })
    }

    fn rejoin(&self, leader: &str) -> BoxFut<'_, ()> {
        let leader = leader.to_string();
        Box::pin(async move {
            let _op = self.op.lock().await;
            if !self.data_dir_has_cluster() {
                self.mgr().init_follower().await.with_context(|| format!("copying the datastore from {leader}"))?;
                self.expected.store(true, Ordering::SeqCst);
                return Ok(());
            }
            if self.mgr().is_running()? {
                let st = self.mgr().status().await?;
                if st.role == PgRole::Standby {
                    // Already a standby (agent restart): nothing to rewind.
                    self.expected.store(true, Ordering::SeqCst);
                    return Ok(());
                }
            }
            let follow_first = self.handed_over.lock().unwrap_or_else(|p| p.into_inner()).take().is_some();
            let outcome = self.mgr().rejoin(follow_first).await.with_context(|| format!("rejoining {leader}"))?;
            if let Some(archive) = outcome.archive() {
                tracing::warn!(event = "datastore_archived", archive = %archive.display(), "the old data directory was kept as an archive");
            }
            self.expected.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn fence(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            // Immediate, as for a demotion: the fence must hold before the
            // peer's promotion timer fires, even when the standby is cut off.
            self.expected.store(false, Ordering::SeqCst);
            self.mgr().stop(StopMode::Immediate).await.context("stopping PostgreSQL to fence")?;
            Ok(())
        })
    }

    fn unfence(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            // Leading again (also after a withdrawn hand-over): a later
            // rejoin is not one that may follow without pg_rewind.
            *self.handed_over.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.mgr().start().await?;
            self.expected.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn probe_write(&self, host: std::net::IpAddr) -> BoxFut<'_, Duration> {
        Box::pin(async move { Ok(self.mgr().probe_write(host).await?) })
    }

    fn set_durability(&self, synchronous: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            if !self.mgr().is_running()? {
                return Ok(());
            }
            self.mgr().apply_durability(synchronous).await?;
            *self.sync_from.lock().unwrap_or_else(|p| p.into_inner()) = None;
            Ok(())
        })
    }
    fn set_peer(&self, ip: std::net::IpAddr) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            let moved = Arc::new(self.mgr().with_peer_ip(ip));
            if moved.is_running()? {
                let role = match moved.status().await?.role {
                    PgRole::Primary => ServerRole::Primary,
                    _ => ServerRole::Standby,
                };
                moved.write_config(role)?;
                moved.reload().await?;
            }
            *self.mgr.write().unwrap_or_else(|p| p.into_inner()) = moved;
            Ok(())
        })
    }

    fn drop_peer_slot(&self) -> BoxFut<'_, Option<u64>> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            Ok(self.mgr().drop_peer_slot().await?)
        })
    }

    fn stop(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _op = self.op.lock().await;
            self.expected.store(false, Ordering::SeqCst);
            // Clean when it can be; a fast stop waits for a standby that
            // may be gone, so at once after a while.
            match tokio::time::timeout(RELEASE_STOP, self.mgr().stop(StopMode::Fast)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the clean stop failed; stopping at once"),
                Err(_) => tracing::warn!(budget = ?RELEASE_STOP, "the clean stop took too long; stopping at once"),
            }
            if self.mgr().is_running()? {
                self.mgr().stop(StopMode::Immediate).await.context("stopping PostgreSQL")?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::flush_lag;

    #[test]
    fn a_standby_flushed_past_the_position_read_first_has_no_lag() {
        assert_eq!(flush_lag(0x3000100, 0x3000000), 0x100);
        assert_eq!(flush_lag(0x3000000, 0x3000000), 0);
        // Read after the primary's position, under writes: ahead of it.
        assert_eq!(flush_lag(0x3000000, 0x3000100), 0);
    }
}
