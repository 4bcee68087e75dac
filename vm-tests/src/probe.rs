//! What the tests and benchmarks look at in a running lab: the datastore
//! through the VIP (etcdctl from the client namespace, as a user would), the
//! agents' status, their logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use geminik8s::cmd::Tool;
use serde_json::Value;

use crate::netns::Lab;
use crate::poll;

/// `etcdctl` in the client namespace, talking to Kine through the VIP.
pub fn etcd(lab: &Lab, args: &[&str]) -> Result<Value, String> {
    etcd_at(lab, &lab.vip.to_string(), args)
}

/// `etcdctl` in the client namespace, talking to the Kine at `host`.
pub fn etcd_at(lab: &Lab, host: &str, args: &[&str]) -> Result<Value, String> {
    etcd_from(lab, "client", host, COMMAND_TIMEOUT, args)
}

/// etcdctl's own limit on one request: short, so that an outage shows as
/// failed writes rather than as one long write.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
const DIAL_TIMEOUT: &str = "300ms";
/// Beyond etcdctl's own timeouts: an etcdctl that hangs anyway is killed.
const HARD_LIMIT: Duration = Duration::from_secs(3);

/// `etcdctl` in the namespace of lab host `from` (a node or `client`),
/// talking to the Kine at `host`, with `command_timeout` per request. An
/// etcdctl that outlives its timeouts is killed.
pub fn etcd_from(lab: &Lab, from: &str, host: &str, command_timeout: Duration, args: &[&str]) -> Result<Value, String> {
    etcd_run(lab, from, host, command_timeout, args, None)
}

fn etcd_run(
    lab: &Lab,
    from: &str,
    host: &str,
    command_timeout: Duration,
    args: &[&str],
    stdin: Option<String>,
) -> Result<Value, String> {
    let netns = &lab.host(from).map_err(|e| e.to_string())?.netns;
    let endpoint = format!("http://{host}:2379");
    let tool = Tool::new("ip")
        .args(["netns", "exec", netns, "env", "ETCDCTL_API=3", "etcdctl", "--endpoints", &endpoint])
        .arg(format!("--command-timeout={}ms", command_timeout.as_millis()))
        .arg(format!("--dial-timeout={DIAL_TIMEOUT}"))
        .args(["-w", "json"])
        .args(args)
        .timeout(command_timeout + HARD_LIMIT);
    let tool = match stdin {
        Some(input) => tool.stdin(input),
        None => tool,
    };
    let out = blocking(tool.run()).map_err(|e| e.to_string())?;
    serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {}", out.stdout))
}

/// Run a future on a runtime of the calling thread (probes are called from
/// plain threads).
fn blocking<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime").block_on(f)
}

/// Write a key; returns the revision Kine acknowledged.
pub fn put(lab: &Lab, key: &str, value: &str) -> Result<i64, String> {
    put_from(lab, "client", &lab.vip.to_string(), key, value)
}

/// Create a new key from lab host `from` through the Kine at `host`, as
/// Kubernetes creates an object: a transaction that puts the key only if
/// it does not exist, acknowledged only when the transaction says it
/// succeeded, or when the key already holds `value` (an earlier attempt
/// whose answer was lost created it). Returns the revision Kine
/// acknowledged. (A plain etcd `put` is no such promise: Kine answers it
/// with the current revision even when its create did not happen, e.g.
/// when its PostgreSQL connection was cut.)
pub fn put_from(lab: &Lab, from: &str, host: &str, key: &str, value: &str) -> Result<i64, String> {
    let txn = format!("mod(\"{key}\") = \"0\"\n\nput {key} {value}\n\nget {key}\n\n");
    let v = etcd_run(lab, from, host, COMMAND_TIMEOUT, &["txn"], Some(txn))?;
    if v["succeeded"] == true {
        return v["header"]["revision"].as_i64().ok_or_else(|| format!("no revision in {v}"));
    }
    let kv = &v["responses"][0]["Response"]["ResponseRange"]["kvs"][0];
    match (kv["value"].as_str().and_then(base64_decode), kv["mod_revision"].as_i64()) {
        (Some(found), Some(revision)) if found == value => Ok(revision),
        _ => Err(format!("the create of {key} did not succeed and the key does not hold its value: {v}")),
    }
}

/// A key as read back: its value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub mod_revision: i64,
}

/// Every key under `prefix` with its value and mod revision, read through the VIP.
pub fn range(lab: &Lab, prefix: &str) -> Result<Vec<Kv>, String> {
    let vip = lab.vip.to_string();
    let v = etcd_from(lab, "client", &vip, Duration::from_secs(10), &["get", prefix, "--prefix"])?;
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| {
            let text = |field: &str| kv[field].as_str().and_then(base64_decode);
            Ok(Kv {
                key: text("key").ok_or_else(|| format!("no key in {kv}"))?,
                value: text("value").unwrap_or_default(),
                mod_revision: kv["mod_revision"].as_i64().ok_or_else(|| format!("no mod_revision in {kv}"))?,
            })
        })
        .collect()
}

/// Keys under `prefix`, in key order.
pub fn keys(lab: &Lab, prefix: &str) -> Result<Vec<String>, String> {
    let v = etcd(lab, &["get", prefix, "--prefix", "--keys-only"])?;
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    Ok(kvs.iter().filter_map(|kv| kv["key"].as_str()).filter_map(base64_decode).collect())
}

/// etcdctl's JSON carries keys in standard base64.
pub fn base64_decode(s: &str) -> Option<String> {
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).ok()?).ok()
}

/// A node's status as its agent reports it on the local socket.
pub fn status(lab: &Lab, node: &str) -> Result<Value, String> {
    let out = Command::new(&lab.agent_bin)
        .args(["status", "-o", "json", "--timeout", "2s", "--socket"])
        .arg(lab.socket(node))
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    match &v["nodes"][0]["status"] {
        Value::Null => Err(v["nodes"][0]["error"].as_str().unwrap_or("no status").to_string()),
        s => Ok(s.clone()),
    }
}

/// Wait until `leader` leads with the VIP, synchronous replication and Kine
/// serving, and `follower` streams from it.
pub fn wait_formed(lab: &Lab, leader: &str, follower: &str, timeout: Duration) -> Result<(), String> {
    poll::until(&format!("{leader} leading, {follower} streaming from it"), timeout, Duration::from_millis(250), || {
        formed(lab, leader, follower)
    })
}

/// Whether `leader` leads with the VIP (and nobody else has it),
/// synchronous replication and Kine serving, and `follower` streams from it;
/// the error says what was seen instead.
pub fn formed(lab: &Lab, leader: &str, follower: &str) -> Result<(), String> {
    let (l, f) = (status(lab, leader)?, status(lab, follower)?);
    let kine_ok = |v: &Value| {
        v["components"].as_array().is_some_and(|c| c.iter().any(|c| c["name"] == "kine" && c["state"] == "ok"))
    };
    let holders = lab.vip_holders();
    let ok = l["role"] == "leader"
        && kine_ok(&l)
        && f["role"] == "follower"
        && f["replication"]["streaming"] == true
        && l["replication"]["durability"] == "synchronous"
        // The follower knows it may take over (with an arbiter, the arbiter knows).
        && (f["takeover"]["eligible"] == true || lab.witness == geminik8s::config::WitnessMode::Arbiter)
        && holders == [leader.to_string()];
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{leader}: {} {} {}; {follower}: {} {} {} takeover {}; VIP on {holders:?}",
            l["role"], l["state"], l["replication"], f["role"], f["state"], f["replication"], f["takeover"]
        ))
    }
}

/// The cluster as formed right now: `(leader, follower)` when one node
/// leads as [`formed`] says and the other follows; the error says what was seen.
pub fn roles(lab: &Lab) -> Result<(String, String), String> {
    let [a, b] = [&lab.nodes[0].name, &lab.nodes[1].name];
    let a_leads = status(lab, a).map(|s| s["role"] == "leader").unwrap_or(false);
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    formed(lab, leader, follower).map(|()| (leader.clone(), follower.clone()))
}

/// For failure messages: each agent's first errors and warnings, and the
/// tail of its log without the per-tick noise.
pub fn logs(lab: &Lab) -> String {
    let quiet =
        |l: &&str| !l.contains("heartbeat missed") && !l.contains("kine health probe") && !l.contains("command=ping");
    lab.nodes
        .iter()
        .map(|n| {
            let path = lab.node_dir(&n.name).join("agent.log");
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let problems: Vec<&str> =
                text.lines().filter(|l| l.contains("ERROR") || l.contains(" WARN")).filter(quiet).take(15).collect();
            let tail: Vec<&str> = text.lines().filter(quiet).rev().take(25).collect();
            format!(
                "--- {} {} (first errors and warnings)\n{}\n--- {} (tail)\n{}",
                n.name,
                path.display(),
                problems.join("\n"),
                n.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `gemin_k8s`: `GEMINIK8S_BIN`, else next to the running executable (tests
/// live one directory deeper, in `deps/`).
pub fn agent_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GEMINIK8S_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("gemin_k8s"), dir.parent()?.join("gemin_k8s")].into_iter().find(|p| p.is_file())
}

/// `gemin_k8s failover --output json` on the client host of the namespace
/// lab with `bin`, as an operator runs it with the cluster file and operator
/// certificate from `init`: whether it exited 0, and its JSON report.
pub fn failover_cli(lab: &Lab, bin: &Path, extra: &[&str]) -> Result<(bool, Value), String> {
    failover_with(bin, &lab.config_dir, extra, |argv| lab.exec("client", argv).map_err(|e| format!("{e:#}")))
}

/// Whether a refused `gemin_k8s failover` is worth running again: right
/// after a switchover or a rejoin the checks, or the leader itself, may
/// still wait for the standby to be synchronous. Nothing was changed.
pub fn failover_may_retry(report: &serde_json::Value) -> bool {
    matches!(report["outcome"].as_str(), Some("refused: checks failed" | "refused by the leader"))
}

/// [`failover_cli`] for any lab: `exec` runs the command line on its client host.
pub fn failover_with(
    bin: &Path,
    config_dir: &Path,
    extra: &[&str],
    exec: impl FnOnce(&[&str]) -> Result<std::process::Output, String>,
) -> Result<(bool, Value), String> {
    let cluster = config_dir.join(geminik8s::clusterfile::FILE_NAME);
    let (bin, cluster) = (bin.to_string_lossy(), cluster.to_string_lossy());
    let mut argv = vec![&*bin, "--config", &*cluster, "failover", "--output", "json"];
    argv.extend_from_slice(extra);
    let out = exec(&argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).map_err(|e| {
        format!("failover {extra:?}: {e}\nstdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    })?;
    Ok((out.status.success(), report))
}

/// `gemin_k8s kubeconfig --write DEST` on a lab's client host (`exec` runs
/// the command line there) with the cluster file from `init`, as an
/// operator fetches K3s's kubeconfig for the VIP from the agents.
pub fn fetch_kubeconfig(
    bin: &Path,
    config_dir: &Path,
    dest: &Path,
    exec: impl FnOnce(&[&str]) -> Result<std::process::Output, String>,
) -> Result<PathBuf, String> {
    let cluster = config_dir.join(geminik8s::clusterfile::FILE_NAME);
    let (bin, cluster, to) = (bin.to_string_lossy(), cluster.to_string_lossy(), dest.to_string_lossy());
    let out = exec(&[&*bin, "--config", &*cluster, "kubeconfig", "--timeout", "10s", "--write", &*to])?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(dest.to_path_buf())
}

/// `gemin_k8s init` for the lab's addresses, into `dir`.
pub fn init_cluster(bin: &Path, dir: &Path, extra: &[&str]) -> Result<(), String> {
    init_named_cluster(bin, dir, "lab", extra)
}

/// [`init_cluster`] for a cluster called `name` (another CA, same addresses).
pub fn init_named_cluster(bin: &Path, dir: &Path, name: &str, extra: &[&str]) -> Result<(), String> {
    let out = Command::new(bin)
        .args(["init", "--name", name, "--node1-ip", "10.77.0.11", "--node2-ip", "10.77.0.12", "--vip", "10.77.0.10"])
        // The lab sets the witness it runs in its own overlay; the cluster files name the lab's gateway host.
        .args(if extra.contains(&"--witness") {
            &[][..]
        } else {
            &["--witness", "gateway", "--witness-target", "10.77.0.254"][..]
        })
        .arg("--config-dir")
        .arg(dir)
        .args(extra)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

/// `kubectl` in namespace `ns` with `kubeconfig` (a 5 s request limit):
/// its JSON answer (`Null` when it prints nothing), or its error output.
pub fn kubectl_in(ns: &str, kubeconfig: &Path, args: &[&str]) -> Result<Value, String> {
    let out = kubectl_output(ns, kubeconfig, "5s", args)?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    if out.stdout.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Run `kubectl --kubeconfig KUBECONFIG --request-timeout=TIMEOUT ARGS` in namespace `ns`.
fn kubectl_output(ns: &str, kubeconfig: &Path, timeout: &str, args: &[&str]) -> Result<std::process::Output, String> {
    Command::new("ip")
        .args(["netns", "exec", ns, "kubectl", "--kubeconfig"])
        .arg(kubeconfig)
        .arg(format!("--request-timeout={timeout}"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running kubectl in {ns}: {e}"))
}

/// A Kubernetes object's `resourceVersion` (Kine's revision) as a number.
pub fn resource_version(object: &Value) -> Result<u64, String> {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no resourceVersion in {object}"))
}

/// A watch on the ConfigMaps of `namespace` resumed from `from` (what an
/// informer does after losing its connection), run by `kubectl get --raw`
/// in namespace `ns` for 10 s: `Ok` when it delivers the `ADDED` event for
/// `name`, or ends with "resource version too old" (410, after which a
/// client relists); `Err` with what it said when it was silent.
pub fn resumed_watch(ns: &str, kubeconfig: &Path, namespace: &str, from: u64, name: &str) -> Result<(), String> {
    let url = format!("/api/v1/namespaces/{namespace}/configmaps?watch=1&resourceVersion={from}&timeoutSeconds=10");
    let out = kubectl_output(ns, kubeconfig, "30s", &["get", "--raw", &url])?;
    let stream = String::from_utf8_lossy(&out.stdout);
    // A stream cut off mid-event still counts for the events before the cut.
    let events: Vec<Value> = serde_json::Deserializer::from_str(&stream).into_iter().map_while(Result::ok).collect();
    let delivered = events.iter().any(|e| e["type"] == "ADDED" && e["object"]["metadata"]["name"] == name);
    let too_old = events.iter().any(|e| e["type"] == "ERROR" && e["object"]["code"] == 410);
    if delivered || too_old {
        return Ok(());
    }
    Err(format!(
        "the watch resumed from {from} neither delivered {name} nor said it was too old: {stream} {}",
        String::from_utf8_lossy(&out.stderr)
    ))
}
