//! End-to-end on the network-namespace lab: real agents in their own
//! namespaces start real PostgreSQL and Kine, a real VIP moves by netlink
//! and gratuitous ARP, and a client namespace writes through it with
//! etcdctl. Needs root, iproute2, PostgreSQL 15, Kine and etcdctl; skips
//! with a printed reason otherwise.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use geminik8s::config::WitnessMode;
use geminik8s::peer::client::AgentClient;
use geminik8s_vm_tests::netns::{Lab, LabGuard, UpOptions};
use geminik8s_vm_tests::probe::{agent_bin, init_cluster, keys, logs, put, status, wait_formed};
use geminik8s_vm_tests::{poll, probe};

/// The lab's namespace names are global: one lab at a time.
static LAB: Mutex<()> = Mutex::new(());

/// Fast timings so each failover takes seconds.
const FAST: &str = "health:\n  interval: 300ms\n  fence_timeout: 1s\n";
const FORM: Duration = Duration::from_secs(90);

struct Up {
    lab: Lab,
    _guard: LabGuard,
    _tmp: Option<tempfile::TempDir>,
}

/// A fresh lab with its own cluster (`init` with `init_extra`), formed with
/// node1 leading; `None`, after printing why, when it cannot run here.
fn lab_up(init_extra: &[&str], witness: Option<WitnessMode>) -> Option<Up> {
    lab_up_with(init_extra, witness, None)
}

/// [`lab_up`], with K3s run from `k3s`.
fn lab_up_with(init_extra: &[&str], witness: Option<WitnessMode>, k3s: Option<PathBuf>) -> Option<Up> {
    lab_up_block(init_extra, witness, k3s, "")
}

/// [`lab_up_with`], with `block` added to both nodes' cloud-config (YAML
/// below `geminik8s:`; `{node_dir}` is the node's directory).
fn lab_up_block(init_extra: &[&str], witness: Option<WitnessMode>, k3s: Option<PathBuf>, block: &str) -> Option<Up> {
    lab_up_full(init_extra, witness, k3s, block, true)
}

/// [`lab_up_block`], with the agents started (`start_agents`) or left to the test.
fn lab_up_full(
    init_extra: &[&str],
    witness: Option<WitnessMode>,
    k3s: Option<PathBuf>,
    block: &str,
    start_agents: bool,
) -> Option<Up> {
    if let Some(reason) =
        geminik8s_vm_tests::skip::requires(true, &["ip", "etcdctl", "initdb", "pg_basebackup", "pg_rewind", "kine"])
    {
        geminik8s_vm_tests::skip::skip("netns_lab", &reason);
        return None;
    }
    let Some(bin) = agent_bin() else {
        geminik8s_vm_tests::skip::skip("netns_lab", "gemin_k8s is not built (cargo test --workspace builds it)");
        return None;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    // PostgreSQL runs as `postgres` and must reach its data under here.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = root.join("cluster");
    init_cluster(&bin, &dir, init_extra).unwrap();
    let run = root.join("run");
    let opts = UpOptions {
        config_dir: dir,
        run_dir: run.clone(),
        agent_bin: bin,
        witness,
        extra_block: Some(format!("{FAST}{block}")),
        start_agents,
        k3s,
    };
    let lab = Lab::up(&opts).unwrap();
    // Only a lab this test created is torn down (`up` refuses when one exists).
    let keep = std::env::var_os("GEMINIK8S_LAB_KEEP").is_some();
    let up = Up {
        lab,
        _guard: LabGuard::new(run, keep),
        _tmp: if keep {
            drop(tmp.keep());
            None
        } else {
            Some(tmp)
        },
    };
    if keep {
        eprintln!("keeping {}", root.display());
    }
    if start_agents {
        wait_formed(&up.lab, "node1", "node2", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(&up.lab)));
    }
    Some(up)
}

/// Write `n` keys under `prefix` through the VIP; returns them and the last revision.
fn write_keys(lab: &Lab, prefix: &str, n: usize, mut max_rev: i64) -> (Vec<String>, i64) {
    let mut acked = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}{i:03}");
        put_acked(lab, &key, &mut acked, &mut max_rev).unwrap_or_else(|e| panic!("write {key}: {e}\n{}", logs(lab)));
    }
    (acked, max_rev)
}

/// Write `key` through the VIP; once acknowledged, its revision must be
/// above `max_rev`, and it joins `acked`.
fn put_acked(lab: &Lab, key: &str, acked: &mut Vec<String>, max_rev: &mut i64) -> Result<(), String> {
    let rev = put(lab, key, "v")?;
    assert!(rev > *max_rev, "revision went backwards: {rev} after {max_rev}");
    *max_rev = rev;
    acked.push(key.to_string());
    Ok(())
}

/// `/proc/PID/stat` fields after the command: state, parent, process group.
fn proc_stat(pid: u32) -> Option<(String, u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// The agent runs `node`'s PostgreSQL through its process supervisor: the
/// postmaster is the agent's child, leads its own process group and writes
/// to `postgres.log` in the agent's log directory. Returns the postmaster's pid.
fn postgres_is_supervised_by_the_agent(lab: &Lab, node: &str) -> u32 {
    let dir = lab.node_dir(node);
    let pid_file = dir.join("pgdata/postmaster.pid");
    let text = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    let pid: u32 = text.lines().next().unwrap().trim().parse().unwrap();
    let (_, parent, group) = proc_stat(pid).unwrap_or_else(|| panic!("postmaster {pid} of {node} is not running"));
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline.split(|b| *b == 0).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
    assert!(
        words.first().is_some_and(|w| w.ends_with("gemin_k8s")) && words.get(1).is_some_and(|w| w == "agent"),
        "{node}'s postmaster {pid} is a child of {words:?}, not of the agent"
    );
    assert_eq!(group, pid, "{node}'s postmaster does not lead its own process group");
    let log = std::fs::read_to_string(dir.join("logs/postgres.log")).unwrap_or_default();
    assert!(log.contains("database system is ready to accept"), "{node}'s logs/postgres.log: {log}");
    pid
}

/// Watch the VIP for `window`: it must never be on two nodes at once.
fn never_two_holders(lab: &Lab, window: Duration) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        let holders = lab.vip_holders();
        assert!(holders.len() <= 1, "two VIP holders at once: {holders:?}\n{}", logs(lab));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The operator's main path: a cluster forms on first start, takes writes
/// through the VIP, survives the leader's death with every acknowledged
/// write, and takes the old leader back as a follower.
#[test]
fn bootstrap_failover_and_rejoin() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;

    let (acked, max_rev) = write_keys(lab, "/lab/before/", 20, 0);
    assert_eq!(keys(lab, "/lab/before/").unwrap(), acked);
    assert_eq!(lab.client_vip_mac(), Some(lab.mac("node1").unwrap()), "the client talks to node1 for the VIP");

    let postmaster = postgres_is_supervised_by_the_agent(lab, "node1");

    // The leader dies, and its PostgreSQL with it (the whole node is gone).
    lab.kill("node1").unwrap();
    let dead = poll::until("node1's postmaster to be gone", Duration::from_secs(10), Duration::from_millis(50), || {
        match proc_stat(postmaster) {
            None => Ok(()),
            Some((state, ..)) if state == "Z" || state == "X" => Ok(()),
            Some(other) => Err(other),
        }
    });
    dead.unwrap();
    let node2_mac = lab.mac("node2").unwrap();
    let resumed = poll::until(
        "a write through the VIP to succeed again",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || put(lab, "/lab/after/000", "v"),
    );
    let rev = resumed.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > max_rev, "revision {rev} after the failover is not above {max_rev}: revisions went backwards");
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()]);
    assert_eq!(lab.client_vip_mac(), Some(node2_mac), "gratuitous ARP moved the client's entry to node2");
    let s2 = status(lab, "node2").unwrap();
    // Every promotion attempt takes a new epoch; a retried one takes more than one.
    assert_eq!(s2["role"], "leader", "{s2}");
    assert!(s2["epoch"].as_u64().is_some_and(|e| e >= 2), "the promotion did not raise the epoch: {s2}");
    // Synchronous replication: every acknowledged write survived.
    assert_eq!(keys(lab, "/lab/before/").unwrap(), acked, "acknowledged writes were lost");

    // The old leader comes back and follows (pg_rewind), nothing lost.
    lab.start("node1").unwrap();
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let archive_dir = geminik8s::postgres::archive::archive_dir(&lab.node_dir("node1").join("pgdata"));
    let archives = std::fs::read_dir(&archive_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", archive_dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
        .count();
    assert!(archives > 0, "the old leader's data directory was not archived before the rewind");
    let restarted = postgres_is_supervised_by_the_agent(lab, "node1");
    assert_ne!(restarted, postmaster);
    let rev2 = put(lab, "/lab/after/001", "v").unwrap();
    assert!(rev2 > rev);
    assert_eq!(keys(lab, "/lab/before/").unwrap(), acked);
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()], "never two VIP holders");
}

/// A planned switchover through the agent API: the leader hands over, the
/// follower leads, no acknowledged write is lost, and the old leader follows.
#[test]
fn planned_switchover_through_the_api() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let (acked, max_rev) = write_keys(lab, "/lab/switch/", 10, 0);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let leader = AgentClient::unix(&lab.socket("node1"), Duration::from_secs(5));
    let follower = AgentClient::unix(&lab.socket("node2"), Duration::from_secs(5));
    assert!(rt.block_on(follower.switchover()).is_err(), "a follower cannot hand over");
    let start = Instant::now();
    rt.block_on(leader.switchover()).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab)));
    let resumed = poll::until(
        "a write through the VIP after the switchover",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || put(lab, "/lab/switch/after", "v"),
    );
    let rev = resumed.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    eprintln!("switchover: first write through the VIP after {:?}", start.elapsed());
    assert!(rev > max_rev);
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()]);
    let mut all = acked.clone();
    all.push("/lab/switch/after".into());
    assert_eq!(keys(lab, "/lab/switch/").unwrap(), all, "acknowledged writes were lost in the switchover");
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

/// Writers through the VIP from the client and from both nodes, until
/// `stop`: each writes its own keys in order and keeps what was
/// acknowledged, with the revision and the time of the acknowledgement.
struct Writers {
    stop: std::sync::atomic::AtomicBool,
    acked: Mutex<Vec<(String, String, i64, Instant)>>,
}

/// Stops the writers when dropped, also when the test fails while they run
/// (the scope waits for them, so they must end).
struct StopOnDrop<'a>(&'a Writers);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Writers {
    const HOSTS: [&str; 3] = ["client", "node1", "node2"];

    fn new() -> Writers {
        Writers { stop: std::sync::atomic::AtomicBool::new(false), acked: Mutex::new(Vec::new()) }
    }

    fn run(&self, lab: &Lab, from: &str, prefix: &str) {
        let vip = lab.vip.to_string();
        let mut i = 0;
        while !self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            let key = format!("{prefix}{from}/{i:05}");
            if let Ok(rev) = geminik8s_vm_tests::probe::put_from(lab, from, &vip, &key, from) {
                self.acked.lock().unwrap().push((from.to_string(), key, rev, Instant::now()));
            }
            i += 1;
        }
    }

    fn count(&self, from: &str, after: Instant) -> usize {
        self.acked.lock().unwrap().iter().filter(|a| a.0 == from && a.3 > after).count()
    }

    /// The longest time without an acknowledged write from `from` after `since`.
    fn longest_gap(&self, from: &str, since: Instant) -> Duration {
        let acked = self.acked.lock().unwrap();
        let times: Vec<Instant> = acked.iter().filter(|a| a.0 == from).map(|a| a.3).collect();
        times.windows(2).filter(|w| w[1] > since).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// Every acknowledged write is there with the value and revision it was
/// acknowledged with, and each writer's revisions went up.
fn assert_acked_writes_kept(lab: &Lab, writers: &Writers, prefix: &str) {
    let stored: std::collections::BTreeMap<String, (String, i64)> = geminik8s_vm_tests::probe::range(lab, prefix)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)))
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
        .collect();
    let acked = writers.acked.lock().unwrap();
    for host in Writers::HOSTS {
        let revs: Vec<i64> = acked.iter().filter(|a| a.0 == host).map(|a| a.2).collect();
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "{host}'s acknowledged revisions went backwards: {revs:?}");
    }
    let lost: Vec<&(String, String, i64, Instant)> =
        acked.iter().filter(|(host, key, rev, _)| stored.get(key) != Some(&(host.clone(), *rev))).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged writes lost or changed: {lost:?}", lost.len(), acked.len());
}

/// A planned switchover under steady writes from the client and both
/// nodes: no acknowledged write is lost, revisions only go up, the old
/// leader follows the new timeline without pg_rewind (nothing archived),
/// and the write pause is short.
#[test]
fn switchover_under_writes_loses_nothing_and_needs_no_rewind() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let prefix = "/lab/handover/";
    let writers = Writers::new();
    let leader = AgentClient::unix(&lab.socket("node1"), Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    std::thread::scope(|scope| {
        for host in Writers::HOSTS {
            let w = &writers;
            scope.spawn(move || w.run(lab, host, prefix));
        }
        let _stop = StopOnDrop(&writers);
        let begin = Instant::now();
        poll::until("writes from every host before the switchover", FORM, Duration::from_millis(100), || {
            let counts: Vec<usize> = Writers::HOSTS.iter().map(|h| writers.count(h, begin)).collect();
            if counts.iter().all(|c| *c >= 10) { Ok(()) } else { Err(counts) }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        let asked = Instant::now();
        rt.block_on(leader.switchover()).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab)));
        poll::until("node2 to lead and writes from every host after it", FORM, Duration::from_millis(100), || {
            let counts: Vec<usize> = Writers::HOSTS.iter().map(|h| writers.count(h, asked)).collect();
            let leads = status(lab, "node2").map(|s| s["role"] == "leader").unwrap_or(false);
            if leads && counts.iter().all(|c| *c >= 10) { Ok(()) } else { Err((leads, counts)) }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        writers.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!(
            "switchover: longest write pause seen by the client {:?}, node1 {:?}, node2 {:?}",
            writers.longest_gap("client", asked),
            writers.longest_gap("node1", asked),
            writers.longest_gap("node2", asked)
        );
    });
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()]);
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_acked_writes_kept(lab, &writers, prefix);
    let log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
    assert!(log.contains("postgres_followed"), "node1 did not follow the new timeline as it was\n{}", logs(lab));
    assert!(
        !log.contains("postgres_rewound") && !log.contains("postgres_recloned"),
        "the old leader needed pg_rewind or a new copy\n{}",
        logs(lab)
    );
    let archive_dir = geminik8s::postgres::archive::archive_dir(&lab.node_dir("node1").join("pgdata"));
    let archives = std::fs::read_dir(&archive_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(archives, 0, "the old leader's data was archived: it was rewound or re-copied");
    let s1 = status(lab, "node1").unwrap();
    assert_eq!(s1["role"], "follower", "{s1}");
}

/// The leader's durability as its status shows it.
fn durability(lab: &Lab, node: &str) -> String {
    status(lab, node)
        .map(|s| s["replication"]["durability"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// A follower leaving on purpose (what `upgrade` asks before it reboots
/// one): its leader stops waiting for it while it still streams, so its
/// shutdown stalls no commit; back, it is the synchronous standby again.
/// Under steady writes, nothing acknowledged is lost.
#[test]
fn a_follower_that_leaves_is_let_go_by_its_leader_before_it_stops() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let prefix = "/lab/leave/";
    let writers = Writers::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let leader = AgentClient::unix(&lab.socket("node1"), Duration::from_secs(5));
    let follower = AgentClient::unix(&lab.socket("node2"), Duration::from_secs(5));
    assert_eq!(durability(lab, "node1"), "synchronous");
    std::thread::scope(|scope| {
        let w = &writers;
        scope.spawn(move || w.run(lab, "client", prefix));
        let _stop = StopOnDrop(&writers);
        let begin = Instant::now();
        poll::until("writes before the leave", FORM, Duration::from_millis(100), || {
            if writers.count("client", begin) >= 10 { Ok(()) } else { Err(writers.count("client", begin)) }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        let e = rt.block_on(leader.upgrade_leave()).unwrap_err();
        assert!(format!("{e:#}").contains("switch over to its peer before it leaves"), "{e:#}");
        let asked = Instant::now();
        assert!(rt.block_on(follower.upgrade_leave()).unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab))));
        // Let go while it still streams: commits stop waiting for it before it goes.
        poll::until("node1 to stop waiting for node2", FORM, Duration::from_millis(100), || {
            let s = status(lab, "node1").unwrap_or_default();
            let r = &s["replication"];
            match (r["durability"].as_str(), r["streaming"].as_bool()) {
                (Some("degraded (async)"), Some(true)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        eprintln!("leave: the leader stopped waiting after {:?}", asked.elapsed());
        let waits_again = || {
            let log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap_or_default();
            log.lines().filter(|l| l.contains("event=\"postgres_durability\" synchronous=true")).count()
        };
        let before = waits_again();
        let stopped = Instant::now();
        stop_agent(lab, "node2");
        poll::until("writes after node2 stopped", FORM, Duration::from_millis(100), || {
            if writers.count("client", stopped) >= 10 { Ok(()) } else { Err(writers.count("client", stopped)) }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        let acked = writers.acked.lock().unwrap().iter().filter(|a| a.3 > asked).map(|a| a.3).collect::<Vec<_>>();
        let gaps: Vec<(f64, f64)> = acked
            .windows(2)
            .filter(|w| w[1] - w[0] > Duration::from_millis(500))
            .map(|w| ((w[0] - asked).as_secs_f64(), (w[1] - w[0]).as_secs_f64()))
            .collect();
        eprintln!(
            "leave: longest write pause seen by the client from the leave to 10 writes after node2 stopped: {:?} (stopped at {:?}; pauses over 0.5 s at/for: {gaps:?})",
            writers.longest_gap("client", asked),
            stopped - asked
        );
        // Its agent stopped before its PostgreSQL did: commits must not have
        // waited for it again meanwhile.
        assert_eq!(waits_again(), before, "node1 waited for the departed node2 again\n{}", logs(lab));
        // Back (a new start of its agent, as after the reboot): the standby again.
        lab.start_agent("node2").unwrap_or_else(|e| panic!("{e:#}"));
        poll::until("node1 to wait for node2 again", FORM, Duration::from_millis(200), || {
            let d = durability(lab, "node1");
            if d == "synchronous" { Ok(()) } else { Err(d) }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        writers.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    wait_formed(lab, "node1", "node2", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_acked_writes_kept(lab, &writers, prefix);
}

/// `gemin_k8s failover` on the client host (see [`probe::failover_cli`]).
fn failover_cli(lab: &Lab, extra: &[&str]) -> (bool, serde_json::Value) {
    probe::failover_cli(lab, &agent_bin().unwrap(), extra).unwrap_or_else(|e| panic!("{e}"))
}

/// The operator's command: every check of `--dry-run` passes on a healthy
/// pair; a switchover under writes from three hosts reports done with its
/// write pause by step, `--wait --verify` see the old leader follow and a
/// write through the VIP commit with replication synchronous again; then
/// back. Nothing acknowledged is lost and neither old leader needs pg_rewind.
#[test]
fn failover_command_switches_over_and_back() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let prefix = "/lab/failover/";
    let (ok, dry) = failover_cli(lab, &["--dry-run"]);
    assert!(ok, "a healthy pair passes every check: {dry:#}");
    assert_eq!(dry["outcome"], "every check passed", "{dry:#}");
    assert!(dry["checks"].as_array().is_some_and(|c| c.len() >= 12), "{dry:#}");
    let writers = Writers::new();
    let mut reports = Vec::new();
    std::thread::scope(|scope| {
        for host in Writers::HOSTS {
            let w = &writers;
            scope.spawn(move || w.run(lab, host, prefix));
        }
        let _stop = StopOnDrop(&writers);
        for (from, to) in [("node1", "node2"), ("node2", "node1")] {
            let begin = Instant::now();
            poll::until("writes from every host", FORM, Duration::from_millis(100), || {
                let counts: Vec<usize> = Writers::HOSTS.iter().map(|h| writers.count(h, begin)).collect();
                if counts.iter().all(|c| *c >= 5) { Ok(()) } else { Err(counts) }
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
            // Right after a switchover the checks may still wait for the standby.
            let (ok, report) = poll::until("the failover command to succeed", FORM, Duration::from_millis(500), || {
                let (ok, report) = failover_cli(lab, &["--promote", to, "--wait", "--verify", "--timeout", "60s"]);
                if ok || !probe::failover_may_retry(&report) { Ok((ok, report)) } else { Err(report) }
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
            assert!(ok, "{report:#}\n{}", logs(lab));
            assert_eq!((report["from"].as_str(), report["to"].as_str()), (Some(from), Some(to)), "{report:#}");
            assert_eq!(report["outcome"], "done", "{report:#}");
            assert_eq!(report["verify_durability"], "synchronous", "{report:#}");
            assert!(report["verify_commit_ms"].as_f64().is_some(), "{report:#}");
            let steps: Vec<&str> =
                report["steps"].as_array().unwrap().iter().filter_map(|s| s["step"].as_str()).collect();
            assert_eq!(steps, ["stop writes", "shutdown", "catch-up and promote", "VIP"], "{report:#}");
            assert_eq!(status(lab, to).unwrap()["role"], "leader");
            assert_eq!(lab.vip_holders(), vec![to.to_string()]);
            eprintln!("failover {from} -> {to}: {report}");
            reports.push(report);
        }
        writers.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert_acked_writes_kept(lab, &writers, prefix);
    for node in ["node1", "node2"] {
        let log = std::fs::read_to_string(lab.node_dir(node).join("agent.log")).unwrap();
        assert!(log.contains("postgres_followed"), "{node} did not follow as it was\n{}", logs(lab));
        assert!(!log.contains("postgres_rewound") && !log.contains("postgres_recloned"), "{node}\n{}", logs(lab));
    }
}

/// `--dry-run` reports a `max_connections` that differs between the nodes
/// as FAIL with both values and the fix, changes nothing, and exits 1; a
/// switchover is refused on it.
#[test]
fn dry_run_reports_mismatched_max_connections() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let leader_value = status(lab, "node1").unwrap()["replication"]["settings"]["max_connections"].as_i64().unwrap();
    let larger = (leader_value + 50).to_string();
    let sql = format!("ALTER SYSTEM SET max_connections = {larger}");
    let socket_dir = lab.node_dir("node2").join("runtime/postgres-node2");
    let out = lab
        .exec(
            "node2",
            &[
                "runuser",
                "-u",
                "postgres",
                "--",
                "psql",
                "-h",
                socket_dir.to_str().unwrap(),
                "-d",
                "postgres",
                "-c",
                &sql,
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A clean stop: the agent starts it again with the new setting.
    let pid_file = lab.node_dir("node2").join("pgdata/postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().lines().next().unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT).unwrap();
    poll::until("node2 to run with the larger max_connections", FORM, Duration::from_millis(200), || {
        let s = status(lab, "node2")?;
        let v = s["replication"]["settings"]["max_connections"].as_i64();
        if v == Some(leader_value + 50) { Ok(()) } else { Err(format!("{v:?}")) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let (ok, dry) = failover_cli(lab, &["--dry-run"]);
    assert!(!ok, "{dry:#}");
    let failed: Vec<&serde_json::Value> =
        dry["checks"].as_array().unwrap().iter().filter(|c| c["pass"] == false).collect();
    assert_eq!(failed.len(), 1, "{dry:#}");
    assert_eq!(failed[0]["name"], "max_connections");
    assert_eq!(failed[0]["value"], format!("node1 {leader_value}, node2 {larger}"));
    assert!(failed[0]["fix"].as_str().unwrap().contains(&format!("max_connections = {larger}")), "{dry:#}");
    let (ok, refused) = failover_cli(lab, &[]);
    assert!(!ok);
    assert_eq!(refused["outcome"], "refused: checks failed", "{refused:#}");
    assert_eq!(status(lab, "node1").unwrap()["role"], "leader", "nothing changed");
}

/// A forced failover, the way an operator meets it: the follower was away
/// (powered off) long enough for the leader to degrade and take writes it
/// lacks, then the leader dies. The follower, back, does not take over on
/// its own; `failover --force` says it was not the synchronous standby and
/// promotes it at a higher epoch. The old leader, back, does not lead: it
/// archives its data directory (the writes only it had are in there) and
/// follows.
#[test]
fn forced_failover_promotes_and_the_old_leader_rejoins_archived() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let (before, max_rev) = write_keys(lab, "/lab/force/before/", 10, 0);
    lab.kill("node2").unwrap();
    let alone = poll::until("node1 to take writes without node2", FORM, Duration::from_millis(200), || {
        put(lab, "/lab/force/alone/000", "v")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(alone > max_rev);
    let epoch_before = status(lab, "node1").unwrap()["epoch"].as_u64().unwrap();
    lab.kill("node1").unwrap();
    lab.start("node2").unwrap();
    poll::until("node2 to say it does not take over on its own", FORM, Duration::from_millis(200), || {
        let s = status(lab, "node2")?;
        let blocked = s["degraded"].as_array().is_some_and(|d| {
            d.iter().any(|x| x.as_str().is_some_and(|t| t.contains("not taking over") && t.contains("--force")))
        });
        if blocked { Ok(()) } else { Err(s.to_string()) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_ne!(status(lab, "node2").unwrap()["role"], "leader");

    let (ok, report) = failover_cli(lab, &["--force", "--yes", "--promote", "node2", "--timeout", "60s"]);
    assert!(ok, "{report:#}\n{}", logs(lab));
    assert_eq!(report["outcome"], "done", "{report:#}");
    let lose = report["may_lose"].as_str().unwrap();
    assert!(lose.contains("node1 does not answer") && lose.contains("was NOT the synchronous standby"), "{lose}");
    let s2 = status(lab, "node2").unwrap();
    assert_eq!(s2["role"], "leader");
    assert!(s2["epoch"].as_u64().unwrap() > epoch_before, "{s2}");
    let rev = poll::until("a write through the VIP on node2", FORM, Duration::from_millis(200), || {
        put(lab, "/lab/force/after/000", "v")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > alone, "revisions went backwards after the forced failover: {rev} after {alone}");
    assert_eq!(keys(lab, "/lab/force/before/").unwrap(), before, "writes node2 had were lost");

    lab.start("node1").unwrap();
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let archive_dir = geminik8s::postgres::archive::archive_dir(&lab.node_dir("node1").join("pgdata"));
    let archives = std::fs::read_dir(&archive_dir)
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz")).count())
        .unwrap_or(0);
    assert!(archives > 0, "the old leader's divergent data was not archived\n{}", logs(lab));
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()]);
    assert_eq!(status(lab, "node1").unwrap()["role"], "follower");
}

/// The pid of `node`'s WAL receiver: the child of its postmaster named so.
fn wal_receiver(lab: &Lab, node: &str) -> Option<i32> {
    let pid_file = lab.node_dir(node).join("pgdata/postmaster.pid");
    let postmaster: u32 = std::fs::read_to_string(pid_file).ok()?.lines().next()?.trim().parse().ok()?;
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find_map(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let named = String::from_utf8_lossy(&cmdline).contains("walreceiver");
        (named && proc_stat(pid)?.1 == postmaster).then_some(pid as i32)
    })
}

/// The abort path: the follower's WAL receiver is stopped (SIGSTOP) just
/// before a switchover, so it can neither take the old primary's shutdown
/// checkpoint nor replay past it. Nothing is promoted; the command says
/// "aborted, cluster unchanged", node1 leads again at its epoch with every
/// acknowledged write, and takes writes once the receiver runs again.
#[test]
fn switchover_aborts_when_the_follower_cannot_catch_up() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let (acked, max_rev) = write_keys(lab, "/lab/abort/", 10, 0);
    let (ok, dry) = failover_cli(lab, &["--dry-run"]);
    assert!(ok, "{dry:#}");
    let epoch = status(lab, "node1").unwrap()["epoch"].as_u64().unwrap();
    let receiver = wal_receiver(lab, "node2").expect("node2 runs a WAL receiver");
    let pid = nix::unistd::Pid::from_raw(receiver);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The leader still counts node2 in sync (PostgreSQL notices a silent
    // standby only after wal_sender_timeout): the switchover is accepted.
    let (ok, report) = failover_cli(lab, &["--timeout", "90s"]);
    let resumed = poll::until("node1 to lead again", FORM, Duration::from_millis(200), || {
        let s = status(lab, "node1")?;
        if s["role"] == "leader" && s["state"] == "leader" && s.get("handover").is_none() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!ok, "{report:#}");
    assert_eq!(report["outcome"], "aborted, cluster unchanged", "{report:#}\n{}", logs(lab));
    let s1 = resumed.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(s1["epoch"].as_u64().unwrap() >= epoch, "{s1}");
    let s2 = status(lab, "node2").unwrap();
    assert_ne!(s2["role"], "leader", "node2 must not have promoted: {s2}");
    let log1 = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
    assert!(log1.contains("switchover_aborted"), "{}", logs(lab));
    let rev = poll::until("a write through the VIP on node1", FORM, Duration::from_millis(200), || {
        put(lab, "/lab/abort/after", "v")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > max_rev);
    assert_eq!(lab.vip_holders(), vec!["node1".to_string()]);
    let mut all = acked.clone();
    all.push("/lab/abort/after".into());
    assert_eq!(keys(lab, "/lab/abort/").unwrap(), all, "acknowledged writes were lost in the aborted switchover");
    wait_formed(lab, "node1", "node2", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

/// A planned stop of the leader's agent (what `systemctl stop` sends) hands
/// leadership to the follower before the agent exits: writes go on through
/// the VIP on node2, nothing acknowledged is lost, and the stopped node
/// follows when its agent starts again.
#[test]
fn stopping_the_leaders_agent_hands_over() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let (acked, max_rev) = write_keys(lab, "/lab/stop/", 10, 0);
    let pid = lab.agent_pid("node1").expect("node1's agent runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    poll::until("node1's agent to exit", Duration::from_secs(30), Duration::from_millis(100), || {
        match lab.agent_pid("node1") {
            None => Ok(()),
            Some(p) => Err(p),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let s2 = status(lab, "node2").unwrap();
    assert_eq!(s2["role"], "leader", "node2 leads once node1's agent has stopped: {s2}");
    let rev =
        poll::until("a write through the VIP on node2", Duration::from_secs(30), Duration::from_millis(100), || {
            put(lab, "/lab/stop/after", "v")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > max_rev);
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()]);
    let mut all = acked.clone();
    all.push("/lab/stop/after".into());
    assert_eq!(keys(lab, "/lab/stop/").unwrap(), all, "acknowledged writes were lost in the handover");
    lab.start_agent("node1").unwrap();
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

/// The leader's PostgreSQL dies and cannot start again (its data directory
/// became unreadable, as on a failing disk): the agent restarts it within
/// its budget, then hands over to its synchronous standby, which promotes
/// with every acknowledged write. Once the directory is readable again the
/// old leader rejoins as follower.
#[test]
fn a_leader_whose_datastore_cannot_start_hands_over_to_its_synchronous_standby() {
    use std::os::unix::fs::PermissionsExt;
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    let (mut acked, mut max_rev) = write_keys(lab, "/lab/dbfail/", 10, 0);
    let s1 = status(lab, "node1").unwrap();
    assert_eq!(s1["takeover"]["sync_standby"], "node2", "node2 is the synchronous standby: {s1}");
    let epoch_before = s1["epoch"].as_u64().unwrap();

    let pgdata = lab.node_dir("node1").join("pgdata");
    let postmaster = postgres_is_supervised_by_the_agent(lab, "node1");
    std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o000)).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let failed = Instant::now();
    let s2 =
        poll::until("node2 leading after node1's datastore failed", FORM, Duration::from_millis(200), || match status(
            lab, "node2",
        ) {
            Ok(s) if s["role"] == "leader" && s["vip"]["held_here"] == true => Ok(s),
            other => Err(format!("{other:?}")),
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    eprintln!("node1's PostgreSQL killed and unstartable -> node2 leading: {:?}", failed.elapsed());
    assert!(s2["epoch"].as_u64().unwrap() > epoch_before, "a new term: {s2}");
    let log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
    assert!(log.contains("datastore_failing"), "node1 logged its datastore failing\n{}", logs(lab));
    let restarts = log.lines().filter(|l| l.contains("service_restart") && l.contains("Postgres")).count();
    assert_eq!(restarts, 3, "node1 restarted PostgreSQL three times before giving up\n{}", logs(lab));
    assert!(log.contains("giving_up_leadership"), "node1 gave leadership up\n{}", logs(lab));
    let rev = poll::until("a write through the VIP on node2", FORM, Duration::from_millis(100), || {
        put(lab, "/lab/dbfail/after", "v")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > max_rev, "revision {rev} after {max_rev}");
    max_rev = rev;
    acked.push("/lab/dbfail/after".into());
    assert_eq!(keys(lab, "/lab/dbfail/").unwrap(), acked, "acknowledged writes were lost in the hand-over");
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()]);

    // The disk is repaired: node1 follows the new leader.
    std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700)).unwrap();
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let (more, _) = write_keys(lab, "/lab/dbfail/rejoined/", 5, max_rev);
    acked.extend(more);
    assert_eq!(keys(lab, "/lab/dbfail/").unwrap(), acked);
}

/// Witness `gateway`, and a partition where node1 (the leader) sees neither
/// its peer nor the gateway: it fences itself (VIP released, writes refused)
/// before node2, which still sees the gateway, takes over. Never two VIP
/// holders. After healing, node1 follows.
#[test]
fn gateway_witness_partition_fences_the_cut_off_leader() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], Some(WitnessMode::Gateway)) else { return };
    let lab = &up.lab;
    let (acked, _) = write_keys(lab, "/lab/gw/", 10, 0);

    lab.cut("node1", "node2", false).unwrap();
    lab.cut("node1", "gw", false).unwrap();
    let watch = std::thread::scope(|s| {
        let watcher = s.spawn(|| never_two_holders(lab, Duration::from_secs(8)));
        let took = poll::until("node2 to lead", Duration::from_secs(30), Duration::from_millis(100), || {
            match status(lab, "node2") {
                Ok(v) if v["role"] == "leader" && lab.vip_holders() == ["node2".to_string()] => Ok(()),
                other => Err(other.map(|v| v["role"].clone())),
            }
        });
        let joined = watcher.join();
        (took, joined)
    });
    watch.0.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    if let Err(p) = watch.1 {
        std::panic::resume_unwind(p);
    }
    let s1 = status(lab, "node1").unwrap();
    assert_eq!(s1["state"], "fenced", "the cut-off leader did not fence: {s1}");
    // node1's Kine cannot take writes any more (its datastore is stopped and the VIP is gone).
    let direct = geminik8s_vm_tests::probe::etcd_at(lab, "10.77.0.11", &["put", "/lab/gw/split", "x"]);
    assert!(direct.is_err(), "the fenced side accepted a write: {direct:?}");
    // node2's Kine reaches PostgreSQL through the VIP: its connection from before the takeover
    // went to node1 and is dropped silently by the cut, so Kine may need a while to reconnect.
    let read = poll::until("a read through the VIP", Duration::from_secs(30), Duration::from_millis(200), || {
        keys(lab, "/lab/gw/")
    });
    assert_eq!(read.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab))), acked, "acknowledged writes were lost");

    lab.heal().unwrap();
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_eq!(keys(lab, "/lab/gw/").unwrap(), acked);
}

/// Witness `arbiter`: the witness goes down and comes back while both nodes
/// are up, and nothing changes. node1's agent freezes past its lease and
/// fences when it resumes; the pair forms again by itself. Then the leader
/// is cut off from everyone: its lease runs out, it fences, and only then
/// does the other node get the lease and lead.
#[test]
fn arbiter_witness_isolated_leader_loses_the_lease() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let bin = agent_bin();
    let template = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        template.path(),
        "#cloud-config\ngeminik8s:\n  cluster:\n    witness:\n      lease_ttl: 3s\n      lease_renew: 500ms\n",
    )
    .unwrap();
    let t = template.path().to_str().unwrap();
    if bin.is_none() {
        geminik8s_vm_tests::skip::skip("netns_lab", "gemin_k8s is not built");
        return;
    }
    let extra = ["--witness", "arbiter", "--witness-target", "10.77.0.254:7440", "--template", t];
    let Some(up) = lab_up(&extra, None) else { return };
    let lab = &up.lab;
    let (mut acked, mut rev) = write_keys(lab, "/lab/arb/", 10, 0);
    assert_eq!(status(lab, "node1").unwrap()["witness"]["state"], "lease held here");

    // The witness goes away for three lease lifetimes while both nodes are
    // up: nothing changes. The leader keeps its peer, so it keeps taking
    // writes; the follower has nobody to take a lease from.
    lab.witness_down().unwrap();
    let outage = Instant::now();
    let mut n = 0;
    while outage.elapsed() < Duration::from_secs(9) {
        let key = format!("/lab/arb/outage-{n:04}");
        put_acked(lab, &key, &mut acked, &mut rev).unwrap_or_else(|e| {
            panic!("write {key} {:?} into the witness outage: {e}\n{}", outage.elapsed(), logs(lab))
        });
        n += 1;
    }
    let s1 = status(lab, "node1").unwrap();
    assert!(s1["role"] == "leader" && s1["state"] != "fenced", "the leader gave up with its peer there: {s1}");
    lab.witness_up().unwrap();
    // Back with the witness, the leader holds the lease again (its old
    // connection to the witness may have been stuck in TCP's back-off).
    poll::until("node1 to hold the lease again", Duration::from_secs(20), Duration::from_millis(200), || match status(
        lab, "node1",
    ) {
        Ok(v) if v["role"] == "leader" && v["witness"]["state"] == "lease held here" => Ok(()),
        other => Err(format!("{:?}", other.map(|v| (v["role"].clone(), v["witness"].clone())))),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));

    // node1's agent freezes (its PostgreSQL keeps serving) until its lease
    // has run out at the witness. When it resumes it fences, as it must; the
    // cluster then forms again by itself, one node leading with the lease.
    // Writes go on meanwhile, so the follower's data moves past the frozen
    // leader's last checkpoint (and it is the one to lead afterwards).
    lab.pause_agent("node1").unwrap();
    let mut n = 0;
    poll::until("node1's lease to run out at the witness", Duration::from_secs(30), Duration::from_millis(200), || {
        if put_acked(lab, &format!("/lab/arb/paused-{n:04}"), &mut acked, &mut rev).is_ok() {
            n += 1;
        }
        match status(lab, "node2") {
            Ok(v) if v["witness"]["state"] != "lease held by peer" => Ok(()),
            other => Err(format!("{:?}", other.map(|v| v["witness"].clone()))),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    lab.resume_agent("node1").unwrap();
    let (leader, follower) = poll::until("one leader with the lease again", FORM, Duration::from_millis(250), || {
        let (leader, follower) = probe::roles(lab)?;
        match status(lab, &leader) {
            Ok(v) if v["witness"]["state"] == "lease held here" => Ok((leader, follower)),
            other => Err(format!("{leader}: {:?}", other.map(|v| v["witness"].clone()))),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_eq!(keys(lab, "/lab/arb/").unwrap(), acked, "acknowledged writes were lost");

    lab.isolate(&leader).unwrap();
    let result = std::thread::scope(|s| {
        let watcher = s.spawn(|| never_two_holders(lab, Duration::from_secs(10)));
        let took = poll::until(
            &format!("{follower} to lead with the lease"),
            Duration::from_secs(40),
            Duration::from_millis(100),
            || match status(lab, &follower) {
                Ok(v) if v["role"] == "leader" && v["witness"]["state"] == "lease held here" => Ok(()),
                other => Err(format!("{:?}", other.map(|v| (v["role"].clone(), v["witness"].clone())))),
            },
        );
        (took, watcher.join())
    });
    result.0.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    if let Err(p) = result.1 {
        std::panic::resume_unwind(p);
    }
    assert_eq!(status(lab, &leader).unwrap()["state"], "fenced");
    assert_eq!(keys(lab, "/lab/arb/").unwrap(), acked, "acknowledged writes were lost");
    lab.heal().unwrap();
    wait_formed(lab, &follower, &leader, FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

/// `replication: logical` (the design document's mode): the same failover,
/// and Kine's revisions keep increasing after the promotion although
/// sequences are not replicated logically (the agent moves the sequence
/// past the highest revision).
#[test]
fn logical_replication_failover_keeps_revisions_increasing() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let template = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(template.path(), "#cloud-config\ngeminik8s:\n  postgres:\n    replication: logical\n").unwrap();
    let Some(up) = lab_up(&["--template", template.path().to_str().unwrap()], None) else { return };
    let lab = &up.lab;
    let (acked, max_rev) = write_keys(lab, "/lab/logical/", 20, 0);
    // Logical replication applies asynchronously: wait until the follower has every row.
    let s1 = status(lab, "node1").unwrap();
    assert_eq!(s1["replication"]["streaming"], true, "{s1}");
    let caught_up =
        poll::until("the subscriber to apply every write", Duration::from_secs(30), Duration::from_millis(200), || {
            match status(lab, "node1") {
                Ok(v) if v["replication"]["lag_bytes"].as_u64() == Some(0) => Ok(()),
                other => Err(format!("{:?}", other.map(|v| v["replication"].clone()))),
            }
        });
    caught_up.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));

    lab.kill("node1").unwrap();
    let resumed = poll::until(
        "a write through the VIP to succeed again",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || put(lab, "/lab/logical/after", "v"),
    );
    let rev = resumed.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > max_rev, "revision {rev} after a logical-mode promotion is not above {max_rev}");
    let mut all = acked.clone();
    all.push("/lab/logical/after".into());
    assert_eq!(keys(lab, "/lab/logical/").unwrap(), all);
}

/// `kubectl` in the client namespace with a kubeconfig for the VIP.
fn kubectl(lab: &Lab, kubeconfig: &std::path::Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let client = lab.host("client").map_err(|e| e.to_string())?;
    geminik8s_vm_tests::probe::kubectl_in(&client.netns, kubeconfig, args)
}

fn resource_version(v: &serde_json::Value) -> u64 {
    geminik8s_vm_tests::probe::resource_version(v).unwrap_or_else(|e| panic!("{e}"))
}

/// Kubernetes on the replicated datastore, through the VIP: each node runs
/// K3s (here the lab's stand-in, the real kube-apiserver) on its own Kine.
/// Objects written before the leader dies are all there afterwards with
/// their data, resourceVersions only go up, a watch resumed from before the
/// death either sees every later event or is told its version is too old
/// (and a relist sees everything), the old leader's K3s serves again
/// once it has rejoined, and a planned switchover back keeps it all.
#[test]
fn kubernetes_api_survives_the_leaders_death() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(k3s) = geminik8s_vm_tests::k3s_standin::lab_k3s() else {
        geminik8s_vm_tests::skip::skip(
            "kubernetes_api_survives_the_leaders_death",
            "no K3s: neither GEMINIK8S_K3S_BINARY nor the stand-in with kube-apiserver (`just deps`)",
        );
        return;
    };
    if let Some(reason) = geminik8s_vm_tests::skip::requires(true, &["kubectl"]) {
        geminik8s_vm_tests::skip::skip("kubernetes_api_survives_the_leaders_death", &reason);
        return;
    }
    let Some(up) = lab_up_with(&[], None, Some(k3s)) else { return };
    let lab = &up.lab;
    // The operator's kubeconfig, from the agents over their API: the one
    // the leader's agent wrote for the VIP once its K3s served.
    let bin = agent_bin().unwrap();
    let kc = lab.run_dir.join("operator-kubeconfig.yaml");
    poll::until("the kubeconfig from `gemin_k8s kubeconfig`", Duration::from_secs(240), Duration::from_secs(1), || {
        geminik8s_vm_tests::probe::fetch_kubeconfig(&bin, &lab.config_dir, &kc, |argv| {
            lab.exec("client", argv).map_err(|e| format!("{e:#}"))
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_eq!(std::fs::read_to_string(&kc).unwrap(), std::fs::read_to_string(lab.kubeconfig("node1")).unwrap());
    poll::until("the Kubernetes API through the VIP", Duration::from_secs(240), Duration::from_secs(1), || {
        kubectl(lab, &kc, &["get", "namespaces", "-o", "json"])
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));

    kubectl(lab, &kc, &["create", "namespace", "shop", "-o", "json"]).unwrap();
    let mut versions = Vec::new();
    for i in 0..10 {
        let data = format!("--from-literal=price=price-{i}");
        let cm = kubectl(lab, &kc, &["create", "configmap", &format!("cm-{i}"), "-n", "shop", &data, "-o", "json"])
            .unwrap_or_else(|e| panic!("configmap {i}: {e}"));
        versions.push(resource_version(&cm));
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "resourceVersions in write order: {versions:?}");
    let deploy = kubectl(
        lab,
        &kc,
        &["create", "deployment", "web", "-n", "shop", "--image=registry.invalid/web:1", "-o", "json"],
    )
    .unwrap();
    let before = resource_version(&deploy);

    lab.kill("node1").unwrap();
    let after = poll::until(
        "a Kubernetes write through the VIP after the kill",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || kubectl(lab, &kc, &["create", "configmap", "after", "-n", "shop", "--from-literal=price=new", "-o", "json"]),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(
        resource_version(&after) > before,
        "resourceVersion went backwards: {} after {before}",
        resource_version(&after)
    );

    // Every object acknowledged before the death, with its data.
    let list = kubectl(lab, &kc, &["get", "configmaps", "-n", "shop", "-o", "json"]).unwrap();
    let prices: std::collections::BTreeMap<String, String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|cm| {
            Some((cm["metadata"]["name"].as_str()?.to_string(), cm["data"]["price"].as_str()?.to_string()))
        })
        .collect();
    for i in 0..10 {
        assert_eq!(
            prices.get(&format!("cm-{i}")).map(String::as_str),
            Some(format!("price-{i}").as_str()),
            "{prices:?}"
        );
    }
    assert_eq!(prices.get("after").map(String::as_str), Some("new"));
    kubectl(lab, &kc, &["get", "deployment", "web", "-n", "shop", "-o", "json"]).unwrap();

    // A watch resumed from before the death (what an informer does): it
    // delivers the later event, or says its version is too old (410), after
    // which a relist sees everything (checked above). Never silence.
    let client = lab.host("client").unwrap();
    geminik8s_vm_tests::probe::resumed_watch(&client.netns, &kc, "shop", versions[9], "after")
        .unwrap_or_else(|e| panic!("{e}"));

    // The old leader comes back, follows, and its own K3s serves again.
    lab.start("node1").unwrap();
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    poll::until("node1's Kubernetes API", Duration::from_secs(240), Duration::from_secs(1), || {
        kubectl(
            lab,
            &kc,
            &["--server", "https://10.77.0.11:6443", "get", "configmap", "after", "-n", "shop", "-o", "json"],
        )
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));

    // A planned switchover back to node1: the API takes writes through the
    // VIP again, on later resourceVersions, with everything still there.
    let (ok, report) = poll::until("a switchover to node1", FORM, Duration::from_secs(1), || {
        let (ok, report) = failover_cli(lab, &["--promote", "node1", "--wait", "--timeout", "60s"]);
        if ok || !probe::failover_may_retry(&report) { Ok((ok, report)) } else { Err(report.to_string()) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(ok && report["outcome"] == "done", "{report:#}");
    let switched = poll::until(
        "a Kubernetes write after the switchover",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            kubectl(
                lab,
                &kc,
                &["create", "configmap", "switched", "-n", "shop", "--from-literal=price=s", "-o", "json"],
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(resource_version(&switched) > resource_version(&after), "resourceVersion went backwards at the switchover");
    let names: Vec<String> = kubectl(lab, &kc, &["get", "configmaps", "-n", "shop", "-o", "json"]).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|cm| cm["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    for want in (0..10).map(|i| format!("cm-{i}")).chain(["after".into(), "switched".into()]) {
        assert!(names.contains(&want), "{want} missing after the switchover: {names:?}");
    }
}

/// Run `sql` as the server's superuser on `node` (over its socket).
fn psql(lab: &Lab, node: &str, sql: &str) -> String {
    let socket_dir = lab.node_dir(node).join(format!("runtime/postgres-{node}"));
    let argv = ["runuser", "-u", "postgres", "--", "psql", "-h", socket_dir.to_str().unwrap(), "-d", "postgres"];
    let out = lab.exec(node, &[&argv[..], &["-X", "-A", "-t", "-c", sql]].concat()).unwrap();
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The archived WAL segment names in `dest`.
fn archived(dest: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dest.join("wal"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| !n.starts_with('.'));
    names.sort();
    names
}

/// Continuous WAL archiving on the lab: the streaming follower uploads and
/// the leader only spools; a destination that cannot be written shows in
/// `status`; a spool filled meanwhile drops WAL and `status` names the gap,
/// while the cluster keeps serving; once the destination is back the spool
/// drains, and a full backup closes the gap.
#[test]
fn wal_archiving_runs_on_the_follower_and_a_dead_destination_shows_in_status() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let dest_root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dest_root.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dest = dest_root.path().join("backups");
    let block = format!(
        "backup:\n  destination: {}\n  no_encryption: true\n  spool_dir: {{node_dir}}/wal-spool\n  spool_limit_mb: 64\n  archive_timeout: 1s\n  schedule: \"off\"\n",
        dest.display()
    );
    let Some(up) = lab_up_block(&[], None, None, &block) else { return };
    let lab = &up.lab;
    let (_, max_rev) = write_keys(lab, "/lab/archive/", 10, 0);
    let archive = |node: &str| status(lab, node).map(|s| s["archive"].clone());

    // Once the follower streams it uploads, and the leader only tidies its
    // spool; what the follower never had (written before it joined) the
    // leader uploads once it waited half a minute.
    poll::until("node2 to upload and node1's spool to empty", FORM, Duration::from_millis(300), || {
        let (a1, a2) = (archive("node1")?, archive("node2")?);
        if a2["uploading"] == true && a1["uploading"] == false && a1["pending_files"] == 0 {
            Ok(())
        } else {
            Err(format!("node1 {a1}, node2 {a2}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let count = |node: &str| archive(node).unwrap()["archived_files"].as_u64().unwrap();
    let (leader_before, follower_before) = (count("node1"), count("node2"));
    for i in 0..3 {
        write_keys(lab, &format!("/lab/archive/{i}/"), 2, max_rev);
        psql(lab, "node1", "SELECT pg_switch_wal()");
    }
    poll::until("node2 to archive the new WAL and node1's spool to empty", FORM, Duration::from_millis(300), || {
        let (a1, a2) = (archive("node1")?, archive("node2")?);
        let ok = a2["archived_files"].as_u64().is_some_and(|n| n >= follower_before + 3) && a1["pending_files"] == 0;
        if ok { Ok(()) } else { Err(format!("node1 {a1}, node2 {a2}, archived {:?}", archived(&dest))) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_eq!(count("node1"), leader_before, "the leader uploaded while its follower streamed");
    let acked: Vec<String> = keys(lab, "/lab/archive/").unwrap();
    assert_eq!(acked.len(), 16);

    // The destination cannot be written: said so, the WAL stays spooled.
    let away = dest_root.path().join("backups.away");
    std::fs::rename(&dest, &away).unwrap();
    std::fs::write(&dest, "not a directory").unwrap();
    psql(lab, "node1", "SELECT pg_switch_wal()");
    poll::until("node2's status to say archiving fails", FORM, Duration::from_millis(300), || {
        let s = status(lab, "node2")?;
        let degraded = s["degraded"].to_string();
        if degraded.contains("WAL archiving to") && degraded.contains("fails") { Ok(()) } else { Err(degraded) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));

    // More WAL than the spool holds: dropped, the gap named, writes go on.
    psql(lab, "node1", "CREATE TABLE fill AS SELECT repeat(md5(i::text), 40) AS x FROM generate_series(1, 70000) i");
    psql(lab, "node1", "SELECT pg_switch_wal()");
    poll::until("node2's status to name the point-in-time recovery gap", FORM, Duration::from_millis(300), || {
        let s = status(lab, "node2")?;
        let degraded = s["degraded"].to_string();
        if degraded.contains("point-in-time recovery gap since") { Ok(()) } else { Err(degraded) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let spooled: u64 = std::fs::read_dir(lab.node_dir("node2").join("wal-spool"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| geminik8s::backup::wal::WalName::parse(&e.file_name().to_string_lossy()).is_some())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(spooled <= 64 << 20, "the spool holds {spooled} bytes, past its 64 MiB bound");
    let (more, _) = write_keys(lab, "/lab/archive/more/", 5, 0);
    assert_eq!(keys(lab, "/lab/archive/more/").unwrap(), more, "the cluster kept serving");
    assert_eq!(keys(lab, "/lab/archive/").unwrap().len(), acked.len() + more.len());

    // The destination is back: the spool drains; a full backup closes the gap.
    std::fs::remove_file(&dest).unwrap();
    std::fs::rename(&away, &dest).unwrap();
    poll::until("node2's spool to drain", FORM, Duration::from_millis(300), || {
        let a = archive("node2")?;
        if a["pending_files"] == 0 && a["last_error"].is_null() { Ok(()) } else { Err(a.to_string()) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    // The full backup asked through the agent API (`upgrade --backup`):
    // the node takes it from its own PostgreSQL to its destination.
    let sock = lab.socket("node2");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "120", "-X", "POST", "--unix-socket"])
        .arg(&sock)
        .arg("http://node2/v1/backup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "POST /v1/backup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let taken: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(taken["node"], "node2", "{taken}");
    let listed = backups(&dest);
    let ours = listed.iter().find(|b| b["id"] == taken["id"]).unwrap_or_else(|| panic!("{taken} not in {listed:?}"));
    assert_eq!((&ours["node"], &ours["cluster"]), (&"node2".into(), &"lab".into()), "{ours}");
    poll::until("the gap to close after the full backup", FORM, Duration::from_millis(300), || {
        let s = status(lab, "node2")?;
        if s["archive"]["gap"].is_null() { Ok(()) } else { Err(s["archive"].to_string()) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

/// Stop `node`'s agent cleanly (SIGTERM, as systemd stops it) and wait until it is gone.
fn stop_agent(lab: &Lab, node: &str) {
    let pid = lab.agent_pid(node).unwrap_or_else(|| panic!("{node}'s agent runs"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    poll::until(&format!("{node}'s agent to exit"), Duration::from_secs(60), Duration::from_millis(100), || match lab
        .agent_pid(node)
    {
        None => Ok(()),
        Some(p) => Err(p),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

/// The complete backups in `dest`, as `backup list -o json` gives them.
fn backups(dest: &std::path::Path) -> Vec<serde_json::Value> {
    let bin = agent_bin().unwrap();
    let out = std::process::Command::new(bin)
        .args(["backup", "list", "--from", dest.to_str().unwrap(), "-o", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Now, UTC, as RFC 3339 with microseconds.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// Scheduled backups and archived WAL bring the whole cluster back to a
/// point in time, as docs/backup.md says: the agents take full backups on
/// their schedule (the streaming follower takes them) and keep the newest
/// four (with an arbiter witness); node1's agent stopped (node2 takes over,
/// and is the witness's last holder), then node2's; `restore --target-time`
/// on node1, nothing done to node2; started again, the restored node
/// leads with exactly the keys of that time, Kine's revisions go on above
/// every revision seen before, and the other node rewinds (or re-copies)
/// its newer data onto the restored timeline and follows.
#[test]
fn a_cluster_restored_to_a_point_in_time_leads_with_its_keys_at_newer_revisions() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let dest_root = tempfile::tempdir().unwrap();
    let dest = dest_root.path().join("backups");
    let block = format!(
        "backup:\n  destination: {}\n  no_encryption: true\n  spool_dir: {{node_dir}}/wal-spool\n  archive_timeout: 1s\n  schedule: \"*/5 * * * * *\"\n  retention: 4\n",
        dest.display()
    );
    let template = tempfile::NamedTempFile::new().unwrap();
    let witness =
        "#cloud-config\ngeminik8s:\n  cluster:\n    witness:\n      lease_ttl: 3s\n      lease_renew: 500ms\n";
    std::fs::write(template.path(), witness).unwrap();
    let t = template.path().to_str().unwrap();
    let arbiter = ["--witness", "arbiter", "--witness-target", "10.77.0.254:7440", "--template", t];
    let Some(up) = lab_up_block(&arbiter, None, None, &block) else { return };
    let lab = &up.lab;
    let (before, _) = write_keys(lab, "/lab/restore/before/", 10, 0);
    let written = now_rfc3339();

    // Scheduled backups by the follower, the oldest pruned.
    let mut seen = std::collections::BTreeSet::new();
    poll::until("five scheduled backups, by node2 after the writes", FORM, Duration::from_millis(500), || {
        let list = backups(&dest);
        for b in &list {
            seen.insert(b["id"].as_str().unwrap_or_default().to_string());
        }
        let after: Vec<&serde_json::Value> =
            list.iter().filter(|b| b["start_time"].as_str().is_some_and(|t| t > written.as_str())).collect();
        if seen.len() >= 5 && list.len() <= 4 && !after.is_empty() && after.iter().all(|b| b["node"] == "node2") {
            Ok(())
        } else {
            Err(format!("seen {seen:?}; listed {list:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let s2 = status(lab, "node2").unwrap();
    assert!(s2["archive"]["schedule"]["last"].is_string(), "{s2}");

    let target = now_rfc3339();
    let (_, newest_seen) = write_keys(lab, "/lab/restore/after/", 10, 0);
    // A WAL file finished after the writes (archive_timeout 1 s) is in
    // node2's spool or already archived: the writes are in one or the other.
    let after_writes = std::time::SystemTime::now() + Duration::from_millis(1500);
    let spool2 = lab.node_dir("node2").join("wal-spool");
    poll::until("a WAL file finished after the writes", FORM, Duration::from_millis(200), || {
        let newer = |dir: &std::path::Path| {
            std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()).any(|e| {
                geminik8s::backup::wal::WalName::parse(&e.file_name().to_string_lossy()).is_some()
                    && e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > after_writes)
            })
        };
        if newer(&spool2) || newer(&dest.join("wal")) { Ok(()) } else { Err("none yet") }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));

    // node1's agent stops first and hands over: node2 leads alone, on a new
    // timeline, and is the witness's last lease holder when it stops too.
    stop_agent(lab, "node1");
    assert_eq!(status(lab, "node2").unwrap()["role"], "leader", "node2 leads once node1's agent stopped");
    stop_agent(lab, "node2");
    let pgdata = |node: &str| lab.node_dir(node).join("pgdata");
    for node in ["node1", "node2"] {
        poll::until(&format!("{node}'s PostgreSQL to stop"), FORM, Duration::from_millis(200), || {
            if pgdata(node).join("postmaster.pid").exists() { Err("postmaster.pid is there") } else { Ok(()) }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    }
    let bin = agent_bin().unwrap();
    // What the agent had not uploaded yet goes by hand, as docs/backup.md says.
    let out = std::process::Command::new(&bin)
        .args(["backup", "wal-push", "--no-encryption", "--spool", spool2.to_str().unwrap()])
        .args(["--output", dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = backups(&dest);
    assert!(listed.len() <= 4, "retention 4 keeps four of {} backups: {listed:?}", seen.len());
    let data1 = pgdata("node1");
    // On node1, with node1's cloud-config as its agent reads it (the node
    // file and the lab's paths, merged): the restored directory gets node1's
    // configuration (the backups were taken on node2), and node1 leads.
    let files = [lab.config_dir.join("node1.yaml"), lab.node_dir("node1").join("lab.yaml")];
    let ctx = geminik8s::config::CheckContext { root: "/".into(), check_files: false };
    let merged = geminik8s::config::load_files(&files, &ctx).unwrap();
    let config1 = lab.node_dir("node1").join("merged.yaml");
    std::fs::write(&config1, format!("#cloud-config\n{}", geminik8s::config::yaml::to_yaml(&merged.document))).unwrap();
    let state1 = lab.node_dir("node1").join("state");
    let meta_of = |node: &str| {
        let dir = lab.node_dir(node).join("state");
        geminik8s::hostmeta::load(&dir, "lab").unwrap().unwrap_or_else(|| panic!("{node} has a hostMeta"))
    };
    let epoch_before = meta_of("node1").epoch.max(meta_of("node2").epoch);
    let runtime = lab.node_dir("node1").join("runtime");
    // In node1's namespace, where the witness is reached. Refused, with
    // nothing changed, while node2's lease has not run out.
    let restore = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.node("node1").unwrap().netns])
            .arg(&bin)
            .args(["restore", "--from", dest.to_str().unwrap(), "--data-dir", data1.to_str().unwrap(), "--force"])
            .args(["--target-time", &target, "--runtime-dir", runtime.to_str().unwrap()])
            .args(["--state-dir", state1.to_str().unwrap(), "--config", config1.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = poll::until("a restore the witness lets through", FORM, Duration::from_millis(500), || {
        let out = restore();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            Ok(out)
        } else if err.contains("node2 holds the lease") {
            Err(err)
        } else {
            panic!("restore failed: {err}")
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("recovered to") && said.contains("Kine's revision moved"), "{said}");
    assert!(
        said.contains("this node leads with the restored data") && said.contains("recorded by the witness"),
        "{said}"
    );
    let meta1 = meta_of("node1");
    assert!(meta1.epoch > epoch_before && !meta1.fenced, "node1's claim beats node2's: {meta1:?}");
    assert_eq!(meta1.node.role, geminik8s::hostmeta::Role::Leader);

    // Nothing is done to node2: its newer data and its record stay as they
    // are, and it copies the restored data by itself.
    lab.start_agent("node1").unwrap();
    lab.start_agent("node2").unwrap();
    wait_formed(lab, "node1", "node2", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_eq!(keys(lab, "/lab/restore/").unwrap(), before, "exactly the keys that existed at {target}");
    let rev =
        poll::until("a write through the VIP", FORM, Duration::from_millis(200), || put(lab, "/lab/restore/new", "v"))
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > newest_seen, "revision {rev} after the restore is not above {newest_seen}, seen before it");
    let s2 = status(lab, "node2").unwrap();
    assert_eq!(s2["replication"]["streaming"], true, "node2 copied the restored data and follows: {s2}");
    assert_eq!(status(lab, "node1").unwrap()["witness"]["state"], "lease held here");
    let log2 = std::fs::read_to_string(lab.node_dir("node2").join("agent.log")).unwrap();
    assert!(
        log2.contains("postgres_rewound") || log2.contains("postgres_recloned"),
        "node2's newer data was rewound or re-copied\n{}",
        logs(lab)
    );
    let rejoined = match log2.split("postgres_rewind_failed").nth(1) {
        None => "rewound".to_string(),
        Some(why) => format!("re-copied ({})", why.lines().take(4).collect::<Vec<_>>().join(" / ")),
    };
    println!(
        "restored to {target}: {} keys; revision {newest_seen} seen before, {rev} after; node2 {rejoined}",
        before.len()
    );
}

/// `gemin_k8s deploy` from the client's namespace with `token_file`.
fn deploy(lab: &Lab, token_file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    deploy_in(lab, &lab.config_dir, token_file, extra)
}

/// `gemin_k8s deploy` of the cluster in `config_dir` from the client namespace.
fn deploy_in(
    lab: &Lab,
    config_dir: &std::path::Path,
    token_file: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let bin = agent_bin().unwrap();
    let config_dir = config_dir.display().to_string();
    let mut argv = vec![bin.to_str().unwrap(), "deploy", "--config-dir", &config_dir];
    argv.extend(["--token-file", token_file.to_str().unwrap(), "--timeout", "90s"]);
    argv.extend(extra);
    lab.exec("client", &argv).unwrap()
}

/// Two nodes boot without a node configuration, only the site's enrolment
/// token (as the generic image carries it): their agents wait for
/// enrolment. `deploy` with a wrong token is refused and sends nothing;
/// with the token from `init` (and node2, not init's choice, to start the
/// cluster) it sends each node its file and follows the cluster forming;
/// writes then go through the VIP; a second `deploy` leaves the configured
/// nodes as they are; a blank box in node1's place is sent only its own file
/// and copies the data from node2.
#[test]
fn deploy_forms_a_cluster_from_two_unconfigured_nodes() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up_full(&[], None, None, "", false) else { return };
    let lab = &up.lab;
    let token = lab.config_dir.join("enrolment.token");
    for node in ["node1", "node2"] {
        let dir = lab.node_dir(node);
        let enrolment = format!(
            "#cloud-config\ngeminik8s_enrolment:\n  token_file: {}\n  config_dir: {}\n",
            token.display(),
            dir.join("oem").display()
        );
        std::fs::write(dir.join("enrolment.yaml"), enrolment).unwrap();
        lab.start_agent_with(node, &[dir.join("enrolment.yaml"), dir.join("lab.yaml")]).unwrap();
    }

    // A wrong token: refused by the nodes, nothing sent.
    let wrong = lab.run_dir.join("wrong.token");
    std::fs::write(&wrong, "not-the-site-token-0123456789\n").unwrap();
    let refused = poll::until("both enrolment endpoints up", FORM, Duration::from_millis(500), || {
        let out = deploy(lab, &wrong, &[]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if err.contains("refuses the enrolment token") { Ok(err) } else { Err(err) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(refused.contains("node1"), "{refused}");
    assert!(!lab.node_dir("node1").join("oem").exists() && !lab.node_dir("node2").join("oem").exists());

    let out = deploy(lab, &token, &["--bootstrap-leader", "node3"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("has the nodes node1 and node2"), "{err}");

    // node2 starts the cluster (init chose node1), both files sent at once.
    let out = deploy(lab, &token, &["--json", "--bootstrap-leader", "node2", "--parallel"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), logs(lab));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (leader, follower) = (report["leader"].as_str().unwrap(), report["follower"].as_str().unwrap());
    assert_eq!((leader, follower), ("node2", "node1"), "the bootstrap leader leads: {report}");
    for n in report["nodes"].as_array().unwrap() {
        assert_eq!((n["found"].as_str(), n["sent"].as_bool()), (Some("unconfigured"), Some(true)), "{report}");
        assert!(n["fingerprint"].as_str().is_some_and(|f| f.starts_with("SHA256:")), "{report}");
    }
    for node in ["node1", "node2"] {
        let written = lab.node_dir(node).join("oem").join("90_geminik8s.yaml");
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&written).unwrap()) & 0o777;
        assert_eq!(mode, 0o600, "{}", written.display());
        let ctx = geminik8s::config::CheckContext { root: "/".into(), check_files: false };
        let got = geminik8s::config::load_files(&[written], &ctx).unwrap().gemini;
        let init = lab.config_dir.join(format!("{node}.yaml"));
        let mut want = geminik8s::config::load_files(&[init], &ctx).unwrap().gemini;
        want.cluster.bootstrap_leader = "node2".into();
        assert_eq!(got, want, "{node} got its own file, with node2 to start the cluster");
    }
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let rev =
        poll::until("a write through the VIP", FORM, Duration::from_millis(200), || put(lab, "/lab/deploy/a", "v"))
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > 0);

    // Again: both nodes run this cluster already; nothing is sent.
    let out = deploy(lab, &token, &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in again["nodes"].as_array().unwrap() {
        assert_eq!((n["found"].as_str(), n["sent"].as_bool()), (Some("configured"), Some(false)), "{again}");
    }

    // node1's box is replaced by a blank one at the same address: only it is
    // sent its file (the VIP answering is node2's, the cluster's own), and it
    // copies the data from node2 and follows.
    stop_agent(lab, "node1");
    let dir1 = lab.node_dir("node1");
    poll::until("node1's PostgreSQL to stop", FORM, Duration::from_millis(200), || {
        if dir1.join("pgdata").join("postmaster.pid").exists() { Err("postmaster.pid is there") } else { Ok(()) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    for gone in ["oem", "pgdata", "state"] {
        std::fs::rename(dir1.join(gone), dir1.join(format!("{gone}.old-box"))).unwrap();
    }
    std::fs::create_dir(dir1.join("state")).unwrap();
    lab.start_agent_with("node1", &[dir1.join("enrolment.yaml"), dir1.join("lab.yaml")]).unwrap();
    let out = poll::until("node1 waiting for enrolment", FORM, Duration::from_millis(500), || {
        let out = deploy(lab, &token, &["--json"]);
        if out.status.success() { Ok(out) } else { Err(String::from_utf8_lossy(&out.stderr).to_string()) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let partial: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found: Vec<(&str, bool)> = partial["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["found"].as_str().unwrap(), n["sent"].as_bool().unwrap()))
        .collect();
    assert_eq!(found, [("unconfigured", true), ("configured", false)], "{partial}");
    wait_formed(lab, "node2", "node1", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert_eq!(keys(lab, "/lab/deploy/").unwrap(), ["/lab/deploy/a".to_string()], "the acknowledged write is kept");
    println!("deployed in {} s", report["elapsed_seconds"]);

    // The site's boxes are to run another cluster (another CA, same
    // addresses). They run "lab": refused without --force, nothing changes.
    let other = up._tmp.as_ref().map_or_else(|| lab.run_dir.join("other"), |t| t.path().join("other"));
    geminik8s_vm_tests::probe::init_named_cluster(&agent_bin().unwrap(), &other, "other", &[]).unwrap();
    let out = deploy_in(lab, &other, &token, &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("runs node node1 of cluster lab") && err.contains("--force"),
        "{err}"
    );
    geminik8s_vm_tests::probe::formed(lab, "node2", "node1")
        .unwrap_or_else(|e| panic!("refused, and yet: {e}\n{}", logs(lab)));

    // --force: each node hands over if it can, stops, sets "lab" aside and
    // waits for enrolment again; then it is deployed into "other".
    let out = deploy_in(lab, &other, &token, &["--json", "--force", "--bootstrap-leader", "node1"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), logs(lab));
    let forced: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in forced["nodes"].as_array().unwrap() {
        let name = n["name"].as_str().unwrap();
        assert_eq!((n["found"].as_str(), n["sent"].as_bool()), (Some("unconfigured"), Some(true)), "{forced}");
        assert_eq!((n["released"]["cluster"].as_str(), n["released"]["node"].as_str()), (Some("lab"), Some(name)));
    }
    assert_eq!((forced["leader"].as_str(), forced["follower"].as_str()), (Some("node1"), Some("node2")), "{forced}");
    for node in ["node1", "node2"] {
        assert_eq!(status(lab, node).unwrap()["cluster"], "other", "{node} runs the other cluster");
        // "lab" is set aside on the node, renamed: its data is still there.
        let dir = lab.node_dir(node);
        let aside = |prefix: &str, within: &std::path::Path| {
            std::fs::read_dir(within)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix}* in {}", within.display()))
        };
        assert!(aside("pgdata.released-", &dir).join("PG_VERSION").is_file(), "{node}'s lab datastore kept");
        let file = aside("90_geminik8s.yaml.released-", &dir.join("oem"));
        assert!(std::fs::read_to_string(file).unwrap().contains("name: lab"), "{node}'s lab configuration kept");
    }
    assert!(keys(lab, "/lab/deploy/").unwrap().is_empty(), "other's datastore is a new one");
    let rev =
        poll::until("a write to the other cluster", FORM, Duration::from_millis(200), || put(lab, "/lab/other/a", "v"))
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    assert!(rev > 0);
    println!("redeployed with --force in {} s", forced["elapsed_seconds"]);
}

/// `gemin_k8s replace-node` from the client namespace.
fn replace_node(lab: &Lab, extra: &[&str]) -> std::process::Output {
    let bin = agent_bin().unwrap();
    let config_dir = lab.config_dir.display().to_string();
    let mut argv = vec![bin.to_str().unwrap(), "replace-node", "--config-dir", &config_dir];
    if !extra.contains(&"--timeout") {
        argv.extend(["--timeout", "120s"]);
    }
    argv.extend(extra);
    lab.exec("client", &argv).unwrap()
}

/// A TLS call to `url` from the client namespace with `node`'s certificate
/// and key as the cloud-config `file` holds them; the body, or why not.
fn call_with_certificate(lab: &Lab, file: &std::path::Path, url: &str) -> Result<String, String> {
    let ctx = geminik8s::config::CheckContext { root: "/".into(), check_files: false };
    let tls = geminik8s::config::load_files(&[file.to_path_buf()], &ctx).unwrap().gemini.tls;
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, pem) in [("ca.crt", &tls.ca), ("node.crt", &tls.cert), ("node.key", &tls.key)] {
        std::fs::write(dir.path().join(name), pem).unwrap();
        paths.push(dir.path().join(name).display().to_string());
    }
    let argv = ["curl", "-sS", "--max-time", "5", "--cacert", &paths[0], "--cert", &paths[1], "--key", &paths[2], url];
    let out = lab.exec("client", &argv).unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// node2's machine dies for good while a client writes through the VIP; a
/// new, blank machine boots the generic image (enrolment only) at a new
/// address, and `replace-node` brings it in: fenced by the arbiter's lease,
/// a new certificate with the old one revoked, node1 takes the new peer
/// without restarting PostgreSQL (its old slot dropped), the new machine
/// copies the data and streams synchronously. Every acknowledged write is
/// there, node1 refuses the old certificate and takes the new one, the
/// switchover checks pass, `cluster.yaml` names the new address, and a
/// second run changes nothing. Naming the leader is refused without --force.
#[test]
fn a_dead_node_is_replaced_by_a_new_machine_at_a_new_address() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let template = tempfile::NamedTempFile::new().unwrap();
    let witness = "#cloud-config\ngeminik8s:\n  cluster:\n    witness:\n      lease_ttl: 3s\n      lease_renew: 500ms\n  \
                   postgres:\n    degrade_after: 2s\n";
    std::fs::write(template.path(), witness).unwrap();
    let t = template.path().to_str().unwrap();
    let arbiter = ["--witness", "arbiter", "--witness-target", "10.77.0.254:7440", "--template", t];
    let Some(mut up) = lab_up(&arbiter, None) else { return };
    let (before, _) = write_keys(&up.lab, "/lab/replace/before/", 10, 0);

    // node1 leads: naming it is refused without --force, nothing changed.
    let out = replace_node(&up.lab, &["--old-node", "node1", "--new-node-ip", "10.77.0.21"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("node1 is the leader") && err.contains("--force"), "{err}");
    // A live node is not replaced, whatever its role.
    let out = replace_node(&up.lab, &["--old-node", "node2", "--new-node-ip", "10.77.0.21", "--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("still answers"), "{err}");
    let cluster_before = std::fs::read_to_string(up.lab.config_dir.join("cluster.yaml")).unwrap();

    let started_pg = psql(&up.lab, "node1", "SELECT pg_postmaster_start_time()");
    up.lab.kill("node2").unwrap();
    let new_ip: std::net::IpAddr = "10.77.0.21".parse().unwrap();
    up.lab.replace_box("node2", new_ip).unwrap();
    let lab = &up.lab;
    let dir = lab.node_dir("node2");
    let enrolment = format!(
        "#cloud-config\ngeminik8s_enrolment:\n  token_file: {}\n  config_dir: {}\n",
        lab.config_dir.join("enrolment.token").display(),
        dir.join("oem").display()
    );
    std::fs::write(dir.join("enrolment.yaml"), enrolment).unwrap();
    lab.start_agent_with("node2", &[dir.join("enrolment.yaml"), dir.join("lab.yaml")]).unwrap();

    let dry = replace_node(lab, &["--old-node", "node2", "--new-node-ip", "10.77.0.21", "--dry-run", "--json"]);
    assert!(dry.status.success(), "{}\n{}", String::from_utf8_lossy(&dry.stderr), logs(lab));
    assert_eq!(std::fs::read_to_string(lab.config_dir.join("cluster.yaml")).unwrap(), cluster_before);

    let prefix = "/lab/replace/during/";
    let writers = Writers::new();
    let out = std::thread::scope(|s| {
        let _stop = StopOnDrop(&writers);
        s.spawn(|| writers.run(lab, "client", prefix));
        // Cut short (the copy takes longer than 2 s): the record says what is
        // done, and the same command again goes on from there.
        let cut = replace_node(lab, &["--old-node", "node2", "--new-node-ip", "10.77.0.21", "--timeout", "2s"]);
        assert!(!cut.status.success(), "{}", String::from_utf8_lossy(&cut.stderr));
        let record = std::fs::read_to_string(lab.config_dir.join("replace-node2.json"))
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", String::from_utf8_lossy(&cut.stderr), logs(lab)));
        assert!(record.contains("\"survivor\": true"), "{record}\n{}", String::from_utf8_lossy(&cut.stderr));
        let out = replace_node(lab, &["--old-node", "node2", "--new-node-ip", "10.77.0.21", "--verify", "--json"]);
        // A few writes with the new node streaming, then stop.
        let since = Instant::now();
        poll::until("writes after the replacement", FORM, Duration::from_millis(200), || {
            if writers.count("client", since) >= 5 { Ok(()) } else { Err("fewer than 5") }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
        out
    });
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), logs(lab));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("replaced in {} s: {report}", report["elapsed_seconds"]);
    assert_eq!(report["fenced_by"], "done in an earlier run", "{report}");
    assert_eq!(report["survivor_changes"]["changed"], false, "the first run gave node1 its new peer: {report}");
    assert_eq!(report["old_certificate_refused"], true, "{report}");
    let agent_log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
    assert!(agent_log.contains("peer_slot_dropped"), "node2's old slot on node1 was dropped");
    for check in report["checks"].as_array().unwrap() {
        assert_eq!(check["pass"], true, "switchover check: {check}");
    }

    // The data: everything acknowledged, before the death and during the replacement.
    wait_formed(lab, "node1", "node2", FORM).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let stored = keys(lab, "/lab/replace/before/").unwrap();
    assert_eq!(stored, before, "the keys written before node2 died");
    assert_acked_writes_kept(lab, &writers, prefix);
    // node1's PostgreSQL was not restarted, and the new machine streams from it.
    assert_eq!(psql(lab, "node1", "SELECT pg_postmaster_start_time()"), started_pg);
    let replica = psql(lab, "node1", "SELECT client_addr, sync_state FROM pg_stat_replication");
    assert_eq!(replica, "10.77.0.21|sync", "node1's standby is the new machine, synchronous");
    let st = status(lab, "node1").unwrap();
    assert_eq!(st["peer"]["address"], "10.77.0.21", "{st}");

    // Certificates: the old one refused by node1, the new one taken.
    let url = "https://10.77.0.11:7443/v1/health";
    let kept = PathBuf::from(report["old_node_file"].as_str().unwrap());
    assert!(kept.starts_with(&lab.config_dir), "{report}");
    let revoked_refusals = || {
        let log = std::fs::read_to_string(lab.node_dir("node1").join("agent.log")).unwrap();
        log.lines().filter(|l| l.contains("api_refused") && l.to_lowercase().contains("revoked")).count()
    };
    let before_call = revoked_refusals();
    let refused = call_with_certificate(lab, &kept, url).unwrap_err();
    poll::until("node1 to log the revoked certificate it refused", FORM, Duration::from_millis(100), || {
        if revoked_refusals() > before_call { Ok(()) } else { Err(format!("curl said: {refused}")) }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
    let health = call_with_certificate(lab, &lab.config_dir.join("node2.yaml"), url).unwrap();
    assert!(health.contains("\"node\":\"node1\""), "{health}");
    // The witness refuses the old certificate too: no lease under node2's name for it.
    assert_eq!(report["witness_crl_number"], 1, "{report}");
    let lease = "https://10.77.0.254:7440/v1/lease/lab";
    call_with_certificate(lab, &kept, lease).unwrap_err();
    let holder = call_with_certificate(lab, &lab.config_dir.join("node2.yaml"), lease).unwrap();
    assert!(holder.contains("node1"), "{holder}");
    let witness_log = std::fs::read_to_string(lab.run_dir.join("witness.log")).unwrap();
    assert!(witness_log.contains("witness_crl_updated"), "{witness_log}");
    assert!(
        witness_log.lines().any(|l| l.contains("api_refused") && l.to_lowercase().contains("revoked")),
        "the witness refused the revoked certificate:\n{witness_log}"
    );

    // The operator's files name the new machine; node1 keeps its new peer.
    let cluster = geminik8s::clusterfile::ClusterFile::load(&lab.config_dir.join("cluster.yaml")).unwrap();
    let node2 = cluster.nodes.iter().find(|n| n.member.name == "node2").unwrap();
    assert_eq!(node2.member.ip, new_ip);
    assert!(lab.node_dir("node1").join("state").join("peer.yaml").is_file());
    assert!(!lab.config_dir.join("replace-node2.json").exists(), "the progress record goes once done");

    // Again: nothing to do, nothing changed.
    let again = replace_node(lab, &["--old-node", "node2", "--new-node-ip", "10.77.0.21", "--json"]);
    assert!(!again.status.success(), "node2 answers now: {}", String::from_utf8_lossy(&again.stdout));
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(err.contains("still answers"), "{err}");
}
