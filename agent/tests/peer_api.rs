//! The agent API over real mutual TLS on loopback: who gets in, who is
//! refused (by CA and by the name in the certificate), what they see, whose
//! heartbeat counts; and `gemin_k8s status` reading both nodes of a cluster
//! made by `init`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use geminik8s::hostmeta::HostMeta;
use geminik8s::peer::client::AgentClient;
use geminik8s::peer::server::{ApiHooks, Auth, MAX_HANDSHAKES, bind_unix, router, serve_tls, serve_unix};
use geminik8s::peer::tls::TlsMaterial;
use geminik8s::peer::{
    ArchiveView, ComponentHealth, Counters, NodeStatus, PeerView, Published, Shared, VipView, WitnessView,
};
use geminik8s::pki::{self, ClusterPki};

mod common;
use common::{free_port, init_loopback};

const TOKEN: &str = "operator-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(5);

fn cluster_pki(witness: Option<IpAddr>) -> ClusterPki {
    let nodes =
        vec![("node1".to_string(), "127.0.0.1".parse().unwrap()), ("node2".to_string(), "127.0.0.2".parse().unwrap())];
    pki::generate("lab", &nodes, "127.0.0.3".parse().unwrap(), witness).unwrap()
}

fn material(p: &ClusterPki, i: usize) -> TlsMaterial {
    TlsMaterial::from_pem(&p.ca.cert, &p.nodes[i].cert, &p.nodes[i].key).unwrap()
}

fn status(node: &str, role: &str, holds_vip: bool) -> NodeStatus {
    NodeStatus {
        cluster: "lab".into(),
        node: node.into(),
        address: "127.0.0.1".into(),
        agent_version: "test".into(),
        role: role.into(),
        state: role.into(),
        takeover: Default::default(),
        epoch: 4,
        peer: PeerView {
            name: "node2".into(),
            address: "127.0.0.2".into(),
            reachable: true,
            role: None,
            epoch: None,
            last_heard_ms: Some(120),
            rtt_ms: Some(0.4),
        },
        witness: WitnessView { mode: "none".into(), state: "n/a".into() },
        vip: VipView { address: "127.0.0.3".into(), held_here: holds_vip },
        replication: None,
        last_failover: None,
        components: vec![ComponentHealth { name: "postgres".into(), state: "ok".into(), detail: String::new() }],
        degraded: vec![],
        datastore: None,
        handover: None,
        served_at_unix_ms: 0,
        archive: None,
        boot: None,
    }
}

struct Running {
    addr: SocketAddr,
    shared: Shared,
    hooks: Arc<ApiHooks>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node's API on `ip:port` whose peer is the other of node1 and node2.
async fn start(tls: &TlsMaterial, ip: &str, port: u16, st: NodeStatus, token: &str) -> Running {
    let peer = if st.node == "node1" { "node2" } else { "node1" };
    let shared: Shared = Arc::new(RwLock::new(Published {
        hostmeta: None,
        status: st,
        counters: Counters::default(),
        election: None,
        archive: None,
    }));
    let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hooks = Arc::new(ApiHooks::default());
    let app = router(shared.clone(), Auth::tls(peer, token), hooks.clone());
    let task = tokio::spawn(serve_tls(
        listener,
        tokio::sync::watch::channel(tls.server_config().unwrap()).1,
        app,
        hooks.clone(),
    ));
    Running { addr, shared, hooks, task }
}

fn operator_tls(p: &ClusterPki) -> TlsMaterial {
    TlsMaterial::from_pem(&p.ca.cert, &p.operator.cert, &p.operator.key).unwrap()
}

fn witness_tls(p: &ClusterPki) -> TlsMaterial {
    let w = p.witness.as_ref().unwrap();
    TlsMaterial::from_pem(&p.ca.cert, &w.cert, &w.key).unwrap()
}

#[tokio::test]
async fn mutual_tls_token_and_routes() {
    let p = cluster_pki(None);
    let server = start(&material(&p, 0), "127.0.0.1", 0, status("node1", "leader", true), TOKEN).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    // The peer, with its own certificate and no token: heartbeat and hostMeta, not status.
    let peer = AgentClient::https(&url, &material(&p, 1), None, TIMEOUT).unwrap();
    let (health, rtt) = peer.health().await.unwrap();
    assert_eq!(
        (health.node.as_str(), health.role.as_str(), health.epoch, health.healthy),
        ("node1", "leader", 4, true)
    );
    assert!(rtt < TIMEOUT);
    assert_eq!(peer.hostmeta().await.unwrap(), None, "no hostMeta published yet");
    let meta = HostMeta::fresh(
        "lab",
        ("node1", "127.0.0.1".parse().unwrap()),
        ("node2", "127.0.0.2".parse().unwrap()),
        "127.0.0.3".parse().unwrap(),
    );
    server.shared.write().unwrap().hostmeta = Some(meta.clone());
    assert_eq!(peer.hostmeta().await.unwrap(), Some(meta));
    let err = peer.status().await.unwrap_err();
    assert!(format!("{err:#}").contains("API token"), "{err:#}");

    // The operator with the token sees status and metrics.
    let op_tls = operator_tls(&p);
    let op = AgentClient::https(&url, &op_tls, Some(TOKEN.into()), TIMEOUT).unwrap();
    let mut answer = op.status().await.unwrap();
    assert!(answer.served_at_unix_ms > 1_700_000_000_000, "the answer carries the node's clock");
    answer.served_at_unix_ms = 0;
    assert_eq!(answer, status("node1", "leader", true));
    let wrong = AgentClient::https(&url, &op_tls, Some("not-the-token-0000000".into()), TIMEOUT).unwrap();
    assert!(wrong.status().await.is_err());

    // A certificate from another cluster's CA never gets a connection.
    let other = cluster_pki(None);
    let stranger = AgentClient::https(&url, &material(&other, 1), Some(TOKEN.into()), TIMEOUT).unwrap();
    assert!(stranger.health().await.is_err(), "a foreign certificate was accepted");
    // Nor does a client without a certificate (plain HTTPS with the CA trusted).
    let ca = reqwest::Certificate::from_pem(p.ca.cert.as_bytes()).unwrap();
    let anonymous = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    assert!(
        anonymous.get(format!("{url}/v1/health")).send().await.is_err(),
        "a client without a certificate was accepted"
    );

    let metrics = op.metrics().await.unwrap();
    assert!(metrics.contains("geminik8s_role{node=\"node1\",role=\"leader\"} 1"), "{metrics}");
    assert!(metrics.contains("geminik8s_epoch{node=\"node1\"} 4"), "{metrics}");
    assert!(metrics.contains("geminik8s_heartbeat_rtt_seconds"), "{metrics}");
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("geminik8s_refused_connections_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(refused >= 4.0, "refusals not counted: {refused}\n{metrics}");
}

#[tokio::test]
async fn local_socket_serves_status_without_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let shared: Shared = Arc::new(RwLock::new(Published {
        hostmeta: None,
        status: status("node1", "follower", false),
        counters: Counters::default(),
        election: None,
        archive: None,
    }));
    let listener = bind_unix(&path).unwrap();
    let hooks = Arc::new(ApiHooks::default());
    let task = tokio::spawn(serve_unix(listener, router(shared.clone(), Auth::Local, hooks.clone())));
    let client = AgentClient::unix(&path, TIMEOUT);
    assert_eq!(client.status().await.unwrap().role, "follower");
    assert_eq!(client.status().await.unwrap().archive, None, "no archiving configured: nothing said about it");

    // The WAL archiver publishes apart from the heartbeat loop; status and metrics carry it.
    let gap = geminik8s::backup::wal::Gap {
        since: "2026-08-21T10:15:02Z".into(),
        first: "000000010000000000000007".into(),
        files: 3,
    };
    shared.write().unwrap().archive = Some(ArchiveView {
        destination: "file:///mnt/usb/backups".into(),
        uploading: true,
        pending_files: 64,
        oldest_pending_seconds: Some(900),
        gap: Some(gap.clone()),
        ..ArchiveView::default()
    });
    let got = client.status().await.unwrap();
    assert_eq!(got.archive.as_ref().and_then(|a| a.gap.clone()), Some(gap));
    let degraded = got.degraded.join("\n");
    assert!(degraded.contains("point-in-time recovery gap since 2026-08-21T10:15:02Z"), "{degraded}");
    assert!(degraded.contains("oldest unarchived WAL is 900 s old"), "{degraded}");
    let metrics = geminik8s::peer::metrics::render(&shared.read().unwrap(), 0);
    assert!(metrics.contains("geminik8s_wal_archive_gap{node=\"node1\"} 1"), "{metrics}");
    assert!(metrics.contains("geminik8s_wal_archive_oldest_pending_seconds{node=\"node1\"} 900"), "{metrics}");
    let (health, _) = client.health().await.unwrap();
    assert_eq!(health.node, "node1");
    assert_eq!(hooks.last_health_call(), None, "a local call is not the peer's heartbeat");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    task.abort();
}

#[tokio::test]
async fn only_the_peer_certificate_is_the_peer() {
    let p = cluster_pki(Some("127.0.0.1".parse().unwrap()));
    let server = start(&material(&p, 0), "127.0.0.1", 0, status("node1", "follower", false), TOKEN).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    // The operator's certificate, even with the token: no heartbeat, no hostMeta.
    let op = AgentClient::https(&url, &operator_tls(&p), Some(TOKEN.into()), TIMEOUT).unwrap();
    let err = format!("{:#}", op.health().await.unwrap_err());
    assert!(err.contains("403") && err.contains("only the peer node `node2`"), "{err}");
    let err = format!("{:#}", op.hostmeta().await.unwrap_err());
    assert!(err.contains("403"), "{err}");
    assert_eq!(server.hooks.last_health_call(), None, "the operator's call delayed the follower's promotion");
    assert_eq!(server.hooks.refused(), 2);

    // The witness's certificate: nothing, not even with the token.
    let witness = AgentClient::https(&url, &witness_tls(&p), Some(TOKEN.into()), TIMEOUT).unwrap();
    assert!(format!("{:#}", witness.health().await.unwrap_err()).contains("403"));
    let err = format!("{:#}", witness.status().await.unwrap_err());
    assert!(err.contains("403") && err.contains("not the certificate `witness`"), "{err}");
    assert_eq!(server.hooks.last_health_call(), None);

    // A node certificate that is not the peer's (this node's own, used elsewhere).
    let myself = AgentClient::https(&url, &material(&p, 0), Some(TOKEN.into()), TIMEOUT).unwrap();
    assert!(format!("{:#}", myself.health().await.unwrap_err()).contains("403"));
    assert!(format!("{:#}", myself.status().await.unwrap_err()).contains("403"));
    assert_eq!(server.hooks.last_health_call(), None);
    assert_eq!(server.hooks.refused(), 6);

    // The peer's own certificate: its heartbeat counts; with the token it is an operator too.
    let before = std::time::Instant::now();
    let peer = AgentClient::https(&url, &material(&p, 1), Some(TOKEN.into()), TIMEOUT).unwrap();
    assert_eq!(peer.health().await.unwrap().0.node, "node1");
    assert!(server.hooks.last_health_call().is_some_and(|t| t >= before), "the peer's heartbeat was not recorded");
    assert_eq!(peer.status().await.unwrap().node, "node1");
    assert_eq!(server.hooks.refused(), 6);

    // Waking the agent loop early is the peer's alone: the operator's call is
    // refused and leaves no wake-up behind; the peer's leaves exactly one.
    let err = format!("{:#}", op.wake().await.unwrap_err());
    assert!(err.contains("403"), "{err}");
    let woken = |hooks: &ApiHooks| {
        let notified = hooks.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable()
    };
    assert!(!woken(&server.hooks), "the operator's refused call woke the agent loop");
    peer.wake().await.unwrap();
    assert!(woken(&server.hooks), "the peer's call did not wake the agent loop");
    assert!(!woken(&server.hooks), "one call woke the loop twice");
    assert_eq!(server.hooks.refused(), 7);
}

#[tokio::test]
async fn handshakes_beyond_the_cap_wait_until_others_finish() {
    let p = cluster_pki(None);
    let server = start(&material(&p, 0), "127.0.0.1", 0, status("node1", "leader", true), TOKEN).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let peer = AgentClient::https(&url, &material(&p, 1), None, Duration::from_secs(2)).unwrap();
    assert!(peer.health().await.is_ok());

    // Connections that never start their handshake take every slot...
    let mut idle = Vec::new();
    for _ in 0..MAX_HANDSHAKES {
        idle.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // ...so a new client waits in the backlog instead of costing the agent a descriptor.
    let peer = AgentClient::https(&url, &material(&p, 1), None, Duration::from_secs(2)).unwrap();
    let err = peer.health().await.unwrap_err();
    assert!(format!("{err:#}").contains("timed out") || format!("{err:#}").contains("timeout"), "{err:#}");
    // Once they go, the slots are free again.
    drop(idle);
    let answered = geminik8s_vm_tests::poll::until_async(
        "the peer's heartbeat to be answered",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { peer.health().await.map(|(h, _)| h.node).map_err(|e| format!("{e:#}")) },
    )
    .await
    .unwrap();
    assert_eq!(answered, "node1");
}

#[tokio::test]
async fn status_command_reads_both_nodes_of_an_init_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = init_loopback(tmp.path(), port, "", &[]);
    let ctx = geminik8s::config::CheckContext { check_files: false, ..Default::default() };
    let node_tls = |n: &str| {
        let l = geminik8s::config::load_files(&[dir.join(n)], &ctx).unwrap();
        (TlsMaterial::from_config(&l.gemini.tls).unwrap(), l.gemini.api.token)
    };
    let (t1, token) = node_tls("node1.yaml");
    let (t2, _) = node_tls("node2.yaml");
    let cluster_yaml = dir.join("cluster.yaml");
    let run_status = |extra: &[&str]| {
        let c = cluster_yaml.clone();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_gemin_k8s"))
                .args(["status", "--config", c.to_str().unwrap(), "--timeout", "2s"])
                .args(extra)
                .output()
                .unwrap()
        })
    };

    // node2 is down: the cluster is degraded, exit 1.
    let _s1 = start(&t1, "127.0.0.1", port, status("node1", "leader", true), &token).await;
    let out = run_status(&[]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("unreachable") && text.contains("node1"), "{text}");

    let mut st2 = status("node2", "follower", false);
    st2.address = "127.0.0.2".into();
    let _s2 = start(&t2, "127.0.0.2", port, st2, &token).await;
    let out = run_status(&["-o", "json", "--components"]).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    let roles: Vec<&str> =
        v["nodes"].as_array().unwrap().iter().map(|n| n["status"]["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["leader", "follower"]);

    let endpoint = format!("https://127.0.0.2:{port}");
    let out = run_status(&["--endpoint", &endpoint, "--health-only"]).await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node2: healthy\ncluster: healthy\n");
}

/// Forwards connections to `target` until told to wedge the ones it has:
/// those then stop moving bytes while their sockets stay open (what a peer
/// whose process stalled looks like; its kernel still acknowledges).
struct WedgingProxy {
    addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    wedged_up_to: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl WedgingProxy {
    async fn start(target: SocketAddr) -> WedgingProxy {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, wedged_up_to) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (count, wedge) = (accepted.clone(), wedged_up_to.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let index = count.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { continue };
                let ((in_read, in_write), (out_read, out_write)) = (inbound.into_split(), outbound.into_split());
                for (mut from, mut to) in [(in_read, out_write), (out_read, in_write)] {
                    let wedge = wedge.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if index <= wedge.load(Ordering::SeqCst) {
                                // Hold both halves open and move nothing, for good.
                                let _open = (&from, &to);
                                std::future::pending::<()>().await
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        WedgingProxy { addr, accepted, wedged_up_to, task }
    }

    /// Wedge every connection accepted so far.
    fn wedge(&self) {
        use std::sync::atomic::Ordering;
        self.wedged_up_to.store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for WedgingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pooled connection to the peer that wedges (its agent was paused and
/// sits on what it had queued) does not keep every heartbeat timing out:
/// after a few failed requests the client opens a new connection.
#[tokio::test]
async fn a_wedged_connection_is_replaced_after_failed_requests() {
    let p = cluster_pki(None);
    let server = start(&material(&p, 0), "127.0.0.1", 0, status("node1", "leader", true), TOKEN).await;
    let proxy = WedgingProxy::start(server.addr).await;
    let url = format!("https://127.0.0.1:{}", proxy.addr.port());
    let peer = AgentClient::https(&url, &material(&p, 1), None, Duration::from_millis(300)).unwrap();
    assert!(peer.health().await.is_ok());
    assert_eq!(proxy.accepted(), 1);

    proxy.wedge();
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let answered = geminik8s_vm_tests::poll::until_async(
        "a heartbeat answered past the wedged connection",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            peer.health().await.map(|(h, _)| h.node).map_err(|e| {
                failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                format!("{e:#}")
            })
        },
    )
    .await
    .unwrap();
    assert_eq!(answered, "node1");
    assert!(failed.into_inner() >= 1, "the wedged connection answered");
    assert_eq!(proxy.accepted(), 2, "one new connection replaced the wedged one");
}
