//! The `arbiter` witness: `gemin_k8s witness serve` on a third box grants a
//! leadership lease to one node at a time; only the holder may lead.
//!
//! Safety rests on two rules. The witness grants a lease to another node
//! only after the current one has expired by the witness's monotonic clock.
//! The holder counts its lease from the moment it *sent* the request and
//! stops trusting it a margin before the TTL, so it always gives up first.
//!
//! The witness also keeps, per cluster, the **last holder** and the
//! **synchronous standby** the holder reports (`POST /v1/sync`), as Patroni's
//! `/sync` key and pg_auto_failover's monitor do. A free lease goes only to
//! the last holder, or to the recorded synchronous standby (which has every
//! acknowledged commit), or to a node whose request says `force` (an
//! operator's forced failover). A new holder starts with no synchronous
//! standby. These records are persisted before any answer that depends on
//! them; after a restart a lease that was held is honoured for one maximum TTL.
//!
//! Only nodes act on leases, each for itself: the caller's certificate must
//! name the node in the request ([`crate::peer::identity`]). The operator's
//! certificate may read; the witness's own certificate gets nothing.
//!
//! - [`table`]: the pure lease table;
//! - [`server`]: the routes and the state file;
//! - [`LeaseClient`]: a node's calls.

pub mod server;
pub mod table;

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::peer::tls::TlsMaterial;
pub use server::{Revocation, router};

/// Fraction of the TTL a holder trusts its lease for (the rest covers clock
/// drift between the two boxes and the request's flight time).
pub const TRUST_FRACTION: f64 = 0.8;

/// `POST /v1/lease`: acquire or renew.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRequest {
    pub cluster: String,
    pub node: String,
    pub ttl_ms: u64,
    /// Take a free lease even though this node is neither its last holder
    /// nor the recorded synchronous standby (an operator's forced failover).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/lease/release`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseRequest {
    pub cluster: String,
    pub node: String,
}

/// `POST /v1/sync`: the holder's synchronous standby, or none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyncRequest {
    pub cluster: String,
    pub node: String,
    pub sync_standby: Option<String>,
}

/// Answer to `POST /v1/sync`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyncAnswer {
    /// Whether the record was stored (the caller holds the lease).
    pub accepted: bool,
    /// The record now.
    pub sync_standby: Option<String>,
    /// The current holder, if any.
    pub holder: Option<String>,
}

/// Answer to the lease routes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseAnswer {
    pub granted: bool,
    /// Current holder (after this request), if any.
    pub holder: Option<String>,
    /// How long the holder's lease still runs, by the witness's clock.
    pub remaining_ms: u64,
    /// The synchronous standby the holder (or last holder) reported.
    #[serde(default)]
    pub sync_standby: Option<String>,
    /// The node that holds or last held the lease; `None` before the first grant.
    #[serde(default)]
    pub last_holder: Option<String>,
}

/// What a node believes about the lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseView {
    /// This node holds it; trust it until `until` (local monotonic clock).
    Mine { until: Instant, sync_standby: Option<String> },
    /// Another node holds it.
    Other { holder: String, sync_standby: Option<String> },
    /// Nobody holds it (expired or released). Without `force`, only the last
    /// holder or the recorded synchronous standby can take it
    /// ([`LeaseView::may_take`]).
    Free { last_holder: Option<String>, sync_standby: Option<String> },
    /// The witness did not answer, or refused the call; the text says why.
    Unreachable(String),
}

impl LeaseView {
    /// Whether `node` may take this free lease without forcing it (the
    /// witness's rule); `false` when the lease is not free.
    pub fn may_take(&self, node: &str) -> bool {
        match self {
            LeaseView::Free { last_holder: None, .. } => true,
            LeaseView::Free { last_holder, sync_standby } => {
                last_holder.as_deref() == Some(node) || sync_standby.as_deref() == Some(node)
            }
            _ => false,
        }
    }
}

/// A node's client for the witness.
#[derive(Debug, Clone)]
pub struct LeaseClient {
    base: String,
    http: crate::peer::tls::HttpClient,
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

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The witness's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send `request` and read a JSON answer; a refusal's text becomes the error.
    async fn call<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let sent = request.send().await;
        self.http.answered(sent.is_ok());
        let response = sent.with_context(|| format!("calling the witness at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("the witness at {} answered {status}: {}", self.base, body.trim());
        }
        response.json::<T>().await.with_context(|| format!("reading the answer of the witness at {}", self.base))
    }

    /// What an answer means to this node; a lease of ours is trusted for
    /// [`TRUST_FRACTION`] of what remains, counted from `sent`.
    fn view(&self, answer: LeaseAnswer, sent: Instant) -> LeaseView {
        let LeaseAnswer { holder, remaining_ms, sync_standby, last_holder, .. } = answer;
        match holder {
            Some(h) if h == self.node => {
                let trusted = Duration::from_millis(remaining_ms).min(self.ttl).mul_f64(TRUST_FRACTION);
                LeaseView::Mine { until: sent + trusted, sync_standby }
            }
            Some(holder) => LeaseView::Other { holder, sync_standby },
            None => LeaseView::Free { last_holder, sync_standby },
        }
    }

    /// Ask for (or renew) the lease; `force` takes a free lease this node
    /// is not eligible for (an operator's forced failover).
    pub async fn acquire(&self, force: bool) -> LeaseView {
        let sent = Instant::now();
        let req = LeaseRequest {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            ttl_ms: self.ttl.as_millis() as u64,
            force,
        };
        match self.call::<LeaseAnswer>(self.http.get().post(format!("{}/v1/lease", self.base)).json(&req)).await {
            Ok(answer) => self.view(answer, sent),
            Err(e) => LeaseView::Unreachable(format!("{e:#}")),
        }
    }

    /// Who holds the lease now, without asking for it.
    pub async fn holder(&self) -> LeaseView {
        let sent = Instant::now();
        let url = format!("{}/v1/lease/{}", self.base, self.cluster);
        match self.call::<LeaseAnswer>(self.http.get().get(url)).await {
            Ok(answer) => self.view(answer, sent),
            Err(e) => LeaseView::Unreachable(format!("{e:#}")),
        }
    }

    /// As the holder, record this cluster's synchronous standby (or none).
    /// Returns the record the witness now keeps; fails when the witness
    /// refused it (this node does not hold the lease) or did not answer.
    pub async fn record_sync(&self, sync_standby: Option<&str>) -> anyhow::Result<Option<String>> {
        let req = SyncRequest {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            sync_standby: sync_standby.map(str::to_string),
        };
        let answer: SyncAnswer = self.call(self.http.get().post(format!("{}/v1/sync", self.base)).json(&req)).await?;
        if !answer.accepted {
            anyhow::bail!(
                "the witness at {} refused to record {:?} as the synchronous standby of {}: the lease is held by {}",
                self.base,
                sync_standby,
                self.node,
                answer.holder.as_deref().unwrap_or("nobody")
            );
        }
        Ok(answer.sync_standby)
    }

    /// Give the lease up (planned switchover, shutdown).
    pub async fn release(&self) -> anyhow::Result<()> {
        let req = ReleaseRequest { cluster: self.cluster.clone(), node: self.node.clone() };
        self.call::<LeaseAnswer>(self.http.get().post(format!("{}/v1/lease/release", self.base)).json(&req))
            .await
            .context("releasing the lease")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_take_a_free_lease() {
        let free = |last: Option<&str>, sync: Option<&str>| LeaseView::Free {
            last_holder: last.map(str::to_string),
            sync_standby: sync.map(str::to_string),
        };
        assert!(free(None, None).may_take("b"), "a cluster without a record");
        assert!(free(Some("b"), None).may_take("b"));
        assert!(free(Some("a"), Some("b")).may_take("b"));
        assert!(!free(Some("a"), None).may_take("b"));
        assert!(!LeaseView::Other { holder: "a".into(), sync_standby: Some("b".into()) }.may_take("b"));
    }

    #[test]
    fn a_request_without_force_is_not_forced() {
        let req: LeaseRequest = serde_json::from_str(r#"{"cluster":"lab","node":"a","ttl_ms":1000}"#).unwrap();
        assert!(!req.force);
        let answer: LeaseAnswer = serde_json::from_str(r#"{"granted":true,"holder":"a","remaining_ms":1000}"#).unwrap();
        assert_eq!((answer.sync_standby, answer.last_holder), (None, None));
    }
}
