//! End-to-end on the network-namespace lab: real agents in their own
//! namespaces, a real VIP moved by netlink and gratuitous ARP, seen from a
//! client namespace. Needs root and iproute2; skips with a reason otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use geminik8s_vm_tests::netns::{Lab, UpOptions};
use geminik8s_vm_tests::{poll, require};

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

/// A node's role as its agent reports it on the local socket.
fn role(lab: &Lab, node: &str) -> Result<String, String> {
    let out = Command::new(&lab.agent_bin)
        .args(["status", "-o", "json", "--socket"])
        .arg(lab.socket(node))
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(v["nodes"][0]["status"]["role"].as_str().unwrap_or("").to_string())
}

/// Fast timings so the test spends seconds, not minutes, per failover.
const FAST: &str = "health:\n  interval: 300ms\n  fence_timeout: 1s\n";

#[test]
fn vip_follows_the_leader_and_moves_when_it_dies() {
    require!(root: true, tools: ["ip", "ping"]);
    let Some(bin) = agent_bin() else {
        geminik8s_vm_tests::skip::skip(
            "netns_lab",
            "gemin_k8s is not built next to the tests (cargo test --workspace builds it)",
        );
        return;
    };
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let tmp = if std::env::var_os("GEMINIK8S_LAB_KEEP").is_some() { tmp.keep() } else { tmp.path().to_path_buf() };
    let dir = tmp.join("cluster");
    init(&bin, &dir, &[]);
    let run = tmp.join("run");
    let _guard = Guard(run.clone());
    let lab = Lab::up(&UpOptions {
        config_dir: dir,
        run_dir: run,
        agent_bin: bin,
        witness: None,
        extra_block: Some(FAST.into()),
        start_agents: true,
    })
    .unwrap();

    let vip = lab.vip.to_string();
    let held = poll::until(
        "node1 (bootstrap leader) to hold the VIP",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || match lab.vip_holders().as_slice() {
            [one] if one == "node1" => Ok(()),
            other => Err(other.to_vec()),
        },
    );
    held.unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    let formed = poll::until("node2 to follow", Duration::from_secs(30), Duration::from_millis(200), || {
        match role(&lab, "node2") {
            Ok(r) if r == "follower" => Ok(()),
            other => Err(other),
        }
    });
    formed.unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    // The client reaches the VIP, and its neighbour entry is node1's MAC.
    let ping = lab.exec("client", &["ping", "-c", "1", "-W", "2", &vip]).unwrap();
    assert!(ping.status.success(), "client cannot reach the VIP: {}", String::from_utf8_lossy(&ping.stdout));
    assert_eq!(lab.client_vip_mac(), Some(lab.mac("node1").unwrap()));

    lab.kill("node1").unwrap();
    let moved = poll::until("node2 to take the VIP", Duration::from_secs(30), Duration::from_millis(100), || match lab
        .vip_holders()
        .as_slice()
    {
        [one] if one == "node2" => Ok(()),
        other => Err(other.to_vec()),
    });
    moved.unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    // Gratuitous ARP updated the client without it asking.
    let node2_mac = lab.mac("node2").unwrap();
    let learned = poll::until(
        "the client's VIP entry to point at node2",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || match lab.client_vip_mac() {
            Some(mac) if mac == node2_mac => Ok(()),
            other => Err(other),
        },
    );
    learned.unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    let ping = lab.exec("client", &["ping", "-c", "1", "-W", "2", &vip]).unwrap();
    assert!(ping.status.success(), "the VIP is unreachable after failover");

    // node1 comes back as a follower: still exactly one holder.
    lab.start("node1").unwrap();
    let settled = poll::until(
        "node1 to rejoin without taking the VIP",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || match role(&lab, "node1") {
            Ok(r) if r == "follower" => Ok(()),
            other => Err(other),
        },
    );
    settled.unwrap_or_else(|e| panic!("{e}\n{}", logs(&lab)));
    assert_eq!(lab.vip_holders(), vec!["node2".to_string()], "never two VIP holders");
}
