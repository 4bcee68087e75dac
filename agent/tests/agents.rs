//! Two real `gemin_k8s agent` processes on loopback, with certificates from
//! `init`: they elect the bootstrap leader, `status` on each shows the same
//! picture, and killing the leader is seen and acted on by the other.
//! (PostgreSQL and the VIP are not wired here; the agents say so.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use geminik8s_vm_tests::poll;

mod common;
use common::{free_port, init_loopback};
use serde_json::Value;

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The process may already be dead (killed by the test).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemin_k8s"))
}

fn start(dir: &Path, node: &str) -> Agent {
    let state = dir.join(format!("state-{node}"));
    std::fs::create_dir_all(&state).unwrap();
    let socket = state.join("agent.sock");
    let log = std::fs::File::create(dir.join(format!("{node}.log"))).unwrap();
    let child = bin()
        .args(["agent", "--cloud-config"])
        .arg(dir.join(format!("{node}.yaml")))
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--log-level",
            "debug",
            "--without",
            "vip",
            "--without",
            "services",
            "--without",
            "database",
            "--without",
            "kine",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent { child, socket }
}

fn status_json(args: &[&str]) -> (Output, Option<Value>) {
    let out = bin().arg("status").args(args).args(["-o", "json", "--timeout", "1s"]).output().unwrap();
    let v = serde_json::from_slice(&out.stdout).ok();
    (out, v)
}

fn local(agent: &Agent) -> Option<Value> {
    status_json(&["--socket", agent.socket.to_str().unwrap()])
        .1
        .and_then(|v| v["nodes"][0]["status"].as_object().cloned().map(Value::Object))
}

fn logs(dir: &Path) -> String {
    ["node1", "node2"]
        .iter()
        .map(|n| {
            format!(
                "--- {n}.log (tail)\n{}",
                std::fs::read_to_string(dir.join(format!("{n}.log")))
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn two_agents_elect_agree_and_detect_a_killed_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let block =
        format!("  postgres:\n    port: {}\n  health:\n    interval: 300ms\n    fence_timeout: 1s\n", free_port());
    let dir = init_loopback(tmp.path(), free_port(), &block, &[]);

    let mut n1 = start(&dir, "node1");
    let n2 = start(&dir, "node2");

    let elected =
        poll::until("node1 leading and node2 following", Duration::from_secs(20), Duration::from_millis(200), || {
            let (a, b) = (local(&n1), local(&n2));
            let role = |v: &Option<Value>| {
                v.as_ref().map(|v| (v["role"].as_str().unwrap_or("").to_string(), v["epoch"].as_u64().unwrap_or(0)))
            };
            match (role(&a), role(&b)) {
                (Some((ra, ea)), Some((rb, eb))) if ra == "leader" && rb == "follower" && ea == eb && ea >= 1 => Ok(ea),
                other => Err(other),
            }
        });
    let epoch = elected.unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    assert_eq!(epoch, 1, "a fresh cluster starts at epoch 1");

    // The operator's view from cluster.yaml: both nodes, one leader, and the
    // missing datastore and VIP reported as degraded.
    let (out, view) = status_json(&["--config", dir.join("cluster.yaml").to_str().unwrap()]);
    let view = view.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(1), "absent subsystems make the cluster degraded");
    let nodes = view["nodes"].as_array().unwrap();
    let roles: Vec<&str> = nodes.iter().map(|n| n["status"]["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["leader", "follower"]);
    for n in nodes {
        assert_eq!(n["status"]["peer"]["reachable"], true, "{n}");
        let comps = n["status"]["components"].as_array().unwrap();
        assert!(comps.iter().any(|c| c["name"] == "postgres" && c["state"] == "absent"), "{n}");
    }

    // `failover` over mutual TLS with the operator certificate: both agents
    // answer, the roles are settled, and without a datastore the replication
    // checks fail, so a switchover is refused and nothing changes.
    let failover = |extra: &[&str]| {
        let out = bin()
            .args(["--config", dir.join("cluster.yaml").to_str().unwrap(), "failover", "-o", "json"])
            .args(extra)
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), report)
    };
    let (code, dry) = failover(&["--dry-run"]);
    assert_eq!(code, Some(1), "{dry:#}");
    assert_eq!(
        (dry["from"].as_str(), dry["to"].as_str(), dry["outcome"].as_str()),
        (Some("node1"), Some("node2"), Some("checks failed"))
    );
    let check = |name: &str| dry["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap();
    for passing in [
        "agent on node1 reachable",
        "agent on node2 reachable",
        "one leader, one follower",
        "clock offset between the nodes",
    ] {
        assert_eq!(check(passing)["pass"], true, "{dry:#}");
    }
    assert_eq!(check("follower streaming")["pass"], false);
    assert!(check("follower streaming")["fix"].as_str().is_some(), "{dry:#}");
    let (code, refused) = failover(&[]);
    assert_eq!((code, refused["outcome"].as_str()), (Some(1), Some("refused: checks failed")), "{refused:#}");
    assert_eq!(local(&n1).unwrap()["role"], "leader", "a refused switchover changes nothing");

    // Kill the leader: the follower sees it unreachable, then (witness none) promotes.
    n1.child.kill().unwrap();
    n1.child.wait().unwrap();
    let seen = poll::until("node2 to see node1 gone", Duration::from_secs(10), Duration::from_millis(100), || {
        match local(&n2) {
            Some(v) if v["peer"]["reachable"] == false => Ok(()),
            other => Err(other.map(|v| v["peer"].clone())),
        }
    });
    seen.unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    let promoted = poll::until("node2 to lead at epoch 2", Duration::from_secs(15), Duration::from_millis(100), || {
        match local(&n2) {
            Some(v) if v["role"] == "leader" && v["epoch"] == 2 => Ok(()),
            other => Err(format!("{:?}", other.map(|v| (v["role"].clone(), v["state"].clone(), v["epoch"].clone())))),
        }
    });
    promoted.unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    let hostmeta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state-node2/hostmeta.json")).unwrap()).unwrap();
    assert_eq!(hostmeta["epoch"], 2, "the promotion is recorded in hostMeta");

    // node1 comes back: epoch 2 beats its epoch 1, so it follows.
    let n1 = start(&dir, "node1");
    let rejoined =
        poll::until("node1 to follow node2", Duration::from_secs(20), Duration::from_millis(200), || {
            match (local(&n1), local(&n2)) {
                (Some(a), Some(b)) if a["role"] == "follower" && b["role"] == "leader" => Ok(()),
                (a, b) => Err(format!(
                    "{:?}",
                    (
                        a.map(|v| (v["role"].clone(), v["state"].clone())),
                        b.map(|v| (v["role"].clone(), v["state"].clone()))
                    ),
                )),
            }
        });
    rejoined.unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
}

struct Witness(Child);

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Arbiter mode: a real `gemin_k8s witness serve` and two agents contending
/// for its lease. Only the holder leads; when it dies, the lease passes to
/// the other node (the recorded sync standby) once it has expired, and only
/// then does that node lead.
#[test]
fn arbiter_lease_decides_who_leads() {
    let tmp = tempfile::tempdir().unwrap();
    let target = format!("127.0.0.4:{}", free_port());
    let block = format!(
        "  postgres:\n    port: {}\n  health:\n    interval: 300ms\n    fence_timeout: 1s\n  cluster:\n    witness:\n      lease_ttl: 2s\n      lease_renew: 500ms\n",
        free_port()
    );
    let dir = init_loopback(tmp.path(), free_port(), &block, &["--witness", "arbiter", "--witness-target", &target]);
    let witness_log = std::fs::File::create(dir.join("witness.log")).unwrap();
    let _witness = Witness(
        bin()
            .args(["witness", "serve", "--listen", &target, "--max-ttl", "5s"])
            .arg("--pki-dir")
            .arg(dir.join("pki"))
            .arg("--state-dir")
            .arg(dir.join("witness-state"))
            .stdout(Stdio::null())
            .stderr(witness_log)
            .spawn()
            .unwrap(),
    );
    // The witness persists its records on every change (holder, release, sync standby).
    let lease_record = |field: &str| -> Option<String> {
        let v = std::fs::read_to_string(dir.join("witness-state/leases.json")).ok()?;
        let state: Value = serde_json::from_str(&v).ok()?;
        state["clusters"]["lab"][field].as_str().map(str::to_string)
    };
    let lease_holder = || lease_record("last_holder");

    let mut n1 = start(&dir, "node1");
    let n2 = start(&dir, "node2");
    let formed = poll::until(
        "node1 leading with the lease, node2 following",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let (a, b) = (local(&n1), local(&n2));
            let view = |v: &Option<Value>| {
                v.as_ref().map(|v| {
                    (
                        v["role"].as_str().unwrap_or("").to_string(),
                        v["witness"]["state"].as_str().unwrap_or("").to_string(),
                    )
                })
            };
            match (view(&a), view(&b)) {
                (Some((ra, wa)), Some((rb, _))) if ra == "leader" && wa == "lease held here" && rb == "follower" => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    );
    formed.unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    assert_eq!(lease_holder().as_deref(), Some("node1"));
    // Without a datastore there is nothing to lose: the leader names its
    // peer as the one that may take over.
    poll::until("node2 recorded as sync standby", Duration::from_secs(10), Duration::from_millis(100), || {
        lease_record("sync_standby").filter(|s| s == "node2").ok_or_else(|| lease_record("sync_standby"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));

    n1.child.kill().unwrap();
    n1.child.wait().unwrap();
    let took_over =
        poll::until("node2 to hold the lease and lead", Duration::from_secs(20), Duration::from_millis(100), || {
            match local(&n2) {
                Some(v) if v["role"] == "leader" => Ok(v["witness"]["state"].as_str().unwrap_or("").to_string()),
                other => Err(format!("{:?}", other.map(|v| (v["role"].clone(), v["witness"].clone())))),
            }
        });
    let witness_state = took_over.unwrap_or_else(|e| panic!("{e}\n{}", logs(&dir)));
    assert_eq!(witness_state, "lease held here");
    assert_eq!(lease_holder().as_deref(), Some("node2"));
}
