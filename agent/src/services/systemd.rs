//! [`Services`] through systemd's D-Bus API.
//!
//! A service `name` is the unit `geminik8s-<name>.service`, shipped in the image
//! (`overlays/etc/systemd/system/`). Start, stop and restart call the Manager's
//! `StartUnit`/`StopUnit`/`RestartUnit` with mode `replace` and wait for the
//! job's `JobRemoved` signal; a job that ends other than `done` is an error
//! naming the unit. A stop with another signal than the unit's `KillSignal=`
//! ([`Services::stop_with`], PostgreSQL's immediate shutdown) queues the
//! `StopUnit` job first, so systemd does not restart the service when it
//! exits, then sends the signal to the main process with `KillUnit`; the
//! process takes the stronger request and the job ends when it is gone. State comes from the unit object's `ActiveState` and
//! `SubState` and the service's `MainPID`.

use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use zbus::export::futures_core::Stream;
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

use super::{ActiveState, BoxFuture, ENV_DIR, ServiceError, ServiceSpec, ServiceStatus, Services};

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
pub trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: zbus::zvariant::ObjectPath<'_>, unit: &str, result: &str) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
pub trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
pub trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

/// How long a status query may take before systemd is considered stuck.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The systemd-backed [`Services`].
pub struct SystemdServices {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    env_dir: PathBuf,
}

impl SystemdServices {
    /// Connect to systemd on the system bus (`None`) or on the bus at `address`
    /// (a D-Bus address such as `unix:path=/run/dbus/system_bus_socket`).
    pub async fn connect(address: Option<&str>) -> Result<Self, ServiceError> {
        let dbus = |method, source| ServiceError::DBus { unit: String::new(), method, source: Box::new(source) };
        let conn = match address {
            None => zbus::Connection::system().await.map_err(|e| dbus("connect", e))?,
            Some(address) => zbus::connection::Builder::address(address)
                .map_err(|e| dbus("connect", e))?
                .build()
                .await
                .map_err(|e| dbus("connect", e))?,
        };
        let manager = ManagerProxy::new(&conn).await.map_err(|e| dbus("connect", e))?;
        // Ask systemd to send job signals to us.
        manager.subscribe().await.map_err(|e| dbus("Subscribe", e))?;
        Ok(SystemdServices { conn, manager, env_dir: PathBuf::from(ENV_DIR) })
    }

    /// Write environment files under `dir` instead of `/run/geminik8s`.
    pub fn with_env_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.env_dir = dir.into();
        self
    }

    fn env_path(&self, spec: &ServiceSpec) -> PathBuf {
        self.env_dir.join(format!("{}.env", spec.name))
    }

    async fn configure_unit(&self, spec: &ServiceSpec) -> Result<(), ServiceError> {
        spec.expanded_argv()?;
        let path = self.env_path(spec);
        write_env_file(&self.env_dir, &path, spec.render_env_file().as_bytes())
            .map_err(|source| ServiceError::EnvFile { name: spec.name.clone(), path, source })
    }

    /// Run one job and wait until it is removed.
    async fn job(&self, name: &str, kind: Job, timeout: Duration) -> Result<(), ServiceError> {
        self.job_then_signal(name, kind, None, timeout).await
    }

    /// Run one job, send `signal` to the unit's main process once it is
    /// queued, and wait until the job is removed.
    async fn job_then_signal(
        &self,
        name: &str,
        kind: Job,
        signal: Option<nix::sys::signal::Signal>,
        timeout: Duration,
    ) -> Result<(), ServiceError> {
        let unit = ServiceSpec::unit_name(name);
        let dbus = |method, source| ServiceError::DBus { unit: unit.clone(), method, source: Box::new(source) };
        let operation = kind.operation();
        let run = async {
            // Listen before the call so the signal cannot slip past.
            let mut removed = self.manager.receive_job_removed().await.map_err(|e| dbus("AddMatch JobRemoved", e))?;
            if matches!(kind, Job::Start | Job::Restart)
                && let Err(e) = self.manager.reset_failed_unit(&unit).await
            {
                // The agent decides when a service starts, with its own
                // backoff: systemd's start limit (hit after a few restarts,
                // e.g. while PostgreSQL was away) must not refuse it for good.
                tracing::debug!(%unit, error = %e, "ResetFailedUnit before a start failed");
            }
            let call = match kind {
                Job::Start => self.manager.start_unit(&unit, "replace").await,
                Job::Stop => self.manager.stop_unit(&unit, "replace").await,
                Job::Restart => self.manager.restart_unit(&unit, "replace").await,
            };
            let method = kind.method();
            let job = call.map_err(|e| dbus(method, e))?;
            if let Some(signal) = signal
                && let Err(e) = self.manager.kill_unit(&unit, "main", signal as i32).await
            {
                // Nothing left to signal (the unit was not running), or systemd
                // refused: the job still stops the unit with its KillSignal=.
                tracing::debug!(%unit, %signal, error = %e, "KillUnit after StopUnit failed");
            }
            tracing::debug!(%unit, job = %job.as_str(), operation, "waiting for systemd job");
            loop {
                let Some(signal) = poll_fn(|cx| Pin::new(&mut removed).poll_next(cx)).await else {
                    return Err(dbus("JobRemoved", zbus::Error::Failure("the bus connection closed".into())));
                };
                let args = signal.args().map_err(|e| dbus("JobRemoved", e))?;
                if args.job().as_str() != job.as_str() {
                    continue;
                }
                return match *args.result() {
                    "done" => Ok(()),
                    other => Err(ServiceError::JobFailed { unit: unit.clone(), operation, result: other.to_string() }),
                };
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(ServiceError::Timeout { name: name.to_string(), operation, timeout }),
        }
    }

    async fn unit_status(&self, name: &str) -> Result<ServiceStatus, ServiceError> {
        let unit = ServiceSpec::unit_name(name);
        let dbus = |method, source| ServiceError::DBus { unit: unit.clone(), method, source: Box::new(source) };
        let path = self.manager.load_unit(&unit).await.map_err(|e| dbus("LoadUnit", e))?;
        let unit_proxy = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .map_err(|e| dbus("Unit", e))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| dbus("Unit", e))?;
        let active = unit_proxy.active_state().await.map_err(|e| dbus("Get ActiveState", e))?;
        let sub_state = unit_proxy.sub_state().await.map_err(|e| dbus("Get SubState", e))?;
        let service = ServiceProxy::builder(&self.conn)
            .path(path)
            .map_err(|e| dbus("Service", e))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| dbus("Service", e))?;
        let main_pid = service.main_pid().await.map_err(|e| dbus("Get MainPID", e))?;
        let state = ActiveState::from_systemd(&active)
            .ok_or_else(|| dbus("Get ActiveState", zbus::Error::Failure(format!("unknown ActiveState `{active}`"))))?;
        Ok(ServiceStatus { state, sub_state, main_pid: (main_pid != 0).then_some(main_pid) })
    }
}

/// The jobs the agent asks systemd for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Start,
    Stop,
    Restart,
}

impl Job {
    fn method(self) -> &'static str {
        match self {
            Job::Start => "StartUnit",
            Job::Stop => "StopUnit",
            Job::Restart => "RestartUnit",
        }
    }

    fn operation(self) -> &'static str {
        match self {
            Job::Start => "start",
            Job::Stop => "stop",
            Job::Restart => "restart",
        }
    }
}

/// The environment files are root's alone (0600, they hold passwords); their
/// directory stays traversable (0755) because PostgreSQL's socket directory,
/// owned by `postgres`, lives in it too (`/run/geminik8s/postgres-<node>`).
fn write_env_file(dir: &Path, path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} traversable", dir.display()))?;
    crate::fsutil::write_atomic(path, contents, 0o600)
}

impl Services for SystemdServices {
    fn configure<'a>(&'a self, spec: &'a ServiceSpec) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.configure_unit(spec))
    }

    fn start<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.job(name, Job::Start, timeout))
    }

    fn stop<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.job(name, Job::Stop, timeout))
    }

    fn stop_with<'a>(
        &'a self,
        name: &'a str,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.job_then_signal(name, Job::Stop, Some(signal), timeout))
    }

    fn restart<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.job(name, Job::Restart, timeout))
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ServiceStatus, ServiceError>> {
        Box::pin(async move {
            match tokio::time::timeout(STATUS_TIMEOUT, self.unit_status(name)).await {
                Ok(result) => result,
                Err(_) => {
                    Err(ServiceError::Timeout { name: name.to_string(), operation: "status", timeout: STATUS_TIMEOUT })
                }
            }
        })
    }
}
