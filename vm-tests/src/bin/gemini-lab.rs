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
    /// The chaos suite: drawn faults on a formed namespace lab under steady writers; checks that no
    /// acknowledged write is lost, revisions never go back, the VIP is never on two nodes, and the
    /// cluster converges. Exits non-zero when a witness mode breaks what it promises.
    Chaos(ChaosArgs),
}

#[derive(Debug, clap::Args)]
struct ChaosArgs {
    /// Trials per witness mode.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Witness modes to run, each on its own lab, in turn (repeatable, or a list).
    #[arg(long, value_enum, num_args = 1.., value_delimiter = ',', default_values = ["none", "gateway", "arbiter"])]
    witness: Vec<WitnessMode>,
    /// Scenarios to draw from: faults, or two joined by `+` (one starts during the other).
    #[arg(long, value_name = "LIST", default_value = geminik8s_vm_tests::chaos::plan::DEFAULT_FAULTS)]
    faults: String,
    /// Seed of the draws: the same seed and faults give the same trials.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Take the faults in list order, round robin, instead of drawing them.
    #[arg(long)]
    in_order: bool,
    /// The range of the long cuts and isolations (one in five): past `degrade_after` (30 s), and
    /// past PostgreSQL's `wal_sender_timeout` (60 s) plus `degrade_after` to reach the leader's
    /// real degrade point under silent loss.
    #[arg(long, value_names = ["MIN", "MAX"], num_args = 2, value_delimiter = ',', default_values = ["30s", "40s"],
          value_parser = humantime::parse_duration)]
    long_cuts: Vec<Duration>,
    /// The product's default health and lease timings instead of the fast ones
    /// (health interval 300 ms, fence timeout 1 s; arbiter lease 3 s).
    #[arg(long)]
    product_timings: bool,
    /// How long the cluster may take to converge after the heal.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
    /// Output of the final report.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The gemin_k8s binary (default: next to this one).
    #[arg(long, value_name = "FILE")]
    agent_bin: Option<PathBuf>,
    /// Leave the last lab up (and its cluster and logs).
    #[arg(long)]
    keep: bool,
    /// Where the agents' logs of trials with a violation are saved.
    #[arg(long, value_name = "DIR", default_value = "run/chaos")]
    artifacts: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    /// Markdown tables.
    Table,
    Json,
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
        /// Run K3s on the nodes even with --image (the image carries a K3s that serves).
        #[arg(long, conflicts_with = "no_k3s")]
        k3s: bool,
        /// Leave K3s off, even when the built image carries the stand-in's kube-apiserver.
        #[arg(long)]
        no_k3s: bool,
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
    /// Run a command on a node as root over SSH with the lab's key (default: its agent's journal).
    Ssh {
        node: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        run: QemuRunDir,
    },
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
        /// Leave K3s off. By default the agents run K3s when a binary is there: the one named by
        /// GEMINIK8S_K3S_BINARY, else the lab's stand-in (`k3s-standin`, with `kube-apiserver` on PATH).
        #[arg(long)]
        no_k3s: bool,
        #[command(flatten)]
        run: RunDir,
    },
    /// Show hosts, processes, VIP holders.
    Status(RunDir),
    /// Remove everything the lab created (also after a crash).
    Down(RunDir),
    /// Power cut: the node's switch port goes down and every process in its namespace gets SIGKILL;
    /// nothing is tidied (the VIP stays configured, as in the RAM of a dead machine).
    Kill {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// Power on a killed node (it boots without the VIP and its runtime directory) and start its
    /// agent; after `kill-agent`, only start the agent again.
    Start {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// Drop all traffic between the own addresses of two hosts (nodes, `client` or `gw`), silently;
    /// ARP and the VIP still pass.
    Cut {
        a: String,
        b: String,
        /// Only from A to B.
        #[arg(long)]
        one_way: bool,
        #[command(flatten)]
        run: RunDir,
    },
    /// Cut a host off from everyone: every packet on its interface is dropped silently.
    Isolate {
        host: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// SIGKILL a node's agent only; PostgreSQL, Kine and the VIP stay.
    KillAgent {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// SIGSTOP a node's agent (it hangs; everything else runs).
    Pause {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// SIGCONT a node's agent stopped by `pause`.
    Resume {
        node: String,
        #[command(flatten)]
        run: RunDir,
    },
    /// Make the witness host (gateway, and `witness serve` in arbiter mode) unreachable, silently.
    WitnessDown(RunDir),
    /// Undo `witness-down`.
    WitnessUp(RunDir),
    /// Kill both nodes, then power FIRST on, and SECOND after a delay.
    PowerCycle {
        first: String,
        second: String,
        /// How long both stay off.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        off: Duration,
        /// Between powering FIRST and SECOND on.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
        delay: Duration,
        #[command(flatten)]
        run: RunDir,
    },
    /// Undo every fault: drop rules removed, killed nodes powered on, paused agents resumed, missing
    /// agents started.
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
        LabKind::Chaos(args) => return chaos(args),
    };
    match cmd {
        Netns::Up { config_dir, witness, agent_bin, no_agents, no_k3s, run } => {
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
                k3s: if no_k3s { None } else { geminik8s_vm_tests::k3s_standin::lab_k3s() },
            };
            let lab = Lab::up(&opts)?;
            match &lab.k3s {
                Some(k3s) => {
                    println!("K3s: {} (kubeconfig for the VIP: {})", k3s.display(), lab.kubeconfig("node1").display())
                }
                None => println!("K3s: off (no K3s binary, or no kube-apiserver for the stand-in: `just deps`)"),
            }
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
                let node = if lab.nodes.contains(h) {
                    let agent = lab.agent_pid(&h.name).map_or("no agent".to_string(), |p| format!("agent pid {p}"));
                    format!(", powered {}, {agent}", if lab.powered(&h.name) { "on" } else { "off" })
                } else {
                    String::new()
                };
                println!("{:<8} {:<10} {:<15} {} processes{node}", h.name, h.netns, h.ip.to_string(), pids.len());
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
            println!("{node} powered off ({n} processes killed)");
        }
        Netns::Start { node, run } => {
            let pid = Lab::load(&run.run_dir)?.start(&node)?;
            println!("started the agent of {node} (pid {pid})");
        }
        Netns::Cut { a, b, one_way, run } => {
            Lab::load(&run.run_dir)?.cut(&a, &b, one_way)?;
            println!("{a} {} {b} cut; `heal` restores it", if one_way { "->" } else { "<->" });
        }
        Netns::Isolate { host, run } => {
            Lab::load(&run.run_dir)?.isolate(&host)?;
            println!("{host} isolated; `heal` restores it");
        }
        Netns::KillAgent { node, run } => {
            let pid = Lab::load(&run.run_dir)?.kill_agent(&node)?;
            println!("killed the agent of {node} (pid {pid}); `start {node}` or `heal` starts it again");
        }
        Netns::Pause { node, run } => {
            let pid = Lab::load(&run.run_dir)?.pause_agent(&node)?;
            println!("stopped the agent of {node} (pid {pid}); `resume {node}` continues it");
        }
        Netns::Resume { node, run } => {
            let pid = Lab::load(&run.run_dir)?.resume_agent(&node)?;
            println!("continued the agent of {node} (pid {pid})");
        }
        Netns::WitnessDown(run) => {
            Lab::load(&run.run_dir)?.witness_down()?;
            println!("the witness host is unreachable; `witness-up` restores it");
        }
        Netns::WitnessUp(run) => Lab::load(&run.run_dir)?.witness_up()?,
        Netns::PowerCycle { first, second, off, delay, run } => {
            Lab::load(&run.run_dir)?.power_cycle(&first, &second, off, delay)?;
            println!("both nodes powered off for {off:?}; {first} on, then {second} {delay:?} later");
        }
        Netns::Heal(run) => {
            for done in Lab::load(&run.run_dir)?.heal()? {
                println!("{done}");
            }
            println!("healed");
        }
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

fn chaos(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    use geminik8s_vm_tests::chaos;
    let agent_bin = match args.agent_bin {
        Some(p) => absolute(p)?,
        None => geminik8s_vm_tests::probe::agent_bin().context(
            "gemin_k8s not found next to gemini-lab: build it (`cargo build -p geminik8s-agent`) or pass --agent-bin",
        )?,
    };
    let scenarios = chaos::plan::parse_scenarios(&args.faults).map_err(anyhow::Error::msg)?;
    let mut modes = args.witness;
    modes.dedup();
    let opts = chaos::Options {
        modes,
        trials: args.trials,
        scenarios,
        seed: args.seed,
        in_order: args.in_order,
        long_cuts: (args.long_cuts[0], args.long_cuts[1]),
        product_timings: args.product_timings,
        agent_bin,
        keep: args.keep,
        converge_timeout: args.converge_timeout,
        artifacts: absolute(args.artifacts)?,
        k3s: None,
    };
    chaos::stop_on_signals()?;
    let report = chaos::run(&opts)?;
    match args.output {
        Output::Table => print!("{}", report.table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(if report.violated() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn qemu(cmd: Qemu) -> anyhow::Result<ExitCode> {
    use geminik8s_vm_tests::qemu_lab::{self, QemuLab};
    match cmd {
        Qemu::Up { config_dir, image, image_dir, k3s, no_k3s, agent_bin, memory, cpus, boot_timeout, run } => {
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
                k3s: if no_k3s { Some(false) } else { k3s.then_some(true) },
                memory_mib: memory,
                cpus,
                boot_timeout: Duration::from_secs(boot_timeout),
                form_timeout: Duration::from_secs(300),
                kube_timeout: Duration::from_secs(600),
                enrol: false,
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
            match &up.kubeconfig {
                Some(kubeconfig) => {
                    println!(
                        "Kubernetes API through the VIP {:.0?} after the VMs started; the kubeconfig from the agents \
                         (`gemin_k8s kubeconfig`) is {}:",
                        up.kubernetes_after,
                        kubeconfig.display()
                    );
                    println!(
                        "  ip netns exec {} kubectl --kubeconfig {} get namespaces",
                        qemu_lab::CLIENT,
                        kubeconfig.display()
                    );
                }
                None => println!(
                    "Kubernetes: off (the image has no kube-apiserver for the K3s stand-in: `just deps`, then \
                     rebuild; or --no-k3s was given)"
                ),
            }
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
        Qemu::Ssh { node, command, run } => {
            let lab = QemuLab::load(&run.run_dir)?;
            let argv: Vec<&str> = match command.is_empty() {
                true => qemu_lab::AGENT_JOURNAL.to_vec(),
                false => command.iter().map(String::as_str).collect(),
            };
            print!("{}", lab.ssh(&node, &argv).map_err(|e| anyhow::anyhow!(e))?);
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
