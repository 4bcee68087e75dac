//! The two `Services` implementations against real things: the process
//! supervisor with real processes, and the systemd client over a private
//! `dbus-daemon` serving FakeSystemd, a stand-in for systemd's Manager object
//! that records every call (systemd itself cannot run as a test's child).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geminik8s::services::supervisor::Supervisor;
use geminik8s::services::systemd::SystemdServices;
use geminik8s::services::{ActiveState, RestartMode, RestartPolicy, RunAs, ServiceError, ServiceSpec, Services};
use geminik8s_vm_tests::poll::until_async;
use geminik8s_vm_tests::require;

const T: Duration = Duration::from_secs(10);
const EVERY: Duration = Duration::from_millis(20);

fn sh(name: &str, script: &str, dir: &Path) -> ServiceSpec {
    let mut spec = ServiceSpec::new(name, vec!["/bin/sh".into(), "-c".into(), script.into()]);
    spec.log_file = Some(dir.join(format!("{name}.log")));
    spec.restart = RestartPolicy {
        mode: RestartMode::OnFailure,
        backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        burst: 5,
        window: Duration::from_secs(60),
    };
    spec.stop_grace = Duration::from_secs(5);
    spec
}

/// Whether a process is gone (no such PID, or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) == Some("Z"),
    }
}

async fn read_pid(path: &Path) -> u32 {
    until_async("the pid file", T, EVERY, || async {
        std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|s| s.trim().parse::<u32>().map_err(|e| e.to_string()))
    })
    .await
    .unwrap()
}

async fn running_pid(sup: &Supervisor, name: &str) -> u32 {
    until_async("the service to run", T, EVERY, || async {
        let status = sup.status(name).await.unwrap();
        match (status.state, status.main_pid) {
            (ActiveState::Active, Some(pid)) => Ok(pid),
            _ => Err(status),
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn supervisor_restarts_a_crashed_service_and_logs_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new();
    let mut spec = sh("crashy", "echo \"started $$ with ${GREETING}\"; echo oops >&2; exec sleep 1000", dir.path());
    spec.argv[2] = spec.argv[2].replace("${GREETING}", "$GREETING");
    spec.env.insert("GREETING".into(), "hello".into());
    sup.configure(&spec).await.unwrap();
    sup.start("crashy", T).await.unwrap();
    let first = running_pid(&sup, "crashy").await;

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let second = until_async("a new main process", T, EVERY, || async {
        let status = sup.status("crashy").await.unwrap();
        match status.main_pid {
            Some(pid) if pid != first && status.state == ActiveState::Active => Ok(pid),
            _ => Err(status),
        }
    })
    .await
    .unwrap();
    assert!(gone(first));
    assert!(!gone(second));

    let log = spec.log_file.clone().unwrap();
    let text = until_async("both starts in the log", T, EVERY, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("with hello").count() == 2 { Ok(text) } else { Err(text) }
    })
    .await
    .unwrap();
    assert!(text.contains(&format!("started {first} with hello")), "{text}");
    assert!(text.contains(&format!("started {second} with hello")), "{text}");
    assert_eq!(text.matches("oops").count(), 2, "stderr goes to the log too: {text}");
    sup.shutdown(T).await.unwrap();
    assert!(gone(second));
}

#[tokio::test]
async fn stop_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let sup = Supervisor::new();
    let spec = sh("family", &format!("sleep 1000 & echo $! > {}; wait", pidfile.display()), dir.path());
    sup.configure(&spec).await.unwrap();
    sup.start("family", T).await.unwrap();
    let main = running_pid(&sup, "family").await;
    let grandchild = read_pid(&pidfile).await;
    assert!(!gone(grandchild));

    sup.stop("family", T).await.unwrap();
    assert!(gone(main), "main process {main} still running");
    assert!(gone(grandchild), "grandchild {grandchild} still running");
    let status = sup.status("family").await.unwrap();
    assert_eq!((status.state, status.main_pid), (ActiveState::Inactive, None));
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("stubborn.pid");
    let sup = Supervisor::new();
    // The grandchild ignores SIGTERM; the main shell exits on it.
    let mut spec = sh(
        "stubborn",
        &format!("sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 1; done' & wait", pidfile.display()),
        dir.path(),
    );
    spec.stop_grace = Duration::from_millis(300);
    sup.configure(&spec).await.unwrap();
    sup.start("stubborn", T).await.unwrap();
    let stubborn = read_pid(&pidfile).await;
    sup.stop("stubborn", T).await.unwrap();
    assert!(gone(stubborn), "the process ignoring SIGTERM ({stubborn}) survived stop");
}

#[tokio::test]
async fn restart_limit_marks_the_service_failed() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new();
    let mut spec = sh("doomed", "echo run; exit 3", dir.path());
    spec.restart.burst = 2;
    spec.restart.backoff = Duration::from_millis(10);
    sup.configure(&spec).await.unwrap();
    sup.start("doomed", T).await.unwrap();
    let status = until_async("the service to fail", T, EVERY, || async {
        let status = sup.status("doomed").await.unwrap();
        if status.state == ActiveState::Failed { Ok(status) } else { Err(status) }
    })
    .await
    .unwrap();
    assert_eq!(status.main_pid, None);
    let log = std::fs::read_to_string(spec.log_file.unwrap()).unwrap();
    assert_eq!(log.matches("run").count(), 3, "one start and two restarts: {log}");
    // A later start is allowed again (the operator or the agent retries).
    sup.start("doomed", T).await.unwrap();
}

#[tokio::test]
async fn clean_exit_is_not_restarted_on_failure_policy() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new();
    let spec = sh("oneshot", "echo done", dir.path());
    sup.configure(&spec).await.unwrap();
    sup.start("oneshot", T).await.unwrap();
    until_async("the service to finish", T, EVERY, || async {
        let status = sup.status("oneshot").await.unwrap();
        if status.state == ActiveState::Inactive { Ok(()) } else { Err(status) }
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read_to_string(spec.log_file.unwrap()).unwrap(), "done\n");
}

#[tokio::test]
async fn dropping_the_supervisor_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let sup = Supervisor::new();
    sup.configure(&sh("orphan", &format!("sleep 1000 & echo $! > {}; wait", pidfile.display()), dir.path()))
        .await
        .unwrap();
    sup.start("orphan", T).await.unwrap();
    let main = running_pid(&sup, "orphan").await;
    let child = read_pid(&pidfile).await;
    drop(sup);
    until_async("the processes to go", T, EVERY, || async {
        if gone(main) && gone(child) { Ok(()) } else { Err((main, child)) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn restart_replaces_the_process_and_errors_name_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new();
    sup.configure(&sh("svc", "exec sleep 1000", dir.path())).await.unwrap();
    sup.start("svc", T).await.unwrap();
    let before = running_pid(&sup, "svc").await;
    sup.restart("svc", T).await.unwrap();
    let after = running_pid(&sup, "svc").await;
    assert_ne!(before, after);
    assert!(gone(before));

    let err = sup.start("nope", T).await.unwrap_err();
    assert!(matches!(err, ServiceError::Unknown(_)), "{err}");
    let mut missing = ServiceSpec::new("missing", vec!["/nonexistent/daemon".into()]);
    missing.restart.mode = RestartMode::No;
    sup.configure(&missing).await.unwrap();
    let err = sup.start("missing", T).await.unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("/nonexistent/daemon"), "{err}");
    assert_eq!(sup.status("missing").await.unwrap().state, ActiveState::Failed);
}

#[tokio::test]
async fn runs_as_the_configured_user() {
    require!(root: true, tools: []);
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new();
    let mut spec = sh("nobody", "echo uid=$(id -u) gid=$(id -g)", dir.path());
    spec.run_as = Some(RunAs { uid: 65534, gid: 65534 });
    spec.working_dir = Some(PathBuf::from("/"));
    sup.configure(&spec).await.unwrap();
    sup.start("nobody", T).await.unwrap();
    let log = spec.log_file.unwrap();
    let text = until_async("the service's output", T, EVERY, || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.ends_with('\n') { Ok(text) } else { Err(text) }
    })
    .await
    .unwrap();
    assert_eq!(text, "uid=65534 gid=65534\n");
}

// ---------------------------------------------------------------------------
// systemd over D-Bus, against FakeSystemd on a private bus.

/// A private `dbus-daemon`, killed on drop.
struct PrivateBus {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl PrivateBus {
    fn start() -> PrivateBus {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.path().join("bus").display()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting dbus-daemon");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        PrivateBus { child, address: line.trim().to_string(), _dir: dir }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("killing dbus-daemon: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("waiting for dbus-daemon: {e}");
        }
    }
}

#[derive(Debug, Clone)]
struct FakeUnit {
    active: &'static str,
    sub: &'static str,
    pid: u32,
}

#[derive(Clone, Default)]
struct FakeState {
    calls: Arc<Mutex<Vec<String>>>,
    units: Arc<Mutex<HashMap<String, FakeUnit>>>,
    /// Job results by unit: `None` never finishes; absent means "done".
    results: Arc<Mutex<HashMap<String, Option<&'static str>>>>,
    next_job: Arc<Mutex<u32>>,
}

/// Stand-in for `org.freedesktop.systemd1.Manager`: records calls, runs jobs
/// instantly (or fails them, or never finishes them) and announces their end
/// with `JobRemoved`, as systemd does.
struct FakeSystemd {
    state: FakeState,
}

fn unit_path(unit: &str) -> String {
    let escaped: String = unit
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("_{b:02x}") })
        .collect();
    format!("/org/freedesktop/systemd1/unit/{escaped}")
}

impl FakeSystemd {
    fn job(
        &self,
        method: &str,
        unit: String,
        mode: String,
        emitter: zbus::object_server::SignalEmitter<'_>,
    ) -> zbus::zvariant::OwnedObjectPath {
        self.state.calls.lock().unwrap().push(format!("{method}({unit}, {mode})"));
        let id = {
            let mut next = self.state.next_job.lock().unwrap();
            *next += 1;
            *next
        };
        let job = zbus::zvariant::OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}")).unwrap();
        let result = self.state.results.lock().unwrap().get(&unit).copied().unwrap_or(Some("done"));
        if result == Some("done") {
            let mut units = self.state.units.lock().unwrap();
            let entry = units.entry(unit.clone()).or_insert(FakeUnit { active: "inactive", sub: "dead", pid: 0 });
            *entry = match method {
                "StopUnit" => FakeUnit { active: "inactive", sub: "dead", pid: 0 },
                _ => FakeUnit { active: "active", sub: "running", pid: 4000 + id },
            };
        }
        if let Some(result) = result {
            let emitter = emitter.to_owned();
            let job_path = job.clone();
            // Like systemd: the job ends after the call has returned its path.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                FakeSystemd::job_removed(&emitter, id, job_path.as_ref(), &unit, result).await.unwrap();
            });
        }
        job
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl FakeSystemd {
    fn subscribe(&self) {
        self.state.calls.lock().unwrap().push("Subscribe()".into());
    }

    fn start_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(signal_emitter)] e: zbus::object_server::SignalEmitter<'_>,
    ) -> zbus::zvariant::OwnedObjectPath {
        self.job("StartUnit", name, mode, e)
    }

    fn stop_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(signal_emitter)] e: zbus::object_server::SignalEmitter<'_>,
    ) -> zbus::zvariant::OwnedObjectPath {
        self.job("StopUnit", name, mode, e)
    }

    fn restart_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(signal_emitter)] e: zbus::object_server::SignalEmitter<'_>,
    ) -> zbus::zvariant::OwnedObjectPath {
        self.job("RestartUnit", name, mode, e)
    }

    fn kill_unit(&self, name: String, whom: String, signal: i32) {
        self.state.calls.lock().unwrap().push(format!("KillUnit({name}, {whom}, {signal})"));
    }

    fn load_unit(&self, name: String) -> zbus::zvariant::OwnedObjectPath {
        self.state.calls.lock().unwrap().push(format!("LoadUnit({name})"));
        zbus::zvariant::OwnedObjectPath::try_from(unit_path(&name)).unwrap()
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        id: u32,
        job: zbus::zvariant::ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

/// The unit object (`org.freedesktop.systemd1.Unit` and `.Service`) of one unit.
struct FakeUnitObject {
    unit: String,
    state: FakeState,
}

impl FakeUnitObject {
    fn get(&self) -> FakeUnit {
        self.state.units.lock().unwrap().get(&self.unit).cloned().unwrap_or(FakeUnit {
            active: "inactive",
            sub: "dead",
            pid: 0,
        })
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Unit")]
impl FakeUnitObject {
    #[zbus(property)]
    fn active_state(&self) -> String {
        self.get().active.to_string()
    }

    #[zbus(property)]
    fn sub_state(&self) -> String {
        self.get().sub.to_string()
    }
}

struct FakeServiceObject(FakeUnitObject);

#[zbus::interface(name = "org.freedesktop.systemd1.Service")]
impl FakeServiceObject {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.0.get().pid
    }
}

async fn serve_fake_systemd(address: &str, state: &FakeState, units: &[&str]) -> zbus::Connection {
    let mut builder = zbus::connection::Builder::address(address)
        .unwrap()
        .name("org.freedesktop.systemd1")
        .unwrap()
        .serve_at("/org/freedesktop/systemd1", FakeSystemd { state: state.clone() })
        .unwrap();
    for unit in units {
        let object = || FakeUnitObject { unit: unit.to_string(), state: state.clone() };
        builder = builder
            .serve_at(unit_path(unit), object())
            .unwrap()
            .serve_at(unit_path(unit), FakeServiceObject(object()))
            .unwrap();
    }
    builder.build().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_client_makes_the_exact_manager_calls() {
    require!(root: false, tools: ["dbus-daemon"]);
    let bus = PrivateBus::start();
    let state = FakeState::default();
    state.results.lock().unwrap().insert("geminik8s-k3s.service".into(), Some("failed"));
    state.results.lock().unwrap().insert("geminik8s-postgres.service".into(), None);
    let _server = serve_fake_systemd(&bus.address, &state, &["geminik8s-kine.service"]).await;

    let env_dir = tempfile::tempdir().unwrap();
    let systemd = SystemdServices::connect(Some(&bus.address)).await.unwrap().with_env_dir(env_dir.path());
    let services: &dyn Services = &systemd;

    // configure writes the unit's environment file, root-only.
    let mut spec =
        ServiceSpec::new("kine", vec!["/usr/local/bin/kine".into(), "--listen-address".into(), "${ADDR}".into()]);
    spec.env.insert("ADDR".into(), "127.0.0.1:2379".into());
    services.configure(&spec).await.unwrap();
    let env_file = env_dir.path().join("kine.env");
    assert_eq!(std::fs::read_to_string(&env_file).unwrap(), "ADDR=\"127.0.0.1:2379\"\n");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    let inactive = services.status("kine").await.unwrap();
    assert_eq!((inactive.state, inactive.main_pid), (ActiveState::Inactive, None));
    services.start("kine", T).await.unwrap();
    let active = services.status("kine").await.unwrap();
    assert_eq!(
        (active.state, active.sub_state.as_str(), active.main_pid),
        (ActiveState::Active, "running", Some(4001))
    );
    services.restart("kine", T).await.unwrap();
    assert_eq!(services.status("kine").await.unwrap().main_pid, Some(4002));
    services.stop("kine", T).await.unwrap();
    assert_eq!(services.status("kine").await.unwrap().state, ActiveState::Inactive);

    // A failed job is an error naming the unit and the result.
    let err = services.start("k3s", T).await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::JobFailed { unit, result, .. } if unit == "geminik8s-k3s.service" && result == "failed"),
        "{err}"
    );
    // A job that never ends times out.
    let err = services.start("postgres", Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(&err, ServiceError::Timeout { operation: "start", .. }), "{err}");

    assert_eq!(
        *state.calls.lock().unwrap(),
        [
            "Subscribe()",
            "LoadUnit(geminik8s-kine.service)",
            "StartUnit(geminik8s-kine.service, replace)",
            "LoadUnit(geminik8s-kine.service)",
            "RestartUnit(geminik8s-kine.service, replace)",
            "LoadUnit(geminik8s-kine.service)",
            "StopUnit(geminik8s-kine.service, replace)",
            "LoadUnit(geminik8s-kine.service)",
            "StartUnit(geminik8s-k3s.service, replace)",
            "StartUnit(geminik8s-postgres.service, replace)",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_another_signal_queues_the_stop_then_signals_the_main_process() {
    require!(root: false, tools: ["dbus-daemon"]);
    let bus = PrivateBus::start();
    let state = FakeState::default();
    let _server = serve_fake_systemd(&bus.address, &state, &["geminik8s-kine.service"]).await;
    let env_dir = tempfile::tempdir().unwrap();
    let systemd = SystemdServices::connect(Some(&bus.address)).await.unwrap().with_env_dir(env_dir.path());
    let services: &dyn Services = &systemd;
    services.start("kine", T).await.unwrap();
    services.stop_with("kine", nix::sys::signal::Signal::SIGQUIT, T).await.unwrap();
    assert_eq!(services.status("kine").await.unwrap().state, ActiveState::Inactive);
    assert_eq!(
        *state.calls.lock().unwrap(),
        [
            "Subscribe()",
            "StartUnit(geminik8s-kine.service, replace)",
            "StopUnit(geminik8s-kine.service, replace)",
            "KillUnit(geminik8s-kine.service, main, 3)",
            "LoadUnit(geminik8s-kine.service)",
        ]
    );
}

/// The agent's PostgreSQL manager under systemd: it writes the unit's
/// environment file and starts, stops and signals `geminik8s-postgres.service`;
/// it never starts a server itself. (FakeSystemd runs no process, so the start
/// ends in the readiness deadline, naming the unit's journal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_manager_runs_the_server_as_the_systemd_unit() {
    require!(root: true, tools: ["dbus-daemon", "postgres"]);
    let bus = PrivateBus::start();
    let state = FakeState::default();
    let _server = serve_fake_systemd(&bus.address, &state, &["geminik8s-postgres.service"]).await;
    let env_dir = tempfile::tempdir().unwrap();
    let systemd = SystemdServices::connect(Some(&bus.address)).await.unwrap().with_env_dir(env_dir.path());

    let dir = tempfile::tempdir().unwrap();
    let config = geminik8s::config::fixture::config(serde_json::json!({}));
    let mut settings = geminik8s::postgres::Settings::from_config(&config);
    settings.data_dir = dir.path().join("data");
    settings.socket_dir = dir.path().join("sock");
    settings.log_file = dir.path().join("postgres.log");
    settings.start_timeout = Duration::from_millis(500);
    let lo = "127.0.0.1".parse().unwrap();
    let pki = geminik8s::pki::generate("lab", &[("node1".into(), lo)], lo, None).unwrap();
    settings.tls = geminik8s::config::Tls {
        ca: pki.ca.cert,
        cert: pki.nodes[0].cert.clone(),
        key: pki.nodes[0].key.clone(),
        crl: None,
    };
    let mgr = geminik8s::postgres::Manager::new(settings.clone(), Arc::new(systemd)).unwrap();

    let err = mgr.start().await.unwrap_err().to_string();
    assert!(
        err.contains("did not accept connections") && err.contains("journalctl -u geminik8s-postgres.service"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(env_dir.path().join("postgres.env")).unwrap(),
        format!("PGDATA=\"{}\"\n", settings.data_dir.display())
    );
    assert!(settings.socket_dir.is_dir(), "the socket directory is made before the start");
    let key = settings.tls_dir().join("node.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "the key is there before the start"
    );
    mgr.stop(geminik8s::postgres::StopMode::Immediate).await.unwrap();
    mgr.stop(geminik8s::postgres::StopMode::Fast).await.unwrap();

    let calls: Vec<String> =
        state.calls.lock().unwrap().iter().filter(|c| !c.starts_with("LoadUnit")).cloned().collect();
    assert_eq!(
        calls,
        [
            "Subscribe()",
            "StartUnit(geminik8s-postgres.service, replace)",
            "StopUnit(geminik8s-postgres.service, replace)",
            "KillUnit(geminik8s-postgres.service, main, 3)",
            "StopUnit(geminik8s-postgres.service, replace)",
        ]
    );
}
