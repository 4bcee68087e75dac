//! Starting, stopping and watching the node's services (PostgreSQL, Kine, K3s).
//!
//! One small trait, [`Services`], with two implementations:
//!
//! - [`systemd::SystemdServices`] drives `geminik8s-<name>.service` units through
//!   systemd's D-Bus API (the image, where PID 1 is systemd);
//! - [`supervisor::Supervisor`] spawns the processes itself (the network-namespace
//!   lab, CI, containers).
//!
//! [`detect`] picks one at run time. Both run a service from the same
//! [`ServiceSpec`]; the unit files under `overlays/` carry the same command lines
//! (a test in [`units`] keeps them in step).
//!
//! The trait is object safe (methods return boxed futures), so the agent holds an
//! `Arc<dyn Services>` and the rest of the code does not care which one it got.
//!
//! ## Use
//!
//! ```no_run
//! # async fn example(config: &geminik8s::config::GeminiConfig) -> anyhow::Result<()> {
//! use std::path::Path;
//! use std::time::Duration;
//!
//! use geminik8s::kine::{self, KineSettings};
//! use geminik8s::services;
//!
//! let services = services::detect().await?; // Arc<dyn Services>
//! let settings = KineSettings::from_config(config, Path::new("/var/log/geminik8s"));
//! services.configure(&settings.spec()).await?;
//! services.start(kine::SERVICE, Duration::from_secs(30)).await?;
//! let status = services.status(kine::SERVICE).await?;
//! tracing::info!(state = %status.state, pid = ?status.main_pid, "kine");
//! # Ok(()) }
//! ```
//!
//! A supervisor must be shut down ([`Services::shutdown`]: each service stopped
//! with its stop signal) or dropped (SIGKILL) with the agent: nothing it started
//! outlives it. Under systemd the services outlive the agent by design.
//!
//! ## Command lines and settings
//!
//! [`ServiceSpec::argv`] may refer to `${NAME}` where `NAME` is one of
//! [`ServiceSpec::env`]. The supervisor expands them itself; under systemd the agent
//! writes the environment to `/run/geminik8s/<name>.env` (the unit's
//! `EnvironmentFile=`) and systemd expands `ExecStart=` the same way. So the fixed
//! shape of a command line lives in the unit file and the per-node values (and
//! secrets) in a root-only file, never in the image.

pub mod notify;
pub mod supervisor;
pub mod systemd;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// A future returned by [`Services`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where systemd-managed services read their per-node settings from.
pub const ENV_DIR: &str = "/run/geminik8s";

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("unknown service `{0}`: it was never configured with a ServiceSpec")]
    Unknown(String),
    #[error("service `{name}`: `${{{var}}}` in its command line is not set in its environment")]
    UndefinedVariable { name: String, var: String },
    #[error("service `{name}` has an empty command line")]
    EmptyCommand { name: String },
    #[error("cannot start service `{name}` (`{command}`): {source}")]
    Spawn {
        name: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open log file {} for service `{name}`: {source}", path.display())]
    LogFile {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation} of service `{name}` did not finish within {timeout:?}")]
    Timeout { name: String, operation: &'static str, timeout: Duration },
    #[error("{operation} of unit {unit} ended with result `{result}` (see `journalctl -u {unit}`)")]
    JobFailed { unit: String, operation: &'static str, result: String },
    #[error("service `{name}` keeps failing: {restarts} restarts within {window:?}, giving up")]
    RestartLimit { name: String, restarts: u32, window: Duration },
    #[error("D-Bus call {method} for unit {unit} failed: {source}")]
    DBus {
        unit: String,
        method: &'static str,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("writing the environment of service `{name}` to {}: {source:#}", path.display())]
    EnvFile {
        name: String,
        path: PathBuf,
        #[source]
        source: anyhow::Error,
    },
    #[error("signalling service `{name}`: {source}")]
    Signal {
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// What state a service is in, in systemd's words (`ActiveState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveState {
    Active,
    /// Starting, or waiting to be restarted after a crash.
    Activating,
    Deactivating,
    Reloading,
    Failed,
    Inactive,
}

impl ActiveState {
    /// Parse systemd's `ActiveState` property.
    pub fn from_systemd(value: &str) -> Option<ActiveState> {
        Some(match value {
            "active" => ActiveState::Active,
            "activating" => ActiveState::Activating,
            "deactivating" => ActiveState::Deactivating,
            "reloading" | "refreshing" => ActiveState::Reloading,
            "failed" => ActiveState::Failed,
            "inactive" | "maintenance" => ActiveState::Inactive,
            _ => return None,
        })
    }
}

impl fmt::Display for ActiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActiveState::Active => "active",
            ActiveState::Activating => "activating",
            ActiveState::Deactivating => "deactivating",
            ActiveState::Reloading => "reloading",
            ActiveState::Failed => "failed",
            ActiveState::Inactive => "inactive",
        })
    }
}

/// A service's state as reported by [`Services::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub state: ActiveState,
    /// systemd's `SubState` ("running", "auto-restart", "dead"...), or the
    /// supervisor's equivalent.
    pub sub_state: String,
    /// The main process, when one is running.
    pub main_pid: Option<u32>,
}

/// When a service that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    No,
    OnFailure,
    Always,
}

impl RestartMode {
    /// The value of systemd's `Restart=`.
    pub fn systemd(self) -> &'static str {
        match self {
            RestartMode::No => "no",
            RestartMode::OnFailure => "on-failure",
            RestartMode::Always => "always",
        }
    }
}

/// Restart policy: systemd's `Restart=`, `RestartSec=`, `StartLimitBurst=` and
/// `StartLimitIntervalSec=`, with exponential backoff in the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    /// Delay before the first restart; doubled for each further restart in the window.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// At most this many restarts within `window`; then the service is `failed`.
    pub burst: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            burst: 5,
            window: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// The delay before restart number `n` (1-based) within the window.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// A user and group to run a service as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Everything needed to run one service the agent manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Short name: "postgres", "kine", "k3s". The systemd unit is
    /// `geminik8s-<name>.service` ([`ServiceSpec::unit`]).
    pub name: String,
    /// Program and arguments; `${NAME}` refers to a variable of `env`.
    pub argv: Vec<String>,
    /// Environment of the service (the only one: nothing is inherited from the
    /// agent except `PATH` when not given here).
    pub env: BTreeMap<String, String>,
    pub run_as: Option<RunAs>,
    pub working_dir: Option<PathBuf>,
    /// Where the supervisor appends stdout and stderr; under systemd output goes
    /// to the journal.
    pub log_file: Option<PathBuf>,
    pub restart: RestartPolicy,
    /// The signal that asks the service to stop (systemd's `KillSignal=`):
    /// SIGTERM for most, SIGINT (fast shutdown) for PostgreSQL.
    pub stop_signal: nix::sys::signal::Signal,
    /// After the stop signal to the process group, how long before SIGKILL.
    pub stop_grace: Duration,
}

impl ServiceSpec {
    pub fn new(name: impl Into<String>, argv: Vec<String>) -> Self {
        ServiceSpec {
            name: name.into(),
            argv,
            env: BTreeMap::new(),
            run_as: None,
            working_dir: None,
            log_file: None,
            restart: RestartPolicy::default(),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_grace: Duration::from_secs(10),
        }
    }

    /// The systemd unit of a service called `name`.
    pub fn unit_name(name: &str) -> String {
        format!("geminik8s-{name}.service")
    }

    pub fn unit(&self) -> String {
        Self::unit_name(&self.name)
    }

    /// The `EnvironmentFile=` systemd reads this service's settings from.
    pub fn env_file(&self) -> PathBuf {
        Path::new(ENV_DIR).join(format!("{}.env", self.name))
    }

    /// `argv` with variables replaced from `env`, as systemd does for
    /// `ExecStart=`: `${NAME}` anywhere in a word becomes the value, and a word
    /// that is exactly `$NAME` becomes the value split at whitespace (zero or
    /// more words).
    pub fn expanded_argv(&self) -> Result<Vec<String>, ServiceError> {
        let mut out = Vec::with_capacity(self.argv.len());
        for arg in &self.argv {
            match arg.strip_prefix('$').filter(|v| is_var_name(v)) {
                Some(var) => {
                    let value = self.env.get(var).ok_or_else(|| ServiceError::UndefinedVariable {
                        name: self.name.clone(),
                        var: var.to_string(),
                    })?;
                    out.extend(value.split_whitespace().map(str::to_string));
                }
                None => out.push(expand(arg, &self.env, &self.name)?),
            }
        }
        Ok(out)
    }

    /// The environment file systemd reads (`KEY="value"` lines, quoted and escaped).
    pub fn render_env_file(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.env {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "\\$");
            out.push_str(&format!("{key}=\"{escaped}\"\n"));
        }
        out
    }
}

fn is_var_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn expand(arg: &str, env: &BTreeMap<String, String>, service: &str) -> Result<String, ServiceError> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        let value = env
            .get(var)
            .ok_or_else(|| ServiceError::UndefinedVariable { name: service.to_string(), var: var.to_string() })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Starting, stopping and watching services by name.
///
/// `configure` must be called with a service's spec before the other methods
/// are used for it; calling it again replaces the spec (it takes effect on the
/// next start or restart). Start, stop and restart are bounded by `timeout`;
/// status by a fixed 10 s under systemd (the supervisor answers from memory).
pub trait Services: Send + Sync {
    /// Record `spec` as the definition of its service. Under systemd this writes
    /// the service's environment file; the unit itself ships in the image.
    fn configure<'a>(&'a self, spec: &'a ServiceSpec) -> BoxFuture<'a, Result<(), ServiceError>>;
    /// Start the service and wait until it runs (systemd: the start job finished).
    fn start<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>>;
    /// Stop the service and wait until it and every process it started are gone.
    fn stop<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>>;
    /// Stop the service as [`Services::stop`] does, but ask with `signal`
    /// instead of its spec's stop signal: PostgreSQL's immediate shutdown is
    /// SIGQUIT where its usual (fast) one is SIGINT.
    fn stop_with<'a>(
        &'a self,
        name: &'a str,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), ServiceError>>;
    /// Stop (if running) and start again.
    fn restart<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>>;
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ServiceStatus, ServiceError>>;
    /// The agent is stopping. The supervisor stops every service it started,
    /// each with its stop signal (PostgreSQL shuts down cleanly), since none
    /// may outlive it; under systemd the units keep running by design, so the
    /// default does nothing.
    fn shutdown(&self, _timeout: Duration) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Whether PID 1 is systemd (the check `sd_booted()` does).
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The implementation for this host: systemd over the system bus when PID 1 is
/// systemd, the process supervisor otherwise.
pub async fn detect() -> Result<Arc<dyn Services>, ServiceError> {
    if systemd_booted() {
        tracing::info!(backend = "systemd", "managing services through systemd");
        Ok(Arc::new(systemd::SystemdServices::connect(None).await?))
    } else {
        tracing::info!(backend = "supervisor", "PID 1 is not systemd: supervising services directly");
        Ok(Arc::new(supervisor::Supervisor::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        let mut spec = ServiceSpec::new("kine", vec!["/bin/kine".into(), "--listen-address".into(), "${ADDR}".into()]);
        spec.env.insert("ADDR".into(), "127.0.0.1:2379".into());
        spec
    }

    #[test]
    fn argv_expands_variables_from_the_environment() {
        assert_eq!(spec().expanded_argv().unwrap(), ["/bin/kine", "--listen-address", "127.0.0.1:2379"]);
        let mut s = spec();
        s.argv.push("x${ADDR}y${ADDR}".into());
        assert_eq!(s.expanded_argv().unwrap()[3], "x127.0.0.1:2379y127.0.0.1:2379");
    }

    #[test]
    fn undefined_variable_is_an_error_naming_it() {
        let mut s = spec();
        s.argv.push("${NOPE}".into());
        let err = s.expanded_argv().unwrap_err().to_string();
        assert!(err.contains("${NOPE}") && err.contains("kine"), "{err}");
    }

    #[test]
    fn bare_variable_word_splits_at_whitespace() {
        let mut s = spec();
        s.argv.push("$EXTRA".into());
        s.env.insert("EXTRA".into(), " --a  b ".into());
        assert_eq!(s.expanded_argv().unwrap()[3..], ["--a", "b"]);
        s.env.insert("EXTRA".into(), String::new());
        assert_eq!(s.expanded_argv().unwrap().len(), 3);
    }

    #[test]
    fn env_file_quotes_values() {
        let mut s = spec();
        s.env.insert("PASS".into(), r#"a"b$c\d"#.into());
        assert_eq!(s.render_env_file(), "ADDR=\"127.0.0.1:2379\"\nPASS=\"a\\\"b\\$c\\\\d\"\n");
        assert_eq!(s.unit(), "geminik8s-kine.service");
        assert_eq!(s.env_file(), Path::new("/run/geminik8s/kine.env"));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let p = RestartPolicy {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            ..Default::default()
        };
        let delays: Vec<u64> = (1..=5).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn systemd_states_parse() {
        assert_eq!(ActiveState::from_systemd("activating"), Some(ActiveState::Activating));
        assert_eq!(ActiveState::from_systemd("failed"), Some(ActiveState::Failed));
        assert_eq!(ActiveState::from_systemd("bogus"), None);
    }
}
