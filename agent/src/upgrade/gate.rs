//! The health gate of a new boot: a slot on trial is blessed only when the
//! node is a useful cluster member again, not merely when the agent runs.
//!
//! [`unmet`] judges one answer of the local agent's status; the `upgrade
//! gate` command (run by `geminik8s-boot-good.service` before
//! `boot-complete.target`) asks until it passes or the trial's deadline
//! runs out, and then keeps the reasons in [`FAILED_GATE_FILE`] and fails,
//! which reboots the node: the boot loader passes over the slot whose
//! tries are used up and starts the one that ran before.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::peer::NodeStatus;

/// Where a node keeps its upgrade state (on the persistent partition).
pub const STATE_DIR: &str = "/var/lib/geminik8s/upgrade";
/// The trial of the staged slot, written by `upgrade stage`, read by the
/// gate after the reboot (in [`STATE_DIR`]).
pub const TRIAL_FILE: &str = "trial.json";
/// The reasons the last gate failed, kept for `status` and the operator
/// (in [`STATE_DIR`]).
pub const FAILED_GATE_FILE: &str = "last-failed-gate.json";

/// A staged slot on trial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The slot staged (the one the gate judges).
    pub slot: String,
    /// The version written into it.
    pub version: String,
    /// The version the node ran before.
    pub from_version: String,
    /// How long the new boot has to pass the gate, in seconds.
    pub deadline_secs: u64,
}

/// A gate that did not pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedGate {
    /// When the deadline ran out (RFC 3339).
    pub at: String,
    pub slot: String,
    pub version: String,
    /// What was still unmet at the deadline.
    pub reasons: Vec<String>,
}

impl FailedGate {
    /// The last failed gate kept on this node, if any.
    pub fn read(path: &Path) -> anyhow::Result<Option<FailedGate>> {
        read_json(path)
    }
}

impl Trial {
    pub fn read(path: &Path) -> anyhow::Result<Option<Trial>> {
        read_json(path)
    }
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    use anyhow::Context;
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// What keeps this node from being a useful cluster member, from its
/// agent's status: empty when the gate passes.
///
/// Every component (PostgreSQL, Kine, K3s's `/readyz`, the VIP) must be
/// healthy, the peer must answer and the witness be reachable. A leader
/// must hold the VIP with its peer streaming synchronously (or async by
/// configuration); a follower must stream and have been told by the leader
/// that it is the synchronous standby, which is what lets it take over.
pub fn unmet(s: &NodeStatus) -> Vec<String> {
    let mut out = Vec::new();
    for c in s.components.iter().filter(|c| !c.is_ok()) {
        let detail = if c.detail.is_empty() { String::new() } else { format!(": {}", c.detail) };
        out.push(format!("{} is {}{detail}", c.name, c.state));
    }
    if !s.peer.reachable {
        out.push(format!("the peer {} does not answer", s.peer.name));
    }
    if s.witness.state == "unreachable" {
        out.push(format!("the witness ({}) is unreachable", s.witness.mode));
    }
    let r = s.replication.clone().unwrap_or_default();
    match s.role.as_str() {
        "leader" => {
            if !s.vip.held_here {
                out.push(format!("the leader does not hold the VIP {}", s.vip.address));
            }
            if !r.streaming {
                out.push(format!("the peer {} does not stream from this leader", s.peer.name));
            } else if r.sync_state.as_deref() != Some("sync") && r.durability != "async" {
                out.push(format!(
                    "the peer {} streams but is not synchronous (sync_state {}, {})",
                    s.peer.name,
                    r.sync_state.as_deref().unwrap_or("none"),
                    r.durability
                ));
            }
        }
        "follower" => {
            if !r.streaming {
                out.push(format!("this follower does not stream from {}", s.peer.name));
            } else if !s.takeover.eligible {
                out.push(format!(
                    "the leader {} has not confirmed this follower as its synchronous standby",
                    s.peer.name
                ));
            }
        }
        other => out.push(format!("the node is {other} ({}), neither leader nor follower", s.state)),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{ComponentHealth, PeerView, ReplicationView, TakeoverView, VipView, WitnessView};

    fn node(role: &str) -> NodeStatus {
        NodeStatus {
            cluster: "c".into(),
            node: "node1".into(),
            address: "10.0.0.1".into(),
            agent_version: "0".into(),
            role: role.into(),
            state: "steady".into(),
            epoch: 3,
            peer: PeerView { name: "node2".into(), address: "10.0.0.2".into(), reachable: true, ..Default::default() },
            witness: WitnessView { mode: "arbiter".into(), state: "reachable".into() },
            vip: VipView { address: "10.0.0.10".into(), held_here: role == "leader" },
            replication: Some(ReplicationView {
                durability: if role == "leader" { "synchronous".into() } else { "standby".into() },
                streaming: true,
                sync_state: (role == "leader").then(|| "sync".into()),
                ..Default::default()
            }),
            takeover: TakeoverView { sync_standby: None, eligible: role == "follower" },
            last_failover: None,
            components: ["postgresql", "kine", "k3s"]
                .iter()
                .map(|n| ComponentHealth { name: n.to_string(), state: "ok".into(), detail: String::new() })
                .collect(),
            degraded: vec![],
            datastore: None,
            handover: None,
            served_at_unix_ms: 0,
            archive: None,
            boot: None,
        }
    }

    #[test]
    fn a_healthy_leader_and_follower_pass() {
        assert_eq!(unmet(&node("leader")), Vec::<String>::new());
        assert_eq!(unmet(&node("follower")), Vec::<String>::new());
    }

    #[test]
    fn each_unmet_condition_is_named() {
        let mut f = node("follower");
        f.takeover.eligible = false;
        f.components[2] = ComponentHealth { name: "k3s".into(), state: "failed".into(), detail: "/readyz 500".into() };
        let why = unmet(&f);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("k3s is failed: /readyz 500"), "{why:?}");
        assert!(why[1].contains("synchronous standby"), "{why:?}");

        let mut l = node("leader");
        l.vip.held_here = false;
        l.replication.as_mut().unwrap().sync_state = Some("async".into());
        l.witness.state = "unreachable".into();
        let why = unmet(&l);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why.iter().any(|w| w.contains("VIP 10.0.0.10")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("not synchronous (sync_state async")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("witness (arbiter)")), "{why:?}");

        let mut async_leader = node("leader");
        let r = async_leader.replication.as_mut().unwrap();
        (r.sync_state, r.durability) = (Some("async".into()), "async".into());
        assert!(unmet(&async_leader).is_empty(), "async by configuration passes");

        let mut alone = node("candidate");
        alone.peer.reachable = false;
        let why = unmet(&alone);
        assert!(why.iter().any(|w| w.contains("peer node2 does not answer")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("neither leader nor follower")), "{why:?}");
    }
}
