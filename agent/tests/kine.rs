//! Real Kine on a real PostgreSQL 15 that takes Kine's role only over TLS, run
//! by the process supervisor from the rendered spec: etcd reads and writes go
//! through it (the database connection verified against the cluster CA), a
//! Kine trusting another CA gets nowhere, the health probe follows the
//! database going away and coming back, and the recovery helper brings Kine
//! back when it does not recover by itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use geminik8s::cmd::Tool;
use geminik8s::k3s;
use geminik8s::kine::{self, KineRecovery, KineSettings, RecoveryPolicy, Verdict};
use geminik8s::pki::{self, ClusterPki};
use geminik8s::services::supervisor::Supervisor;
use geminik8s::services::{RunAs, Services};
use geminik8s_vm_tests::poll::until_async;
use geminik8s_vm_tests::require;
use geminik8s_vm_tests::skip::find_tool;

const EVERY: Duration = Duration::from_millis(200);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Special characters on purpose: the endpoint must percent-encode them.
const KINE_PASSWORD: &str = "k1ne@p/ss:w?rd#%";

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("{name} not found"))
}

/// A throwaway PostgreSQL 15 in a temp dir, stopped (immediately) on drop.
/// It takes Kine's role only over TLS, with a node certificate of `pki`.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    user: RunAs,
    pki: ClusterPki,
}

impl Postgres {
    async fn init() -> Postgres {
        let user = geminik8s::services::units::postgres_user().unwrap();
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::chown(dir.path(), Some(user.uid.into()), Some(user.gid.into())).unwrap();
        let lo = IpAddr::from(Ipv4Addr::LOCALHOST);
        let pki = pki::generate("lab", &[("node1".into(), lo)], lo, None).unwrap();
        let pg = Postgres { dir, port: free_port(), user, pki };
        std::fs::create_dir(pg.sockets()).unwrap();
        nix::unistd::chown(&pg.sockets(), Some(user.uid.into()), Some(user.gid.into())).unwrap();
        pg.as_postgres(tool("initdb"))
            .args([
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .run()
            .await
            .unwrap();
        for (file, pem) in [("server.crt", &pg.pki.nodes[0].cert), ("server.key", &pg.pki.nodes[0].key)] {
            let path = pg.dir.path().join(file);
            geminik8s::fsutil::write_atomic(&path, pem.as_bytes(), 0o600).unwrap();
            nix::unistd::chown(&path, Some(user.uid.into()), Some(user.gid.into())).unwrap();
        }
        let hba = pg.data().join("pg_hba.conf");
        std::fs::write(&hba, "local all all trust\nhostssl kine kine 127.0.0.1/32 scram-sha-256\n").unwrap();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn sockets(&self) -> PathBuf {
        self.dir.path().join("sockets")
    }

    fn as_postgres(&self, program: PathBuf) -> Tool {
        Tool::new(program)
            .user(self.user.uid, self.user.gid)
            .current_dir(self.dir.path())
            .timeout(Duration::from_secs(60))
    }

    async fn start(&self) {
        let d = self.dir.path().display();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key",
            self.port,
            self.sockets().display()
        );
        self.as_postgres(tool("pg_ctl"))
            .args(["start", "-w", "-D", self.data().to_str().unwrap(), "-o", &options])
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .run()
            .await
            .unwrap();
    }

    async fn stop(&self) {
        self.as_postgres(tool("pg_ctl"))
            .args(["stop", "-w", "-m", "fast", "-D", self.data().to_str().unwrap()])
            .run()
            .await
            .unwrap();
    }

    async fn sql(&self, statement: &str) {
        self.as_postgres(tool("psql"))
            .args(["-v", "ON_ERROR_STOP=1", "-h", self.sockets().to_str().unwrap(), "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c", statement])
            .run()
            .await
            .unwrap();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let status = std::process::Command::new(tool("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data())
            .uid(self.user.uid)
            .gid(self.user.gid)
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        // Fails when the server is already stopped, which is fine.
        if let Err(e) = status {
            eprintln!("pg_ctl stop: {e}");
        }
    }
}

async fn etcdctl(endpoint: &str, args: &[&str]) -> Result<String, String> {
    Tool::new(tool("etcdctl"))
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--command-timeout=3s", "--dial-timeout=2s"])
        .args(args)
        .timeout(Duration::from_secs(10))
        .run()
        .await
        .map(|out| out.stdout)
        .map_err(|e| e.to_string())
}

async fn postgres_with_kine_database() -> Postgres {
    let pg = Postgres::init().await;
    pg.start().await;
    pg.sql(&format!("CREATE ROLE kine LOGIN PASSWORD '{KINE_PASSWORD}'")).await;
    pg.sql("CREATE DATABASE kine OWNER kine").await;
    pg
}

fn kine_settings(pg: &Postgres) -> KineSettings {
    KineSettings {
        binary: tool("kine"),
        db_host: Ipv4Addr::LOCALHOST.into(),
        db_port: pg.port,
        password: KINE_PASSWORD.into(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        compaction_interval: Duration::from_secs(300),
        log_file: Some(pg.dir.path().join("kine.log")),
        ca: pg.pki.ca.cert.clone(),
        ca_file: pg.dir.path().join("kine-ca.crt"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_on_postgres_serves_etcd_and_recovers_after_the_database_returns() {
    require!(root: true, tools: ["initdb", "pg_ctl", "psql", "kine", "etcdctl"]);
    let pg = postgres_with_kine_database().await;
    let settings = kine_settings(&pg);
    let endpoint = settings.etcd_endpoint();
    let log = settings.log_file.clone().unwrap();
    let kine_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let supervisor = Supervisor::new();
    settings.write_ca().unwrap();
    supervisor.configure(&settings.spec()).await.unwrap();
    supervisor.start(kine::SERVICE, Duration::from_secs(10)).await.unwrap();

    until_async("kine to answer its health probe", Duration::from_secs(30), EVERY, || {
        kine::probe(&endpoint, PROBE_TIMEOUT)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nkine log:\n{}", kine_log()));
    etcdctl(&endpoint, &["put", "/registry/geminik8s/a", "one"]).await.unwrap();
    let got = etcdctl(&endpoint, &["get", "--print-value-only", "/registry/geminik8s/a"]).await.unwrap();
    assert_eq!(got.trim(), "one");

    // The database goes away: the probe says so.
    pg.stop().await;
    until_async("the probe to fail without the database", Duration::from_secs(30), EVERY, || async {
        match kine::probe(&endpoint, PROBE_TIMEOUT).await {
            Ok(()) => Err("still healthy"),
            Err(_) => Ok(()),
        }
    })
    .await
    .unwrap();

    // It comes back (as after a failover): Kine is healthy again, by itself or
    // restarted by the recovery helper.
    pg.start().await;
    let mut recovery = KineRecovery::new(RecoveryPolicy { failures: 3, grace: Duration::from_secs(3) });
    recovery.primary_moved(std::time::Instant::now());
    let mut restarts = 0;
    // Polled by hand: each probe feeds the (stateful) recovery helper.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match kine::check_and_recover(&supervisor, &mut recovery, &endpoint, PROBE_TIMEOUT).await.unwrap() {
            Verdict::Healthy => break,
            Verdict::Restart => restarts += 1,
            Verdict::Waiting => {}
        }
        if std::time::Instant::now() > deadline {
            panic!("kine not healthy 60s after the database returned ({restarts} restarts)\nkine log:\n{}", kine_log());
        }
        tokio::time::sleep(EVERY).await;
    }
    eprintln!("kine healthy again after {restarts} restart(s) by the recovery helper");
    let got = etcdctl(&endpoint, &["get", "--print-value-only", "/registry/geminik8s/a"]).await.unwrap();
    assert_eq!(got.trim(), "one", "a key written before the outage is readable after it");
    etcdctl(&endpoint, &["put", "/registry/geminik8s/b", "two"]).await.unwrap();

    // A Kine that stays unhealthy is restarted through the Services trait (a
    // probe of a port nobody listens on stands in for a wedged Kine).
    let before = supervisor.status(kine::SERVICE).await.unwrap().main_pid.unwrap();
    let mut strict = KineRecovery::new(RecoveryPolicy { failures: 2, grace: Duration::ZERO });
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let verdicts = [
        kine::check_and_recover(&supervisor, &mut strict, &nowhere, PROBE_TIMEOUT).await.unwrap(),
        kine::check_and_recover(&supervisor, &mut strict, &nowhere, PROBE_TIMEOUT).await.unwrap(),
    ];
    assert_eq!(verdicts, [Verdict::Waiting, Verdict::Restart]);
    let after = supervisor.status(kine::SERVICE).await.unwrap().main_pid.unwrap();
    assert_ne!(before, after, "kine was not restarted");
    until_async("the restarted kine to answer", Duration::from_secs(30), EVERY, || {
        kine::probe(&endpoint, PROBE_TIMEOUT)
    })
    .await
    .unwrap();
    assert!(!kine_log().is_empty(), "kine's output goes to its log file");

    supervisor.shutdown(Duration::from_secs(15)).await.unwrap();
    assert!(kine::probe(&endpoint, PROBE_TIMEOUT).await.is_err(), "kine still answers after shutdown");
    // The password never shows on kine's command line.
    assert!(!settings.spec().expanded_argv().unwrap().concat().contains("k1ne"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_refuses_a_database_whose_certificate_the_cluster_ca_did_not_sign() {
    require!(root: true, tools: ["initdb", "pg_ctl", "psql", "kine"]);
    let pg = postgres_with_kine_database().await;
    let mut settings = kine_settings(&pg);
    let lo = IpAddr::from(Ipv4Addr::LOCALHOST);
    settings.ca = pki::generate("other", &[("node1".into(), lo)], lo, None).unwrap().ca.cert;
    let log = settings.log_file.clone().unwrap();
    let supervisor = Supervisor::new();
    settings.write_ca().unwrap();
    supervisor.configure(&settings.spec()).await.unwrap();
    supervisor.start(kine::SERVICE, Duration::from_secs(10)).await.unwrap();
    let seen = until_async("kine to report the untrusted certificate", Duration::from_secs(30), EVERY, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("unknown authority") { Ok(text) } else { Err(text) }
    })
    .await
    .unwrap();
    assert!(
        kine::probe(&settings.etcd_endpoint(), PROBE_TIMEOUT).await.is_err(),
        "kine serves without its database:\n{seen}"
    );
    supervisor.shutdown(Duration::from_secs(15)).await.unwrap();
}

/// K3s on Kine on PostgreSQL, started from the rendered spec by the supervisor,
/// until `/readyz` answers through the rendered credentials. K3s cannot be
/// obtained on every build host: this runs when `GEMINIK8S_K3S_BINARY` names one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k3s_server_on_kine_becomes_ready() {
    let Some(binary) = k3s::binary_from_env() else {
        geminik8s_vm_tests::skip::skip(
            "k3s_server_on_kine_becomes_ready",
            &format!("{} does not name a K3s binary (K3s cannot be downloaded here)", k3s::BINARY_ENV),
        );
        return;
    };
    require!(root: true, tools: ["initdb", "pg_ctl", "psql", "kine"]);
    let pg = postgres_with_kine_database().await;
    let kine_settings = kine_settings(&pg);
    let supervisor = Supervisor::new();
    kine_settings.write_ca().unwrap();
    supervisor.configure(&kine_settings.spec()).await.unwrap();
    supervisor.start(kine::SERVICE, Duration::from_secs(10)).await.unwrap();
    let kine_endpoint = kine_settings.etcd_endpoint();
    until_async("kine", Duration::from_secs(30), EVERY, || kine::probe(&kine_endpoint, PROBE_TIMEOUT)).await.unwrap();

    let data_dir = pg.dir.path().join("k3s");
    let settings = k3s::K3sSettings {
        binary,
        node_name: "geminik8s-test".into(),
        node_ip: Ipv4Addr::LOCALHOST.into(),
        vip: Ipv4Addr::LOCALHOST.into(),
        token: "geminik8s-test-token".into(),
        datastore_endpoint: kine_endpoint.clone(),
        data_dir,
        config_dir: pg.dir.path().join("k3s-config"),
        // Server only: no kubelet or containerd in a test.
        extra_args: vec!["--disable-agent".into()],
        log_file: Some(pg.dir.path().join("k3s.log")),
    };
    supervisor.configure(&settings.spec()).await.unwrap();
    supervisor.start(k3s::SERVICE, Duration::from_secs(10)).await.unwrap();
    let tls = settings.tls_dir();
    let url = k3s::api_url(settings.vip);
    let k3s_log = || std::fs::read_to_string(settings.log_file.as_ref().unwrap()).unwrap_or_default();
    until_async("K3s /readyz", Duration::from_secs(180), Duration::from_secs(1), || async {
        let creds = k3s::ClusterCredentials::from_server_tls(&tls).map_err(|e| e.to_string())?;
        k3s::ready(&url, &creds, Duration::from_secs(5)).await.map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nk3s log tail:\n{}", geminik8s::cmd::tail(&k3s_log(), 40)));
    let creds = k3s::ClusterCredentials::from_server_tls(&tls).unwrap();
    let kubeconfig = k3s::render_kubeconfig("geminik8s-test", &url, &creds);
    assert!(kubeconfig.contains(&format!("server: {url}")), "{kubeconfig}");
    supervisor.shutdown(Duration::from_secs(60)).await.unwrap();
}
