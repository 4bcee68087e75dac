//! `gemini-lab`: the geminik8s labs, by hand or from tests.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use geminik8s::config::WitnessMode;
use geminik8s_vm_tests::netns::{Lab, UpOptions};

#[derive(Debug, Parser)]
#[command(name = "gemini-lab", version, about = "geminik8s labs: two nodes in network namespaces")]
struct Cli {
    #[command(subcommand)]
    lab: LabKind,
}

#[derive(Debug, Subcommand)]
enum LabKind {
    /// The network-namespace lab (gk-node1, gk-node2, gk-client, gk-gw on a bridge in gk-sw).
    #[command(subcommand)]
    Netns(Netns),
}

#[derive(Debug, Subcommand)]
enum Netns {
    /// Create the namespaces and addresses from a cluster made by `gemin_k8s init`, and start the agents.
    Up {
        /// The cluster directory (cluster.yaml, node files, pki/).
        #[arg(long, value_name = "DIR")]
        config_dir: PathBuf,
        /// Witness mode for the lab (default: the cluster's).
        #[arg(long, value_enum)]
        witness: Option<WitnessMode>,
        /// The gemin_k8s binary the nodes run.
        #[arg(long, value_name = "FILE", default_value = "target/debug/gemin_k8s")]
        agent_bin: PathBuf,
        /// Create the network only.
        #[arg(long)]
        no_agents: bool,
        #[command(flatten)]
        run: RunDir,
    },
    /// Show hosts, processes, VIP holders.
    Status(RunDir),
    /// Remove everything the lab created (also after a crash).
    Down(RunDir),
    /// kill -9 every process of a node.
    Kill {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// Start a node's agent again.
    Start {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// Drop traffic between two hosts (nodes, `client` or `gw`).
    Partition {
        a: String,
        b: String,
        /// Only from A to B.
        #[arg(long)]
        one_way: bool,
        #[command(flatten)]
        run: RunDir,
    },
    /// Cut a host off from everyone.
    Isolate {
        host: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// Undo partitions and isolation.
    Heal(RunDir),
    /// Run a command in a host's namespace.
    Exec {
        host: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
        #[command(flatten)]
        run: RunDir,
    },
}

#[derive(Debug, clap::Args)]
struct RunDir {
    /// Where the lab keeps its state and logs.
    #[arg(long, default_value = "run/netns", value_name = "DIR")]
    run_dir: PathBuf,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    if p.is_absolute() { Ok(p) } else { Ok(std::env::current_dir()?.join(p)) }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let LabKind::Netns(cmd) = cli.lab;
    match cmd {
        Netns::Up { config_dir, witness, agent_bin, no_agents, run } => {
            let agent_bin = absolute(agent_bin)?;
            if !agent_bin.is_file() {
                anyhow::bail!(
                    "{} does not exist: build it with `cargo build -p geminik8s-agent` or pass --agent-bin",
                    agent_bin.display()
                );
            }
            let opts = UpOptions {
                config_dir,
                run_dir: absolute(run.run_dir)?,
                agent_bin,
                witness,
                extra_block: None,
                start_agents: !no_agents,
            };
            let lab = Lab::up(&opts)?;
            println!("lab up: cluster {} VIP {}/{} witness {:?}", lab.cluster, lab.vip, lab.prefix, lab.witness);
            for h in lab.nodes.iter().chain([&lab.client, &lab.gateway]) {
                println!("  {:<8} {:<10} {}", h.name, h.netns, h.ip);
            }
            println!("logs and state: {}", lab.run_dir.display());
        }
        Netns::Status(run) => {
            let lab = Lab::load(&run.run_dir)?;
            for h in lab.nodes.iter().chain([&lab.client, &lab.gateway]) {
                let pids = geminik8s_vm_tests::netns::pids(&h.netns);
                println!("{:<8} {:<10} {:<15} {} processes", h.name, h.netns, h.ip.to_string(), pids.len());
            }
            let holders = lab.vip_holders();
            println!(
                "VIP {} held by: {}",
                lab.vip,
                if holders.is_empty() { "nobody".into() } else { holders.join(", ") }
            );
        }
        Netns::Down(run) => {
            let removed = Lab::down(&run.run_dir)?;
            println!(
                "removed {} namespaces{}",
                removed.len(),
                if removed.is_empty() { String::new() } else { format!(": {}", removed.join(", ")) }
            );
        }
        Netns::Kill { node, run } => {
            let n = Lab::load(&run.run_dir)?.kill(&node)?;
            println!("killed {n} processes of {node}");
        }
        Netns::Start { node, run } => {
            let pid = Lab::load(&run.run_dir)?.start(&node)?;
            println!("started the agent of {node} (pid {pid})");
        }
        Netns::Partition { a, b, one_way, run } => Lab::load(&run.run_dir)?.partition(&a, &b, one_way)?,
        Netns::Isolate { host, run } => Lab::load(&run.run_dir)?.isolate(&host)?,
        Netns::Heal(run) => Lab::load(&run.run_dir)?.heal()?,
        Netns::Exec { host, command, run } => {
            let lab = Lab::load(&run.run_dir)?;
            let argv: Vec<&str> = command.iter().map(String::as_str).collect();
            let out = lab.exec(&host, &argv)?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            return Ok(ExitCode::from(u8::try_from(out.status.code().unwrap_or(1)).unwrap_or(1)));
        }
    }
    Ok(ExitCode::SUCCESS)
}
