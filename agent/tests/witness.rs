//! `gemin_k8s witness serve` as a real process over mutual TLS on loopback:
//! one holder at a time, only nodes act and each only for itself, the
//! synchronous-standby record only from the holder, who may take a free
//! lease, and the records surviving a restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use geminik8s::peer::tls::TlsMaterial;
use geminik8s::pki::{self, ClusterPki};
use geminik8s::witness::{LeaseClient, LeaseView};
use geminik8s_vm_tests::poll;

#[expect(dead_code, reason = "this test needs only a free port of the shared helpers")]
mod common;
use common::free_port;

const TTL: Duration = Duration::from_secs(5);

fn cluster_pki() -> ClusterPki {
    let nodes =
        vec![("node1".to_string(), "127.0.0.1".parse().unwrap()), ("node2".to_string(), "127.0.0.2".parse().unwrap())];
    pki::generate("lab", &nodes, "127.0.0.3".parse().unwrap(), Some("127.0.0.1".parse().unwrap())).unwrap()
}

/// A running `witness serve`, killed (SIGKILL) on drop; its log goes to `log`.
struct Witness {
    child: Child,
    target: String,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Witness {
    fn start(p: &ClusterPki, dir: &Path, port: u16) -> Witness {
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir).unwrap();
        let w = p.witness.as_ref().unwrap();
        std::fs::write(pki_dir.join("ca.crt"), &p.ca.cert).unwrap();
        std::fs::write(pki_dir.join("witness.crt"), &w.cert).unwrap();
        std::fs::write(pki_dir.join("witness.key"), &w.key).unwrap();
        let state_dir = dir.join("state");
        let log = dir.join("witness.log");
        let log_file =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("opening the witness log");
        let target = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_gemin_k8s"))
            .args(["--log-level", "debug", "witness", "serve", "--listen", &target, "--max-ttl", "30s"])
            .arg("--pki-dir")
            .arg(&pki_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting gemin_k8s witness serve");
        let witness = Witness { child, target, state_dir, log };
        poll::until("the witness to listen", Duration::from_secs(20), Duration::from_millis(50), || {
            std::net::TcpStream::connect(&witness.target).map_err(|e| format!("{e}; log: {}", witness.log_text()))
        })
        .unwrap();
        witness
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client(&self, tls: &TlsMaterial, node: &str) -> LeaseClient {
        LeaseClient::new(&self.target, tls, "lab", node, TTL).unwrap()
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("killing the witness: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("waiting for the witness: {e}");
        }
    }
}

fn node_tls(p: &ClusterPki, i: usize) -> TlsMaterial {
    TlsMaterial::from_pem(&p.ca.cert, &p.nodes[i].cert, &p.nodes[i].key).unwrap()
}

fn is_mine(v: &LeaseView) -> bool {
    matches!(v, LeaseView::Mine { .. })
}

fn unreachable_text(v: LeaseView) -> String {
    match v {
        LeaseView::Unreachable(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn one_holder_at_a_time_and_only_nodes_act_for_themselves() {
    let p = cluster_pki();
    let dir = tempfile::tempdir().unwrap();
    let w = Witness::start(&p, dir.path(), free_port());
    let (a, b) = (w.client(&node_tls(&p, 0), "node1"), w.client(&node_tls(&p, 1), "node2"));

    // Both ask at once for a cluster without a record: exactly one wins.
    let (ra, rb) = tokio::join!(a.acquire(false), b.acquire(false));
    assert_eq!([&ra, &rb].iter().filter(|v| is_mine(v)).count(), 1, "{ra:?} / {rb:?}");
    let (holder, loser, holder_name) = if is_mine(&ra) { (&a, &b, "node1") } else { (&b, &a, "node2") };
    assert_eq!(loser.acquire(false).await, LeaseView::Other { holder: holder_name.into(), sync_standby: None });
    match holder.acquire(false).await {
        LeaseView::Mine { until, .. } => assert!(until <= std::time::Instant::now() + TTL, "trusted beyond the TTL"),
        other => panic!("renewal failed: {other:?}\n{}", w.log_text()),
    }

    // node1's certificate cannot act for node2, nor node2's for node1.
    let impostor = w.client(&node_tls(&p, 0), "node2");
    let why = unreachable_text(impostor.acquire(true).await);
    assert!(why.contains("403") && why.contains("cannot act for the node `node2`"), "{why}");
    assert!(impostor.release().await.is_err());
    assert!(impostor.record_sync(None).await.is_err());

    // The operator reads, and only reads.
    let op_tls = TlsMaterial::from_pem(&p.ca.cert, &p.operator.cert, &p.operator.key).unwrap();
    let op = w.client(&op_tls, "operator");
    assert_eq!(op.holder().await, LeaseView::Other { holder: holder_name.into(), sync_standby: None });
    let as_node = w.client(&op_tls, holder_name);
    let why = unreachable_text(as_node.acquire(true).await);
    assert!(why.contains("403") && why.contains("may only read"), "{why}");
    assert!(as_node.release().await.is_err(), "the operator released a node's lease");

    // The witness's own certificate gets nothing.
    let w_pair = p.witness.as_ref().unwrap();
    let witness_tls = TlsMaterial::from_pem(&p.ca.cert, &w_pair.cert, &w_pair.key).unwrap();
    let why = unreachable_text(w.client(&witness_tls, "node1").holder().await);
    assert!(why.contains("403"), "{why}");

    // None of that changed the lease.
    assert_eq!(loser.holder().await, LeaseView::Other { holder: holder_name.into(), sync_standby: None });
    let log = w.log_text();
    assert!(log.contains("api_refused"), "refusals are logged:\n{log}");

    // A node of another cluster's CA never gets a connection.
    let other = cluster_pki();
    assert!(matches!(w.client(&node_tls(&other, 0), "node1").acquire(false).await, LeaseView::Unreachable(_)));
}

#[tokio::test]
async fn sync_record_only_from_the_holder_and_who_may_take_a_free_lease() {
    let p = cluster_pki();
    let dir = tempfile::tempdir().unwrap();
    let w = Witness::start(&p, dir.path(), free_port());
    let (a, b) = (w.client(&node_tls(&p, 0), "node1"), w.client(&node_tls(&p, 1), "node2"));

    assert!(is_mine(&a.acquire(false).await));
    let err = b.record_sync(Some("node1")).await.unwrap_err();
    assert!(format!("{err:#}").contains("held by node1"), "{err:#}");
    assert_eq!(a.record_sync(Some("node2")).await.unwrap(), Some("node2".into()));
    assert_eq!(b.holder().await, LeaseView::Other { holder: "node1".into(), sync_standby: Some("node2".into()) });

    // The leader degrades: no synchronous standby. Released, the lease is
    // free, but node2 may not take it without force.
    assert_eq!(a.record_sync(None).await.unwrap(), None);
    a.release().await.unwrap();
    let free = b.acquire(false).await;
    assert_eq!(free, LeaseView::Free { last_holder: Some("node1".into()), sync_standby: None });
    assert!(!free.may_take("node2") && free.may_take("node1"));
    assert!(b.record_sync(None).await.is_err(), "not the holder");

    // An operator's forced failover.
    assert!(is_mine(&b.acquire(true).await));
    poll::until("the forced lease in the log", Duration::from_secs(5), Duration::from_millis(50), || {
        let log = w.log_text();
        if log.contains("lease_forced") { Ok(()) } else { Err(log) }
    })
    .unwrap();

    // node2 leads with node1 as its synchronous standby; once node2 is gone,
    // node1 may take the lease back without force, and starts with no standby.
    assert_eq!(b.record_sync(Some("node1")).await.unwrap(), Some("node1".into()));
    b.release().await.unwrap();
    match a.acquire(false).await {
        LeaseView::Mine { sync_standby: None, .. } => {}
        other => panic!("the synchronous standby did not get the lease: {other:?}\n{}", w.log_text()),
    }
    assert_eq!(b.holder().await, LeaseView::Other { holder: "node1".into(), sync_standby: None });
}

#[tokio::test]
async fn a_restarted_witness_keeps_holders_and_records() {
    let p = cluster_pki();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let w = Witness::start(&p, dir.path(), port);
    let (a, b) = (w.client(&node_tls(&p, 0), "node1"), w.client(&node_tls(&p, 1), "node2"));
    assert!(is_mine(&a.acquire(false).await));
    assert_eq!(a.record_sync(None).await.unwrap(), None);
    assert_eq!(b.acquire(false).await, LeaseView::Other { holder: "node1".into(), sync_standby: None });
    let state_file = w.state_dir.join("leases.json");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(state["clusters"]["lab"]["last_holder"], "node1", "{state}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&state_file).unwrap().permissions().mode() & 0o777, 0o600);
    drop(w); // SIGKILL: no chance to write anything more

    let w = Witness::start(&p, dir.path(), port);
    let (a, b) = (w.client(&node_tls(&p, 0), "node1"), w.client(&node_tls(&p, 1), "node2"));
    // The lease held before the restart is honoured (one maximum TTL).
    assert_eq!(b.acquire(false).await, LeaseView::Other { holder: "node1".into(), sync_standby: None });
    // Released, the record stays: node2 is neither last holder nor sync standby.
    a.release().await.unwrap();
    assert_eq!(b.acquire(false).await, LeaseView::Free { last_holder: Some("node1".into()), sync_standby: None });
    assert!(is_mine(&a.acquire(false).await));
    assert_eq!(a.record_sync(Some("node2")).await.unwrap(), Some("node2".into()));
    drop(w);

    let w = Witness::start(&p, dir.path(), port);
    let (a, b) = (w.client(&node_tls(&p, 0), "node1"), w.client(&node_tls(&p, 1), "node2"));
    a.release().await.unwrap();
    assert!(is_mine(&b.acquire(false).await), "the recorded sync standby after a restart\n{}", w.log_text());
}
