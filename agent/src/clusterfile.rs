//! `cluster.yaml`: the operator's record of a cluster, written by `init`
//! next to the node cloud-configs and read by the operator commands.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::yaml;
use crate::config::{Member, WitnessMode};

pub const FILE_NAME: &str = "cluster.yaml";
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub schema_version: u32,
    pub name: String,
    pub vip: IpAddr,
    pub vip_prefix: u8,
    pub interface: Option<String>,
    pub bootstrap_leader: String,
    pub witness: WitnessSummary,
    pub nodes: Vec<NodeEntry>,
    /// Bearer token for operator calls to the agents.
    pub api_token: String,
    pub pki: PkiPaths,
    pub created: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSummary {
    pub mode: WitnessMode,
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    #[serde(flatten)]
    pub member: Member,
    /// The node's cloud-config, relative to the cluster directory.
    pub cloud_config: PathBuf,
}

/// Paths relative to the cluster directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub operator_cert: PathBuf,
    pub operator_key: PathBuf,
    /// Present for the `arbiter` witness: `gemin_k8s witness serve --pki-dir` uses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_key: Option<PathBuf>,
    /// The revocation list `gemin_k8s replace-node` keeps (the certificates of replaced machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl ClusterFile {
    pub fn render(&self) -> anyhow::Result<String> {
        let value = serde_json::to_value(self).context("serialising the cluster file")?;
        Ok(format!(
            "# geminik8s cluster `{}`, written by `gemin_k8s init`.\n\
             # Keep this directory private: it holds the API token and the CA key.\n{}",
            self.name,
            yaml::to_yaml(&value)
        ))
    }

    /// The operator's TLS material and token, to call the agents.
    pub fn operator_tls(&self, dir: &Path) -> anyhow::Result<crate::peer::tls::TlsMaterial> {
        let read = |p: &Path| {
            let path = dir.join(p);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(crate::peer::tls::TlsMaterial::from_pem(
            &read(&self.pki.ca_cert)?,
            &read(&self.pki.operator_cert)?,
            &read(&self.pki.operator_key)?,
        )?)
    }

    pub fn load(path: &Path) -> anyhow::Result<ClusterFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let node = yaml::parse(&text, 0)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid YAML: {}", path.display(), e.line, e.col, e.message))?;
        let file: ClusterFile = serde_json::from_value(node.to_json())
            .with_context(|| format!("{}: not a geminik8s cluster file", path.display()))?;
        if file.schema_version > SCHEMA_VERSION {
            bail!(
                "{}: schema version {} is newer than this gemin_k8s understands ({SCHEMA_VERSION}); upgrade gemin_k8s",
                path.display(),
                file.schema_version
            );
        }
        Ok(file)
    }
}
