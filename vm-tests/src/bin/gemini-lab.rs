//! `gemini-lab`: the geminik8s labs, by hand or from tests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use clap::{Parser, Subcommand};
use geminik8s::config::WitnessMode;
use geminik8s_vm_tests::netns::{Lab, UpOptions};

#[derive(Debug, Parser)]
#[command(name = "gemini-lab", version, about = "geminik8s labs: two nodes in network namespaces or QEMU VMs")]
struct Cli {
    #[command(subcommand)]
    lab: LabKind,
}

#[derive(Debug, Subcommand)]
enum LabKind {
    /// The network-namespace lab (gk-node1, gk-node2, gk-client, gk-gw on a bridge in gk-sw).
    #[command(subcommand)]
    Netns(Netns),
    /// The QEMU lab: two VMs booting the default image (gq-sw bridge, gq-client namespace).
    #[command(subcommand)]
    Qemu(Qemu),
}

#[derive(Debug, Subcommand)]
enum Qemu {
    /// Build the image (cached), boot both nodes and wait for the cluster to form.
    Up {
        /// The cluster directory; `gemin_k8s init` makes one with the lab's addresses when it has no cluster.yaml.
        #[arg(long, value_name = "DIR", default_value = "lab-cluster")]
        config_dir: PathBuf,
        /// Boot this qcow2 or raw image instead of building the default one.
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// Where the default image is built and cached.
        #[arg(long, value_name = "DIR", default_value = "target/image-boot")]
        image_dir: PathBuf,
        /// The host's gemin_k8s (init, status). A built image carries the workspace's
        /// (GEMIN_IMAGE_TEST_AGENT overrides).
        #[arg(long, value_name = "FILE", default_value = "target/debug/gemin_k8s")]
        agent_bin: PathBuf,
        /// Memory per VM.
        #[arg(long, value_name = "MIB", default_value_t = 2048)]
        memory: u32,
        /// vCPUs per VM.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// How long each VM may take to boot, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        boot_timeout: u64,
        #[command(flatten)]
        run: QemuRunDir,
    },
    /// QEMU processes and what each agent says; the VIP.
    Status(QemuRunDir),
    /// Kill the VMs and remove the namespaces, taps, bridge and disks (also after a crash).
    Down(QemuRunDir),
    /// SIGKILL a node's QEMU: the node is lost without warning.
    Kill {
        node: String,
        #[command(flatten)]
        run: QemuRunDir,
    },
    /// Boot a node again with its disk and UEFI variables.
    Start {
        node: String,
        /// Return once QEMU runs instead of waiting for the boot report.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        run: QemuRunDir,
    },
    /// Press a node's power button (ACPI shutdown).
    Powerdown {
        node: String,
        #[command(flatten)]
        run: QemuRunDir,
    },
    /// Cut node1 <-> node2; the client still reaches both.
    Partition(QemuRunDir),
    /// Undo `partition`.
    Heal(QemuRunDir),
    /// Print a node's console log path and its last lines.
    Console {
        node: String,
        /// How many lines.
        #[arg(long, short = 'n', default_value_t = 40)]
        lines: usize,
        /// Keep printing new output (tail -f) until interrupted.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        run: QemuRunDir,
    },
}

#[derive(Debug, clap::Args)]
struct QemuRunDir {
    /// Where the QEMU lab keeps its disks, logs and state.
    #[arg(long, default_value = "run/qemu", value_name = "DIR")]
    run_dir: PathBuf,
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
    let cmd = match cli.lab {
        LabKind::Netns(cmd) => cmd,
        LabKind::Qemu(cmd) => return qemu(cmd),
    };
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

fn qemu(cmd: Qemu) -> anyhow::Result<ExitCode> {
    use geminik8s_vm_tests::qemu_lab::{self, QemuLab};
    match cmd {
        Qemu::Up { config_dir, image, image_dir, agent_bin, memory, cpus, boot_timeout, run } => {
            let agent_bin = absolute(agent_bin)?;
            if !agent_bin.is_file() {
                anyhow::bail!(
                    "{} does not exist: build it with `cargo build -p geminik8s-agent` or pass --agent-bin",
                    agent_bin.display()
                );
            }
            let accel = geminik8s_vm_tests::qemu::accel_choice();
            println!("QEMU accelerator: {} ({})", accel.accel.as_str(), accel.reason);
            let opts = qemu_lab::UpOptions {
                config_dir: absolute(config_dir)?,
                run_dir: absolute(run.run_dir)?,
                agent_bin,
                image: image.map(absolute).transpose()?,
                image_dir: absolute(image_dir)?,
                memory_mib: memory,
                cpus,
                boot_timeout: Duration::from_secs(boot_timeout),
                form_timeout: Duration::from_secs(300),
            };
            let up = QemuLab::up(&opts)?;
            let lab = &up.lab;
            println!("cluster formed {:.0?} after the VMs started; leader {}", up.formed_after, up.leader);
            print!("{}", lab.render_status());
            let cluster = lab.config_dir.join("cluster.yaml");
            println!("\nthe datastore (etcd API of Kine) through the VIP, from the client namespace:");
            println!(
                "  ip netns exec {} env ETCDCTL_API=3 etcdctl --endpoints http://{}:2379 put /hello world",
                qemu_lab::CLIENT,
                lab.vip
            );
            println!(
                "cluster status:  ip netns exec {} {} status --config {}",
                qemu_lab::CLIENT,
                lab.agent_bin.display(),
                cluster.display()
            );
            println!(
                "Kubernetes: the default image carries no K3s and the lab turns `k3s.enabled` off; on an image built \
                 with a K3s artifact each node serves the Kubernetes API (kubeconfig /etc/rancher/k3s/k3s.yaml on the node)"
            );
            println!(
                "faults: gemini-lab qemu kill|start|powerdown NODE, partition, heal; logs: gemini-lab qemu console NODE"
            );
            println!("teardown: gemini-lab qemu down   (state and logs: {})", lab.run_dir.display());
        }
        Qemu::Status(run) => print!("{}", QemuLab::load(&run.run_dir)?.render_status()),
        Qemu::Down(run) => {
            let removed = QemuLab::down(&run.run_dir)?;
            println!(
                "removed {}{}",
                removed.len(),
                if removed.is_empty() { String::new() } else { format!(": {}", removed.join(", ")) }
            );
        }
        Qemu::Kill { node, run } => match QemuLab::load(&run.run_dir)?.kill(&node)? {
            Some(pid) => println!("killed QEMU of {node} (pid {pid})"),
            None => println!("{node} was not running"),
        },
        Qemu::Start { node, no_wait, run } => {
            let mut lab = QemuLab::load(&run.run_dir)?;
            let from = lab.console_offset(&node)?;
            let pid = lab.start(&node)?;
            println!("started {node} (QEMU pid {pid}); console: {}", lab.console_log(&node)?.display());
            if !no_wait {
                let report = lab.wait_boot(&node, from, Duration::from_secs(600))?;
                println!("{node} booted: {report:?}");
            }
        }
        Qemu::Powerdown { node, run } => {
            let mut lab = QemuLab::load(&run.run_dir)?;
            lab.powerdown(&node)?;
            lab.wait_stopped(&node, Duration::from_secs(300))?;
            println!("{node} powered off");
        }
        Qemu::Partition(run) => {
            QemuLab::load(&run.run_dir)?.partition()?;
            println!("node1 <-> node2 cut; `gemini-lab qemu heal` restores it");
        }
        Qemu::Heal(run) => {
            QemuLab::load(&run.run_dir)?.heal()?;
            println!("healed");
        }
        Qemu::Console { node, lines, follow, run } => {
            let lab = QemuLab::load(&run.run_dir)?;
            let path = lab.console_log(&node)?;
            println!("{}", path.display());
            if follow {
                let status =
                    std::process::Command::new("tail").args(["-n", &lines.to_string(), "-f"]).arg(&path).status()?;
                return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            println!("{}", geminik8s::cmd::tail(&geminik8s_vm_tests::qemu::clean_console(&bytes), lines));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
