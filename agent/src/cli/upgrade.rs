//! `gemin_k8s upgrade`: A/B upgrades of a node's operating system image,
//! the node's side.
//!
//! - `upgrade stage BUNDLE` (root, on a node) checks the bundle against the
//!   release the node runs, writes it into the root slot the node did not
//!   boot from and makes that slot the next boot, on trial: a record of the
//!   trial (`/var/lib/geminik8s/upgrade/trial.json`) tells the gate to judge
//!   the next boot;
//! - `upgrade gate` is what `geminik8s-boot-good.service` runs before
//!   `boot-complete.target`: a boot on trial is blessed only once the node
//!   is a useful cluster member again ([`crate::upgrade::gate::unmet`]); at
//!   the trial's deadline the reasons are kept and the gate fails, which
//!   reboots the node, and the boot loader goes back to the old slot once the
//!   new one's tries are used up;
//! - `upgrade slots` shows both slots, the next boot, the trial and the last
//!   failed gate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::OutputFormat;
use super::output::render;
use crate::peer::client::AgentClient;
use crate::upgrade::gate::{self, FailedGate, Trial};
use crate::upgrade::node::{self, StageRequest, remove};
use crate::upgrade::slot::{self, BootPaths, Counter};
use crate::upgrade::{BootState, NodeFiles};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true, disable_version_flag = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub rolling: super::upgrade_rolling::RollingArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// On a node (root): write an upgrade bundle into the passive root slot and make it the next boot, on trial.
    Stage(StageArgs),
    /// On a node: both root slots, the next boot, the trial and the last failed gate.
    Slots(SlotsArgs),
    /// On a node at boot (geminik8s-boot-good.service): pass once a boot on trial is a useful cluster member.
    Gate(GateArgs),
}

/// Where a node keeps its boot and upgrade state; flags for tests and for
/// nodes laid out differently.
#[derive(Debug, Clone, clap::Args)]
pub struct NodePaths {
    /// The EFI system partition.
    #[arg(long, default_value = "/efi", value_name = "DIR", hide = true)]
    pub esp: PathBuf,
    /// The boot script's report of this boot.
    #[arg(long, default_value = "/run/geminik8s-boot/boot.env", value_name = "FILE", hide = true)]
    pub boot_env: PathBuf,
    /// Where partitions are found by their GPT names.
    #[arg(long, default_value = "/dev/disk/by-partlabel", value_name = "DIR", hide = true)]
    pub partlabels: PathBuf,
    /// The running system's root (its release is in usr/lib/geminik8s/image.json).
    #[arg(long, default_value = "/", value_name = "DIR", hide = true)]
    pub root: PathBuf,
    /// Where the trial and the last failed gate are kept (on the persistent partition).
    #[arg(long, default_value = gate::STATE_DIR, value_name = "DIR", hide = true)]
    pub state_dir: PathBuf,
}

impl NodePaths {
    fn files(&self) -> NodeFiles {
        NodeFiles {
            boot: BootPaths {
                esp: self.esp.clone(),
                boot_env: self.boot_env.clone(),
                partlabels: self.partlabels.clone(),
            },
            root: self.root.clone(),
            state_dir: self.state_dir.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct StageArgs {
    /// The upgrade bundle: the directory `gemin-image build` writes for the `upgrade` output.
    #[arg(value_name = "DIR")]
    pub bundle: PathBuf,
    /// How many boots the new slot gets to pass the gate before the boot loader goes back to the old one.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub tries: u32,
    /// How long each boot of the new slot has to pass the gate.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub rollback_timeout: Duration,
    /// Check the bundle and say what would be written, without writing.
    #[arg(long)]
    pub dry_run: bool,
    /// Reboot into the new slot once it is written.
    #[arg(long)]
    pub reboot: bool,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub paths: NodePaths,
}

#[derive(Debug, clap::Args)]
pub struct SlotsArgs {
    #[arg(long, short, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub paths: NodePaths,
}

#[derive(Debug, clap::Args)]
pub struct GateArgs {
    /// The local agent's socket.
    #[arg(long, default_value = super::status::DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// How often the agent is asked.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub interval: Duration,
    /// Reboot when a boot on trial does not pass by its deadline (the boot service does).
    #[arg(long)]
    pub reboot: bool,
    #[command(flatten)]
    pub paths: NodePaths,
}

pub async fn run(args: Args, global: &super::GlobalArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        None => super::upgrade_rolling::run(args.rolling, global).await,
        Some(Command::Stage(args)) => stage(args).await,
        Some(Command::Slots(args)) => slots(args),
        Some(Command::Gate(args)) => run_gate(args).await,
    }
}

async fn stage(args: StageArgs) -> anyhow::Result<ExitCode> {
    let files = args.paths.files();
    let req = StageRequest {
        tries: args.tries,
        rollback_timeout_secs: args.rollback_timeout.as_secs(),
        dry_run: args.dry_run,
    };
    let started = Instant::now();
    let mut shown = 0;
    let text = args.output == OutputFormat::Text;
    let report = node::stage(&files, &args.bundle, &req, |done, total| {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if text && percent >= shown {
            eprintln!("writing the passive slot: {percent}% of {} MiB", total >> 20);
            shown = percent + 10;
        }
    })?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !args.dry_run {
        tracing::info!(slot = %report.slot, version = %report.version, elapsed = ?started.elapsed(), "upgrade staged");
    }
    match render(&report, args.output)? {
        Some(text) => print!("{text}"),
        None if args.dry_run => println!(
            "would write version {} ({} MiB) into slot {} (booted: slot {}) with {} tries of {}; the bundle verifies",
            report.version,
            report.root_bytes >> 20,
            report.slot,
            report.booted,
            report.tries,
            humantime::format_duration(args.rollback_timeout)
        ),
        None => println!(
            "slot {} holds version {} and boots next, on trial ({} tries, {} each to pass the gate); slot {} stays as it was",
            report.slot,
            report.version,
            report.tries,
            humantime::format_duration(args.rollback_timeout),
            report.booted
        ),
    }
    if args.reboot && !args.dry_run {
        crate::cmd::Tool::new("systemctl").arg("reboot").run().await.context("rebooting into the new slot")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn slots(args: SlotsArgs) -> anyhow::Result<ExitCode> {
    let state = BootState::read(&args.paths.files())?;
    if let Some(text) = render(&state, args.output)? {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("booted {}", state.summary());
    for e in &state.entries {
        let counter = match e.counter {
            Counter::Good => "good".to_string(),
            Counter::Trying { left, done } => format!("on trial: {left} tries left, {done} used"),
            Counter::Bad { done } => format!("bad: {done} tries used, passed over"),
        };
        println!("  slot {}: {} (entry version {}, {counter})", e.slot, e.title, e.version);
    }
    if let Some(t) = &state.trial {
        println!("trial: version {} in slot {}, {} s to pass the gate", t.version, t.slot, t.deadline_secs);
    }
    for line in state.failure_lines() {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_gate(args: GateArgs) -> anyhow::Result<ExitCode> {
    let files = args.paths.files();
    let paths = files.boot.clone();
    let Ok(booted) = slot::booted_slot(&paths) else {
        println!("not booted from a root slot: nothing on trial");
        return Ok(ExitCode::SUCCESS);
    };
    let Some(trial) = Trial::read(&files.trial())? else {
        println!("no upgrade on trial: the boot is good once the agent runs");
        return Ok(ExitCode::SUCCESS);
    };
    let entries = slot::entries(&paths)?;
    if trial.slot != booted.letter() {
        // Not running the slot on trial: the boot loader went back, as the
        // new slot's tries ran out before a gate passed (it did not boot, or
        // its gates failed); or staging it never finished.
        let used_up = entries.iter().any(|e| e.slot.letter() == trial.slot && matches!(e.counter, Counter::Bad { .. }));
        let reason = if used_up {
            format!(
                "slot {} (version {}) used up its tries without passing the gate; the node is back on slot {booted}",
                trial.slot, trial.version
            )
        } else {
            format!(
                "writing version {} into slot {} did not finish (the node restarted); run `upgrade stage` again",
                trial.version, trial.slot
            )
        };
        if FailedGate::read(&files.failed_gate())?.is_none_or(|f| f.version != trial.version) {
            keep_failure(&files, &trial, vec![reason.clone()])?;
        }
        remove(&files.trial())?;
        println!("version {} in slot {} is not running: {reason}", trial.version, trial.slot);
        return Ok(ExitCode::SUCCESS);
    }
    // On trial: the booted slot's entry still has its try counter (the boot
    // loader renamed `+1` to `+0-1` when it started it).
    if entries.iter().any(|e| e.slot == booted && e.counter == Counter::Good) {
        remove(&files.trial())?;
        println!("slot {booted} is already good: nothing on trial");
        return Ok(ExitCode::SUCCESS);
    }
    let client = AgentClient::unix(&args.socket, args.interval.max(Duration::from_secs(2)));
    let deadline = Instant::now() + Duration::from_secs(trial.deadline_secs);
    let mut last = Vec::new();
    loop {
        let why = match client.status().await {
            Ok(status) => gate::unmet(&status),
            Err(e) => vec![format!("the local agent does not answer on {}: {e:#}", args.socket.display())],
        };
        if why.is_empty() {
            remove(&files.trial())?;
            println!("version {} in slot {booted} passed the gate: a useful cluster member", trial.version);
            return Ok(ExitCode::SUCCESS);
        }
        if why != last {
            println!("waiting for: {}", why.join("; "));
            last = why;
        }
        if Instant::now() >= deadline {
            keep_failure(&files, &trial, last.clone())?;
            eprintln!(
                "version {} in slot {booted} did not pass the gate within {} s: {}",
                trial.version,
                trial.deadline_secs,
                last.join("; ")
            );
            if args.reboot {
                eprintln!("rebooting: the boot loader starts the old slot once this one's tries are used up");
                crate::cmd::Tool::new("systemctl").arg("reboot").run().await.context("rebooting")?;
            }
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(args.interval).await;
    }
}

fn keep_failure(files: &NodeFiles, trial: &Trial, reasons: Vec<String>) -> anyhow::Result<()> {
    let failed = FailedGate {
        at: crate::backup::now_rfc3339(),
        slot: trial.slot.clone(),
        version: trial.version.clone(),
        reasons,
    };
    let mut text = serde_json::to_vec_pretty(&failed).expect("a failed gate serialises");
    text.push(b'\n');
    crate::fsutil::write_atomic(&files.failed_gate(), &text, 0o644)
}
