//! `gemin_k8s upgrade --image DIR` (and `--rollback`) from an operator
//! machine: both nodes, one at a time, so that the cluster keeps a writer.
//!
//! The follower goes first: the bundle is sent to its agent, written into
//! its passive slot on trial, and the node reboots into it; the command
//! waits until the node is back on the new version and its boot passed the
//! health gate (or until it rolled back by itself: the gate's reasons are
//! shown and the run stops, the cluster on the old version). Then a
//! switchover makes the upgraded node the leader (the only write pause),
//! and the old leader, now the follower, goes the same way.
//!
//! What each node runs is read from the nodes, not from a record: a run
//! that was interrupted is continued by running it again (a node already on
//! the new version and blessed is passed over, one on trial is waited for,
//! one staged but not rebooted is rebooted).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::failover::{self, Answer};
use super::status::{cluster_file, node_clients};
use super::{GlobalArgs, OutputFormat};
use crate::peer::NodeStatus;
use crate::peer::client::{AgentClient, Refused};
use crate::upgrade::BootState;
use crate::upgrade::bundle::{self, Bundle};
use crate::upgrade::node::StageRequest;

#[derive(Debug, clap::Args)]
pub struct RollingArgs {
    /// Cluster name: reads ./NAME/cluster.yaml (or give --config).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The upgrade bundle: the directory `gemin-image build` writes for the `upgrade` output.
    #[arg(long, value_name = "DIR", required_unless_present = "rollback")]
    pub image: Option<PathBuf>,
    /// The version to reach: the bundle must carry it (with --rollback: the version to go back to).
    #[arg(long = "version", id = "target_version", value_name = "VERSION")]
    pub version: Option<String>,
    /// rolling: one node after the other. parallel: send and write both nodes' bundles at once,
    /// then reboot them one after the other (never both at once).
    #[arg(long, value_enum, default_value_t = Strategy::Rolling)]
    pub strategy: Strategy,
    /// How long each new boot has to pass the health gate before the node goes back to its old slot.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub rollback_timeout: Duration,
    /// How many boots the new slot gets to pass the gate.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub tries: u32,
    /// How long a node may take to reboot and answer, on top of --rollback-timeout per try.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub boot_timeout: Duration,
    /// Do not require a healthy pair (every switchover check) before starting.
    #[arg(long)]
    pub skip_validation: bool,
    /// When the second node fails its gate, roll the first back too, so that both run one version.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub auto_rollback: bool,
    /// When done, a switchover back to the node that led before the run, so that each keeps its role.
    #[arg(long)]
    pub preserve_roles: bool,
    /// Before the first reboot, a full backup to the nodes' backup.destination (taken by the follower).
    #[arg(long)]
    pub backup: bool,
    /// Go back to the version each node ran before (the other slot), through the same choreography.
    #[arg(long, conflicts_with = "image")]
    pub rollback: bool,
    /// Check and print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, short, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Time limit per status request to an agent.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Rolling,
    Parallel,
}

/// How long sending a bundle file or writing a slot may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a leaving follower's leader may take to stop counting on it.
const LEAVE_WAIT: Duration = Duration::from_secs(60);
/// How long a switchover may wait for its checks to pass (a node just back
/// from its reboot catching up).
const CHECKS_WAIT: Duration = Duration::from_secs(300);
/// How often the command looks at a rebooting node.
const POLL: Duration = Duration::from_secs(2);

/// One node's part, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRun {
    pub node: String,
    pub from: Option<String>,
    pub to: String,
    /// `already there`, `upgraded`, `rolled back`, `gate failed, rolled back by itself`,
    /// `stuck`, `pending`, `would upgrade`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// From the first byte sent to the new boot blessed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// What the command did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `upgrade`, `rollback`, or either with ` (dry run)`.
    pub operation: String,
    pub version: String,
    pub strategy: Strategy,
    pub nodes: Vec<NodeRun>,
    /// The full backup taken before the first reboot (--backup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStep>,
    /// The switchovers' write pauses.
    pub switchover_pause_ms: Vec<u64>,
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub seconds: f64,
}

/// `--backup`: which node takes it and where, then what it took.
#[derive(Debug, Clone, Serialize)]
pub struct BackupStep {
    pub node: String,
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} to {} ({:?}):", r.operation, r.version, r.strategy);
    if let Some(b) = &r.backup {
        let _ = match (&b.id, b.seconds) {
            (Some(id), Some(s)) => writeln!(out, "  backup {id} by {} to {} in {s:.0} s", b.node, b.destination),
            _ => writeln!(out, "  backup by {} to {} before the first reboot", b.node, b.destination),
        };
    }
    for n in &r.nodes {
        let took = n.seconds.map(|s| format!(" in {s:.0} s")).unwrap_or_default();
        let from = n.from.as_deref().unwrap_or("unrecorded");
        let _ = writeln!(out, "  {}: {from} -> {}: {}{took}", n.node, n.to, n.outcome);
        if let Some(d) = &n.detail {
            let _ = writeln!(out, "    {d}");
        }
    }
    for ms in &r.switchover_pause_ms {
        let _ = writeln!(out, "switchover: writes paused {ms} ms");
    }
    if let Some(d) = &r.detail {
        let _ = writeln!(out, "{d}");
    }
    let _ = writeln!(out, "{} after {:.0} s", if r.success { "done" } else { "not done" }, r.seconds);
    out
}

/// Where one node stands against the version to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Standing {
    /// Runs it, blessed.
    There,
    /// Booted it, on trial: wait for the gate.
    OnTrial,
    /// Wrote it into the passive slot but did not reboot yet.
    Staged,
    /// Runs another version.
    Behind,
}

fn standing(boot: &BootState, target: &str) -> Standing {
    let on_target = boot.version() == Some(target);
    let trial = boot.trial.as_ref().filter(|t| t.version == target);
    match (on_target, trial) {
        (true, None) if boot.is_good() => Standing::There,
        (true, _) => Standing::OnTrial,
        (false, Some(t))
            if boot.booted.is_some_and(|b| b.letter() != t.slot)
                && boot.next_boot.is_some_and(|n| n.letter() == t.slot) =>
        {
            Standing::Staged
        }
        (false, _) => Standing::Behind,
    }
}

/// The node's status and boot state, or why there are none.
fn boot_of(a: &Answer) -> anyhow::Result<(&NodeStatus, &BootState)> {
    let Some(s) = &a.status else {
        bail!("{} does not answer: {}", a.name, a.error.as_deref().unwrap_or("no status"));
    };
    let Some(b) = &s.boot else {
        bail!(
            "{} did not boot from a root slot (a live, PXE or development boot): it cannot be upgraded in place; install the image on its disk",
            a.name
        );
    };
    Ok((s, b))
}

pub async fn run(args: RollingArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = cluster_file(args.cluster.as_deref(), global) else {
        bail!("upgrade needs the cluster file: give --config DIR/cluster.yaml or --cluster NAME");
    };
    let (_, clients) = node_clients(&path, args.request_timeout)?;
    let (_, slow) = node_clients(&path, TRANSFER_TIMEOUT)?;
    let started = Instant::now();
    let bundle = match &args.image {
        Some(dir) => {
            let b = Bundle::open(dir)?;
            if args.output == OutputFormat::Text {
                eprintln!("checking the bundle's digests ({} MiB)", b.file(bundle::ROOT).bytes >> 20);
            }
            b.verify()?;
            Some(b)
        }
        None => None,
    };
    let answers = failover::ask(&clients).await;
    let mut report = plan(&args, bundle.as_ref(), &answers)?;
    if !report.success || args.dry_run {
        report.seconds = started.elapsed().as_secs_f64();
        return finish(&report, args.output);
    }
    let leader_before =
        answers.iter().find(|a| a.status.as_ref().is_some_and(|s| s.role == "leader")).map(|a| a.name.clone());
    let mut run = Run {
        args: &args,
        clients: &clients,
        slow: &slow,
        bundle: bundle.as_ref(),
        leader_before,
        report: &mut report,
    };
    let result = run.all().await;
    report.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        report.success = false;
        report.detail = Some(format!("{e:#}"));
    }
    finish(&report, args.output)
}

fn finish(report: &Report, output: OutputFormat) -> anyhow::Result<ExitCode> {
    match super::output::render(report, output)? {
        Some(text) => print!("{text}"),
        None => print!("{}", render_text(report)),
    }
    Ok(if report.success { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The checks before anything changes, and the nodes in the order they go:
/// the follower first.
fn plan(args: &RollingArgs, bundle: Option<&Bundle>, answers: &[Answer]) -> anyhow::Result<Report> {
    let mut ordered: Vec<&Answer> = answers.iter().collect();
    ordered.sort_by_key(|a| a.status.as_ref().is_some_and(|s| s.role == "leader"));
    let mut boots = Vec::new();
    for a in &ordered {
        boots.push(boot_of(a)?);
    }
    let target = match (bundle, args.rollback) {
        (Some(b), _) => {
            let v = b.release().version.clone();
            if let Some(want) = &args.version
                && *want != v
            {
                bail!("--version {want}: the bundle carries version {v}; give the bundle of {want}");
            }
            v
        }
        (None, _) => match &args.version {
            Some(v) => v.clone(),
            // The leader goes last in an upgrade: its other slot holds what both ran before.
            None => boots
                .iter()
                .rev()
                .find_map(|(_, b)| b.rollback_release().filter(|r| b.version() != Some(&r.version)))
                .map(|r| r.version.clone())
                .context(
                    "neither node records an earlier release in its other slot: there is nothing to roll back to",
                )?,
        },
    };
    let mut nodes = Vec::new();
    for (a, (_, boot)) in ordered.iter().zip(&boots) {
        let from = boot.version().map(str::to_string);
        let standing = standing(boot, &target);
        let outcome = match (&standing, bundle) {
            (Standing::There, _) => "already there",
            (_, Some(b)) => {
                if let Some(running) = &boot.release
                    && let Some(why) = running.refuses(b.release())
                    && standing == Standing::Behind
                {
                    bail!("{}: {why}", a.name);
                }
                if args.dry_run { "would upgrade" } else { "pending" }
            }
            (_, None) => {
                if boot.rollback_release().map(|r| r.version.as_str()) != Some(target.as_str()) {
                    bail!(
                        "{} runs {} and its other slot does not hold a bootable {target}: it cannot roll back to it",
                        a.name,
                        from.as_deref().unwrap_or("an unrecorded release")
                    );
                }
                if args.dry_run { "would roll back" } else { "pending" }
            }
        };
        nodes.push(NodeRun {
            node: a.name.clone(),
            from,
            to: target.clone(),
            outcome: outcome.into(),
            detail: None,
            seconds: None,
        });
    }
    let operation = if args.rollback { "rollback" } else { "upgrade" };
    let all_there = nodes.iter().all(|n| n.outcome == "already there");
    // The follower takes it (it goes first), else the leader.
    let backup = if args.backup && !all_there {
        let step = ordered.iter().zip(&boots).find_map(|(a, (s, _))| {
            let archive = s.archive.as_ref()?;
            Some(BackupStep { node: a.name.clone(), destination: archive.destination.clone(), id: None, seconds: None })
        });
        Some(step.context(
            "--backup: neither node takes backups (no backup.destination in their cloud-config, or it could not be set up: see `gemin_k8s status --details`); set one, or upgrade without --backup",
        )?)
    } else {
        None
    };
    let mut report = Report {
        operation: if args.dry_run { format!("{operation} (dry run)") } else { operation.into() },
        version: target,
        strategy: args.strategy,
        nodes,
        backup,
        switchover_pause_ms: Vec::new(),
        success: true,
        detail: None,
        seconds: 0.0,
    };
    if !args.skip_validation && !all_there && ordered.len() == 2 {
        let (follower, leader) = (ordered[0], ordered[1]);
        let failed: Vec<String> = failover::checks(leader, follower)
            .into_iter()
            .filter(|c| !c.pass)
            .map(|c| format!("{}: {}{}", c.name, c.value, c.fix.map(|f| format!(" ({f})")).unwrap_or_default()))
            .collect();
        if !failed.is_empty() {
            report.success = false;
            report.detail = Some(format!(
                "the pair is not healthy enough to start, nothing was changed:\n  {}\nfix these (or --skip-validation to go on anyway)",
                failed.join("\n  ")
            ));
        }
    }
    Ok(report)
}

struct Run<'a> {
    args: &'a RollingArgs,
    clients: &'a [(String, AgentClient)],
    slow: &'a [(String, AgentClient)],
    bundle: Option<&'a Bundle>,
    /// Who led when the run started (`--preserve-roles`).
    leader_before: Option<String>,
    report: &'a mut Report,
}

impl Run<'_> {
    fn client(&self, node: &str) -> AgentClient {
        self.clients.iter().find(|(n, _)| n == node).map(|(_, c)| c.clone()).expect("a node of the cluster file")
    }

    fn slow(&self, node: &str) -> AgentClient {
        self.slow.iter().find(|(n, _)| n == node).map(|(_, c)| c.clone()).expect("a node of the cluster file")
    }

    fn progress(&self, line: &str) {
        if self.args.output == OutputFormat::Text {
            eprintln!("{line}");
        }
    }

    async fn all(&mut self) -> anyhow::Result<()> {
        if let Some(b) = &self.report.backup {
            let node = b.node.clone();
            self.progress(&format!("{node}: taking a full backup to {}", b.destination));
            let taken = self
                .slow(&node)
                .backup_now()
                .await
                .with_context(|| format!("--backup on {node}: no node was rebooted"))?;
            self.progress(&format!("{node}: backup {} taken in {:.0} s", taken.id, taken.seconds));
            self.report.backup = Some(BackupStep {
                node,
                destination: taken.destination,
                id: Some(taken.id),
                seconds: Some(taken.seconds),
            });
        }
        if self.args.strategy == Strategy::Parallel && self.bundle.is_some() {
            let pending: Vec<String> =
                self.report.nodes.iter().filter(|n| n.outcome == "pending").map(|n| n.node.clone()).collect();
            let this = &*self;
            let staged = futures_util::future::join_all(pending.iter().map(|n| this.prepare(n))).await;
            for r in staged {
                r?;
            }
        }
        for i in 0..self.report.nodes.len() {
            if self.report.nodes[i].outcome != "pending" {
                continue;
            }
            let node = self.report.nodes[i].node.clone();
            let started = Instant::now();
            self.lead_elsewhere(&node).await?;
            if self.bundle.is_some() && self.args.strategy == Strategy::Rolling {
                self.prepare(&node).await?;
            } else if self.bundle.is_none() {
                let r = self.client(&node).upgrade_rollback().await?;
                self.progress(&format!("{node}: slot {} ({}) boots next", r.slot, r.version));
            }
            let outcome = self.reboot_and_wait(&node).await?;
            let run = &mut self.report.nodes[i];
            run.seconds = Some(started.elapsed().as_secs_f64());
            match outcome {
                Ok(()) => run.outcome = if self.bundle.is_some() { "upgraded" } else { "rolled back" }.into(),
                Err(reasons) => {
                    run.outcome = "gate failed, rolled back by itself".into();
                    run.detail = Some(reasons.join("; "));
                    self.report.success = false;
                    return self.after_failed_gate(&node).await;
                }
            }
        }
        if self.args.preserve_roles
            && let Some(before) = self.leader_before.clone()
            && let Some(other) = self.report.nodes.iter().map(|n| n.node.clone()).find(|n| *n != before)
        {
            // A switchover back if the other node leads now.
            self.lead_elsewhere(&other).await?;
        }
        Ok(())
    }

    /// Send the bundle to `node` and write it into its passive slot (a node
    /// that already staged it, or runs it on trial, is left as it is).
    async fn prepare(&self, node: &str) -> anyhow::Result<()> {
        let bundle = self.bundle.expect("an upgrade has a bundle");
        let target = &self.report.version;
        let boot = self.boot(node).await?;
        if standing(&boot, target) != Standing::Behind {
            return Ok(());
        }
        let slow = self.slow(node);
        for name in [bundle::MANIFEST].into_iter().chain(bundle::FILES) {
            let path = bundle.path(name);
            self.progress(&format!("{node}: sending {name}"));
            let (bytes, sha256) = slow.upgrade_send(name, &path).await?;
            if name != bundle::MANIFEST {
                let want = bundle.file(name);
                if (bytes, sha256.as_str()) != (want.bytes, want.sha256.as_str()) {
                    bail!(
                        "{node} received {name} as {bytes} bytes with SHA-256 {sha256}, the manifest says {} bytes with {}: the transfer was damaged; run upgrade again",
                        want.bytes,
                        want.sha256
                    );
                }
            }
        }
        self.progress(&format!("{node}: writing the passive slot"));
        let req = StageRequest {
            tries: self.args.tries,
            rollback_timeout_secs: self.args.rollback_timeout.as_secs(),
            dry_run: false,
        };
        let staged = slow.upgrade_stage(&req).await?;
        self.progress(&format!("{node}: slot {} holds {} and boots next, on trial", staged.slot, staged.version));
        Ok(())
    }

    async fn boot(&self, node: &str) -> anyhow::Result<BootState> {
        let s = self.client(node).status().await.with_context(|| format!("asking {node} for its slots"))?;
        s.boot.with_context(|| format!("{node} no longer reports its root slots"))
    }

    /// Before `node` reboots: if it leads, a switchover to the other node.
    async fn lead_elsewhere(&mut self, node: &str) -> anyhow::Result<()> {
        let answers = failover::ask(self.clients).await;
        let leads = answers.iter().any(|a| a.name == node && a.status.as_ref().is_some_and(|s| s.role == "leader"));
        let Some(other) = answers.iter().find(|a| a.name != node) else { return Ok(()) };
        if !leads {
            return Ok(());
        }
        self.progress(&format!("{node} leads: switchover to {}", other.name));
        let args = failover::Args {
            cluster: None,
            promote: Some(other.name.clone()),
            timeout: Duration::from_secs(120),
            force: false,
            yes: false,
            dry_run: false,
            wait: true,
            verify: false,
            output: failover::FailoverFormat::Json,
            request_timeout: self.args.request_timeout,
        };
        // A node that just passed its gate may still be short of a check
        // (its standby confirmed a moment later, its lag catching up): the
        // switchover changed nothing then, and is asked again for a while.
        let deadline = Instant::now() + CHECKS_WAIT;
        let mut said = String::new();
        loop {
            let r = failover::switchover(&args, self.clients).await?;
            if r.success {
                self.report.switchover_pause_ms.extend(r.pause_ms);
                return Ok(());
            }
            let failed: Vec<String> =
                r.checks.iter().filter(|c| !c.pass).map(|c| format!("{}: {}", c.name, c.value)).collect();
            let unchanged = matches!(r.outcome.as_str(), "refused: checks failed" | "refused by the leader");
            if !unchanged || Instant::now() >= deadline {
                bail!(
                    "the switchover from {node} to {} did not complete ({}{}{}): {node} was not rebooted",
                    other.name,
                    r.outcome,
                    r.detail.map(|d| format!(": {d}")).unwrap_or_default(),
                    if failed.is_empty() { String::new() } else { format!("; failed: {}", failed.join("; ")) }
                );
            }
            let now = failed.join("; ");
            if now != said {
                self.progress(&format!("switchover to {} waits for its checks: {now}", other.name));
                said = now;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reboot the follower `node` once its leader no longer waits for it:
    /// it leaves on purpose first, so commits do not stall while it is away
    /// (an agent that predates leaves is rebooted as it is).
    async fn leave_and_reboot(&self, node: &str) -> anyhow::Result<()> {
        if self.client(node).upgrade_leave().await? {
            self.progress(&format!("{node}: leaving; waiting for the leader to stop counting on it"));
            let deadline = Instant::now() + LEAVE_WAIT;
            let mut last = String::from("no answer");
            loop {
                let answers = failover::ask(self.clients).await;
                let leader =
                    answers.iter().find_map(|a| a.status.clone().filter(|s| s.node != node && s.role == "leader"));
                if let Some(r) = leader.as_ref().and_then(|l| l.replication.as_ref()) {
                    if !r.durability.starts_with("synchronous") {
                        break;
                    }
                    last = r.durability.clone();
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the leader still waits for {node}'s commits after {LEAVE_WAIT:?} (last seen: {last}); {node} was not rebooted and counts again within minutes; run upgrade again"
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        } else {
            self.progress(&format!("{node}: its agent cannot leave on purpose (an older version): commits wait for it until its leader gives up on it"));
        }
        self.progress(&format!("{node}: rebooting"));
        match self.client(node).upgrade_reboot().await {
            Err(e) if e.downcast_ref::<Refused>().is_none() => {
                // The reboot can stop the agent before its answer is sent:
                // whether the node went down is what the wait after this watches.
                self.progress(&format!("{node}: no answer to the reboot ({e:#}); watching whether it reboots"));
                Ok(())
            }
            result => result,
        }
    }

    /// Reboot `node` and wait until it runs the target version blessed
    /// (`Ok`), or went back to its old slot after a failed gate (`Err` with
    /// the gate's reasons).
    async fn reboot_and_wait(&self, node: &str) -> anyhow::Result<Result<(), Vec<String>>> {
        let target = &self.report.version;
        let boot = self.boot(node).await?;
        match standing(&boot, target) {
            Standing::There => return Ok(Ok(())),
            Standing::OnTrial => self.progress(&format!("{node}: on trial with {target}, waiting for its gate")),
            Standing::Staged | Standing::Behind => self.leave_and_reboot(node).await?,
        }
        let deadline = Instant::now() + self.args.boot_timeout + self.args.rollback_timeout * self.args.tries.max(1);
        let mut last = String::from("no answer yet");
        let mut gone = false;
        loop {
            tokio::time::sleep(POLL).await;
            match self.client(node).status().await {
                Err(e) => {
                    gone = true;
                    last = format!("no answer: {e:#}");
                }
                Ok(s) => {
                    if let Some(b) = &s.boot {
                        if standing(b, target) == Standing::There {
                            return Ok(Ok(()));
                        }
                        let failed = b.last_failed_gate.as_ref().filter(|f| f.version == *target);
                        // Back on the old slot (its own gate ends the trial soon after).
                        let back = b.trial.as_ref().is_none_or(|t| b.booted.is_some_and(|s| s.letter() != t.slot));
                        if gone && back && b.version() != Some(target) && failed.is_some() {
                            return Ok(Err(failed.map(|f| f.reasons.clone()).unwrap_or_default()));
                        }
                        last = format!("{} ({})", b.summary(), s.state);
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{node} did not come back on {target} with a passed gate in time (last seen: {last}); see `gemin_k8s status --details` and the node's console, then run upgrade again to continue"
                );
            }
        }
    }

    /// A node's new boot failed its gate and it went back by itself. The
    /// nodes already on the new version go back too (--auto-rollback), so
    /// that both run one version.
    async fn after_failed_gate(&mut self, failed: &str) -> anyhow::Result<()> {
        let upgraded: Vec<usize> = (0..self.report.nodes.len())
            .filter(|&i| self.report.nodes[i].node != failed && self.report.nodes[i].outcome == "upgraded")
            .collect();
        if upgraded.is_empty() {
            self.report.detail = Some(format!(
                "{failed} did not pass its gate on {} and runs its old version again; the cluster stays on it. Fix what the gate reported (`gemin_k8s status --details`), then run upgrade again",
                self.report.version
            ));
            return Ok(());
        }
        if !self.args.auto_rollback {
            self.report.detail = Some(format!(
                "{failed} did not pass its gate and runs its old version again; the other node stays on {} (--auto-rollback false): `gemin_k8s upgrade --rollback` brings it back",
                self.report.version
            ));
            return Ok(());
        }
        for i in upgraded {
            let node = self.report.nodes[i].node.clone();
            let started = Instant::now();
            self.lead_elsewhere(&node).await?;
            let r = self.client(&node).upgrade_rollback().await?;
            self.progress(&format!("{node}: rolling back to {}", r.version));
            self.leave_and_reboot(&node).await?;
            let target = r.version;
            let deadline = Instant::now() + self.args.boot_timeout;
            loop {
                tokio::time::sleep(POLL).await;
                if let Ok(s) = self.client(&node).status().await
                    && s.boot.as_ref().is_some_and(|b| b.version() == Some(target.as_str()) && b.is_good())
                {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{node} did not come back on {target} after its rollback in time; see `gemin_k8s status --details`"
                    );
                }
            }
            let run = &mut self.report.nodes[i];
            run.outcome = "rolled back".into();
            run.detail = Some(format!(
                "back on {target} in {:.0} s because {failed} failed its gate",
                started.elapsed().as_secs_f64()
            ));
        }
        self.report.detail = Some(format!(
            "{failed} did not pass its gate on {}; both nodes run their old version again. Fix what the gate reported, then run upgrade again",
            self.report.version
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::bundle::{Components, Release};
    use crate::upgrade::gate::Trial;
    use crate::upgrade::slot::{Counter, Slot};
    use crate::upgrade::{BootState, EntryView};

    fn release(version: &str, pg: u32) -> Release {
        Release {
            name: "geminik8s".into(),
            version: version.into(),
            components: Components { postgresql_major: pg, agent: "a".into(), kine: "k".into(), k3s: "s".into() },
        }
    }

    fn entry(slot: Slot, counter: Counter) -> EntryView {
        EntryView { slot, file: format!("gemin-{}.conf", slot.letter()), title: String::new(), version: 1, counter }
    }

    fn boot(version: &str, booted: Slot, good: bool, other: Option<&str>) -> BootState {
        let counter = if good { Counter::Good } else { Counter::Trying { left: 0, done: 1 } };
        BootState {
            booted: Some(booted),
            next_boot: Some(booted),
            release: Some(release(version, 15)),
            entries: vec![entry(booted, counter), entry(booted.other(), Counter::Good)],
            trial: None,
            last_failed_gate: None,
            other_release: other.map(|v| release(v, 15)),
        }
    }

    fn answer(name: &str, role: &str, boot: Option<BootState>) -> Answer {
        let status = NodeStatus { node: name.into(), role: role.into(), boot, ..NodeStatus::default() };
        Answer { name: name.into(), status: Some(status), error: None, sent_ms: 0, received_ms: 0 }
    }

    fn args(rollback: bool) -> RollingArgs {
        RollingArgs {
            cluster: None,
            image: None,
            version: None,
            strategy: Strategy::Rolling,
            rollback_timeout: Duration::from_secs(600),
            tries: 1,
            boot_timeout: Duration::from_secs(600),
            skip_validation: true,
            auto_rollback: true,
            backup: false,
            preserve_roles: false,
            rollback,
            dry_run: true,
            output: OutputFormat::Json,
            request_timeout: Duration::from_secs(3),
        }
    }

    fn bundle(dir: &std::path::Path, version: &str, pg: u32) -> Bundle {
        for name in bundle::FILES {
            std::fs::write(dir.join(name), name).unwrap();
        }
        Bundle::seal(dir, &release(version, pg)).unwrap();
        Bundle::open(dir).unwrap()
    }

    #[test]
    fn where_a_node_stands_against_the_version_to_reach() {
        assert_eq!(standing(&boot("2", Slot::B, true, None), "2"), Standing::There);
        assert_eq!(standing(&boot("2", Slot::B, false, None), "2"), Standing::OnTrial);
        assert_eq!(standing(&boot("1", Slot::A, true, None), "2"), Standing::Behind);
        let mut staged = boot("1", Slot::A, true, None);
        staged.trial =
            Some(Trial { slot: "b".into(), version: "2".into(), from_version: "1".into(), deadline_secs: 60 });
        staged.next_boot = Some(Slot::B);
        assert_eq!(standing(&staged, "2"), Standing::Staged);
        // The new slot's tries ran out: the loader went back, nothing is staged.
        staged.next_boot = Some(Slot::A);
        assert_eq!(standing(&staged, "2"), Standing::Behind);
    }

    #[test]
    fn the_follower_goes_first_and_a_node_already_there_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(dir.path(), "2", 15);
        let answers = [
            answer("node1", "leader", Some(boot("1", Slot::A, true, None))),
            answer("node2", "follower", Some(boot("2", Slot::B, true, Some("1")))),
        ];
        let r = plan(&args(false), Some(&b), &answers).unwrap();
        let order: Vec<(&str, &str)> = r.nodes.iter().map(|n| (n.node.as_str(), n.outcome.as_str())).collect();
        assert_eq!(order, [("node2", "already there"), ("node1", "would upgrade")]);
        assert_eq!(r.version, "2");
    }

    #[test]
    fn a_postgresql_major_change_a_wrong_version_and_a_node_without_slots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pg16 = bundle(dir.path(), "2", 16);
        let answers = [
            answer("node1", "leader", Some(boot("1", Slot::A, true, None))),
            answer("node2", "follower", Some(boot("1", Slot::A, true, None))),
        ];
        let e = plan(&args(false), Some(&pg16), &answers).unwrap_err();
        assert!(format!("{e:#}").contains("PostgreSQL's major version (15 -> 16)"), "{e:#}");

        let other = tempfile::tempdir().unwrap();
        let b = bundle(other.path(), "2", 15);
        let mut wrong = args(false);
        wrong.version = Some("3".into());
        let e = plan(&wrong, Some(&b), &answers).unwrap_err();
        assert!(format!("{e:#}").contains("--version 3: the bundle carries version 2"), "{e:#}");

        let live = [answer("node1", "leader", None), answer("node2", "follower", Some(boot("1", Slot::A, true, None)))];
        let e = plan(&args(false), Some(&b), &live).unwrap_err();
        assert!(format!("{e:#}").contains("node1 did not boot from a root slot"), "{e:#}");
    }

    #[test]
    fn a_rollback_goes_to_the_release_the_other_slots_hold() {
        let answers = [
            answer("node1", "leader", Some(boot("2", Slot::B, true, Some("1")))),
            answer("node2", "follower", Some(boot("2", Slot::B, true, Some("1")))),
        ];
        let r = plan(&args(true), None, &answers).unwrap();
        assert_eq!(r.version, "1");
        assert!(r.nodes.iter().all(|n| n.outcome == "would roll back"), "{r:?}");
        // A node whose other slot holds nothing recorded cannot go back.
        let fresh = [
            answer("node1", "leader", Some(boot("2", Slot::B, true, Some("1")))),
            answer("node2", "follower", Some(boot("2", Slot::A, true, None))),
        ];
        let e = plan(&args(true), None, &fresh).unwrap_err();
        assert!(format!("{e:#}").contains("node2 runs 2 and its other slot does not hold a bootable 1"), "{e:#}");
        // Nor to a release whose boots failed (an upgrade that rolled back).
        let mut failed = boot("1", Slot::A, true, Some("2"));
        failed.entries[1].counter = Counter::Bad { done: 1 };
        let answers = [answer("node1", "leader", Some(failed.clone())), answer("node2", "follower", Some(failed))];
        let e = plan(&args(true), None, &answers).unwrap_err();
        assert!(format!("{e:#}").contains("nothing to roll back to"), "{e:#}");
    }

    #[test]
    fn a_backup_is_taken_by_the_follower_and_refused_where_no_node_takes_backups() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(dir.path(), "2", 15);
        let mut answers = [
            answer("node1", "leader", Some(boot("1", Slot::A, true, None))),
            answer("node2", "follower", Some(boot("1", Slot::A, true, None))),
        ];
        let mut with_backup = args(false);
        with_backup.backup = true;
        let e = plan(&with_backup, Some(&b), &answers).unwrap_err();
        assert!(format!("{e:#}").contains("--backup: neither node takes backups"), "{e:#}");
        for a in &mut answers {
            let archive = crate::peer::ArchiveView { destination: "/backups".into(), ..Default::default() };
            a.status.as_mut().unwrap().archive = Some(archive);
        }
        let r = plan(&with_backup, Some(&b), &answers).unwrap();
        let step = r.backup.as_ref().expect("a backup step");
        assert_eq!((step.node.as_str(), step.destination.as_str(), step.id.as_ref()), ("node2", "/backups", None));
        assert!(render_text(&r).contains("backup by node2 to /backups before the first reboot"), "{}", render_text(&r));
        // Nothing to upgrade: nothing to back up.
        let there = [
            answer("node1", "leader", Some(boot("2", Slot::B, true, Some("1")))),
            answer("node2", "follower", Some(boot("2", Slot::B, true, Some("1")))),
        ];
        assert!(plan(&with_backup, Some(&b), &there).unwrap().backup.is_none());
    }
}
