//! `gemin_k8s failover`: a planned switchover that proves it lost nothing
//! (the default), or a forced failover (`--force`) that says first what it
//! may cost.
//!
//! It talks to both agents over mutual TLS with the operator certificate
//! and token from the cluster file `init` wrote, from anywhere that reaches
//! the nodes. A planned switchover runs the checks of `--dry-run` first and
//! refuses when one fails; the agents then do the hand-over themselves (the
//! leader shuts PostgreSQL down cleanly, the follower promotes only once it
//! has replayed past the shutdown checkpoint) and this command follows it
//! to a result: done, or aborted with the cluster unchanged, or stuck with
//! what to do. Exit status: 0 done (or every check passed), 1 otherwise.

use std::fmt::Write as _;
use std::io::BufRead as _;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;

use super::GlobalArgs;
use super::status::{cluster_file, node_clients};
use crate::peer::NodeStatus;
use crate::peer::client::AgentClient;
use crate::postgres::HOT_STANDBY_SETTINGS;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster name: reads ./NAME/cluster.yaml (or give --config).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The node to promote (default: the follower).
    #[arg(long, value_name = "NODE")]
    pub promote: Option<String>,
    /// How long the switchover (or forced takeover) may take, and as much
    /// again for --wait and --verify.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Forced failover: promote the follower although the leader is gone
    /// (or the follower is not entitled to take over); writes only the old
    /// leader has are given up.
    #[arg(long, conflicts_with = "dry_run")]
    pub force: bool,
    /// Do not ask for confirmation of a forced failover.
    #[arg(long, short, requires = "force")]
    pub yes: bool,
    /// Run the checks only; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Then wait until the old leader follows again.
    #[arg(long)]
    pub wait: bool,
    /// Then (after --wait) write once through the VIP and check that commits
    /// wait for the standby again.
    #[arg(long)]
    pub verify: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = FailoverFormat::Table)]
    pub output: FailoverFormat,
    /// Time limit per request to an agent.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailoverFormat {
    Table,
    Json,
}

/// One check of `--dry-run`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &str, value: impl Into<String>) -> Check {
        Check { name: name.into(), pass: true, value: value.into(), fix: None }
    }

    fn fail(name: &str, value: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), pass: false, value: value.into(), fix: Some(fix.into()) }
    }
}

/// One step of the write pause, as this command saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub step: String,
    pub ms: u64,
}

/// What the command did, for the table and `--output json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `switchover`, `forced failover` or `dry run`.
    pub operation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `done`, `checks failed`, `refused: checks failed`, `refused by the leader`,
    /// `aborted, cluster unchanged`, `stuck`, `refused`, `passed`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub checks: Vec<Check>,
    /// From the request to the new leader holding the VIP: writes are
    /// refused for at most this long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    pub steps: Vec<Step>,
    /// `--force`: what the promoted node may lack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub may_lose: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub followed_after_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_commit_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_durability: Option<String>,
    pub success: bool,
}

/// One node's answer with the local clock around it (milliseconds since the
/// Unix epoch), for the clock offset.
#[derive(Debug, Clone)]
pub struct Answer {
    pub name: String,
    pub status: Option<NodeStatus>,
    pub error: Option<String>,
    pub sent_ms: u64,
    pub received_ms: u64,
}

impl Answer {
    /// How far the node's clock is ahead of this host's (rtt/2 uncertain).
    fn clock_offset_ms(&self) -> Option<i64> {
        let s = self.status.as_ref().filter(|s| s.served_at_unix_ms > 0)?;
        let mid = (self.sent_ms + self.received_ms) / 2;
        Some(s.served_at_unix_ms as i64 - mid as i64)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(super) async fn ask(clients: &[(String, AgentClient)]) -> Vec<Answer> {
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|(name, c)| {
            tokio::spawn(async move {
                let sent_ms = unix_ms();
                let r = c.status().await;
                let received_ms = unix_ms();
                match r {
                    Ok(s) => Answer { name, status: Some(s), error: None, sent_ms, received_ms },
                    Err(e) => Answer { name, status: None, error: Some(format!("{e:#}")), sent_ms, received_ms },
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(a) = t.await {
            out.push(a);
        }
    }
    out
}

/// Free space the checks ask for on each node's data directory.
const MIN_FREE_BYTES: u64 = 1 << 30;
const MIN_FREE_PERCENT: u64 = 5;
/// The largest clock offset between the nodes the checks accept.
const MAX_CLOCK_OFFSET_MS: i64 = 1000;

/// Every check of a planned switchover from `leader` to `follower`
/// (`--dry-run` prints them; a switchover refuses when one fails).
pub fn checks(leader: &Answer, follower: &Answer) -> Vec<Check> {
    let mut out = Vec::new();
    for a in [leader, follower] {
        match &a.error {
            None => out.push(Check::pass(&format!("agent on {} reachable", a.name), "answers")),
            Some(e) => out.push(Check::fail(
                &format!("agent on {} reachable", a.name),
                e.clone(),
                "start the node or its agent, or check the network to its API port; a dead leader needs --force",
            )),
        }
    }
    let (Some(l), Some(f)) = (&leader.status, &follower.status) else { return out };
    let roles = format!("{} {}, {} {}", l.node, l.role, f.node, f.role);
    if l.role == "leader" && f.role == "follower" {
        out.push(Check::pass("one leader, one follower", roles));
    } else {
        out.push(Check::fail(
            "one leader, one follower",
            roles,
            "wait until `gemin_k8s status` shows a leader and a follower",
        ));
    }
    let r = l.replication.clone().unwrap_or_default();
    if r.streaming {
        out.push(Check::pass("follower streaming", format!("{} streams from {}", f.node, l.node)));
    } else {
        out.push(Check::fail(
            "follower streaming",
            format!("{} does not stream from {}", f.node, l.node),
            format!("look at {}'s PostgreSQL log and `gemin_k8s status --details`", f.node),
        ));
    }
    match (r.sync_state.as_deref(), r.durability.as_str()) {
        (Some("sync"), _) => {
            out.push(Check::pass("follower synchronous", format!("sync_state sync, {}", r.durability)))
        }
        (_, "async") => {
            out.push(Check::pass("follower synchronous", "async by configuration (the hand-over proof still holds)"))
        }
        (state, durability) => out.push(Check::fail(
            "follower synchronous",
            format!("sync_state {}, {durability}", state.unwrap_or("none")),
            "wait until the standby is back in sync (`gemin_k8s status` shows durability synchronous)",
        )),
    }
    match (r.flush_lag_bytes, r.sync_state.as_deref()) {
        (Some(0), _) => out.push(Check::pass("lag", "0 bytes not flushed")),
        (Some(n), Some("sync")) => {
            out.push(Check::pass("lag", format!("{n} bytes in flight; commits wait for the standby")))
        }
        (Some(n), _) => out.push(Check::fail(
            "lag",
            format!("{n} bytes not flushed by the standby"),
            "wait for the standby to catch up",
        )),
        (None, _) => out.push(Check::fail("lag", "unknown", "wait until the standby streams")),
    }
    let (lt, ft) = (l.datastore.as_ref().and_then(|d| d.timeline), f.datastore.as_ref().and_then(|d| d.timeline));
    let timelines = format!("{} {}, {} {}", l.node, show(lt), f.node, show(ft));
    if lt.is_some() && lt == ft {
        out.push(Check::pass("same timeline", timelines));
    } else {
        out.push(Check::fail(
            "same timeline",
            timelines,
            "wait until the follower has rejoined the leader (`gemin_k8s status`)",
        ));
    }
    for name in HOT_STANDBY_SETTINGS {
        let (lv, fv) = (f_setting(l, name), f_setting(f, name));
        let value = format!("{} {}, {} {}", l.node, show(lv), f.node, show(fv));
        // The standby needs at least the primary's now, and after the
        // switchover the old primary is the standby: equal both ways.
        if lv.is_some() && lv == fv {
            out.push(Check::pass(name, value));
        } else {
            let larger = lv.max(fv).map_or("the same value".into(), |v| v.to_string());
            out.push(Check::fail(
                name,
                value,
                format!(
                    "set {name} to {larger} on both nodes (ALTER SYSTEM SET {name} = {larger}; then restart PostgreSQL \
                     on that node): a standby with a smaller value stops replaying"
                ),
            ));
        }
    }
    let witness: Vec<String> = [l, f].iter().map(|s| format!("{} {}", s.node, s.witness.state)).collect();
    let witness = format!("mode {}: {}", l.witness.mode, witness.join(", "));
    if [l, f].iter().any(|s| s.witness.state == "unreachable") {
        out.push(Check::fail("witness reachable", witness, "restore the witness (gateway or arbiter) first"));
    } else {
        out.push(Check::pass("witness reachable", witness));
    }
    for s in [l, f] {
        let d = s.datastore.clone().unwrap_or_default();
        match (d.disk_free_bytes, d.disk_total_bytes) {
            (Some(free), Some(total)) if total > 0 => {
                let value = format!("{} free of {} ({}%)", bytes(free), bytes(total), free * 100 / total);
                if free >= MIN_FREE_BYTES && free * 100 / total >= MIN_FREE_PERCENT {
                    out.push(Check::pass(&format!("disk headroom on {}", s.node), value));
                } else {
                    out.push(Check::fail(
                        &format!("disk headroom on {}", s.node),
                        value,
                        format!("free space on {}'s data volume (at least 1 GiB and 5%)", s.node),
                    ));
                }
            }
            _ => out.push(Check::fail(
                &format!("disk headroom on {}", s.node),
                "unknown",
                "the agent does not report its disk; upgrade it",
            )),
        }
    }
    match (leader.clock_offset_ms(), follower.clock_offset_ms()) {
        (Some(a), Some(b)) => {
            let value = format!("{} ms", (a - b).abs());
            if (a - b).abs() <= MAX_CLOCK_OFFSET_MS {
                out.push(Check::pass("clock offset between the nodes", value));
            } else {
                out.push(Check::fail(
                    "clock offset between the nodes",
                    value,
                    "synchronise the clocks (NTP: chrony or systemd-timesyncd) on both nodes",
                ));
            }
        }
        _ => out.push(Check::fail(
            "clock offset between the nodes",
            "unknown",
            "the agents do not report their clocks; upgrade them",
        )),
    }
    out
}

fn f_setting(s: &NodeStatus, name: &str) -> Option<i64> {
    s.replication.as_ref().and_then(|r| r.settings.get(name).copied())
}

fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("unknown".into(), |v| v.to_string())
}

fn bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    format!("{:.1} GiB", b as f64 / GIB)
}

/// The human rendering of a report.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    if !r.checks.is_empty() {
        for c in &r.checks {
            let _ = writeln!(out, "{}  {:<36} {}", if c.pass { "PASS" } else { "FAIL" }, c.name, c.value);
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "      fix: {fix}");
            }
        }
    }
    if let Some(m) = &r.may_lose {
        let _ = writeln!(out, "may lose: {m}");
    }
    let route = match (&r.from, &r.to) {
        (Some(f), Some(t)) => format!(" {f} -> {t}"),
        _ => String::new(),
    };
    let _ = writeln!(out, "{}{route}: {}", r.operation, r.outcome);
    if let Some(d) = &r.detail {
        let _ = writeln!(out, "  {d}");
    }
    if let Some(p) = r.pause_ms {
        let steps: Vec<String> = r.steps.iter().map(|s| format!("{} {} ms", s.step, s.ms)).collect();
        let _ = writeln!(out, "writes paused at most {p} ms ({})", steps.join(", "));
    }
    if let Some(ms) = r.followed_after_ms {
        let _ = writeln!(out, "old leader follows again after {ms} ms");
    }
    if let (Some(ms), Some(d)) = (r.verify_commit_ms, &r.verify_durability) {
        let _ = writeln!(out, "verify: a write through the VIP committed in {ms:.1} ms; replication {d}");
    }
    out
}

/// How often the command looks at the agents while it waits.
const POLL: Duration = Duration::from_millis(50);

pub async fn run(args: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = cluster_file(args.cluster.as_deref(), global) else {
        bail!("failover needs the cluster file: give --config DIR/cluster.yaml or --cluster NAME");
    };
    let (_, clients) = node_clients(&path, args.request_timeout)?;
    let report = if args.force { force(&args, &clients).await? } else { switchover(&args, &clients).await? };
    match args.output {
        FailoverFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        FailoverFormat::Table => print!("{}", render_text(&report)),
    }
    Ok(if report.success { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Which answer is the leader's and which the node to promote.
fn pick<'a>(answers: &'a [Answer], promote: Option<&str>) -> anyhow::Result<(&'a Answer, &'a Answer)> {
    if let Some(p) = promote
        && !answers.iter().any(|a| a.name == p)
    {
        let names: Vec<&str> = answers.iter().map(|a| a.name.as_str()).collect();
        bail!("--promote {p}: the cluster's nodes are {}", names.join(", "));
    }
    let target = match promote {
        Some(p) => answers.iter().find(|a| a.name == p),
        None => answers
            .iter()
            .find(|a| a.status.as_ref().is_some_and(|s| s.role != "leader"))
            .or_else(|| answers.iter().find(|a| a.status.is_none())),
    };
    let target = target.context("no node to promote: both answer as leader?")?;
    let other = answers.iter().find(|a| a.name != target.name).context("the cluster file names one node")?;
    Ok((other, target))
}

pub(super) async fn switchover(args: &Args, clients: &[(String, AgentClient)]) -> anyhow::Result<Report> {
    let answers = ask(clients).await;
    let (leader, target) = pick(&answers, args.promote.as_deref())?;
    let mut report = Report {
        operation: if args.dry_run { "dry run" } else { "switchover" }.into(),
        from: Some(leader.name.clone()),
        to: Some(target.name.clone()),
        ..Report::default()
    };
    if target.status.as_ref().is_some_and(|s| s.role == "leader") {
        report.outcome = "nothing to do".into();
        report.detail = Some(format!("{} already leads", target.name));
        report.success = true;
        return Ok(report);
    }
    report.checks = checks(leader, target);
    let passed = report.checks.iter().all(|c| c.pass);
    if args.dry_run {
        report.outcome = if passed { "every check passed" } else { "checks failed" }.into();
        report.success = passed;
        return Ok(report);
    }
    if !passed {
        report.outcome = "refused: checks failed".into();
        report.detail = Some("nothing was changed; fix what failed (or --force for a dead leader)".into());
        return Ok(report);
    }
    let client = |name: &str| clients.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone()).expect("named node");
    let (lc, tc) = (client(&leader.name), client(&target.name));
    let epoch_before = target.status.as_ref().map_or(0, |s| s.epoch);
    let asked = Instant::now();
    if let Err(e) = lc.switchover().await {
        // Between the checks and the call the leader's view can change
        // (its standby fell behind for a moment): the leader says no and
        // nothing happens; the report says why.
        let Some(refused) = e.downcast_ref::<crate::peer::client::Refused>() else { return Err(e) };
        report.outcome = "refused by the leader".into();
        report.detail = Some(format!("{}; nothing was changed, run it again", refused.reason));
        return Ok(report);
    }
    let deadline = asked + args.timeout;
    let ms = |t: Instant| t.duration_since(asked).as_millis() as u64;
    let (mut stopping, mut clean, mut withdrawn): (Option<Instant>, Option<Instant>, Option<Instant>) =
        (None, None, None);
    let done = loop {
        let now_answers = ask(clients).await;
        let get = |n: &str| now_answers.iter().find(|a| a.name == n).and_then(|a| a.status.clone());
        let (l, t) = (get(&leader.name), get(&target.name));
        if let Some(h) = l.as_ref().and_then(|s| s.handover.as_ref()) {
            match h.state.as_str() {
                "stopping" => _ = stopping.get_or_insert_with(Instant::now),
                "clean" => {
                    stopping.get_or_insert_with(Instant::now);
                    clean.get_or_insert_with(Instant::now);
                }
                _ => _ = withdrawn.get_or_insert_with(Instant::now),
            }
        }
        if let Some(t) = &t
            && t.role == "leader"
            && t.state != "promoting"
            && t.vip.held_here
            && t.epoch > epoch_before
        {
            break Some((Instant::now(), t.clone()));
        }
        if (stopping.is_some() || withdrawn.is_some())
            && l.as_ref().is_some_and(|s| s.role == "leader" && s.handover.is_none())
        {
            report.outcome = "aborted, cluster unchanged".into();
            report.detail = Some(format!(
                "{} could not prove it held every write of {} (its PostgreSQL log says why); {} leads again and \
                 nothing was promoted",
                target.name, leader.name, leader.name
            ));
            return Ok(report);
        }
        let last = format!(
            "{}: {}; {}: {}",
            leader.name,
            l.as_ref().map_or("unreachable".into(), |s| format!("{} {:?}", s.state, s.handover)),
            target.name,
            t.as_ref().map_or("unreachable".into(), |s| s.state.clone())
        );
        if Instant::now() >= deadline {
            report.outcome = "stuck".into();
            report.detail = Some(format!(
                "no result within {:?} (last seen: {last}). {old} stays fenced (no VIP, PostgreSQL stopped) and \
                 never resumes blindly: it leads again by itself once {new} answers that it never promoted, and \
                 follows {new} if it did. Bring {new} (or the network to it) back and watch `gemin_k8s status`; \
                 if {new} is lost for good, `gemin_k8s failover --force --promote {old}` makes {old} lead again \
                 (what {new} wrote after a promotion would be lost)",
                args.timeout,
                old = leader.name,
                new = target.name,
            ));
            break None;
        }
        tokio::time::sleep(POLL).await;
    };
    let Some((led, new_leader)) = done else { return Ok(report) };
    report.outcome = "done".into();
    report.pause_ms = Some(ms(led));
    let f = new_leader.last_failover.clone();
    let stop = stopping.map_or(0, ms);
    let shutdown = clean.map_or(0, |c| c.duration_since(stopping.unwrap_or(c)).as_millis() as u64);
    report.steps = vec![
        Step { step: "stop writes".into(), ms: stop },
        Step { step: "shutdown".into(), ms: shutdown },
        Step { step: "catch-up and promote".into(), ms: f.as_ref().map_or(0, |f| f.promote_ms) },
        Step { step: "VIP".into(), ms: f.as_ref().map_or(0, |f| f.vip_ms) },
    ];
    report.success = true;
    if args.wait || args.verify {
        wait_and_verify(args, clients, &leader.name, &tc, asked, &mut report).await?;
    }
    Ok(report)
}

/// `--wait`: until the old leader follows and streams; `--verify`: a write
/// through the VIP, and commits waiting for the standby again.
async fn wait_and_verify(
    args: &Args,
    clients: &[(String, AgentClient)],
    old: &str,
    new_leader: &AgentClient,
    asked: Instant,
    report: &mut Report,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    loop {
        let answers = ask(clients).await;
        let follows = answers.iter().any(|a| a.name == old && a.status.as_ref().is_some_and(|s| s.role == "follower"));
        let leader = answers.iter().find_map(|a| a.status.clone().filter(|s| s.role == "leader"));
        let r = leader.and_then(|s| s.replication).unwrap_or_default();
        let synchronous = r.durability == "synchronous" || r.durability == "async";
        if follows && r.streaming && (!args.verify || synchronous) {
            report.followed_after_ms = Some(asked.elapsed().as_millis() as u64);
            report.verify_durability = Some(r.durability.clone());
            break;
        }
        if Instant::now() >= deadline {
            report.success = false;
            report.detail = Some(format!(
                "{old} does not follow the new leader (streaming{}) within {:?}; see `gemin_k8s status --details`",
                if args.verify { ", synchronously" } else { "" },
                args.timeout
            ));
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
    if args.verify {
        match new_leader.probe_write().await {
            Ok(took) => report.verify_commit_ms = Some(took.as_secs_f64() * 1000.0),
            Err(e) => {
                report.success = false;
                report.detail = Some(format!("the write through the VIP failed: {e:#}"));
            }
        }
    } else {
        report.verify_durability = None;
    }
    Ok(())
}

async fn force(args: &Args, clients: &[(String, AgentClient)]) -> anyhow::Result<Report> {
    let answers = ask(clients).await;
    let (leader, target) = pick(&answers, args.promote.as_deref())?;
    let mut report = Report {
        operation: "forced failover".into(),
        from: Some(leader.name.clone()),
        to: Some(target.name.clone()),
        ..Report::default()
    };
    let Some(t) = target.status.clone() else {
        report.outcome = "refused".into();
        report.detail = Some(format!("{} does not answer: {}", target.name, target.error.clone().unwrap_or_default()));
        return Ok(report);
    };
    report.may_lose = Some(may_lose(leader, &t));
    if !args.yes {
        eprint!(
            "{}\nForce {} to take over? Type `yes` to go on: ",
            report.may_lose.as_deref().unwrap_or(""),
            target.name
        );
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the confirmation")?;
        if line.trim() != "yes" {
            report.outcome = "cancelled".into();
            return Ok(report);
        }
    }
    let client = clients.iter().find(|(n, _)| *n == target.name).map(|(_, c)| c.clone()).expect("named node");
    let asked = Instant::now();
    if let Err(e) = client.force_takeover().await {
        report.outcome = "refused".into();
        report.detail = Some(format!("{e:#}"));
        return Ok(report);
    }
    let deadline = asked + args.timeout;
    loop {
        match client.status().await {
            // Its peer gone, a leader shows as fault_detected.
            Ok(s) if s.role == "leader" && s.state != "promoting" && s.vip.held_here => {
                report.outcome = "done".into();
                report.pause_ms = s.last_failover.as_ref().map(|f| f.duration_ms);
                report.detail = Some(format!(
                    "{} leads at epoch {}; when {} comes back it rejoins as follower, its data directory archived first",
                    target.name, s.epoch, leader.name
                ));
                report.success = true;
                break;
            }
            other => {
                if Instant::now() >= deadline {
                    report.outcome = "stuck".into();
                    report.detail = Some(format!(
                        "{} did not lead within {:?}; last seen: {}",
                        target.name,
                        args.timeout,
                        match other {
                            Ok(s) => format!("{} ({})", s.state, s.degraded.join("; ")),
                            Err(e) => format!("{e:#}"),
                        }
                    ));
                    break;
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
    if report.success && args.wait {
        wait_and_verify(args, clients, &leader.name, &client, asked, &mut report).await?;
    }
    Ok(report)
}

/// What a forced takeover by `target` may give up, from what both nodes
/// last said.
fn may_lose(leader: &Answer, target: &NodeStatus) -> String {
    let pos = |s: &NodeStatus| {
        let d = s.datastore.clone().unwrap_or_default();
        format!("timeline {}, LSN {}", show(d.timeline), show(d.lsn))
    };
    let heard = target.peer.last_heard_ms.map_or("never".into(), |ms| format!("{:.1} s ago", ms as f64 / 1000.0));
    let leader_part = match &leader.status {
        Some(l) => format!("{} ({}) is at {} now", l.node, l.role, pos(l)),
        None => format!("{} does not answer; {} last heard it {heard}", leader.name, target.node),
    };
    format!(
        "{} is at {}; {leader_part}. {} {} the synchronous standby when it last heard the leader: {}",
        target.node,
        pos(target),
        target.node,
        if target.takeover.eligible { "was" } else { "was NOT" },
        if target.takeover.eligible {
            "it should hold every acknowledged write"
        } else {
            "writes the leader acknowledged after that are lost"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{DatastoreView, ReplicationView, VipView, WitnessView};

    fn node(name: &str, role: &str) -> NodeStatus {
        let settings = HOT_STANDBY_SETTINGS.iter().map(|s| (s.to_string(), 100)).collect();
        NodeStatus {
            node: name.into(),
            role: role.into(),
            state: role.into(),
            witness: WitnessView { mode: "gateway".into(), state: "reachable".into() },
            vip: VipView::default(),
            replication: Some(ReplicationView {
                durability: if role == "leader" { "synchronous" } else { "standby" }.into(),
                streaming: true,
                sync_state: (role == "leader").then(|| "sync".into()),
                flush_lag_bytes: (role == "leader").then_some(0),
                settings,
                ..ReplicationView::default()
            }),
            datastore: Some(DatastoreView {
                timeline: Some(2),
                lsn: Some("0/3000000".into()),
                disk_free_bytes: Some(50 << 30),
                disk_total_bytes: Some(100 << 30),
            }),
            served_at_unix_ms: 1_000_500,
            ..NodeStatus::default()
        }
    }

    fn answer(s: NodeStatus) -> Answer {
        Answer { name: s.node.clone(), status: Some(s), error: None, sent_ms: 1_000_000, received_ms: 1_001_000 }
    }

    #[test]
    fn a_healthy_pair_passes_every_check() {
        let c = checks(&answer(node("node1", "leader")), &answer(node("node2", "follower")));
        assert!(c.iter().all(|c| c.pass), "{c:#?}");
        assert_eq!(c.len(), 2 + 5 + 5 + 1 + 2 + 1, "{c:#?}");
    }

    #[test]
    fn each_problem_fails_its_check_with_the_value_and_a_fix() {
        let failing = |l: NodeStatus, f: NodeStatus| -> Vec<Check> {
            checks(&answer(l), &answer(f)).into_iter().filter(|c| !c.pass).collect()
        };
        let mut f = node("node2", "follower");
        f.replication.as_mut().unwrap().settings.insert("max_connections".into(), 50);
        let c = failing(node("node1", "leader"), f);
        assert_eq!(c.len(), 1, "{c:#?}");
        assert_eq!(c[0].name, "max_connections");
        assert_eq!(c[0].value, "node1 100, node2 50");
        assert!(c[0].fix.as_deref().unwrap().contains("ALTER SYSTEM SET max_connections = 100"), "{c:?}");

        let mut l = node("node1", "leader");
        let r = l.replication.as_mut().unwrap();
        (r.sync_state, r.durability, r.flush_lag_bytes) = (Some("async".into()), "degraded (async)".into(), Some(4096));
        let c = failing(l, node("node2", "follower"));
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["follower synchronous", "lag"], "{c:#?}");
        assert_eq!(c[1].value, "4096 bytes not flushed by the standby");

        let mut f = node("node2", "follower");
        f.datastore.as_mut().unwrap().timeline = Some(1);
        f.served_at_unix_ms += 5_000;
        f.witness.state = "unreachable".into();
        f.datastore.as_mut().unwrap().disk_free_bytes = Some(1 << 20);
        let c = failing(node("node1", "leader"), f);
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["same timeline", "witness reachable", "disk headroom on node2", "clock offset between the nodes"],
            "{c:#?}"
        );
        assert_eq!(c[3].value, "5000 ms");

        let gone = Answer { status: None, error: Some("connection refused".into()), ..answer(node("node1", "leader")) };
        let c = checks(&gone, &answer(node("node2", "follower")));
        assert_eq!(c.len(), 2);
        assert!(!c[0].pass && c[0].fix.as_deref().unwrap().contains("--force"), "{c:?}");
    }

    #[test]
    fn the_forced_failover_says_what_may_be_lost() {
        let gone = Answer { status: None, error: Some("timed out".into()), ..answer(node("node1", "leader")) };
        let mut f = node("node2", "follower");
        f.peer.last_heard_ms = Some(12_300);
        let text = may_lose(&gone, &f);
        assert!(text.contains("node2 is at timeline 2, LSN 0/3000000"), "{text}");
        assert!(text.contains("node1 does not answer; node2 last heard it 12.3 s ago"), "{text}");
        assert!(text.contains("was NOT the synchronous standby"), "{text}");
        f.takeover.eligible = true;
        assert!(may_lose(&gone, &f).contains("should hold every acknowledged write"));
    }

    #[test]
    fn the_report_shows_checks_and_the_pause_by_step() {
        let r = Report {
            operation: "switchover".into(),
            from: Some("node1".into()),
            to: Some("node2".into()),
            outcome: "done".into(),
            checks: vec![Check::fail("lag", "10 bytes", "wait")],
            pause_ms: Some(640),
            steps: vec![Step { step: "shutdown".into(), ms: 120 }],
            ..Report::default()
        };
        let text = render_text(&r);
        assert!(text.contains("FAIL  lag"), "{text}");
        assert!(text.contains("fix: wait"), "{text}");
        assert!(text.contains("switchover node1 -> node2: done"), "{text}");
        assert!(text.contains("writes paused at most 640 ms (shutdown 120 ms)"), "{text}");
    }
}
