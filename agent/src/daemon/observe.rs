//! One heartbeat interval's observations: the peer, the second path, the
//! witness and the local checks.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cmd::Tool;
use crate::config::validate::parse_target;
use crate::election::{ArbiterRecord, Heartbeat, WitnessView};
use crate::peer::client::AgentClient;
use crate::witness::{LeaseClient, LeaseView};

/// Ask the peer's API for its heartbeat answer.
pub async fn heartbeat(peer: &AgentClient) -> (Heartbeat, Option<String>) {
    match peer.health().await {
        Ok((report, rtt)) => match report.election {
            Some(status) => (Heartbeat::Ok { rtt, peer: Box::new(status) }, None),
            None => (Heartbeat::Missed, Some("the peer's answer carries no election status".into())),
        },
        Err(e) => (Heartbeat::Missed, Some(format!("{e:#}"))),
    }
}

/// Whether a TCP connection to `addr` opens within `timeout`.
pub async fn tcp_open(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// The second path to the peer: its PostgreSQL port, else its API port.
pub async fn second_path(peer_ip: IpAddr, pg_port: u16, api_port: u16, timeout: Duration) -> bool {
    let (pg, api) = tokio::join!(
        tcp_open(SocketAddr::new(peer_ip, pg_port), timeout),
        tcp_open(SocketAddr::new(peer_ip, api_port), timeout)
    );
    pg || api
}

/// One ICMP echo through `ping` (exit status only), waiting at most `timeout`.
pub async fn ping(ip: IpAddr, timeout: Duration) -> bool {
    let wait = format!("{:.1}", timeout.as_secs_f64().max(0.1));
    Tool::new("ping")
        .args(["-n", "-q", "-c", "1", "-W", &wait])
        .arg(ip.to_string())
        .timeout(timeout + Duration::from_millis(200))
        .run()
        .await
        .is_ok()
}

/// Gateway mode: any target answering (TCP when a port is given, else ICMP).
pub async fn gateway(targets: &[String], timeout: Duration) -> WitnessView {
    let probes = targets.iter().filter_map(|t| parse_target(t)).map(|(ip, port)| async move {
        match port {
            Some(p) => tcp_open(SocketAddr::new(ip, p), timeout).await,
            None => ping(ip, timeout).await,
        }
    });
    let results = futures_all(probes).await;
    if results.into_iter().any(|ok| ok) { WitnessView::GatewayReachable } else { WitnessView::GatewayUnreachable }
}

async fn futures_all<F: std::future::Future<Output = bool> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<bool> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap_or(false));
    }
    out
}

/// What the node knows about the arbiter lease.
#[derive(Debug, Clone, Default)]
pub struct LeaseState {
    /// Trusted until this instant.
    pub held_until: Option<Instant>,
    pub last: Option<LeaseView>,
    /// The arbiter's records (synchronous standby, last holder) as it last answered.
    pub record: Option<ArbiterRecord>,
    /// When the last renewal that was granted had been sent.
    pub renewed_at: Option<Instant>,
}

impl LeaseState {
    /// Take in an answer of the witness for `node`: whether the lease is ours,
    /// and the records that come with every answer.
    pub fn record_view(&mut self, node: &str, view: LeaseView) {
        self.held_until = match &view {
            LeaseView::Mine { until, .. } => Some(*until),
            _ => None,
        };
        let record = |sync_standby: &Option<String>, last_holder: Option<&str>| ArbiterRecord {
            sync_standby: sync_standby.clone(),
            last_holder: last_holder.map(str::to_string),
        };
        match &view {
            LeaseView::Mine { sync_standby, .. } => self.record = Some(record(sync_standby, Some(node))),
            LeaseView::Other { holder, sync_standby } => self.record = Some(record(sync_standby, Some(holder))),
            LeaseView::Free { last_holder, sync_standby } => {
                self.record = Some(record(sync_standby, last_holder.as_deref()))
            }
            LeaseView::Unreachable(_) => {}
        }
        self.last = Some(view);
    }

    /// Whether the lease is ours and still trusted at `at`.
    pub fn trusted(&self, at: Instant) -> bool {
        self.held_until.is_some_and(|until| until > at)
    }

    /// Whether a renewal is due: the lease is not trusted, or `every` has
    /// passed since the last granted renewal was sent.
    pub fn renewal_due(&self, every: Duration) -> bool {
        !self.trusted(Instant::now()) || self.renewed_at.is_none_or(|at| at.elapsed() >= every)
    }
}

/// Arbiter mode: our lease if still trusted, else who holds it; a lease of
/// ours the witness still has is renewed only while `leading`.
pub async fn arbiter(client: &LeaseClient, lease: &Mutex<LeaseState>, leading: bool) -> WitnessView {
    let lock = || lease.lock().unwrap_or_else(|p| p.into_inner());
    if lock().trusted(Instant::now()) {
        return WitnessView::LeaseHeldByMe;
    }
    let view = client.holder().await;
    let witness = match &view {
        LeaseView::Mine { sync_standby, .. } if !leading => {
            // Ours at the witness from when this node led, no longer trusted
            // here, and this node does not lead (it fenced): not renewed, so
            // it runs out and the peer can take it, and free as far as this
            // node taking it again goes (only when its peer votes for it).
            let last_holder = Some(client.node().to_string());
            let free = LeaseView::Free { last_holder, sync_standby: sync_standby.clone() };
            lock().record_view(client.node(), free);
            return WitnessView::LeaseFree;
        }
        LeaseView::Mine { .. } => {
            // Held by us at the witness but no longer trusted here: renew first.
            let renewed = client.acquire(false).await;
            let w = if matches!(renewed, LeaseView::Mine { .. }) {
                WitnessView::LeaseHeldByMe
            } else {
                WitnessView::LeaseFree
            };
            lock().record_view(client.node(), renewed);
            return w;
        }
        LeaseView::Other { .. } => WitnessView::LeaseHeldByPeer,
        LeaseView::Free { .. } => WitnessView::LeaseFree,
        LeaseView::Unreachable(_) => WitnessView::ArbiterUnreachable,
    };
    lock().record_view(client.node(), view);
    witness
}

/// Run the custom health script: exit 0 within `timeout` is healthy.
pub async fn script(path: &Path, timeout: Duration) -> Result<(), String> {
    Tool::new(path).timeout(timeout).run().await.map(|_| ()).map_err(|e| e.to_string())
}
