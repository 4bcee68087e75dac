//! The `arbiter` witness: `gemin_k8s witness serve` on a third box grants a
//! leadership lease to one node at a time; only the holder may lead.
//!
//! Safety rests on two rules. The witness grants a lease to another node
//! only after the current one has expired by the witness's monotonic clock.
//! The holder counts its lease from the moment it *sent* the request and
//! stops trusting it a margin before the TTL, so it always gives up first.
//! The holder's name is persisted; after a restart the witness honours it
//! for one maximum TTL before granting to anyone else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::peer::tls::TlsMaterial;

/// Fraction of the TTL a holder trusts its lease for (the rest covers clock
/// drift between the two boxes and the request's flight time).
pub const TRUST_FRACTION: f64 = 0.8;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRequest {
    pub cluster: String,
    pub node: String,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseRequest {
    pub cluster: String,
    pub node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseAnswer {
    pub granted: bool,
    /// Current holder (after this request), if any.
    pub holder: Option<String>,
    /// How long the holder's lease still runs, by the witness's clock.
    pub remaining_ms: u64,
}

#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    expires: Instant,
}

/// Leases per cluster (one witness can serve several sites). Pure: time is
/// passed in.
#[derive(Debug)]
pub struct LeaseTable {
    max_ttl: Duration,
    leases: BTreeMap<String, Lease>,
}

impl LeaseTable {
    /// `restored`: holders persisted before a restart, honoured for `max_ttl` from `now`.
    pub fn new(max_ttl: Duration, restored: BTreeMap<String, String>, now: Instant) -> Self {
        let leases = restored.into_iter().map(|(c, holder)| (c, Lease { holder, expires: now + max_ttl })).collect();
        LeaseTable { max_ttl, leases }
    }

    /// Grant or renew for `req.node` unless another node holds an unexpired lease.
    pub fn acquire(&mut self, req: &LeaseRequest, now: Instant) -> LeaseAnswer {
        let ttl = Duration::from_millis(req.ttl_ms).min(self.max_ttl);
        let free = match self.leases.get(&req.cluster) {
            None => true,
            Some(l) => l.holder == req.node || l.expires <= now,
        };
        if free {
            self.leases.insert(req.cluster.clone(), Lease { holder: req.node.clone(), expires: now + ttl });
        }
        self.answer(&req.cluster, free, now)
    }

    pub fn release(&mut self, req: &ReleaseRequest, now: Instant) -> LeaseAnswer {
        if self.leases.get(&req.cluster).is_some_and(|l| l.holder == req.node) {
            self.leases.remove(&req.cluster);
        }
        self.answer(&req.cluster, false, now)
    }

    pub fn holder(&self, cluster: &str, now: Instant) -> LeaseAnswer {
        self.answer(cluster, false, now)
    }

    fn answer(&self, cluster: &str, granted: bool, now: Instant) -> LeaseAnswer {
        match self.leases.get(cluster).filter(|l| l.expires > now) {
            Some(l) => LeaseAnswer {
                granted,
                holder: Some(l.holder.clone()),
                remaining_ms: l.expires.saturating_duration_since(now).as_millis() as u64,
            },
            None => LeaseAnswer { granted, holder: None, remaining_ms: 0 },
        }
    }

    /// Holders worth persisting.
    fn holders(&self) -> BTreeMap<String, String> {
        self.leases.iter().map(|(c, l)| (c.clone(), l.holder.clone())).collect()
    }
}

struct WitnessState {
    table: Mutex<LeaseTable>,
    state_file: PathBuf,
}

impl WitnessState {
    fn persist_if_changed(&self, before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
        if before == after {
            return;
        }
        let result = serde_json::to_vec_pretty(after)
            .context("serialising lease holders")
            .and_then(|bytes| fsutil::write_atomic(&self.state_file, &bytes, 0o600));
        if let Err(e) = result {
            tracing::error!(file = %self.state_file.display(), error = %format!("{e:#}"), "could not persist the lease holder");
        }
    }
}

type Shared = Arc<WitnessState>;

fn lock(state: &WitnessState) -> std::sync::MutexGuard<'_, LeaseTable> {
    state.table.lock().unwrap_or_else(|p| p.into_inner())
}

async fn acquire(State(state): State<Shared>, Json(req): Json<LeaseRequest>) -> Response {
    let (answer, before, after) = {
        let mut table = lock(&state);
        let before = table.holders();
        let answer = table.acquire(&req, Instant::now());
        (answer, before, table.holders())
    };
    if before.get(&req.cluster) != after.get(&req.cluster) {
        tracing::info!(event = "lease_granted", cluster = %req.cluster, node = %req.node, "lease holder changed");
    }
    state.persist_if_changed(&before, &after);
    Json(answer).into_response()
}

async fn release(State(state): State<Shared>, Json(req): Json<ReleaseRequest>) -> Response {
    let (answer, before, after) = {
        let mut table = lock(&state);
        let before = table.holders();
        let answer = table.release(&req, Instant::now());
        (answer, before, table.holders())
    };
    state.persist_if_changed(&before, &after);
    Json(answer).into_response()
}

async fn show(State(state): State<Shared>, axum::extract::Path(cluster): axum::extract::Path<String>) -> Response {
    Json(lock(&state).holder(&cluster, Instant::now())).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "unknown witness route\n").into_response()
}

/// The witness routes; holders persisted in `state_file`.
pub fn router(max_ttl: Duration, state_file: &Path) -> anyhow::Result<Router> {
    let restored: BTreeMap<String, String> = match std::fs::read(state_file) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a witness state file; move it away to start fresh", state_file.display())
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
    };
    if !restored.is_empty() {
        tracing::info!(holders = ?restored, grace = ?max_ttl, "honouring lease holders from before the restart");
    }
    let state = Arc::new(WitnessState {
        table: Mutex::new(LeaseTable::new(max_ttl, restored, Instant::now())),
        state_file: state_file.to_path_buf(),
    });
    Ok(Router::new()
        .route("/v1/lease", post(acquire))
        .route("/v1/lease/release", post(release))
        .route("/v1/lease/{cluster}", get(show))
        .fallback(not_found)
        .with_state(state))
}

/// What a node believes about its lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseView {
    /// Held; trust it until this instant (local monotonic clock).
    Held {
        until: Instant,
    },
    HeldBy(String),
    Free,
    Unreachable(String),
}

/// A node's client for the witness.
#[derive(Debug, Clone)]
pub struct LeaseClient {
    base: String,
    http: reqwest::Client,
    cluster: String,
    node: String,
    ttl: Duration,
}

impl LeaseClient {
    pub fn new(target: &str, tls: &TlsMaterial, cluster: &str, node: &str, ttl: Duration) -> anyhow::Result<Self> {
        let timeout = (ttl / 4).max(Duration::from_millis(200));
        Ok(LeaseClient {
            base: format!("https://{target}"),
            http: tls.http_client(timeout)?,
            cluster: cluster.to_string(),
            node: node.to_string(),
            ttl,
        })
    }

    /// Ask for (or renew) the lease.
    pub async fn acquire(&self) -> LeaseView {
        let sent = Instant::now();
        let req = LeaseRequest {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            ttl_ms: self.ttl.as_millis() as u64,
        };
        let result = async {
            let resp = self.http.post(format!("{}/v1/lease", self.base)).json(&req).send().await?.error_for_status()?;
            resp.json::<LeaseAnswer>().await
        }
        .await;
        match result {
            Ok(a) if a.granted => {
                let trusted = Duration::from_millis(a.remaining_ms).min(self.ttl).mul_f64(TRUST_FRACTION);
                LeaseView::Held { until: sent + trusted }
            }
            Ok(LeaseAnswer { holder: Some(h), .. }) => LeaseView::HeldBy(h),
            Ok(_) => LeaseView::Free,
            Err(e) => LeaseView::Unreachable(e.to_string()),
        }
    }

    /// Who holds the lease now, without asking for it.
    pub async fn holder(&self) -> LeaseView {
        let result = async {
            let url = format!("{}/v1/lease/{}", self.base, self.cluster);
            self.http.get(url).send().await?.error_for_status()?.json::<LeaseAnswer>().await
        }
        .await;
        match result {
            Ok(LeaseAnswer { holder: Some(h), .. }) => LeaseView::HeldBy(h),
            Ok(_) => LeaseView::Free,
            Err(e) => LeaseView::Unreachable(e.to_string()),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Give the lease up (planned switchover, shutdown).
    pub async fn release(&self) -> anyhow::Result<()> {
        let req = ReleaseRequest { cluster: self.cluster.clone(), node: self.node.clone() };
        self.http
            .post(format!("{}/v1/lease/release", self.base))
            .json(&req)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("releasing the lease at {}", self.base))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(node: &str, ttl_ms: u64) -> LeaseRequest {
        LeaseRequest { cluster: "lab".into(), node: node.into(), ttl_ms }
    }

    #[test]
    fn one_holder_until_expiry_then_the_other() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(30), BTreeMap::new(), t0);
        assert!(table.acquire(&req("a", 10_000), t0).granted);
        let denied = table.acquire(&req("b", 10_000), t0 + Duration::from_secs(9));
        assert!(!denied.granted);
        assert_eq!(denied.holder.as_deref(), Some("a"));
        assert_eq!(denied.remaining_ms, 1_000);
        assert!(table.acquire(&req("a", 10_000), t0 + Duration::from_secs(9)).granted, "the holder renews");
        assert!(!table.acquire(&req("b", 10_000), t0 + Duration::from_secs(18)).granted);
        assert!(table.acquire(&req("b", 10_000), t0 + Duration::from_secs(19)).granted, "free once expired");
    }

    #[test]
    fn ttl_is_capped_and_release_frees() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(5), BTreeMap::new(), t0);
        assert_eq!(table.acquire(&req("a", 60_000), t0).remaining_ms, 5_000);
        table.release(&ReleaseRequest { cluster: "lab".into(), node: "b".into() }, t0);
        assert!(!table.acquire(&req("b", 1000), t0).granted, "only the holder can release");
        table.release(&ReleaseRequest { cluster: "lab".into(), node: "a".into() }, t0);
        assert!(table.acquire(&req("b", 1000), t0).granted);
    }

    #[test]
    fn restored_holders_are_honoured_for_one_max_ttl() {
        let t0 = Instant::now();
        let restored = BTreeMap::from([("lab".to_string(), "a".to_string())]);
        let mut table = LeaseTable::new(Duration::from_secs(10), restored, t0);
        assert!(!table.acquire(&req("b", 1000), t0 + Duration::from_secs(9)).granted);
        assert!(table.acquire(&req("a", 1000), t0 + Duration::from_secs(1)).granted, "the old holder may renew");
        assert!(table.acquire(&req("b", 1000), t0 + Duration::from_secs(11)).granted);
    }

    #[test]
    fn clusters_are_independent() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(10), BTreeMap::new(), t0);
        assert!(table.acquire(&req("a", 1000), t0).granted);
        let other = LeaseRequest { cluster: "shop-2".into(), node: "b".into(), ttl_ms: 1000 };
        assert!(table.acquire(&other, t0).granted);
    }
}
