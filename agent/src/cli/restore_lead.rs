//! After a restore into a node's own datastore, that node leads the cluster
//! with the restored data, and the other node copies it: one command for a
//! cluster-wide restore.
//!
//! The node's hostMeta is rewritten as a leader's at an epoch far above its
//! own ([`HostMeta::restored`]): the agents elect by epoch first, so the
//! other node, whose data is newer than the restore, loses the election,
//! follows and rejoins (`pg_rewind` onto the restored timeline, or a fresh
//! copy with its old data kept as an archive). With an arbiter witness,
//! which lets a free lease go only to the node it last granted it to (or
//! the synchronous standby), the restore takes the lease once and gives it
//! back, so that the witness names this node. Everything that can refuse is
//! asked before anything is restored.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::config::{GeminiConfig, WitnessMode};
use crate::hostmeta::{self, HostMeta};
use crate::peer::tls::TlsMaterial;
use crate::witness::{LeaseClient, LeaseView};

/// What was checked before the restore.
pub struct Lead {
    state_dir: PathBuf,
    record: HostMeta,
    witness: Option<LeaseClient>,
}

/// What [`Lead::apply`] did (or would do).
#[derive(Debug, Serialize)]
pub struct Led {
    /// The epoch this node leads at when its agent starts.
    pub epoch: u64,
    pub hostmeta: PathBuf,
    /// The witness that now names this node as the last lease holder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub witness: Option<String>,
}

impl Led {
    pub fn describe(&self, dry_run: bool) -> String {
        let witness = self.witness.as_deref().map(|w| format!(", recorded by the witness at {w}")).unwrap_or_default();
        let what = format!(
            "this node leads with the restored data when its agent starts (epoch {}{witness}); start it first: \
             the other node's agent then follows and copies the restored data (its newer data is rewound, or kept \
             as an archive)",
            self.epoch
        );
        if dry_run { format!("would make sure {what}") } else { what }
    }
}

/// Check that this node can be made to lead: its hostMeta is readable (or
/// missing: new hardware), and with an arbiter the witness answers and no
/// other node holds the lease (whose agent would still be running).
pub async fn prepare(cfg: &GeminiConfig, state_dir: &Path) -> anyhow::Result<Lead> {
    let record = match hostmeta::load(state_dir, &cfg.cluster.name) {
        Ok(Some(record)) => record,
        Ok(None) => HostMeta::fresh(
            &cfg.cluster.name,
            (&cfg.node.name, cfg.node.ip),
            (&cfg.peer.name, cfg.peer.ip),
            cfg.cluster.vip,
        ),
        Err(e) => bail!(
            "{e}. The restored node must record that it leads; move the file aside (the agent then rebuilds it) \
             and run restore again, or restore into another --data-dir"
        ),
    };
    let witness = match (cfg.cluster.witness.mode, cfg.cluster.witness.targets.first()) {
        (WitnessMode::Arbiter, Some(target)) => {
            let tls = TlsMaterial::from_config(&cfg.tls).context("loading the node's TLS certificates")?;
            let client =
                LeaseClient::new(target, &tls, &cfg.cluster.name, &cfg.node.name, cfg.cluster.witness.lease_ttl)?;
            match client.holder().await {
                LeaseView::Other { holder, .. } => bail!(
                    "the witness at {target} says {holder} holds the lease: its agent is running, or stopped less \
                     than a lease TTL ({}) ago. Stop it (systemctl stop geminik8s-agent on {holder}) and try again \
                     once the lease has run out; a restore needs the cluster down",
                    humantime::format_duration(cfg.cluster.witness.lease_ttl)
                ),
                LeaseView::Unreachable(why) => bail!(
                    "{why}. The restored node must be recorded by the witness as the last leader, or the other \
                     node would win the election and the restore be undone; bring the witness back, or restore \
                     into another --data-dir"
                ),
                LeaseView::Mine { .. } | LeaseView::Free { .. } => Some(client),
            }
        }
        _ => None,
    };
    Ok(Lead { state_dir: state_dir.to_path_buf(), record, witness })
}

impl Lead {
    /// Record that this node leads: at the witness first (a lease taken
    /// and given back), then in hostMeta. `dry_run` changes nothing.
    pub async fn apply(self, dry_run: bool) -> anyhow::Result<Led> {
        let record = self.record.restored();
        let led = Led {
            epoch: record.epoch,
            hostmeta: hostmeta::path(&self.state_dir),
            witness: self.witness.as_ref().map(|w| w.base().to_string()),
        };
        if dry_run {
            return Ok(led);
        }
        if let Some(client) = &self.witness {
            match client.acquire(true).await {
                LeaseView::Mine { .. } => {}
                other => bail!(
                    "the data is restored, but the witness did not grant this node the lease ({other:?}); until it \
                     names this node, the other node can win the election. Stop the other node's agent and run \
                     restore again"
                ),
            }
            // Expiring would do too, but the agent starting now need not wait.
            client.release().await.context("giving the lease back after recording this node")?;
        }
        std::fs::create_dir_all(&self.state_dir).with_context(|| format!("creating {}", self.state_dir.display()))?;
        hostmeta::store(&self.state_dir, &record)?;
        Ok(led)
    }
}

/// Whether restoring into `data_dir` replaces this node's datastore.
pub fn is_node_datastore(cfg: &GeminiConfig, data_dir: &Path) -> bool {
    let normal = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    normal(&cfg.postgres.data_dir) == normal(data_dir)
}
