//! The PostgreSQL manager against real PostgreSQL 15: two "nodes" on
//! loopback with their own ports, data and socket directories. Needs root
//! (the servers run as the `postgres` user) and the PostgreSQL tools.

use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use geminik8s::config::{Durability, GeminiConfig, Replication, Tls};
use geminik8s::daemon::database::Postgres as Datastore;
use geminik8s::postgres::render::KINE_SCHEMA;
use geminik8s::postgres::{Manager, PgRole, Rejoin, Session, Settings, StopMode};
use geminik8s::services::supervisor::{Supervisor, group_alive};
use geminik8s::services::units::POSTGRES;
use geminik8s::services::{ActiveState, Services};
use geminik8s_vm_tests::poll::until_async;
use geminik8s_vm_tests::require;
use rustls::pki_types::pem::PemObject;

const DEADLINE: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_millis(100);

macro_rules! require_postgres {
    () => {
        require!(root: true, tools: ["initdb", "pg_ctl", "pg_basebackup", "pg_rewind", "postgres"]);
    };
}

/// A directory for both nodes, traversable by the `postgres` user.
struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let mut dir = tempfile::Builder::new().prefix("gk8s-pg-").tempdir().unwrap();
        // GEMINIK8S_KEEP_TEST_DIRS=1 keeps the data directories and logs for a post-mortem.
        dir.disable_cleanup(std::env::var_os("GEMINIK8S_KEEP_TEST_DIRS").is_some());
        chown_to_postgres(dir.path());
        Lab { dir }
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        chown_to_postgres(&d);
        d
    }
}

fn chown_to_postgres(path: &Path) {
    let user = nix::unistd::User::from_name("postgres").unwrap().expect("the postgres user");
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cloud_config(node: &str, peer: &str, replication: Replication, durability: Durability, tls: Tls) -> GeminiConfig {
    let mut cfg = geminik8s_vm_tests::pg::loopback_config("lab", node, peer, replication, durability, tls);
    cfg.cluster.bootstrap_leader = "a".into();
    // A password that needs quoting in every file it lands in.
    cfg.postgres.replication_password = "repl pass'word".into();
    cfg.postgres.kine_password = "kine-pass".into();
    cfg
}

/// A cluster CA and the two nodes' certificates (both on 127.0.0.1).
fn cluster_pki() -> geminik8s::pki::ClusterPki {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    geminik8s::pki::generate("lab", &[("a".into(), lo), ("b".into(), lo)], lo, None).unwrap()
}

/// A node's PostgreSQL, run by the node's own process supervisor as the
/// agent runs it; the supervisor kills it when the node is dropped, also when
/// the test panics.
struct Node {
    mgr: Manager,
    supervisor: Arc<Supervisor>,
}

impl std::ops::Deref for Node {
    type Target = Manager;
    fn deref(&self) -> &Manager {
        &self.mgr
    }
}

/// Two nodes `a` and `b` on loopback, each the other's peer.
fn pair(lab: &Lab, replication: Replication, durability: Durability) -> (Node, Node) {
    let (pa, pb) = (free_port(), free_port());
    let pki = cluster_pki();
    let make = |name: &str, peer: &str, port: u16, peer_port: u16| {
        let dir = lab.node_dir(name);
        let i = usize::from(name != "a");
        let tls =
            Tls { ca: pki.ca.cert.clone(), cert: pki.nodes[i].cert.clone(), key: pki.nodes[i].key.clone(), crl: None };
        let mut s = Settings::from_config(&cloud_config(name, peer, replication, durability, tls));
        s.data_dir = dir.join("data");
        s.log_file = dir.join("postgres.log");
        s.socket_dir = dir.join("sock");
        s.listen_addresses = vec!["127.0.0.1".into()];
        s.node.port = port;
        s.peer.port = peer_port;
        s.start_timeout = Duration::from_secs(30);
        let supervisor = Arc::new(Supervisor::new());
        Node { mgr: Manager::new(s, supervisor.clone()).unwrap(), supervisor }
    };
    (make("a", "b", pa, pb), make("b", "a", pb, pa))
}

/// A bootstrapped primary `a` with Kine's table and `b` streaming from it.
async fn streaming_pair(lab: &Lab, durability: Durability) -> (Node, Node) {
    let (a, b) = pair(lab, Replication::Streaming, durability);
    a.bootstrap_leader().await.unwrap();
    create_kine_table(&a).await;
    b.init_follower().await.unwrap();
    wait_streaming(&b, &a).await;
    (a, b)
}

async fn kine_db(node: &Node) -> Session {
    node.connect("kine").await.unwrap()
}

/// Insert a row the way Kine does; returns its id (the revision).
async fn put(db: &Session, key: &str) -> i64 {
    db.query_one(
        "inserting a row",
        "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
         VALUES ($1, 1, 0, 0, 0, 0, 'v', NULL) RETURNING id",
        &[&key],
    )
    .await
    .unwrap()
    .get(0)
}

async fn keys(node: &Node) -> Result<Vec<String>, String> {
    let db = node.connect("kine").await.map_err(|e| e.to_string())?;
    // Kine's gap records (deleted, `gap-<id>`) fill skipped revisions; Kine never lists them.
    let rows = db
        .query("listing keys", "SELECT name FROM kine WHERE deleted = 0 ORDER BY id", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Wait until `node` holds exactly `want` (in id order).
async fn wait_for_keys(node: &Node, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    until_async(&format!("keys {want:?} on {}", node.settings().node.name), DEADLINE, EVERY, || {
        let want = want.clone();
        async move {
            let got = keys(node).await?;
            if got == want { Ok(()) } else { Err(format!("{got:?}")) }
        }
    })
    .await
    .unwrap();
}

async fn max_id(node: &Node) -> i64 {
    kine_db(node).await.query_one("max id", "SELECT COALESCE(max(id), 0) FROM kine", &[]).await.unwrap().get(0)
}

/// Kine's schema on the leader, as Kine (its owner) creates it on first start.
async fn create_kine_table(node: &Node) {
    let db = kine_db(node).await;
    db.batch("creating the kine table", KINE_SCHEMA).await.unwrap();
    db.batch("handing it to kine", "ALTER TABLE kine OWNER TO kine").await.unwrap();
}

/// Wait until `node` is a standby streaming from its peer, and the peer lists it.
async fn wait_streaming(standby: &Node, primary: &Node) {
    let name = standby.settings().node.name.clone();
    until_async(&format!("{name} streaming"), DEADLINE, EVERY, || async {
        let s = standby.status().await.map_err(|e| e.to_string())?;
        let p = primary.status().await.map_err(|e| e.to_string())?;
        match p.replica(&name) {
            Some(r) if s.streaming() && r.state.as_deref() == Some("streaming") => Ok(()),
            other => Err(format!("standby {s:?}; primary sees {other:?}")),
        }
    })
    .await
    .unwrap();
}

fn archive_entries(archive: &Path) -> Vec<String> {
    let file = std::fs::File::open(archive).unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_replays_rows_written_on_the_primary() {
    require_postgres!();
    let lab = Lab::new();
    let (a, b) = pair(&lab, Replication::Streaming, Durability::Async);
    a.bootstrap_leader().await.unwrap();
    create_kine_table(&a).await;
    let archive = b.init_follower().await.unwrap();
    assert_eq!(archive, None, "an empty data directory needs no archive");
    wait_streaming(&b, &a).await;

    let db = kine_db(&a).await;
    for key in ["/one", "/two", "/three"] {
        put(&db, key).await;
    }
    wait_for_keys(&b, &["/one", "/two", "/three"]).await;

    let (sa, sb) = (a.status().await.unwrap(), b.status().await.unwrap());
    assert_eq!((sa.role, sb.role), (PgRole::Primary, PgRole::Standby));
    assert_eq!((sa.timeline, sb.timeline), (1, 1));
    let replica = sa.replica("b").expect("b in pg_stat_replication");
    assert!(replica.lag_bytes.is_some_and(|l| l >= 0), "{replica:?}");
    assert_eq!(replica.sync_state.as_deref(), Some("async"));
    assert!(serde_json::to_value(&sa).unwrap()["replicas"][0]["lag_bytes"].is_number());

    // The standby streams over TLS.
    let ssl: bool = a
        .connect("postgres")
        .await
        .unwrap()
        .query_one(
            "reading pg_stat_ssl",
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) WHERE r.application_name = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the replication connection is not encrypted");
    // The server's key: its own directory, 0600, the OS user's.
    let key = a.settings().tls_dir().join("node.key");
    let meta = std::fs::metadata(&key).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", key.display());
    assert_eq!(meta.uid(), a.owner().uid);
    assert_eq!(std::fs::metadata(a.settings().tls_dir()).unwrap().permissions().mode() & 0o777, 0o700);

    // Kine's role logs in over TLS (verified against the cluster CA, no
    // client certificate, as Kine does) with its SCRAM password.
    let ca = a.settings().tls.ca.clone();
    let connect = |user: &str, password: &str, dbname: &str, tls: Option<&str>| {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(a.settings().node.port).user(user).password(password).dbname(dbname);
        let tls = tls.map(|ca| {
            geminik8s::tls::install_crypto_provider();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
            let mut c = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            c.alpn_protocols = vec![b"postgresql".to_vec()];
            tokio_postgres_rustls::MakeRustlsConnect::new(c)
        });
        async move {
            match tls {
                Some(tls) => {
                    config.ssl_mode(tokio_postgres::config::SslMode::Require);
                    let (client, conn) = config.connect(tls).await?;
                    tokio::spawn(conn);
                    Ok(client)
                }
                None => {
                    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    Ok::<_, tokio_postgres::Error>(client)
                }
            }
        }
    };
    let client = connect("kine", "kine-pass", "kine", Some(&ca)).await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM kine", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
    // ...and nothing else does: not with a wrong password, not without TLS
    // (Kine's role or the replication role), not trusting another CA.
    assert!(connect("kine", "wrong", "kine", Some(&ca)).await.is_err());
    for (user, password, dbname) in [("kine", "kine-pass", "kine"), ("replicator", "repl pass'word", "postgres")] {
        let refused =
            connect(user, password, dbname, None).await.err().map(|e| e.as_db_error().map(|d| d.message().to_string()));
        let message = refused.flatten().unwrap_or_default();
        assert!(message.contains("no encryption"), "{user} without TLS: {message:?}");
    }
    // The replication role needs a node's client certificate besides TLS and its password.
    let err = connect("replicator", "repl pass'word", "postgres", Some(&ca)).await.unwrap_err();
    let message = err.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| format!("{err:?}"));
    assert!(message.contains("client certificate"), "{message}");
    let foreign = cluster_pki().ca.cert;
    let err = connect("kine", "kine-pass", "kine", Some(&foreign)).await.unwrap_err();
    assert!(format!("{err:?}").to_lowercase().contains("certificate"), "{err:?}");
}

/// Durability as the agent applies it: with `synchronous_standby_names`
/// naming the standby a commit waits for it (and blocks while it is
/// stopped); emptied, the waiting commit returns. When to do which is the
/// role machine's decision (unit-tested and simulated); this shows what
/// PostgreSQL does with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commit_waits_for_the_standby_until_degraded() {
    require_postgres!();
    let lab = Lab::new();
    let (a, b) = streaming_pair(&lab, Durability::Synchronous).await;

    assert!(!a.waits_for_peer(&a.status().await.unwrap().synchronous_standby_names), "bootstrap starts async");
    a.apply_durability(true).await.unwrap();
    until_async("b to be the synchronous standby", DEADLINE, EVERY, || async {
        let s = a.status().await.map_err(|e| e.to_string())?;
        match s.replica("b").and_then(|r| r.sync_state.clone()) {
            Some(state) if state == "sync" && a.waits_for_peer(&s.synchronous_standby_names) => Ok(()),
            other => Err(format!("{other:?}, synchronous_standby_names={:?}", s.synchronous_standby_names)),
        }
    })
    .await
    .unwrap();
    put(&kine_db(&a).await, "/acked-while-synchronous").await;
    wait_for_keys(&b, &["/acked-while-synchronous"]).await;
    let replica = a.status().await.unwrap().replica("b").cloned().unwrap();
    assert!(replica.flush_lsn_bytes.is_some_and(|f| f > 0), "the standby's flush position is reported: {replica:?}");

    b.stop(StopMode::Fast).await.unwrap();
    let writer = kine_db(&a).await;
    let mut commit = tokio::spawn(async move { put(&writer, "/waits-for-the-standby").await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut commit).await.is_err(),
        "a synchronous commit returned while the standby was stopped"
    );

    a.apply_durability(false).await.unwrap();
    let id = tokio::time::timeout(DEADLINE, commit).await.expect("the commit returns after degrading").unwrap();
    assert!(id > 0);
    assert_eq!(a.status().await.unwrap().synchronous_standby_names, "");

    // The standby comes back: synchronous again, and commits wait for it again.
    b.start().await.unwrap();
    wait_streaming(&b, &a).await;
    a.apply_durability(true).await.unwrap();
    assert_eq!(a.status().await.unwrap().synchronous_standby_names, "\"b\"");
    put(&kine_db(&a).await, "/acked-after-return").await;
    wait_for_keys(&b, &["/acked-while-synchronous", "/waits-for-the-standby", "/acked-after-return"]).await;
}

/// A stopped server's position comes from its control file, and is at
/// least what it had written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_servers_position_is_read_from_its_control_file() {
    require_postgres!();
    let lab = Lab::new();
    let (a, _b) = pair(&lab, Replication::Streaming, Durability::Async);
    a.bootstrap_leader().await.unwrap();
    create_kine_table(&a).await;
    put(&kine_db(&a).await, "/written").await;
    let running = a.status().await.unwrap();
    a.stop(StopMode::Fast).await.unwrap();
    let stopped = a.control_position().await.unwrap().expect("a cluster is there");
    assert_eq!(i64::from(stopped.timeline), running.timeline);
    // A clean shutdown writes a checkpoint past everything written before.
    assert!(stopped.lsn_bytes as i64 >= running.lsn_bytes, "{stopped:?} vs {}", running.lsn_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_standby_takes_writes_and_the_old_primary_rejoins_by_rewind() {
    require_postgres!();
    let lab = Lab::new();
    let (a, b) = streaming_pair(&lab, Durability::Async).await;
    let db = kine_db(&a).await;
    for key in ["/k1", "/k2", "/k3"] {
        put(&db, key).await;
    }
    wait_for_keys(&b, &["/k1", "/k2", "/k3"]).await;

    // The follower falls behind; the async leader acknowledges more writes,
    // then crashes: those are the lost tail, and a's history diverges. More
    // than the 32 sequence values PostgreSQL logs ahead, so without the
    // margin b's next revision would be below ones a already handed out.
    b.stop(StopMode::Fast).await.unwrap();
    let mut last_on_a = 0;
    for i in 0..40 {
        last_on_a = put(&db, &format!("/tail{i}")).await;
    }
    drop(db);
    a.stop(StopMode::Immediate).await.unwrap();

    b.start().await.unwrap();
    b.promote().await.unwrap();
    let sb = b.status().await.unwrap();
    assert_eq!((sb.role, sb.timeline), (PgRole::Primary, 2));
    let after = put(&kine_db(&b).await, "/after-promotion").await;
    assert!(after > last_on_a, "revision {after} after promotion is not above {last_on_a} handed out before");
    assert!(after >= 3 + b.settings().sequence_margin, "margin not applied: {after}");
    // No hole in the revisions: Kine's watch stream would wait on it, filling it one id at a time.
    let (count, max): (i64, i64) = {
        let row = kine_db(&b).await.query_one("counting", "SELECT count(*), max(id) FROM kine", &[]).await.unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(count, max, "every revision up to {max} is a row (the skipped ones as Kine's gap records)");

    let rejoin = a.rejoin(false).await.unwrap();
    let Rejoin::Rewound { archive: Some(archive) } = &rejoin else { panic!("expected a rewind: {rejoin:?}") };
    let entries = archive_entries(archive);
    assert!(entries.iter().any(|e| e == "data/PG_VERSION"), "{entries:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(archive).unwrap().permissions().mode() & 0o777, 0o600, "the archive holds secrets");
    wait_streaming(&a, &b).await;
    let sa = a.status().await.unwrap();
    assert_eq!((sa.role, sa.timeline), (PgRole::Standby, 2));
    put(&kine_db(&b).await, "/after-rejoin").await;
    wait_for_keys(&a, &["/k1", "/k2", "/k3", "/after-promotion", "/after-rejoin"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rewind_leaves_an_archive_and_a_working_standby() {
    require_postgres!();
    let lab = Lab::new();
    let (mut a, b) = pair(&lab, Replication::Streaming, Durability::Async);
    a.bootstrap_leader().await.unwrap();
    create_kine_table(&a).await;
    b.init_follower().await.unwrap();
    wait_streaming(&b, &a).await;
    put(&kine_db(&a).await, "/before").await;
    wait_for_keys(&b, &["/before"]).await;

    a.stop(StopMode::Fast).await.unwrap();
    b.promote().await.unwrap();
    // pg_rewind reads the source's files through these functions; without
    // them it cannot work, while a base backup still can.
    b.connect("postgres")
        .await
        .unwrap()
        .batch(
            "revoking pg_rewind's functions",
            "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) FROM replicator; \
             REVOKE EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) FROM replicator;",
        )
        .await
        .unwrap();
    put(&kine_db(&b).await, "/after-promotion").await;

    // Only the archive taken because the rewind failed.
    let mut settings = a.settings().clone();
    settings.archive_before_rewind = false;
    a.mgr = Manager::new(settings, a.supervisor.clone()).unwrap();
    let rejoin = a.rejoin(false).await.unwrap();
    let Rejoin::Recloned { archive: Some(archive), rewind_error: Some(error) } = &rejoin else {
        panic!("expected a re-clone after a failed rewind: {rejoin:?}")
    };
    assert!(error.contains("pg_rewind"), "{error}");
    assert!(archive.is_file());
    let entries = archive_entries(archive);
    assert!(entries.iter().any(|e| e == "data/global/pg_control"), "{entries:?}");
    wait_streaming(&a, &b).await;
    put(&kine_db(&b).await, "/after-reclone").await;
    wait_for_keys(&a, &["/before", "/after-promotion", "/after-reclone"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_replication_and_promotion_move_the_sequence_past_max_id() {
    require_postgres!();
    let lab = Lab::new();
    let (a, b) = pair(&lab, Replication::Logical, Durability::Async);
    a.bootstrap_leader().await.unwrap();
    b.init_follower().await.unwrap();
    let db = kine_db(&a).await;
    for key in ["/l1", "/l2", "/l3"] {
        put(&db, key).await;
    }
    drop(db);
    wait_for_keys(&b, &["/l1", "/l2", "/l3"]).await;
    let last_on_a = max_id(&a).await;
    let sb = b.status().await.unwrap();
    assert_eq!(sb.role, PgRole::Primary, "a logical follower is a read-write server");
    assert!(sb.streaming(), "{sb:?}");

    // Why the fix matters: logical replication does not carry the sequence,
    // so on the follower the next id would reuse a revision a already used.
    let hazard = kine_db(&b).await;
    hazard.batch("begin", "BEGIN").await.unwrap();
    let reuse = hazard
        .query_one(
            "insert without the fix",
            "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
             VALUES ('/reused', 1, 0, 0, 0, 0, 'v', NULL) RETURNING id",
            &[],
        )
        .await;
    let err = reuse.expect_err("an insert before the fix got a fresh revision").to_string();
    assert!(err.contains("kine_pkey"), "{err}");
    hazard.batch("rollback", "ROLLBACK").await.unwrap();
    drop(hazard);

    a.stop(StopMode::Fast).await.unwrap();
    b.promote().await.unwrap();
    let sb = b.status().await.unwrap();
    assert_eq!(sb.subscription, None, "the subscription to the old leader is gone");
    let next = put(&kine_db(&b).await, "/after-promotion").await;
    assert!(next > last_on_a, "revision {next} after promotion is not above {last_on_a}");

    // The old leader comes back as the subscriber of the new one.
    let rejoin = a.rejoin(false).await.unwrap();
    assert!(matches!(&rejoin, Rejoin::Recloned { archive: Some(p), .. } if p.is_file()), "{rejoin:?}");
    wait_for_keys(&a, &["/l1", "/l2", "/l3", "/after-promotion"]).await;
    let next_after_rejoin = put(&kine_db(&b).await, "/after-rejoin").await;
    assert!(next_after_rejoin > next);
    wait_for_keys(&a, &["/l1", "/l2", "/l3", "/after-promotion", "/after-rejoin"]).await;

    // Re-initialising the follower again replaces its subscription (and the
    // slot the old one left on the leader), archiving what it held.
    let archive = a.init_follower().await.unwrap();
    assert!(archive.is_some_and(|p| p.is_file()));
    put(&kine_db(&b).await, "/after-reinit").await;
    wait_for_keys(&a, &["/l1", "/l2", "/l3", "/after-promotion", "/after-rejoin", "/after-reinit"]).await;
}

/// The live pid in `postmaster.pid`.
fn postmaster_pid(node: &Node) -> u32 {
    let text = std::fs::read_to_string(node.settings().data_dir.join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// Parent pid and process group of `pid`, from `/proc/PID/stat`.
fn parent_and_group(pid: u32) -> (u32, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    (fields[1].parse().unwrap(), fields[2].parse().unwrap())
}

async fn wait_for_log(node: &Node, needle: &str) {
    let log = node.settings().log_file.clone();
    until_async(&format!("`{needle}` in {}", log.display()), DEADLINE, EVERY, || async {
        let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
        if text.contains(needle) { Ok(()) } else { Err(text.lines().last().unwrap_or_default().to_string()) }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_is_a_service_of_the_supervisor_and_stops_with_the_mode_asked() {
    require_postgres!();
    let lab = Lab::new();
    let (a, _b) = pair(&lab, Replication::Streaming, Durability::Async);
    a.bootstrap_leader().await.unwrap();
    create_kine_table(&a).await;

    // The postmaster is the supervisor's service: its child, leading its own
    // process group, its output in the node's log file.
    let status = a.supervisor.status(POSTGRES).await.unwrap();
    assert_eq!(status.state, ActiveState::Active, "{status:?}");
    let pid = status.main_pid.expect("a main pid");
    assert_eq!(postmaster_pid(&a), pid, "postmaster.pid names another process than the service's");
    assert_eq!(parent_and_group(pid), (std::process::id(), pid), "not the supervisor's child in its own group");
    wait_for_log(&a, "database system is ready to accept connections").await;

    // Immediate: SIGQUIT through the supervisor, and nothing of the group is left.
    a.stop(StopMode::Immediate).await.unwrap();
    wait_for_log(&a, "received immediate shutdown request").await;
    assert_eq!(a.supervisor.status(POSTGRES).await.unwrap().state, ActiveState::Inactive);
    assert!(!a.is_running().unwrap() && !group_alive(pid as i32), "PostgreSQL still runs after the stop");

    // Started again (crash recovery after the immediate stop), then fast: SIGINT.
    a.start().await.unwrap();
    let again = a.supervisor.status(POSTGRES).await.unwrap().main_pid.expect("a main pid");
    assert_ne!(again, pid);
    assert_eq!(postmaster_pid(&a), again);
    put(&kine_db(&a).await, "/after-restart").await;
    a.stop(StopMode::Fast).await.unwrap();
    wait_for_log(&a, "received fast shutdown request").await;
    assert!(!a.is_running().unwrap() && !group_alive(again as i32), "PostgreSQL still runs after the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_running_outside_the_supervisor_is_taken_over_on_start() {
    require_postgres!();
    let lab = Lab::new();
    let (a, _b) = pair(&lab, Replication::Streaming, Durability::Async);
    a.bootstrap_leader().await.unwrap();
    a.stop(StopMode::Fast).await.unwrap();

    // A server the supervisor does not know, as one left behind by a killed agent.
    let s = a.settings();
    let owner = a.owner();
    let started = std::process::Command::new(s.tool("pg_ctl"))
        .args(["start", "-s", "-w", "-D"])
        .arg(&s.data_dir)
        .arg("-l")
        .arg(lab.dir.path().join("stray.log"))
        .current_dir("/")
        .uid(owner.uid)
        .gid(owner.gid)
        .status()
        .unwrap();
    assert!(started.success(), "pg_ctl start: {started}");
    let stray = postmaster_pid(&a);
    assert_eq!(a.supervisor.status(POSTGRES).await.unwrap().state, ActiveState::Inactive);

    a.start().await.unwrap();
    let status = a.supervisor.status(POSTGRES).await.unwrap();
    assert_eq!(status.state, ActiveState::Active, "{status:?}");
    let pid = status.main_pid.expect("a main pid");
    assert_ne!(pid, stray, "the stray server is still the one running");
    assert_eq!(postmaster_pid(&a), pid);
    let state = std::fs::read_to_string(format!("/proc/{stray}/stat"))
        .ok()
        .and_then(|stat| stat[stat.rfind(')')? + 1..].split_whitespace().next().map(str::to_string));
    assert!(matches!(state.as_deref(), None | Some("Z" | "X")), "the stray server still runs ({state:?})");
    assert_eq!(kine_db(&a).await.query_one("ping", "SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

/// A planned hand-over at the datastore level: the primary shuts down
/// cleanly under synchronous replication, the standby replays past the
/// shutdown checkpoint read from the control file and is promoted, and the
/// old primary follows the new timeline as it is: no pg_rewind, no archive,
/// every row on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_primary_follows_the_promoted_standby_without_rewind() {
    require_postgres!();
    let lab = Lab::new();
    let (a, b) = streaming_pair(&lab, Durability::Synchronous).await;
    a.apply_durability(true).await.unwrap();
    let db = kine_db(&a).await;
    for key in ["/k1", "/k2", "/k3"] {
        put(&db, key).await;
    }
    drop(db);

    a.stop(StopMode::Fast).await.unwrap();
    let control = a.control_position().await.unwrap().unwrap();
    assert!(control.clean_shutdown, "{control:?}");
    // The proof: the standby's last replayed record ends past the start of
    // the shutdown checkpoint record, on the same timeline.
    until_async("b to replay past the shutdown checkpoint", DEADLINE, Duration::from_millis(10), || async {
        let s = b.status().await.map_err(|e| e.to_string())?;
        let past = s.lsn_bytes as u64 > control.lsn_bytes && s.timeline == i64::from(control.timeline);
        if past { Ok(()) } else { Err(format!("replayed {} on {}", s.lsn, s.timeline)) }
    })
    .await
    .unwrap();
    b.promote().await.unwrap();
    assert_eq!(b.status().await.unwrap().timeline, i64::from(control.timeline) + 1);

    let rejoin = a.rejoin(true).await.unwrap();
    assert_eq!(rejoin, Rejoin::Followed);
    assert!(geminik8s::postgres::archive::list(&a.settings().data_dir).is_empty(), "nothing archived");
    wait_streaming(&a, &b).await;
    let sa = a.status().await.unwrap();
    assert_eq!((sa.role, sa.timeline), (PgRole::Standby, i64::from(control.timeline) + 1));
    put(&kine_db(&b).await, "/after").await;
    wait_for_keys(&a, &["/k1", "/k2", "/k3", "/after"]).await;

    // And back, through the agent's datastore layer: right after following
    // a new timeline, the standby's control file still names the old one
    // and its WAL receiver ends with the primary's shutdown; the proof
    // still holds, at once, and nothing needs pg_rewind.
    use geminik8s::daemon::subsystems::Database;
    b.apply_durability(true).await.unwrap();
    let (db_a, db_b) = (Datastore::new(a.mgr.clone()), Datastore::new(b.mgr.clone()));
    let checkpoint = db_b.hand_over(Duration::from_secs(10)).await.unwrap().expect("a clean shutdown");
    assert_eq!(checkpoint.timeline, 2);
    let started = std::time::Instant::now();
    db_a.promote(3, false, None, Some(checkpoint)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "the proof took {:?}", started.elapsed());
    assert_eq!(a.status().await.unwrap().timeline, 3);
    db_b.rejoin("a").await.unwrap();
    wait_streaming(&b, &a).await;
    assert!(geminik8s::postgres::archive::list(&b.settings().data_dir).is_empty(), "nothing archived");
    put(&kine_db(&a).await, "/back").await;
    wait_for_keys(&b, &["/k1", "/k2", "/k3", "/after", "/back"]).await;
}
