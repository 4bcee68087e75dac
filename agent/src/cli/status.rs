//! `gemin_k8s status`: the cluster as the agents see it.
//!
//! On a node it asks the local agent over its Unix socket. With `--endpoint`
//! it asks one node over mutual TLS; otherwise, given the cluster file
//! (`--config DIR/cluster.yaml` or `--cluster NAME` for `./NAME/cluster.yaml`),
//! it asks both nodes. Exit status: 0 healthy, 1 degraded or a node
//! unreachable, so scripts can act on it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::output::render;
use super::{GlobalArgs, OutputFormat};
use crate::clusterfile::{self, ClusterFile};
use crate::peer::NodeStatus;
use crate::peer::client::AgentClient;

/// Where the agent's local status socket lives on a node.
pub const DEFAULT_SOCKET: &str = "/run/geminik8s/agent.sock";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name: reads ./NAME/cluster.yaml (or give --config).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = StatusFormat::Table)]
    pub output: StatusFormat,
    /// Keep refreshing until interrupted.
    #[arg(long, short)]
    pub watch: bool,
    /// Refresh interval for --watch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub refresh: Duration,
    /// Show peer, witness, replication and failover details.
    #[arg(long)]
    pub details: bool,
    /// Show each component's health.
    #[arg(long)]
    pub components: bool,
    /// Print only whether each node is healthy.
    #[arg(long)]
    pub health_only: bool,
    /// Ask this node (`https://IP:PORT`) instead of the local agent or both nodes.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// The local agent's socket.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Time limit per node.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Table,
    Json,
    Yaml,
}

/// One node's answer, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct NodeAnswer {
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub healthy: bool,
    pub problems: Vec<String>,
    pub nodes: Vec<NodeAnswer>,
}

/// The cluster file: `--config FILE`, else `./NAME/cluster.yaml` for `--cluster NAME`.
pub fn cluster_file(cluster: Option<&str>, global: &GlobalArgs) -> Option<PathBuf> {
    global.config.clone().or_else(|| cluster.map(|c| Path::new(c).join(clusterfile::FILE_NAME)))
}

fn from_file(path: &Path) -> anyhow::Result<(ClusterFile, crate::peer::tls::TlsMaterial)> {
    let cluster = ClusterFile::load(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tls = cluster.operator_tls(dir).context("loading the operator certificate")?;
    Ok((cluster, tls))
}

/// A client for each node of the cluster file at `path`, over mutual TLS
/// with the operator certificate and the API token; with the node names.
pub fn node_clients(path: &Path, timeout: Duration) -> anyhow::Result<(ClusterFile, Vec<(String, AgentClient)>)> {
    let (cluster, tls) = from_file(path)?;
    let clients = cluster
        .nodes
        .iter()
        .map(|n| {
            let url = format!("https://{}", n.member.api_addr());
            let client = AgentClient::https(&url, &tls, Some(cluster.api_token.clone()), timeout)?;
            Ok((n.member.name.clone(), client))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((cluster, clients))
}

/// The agents an operator command asks: the one at `endpoint` (with the
/// cluster file's certificate and token), else every node of the cluster
/// file, else the local agent's socket on a node.
pub fn agent_clients(
    cluster: Option<&str>,
    endpoint: Option<&str>,
    socket: &Path,
    timeout: Duration,
    global: &GlobalArgs,
) -> anyhow::Result<Vec<AgentClient>> {
    let file = cluster_file(cluster, global);
    if let Some(endpoint) = endpoint {
        let Some(path) = file else {
            bail!(
                "--endpoint needs the cluster file for certificates and token: add --config DIR/cluster.yaml or --cluster NAME"
            );
        };
        let (cluster, tls) = from_file(&path)?;
        return Ok(vec![AgentClient::https(endpoint, &tls, Some(cluster.api_token), timeout)?]);
    }
    if let Some(path) = file {
        return Ok(node_clients(&path, timeout)?.1.into_iter().map(|(_, c)| c).collect());
    }
    if socket.exists() {
        return Ok(vec![AgentClient::unix(socket, timeout)]);
    }
    bail!(
        "no agent to ask: {} does not exist (not on a node?); give --config DIR/cluster.yaml or --cluster NAME",
        socket.display()
    )
}

/// Ask every client and judge the cluster.
pub async fn collect(clients: &[AgentClient]) -> ClusterView {
    let answers = futures_join(clients).await;
    let mut problems = Vec::new();
    for a in &answers {
        match (&a.status, &a.error) {
            (Some(s), _) => problems.extend(s.degraded.iter().map(|d| format!("{}: {d}", s.node))),
            (None, Some(e)) => problems.push(format!("{}: unreachable: {e}", a.endpoint)),
            (None, None) => {}
        }
    }
    let statuses: Vec<&NodeStatus> = answers.iter().filter_map(|a| a.status.as_ref()).collect();
    let holders: Vec<&str> = statuses.iter().filter(|s| s.vip.held_here).map(|s| s.node.as_str()).collect();
    if holders.len() > 1 {
        problems.push(format!("more than one node holds the VIP: {}", holders.join(", ")));
    }
    if statuses.len() == answers.len() && answers.len() > 1 && holders.is_empty() {
        problems.push("no node holds the VIP".to_string());
    }
    ClusterView { healthy: problems.is_empty(), problems, nodes: answers }
}

async fn futures_join(clients: &[AgentClient]) -> Vec<NodeAnswer> {
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| {
            tokio::spawn(async move {
                let endpoint = c.describe();
                match c.status().await {
                    Ok(status) => NodeAnswer { endpoint, status: Some(status), error: None },
                    Err(e) => NodeAnswer { endpoint, status: None, error: Some(format!("{e:#}")) },
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(a) => out.push(a),
            Err(e) => out.push(NodeAnswer { endpoint: "?".into(), status: None, error: Some(e.to_string()) }),
        }
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The human rendering.
pub fn render_text(view: &ClusterView, args: &Args) -> String {
    let mut out = String::new();
    if args.health_only {
        for a in &view.nodes {
            match &a.status {
                Some(s) => {
                    let _ = writeln!(out, "{}: {}", s.node, if s.degraded.is_empty() { "healthy" } else { "degraded" });
                }
                None => {
                    let _ = writeln!(out, "{}: unreachable", a.endpoint);
                }
            }
        }
        let _ = writeln!(out, "cluster: {}", if view.healthy { "healthy" } else { "degraded" });
        return out;
    }
    if let Some(s) = view.nodes.iter().find_map(|a| a.status.as_ref()) {
        let holder = view
            .nodes
            .iter()
            .filter_map(|a| a.status.as_ref())
            .filter(|s| s.vip.held_here)
            .map(|s| s.node.clone())
            .collect::<Vec<_>>()
            .join(", ");
        let holder = if holder.is_empty() { "nobody".to_string() } else { holder };
        let _ = writeln!(out, "cluster {}  VIP {} held by {holder}", s.cluster, s.vip.address);
    }
    let mut rows = vec![
        ["NODE", "ADDRESS", "ROLE", "STATE", "EPOCH", "PEER", "WITNESS", "REPLICATION", "HEALTH"]
            .map(String::from)
            .to_vec(),
    ];
    for a in &view.nodes {
        match &a.status {
            Some(s) => {
                let peer = if s.peer.reachable { "reachable" } else { "unreachable" };
                let repl = match &s.replication {
                    Some(r) => {
                        let lag = r.lag_bytes.map(|b| format!(", lag {b} B")).unwrap_or_default();
                        format!("{}{}{lag}", r.durability, if r.streaming { ", streaming" } else { "" })
                    }
                    None => "-".into(),
                };
                let health =
                    if s.degraded.is_empty() { "ok".to_string() } else { format!("degraded ({})", s.degraded.len()) };
                rows.push(vec![
                    s.node.clone(),
                    s.address.clone(),
                    s.role.clone(),
                    s.state.clone(),
                    s.epoch.to_string(),
                    format!("{} {peer}", s.peer.name),
                    format!("{}: {}", s.witness.mode, s.witness.state),
                    repl,
                    health,
                ]);
            }
            None => rows.push(vec![
                a.endpoint.clone(),
                "-".into(),
                "?".into(),
                "unreachable".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "unreachable".into(),
            ]),
        }
    }
    out.push_str(&table(&rows));
    for a in &view.nodes {
        let Some(s) = &a.status else { continue };
        if args.details {
            let _ = writeln!(out, "\n{} (agent {}):", s.node, s.agent_version);
            let rtt = s.peer.rtt_ms.map(|r| format!(", rtt {r:.1} ms")).unwrap_or_default();
            let heard = s.peer.last_heard_ms.map(|m| format!(", heard {m} ms ago")).unwrap_or_default();
            let _ = writeln!(out, "  peer {} ({}){heard}{rtt}", s.peer.name, s.peer.address);
            let _ = writeln!(
                out,
                "  VIP {} {}",
                s.vip.address,
                if s.vip.held_here { "held here" } else { "not held here" }
            );
            if let Some(r) = &s.replication {
                let secs = r.lag_seconds.map(|x| format!(", {x:.3} s behind")).unwrap_or_default();
                let _ = writeln!(out, "  replication {}{secs}", r.durability);
            }
            if let Some(d) = &s.datastore
                && let (Some(tl), Some(lsn)) = (d.timeline, &d.lsn)
            {
                let _ = writeln!(out, "  datastore timeline {tl}, LSN {lsn}");
            }
            if let Some(a) = &s.archive {
                let who = if a.uploading { "uploading to" } else { "spooling for" };
                let oldest = a.oldest_pending_seconds.map(|x| format!(", the oldest {x} s old")).unwrap_or_default();
                let last = match (&a.last_archived, &a.last_archived_at) {
                    (Some(f), Some(at)) => format!("; last archived {f} at {at}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  WAL archive: {who} {}, {} files spooled{oldest}{last}",
                    a.destination, a.pending_files
                );
                if let Some(sch) = &a.schedule {
                    let last = match (&sch.last, &sch.last_at) {
                        (Some(id), Some(at)) => format!("last {id} at {at}"),
                        _ => "none taken here yet".into(),
                    };
                    let next = sch.next.as_deref().map(|n| format!(", next {n}")).unwrap_or_default();
                    let _ = writeln!(out, "  full backups: {last}{next}");
                }
            }
            if let Some(b) = &s.boot {
                let _ = writeln!(out, "  boot: {}", b.summary());
                for line in b.failure_lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            if let Some(h) = &s.handover {
                let at = h.checkpoint.as_deref().map(|c| format!(" (shutdown checkpoint {c})")).unwrap_or_default();
                let _ = writeln!(out, "  switchover under way: {}{at}", h.state);
            }
            match &s.last_failover {
                Some(f) => {
                    let silent = f.silent_ms.map(|m| format!("{m} ms of silence, then ")).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  last failover {} -> {} at {}: {silent}promotion {} ms, VIP {} ms",
                        f.from, f.to, f.at, f.promote_ms, f.vip_ms
                    );
                }
                None => {
                    let _ = writeln!(out, "  no failover yet");
                }
            }
        }
        if args.components {
            let _ = writeln!(out, "\n{} components:", s.node);
            for c in &s.components {
                let detail = if c.detail.is_empty() { String::new() } else { format!(" ({})", c.detail) };
                let _ = writeln!(out, "  {:<12} {}{detail}", c.name, c.state);
            }
        }
    }
    if !view.problems.is_empty() {
        let _ = writeln!(out, "\ndegraded:");
        for p in &view.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

pub async fn run(args: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let clients = agent_clients(args.cluster.as_deref(), args.endpoint.as_deref(), &args.socket, args.timeout, global)?;
    loop {
        let view = collect(&clients).await;
        let format = match args.output {
            StatusFormat::Table => OutputFormat::Text,
            StatusFormat::Json => OutputFormat::Json,
            StatusFormat::Yaml => OutputFormat::Yaml,
        };
        let text = match render(&view, format)? {
            Some(t) => t,
            None => render_text(&view, &args),
        };
        if args.watch {
            // Clear the screen and home the cursor, like watch(1).
            print!("\x1b[2J\x1b[H{text}");
            tokio::select! {
                _ = tokio::time::sleep(args.refresh) => continue,
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
        }
        print!("{text}");
        return Ok(if view.healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
}
