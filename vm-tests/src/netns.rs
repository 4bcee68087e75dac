//! The network-namespace lab: two nodes, a client and a gateway/witness host
//! on one bridge, all inside namespaces this lab creates (`gk-*`).
//!
//! The lab runs the product, not a copy of it: in each node namespace it
//! starts only `gemin_k8s agent`, which starts PostgreSQL and Kine itself.
//! The lab's job is namespaces, addresses, faults and teardown.
//!
//! ```text
//!            gk-sw (bridge br0)
//!   ┌───────────┬─────┴─────┬───────────┐
//! gk-node1   gk-node2   gk-client    gk-gw
//!  agent      agent     etcdctl    gateway / witness serve
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use geminik8s::clusterfile::ClusterFile;
use geminik8s::config::WitnessMode;
use geminik8s::config::validate::{network, parse_target, same_subnet};
use serde::{Deserialize, Serialize};

pub use crate::labstate::namespaces;
use crate::labstate::{self, ip};

mod faults;

pub const SWITCH: &str = "gk-sw";
pub const CLIENT: &str = "gk-client";
pub const GATEWAY: &str = "gk-gw";
const BRIDGE: &str = "br0";
/// A host of the lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Host {
    /// Node name (`node1`), `client` or `gw`.
    pub name: String,
    pub netns: String,
    pub ip: IpAddr,
    /// The veth end inside the namespace.
    pub dev: String,
}

/// What `up` created; saved so later commands (and `down` after a crash) find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub config_dir: PathBuf,
    pub run_dir: PathBuf,
    pub agent_bin: PathBuf,
    pub cluster: String,
    pub vip: IpAddr,
    pub prefix: u8,
    pub witness: WitnessMode,
    /// The two nodes, in cluster order.
    pub nodes: Vec<Host>,
    /// Machines replaced by [`Lab::replace_box`] (dead, left as they were).
    #[serde(default)]
    pub retired: Vec<Host>,
    pub client: Host,
    pub gateway: Host,
    /// `IP:PORT` of `gemin_k8s witness serve` in `gk-gw` (arbiter mode).
    pub arbiter: Option<String>,
    /// The K3s binary the agents run (a real K3s or the lab's stand-in);
    /// `None`: K3s is off in this lab.
    #[serde(default)]
    pub k3s: Option<PathBuf>,
}

/// Options for [`Lab::up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub config_dir: PathBuf,
    pub run_dir: PathBuf,
    pub agent_bin: PathBuf,
    /// Override the cluster's witness mode (`gateway` needs no certificate;
    /// `arbiter` needs a cluster made with `init --witness arbiter`).
    pub witness: Option<WitnessMode>,
    /// Extra cloud-config for both nodes (YAML below `geminik8s:`), e.g. shorter timings.
    pub extra_block: Option<String>,
    /// Start the agents (false: only the network, for tests that start them later).
    pub start_agents: bool,
    /// Run K3s with this binary (a real K3s or `k3s-standin`); `None` leaves it off.
    pub k3s: Option<PathBuf>,
}

/// Tears a lab down when dropped (also on a panic), unless told to keep it.
#[derive(Debug)]
pub struct LabGuard {
    run_dir: PathBuf,
    keep: bool,
}

impl LabGuard {
    pub fn new(run_dir: PathBuf, keep: bool) -> LabGuard {
        LabGuard { run_dir, keep }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("the lab stays up: `gemini-lab netns down --run-dir {}` removes it", self.run_dir.display());
            return;
        }
        if let Err(e) = Lab::down(&self.run_dir) {
            eprintln!("lab teardown failed: {e:#}");
        }
    }
}

/// PIDs of every process in `netns`.
pub fn pids(netns: &str) -> Vec<i32> {
    ip(&["netns", "pids", netns]).map(|o| o.lines().filter_map(|l| l.trim().parse().ok()).collect()).unwrap_or_default()
}

pub(crate) fn kill_all(netns: &str) -> usize {
    let pids = pids(netns);
    for pid in &pids {
        // A process may exit between listing and killing.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    pids.len()
}

/// Host addresses of the subnet from the top down, skipping `taken`.
fn free_addresses(any: IpAddr, prefix: u8, taken: &[IpAddr]) -> Vec<IpAddr> {
    let IpAddr::V4(v4) = network(any, prefix) else { return Vec::new() };
    let base = u32::from(v4);
    let size = 1u32.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    (1..size.saturating_sub(1))
        .rev()
        .map(|i| IpAddr::from(std::net::Ipv4Addr::from(base + i)))
        .filter(|a| !taken.contains(a))
        .take(8)
        .collect()
}

impl Lab {
    /// The lab described by a run directory.
    pub fn load(run_dir: &Path) -> anyhow::Result<Lab> {
        labstate::load(run_dir, "gemini-lab netns up")
    }

    fn save(&self) -> anyhow::Result<()> {
        labstate::save(&self.run_dir, self)
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&Host> {
        labstate::find_node(&self.nodes, name, |n| n.name.as_str())
    }

    /// Any host by name: a node, `client` or `gw`.
    pub fn host(&self, name: &str) -> anyhow::Result<&Host> {
        match name {
            "client" => Ok(&self.client),
            "gw" => Ok(&self.gateway),
            n => self.node(n),
        }
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.run_dir.join(node)
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("agent.sock")
    }

    /// Create the namespaces, the bridge and the addresses, and start the agents.
    pub fn up(opts: &UpOptions) -> anyhow::Result<Lab> {
        let existing: Vec<String> = namespaces()?.into_iter().filter(|n| n.starts_with("gk-")).collect();
        if !existing.is_empty() {
            bail!("lab namespaces already exist ({}); run `gemini-lab netns down` first", existing.join(", "));
        }
        let cluster_path = opts.config_dir.join(geminik8s::clusterfile::FILE_NAME);
        let cluster = ClusterFile::load(&cluster_path)?;
        if cluster.nodes.len() != 2 {
            bail!("{} lists {} nodes; a lab has two", cluster_path.display(), cluster.nodes.len());
        }
        if !cluster.vip.is_ipv4() {
            bail!("the lab supports IPv4 clusters; {} is IPv6", cluster.vip);
        }
        let witness = opts.witness.unwrap_or(cluster.witness.mode);
        let mut taken: Vec<IpAddr> = cluster.nodes.iter().map(|n| n.member.ip).collect();
        taken.push(cluster.vip);
        // The gateway/witness host sits at the cluster's witness target when there is one.
        let target = cluster.witness.targets.first().and_then(|t| parse_target(t));
        let gw_ip = match target {
            Some((ip, _)) if same_subnet(ip, cluster.vip, cluster.vip_prefix) => ip,
            Some((ip, _)) => {
                bail!("the witness target {ip} is outside the cluster subnet; the lab puts it on the same bridge")
            }
            None => *free_addresses(cluster.vip, cluster.vip_prefix, &taken)
                .first()
                .context("no free address for the gateway")?,
        };
        taken.push(gw_ip);
        let client_ip = *free_addresses(cluster.vip, cluster.vip_prefix, &taken)
            .first()
            .context("no free address for the client")?;
        let arbiter = match witness {
            WitnessMode::Arbiter => {
                let port = target.and_then(|(_, p)| p).unwrap_or(7440);
                if cluster.pki.witness_cert.is_none() {
                    bail!(
                        "arbiter mode needs the witness certificate: run `gemin_k8s init --witness arbiter --witness-target {gw_ip}:{port} ...`"
                    );
                }
                Some(format!("{gw_ip}:{port}"))
            }
            _ => None,
        };
        let host = |name: &str, netns: &str, ip: IpAddr| Host {
            name: name.into(),
            netns: netns.into(),
            ip,
            dev: "eth0".into(),
        };
        let nodes: Vec<Host> =
            cluster.nodes.iter().map(|n| host(&n.member.name, &format!("gk-{}", n.member.name), n.member.ip)).collect();
        let lab = Lab {
            config_dir: opts.config_dir.canonicalize().with_context(|| format!("{}", opts.config_dir.display()))?,
            run_dir: opts.run_dir.clone(),
            agent_bin: opts.agent_bin.clone(),
            cluster: cluster.name.clone(),
            vip: cluster.vip,
            prefix: cluster.vip_prefix,
            witness,
            nodes,
            retired: Vec::new(),
            client: host("client", CLIENT, client_ip),
            gateway: host("gw", GATEWAY, gw_ip),
            arbiter,
            k3s: opts.k3s.clone(),
        };
        std::fs::create_dir_all(&lab.run_dir).with_context(|| format!("creating {}", lab.run_dir.display()))?;
        lab.save()?;
        if let Err(e) = lab.build_network() {
            let cleanup = Lab::down(&lab.run_dir);
            return Err(e.context(format!("building the lab network (cleaned up: {cleanup:?})")));
        }
        for node in &lab.nodes {
            lab.write_overlay(&node.name, &cluster, opts.extra_block.as_deref())?;
        }
        if let Some(target) = &lab.arbiter {
            lab.start_witness(target)?;
        }
        if opts.start_agents {
            for node in lab.nodes.clone() {
                lab.start_agent(&node.name)?;
            }
        }
        Ok(lab)
    }

    pub(crate) fn all_hosts(&self) -> Vec<&Host> {
        self.nodes.iter().chain([&self.client, &self.gateway]).collect()
    }

    fn build_network(&self) -> anyhow::Result<()> {
        ip(&["netns", "add", SWITCH])?;
        ip(&["-n", SWITCH, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", SWITCH, "link", "set", BRIDGE, "up"])?;
        ip(&["-n", SWITCH, "link", "set", "lo", "up"])?;
        for h in self.all_hosts() {
            self.plug(h)?;
        }
        Ok(())
    }

    /// A namespace for `h` with its veth on the bridge, its address, up.
    fn plug(&self, h: &Host) -> anyhow::Result<()> {
        let port = Self::port(h);
        let cidr = format!("{}/{}", h.ip, self.prefix);
        ip(&["netns", "add", &h.netns])?;
        ip(&["-n", SWITCH, "link", "add", &port, "type", "veth", "peer", "name", &h.dev, "netns", &h.netns])?;
        ip(&["-n", SWITCH, "link", "set", &port, "master", BRIDGE])?;
        ip(&["-n", SWITCH, "link", "set", &port, "up"])?;
        ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &h.netns, "addr", "add", &cidr, "dev", &h.dev])?;
        ip(&["-n", &h.netns, "link", "set", &h.dev, "up"])?;
        Ok(())
    }

    /// A new, blank machine takes `node`'s place at `ip`, as when a box
    /// that died for good is swapped: the dead one stays as it was
    /// (powered off by [`Lab::kill`], its namespace and its files: those
    /// move aside to `<node>.old-box`), the new one gets its own namespace
    /// on the bridge and an empty node directory with the lab's overlay.
    /// Its agent is for the test to start (an unconfigured machine, say).
    pub fn replace_box(&mut self, node: &str, ip: IpAddr) -> anyhow::Result<()> {
        if self.powered(node) {
            bail!("{node} is powered; `kill` it first (a replaced machine is dead)");
        }
        let i = self.nodes.iter().position(|h| h.name == node).with_context(|| format!("no node {node}"))?;
        let old = self.nodes[i].clone();
        let n = self.nodes.iter().chain(&self.retired).filter(|h| h.name == node).count();
        let new = Host { name: node.into(), netns: format!("{}-{n}", old.netns), ip, dev: old.dev.clone() };
        self.plug(&new)?;
        let dir = self.node_dir(node);
        let aside = self.run_dir.join(format!("{node}.old-box{}", if n > 1 { format!("-{n}") } else { String::new() }));
        std::fs::rename(&dir, &aside).with_context(|| format!("moving {} aside", dir.display()))?;
        for sub in ["state", "logs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::copy(aside.join("lab.yaml"), dir.join("lab.yaml")).context("the lab's overlay for the new box")?;
        self.retired.push(old);
        self.nodes[i] = new;
        self.save()
    }

    /// The lab's own cloud-config for a node, merged after the node's file:
    /// a data directory per node (the namespaces share the filesystem) and
    /// the witness the lab provides.
    fn write_overlay(&self, node: &str, cluster: &ClusterFile, extra: Option<&str>) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.node_dir(node);
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        // PostgreSQL runs as `postgres` and must reach its data directory in here.
        for d in [&self.run_dir, &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        // Kine listens on all addresses so the client reaches the leader's Kine through the VIP.
        let mut text = format!(
            "#cloud-config\n# Written by gemini-lab: per-node paths and the lab's witness.\ngeminik8s:\n  postgres:\n    data_dir: {}\n  kine:\n    listen: 0.0.0.0:2379\n  k3s:\n    enabled: {}\n    data_dir: {}\n    config_dir: {}\n",
            dir.join("pgdata").display(),
            self.k3s.is_some(),
            dir.join("k3s").display(),
            dir.join("etc-rancher-k3s").display()
        );
        let mode = serde_json::to_value(self.witness)?.as_str().unwrap_or("none").to_string();
        if self.witness != cluster.witness.mode || self.witness != WitnessMode::None {
            let target = match self.witness {
                WitnessMode::None => String::new(),
                WitnessMode::Gateway => self.gateway.ip.to_string(),
                WitnessMode::Arbiter => self.arbiter.clone().unwrap_or_default(),
            };
            let targets = if target.is_empty() { "[]".to_string() } else { format!("[\"{target}\"]") };
            text.push_str(&format!("  cluster:\n    witness:\n      mode: {mode}\n      targets: {targets}\n"));
        }
        if let Some(extra) = extra {
            // `{node_dir}` in the extra block is this node's directory (for per-node paths).
            let extra = extra.replace("{node_dir}", &dir.display().to_string());
            for line in extra.lines() {
                text.push_str("  ");
                text.push_str(line);
                text.push('\n');
            }
        }
        std::fs::write(dir.join("lab.yaml"), text)?;
        Ok(())
    }

    fn spawn_in(&self, netns: &str, log: &Path, argv: &[String]) -> anyhow::Result<u32> {
        self.spawn_with(netns, log, argv, &[])
    }

    fn spawn_with(&self, netns: &str, log: &Path, argv: &[String], env: &[(&str, &Path)]) -> anyhow::Result<u32> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err_file = log_file.try_clone()?;
        // setsid: the process leaves the lab command's session, so it keeps
        // running after `up` returns and a terminal's Ctrl-C does not reach it.
        let mut child = Command::new("setsid")
            .envs(env.iter().copied())
            .args(["ip", "netns", "exec", netns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .with_context(|| format!("starting {argv:?} in {netns}"))?;
        let pid = child.id();
        // Reap it when it dies (killed by a fault), so no zombie is left in a long run.
        std::thread::spawn(move || child.wait());
        Ok(pid)
    }

    fn start_witness(&self, target: &str) -> anyhow::Result<()> {
        let pki = self.config_dir.join("pki");
        let state = self.run_dir.join("witness");
        std::fs::create_dir_all(&state)?;
        let argv: Vec<String> = vec![
            self.agent_bin.display().to_string(),
            "witness".into(),
            "serve".into(),
            "--listen".into(),
            target.into(),
            "--pki-dir".into(),
            pki.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        self.spawn_in(GATEWAY, &self.run_dir.join("witness.log"), &argv)?;
        Ok(())
    }

    /// Start the agent of `node` as its service manager would; see
    /// [`Lab::start`] for powering a node on.
    pub fn start_agent(&self, node: &str) -> anyhow::Result<u32> {
        let files = [self.config_dir.join(format!("{node}.yaml")), self.node_dir(node).join("lab.yaml")];
        self.start_agent_with(node, &files)
    }

    /// Start the agent of `node` with these cloud-config files (merged in
    /// order) instead of its node file and the lab's: an unconfigured node
    /// waiting for enrolment, for example.
    pub fn start_agent_with(&self, node: &str, cloud_configs: &[PathBuf]) -> anyhow::Result<u32> {
        let host = self.node(node)?;
        let dir = self.node_dir(node);
        let mut argv: Vec<String> = vec![self.agent_bin.display().to_string(), "agent".into()];
        for file in cloud_configs {
            argv.push("--cloud-config".into());
            argv.push(file.display().to_string());
        }
        argv.extend([
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--socket".into(),
            self.socket(node).display().to_string(),
            "--log-dir".into(),
            dir.join("logs").display().to_string(),
            // Per lab run: a socket lock left by a killed server of an earlier
            // lab must not name a live process of this one.
            "--runtime-dir".into(),
            dir.join("runtime").display().to_string(),
            "--log-level".into(),
            "debug".into(),
            // Timestamped lines (stderr has none); panics still land in the
            // same file through the redirection below.
            "--log-file".into(),
            dir.join("agent.log").display().to_string(),
        ]);
        let env: Vec<(&str, &Path)> = self.k3s.iter().map(|k3s| (geminik8s::k3s::BINARY_ENV, k3s.as_path())).collect();
        self.spawn_with(&host.netns, &dir.join("agent.log"), &argv, &env)
    }

    /// The kubeconfig the agent of `node` wrote for the VIP (when K3s runs).
    pub fn kubeconfig(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("etc-rancher-k3s").join(geminik8s::k3s::VIP_KUBECONFIG)
    }

    /// Run a command in a host's namespace and return its output.
    pub fn exec(&self, host: &str, argv: &[&str]) -> anyhow::Result<std::process::Output> {
        let h = self.host(host)?;
        Command::new("ip")
            .args(["netns", "exec", &h.netns])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", h.netns))
    }

    /// Which nodes answer for the VIP right now: powered on (see
    /// [`Lab::powered`]) with the VIP on their interface. A powered-off node
    /// keeps the address in its namespace, as a dead machine's RAM would, but
    /// answers nothing.
    pub fn vip_holders(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| self.powered(&n.name) && self.has_vip(n)).map(|n| n.name.clone()).collect()
    }

    /// Whether the VIP is configured on `host`'s interface, powered or not.
    pub(crate) fn has_vip(&self, host: &Host) -> bool {
        ip(&["-n", &host.netns, "-o", "addr", "show", "dev", &host.dev])
            .map(|out| out.contains(&format!(" {}/", self.vip)))
            .unwrap_or(false)
    }

    /// The MAC address the client's neighbour table has for the VIP.
    pub fn client_vip_mac(&self) -> Option<String> {
        let out = ip(&["-n", CLIENT, "neigh", "show", &self.vip.to_string()]).ok()?;
        let mut words = out.split_whitespace();
        words.by_ref().find(|w| *w == "lladdr")?;
        words.next().map(str::to_string)
    }

    /// MAC address of a host's interface.
    pub fn mac(&self, host: &str) -> anyhow::Result<String> {
        let h = self.host(host)?;
        let out = ip(&["-n", &h.netns, "-o", "link", "show", "dev", &h.dev])?;
        let mut words = out.split_whitespace();
        words.by_ref().find(|w| *w == "link/ether").context("no MAC address")?;
        words.next().map(str::to_string).context("no MAC address")
    }

    /// Remove everything a lab created: processes in its namespaces, then the
    /// namespaces. Works from the state file, and without one (after a crash)
    /// from the `gk-` prefix. Idempotent.
    pub fn down(run_dir: &Path) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        for ns in namespaces()?.into_iter().filter(|n| n.starts_with("gk-")) {
            kill_all(&ns);
            ip(&["netns", "del", &ns]).with_context(|| format!("deleting {ns}"))?;
            removed.push(ns);
        }
        let state = labstate::state_path(run_dir);
        if state.exists() {
            std::fs::remove_file(&state).with_context(|| format!("removing {}", state.display()))?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addresses_come_from_the_top_and_skip_taken() {
        let taken: Vec<IpAddr> = ["10.77.0.254", "10.77.0.10"].iter().map(|a| a.parse().unwrap()).collect();
        let free = free_addresses("10.77.0.10".parse().unwrap(), 24, &taken);
        assert_eq!(free[0], "10.77.0.253".parse::<IpAddr>().unwrap());
        assert!(!free.contains(&"10.77.0.255".parse().unwrap()), "broadcast is not a host address");
    }
}
