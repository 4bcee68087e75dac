//! Writers that run for a whole trial and record every acknowledged put:
//! one in the client namespace through the VIP, as a user would, and one in
//! each node namespace through that node's own Kine, as the node's K3s
//! would (that Kine reaches PostgreSQL through the VIP).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::netns::Lab;
use crate::probe::put_from;

/// After a failed put, before the next one: the resolution of a gap, and
/// no busy loop of etcdctl against a refused port.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// One acknowledged put.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ack {
    pub key: String,
    pub value: String,
    /// The revision Kine acknowledged.
    pub revision: i64,
    /// When the put was sent, since the trial started.
    #[serde(serialize_with = "super::secs::serialize")]
    pub sent: Duration,
    /// When the acknowledgement came, since the trial started.
    #[serde(serialize_with = "super::secs::serialize")]
    pub at: Duration,
}

/// The name of the writer in the client namespace, through the VIP.
pub const CLIENT: &str = "client";

/// Where a writer runs and whom it talks to.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    /// `client`, or the node's name.
    pub name: String,
    /// The lab host whose namespace runs etcdctl.
    pub from: String,
    /// The Kine it writes to (an address; port 2379).
    pub endpoint: String,
    /// The node it runs on: it writes only while that node is powered on.
    pub node: Option<String>,
}

impl WriterSpec {
    /// The writers of a trial: the client through the VIP, and each node through its own Kine.
    pub fn all(lab: &Lab) -> Vec<WriterSpec> {
        let client =
            WriterSpec { name: CLIENT.into(), from: "client".into(), endpoint: lab.vip.to_string(), node: None };
        let nodes = lab.nodes.iter().map(|n| WriterSpec {
            name: n.name.clone(),
            from: n.name.clone(),
            endpoint: n.ip.to_string(),
            node: Some(n.name.clone()),
        });
        std::iter::once(client).chain(nodes).collect()
    }
}

/// A writer's record.
#[derive(Debug)]
pub struct Writer {
    pub spec: WriterSpec,
    acks: Mutex<Vec<Ack>>,
    attempts: AtomicU64,
    /// Pauses because the writer's node was powered off.
    powered_off_pauses: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Writer {
    pub fn new(spec: WriterSpec) -> Writer {
        Writer {
            spec,
            acks: Mutex::new(Vec::new()),
            attempts: AtomicU64::new(0),
            powered_off_pauses: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Put `/chaos/<trial>/<writer>/<seq>` until `stop`, each key once,
    /// recording what was acknowledged. A put that fails or times out is not
    /// retried: the next one takes the next key.
    pub fn run(&self, lab: &Lab, trial: usize, start: Instant, stop: &AtomicBool) {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if self.spec.node.as_deref().is_some_and(|n| !lab.powered(n)) {
                self.powered_off_pauses.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
            seq += 1;
            let key = format!("/chaos/{trial}/{}/{seq:06}", self.spec.name);
            let value = format!("{trial}:{}:{seq}", self.spec.name);
            self.attempts.fetch_add(1, Ordering::Relaxed);
            let sent = start.elapsed();
            match put_from(lab, &self.spec.from, &self.spec.endpoint, &key, &value) {
                Ok(revision) => lock(&self.acks).push(Ack { key, value, revision, sent, at: start.elapsed() }),
                Err(e) => {
                    *lock(&self.last_error) = Some(e);
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    pub fn acks(&self) -> Vec<Ack> {
        lock(&self.acks).clone()
    }

    /// Whether a put was acknowledged after `t` (since the trial started).
    pub fn acked_after(&self, t: Duration) -> bool {
        lock(&self.acks).last().is_some_and(|a| a.at > t)
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// How long the writer did not write because its node was powered off (roughly).
    pub fn powered_off(&self) -> Duration {
        RETRY_PAUSE * u32::try_from(self.powered_off_pauses.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
    }

    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
