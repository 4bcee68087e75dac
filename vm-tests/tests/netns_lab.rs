//! End-to-end on the network-namespace lab: real agents in their own
//! namespaces, a real VIP moved by netlink and gratuitous ARP, seen from a
//! client namespace. Needs root and iproute2; skips with a reason otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use geminik8s::config::WitnessMode;
use geminik8s_vm_tests::netns::{Lab, UpOptions};
use geminik8s_vm_tests::poll;

/// The lab's namespace names are global: one lab at a time.
static LAB: Mutex<()> = Mutex::new(());

/// `gemin_k8s`, built next to this test binary by `cargo test --workspace`
/// (or named by `GEMINIK8S_BIN`).
fn agent_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GEMINIK8S_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("gemin_k8s");
    p.is_file().then_some(p)
}

struct Guard(PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        if std::env::var_os("GEMINIK8S_LAB_KEEP").is_some() {
            eprintln!("GEMINIK8S_LAB_KEEP is set: the lab stays up ({})", self.0.display());
            return;
        }
        if let Err(e) = Lab::down(&self.0) {
            eprintln!("lab teardown failed: {e:#}");
        }
    }
}

fn logs(lab: &Lab) -> String {
    lab.nodes
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(lab.node_dir(&n.name).join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().filter(|l| !l.contains("heartbeat missed")).rev().take(25).collect();
            format!("--- {} agent.log (tail)\n{}", n.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn init(bin: &Path, dir: &Path, extra: &[&str]) {
    let out = Command::new(bin)
        .args(["init", "--name", "lab", "--node1-ip", "10.77.0.11", "--node2-ip", "10.77.0.12", "--vip", "10.77.0.10"])
        .arg("--config-dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Fast timings so the test spends seconds, not minutes, per failover.
const FAST: &str = "health:\n  interval: 300ms\n  fence_timeout: 1s\n";

/// `etcdctl` in the client namespace, talking to Kine through the VIP.
fn etcd(lab: &Lab, args: &[&str]) -> Result<serde_json::Value, String> {
    let endpoint = format!("http://{}:2379", lab.vip);
    let mut argv = vec![
        "env",
        "ETCDCTL_API=3",
        "etcdctl",
        "--endpoints",
        &endpoint,
        "--command-timeout=2s",
        "--dial-timeout=1s",
        "-w",
        "json",
    ];
    argv.extend_from_slice(args);
    let out = lab.exec("client", &argv).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Write a key; returns the revision Kine acknowledged.
fn put(lab: &Lab, key: &str, value: &str) -> Result<i64, String> {
    let v = etcd(lab, &["put", key, value])?;
    v["header"]["revision"].as_i64().ok_or_else(|| format!("no revision in {v}"))
}

/// Keys under `prefix` as Kine serves them.
fn keys(lab: &Lab, prefix: &str) -> Result<Vec<String>, String> {
    let v = etcd(lab, &["get", prefix, "--prefix", "--keys-only"])?;
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    Ok(kvs.iter().filter_map(|kv| kv["key"].as_str()).filter_map(base64_decode).collect())
}

fn base64_decode(s: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        bits = (bits << 6) | ALPHABET.iter().position(|a| *a == c)? as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A node's status as its agent reports it on the local socket.
fn status(lab: &Lab, node: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(&lab.agent_bin)
        .args(["status", "-o", "json", "--socket"])
        .arg(lab.socket(node))
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(v["nodes"][0]["status"].clone())
}

/// Wait until `leader` leads with the VIP and `follower` streams from it.
fn wait_formed(lab: &Lab, leader: &str, follower: &str, timeout: Duration) {
    let formed = poll::until(
        &format!("{leader} leading, {follower} streaming from it"),
        timeout,
        Duration::from_millis(250),
        || {
            let (l, f) = (status(lab, leader)?, status(lab, follower)?);
            let ok = l["role"] == "leader"
                && f["role"] == "follower"
                && f["replication"]["streaming"] == true
                && l["replication"]["durability"] == "synchronous"
                && lab.vip_holders() == [leader.to_string()];
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{leader}: {} {}; {follower}: {} {}; VIP on {:?}",
                    l["role"],
                    l["replication"],
                    f["role"],
                    f["replication"],
                    lab.vip_holders()
                ))
            }
        },
    );
    formed.unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)));
}

struct Up {
    lab: Lab,
    _guard: Guard,
    _tmp: Option<tempfile::TempDir>,
}

/// A fresh lab with its own cluster; `None` (after printing why) when it cannot run here.
fn lab_up(init_extra: &[&str], witness: Option<WitnessMode>) -> Option<Up> {
    if let Some(reason) =
        geminik8s_vm_tests::skip::requires(true, &["ip", "etcdctl", "initdb", "pg_basebackup", "kine"])
    {
        geminik8s_vm_tests::skip::skip("netns_lab", &reason);
        return None;
    }
    let Some(bin) = agent_bin() else {
        geminik8s_vm_tests::skip::skip(
            "netns_lab",
            "gemin_k8s is not built next to the tests (cargo test --workspace builds it)",
        );
        return None;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    // PostgreSQL runs as `postgres` and must reach its data under here.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keep = std::env::var_os("GEMINIK8S_LAB_KEEP").is_some();
    let dir = root.join("cluster");
    init(&bin, &dir, init_extra);
    let run = root.join("run");
    let lab = Lab::up(&UpOptions {
        config_dir: dir,
        run_dir: run.clone(),
        agent_bin: bin,
        witness,
        extra_block: Some(FAST.into()),
        start_agents: true,
    })
    .unwrap();
    Some(Up {
        lab,
        _guard: Guard(run),
        _tmp: if keep {
            std::mem::forget(tmp);
            None
        } else {
            Some(tmp)
        },
    })
}

/// The operator's main path: a cluster forms on first start, takes writes
/// through the VIP, survives the leader's death with every acknowledged
/// write, and takes the old leader back as a follower.
#[test]
fn bootstrap_failover_and_rejoin() {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let Some(up) = lab_up(&[], None) else { return };
    let lab = &up.lab;
    wait_formed(lab, "node1", "node2", Duration::from_secs(60));

    // Writes and reads through the VIP, from the client namespace.
    let mut acked = Vec::new();
    let mut max_rev = 0;
    for i in 0..20 {
        let key = format!("/lab/before/{i:03}");
        let rev = put(lab, &key, "v").unwrap_or_else(|e| panic!("write {key}: {e}\n{}", logs(lab)));
        assert!(rev > max_rev, "revision went backwards: {rev} after {max_rev}");
        max_rev = rev;
        acked.push(key);
    }
    assert_eq!(keys(lab, "/lab/before/").unwrap(), acked);
    assert_eq!(lab.client_vip_mac(), Some(lab.mac("node1").unwrap()), "the client talks to node1 for the VIP");

    // The leader dies.
    lab.kill("node1").unwrap();
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
    assert_eq!((s2["role"].as_str(), s2["epoch"].as_u64()), (Some("leader"), Some(2)), "{s2}");
    // Synchronous replication: every acknowledged write survived.
    assert_eq!(keys(lab, "/lab/before/").unwrap(), acked, "acknowledged writes were lost");

    // The old leader comes back and follows (pg_rewind), nothing lost.
    lab.start("node1").unwrap();
    wait_formed(lab, "node2", "node1", Duration::from_secs(60));
    let archives: Vec<_> = std::fs::read_dir(lab.node_dir("node1"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
        .collect();
    assert!(!archives.is_empty(), "the old leader's data directory was not archived before the rewind");
    let rev2 = put(lab, "/lab/after/001", "v").unwrap();
    assert!(rev2 > rev);
    assert_eq!(keys(lab, "/lab/before/").unwrap(), acked);
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()], "never two VIP holders");
}
