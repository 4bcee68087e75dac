//! `bench-failover`: kill the leader N times in the network-namespace lab,
//! in each witness mode asked for, while writers put keys continuously from
//! the client (through the VIP) and from both nodes (through each node's own
//! Kine); print how long writes through the VIP were refused, the phases of
//! each failover, and whether any acknowledged write was lost. With
//! `--switchover`, planned switchovers through `gemin_k8s failover` instead
//! of kills: the write pause each writer saw, the command's own figure, and
//! whether the old leader needed pg_rewind. A benchmark: it prints, it does
//! not judge. Needs root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use geminik8s::config::WitnessMode;
use geminik8s_vm_tests::chaos::invariants::lost_writes;
use geminik8s_vm_tests::chaos::report::{mode_name, percentile};
use geminik8s_vm_tests::chaos::writers::{Ack, CLIENT, Writer, WriterSpec};
use geminik8s_vm_tests::chaos::{self, Options, bring_up};
use geminik8s_vm_tests::netns::Lab;
use geminik8s_vm_tests::poll::until;
use geminik8s_vm_tests::probe::{agent_bin, failover_cli, logs, range, status, wait_formed};

#[derive(Debug, Parser)]
#[command(name = "bench-failover", about = "Leader kills under steady writers in the namespace lab")]
struct Args {
    /// How many times to kill the leader (or switch over), per witness mode.
    #[arg(long, visible_alias = "switchovers", default_value_t = 20)]
    kills: usize,
    /// Planned switchovers (`gemin_k8s failover --promote`, from the client host) instead of kills.
    #[arg(long)]
    switchover: bool,
    /// Witness modes to measure, each on its own lab, in turn.
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1.., default_values_t = [WitnessMode::None, WitnessMode::Gateway, WitnessMode::Arbiter])]
    witness: Vec<WitnessMode>,
    /// The gemin_k8s binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The lab tests' fast timings (300 ms heartbeats, 1 s fence) instead of the product's defaults.
    #[arg(long)]
    fast: bool,
    /// Keep the last lab and its logs when done.
    #[arg(long)]
    keep: bool,
    /// Also run K3s (the binary in GEMINIK8S_K3S_BINARY, else the stand-in) and measure the kill to
    /// the first Kubernetes API write accepted through the VIP (with `--switchover`: the pause of
    /// those writes).
    #[arg(long)]
    kubernetes: bool,
}

/// Creates a ConfigMap through the VIP (kubectl from the client namespace)
/// until stopped; keeps when each accepted one was sent and accepted.
struct KubeWriter {
    kubeconfig: PathBuf,
    acks: std::sync::Mutex<Vec<(Duration, Duration)>>,
}

impl KubeWriter {
    fn run(&self, lab: &Lab, start: Instant, stop: &AtomicBool) {
        let kc = self.kubeconfig.to_string_lossy().into_owned();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let name = format!("bench-{n}");
            let sent = start.elapsed();
            let argv =
                ["kubectl", "--kubeconfig", &kc, "--request-timeout=2s", "create", "configmap", &name, "-n", "default"];
            match lab.exec("client", &argv) {
                Ok(out) if out.status.success() => {
                    self.acks.lock().unwrap_or_else(|p| p.into_inner()).push((sent, start.elapsed()))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// When the first write sent after `t` was accepted.
    fn first_after(&self, t: Duration) -> Option<Duration> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(sent, _)| *sent > t).map(|(_, at)| *at)
    }

    /// [`pause`] for the Kubernetes writes.
    fn pause(&self, from: Duration, to: Duration) -> Duration {
        pause_in(&self.acks.lock().unwrap_or_else(|p| p.into_inner()), from, to)
    }
}

/// One failover, measured.
#[derive(Debug)]
struct Sample {
    killed: String,
    /// Kill to the first write sent after it and acknowledged through the VIP.
    total: Duration,
    /// Kill to the first Kubernetes write sent after it and accepted through the VIP.
    kubernetes: Option<Duration>,
    silent_ms: Option<u64>,
    promote_ms: u64,
    vip_ms: u64,
}

/// One planned switchover, measured.
#[derive(Debug)]
struct Switchover {
    from: String,
    to: String,
    /// The longest time between two acknowledged writes of the writer
    /// through the VIP, from the request to its first write after the end.
    client_pause: Duration,
    /// The same for the nodes' own writers: the longer of the two.
    node_pause: Duration,
    /// The same for the Kubernetes writer through the VIP (`--kubernetes`).
    kubernetes_pause: Option<Duration>,
    /// The command's own figure: the request to the new leader holding the VIP.
    command_ms: u64,
    /// The command's steps, `name ms` each.
    steps: String,
    /// Whether the old leader needed pg_rewind or a new copy to follow.
    rewound: bool,
}

/// What one witness mode gave.
struct ModeResult {
    mode: WitnessMode,
    samples: Vec<Sample>,
    switchovers: Vec<Switchover>,
    acked: usize,
    lost: usize,
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = args.agent_bin.clone().or_else(agent_bin).context("gemin_k8s not found: build it or pass --agent-bin")?;
    if let Some(reason) = geminik8s_vm_tests::skip::requires(true, &["ip", "nft", "etcdctl", "initdb", "kine"]) {
        bail!("cannot run here: {reason}");
    }
    chaos::stop_on_signals()?;
    let opts = Options {
        modes: args.witness.clone(),
        trials: 0,
        scenarios: Vec::new(),
        seed: 0,
        in_order: false,
        long_cuts: (Duration::ZERO, Duration::ZERO),
        product_timings: !args.fast,
        agent_bin: bin,
        keep: args.keep,
        converge_timeout: Duration::from_secs(120),
        artifacts: PathBuf::from("run/bench-failover"),
        k3s: if args.kubernetes {
            Some(geminik8s_vm_tests::k3s_standin::lab_k3s().context(
                "--kubernetes needs K3s: GEMINIK8S_K3S_BINARY, or the stand-in with kube-apiserver (`just deps`)",
            )?)
        } else {
            None
        },
    };
    let mut results = Vec::new();
    for &mode in &args.witness {
        let tmp = tempfile::tempdir()?;
        std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let up = bring_up(&opts, mode, tmp.path(), 0)?;
        let what = if args.switchover { "switchovers" } else { "kills" };
        eprintln!("[{}] formed; {} {what}", mode_name(mode), args.kills);
        results.push(bench(&up.lab, mode, &args, &opts.agent_bin)?);
        if args.keep {
            let kept = tmp.keep();
            eprintln!("lab kept under {}", kept.display());
        }
    }
    if args.switchover {
        report_switchovers(&results, args.fast);
    } else {
        report(&results, args.fast);
    }
    Ok(())
}

fn bench(lab: &Lab, mode: WitnessMode, args: &Args, bin: &Path) -> anyhow::Result<ModeResult> {
    let (kills, kubernetes) = (args.kills, args.kubernetes);
    let writers: Vec<Writer> = WriterSpec::all(lab).into_iter().map(Writer::new).collect();
    let kube = if kubernetes {
        let kubeconfig = lab.kubeconfig("node1");
        let kc = kubeconfig.to_string_lossy().into_owned();
        until("the Kubernetes API through the VIP", Duration::from_secs(300), Duration::from_secs(1), || {
            lab.exec("client", &["kubectl", "--kubeconfig", &kc, "--request-timeout=5s", "get", "namespaces"])
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    if o.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
                })
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        Some(KubeWriter { kubeconfig, acks: std::sync::Mutex::new(Vec::new()) })
    } else {
        None
    };
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (samples, switchovers) = std::thread::scope(|s| -> anyhow::Result<(Vec<Sample>, Vec<Switchover>)> {
        for w in &writers {
            let stop = &stop;
            s.spawn(move || w.run(lab, 1, start, stop));
        }
        if let Some(k) = &kube {
            let stop = &stop;
            s.spawn(move || k.run(lab, start, stop));
        }
        // However the kills end, the writers stop, or the scope would wait for them forever.
        let result = if args.switchover {
            switchover_loop(lab, mode, kills, &writers, kube.as_ref(), bin, start).map(|s| (Vec::new(), s))
        } else {
            kill_loop(lab, mode, kills, &writers, kube.as_ref(), start).map(|k| (k, Vec::new()))
        };
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    // Everything acknowledged, by every writer, reads back through the VIP.
    let acks: Vec<(String, Vec<_>)> = writers.iter().map(|w| (w.spec.name.clone(), w.acks())).collect();
    let read =
        until("reading the keys back", Duration::from_secs(60), Duration::from_millis(500), || range(lab, "/chaos/1/"))
            .map_err(anyhow::Error::msg)?;
    let lost = lost_writes(&acks, &read).len();
    let acked = acks.iter().map(|(_, a)| a.len()).sum();
    Ok(ModeResult { mode, samples, switchovers, acked, lost })
}

/// How often `node`'s agent has rewound or re-copied its datastore.
fn rewinds(lab: &Lab, node: &str) -> usize {
    let log = std::fs::read_to_string(lab.node_dir(node).join("agent.log")).unwrap_or_default();
    log.matches("postgres_rewound").count() + log.matches("postgres_recloned").count()
}

/// The longest time between two acknowledgements of `acks` from `from` on,
/// up to the first write sent after `to`.
fn pause(acks: &[Ack], from: Duration, to: Duration) -> Duration {
    let times: Vec<(Duration, Duration)> = acks.iter().map(|a| (a.sent, a.at)).collect();
    pause_in(&times, from, to)
}

/// [`pause`] over `(sent, acknowledged)` times in the order they were sent.
fn pause_in(times: &[(Duration, Duration)], from: Duration, to: Duration) -> Duration {
    let end = times.iter().position(|(sent, _)| *sent > to).map_or(times.len(), |i| i + 1);
    let begin = times[..end].iter().rposition(|(_, at)| *at <= from).unwrap_or(0);
    times[begin..end].windows(2).map(|w| w[1].1.saturating_sub(w[0].1)).max().unwrap_or_default()
}

fn switchover_loop(
    lab: &Lab,
    mode: WitnessMode,
    rounds: usize,
    writers: &[Writer],
    kube: Option<&KubeWriter>,
    bin: &Path,
    start: Instant,
) -> anyhow::Result<Vec<Switchover>> {
    let form = Duration::from_secs(120);
    let mut samples = Vec::new();
    let (mut leader, mut follower) = ("node1".to_string(), "node2".to_string());
    for i in 1..=rounds {
        if chaos::interrupted() {
            bail!("interrupted");
        }
        wait_formed(lab, &leader, &follower, form).map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        let warm = start.elapsed();
        until(&format!("writes from every host before switchover {i}"), form, Duration::from_millis(20), || {
            let waiting: Vec<&str> =
                writers.iter().filter(|w| !w.acked_after(warm)).map(|w| w.spec.name.as_str()).collect();
            if waiting.is_empty() { Ok(()) } else { Err(waiting) }
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        let rewound_before = rewinds(lab, &leader);
        let asked = start.elapsed();
        // Right after the last switchover the checks may still wait for the standby.
        let report = until(&format!("switchover {i} to be accepted"), form, Duration::from_millis(200), || {
            let (ok, report) = failover_cli(lab, bin, &["--promote", &follower, "--wait", "--timeout", "60s"])?;
            let retry = geminik8s_vm_tests::probe::failover_may_retry(&report);
            if ok {
                Ok(Ok(report))
            } else if retry {
                Err(report.to_string())
            } else {
                Ok(Err(report))
            }
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?
        .map_err(|r| anyhow::anyhow!("switchover {i} did not succeed: {r:#}\n{}", logs(lab)))?;
        let done = start.elapsed();
        until(&format!("writes from every host after switchover {i}"), form, Duration::from_millis(20), || {
            let waiting: Vec<&str> = writers
                .iter()
                .filter(|w| !w.acks().iter().any(|a| a.sent > done))
                .map(|w| w.spec.name.as_str())
                .collect();
            if waiting.is_empty() { Ok(()) } else { Err(waiting) }
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        if let Some(k) = kube {
            until(&format!("a Kubernetes write after switchover {i}"), form, Duration::from_millis(20), || {
                k.first_after(done).ok_or("none yet")
            })
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        }
        let pause_of = |w: &Writer| pause(&w.acks(), asked, done);
        let client = writers.iter().find(|w| w.spec.name == CLIENT).expect("a client writer");
        let node_pause = writers.iter().filter(|w| w.spec.name != CLIENT).map(pause_of).max().unwrap_or_default();
        // The old leader follows the new one: only then is it known whether it needed pg_rewind.
        wait_formed(lab, &follower, &leader, form).map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        let steps = report["steps"].as_array().map_or(String::new(), |steps| {
            steps
                .iter()
                .map(|s| format!("{} {}", s["step"].as_str().unwrap_or("?"), s["ms"]))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let sample = Switchover {
            from: leader.clone(),
            to: follower.clone(),
            client_pause: pause_of(client),
            node_pause,
            kubernetes_pause: kube.map(|k| k.pause(asked, done)),
            command_ms: report["pause_ms"].as_u64().unwrap_or(0),
            steps,
            rewound: rewinds(lab, &leader) > rewound_before,
        };
        eprintln!(
            "[{}] switchover {i:>2}/{rounds}: {} -> {}, writes through the VIP paused {} s{} (command: {} ms){}",
            mode_name(mode),
            sample.from,
            sample.to,
            secs(sample.client_pause),
            sample.kubernetes_pause.map(|k| format!(", Kubernetes writes {} s", secs(k))).unwrap_or_default(),
            sample.command_ms,
            if sample.rewound { ", the old leader NEEDED pg_rewind" } else { "" }
        );
        samples.push(sample);
        std::mem::swap(&mut leader, &mut follower);
    }
    Ok(samples)
}

fn kill_loop(
    lab: &Lab,
    mode: WitnessMode,
    kills: usize,
    writers: &[Writer],
    kube: Option<&KubeWriter>,
    start: Instant,
) -> anyhow::Result<Vec<Sample>> {
    let client = writers.iter().find(|w| w.spec.name == CLIENT).expect("a client writer");
    let form = Duration::from_secs(120);
    let mut samples = Vec::new();
    let (mut leader, mut follower) = ("node1".to_string(), "node2".to_string());
    for i in 1..=kills {
        if chaos::interrupted() {
            bail!("interrupted");
        }
        // Let the writers get going against the current leader.
        let warm = start.elapsed();
        until(&format!("a write before kill {i}"), Duration::from_secs(30), Duration::from_millis(20), || {
            client.acked_after(warm).then_some(()).ok_or("none yet")
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        if kube.is_some() {
            // A site in its steady state: K3s serves on both nodes (the
            // rejoined one's started again with it).
            until(&format!("K3s serving on both nodes before kill {i}"), form, Duration::from_millis(200), || {
                [&leader, &follower].into_iter().try_for_each(|n| k3s_serving(lab, n))
            })
            .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        }
        let killed_at = start.elapsed();
        lab.kill(&leader)?;
        let first = until(
            &format!("writes through the VIP to resume after kill {i}"),
            Duration::from_secs(120),
            Duration::from_millis(10),
            || client.acks().into_iter().find(|a| a.sent > killed_at).map(|a| a.at).ok_or("none yet"),
        )
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
        let kubernetes = match kube {
            Some(k) => Some(
                until(
                    &format!("Kubernetes writes through the VIP to resume after kill {i}"),
                    Duration::from_secs(180),
                    Duration::from_millis(50),
                    || k.first_after(killed_at).ok_or("none yet"),
                )
                .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?
                    - killed_at,
            ),
            None => None,
        };
        let st = status(lab, &follower).map_err(anyhow::Error::msg)?;
        let f = &st["last_failover"];
        let sample = Sample {
            killed: leader.clone(),
            total: first - killed_at,
            kubernetes,
            silent_ms: f["silent_ms"].as_u64(),
            promote_ms: f["promote_ms"].as_u64().unwrap_or(0),
            vip_ms: f["vip_ms"].as_u64().unwrap_or(0),
        };
        eprintln!(
            "[{}] kill {i:>2}/{kills}: {} down, writes through the VIP back after {} s{}",
            mode_name(mode),
            sample.killed,
            secs(sample.total),
            sample.kubernetes.map(|k| format!(", Kubernetes writes after {} s", secs(k))).unwrap_or_default()
        );
        samples.push(sample);
        // The old leader is powered on again and rejoins before the next kill.
        lab.start(&leader)?;
        std::mem::swap(&mut leader, &mut follower);
        wait_formed(lab, &leader, &follower, form).map_err(|e| anyhow::anyhow!("{e}\n{}", logs(lab)))?;
    }
    Ok(samples)
}

/// Whether `node`'s agent reports its K3s serving.
fn k3s_serving(lab: &Lab, node: &str) -> Result<(), String> {
    let st = status(lab, node)?;
    let k3s = st["components"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "k3s")).cloned();
    match k3s {
        Some(c) if c["state"] == "ok" => Ok(()),
        other => Err(format!("{node}: K3s {other:?}")),
    }
}

fn report_switchovers(results: &[ModeResult], fast: bool) {
    let timings = if fast { "fast lab timings (300 ms heartbeats, 1 s fence)" } else { "default settings" };
    println!(
        "\nplanned switchovers (`gemin_k8s failover --promote`) under steady writers (client through the VIP, \
         each node through its own Kine), {timings}"
    );
    for r in results {
        println!("\n{}:", mode_name(r.mode));
        println!(
            "{:>4}  {:<14} {:>9} {:>7} {:>7} {:>10}  {:<9} steps (ms)",
            "#", "from -> to", "client_s", "node_s", "kube_s", "command_s", "rewind"
        );
        for (i, s) in r.switchovers.iter().enumerate() {
            println!(
                "{:>4}  {:<14} {:>9} {:>7} {:>7} {:>10}  {:<9} {}",
                i + 1,
                format!("{} -> {}", s.from, s.to),
                secs(s.client_pause),
                secs(s.node_pause),
                s.kubernetes_pause.map_or("-".into(), secs),
                secs(Duration::from_millis(s.command_ms)),
                if s.rewound { "NEEDED" } else { "no" },
                s.steps
            );
        }
    }
    println!(
        "\n| witness | switchovers | pause p50 s | pause p99 s | pause max s | node pause p50 s | node pause max s | Kubernetes pause p50 s | Kubernetes pause p99 s | command p50 s | pg_rewind | acknowledged | lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let mut pauses: Vec<Duration> = r.switchovers.iter().map(|s| s.client_pause).collect();
        pauses.sort();
        let Some(max) = pauses.last() else { continue };
        let mut command: Vec<Duration> = r.switchovers.iter().map(|s| Duration::from_millis(s.command_ms)).collect();
        command.sort();
        let mut node: Vec<Duration> = r.switchovers.iter().map(|s| s.node_pause).collect();
        node.sort();
        let mut kube: Vec<Duration> = r.switchovers.iter().filter_map(|s| s.kubernetes_pause).collect();
        kube.sort();
        let kube_at = |p: f64| if kube.is_empty() { "-".to_string() } else { secs(percentile(&kube, p)) };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode_name(r.mode),
            pauses.len(),
            secs(percentile(&pauses, 50.0)),
            secs(percentile(&pauses, 99.0)),
            secs(*max),
            secs(percentile(&node, 50.0)),
            secs(node.last().copied().unwrap_or_default()),
            kube_at(50.0),
            kube_at(99.0),
            secs(percentile(&command, 50.0)),
            r.switchovers.iter().filter(|s| s.rewound).count(),
            r.acked,
            r.lost
        );
    }
    println!("\npause = the longest time between two acknowledged writes of the writer through the VIP, from the");
    println!("request to its first write after the command returned (etcdctl, a new process per write: its own");
    println!("start-up counts); node pause = the same for each node's writer through its own Kine (the longer of");
    println!("the two per switchover); Kubernetes pause = the same for `kubectl create configmap` through the VIP");
    println!("(with K3s or its stand-in); command = the command's own figure, the request to the new leader");
    println!("holding the VIP; pg_rewind = switchovers after which the old leader needed pg_rewind or a new copy;");
    println!("lost = acknowledged writes not read back.");
}

fn report(results: &[ModeResult], fast: bool) {
    let timings = if fast { "fast lab timings (300 ms heartbeats, 1 s fence)" } else { "default settings" };
    println!("\nleader kills under steady writers (client through the VIP, each node through its own Kine), {timings}");
    for r in results {
        println!("\n{}:", mode_name(r.mode));
        println!(
            "{:>4}  {:<7} {:>9} {:>10} {:>10} {:>7} {:>8}",
            "kill", "killed", "writes_s", "silence_s", "promote_s", "vip_s", "rest_s"
        );
        for (i, s) in r.samples.iter().enumerate() {
            let silence = s.silent_ms.map(Duration::from_millis).unwrap_or_default();
            let phases = silence + Duration::from_millis(s.promote_ms + s.vip_ms);
            println!(
                "{:>4}  {:<7} {:>9} {:>10} {:>10} {:>7} {:>8}",
                i + 1,
                s.killed,
                secs(s.total),
                secs(silence),
                secs(Duration::from_millis(s.promote_ms)),
                secs(Duration::from_millis(s.vip_ms)),
                secs(s.total.saturating_sub(phases))
            );
        }
    }
    println!(
        "\n| witness | kills | p50 s | p99 s | max s | Kubernetes p50 s | Kubernetes p99 s | acknowledged | lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let mut totals: Vec<Duration> = r.samples.iter().map(|s| s.total).collect();
        totals.sort();
        if totals.is_empty() {
            continue;
        }
        let mut kube: Vec<Duration> = r.samples.iter().filter_map(|s| s.kubernetes).collect();
        kube.sort();
        let kube_p = |p: f64| if kube.is_empty() { "-".to_string() } else { secs(percentile(&kube, p)) };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode_name(r.mode),
            totals.len(),
            secs(percentile(&totals, 50.0)),
            secs(percentile(&totals, 99.0)),
            secs(*totals.last().expect("not empty")),
            kube_p(50.0),
            kube_p(99.0),
            r.acked,
            r.lost
        );
    }
    println!("\nwrites_s = kill to the first write sent after it and acknowledged through the VIP (etcd API);");
    println!("Kubernetes = kill to the first `kubectl create configmap` sent after it and accepted through the VIP;");
    println!("silence = last word from the old leader to the promotion decision (detection + fence wait);");
    println!("rest = Kine reconnecting and the client's next attempt (etcdctl, 300 ms dial timeout), plus the");
    println!("part of the silence before the kill; lost = acknowledged writes of any writer not read back.");
}
