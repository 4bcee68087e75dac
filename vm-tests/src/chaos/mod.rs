//! The chaos suite: trials of drawn faults on a formed network-namespace
//! lab, under writers that record every acknowledged put, checked against
//! what the product promises ("no acknowledged write is ever lost and never
//! more than one writer").
//!
//! - [`plan`]: the faults and the seeded draw of a trial;
//! - [`inject`]: a drawn scenario played on the lab;
//! - [`writers`], [`sampler`]: what is recorded during a trial;
//! - [`invariants`]: the checks, and which of them each witness mode promises;
//! - [`trial`]: one trial; [`report`]: the per-trial lines and the tables.
//!
//! One lab per witness mode is brought up and formed, and reused across
//! trials; a trial that leaves it unconverged gets a fresh one.

pub mod inject;
pub mod invariants;
pub mod plan;
pub mod report;
pub mod sampler;
pub mod trial;
pub mod writers;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use geminik8s::config::WitnessMode;

use crate::netns::{Lab, LabGuard, UpOptions};
use crate::probe::{init_cluster, logs, wait_formed};
use inject::Roles;
use plan::{Planner, Scenario};
use report::{Report, TrialReport};

/// Health timings that make a failover take seconds (the lab tests' own).
pub const FAST_SETTINGS: &str = "health:\n  interval: 300ms\n  fence_timeout: 1s\n";
/// The arbiter's lease with the fast timings.
const FAST_LEASE: &str =
    "#cloud-config\ngeminik8s:\n  cluster:\n    witness:\n      lease_ttl: 3s\n      lease_renew: 500ms\n";
/// Where the lab puts the witness host in arbiter mode.
const ARBITER_TARGET: &str = "10.77.0.254:7440";
const FORM_TIMEOUT: Duration = Duration::from_secs(120);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Each mode in turn, on its own lab.
    pub modes: Vec<WitnessMode>,
    pub trials: usize,
    pub scenarios: Vec<Scenario>,
    pub seed: u64,
    /// Take the scenarios in list order instead of drawing them.
    pub in_order: bool,
    /// The range of the long cuts (one cut in five).
    pub long_cuts: (Duration, Duration),
    /// The product's default health and lease timings instead of the fast ones.
    pub product_timings: bool,
    pub agent_bin: PathBuf,
    /// Leave the last lab up.
    pub keep: bool,
    pub converge_timeout: Duration,
    /// Where the logs of trials with a violation go.
    pub artifacts: PathBuf,
    /// Run K3s in the lab with this binary (the chaos suite leaves it off).
    pub k3s: Option<PathBuf>,
}

/// Durations as seconds (milliseconds precision) in the JSON report.
pub(crate) mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
    }

    pub fn opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (or SIGTERM) asked the run to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// From now on Ctrl-C and SIGTERM stop the run at its next step, and the
/// lab is torn down, instead of killing the process and leaving the lab up.
pub fn stop_on_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("interrupted: stopping after the current step and tearing the lab down");
        INTERRUPTED.store(true, Ordering::Relaxed);
    });
    Ok(())
}

/// Sleep for `d`, or less when the run is interrupted (then an error).
pub fn pause(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// A formed lab for one witness mode, torn down when dropped.
pub struct ModeLab {
    pub lab: Lab,
    _guard: LabGuard,
    root: PathBuf,
    generation: usize,
}

/// Make a cluster for `mode` in `root/cluster` (once) and bring up a lab
/// on it in `root/run-<generation>`, formed with node1 leading. Only the
/// agent binary, the timings and `keep` of `opts` matter here.
pub fn bring_up(opts: &Options, mode: WitnessMode, root: &Path, generation: usize) -> anyhow::Result<ModeLab> {
    let cluster = root.join("cluster");
    if !cluster.join(geminik8s::clusterfile::FILE_NAME).exists() {
        let mut extra: Vec<String> = Vec::new();
        if mode == WitnessMode::Arbiter {
            extra.extend(["--witness", "arbiter", "--witness-target", ARBITER_TARGET].map(String::from));
            if !opts.product_timings {
                let template = root.join("lease.yaml");
                std::fs::write(&template, FAST_LEASE)?;
                extra.extend(["--template".to_string(), template.display().to_string()]);
            }
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        init_cluster(&opts.agent_bin, &cluster, &extra)
            .map_err(|e| anyhow::anyhow!("gemin_k8s init for the {} lab: {e}", report::mode_name(mode)))?;
    }
    let run_dir = root.join(format!("run-{generation}"));
    let lab = Lab::up(&UpOptions {
        config_dir: cluster,
        run_dir: run_dir.clone(),
        agent_bin: opts.agent_bin.clone(),
        witness: Some(mode),
        extra_block: (!opts.product_timings).then(|| FAST_SETTINGS.to_string()),
        start_agents: true,
        k3s: opts.k3s.clone(),
    })?;
    let guard = LabGuard::new(run_dir, opts.keep);
    wait_formed(&lab, "node1", "node2", FORM_TIMEOUT).map_err(|e| anyhow::anyhow!("{e}\n{}", logs(&lab)))?;
    Ok(ModeLab { lab, _guard: guard, root: root.to_path_buf(), generation })
}

/// Run every mode's trials; prints one line per trial on stderr.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    if opts.scenarios.is_empty() || opts.modes.is_empty() {
        bail!("nothing to run: name at least one fault and one witness mode");
    }
    if let Some(reason) =
        crate::skip::requires(true, &["ip", "nft", "etcdctl", "initdb", "pg_basebackup", "pg_rewind", "kine"])
    {
        bail!("the chaos suite cannot run here: {reason}");
    }
    let mut trials = Vec::new();
    for mode in &opts.modes {
        let result = run_mode(opts, *mode, &mut trials);
        if let Err(e) = result {
            return Err(e.context(format!(
                "the {} run stopped after {} trials",
                report::mode_name(*mode),
                trials.len()
            )));
        }
    }
    let timings = if opts.product_timings { "product default" } else { "fast (health interval 300 ms, fence 1 s)" };
    Ok(Report::new(opts.seed, opts.scenarios.clone(), timings.to_string(), trials))
}

fn run_mode(opts: &Options, mode: WitnessMode, trials: &mut Vec<TrialReport>) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("gk-chaos-").tempdir()?;
    // PostgreSQL runs as `postgres` and must reach its data under here.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let root = if opts.keep { tmp.keep() } else { tmp.path().to_path_buf() };
    let mut planner =
        Planner::new(opts.seed, opts.scenarios.clone(), opts.in_order).long_cuts(opts.long_cuts.0, opts.long_cuts.1);
    let mut lab = Some(bring_up(opts, mode, &root, 0)?);
    let mut max_acked = 0i64;
    for n in 1..=opts.trials {
        if interrupted() {
            bail!("interrupted");
        }
        let draw = planner.draw();
        let current = match lab.take() {
            Some(l) => l,
            None => {
                // A fresh cluster counts its revisions from the start.
                max_acked = 0;
                bring_up(opts, mode, &root, n)?
            }
        };
        let (leader, follower) = crate::probe::roles(&current.lab).map_err(anyhow::Error::msg)?;
        let roles = Roles { leader, follower };
        let input = trial::TrialInput {
            mode,
            trial: n,
            draw: &draw,
            roles: &roles,
            max_acked_before: max_acked,
            converge_timeout: opts.converge_timeout,
        };
        let mut report = trial::run(&current.lab, &input)?;
        max_acked = report.max_acked_revision;
        if !report.violations().is_empty() || !report.by_design().is_empty() {
            report.logs = Some(save_logs(&current, opts, &report)?);
        }
        eprintln!("{}", report.line());
        let converged = report.converged_after.is_some();
        trials.push(report);
        if converged {
            lab = Some(current);
        } else {
            eprintln!("[{}] trial {n} left the cluster unconverged: bringing up a fresh lab", report::mode_name(mode));
            // Dropping the lab tears it down before the next one comes up.
            drop(current);
        }
    }
    Ok(())
}

/// Keep the agents' logs of a trial with a violation (or a broken
/// invariant the mode does not promise) in the artifacts directory.
fn save_logs(current: &ModeLab, opts: &Options, report: &TrialReport) -> anyhow::Result<PathBuf> {
    let lab = &current.lab;
    let mode = report::mode_name(report.mode);
    let dir = opts.artifacts.join(format!("{mode}-seed{}-trial{}", opts.seed, report.trial));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for node in &lab.nodes {
        let from = lab.node_dir(&node.name).join("agent.log");
        if from.exists() {
            std::fs::copy(&from, dir.join(format!("{}-agent.log", node.name)))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let witness = lab.run_dir.join("witness.log");
    if witness.exists() {
        std::fs::copy(&witness, dir.join("witness.log"))?;
    }
    let summary = format!(
        "{}\n\ncluster: {} (lab generation {})\nnotes:\n{}\n\n{}\n\nreport:\n{}\n",
        report.line(),
        current.root.join("cluster").display(),
        current.generation,
        report.notes.join("\n"),
        logs(lab),
        serde_json::to_string_pretty(report)?
    );
    std::fs::write(dir.join("summary.txt"), summary)?;
    Ok(dir)
}
