//! The K3s stand-in (`k3s-standin`: the real `kube-apiserver` in K3s's place)
//! run through the agent's own K3s path: the `k3s server` spec rendered by
//! `geminik8s::k3s::K3sSettings` from a node's cloud-config, started by the
//! process supervisor, `READY=1` on the notify socket as systemd expects from
//! a `Type=notify` unit, `/readyz` through the agent's readiness check, and
//! Kubernetes objects written and read with `kubectl`, on a real Kine.
//!
//! Kine runs on SQLite here (the API server and the stand-in are what is
//! tested); `agent/tests/kine.rs` runs the same path on PostgreSQL when
//! `GEMINIK8S_K3S_BINARY` names the stand-in or a real K3s.
//!
//! Needs `kine`, `kube-apiserver` and `kubectl` (`just deps`); not root.

use std::net::{IpAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use geminik8s::cmd::Tool;
use geminik8s::k3s::{self, ClusterCredentials, K3sSettings};
use geminik8s::services::supervisor::Supervisor;
use geminik8s::services::{ActiveState, ServiceSpec, Services};
use geminik8s_vm_tests::poll::until_async;
use geminik8s_vm_tests::{require, skip};
use serde_json::Value;

const TOKEN: &str = "k3s-standin-test-token";
const READY_TIMEOUT: Duration = Duration::from_secs(240);
const EVERY: Duration = Duration::from_millis(500);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// One test at a time: each starts Kine and API servers on ports picked as
/// free, and two at once race for them (and for the two cores).
static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kine on SQLite under `dir`, run by `supervisor`; returns its etcd endpoint.
async fn start_kine(supervisor: &Supervisor, dir: &Path) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let kine = skip::find_tool("kine").unwrap();
    let mut spec = ServiceSpec::new(
        "kine",
        vec![
            kine.display().to_string(),
            "--endpoint".into(),
            format!("sqlite://{}/state.db?_journal=WAL&cache=shared", dir.display()),
            "--listen-address".into(),
            listen.clone(),
        ],
    );
    spec.log_file = Some(dir.join("kine.log"));
    supervisor.configure(&spec).await.unwrap();
    supervisor.start("kine", Duration::from_secs(10)).await.unwrap();
    let endpoint = format!("http://{listen}");
    until_async("kine", Duration::from_secs(30), EVERY, || geminik8s::kine::probe(&endpoint, Duration::from_secs(2)))
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.join("kine.log")).unwrap_or_default();
            panic!("{e}\nkine.log:\n{}", geminik8s::cmd::tail(&log, 20))
        });
    endpoint
}

/// One node of the test: its cloud-config, the K3s settings the agent
/// renders from it (with the stand-in as the K3s binary), its notify socket.
struct Node {
    dir: PathBuf,
    settings: K3sSettings,
    port: u16,
    notify: UnixDatagram,
    service: String,
}

impl Node {
    /// A node called `name` at `ip` (a loopback address), with its own
    /// directories under `dir` and its own API port.
    fn new(name: &str, ip: &str, dir: &Path, kine: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let kine_listen = kine.trim_start_matches("http://");
        let config = geminik8s::config::fixture::config(serde_json::json!({
            "node": {"name": name, "ip": ip},
            "kine": {"listen": kine_listen},
            "k3s": {
                "token": TOKEN,
                "data_dir": dir.join("k3s"),
                "config_dir": dir.join("etc"),
                "extra_args": ["--https-listen-port", port.to_string(), "--bind-address", ip, "--disable-agent"],
            },
        }));
        let mut settings = K3sSettings::from_config(&config, dir);
        settings.binary = PathBuf::from(env!("CARGO_BIN_EXE_k3s-standin"));
        let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        notify.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        Node { dir: dir.to_path_buf(), settings, port, notify, service: format!("k3s-{name}") }
    }

    /// The spec the agent renders, under a per-node service name (two nodes
    /// share one supervisor here), with systemd's notify socket.
    fn spec(&self) -> ServiceSpec {
        let mut spec = self.settings.spec();
        assert_eq!(spec.name, k3s::SERVICE);
        spec.name = self.service.clone();
        spec.env.insert("NOTIFY_SOCKET".into(), self.dir.join("notify.sock").display().to_string());
        spec
    }

    /// Who the API server takes the bearer `token` for (`kubectl auth whoami`).
    async fn whoami(&self, token: &str) -> Value {
        let ca = self.settings.tls_dir().join("server-ca.crt");
        let args = [
            format!("--server={}", self.url()),
            format!("--certificate-authority={}", ca.display()),
            format!("--token={token}"),
            "auth".into(),
            "whoami".into(),
        ];
        kubectl_json(Path::new("/dev/null"), &args.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    fn url(&self) -> String {
        match self.settings.node_ip {
            IpAddr::V4(ip) => format!("https://{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("https://[{ip}]:{}", self.port),
        }
    }

    fn creds(&self) -> ClusterCredentials {
        ClusterCredentials::from_server_tls(&self.settings.tls_dir()).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.settings.log_file.as_ref().unwrap()).unwrap_or_default()
    }

    /// Wait for `READY=1` on the notify socket, then check `/readyz` as the agent does.
    async fn wait_ready(&self) {
        let sock = self.notify.try_clone().unwrap();
        let message = tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 512];
            sock.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!("no READY=1 from {} within {READY_TIMEOUT:?} ({e})\nlog tail:\n{}", self.service, self.tail())
        });
        assert!(message.starts_with("READY=1\nSTATUS=kube-apiserver ready"), "{message}");
        k3s::ready(&self.url(), &self.creds(), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}\nlog tail:\n{}", self.tail()));
    }

    fn tail(&self) -> String {
        geminik8s::cmd::tail(&self.log(), 30)
    }

    /// A kubeconfig as the agent writes it, for this node's API server and
    /// the admin credentials of `creds` (as a VIP moving between nodes would).
    fn kubeconfig(&self, dir: &Path, creds: &ClusterCredentials) -> PathBuf {
        let path = dir.join(format!("{}-kubeconfig.yaml", self.service));
        k3s::write_kubeconfig(&path, &k3s::render_kubeconfig("test", &self.url(), creds)).unwrap();
        path
    }
}

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let tool = Tool::new(skip::find_tool("kubectl").unwrap())
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .timeout(KUBECTL_TIMEOUT);
    tool.run().await.unwrap_or_else(|e| panic!("{e}")).stdout
}

async fn kubectl_json(kubeconfig: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let out = kubectl(kubeconfig, &args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

fn resource_version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{object}"))
}

/// The pid of the stand-in's child (the API server).
fn child_of(pid: u32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_serves_namespaces_configmaps_and_deployments_through_the_agents_k3s_path() {
    let _one = ONE.lock().await;
    require!(root: false, tools: ["kine", "kube-apiserver", "kubectl"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let supervisor = Supervisor::new();
    let kine = start_kine(&supervisor, d).await;
    let node = Node::new("a", "127.0.0.1", &d.join("a"), &kine);
    supervisor.configure(&node.spec()).await.unwrap();
    supervisor.start(&node.service, Duration::from_secs(10)).await.unwrap();
    node.wait_ready().await;

    // K3s's files where the agent reads them, K3s's own kubeconfig.
    let local = node.settings.local_kubeconfig_path();
    let written = std::fs::read_to_string(&local).unwrap();
    assert!(written.contains(&format!("server: {}", node.url())), "{written}");
    let log = node.log();
    assert!(log.contains("ignoring `--disable-agent`"), "the unused flag is noted:\n{log}");

    let kc = node.kubeconfig(d, &node.creds());
    let ns = kubectl_json(&kc, &["create", "namespace", "shop"]).await;
    let cm = kubectl_json(
        &kc,
        &["-n", "shop", "create", "configmap", "till", "--from-literal=currency=EUR", "--from-literal=lanes=4"],
    )
    .await;
    let deploy = kubectl_json(
        &kc,
        &["-n", "shop", "create", "deployment", "pos", "--image=registry.invalid/pos:1.0", "--replicas=2"],
    )
    .await;
    assert!(resource_version(&ns) < resource_version(&cm), "revisions grow: {ns} then {cm}");
    assert!(resource_version(&cm) < resource_version(&deploy), "revisions grow: {cm} then {deploy}");

    // Read back through K3s's own kubeconfig.
    let got = kubectl_json(&local, &["-n", "shop", "get", "configmap", "till"]).await;
    assert_eq!(got["data"], serde_json::json!({"currency": "EUR", "lanes": "4"}));
    assert_eq!(resource_version(&got), resource_version(&cm));
    let got = kubectl_json(&local, &["-n", "shop", "get", "deployment", "pos"]).await;
    assert_eq!(got["spec"]["replicas"], 2);
    assert_eq!(got["spec"]["template"]["spec"]["containers"][0]["image"], "registry.invalid/pos:1.0");
    let patched =
        kubectl_json(&kc, &["-n", "shop", "patch", "configmap", "till", "-p", r#"{"data":{"lanes":"5"}}"#]).await;
    assert_eq!(patched["data"]["lanes"], "5");
    assert!(resource_version(&patched) > resource_version(&deploy), "{patched}");

    // The K3s token is a bearer token for the admin.
    let whoami = node.whoami(TOKEN).await;
    assert_eq!(whoami["status"]["userInfo"]["username"], "system:admin", "{whoami}");

    // The API server dies: the stand-in exits with it and the supervisor
    // restarts it (the K3s spec's policy). The stand-in dies: its API server
    // goes too, and the restarted one can take the port. The data stays.
    for (victim, what) in [("kube-apiserver", "the API server"), ("k3s-standin", "the stand-in")] {
        let standin = supervisor.status(&node.service).await.unwrap().main_pid.unwrap();
        let apiserver = child_of(standin).expect("the stand-in runs kube-apiserver as its child");
        let pid = if victim == "kube-apiserver" { apiserver } else { standin as i32 };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        until_async(&format!("a restart after killing {what}"), Duration::from_secs(60), EVERY, || async {
            let status = supervisor.status(&node.service).await.map_err(|e| e.to_string())?;
            match status.main_pid {
                Some(pid) if pid != standin && status.state == ActiveState::Active => Ok(()),
                _ => Err(format!("{status:?}")),
            }
        })
        .await
        .unwrap();
        node.wait_ready().await;
        assert!(!Path::new(&format!("/proc/{apiserver}")).exists(), "the old kube-apiserver outlived {what}");
        let got = kubectl_json(&kc, &["-n", "shop", "get", "configmap", "till"]).await;
        assert_eq!(got["data"]["lanes"], "5");
        assert_eq!(resource_version(&got), resource_version(&patched));
    }

    // Stopping forwards SIGTERM: the API server goes away with the stand-in.
    let standin = supervisor.status(&node.service).await.unwrap().main_pid.unwrap();
    let apiserver = child_of(standin).unwrap();
    supervisor.stop(&node.service, Duration::from_secs(60)).await.unwrap();
    assert!(!Path::new(&format!("/proc/{apiserver}")).exists(), "kube-apiserver outlived its stand-in");
    let log = node.log();
    let standin_lines: Vec<&str> = log.lines().filter(|l| l.starts_with("k3s-standin")).collect();
    assert!(log.contains("kube-apiserver exited: exit code 0"), "a clean stop:\n{standin_lines:#?}");
    assert!(k3s::ready(&node.url(), &node.creds(), Duration::from_secs(2)).await.is_err());
    supervisor.shutdown(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standins_on_one_datastore_share_objects_and_keys() {
    let _one = ONE.lock().await;
    require!(root: false, tools: ["kine", "kube-apiserver", "kubectl"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let supervisor = Supervisor::new();
    let kine = start_kine(&supervisor, d).await;
    let a = Node::new("a", "127.0.0.1", &d.join("a"), &kine);
    let b = Node::new("b", "127.0.0.2", &d.join("b"), &kine);
    // Both at once: they race to create the bootstrap record.
    supervisor.configure(&a.spec()).await.unwrap();
    supervisor.configure(&b.spec()).await.unwrap();
    supervisor.start(&a.service, Duration::from_secs(10)).await.unwrap();
    supervisor.start(&b.service, Duration::from_secs(10)).await.unwrap();
    a.wait_ready().await;
    b.wait_ready().await;

    let file = |node: &Node, name: &str| std::fs::read_to_string(node.settings.tls_dir().join(name)).unwrap();
    for shared in ["server-ca.crt", "client-ca.crt", "service.pub"] {
        assert_eq!(file(&a, shared), file(&b, shared), "{shared} is the cluster's, not the node's");
    }
    assert_ne!(file(&a, "client-admin.crt"), file(&b, "client-admin.crt"), "each node issues its own");
    let created = [a.log(), b.log()].iter().filter(|log| log.contains("bootstrap material created")).count();
    assert_eq!(created, 1, "exactly one server created the bootstrap record");

    // Written through a, read through b.
    let kc_a = a.kubeconfig(d, &a.creds());
    let kc_b = b.kubeconfig(d, &b.creds());
    kubectl(&kc_a, &["create", "namespace", "factory"]).await;
    let cm = kubectl_json(&kc_a, &["-n", "factory", "create", "configmap", "line", "--from-literal=speed=12"]).await;
    let got = kubectl_json(&kc_b, &["-n", "factory", "get", "configmap", "line"]).await;
    assert_eq!(got["data"]["speed"], "12");
    assert_eq!(resource_version(&got), resource_version(&cm));

    // a's admin kubeconfig works against b (the VIP moved).
    let moved = b.kubeconfig(&d.join("a"), &a.creds());
    let got = kubectl_json(&moved, &["-n", "factory", "get", "configmap", "line"]).await;
    assert_eq!(got["data"]["speed"], "12");

    // A service-account token minted by a is accepted by b.
    kubectl(&kc_a, &["-n", "factory", "create", "serviceaccount", "robot"]).await;
    let token = kubectl(&kc_a, &["-n", "factory", "create", "token", "robot"]).await;
    let whoami = b.whoami(token.trim()).await;
    assert_eq!(whoami["status"]["userInfo"]["username"], "system:serviceaccount:factory:robot", "{whoami}");

    supervisor.shutdown(Duration::from_secs(60)).await.unwrap();
}
