//! The node's status as `status` and the peer API show it.

use crate::cli::version::VERSION;
use crate::election::{Component, HandOver, WitnessView};
use crate::peer::{
    ABSENT, ComponentHealth, DISABLED, DatastoreView, FAILED, HandOverView, NodeStatus, OK, PeerView, VipView,
    WitnessView as WitnessStatus,
};

use super::Driver;

impl Driver {
    pub(super) fn status(&self) -> NodeStatus {
        let cfg = &self.cfg;
        let m = &self.machine;
        let election = m.status();
        let mut components = Vec::new();
        let absent =
            |name: &str, what: &str| ComponentHealth { name: name.into(), state: ABSENT.into(), detail: what.into() };
        match &self.subsystems.database {
            Some(_) => {
                let ok =
                    self.health.iter().find(|(c, _)| *c == Component::Postgres).map(|(_, ok)| *ok).unwrap_or(false);
                components.push(ComponentHealth {
                    name: "postgres".into(),
                    state: if ok { OK } else { FAILED }.into(),
                    detail: String::new(),
                });
            }
            None => components.push(absent("postgres", "the datastore is not managed by this agent yet")),
        }
        match &self.kine {
            Some(k) => components.push({
                let healthy = k.healthy.load(std::sync::atomic::Ordering::Relaxed);
                ComponentHealth {
                    name: "kine".into(),
                    state: if healthy { OK } else { FAILED }.into(),
                    detail: if healthy {
                        String::new()
                    } else {
                        format!("{} does not answer", k.settings.etcd_endpoint())
                    },
                }
            }),
            None => components.push(absent("kine", "Kine is not run by this agent")),
        }
        if self.subsystems.vip.is_none() {
            components.push(absent("vip", "the VIP is not managed by this agent yet"));
        }
        match (&self.k3s, cfg.k3s.enabled) {
            (_, false) => components.push(ComponentHealth {
                name: "k3s".into(),
                state: DISABLED.into(),
                detail: "k3s.enabled is false".into(),
            }),
            (Some(k), true) => components.push({
                let ready = k.health.lock().unwrap_or_else(|p| p.into_inner()).ready;
                ComponentHealth {
                    name: "k3s".into(),
                    state: match ready {
                        Some(true) => OK,
                        Some(false) => FAILED,
                        None => "starting",
                    }
                    .into(),
                    detail: if ready == Some(false) { "/readyz does not answer ok".into() } else { String::new() },
                }
            }),
            (None, true) => components.push(absent("k3s", "no K3s binary (set GEMINIK8S_K3S_BINARY or install it)")),
        }
        if let Some((_, ok)) = self.health.iter().find(|(c, _)| *c == Component::Script) {
            components.push(ComponentHealth {
                name: "script".into(),
                state: if *ok { OK } else { FAILED }.into(),
                detail: String::new(),
            });
        }
        let peer_reachable = self.peer_last_heard.is_some_and(|t| t.elapsed() < cfg.health.interval * 2);
        let mut degraded = Vec::new();
        if !peer_reachable {
            degraded.push(format!("peer {} is unreachable", cfg.peer.name));
        }
        for c in components.iter().filter(|c| !c.is_ok()) {
            degraded.push(format!("{}: {}", c.name, if c.detail.is_empty() { &c.state } else { &c.detail }));
        }
        if m.state() == crate::election::State::Fenced {
            degraded.push("fenced: this node released the VIP and does not accept writes".into());
        }
        if let Some(why) = m.takeover_blocked() {
            degraded.push(format!("not taking over: {why}"));
        }
        if let Some(r) = &self.replication
            && r.durability != "synchronous"
            && r.durability != "standby"
            && election.leading
        {
            degraded.push(format!("replication: {}", r.durability));
        }
        let witness_state = match m.witness() {
            WitnessView::NoOpinion => "n/a",
            WitnessView::GatewayReachable => "reachable",
            WitnessView::GatewayUnreachable => "unreachable",
            WitnessView::LeaseHeldByMe => "lease held here",
            WitnessView::LeaseHeldByPeer => "lease held by peer",
            WitnessView::LeaseFree => "lease free",
            WitnessView::ArbiterUnreachable => "unreachable",
        };
        let mode = serde_json::to_value(cfg.cluster.witness.mode)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let role = if election.leading {
            "leader"
        } else if m.state() == crate::election::State::Fenced {
            "fenced"
        } else if m.following() {
            "follower"
        } else {
            "unknown"
        };
        NodeStatus {
            cluster: cfg.cluster.name.clone(),
            node: cfg.node.name.clone(),
            address: cfg.node.ip.to_string(),
            agent_version: VERSION.to_string(),
            role: role.into(),
            state: m.state().to_string(),
            epoch: m.meta().map(|h| h.epoch).unwrap_or(0),
            peer: PeerView {
                name: cfg.peer.name.clone(),
                address: cfg.peer.ip.to_string(),
                reachable: peer_reachable,
                role: None,
                epoch: None,
                last_heard_ms: self.peer_last_heard.map(|t| t.elapsed().as_millis() as u64),
                rtt_ms: m.last_rtt().map(|d| d.as_secs_f64() * 1000.0),
            },
            witness: WitnessStatus { mode, state: witness_state.into() },
            vip: VipView { address: cfg.cluster.vip.to_string(), held_here: m.holds_vip() },
            replication: self.replication.clone(),
            takeover: crate::peer::TakeoverView {
                sync_standby: election.sync_standby.clone(),
                eligible: election.eligible,
            },
            last_failover: self.last_failover.clone(),
            // Filled from what the archiver publishes, when the API serves it.
            archive: None,
            boot: None,
            components,
            degraded,
            datastore: Some(self.datastore_view()),
            handover: m.handover().map(|h| match h {
                HandOver::Stopping => HandOverView { state: "stopping".into(), checkpoint: None },
                HandOver::Clean(c) => {
                    HandOverView { state: "clean".into(), checkpoint: Some(format!("{}/{}", c.timeline, c.lsn)) }
                }
                HandOver::Unclean => HandOverView { state: "withdrawn".into(), checkpoint: None },
            }),
            served_at_unix_ms: 0,
        }
    }

    /// Position (as the machine last saw it) and disk space of the datastore.
    fn datastore_view(&self) -> DatastoreView {
        let meta = self.machine.meta();
        let disk = nix::sys::statvfs::statvfs(&self.cfg.postgres.data_dir).ok();
        let bytes = |blocks: u64, s: &nix::sys::statvfs::Statvfs| blocks.saturating_mul(s.fragment_size());
        DatastoreView {
            timeline: meta.and_then(|m| m.timeline),
            lsn: meta.and_then(|m| m.lsn).map(|l| l.to_string()),
            disk_free_bytes: disk.as_ref().map(|s| bytes(s.blocks_available(), s)),
            disk_total_bytes: disk.as_ref().map(|s| bytes(s.blocks(), s)),
        }
    }
}
