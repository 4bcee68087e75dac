//! The fence timer: a leader in mode `gateway` or `arbiter` must have
//! released the VIP and stopped writes by its fence deadline
//! ([`crate::election::Machine::fence_deadline`]), whatever the agent loop is
//! doing at the time (waiting on a slow probe, a stuck datastore call). The
//! loop moves the deadline after every step; this task, independent of the
//! loop, acts when a deadline passes without having been moved, then tells
//! the loop, which feeds [`crate::election::Input::FenceDeadlinePassed`] to
//! the role machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use super::subsystems::Database;
use crate::netlink::Vip;

/// The loop's handle on the fence timer.
pub struct FenceTimer {
    deadline: watch::Sender<Option<Instant>>,
    /// Set by the timer when it fenced; cleared by the loop once the role
    /// machine knows. While set, nothing may take the VIP back.
    fired: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FenceTimer {
    /// Start the timer; it reports each fence it carried out on `events`.
    pub fn spawn(vip: Option<Arc<dyn Vip>>, db: Option<Arc<dyn Database>>, events: mpsc::Sender<()>) -> FenceTimer {
        let (deadline, mut rx) = watch::channel(None::<Instant>);
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let task = tokio::spawn(async move {
            loop {
                let current = *rx.borrow_and_update();
                let Some(at) = current else {
                    if rx.changed().await.is_err() {
                        return;
                    }
                    continue;
                };
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep_until(at.into()) => {
                        if *rx.borrow() != Some(at) {
                            continue;
                        }
                        flag.store(true, Ordering::SeqCst);
                        fence_now(vip.as_deref(), db.as_deref(), at).await;
                        if events.send(()).await.is_err() {
                            return;
                        }
                        // Wait for the loop to move or clear the deadline.
                        while *rx.borrow() == Some(at) {
                            if rx.changed().await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        FenceTimer { deadline, fired, task }
    }

    /// The deadline now in force (`None`: nothing to enforce). Ignored
    /// between a fence by the timer and its acknowledgement.
    pub fn set(&self, deadline: Option<Instant>) {
        if self.fired() {
            return;
        }
        self.deadline.send_if_modified(|d| {
            let changed = *d != deadline;
            *d = deadline;
            changed
        });
    }

    /// Whether the timer fenced and the loop has not acknowledged it yet.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// The loop has fed the fence to the role machine (which has no
    /// deadline while fenced).
    pub fn acknowledge(&self) {
        self.deadline.send_replace(None);
        self.fired.store(false, Ordering::SeqCst);
    }
}

impl Drop for FenceTimer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fence_now(vip: Option<&dyn Vip>, db: Option<&dyn Database>, deadline: Instant) {
    tracing::error!(
        event = "fence_timer",
        late_ms = deadline.elapsed().as_millis() as u64,
        "fence deadline passed without contact to the peer or the witness: releasing the VIP and stopping writes"
    );
    if let Some(vip) = vip
        && let Err(e) = vip.release().await
    {
        tracing::error!(error = %e, "the fence timer could not release the VIP");
    }
    if let Some(db) = db
        && let Err(e) = db.fence().await
    {
        tracing::error!(error = %format!("{e:#}"), "the fence timer could not stop the datastore");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::netlink::VipFuture;

    #[derive(Default)]
    struct FakeVip {
        released: Mutex<u32>,
    }

    impl Vip for FakeVip {
        fn take(&self) -> VipFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn release(&self) -> VipFuture<'_, ()> {
            *self.released.lock().unwrap() += 1;
            Box::pin(async { Ok(()) })
        }
        fn held(&self) -> VipFuture<'_, bool> {
            Box::pin(async { Ok(false) })
        }
        fn held_elsewhere(&self, _timeout: Duration) -> VipFuture<'_, bool> {
            Box::pin(async { Ok(false) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fences_once_when_the_deadline_passes_unmoved() {
        let vip = Arc::new(FakeVip::default());
        let (tx, mut rx) = mpsc::channel(4);
        let timer = FenceTimer::spawn(Some(vip.clone() as Arc<dyn Vip>), None, tx);
        let start = Instant::now();
        // Moved forward in time before it passes: no fence.
        timer.set(Some(start + Duration::from_secs(2)));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        timer.set(Some(start + Duration::from_secs(4)));
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert_eq!(*vip.released.lock().unwrap(), 0);
        assert!(!timer.fired());
        // Not moved: fenced once, and reported.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(rx.recv().await, Some(()));
        assert!(timer.fired());
        assert_eq!(*vip.released.lock().unwrap(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*vip.released.lock().unwrap(), 1, "one fence per deadline");
        timer.acknowledge();
        timer.set(None);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*vip.released.lock().unwrap(), 1);
    }
}
