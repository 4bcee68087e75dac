//! Shared by the tests that back up and restore a real PostgreSQL 15
//! (`backup.rs`, `backup_pitr.rs`, `backup_s3.rs`): a node's server configured and run as the
//! agent runs it, Kine's rows, and the `gemin_k8s` binary. The servers run
//! as the `postgres` user, so these need root.

// Each test file uses a part of this.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use geminik8s::postgres::Manager;
use geminik8s::postgres::render::KINE_SCHEMA;
use geminik8s::services::supervisor::Supervisor;

/// A directory for the test, traversable by the `postgres` user.
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        let mut dir = tempfile::Builder::new().prefix("gk8s-backup-").tempdir().unwrap();
        // GEMINIK8S_KEEP_TEST_DIRS=1 keeps the data directories and logs for a post-mortem.
        dir.disable_cleanup(std::env::var_os("GEMINIK8S_KEEP_TEST_DIRS").is_some());
        chown_to_postgres(dir.path());
        Lab { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn node_dir(&self, name: &str) -> PathBuf {
        let d = self.path(name);
        std::fs::create_dir_all(&d).unwrap();
        chown_to_postgres(&d);
        d
    }
}

pub fn postgres_user() -> nix::unistd::User {
    nix::unistd::User::from_name("postgres").unwrap().expect("the postgres user")
}

pub fn chown_to_postgres(path: &Path) {
    let user = postgres_user();
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn free_port() -> u16 {
    geminik8s_vm_tests::pg::free_port().unwrap()
}

/// One node's PostgreSQL, run by its own process supervisor as the agent
/// runs it (killed when dropped, also when the test panics).
pub struct Node {
    pub mgr: Manager,
    pub _supervisor: Arc<Supervisor>,
}

impl std::ops::Deref for Node {
    type Target = Manager;
    fn deref(&self) -> &Manager {
        &self.mgr
    }
}

/// A node `name` of cluster `lab` on loopback; its data in `DIR/data`.
pub fn node(lab: &Lab, name: &str) -> Node {
    let dir = lab.node_dir(name);
    let mut s = geminik8s_vm_tests::pg::loopback_settings("lab", name, &dir).unwrap();
    s.start_timeout = Duration::from_secs(30);
    let supervisor = Arc::new(Supervisor::new());
    Node { mgr: Manager::new(s, supervisor.clone()).unwrap(), _supervisor: supervisor }
}

/// Bootstrap `node` as the agent does for a leader, with Kine's table.
pub async fn leader(node: &Node) {
    node.bootstrap_leader().await.unwrap();
    let db = node.connect("kine").await.unwrap();
    db.batch("creating the kine table", KINE_SCHEMA).await.unwrap();
    db.batch("handing it to kine", "ALTER TABLE kine OWNER TO kine").await.unwrap();
}

/// Insert `keys` the way Kine does.
pub async fn put(node: &Node, keys: &[String]) {
    let sql = "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
               VALUES ($1, 1, 0, 0, 0, 0, decode(repeat('ab', 512), 'hex'), NULL)";
    each_key(node, keys, "inserting a row", sql).await;
}

/// Run `sql` (with the key as `$1`) in Kine's database for each of `keys`.
async fn each_key(node: &Node, keys: &[String], what: &str, sql: &str) {
    let db = node.connect("kine").await.unwrap();
    for key in keys {
        db.execute(what, sql, &[key]).await.unwrap();
    }
}

/// Every key in revision order (not Kine's bookkeeping records: the
/// compaction mark and the gap record a restore adds).
pub async fn keys(node: &Node) -> Vec<String> {
    let db = node.connect("kine").await.unwrap();
    let sql = "SELECT name FROM kine WHERE name <> 'compact_rev_key' AND name NOT LIKE 'gap-%' ORDER BY id";
    let rows = db.query("listing keys", sql, &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("/registry/{prefix}/{i:04}")).collect()
}

/// Run `gemin_k8s ARGS`.
pub fn gemin(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gemin_k8s")).args(args).output().unwrap()
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

pub fn failed(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure:\n{}", text(&out));
    text(&out)
}

pub fn keygen(lab: &Lab, name: &str) -> (PathBuf, String) {
    let path = lab.path(name);
    let public = ok(gemin(&["backup", "keygen", "--out", path.to_str().unwrap()])).trim().to_string();
    assert!(public.starts_with("age1"), "{public}");
    (path, public)
}

/// `backup create` of `node` (as node `a` of cluster `lab`) into `dest` with extra flags.
pub fn backup(node: &Node, dest: &Path, extra: &[&str]) -> String {
    let s = node.settings();
    let (host, port) = (s.socket_dir.display().to_string(), s.node.port.to_string());
    let mut args = vec!["backup", "create", "--output", dest.to_str().unwrap(), "--pg-host", &host, "--pg-port", &port];
    args.extend(["--cluster", "lab", "--node", "a"]);
    args.extend(extra);
    ok(gemin(&args))
}

/// Delete `keys` the way Kine does: a new record per key, marked deleted.
pub async fn delete(node: &Node, keys: &[String]) {
    let sql = "INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, value, old_value) \
               SELECT $1, 0, 1, 0, max(id), 0, NULL, NULL FROM kine WHERE name = $1";
    each_key(node, keys, "deleting a key", sql).await;
}

/// The keys a Kine client lists: the newest record of each name, unless deleted.
pub async fn live_keys(node: &Node) -> Vec<String> {
    let db = node.connect("kine").await.unwrap();
    let sql = "SELECT k.name FROM kine k \
               WHERE k.id = (SELECT max(id) FROM kine WHERE name = k.name) AND k.deleted = 0 \
               AND k.name <> 'compact_rev_key' AND k.name NOT LIKE 'gap-%' ORDER BY k.name";
    db.query("listing live keys", sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

pub async fn scalar_i64(node: &Node, sql: &str) -> i64 {
    node.connect("kine").await.unwrap().query_one("reading", sql, &[]).await.unwrap().get(0)
}

pub async fn scalar_text(node: &Node, db: &str, sql: &str) -> String {
    node.connect(db).await.unwrap().query_one("reading", sql, &[]).await.unwrap().get(0)
}

/// `backup --type incremental` of `node` into `dest` (with `extra` flags,
/// as an S3 destination's) while the archiver's part is played by
/// `wal-push` every half second (as the agent does every five); returns its
/// JSON report.
pub async fn incremental(node: &Node, dest: &str, spool: &Path, public: &str, extra: &[&str]) -> serde_json::Value {
    let s = node.settings();
    let (host, port) = (s.socket_dir.display().to_string(), s.node.port.to_string());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gemin_k8s"))
        .args(["backup", "--type", "incremental", "--output", dest, "--pg-host", &host, "--pg-port", &port])
        .args(["--cluster", "lab", "--json", "--timeout", "60s"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let push = ["backup", "wal-push", "--spool", spool.to_str().unwrap(), "--output", dest, "--encryption-key", public];
    let push = [&push[..], extra].concat();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    while !waiting.is_finished() {
        ok(gemin(&push));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = ok(waiting.await.unwrap());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A node `name` whose server archives its WAL as the agent sets it up:
/// `archive_command` spools each file through `gemin_k8s backup wal-spool`
/// into the returned directory.
pub fn archiving_node(lab: &Lab, name: &str) -> (Node, PathBuf) {
    // The server's OS user runs the archive command: a copy it can execute.
    let program = lab.path("gemin_k8s");
    if !program.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_gemin_k8s"), &program).unwrap();
        chown_to_postgres(&program);
    }
    let spool = lab.node_dir(&format!("{name}-spool"));
    let mut n = node(lab, name);
    let mut s = n.settings().clone();
    s.wal_archive = Some(geminik8s::postgres::settings::WalArchive {
        program,
        spool: spool.clone(),
        spool_limit: 1 << 30,
        timeout: Duration::from_secs(60),
    });
    n.mgr = Manager::new(s, n._supervisor.clone()).unwrap();
    (n, spool)
}
