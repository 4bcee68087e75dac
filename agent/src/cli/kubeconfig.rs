//! `gemin_k8s kubeconfig`: K3s's admin kubeconfig for the VIP, fetched from
//! an agent over its authenticated API instead of copied off a node.
//!
//! The agent writes it once K3s serves (`k3s.config_dir/geminik8s.yaml`,
//! server `https://VIP:6443`). Given the cluster file, the nodes are asked
//! in turn and the first answer wins: both nodes' K3s share their
//! certificate authorities through the datastore. On a node, without a
//! cluster file, the local agent is asked over its socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;

use super::GlobalArgs;
use super::status::{DEFAULT_SOCKET, agent_clients};
use crate::peer::client::AgentClient;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name: reads ./NAME/cluster.yaml (or give --config).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Write the kubeconfig to this file (mode 0600) instead of standard output.
    #[arg(long = "write", short = 'w', value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// The local agent's socket (on a node, without a cluster file).
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Time limit per node.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

pub async fn run(args: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let clients = agent_clients(args.cluster.as_deref(), None, &args.socket, args.timeout, global)?;
    let text = first_answer(&clients).await?;
    match &args.write {
        Some(path) => {
            crate::k3s::write_kubeconfig(path, &text)?;
            eprintln!("wrote {} (server: the VIP)", path.display());
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The first node's kubeconfig, or every node's reason for having none.
async fn first_answer(clients: &[AgentClient]) -> anyhow::Result<String> {
    let mut reasons = Vec::new();
    for client in clients {
        match client.kubeconfig().await {
            Ok(text) => return Ok(text),
            Err(e) => reasons.push(format!("{e:#}")),
        }
    }
    bail!("no node gave a kubeconfig:\n  {}", reasons.join("\n  "))
}
