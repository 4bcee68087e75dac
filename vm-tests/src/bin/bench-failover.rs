//! `bench-failover`: kill the leader N times in the network-namespace lab
//! while a client writes through the VIP; print how long writes were
//! refused, the phases of each failover, and whether any acknowledged write
//! was lost. A benchmark: it prints, it does not judge. Needs root.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use geminik8s_vm_tests::chaos::report::percentile;
use geminik8s_vm_tests::netns::{Lab, UpOptions};
use geminik8s_vm_tests::poll::until;
use geminik8s_vm_tests::probe::{agent_bin, init_cluster, keys, logs, put, status, wait_formed};

#[derive(Debug, Parser)]
#[command(name = "bench-failover", about = "Leader kills under a steady writer in the namespace lab")]
struct Args {
    /// How many times to kill the leader.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// The gemin_k8s binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Extra `geminik8s:` settings for both nodes (YAML), e.g. "health:\n  interval: 300ms".
    #[arg(long)]
    settings: Option<String>,
    /// Keep the lab and its logs when done.
    #[arg(long)]
    keep: bool,
}

/// One failover, measured.
#[derive(Debug)]
struct Sample {
    killed: String,
    /// Kill to the first write acknowledged through the VIP.
    total: Duration,
    silent_ms: Option<u64>,
    promote_ms: u64,
    vip_ms: u64,
    lost: usize,
}

/// Writes `/bench/NNNNNN` through the VIP until stopped; keeps what was
/// acknowledged, when each write was sent and when it was acknowledged.
struct Writer {
    acked: Mutex<Vec<(String, Instant, Instant)>>,
    attempts: Mutex<u64>,
    stop: AtomicBool,
}

impl Writer {
    fn run(&self, lab: &Lab) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let key = format!("/bench/{n:06}");
            *self.attempts.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            let sent = Instant::now();
            if put(lab, &key, "v").is_ok() {
                self.acked.lock().unwrap_or_else(|p| p.into_inner()).push((key, sent, Instant::now()));
                n += 1;
            }
        }
    }

    /// When the first write sent after `t` was acknowledged (a write in
    /// flight at `t` may have been committed by the old leader just before).
    fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        acked.iter().find(|(_, sent, _)| *sent > t).map(|(_, _, at)| *at)
    }

    fn acked_before(&self, t: Instant) -> Vec<String> {
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        acked.iter().filter(|(_, _, at)| *at <= t).map(|(k, _, _)| k.clone()).collect()
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args.agent_bin.clone().or_else(agent_bin).context("gemin_k8s not found: build it or pass --agent-bin")?;
    if let Some(reason) = geminik8s_vm_tests::skip::requires(true, &["ip", "etcdctl", "initdb", "kine"]) {
        bail!("cannot run here: {reason}");
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let dir = root.join("cluster");
    init_cluster(&bin, &dir, &[]).map_err(anyhow::Error::msg)?;
    let run = root.join("run");
    let lab = Lab::up(&UpOptions {
        config_dir: dir,
        run_dir: run.clone(),
        agent_bin: bin,
        witness: None,
        extra_block: args.settings.clone(),
        start_agents: true,
    })?;
    let result = bench(&lab, &args);
    if args.keep {
        let kept = tmp.keep();
        eprintln!("lab kept: {} (remove with `gemini-lab netns down --run-dir {}`)", kept.display(), run.display());
    } else {
        Lab::down(&run)?;
    }
    result
}

fn bench(lab: &Lab, args: &Args) -> anyhow::Result<()> {
    let form = Duration::from_secs(120);
    wait_formed(lab, "node1", "node2", form).map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
    let writer =
        Arc::new(Writer { acked: Mutex::new(Vec::new()), attempts: Mutex::new(0), stop: AtomicBool::new(false) });
    let samples = std::thread::scope(|s| -> anyhow::Result<Vec<Sample>> {
        let w = writer.clone();
        s.spawn(move || w.run(lab));
        // However the kills end, the writer stops, or the scope would wait for it forever.
        let result = kills(lab, args, &writer, form);
        writer.stop.store(true, Ordering::Relaxed);
        result
    })?;
    report(&samples, &writer);
    Ok(())
}

fn kills(lab: &Lab, args: &Args, writer: &Writer, form: Duration) -> anyhow::Result<Vec<Sample>> {
    {
        let mut samples = Vec::new();
        let (mut leader, mut follower) = ("node1".to_string(), "node2".to_string());
        for i in 1..=args.kills {
            // Let the writer get going against the current leader.
            let warm = Instant::now();
            until(&format!("a write before kill {i}"), Duration::from_secs(30), Duration::from_millis(20), || {
                writer.first_ack_after(warm).ok_or("none yet")
            })
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
            let killed_at = Instant::now();
            lab.kill(&leader)?;
            let first = until(
                &format!("writes to resume after kill {i}"),
                Duration::from_secs(120),
                Duration::from_millis(10),
                || writer.first_ack_after(killed_at).ok_or("none yet"),
            )
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
            let before = writer.acked_before(killed_at);
            // Read back through the VIP (retried: the new leader's Kine may still be settling).
            let present: BTreeSet<String> =
                until("reading the keys back", Duration::from_secs(30), Duration::from_millis(200), || {
                    keys(lab, "/bench/")
                })
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .collect();
            let lost = before.iter().filter(|k| !present.contains(*k)).count();
            let st = status(lab, &follower).map_err(anyhow::Error::msg)?;
            let f = &st["last_failover"];
            let sample = Sample {
                killed: leader.clone(),
                total: first - killed_at,
                silent_ms: f["silent_ms"].as_u64(),
                promote_ms: f["promote_ms"].as_u64().unwrap_or(0),
                vip_ms: f["vip_ms"].as_u64().unwrap_or(0),
                lost,
            };
            eprintln!(
                "kill {i:>2}/{}: {} down, writes back after {} s, lost {}",
                args.kills,
                sample.killed,
                secs(sample.total),
                sample.lost
            );
            samples.push(sample);
            // The old leader restarts and rejoins before the next kill.
            lab.start(&leader)?;
            std::mem::swap(&mut leader, &mut follower);
            wait_formed(lab, &leader, &follower, form).map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        }
        Ok(samples)
    }
}

fn report(samples: &[Sample], writer: &Writer) {
    println!("\nleader kills under a steady etcdctl writer through the VIP (default settings unless --settings)");
    println!(
        "{:>4}  {:<7} {:>9} {:>10} {:>10} {:>7} {:>8} {:>5}",
        "kill", "killed", "writes_s", "silence_s", "promote_s", "vip_s", "rest_s", "lost"
    );
    for (i, s) in samples.iter().enumerate() {
        let silence = s.silent_ms.map(Duration::from_millis).unwrap_or_default();
        let phases = silence + Duration::from_millis(s.promote_ms + s.vip_ms);
        let rest = s.total.saturating_sub(phases);
        println!(
            "{:>4}  {:<7} {:>9} {:>10} {:>10} {:>7} {:>8} {:>5}",
            i + 1,
            s.killed,
            secs(s.total),
            secs(silence),
            secs(Duration::from_millis(s.promote_ms)),
            secs(Duration::from_millis(s.vip_ms)),
            secs(rest),
            s.lost
        );
    }
    let mut totals: Vec<Duration> = samples.iter().map(|s| s.total).collect();
    totals.sort();
    if totals.is_empty() {
        return;
    }
    let lost: usize = samples.iter().map(|s| s.lost).sum();
    let acked = writer.acked.lock().map(|a| a.len()).unwrap_or(0);
    let attempts = writer.attempts.lock().map(|a| *a).unwrap_or(0);
    println!(
        "\nkill to first write through the VIP: p50 {} s, p99 {} s, max {} s over {} kills",
        secs(percentile(&totals, 50.0)),
        secs(percentile(&totals, 99.0)),
        secs(*totals.last().expect("not empty")),
        totals.len()
    );
    println!("acknowledged writes lost: {lost} (of {acked} acknowledged, {attempts} attempted)");
    println!("silence = last word from the old leader to the promotion decision (detection + fence wait);");
    println!("rest = Kine reconnecting and the client's next attempt (etcdctl, 300 ms dial timeout), plus the");
    println!("part of the silence before the kill; resolution is one write attempt.");
}
