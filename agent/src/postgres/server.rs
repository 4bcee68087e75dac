//! The [`Manager`]: running the server through the node's service manager
//! (start, stop, readiness) and SQL sessions with it over its Unix socket.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::files::{self, Owner};
use super::render::{self, ServerRole};
use super::settings::Settings;
use super::{PgError, Result};
use crate::cmd::Tool;
use crate::config::Tls;
use crate::services::{ActiveState, RunAs, ServiceSpec, ServiceStatus, Services, units};

/// How to stop the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a shutdown checkpoint (a clean stop): SIGINT,
    /// the unit's `KillSignal=`.
    Fast,
    /// Stop at once; the next start runs crash recovery: SIGQUIT.
    Immediate,
}

impl StopMode {
    fn as_str(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }

    /// The signal PostgreSQL's postmaster takes as this shutdown mode.
    pub fn signal(self) -> Signal {
        match self {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// How often a starting or stopping server is looked at.
const POLL: Duration = Duration::from_millis(100);

/// Carries out PostgreSQL operations for one node. It never decides roles:
/// the agent's state machine tells it what to do.
///
/// The server itself runs as the service [`units::POSTGRES`] of the node's
/// service manager ([`Services`]): `geminik8s-postgres.service` under
/// systemd, a child of the agent's process supervisor elsewhere. The manager
/// never starts a server on its own, so the server never lives in the
/// agent's cgroup or dies with it.
#[derive(Clone)]
pub struct Manager {
    pub(super) settings: Settings,
    pub(super) owner: Owner,
    services: Arc<dyn Services>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("settings", &self.settings).field("owner", &self.owner).finish_non_exhaustive()
    }
}

/// How long a session of the replaced machine may take to let go of its slot.
const SLOT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Manager {
    /// A manager for `settings` running the server through `services`;
    /// fails when the OS user does not exist.
    pub fn new(settings: Settings, services: Arc<dyn Services>) -> Result<Manager> {
        let owner = Owner::lookup(&settings.os_user)?;
        Ok(Manager { settings, owner, services })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The same server with its peer at `ip` (`replace-node`): write its
    /// configuration files with [`Self::write_config`] and [`Self::reload`].
    pub fn with_peer_ip(&self, ip: std::net::IpAddr) -> Manager {
        let mut settings = self.settings.clone();
        settings.peer.ip = ip;
        Manager { settings, owner: self.owner, services: self.services.clone() }
    }

    /// On the primary: drop the peer's replication slot, which holds WAL
    /// back for a machine that is gone, and make a fresh one for the new
    /// machine's copy. A session still holding it (its walsender has not
    /// noticed the dead connection yet) is ended first.
    /// Returns how many bytes of WAL it held, `None` when there was no slot.
    pub async fn drop_peer_slot(&self) -> Result<Option<u64>> {
        let slot = render::slot_name(&self.settings.peer.name);
        let db = self.connect("postgres").await?;
        let deadline = Instant::now() + SLOT_RELEASE_TIMEOUT;
        let held = loop {
            let row = db
                .query_opt(
                    "reading the peer's replication slot",
                    "SELECT active_pid, COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            let (pid, held): (Option<i32>, i64) = (row.get(0), row.get(1));
            let Some(pid) = pid else { break held };
            if std::time::Instant::now() >= deadline {
                return Err(PgError::SlotBusy { slot });
            }
            tracing::info!(slot = %slot, pid, "ending the replaced machine's session on its slot");
            db.execute("ending the session on the peer's slot", "SELECT pg_terminate_backend($1)", &[&pid]).await?;
            tokio::time::sleep(POLL).await;
        };
        db.execute("dropping the peer's replication slot", "SELECT pg_drop_replication_slot($1)", &[&slot]).await?;
        // A fresh one from here on: the new machine's copy starts from it.
        self.ensure_peer_slot(&db).await?;
        tracing::info!(event = "peer_slot_dropped", slot = %slot, held_bytes = held, "dropped the replaced peer's replication slot");
        Ok(Some(u64::try_from(held).unwrap_or(0)))
    }

    /// The OS account the server runs as.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The service running the server in the foreground on the data
    /// directory as [`Manager::owner`]; the supervisor appends its output to
    /// [`Settings::log_file`] (systemd sends it to the journal).
    pub fn service_spec(&self) -> ServiceSpec {
        let s = &self.settings;
        let run_as = RunAs { uid: self.owner.uid, gid: self.owner.gid };
        let mut spec = units::postgres_spec(&s.bin_dir, &s.data_dir, run_as, Some(s.log_file.clone()));
        spec.stop_grace = s.start_timeout;
        spec
    }

    /// A PostgreSQL tool run as the server's OS user from `/`.
    pub(super) fn tool(&self, name: &str) -> Tool {
        Tool::new(self.settings.tool(name)).user(self.owner.uid, self.owner.gid).current_dir("/")
    }

    /// A description of this server for errors: data dir and socket.
    pub(super) fn target(&self) -> String {
        format!(
            "{} (socket {} port {})",
            self.settings.data_dir.display(),
            self.settings.socket_dir.display(),
            self.settings.node.port
        )
    }

    /// Where the server's output goes, for errors.
    fn log_hint(&self) -> String {
        format!(
            "see {} or `journalctl -u {}`",
            self.settings.log_file.display(),
            ServiceSpec::unit_name(units::POSTGRES)
        )
    }

    /// Create the socket directory with the server's TLS files, the log
    /// file and the WAL spool, owned by the OS user.
    pub fn prepare_run_dirs(&self) -> Result<()> {
        files::ensure_dir(&self.settings.socket_dir, 0o755, self.owner)?;
        if let Some(a) = &self.settings.wal_archive {
            files::ensure_dir(&a.spool, 0o700, self.owner)?;
        }
        files::write_tls(&self.settings, self.owner)?;
        let log = &self.settings.log_file;
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent).map_err(|source| PgError::Io {
                action: "creating log directory",
                path: parent.into(),
                source,
            })?;
        }
        std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(|source| PgError::Io {
            action: "creating log file",
            path: log.clone(),
            source,
        })?;
        self.owner.chown(log)
    }

    /// Whether a server runs on the data directory (its `postmaster.pid`
    /// names a live process).
    pub fn is_running(&self) -> Result<bool> {
        is_running(&self.settings.data_dir)
    }

    /// Hand the service's definition to the service manager (under systemd:
    /// write `/run/geminik8s/postgres.env` for the unit's `EnvironmentFile=`).
    async fn configure_service(&self) -> Result<()> {
        self.services.configure(&self.service_spec()).await.map_err(|source| PgError::Service {
            action: format!("configuring the PostgreSQL service for {}", self.target()),
            source,
        })
    }

    /// Start the server through the service manager and wait until it
    /// accepts connections (a standby: until it is consistent). Does nothing
    /// but wait when the service already runs it. A server running on the
    /// data directory that the service manager did not start (left behind
    /// by an agent that was killed) is stopped first, so the server always
    /// runs under the service manager.
    pub async fn start(&self) -> Result<()> {
        self.configure_service().await?;
        let s = &self.settings;
        if let Some(pid) = postmaster_pid(&s.data_dir)? {
            // The service's main process is the postmaster (under systemd
            // and the supervisor alike); anything else is not the service's.
            let status = self.service_status().await?;
            if status.main_pid == u32::try_from(pid).ok() {
                return self.wait_ready().await;
            }
            self.stop_unmanaged(StopMode::Fast).await?;
        }
        self.prepare_run_dirs()?;
        self.services.start(units::POSTGRES, s.start_timeout).await.map_err(|source| PgError::Service {
            action: format!("starting PostgreSQL on {} ({})", self.target(), self.log_hint()),
            source,
        })?;
        self.wait_ready().await?;
        tracing::info!(event = "postgres_started", data_dir = %s.data_dir.display(), port = s.node.port, "PostgreSQL started");
        if s.wal_archive.is_some() {
            // PostgreSQL 15's checkpointer starts sleeping for a whole
            // checkpoint_timeout before it takes archive_timeout into
            // account; a reload wakes it with the setting, so the first WAL
            // switch comes after archive_timeout, not minutes later.
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "reloading the configuration after the start failed; archive_timeout applies from the first checkpoint");
            }
        }
        Ok(())
    }

    /// Stop the server through the service manager and wait until it is
    /// gone: [`StopMode::Fast`] with the service's stop signal (SIGINT),
    /// [`StopMode::Immediate`] with SIGQUIT. A server the service manager did
    /// not start is stopped by signalling its postmaster.
    pub async fn stop(&self, mode: StopMode) -> Result<()> {
        self.configure_service().await?;
        let s = &self.settings;
        let timeout = s.start_timeout + Duration::from_secs(5);
        let stopped = match mode {
            StopMode::Fast => self.services.stop(units::POSTGRES, timeout).await,
            StopMode::Immediate => self.services.stop_with(units::POSTGRES, mode.signal(), timeout).await,
        };
        stopped.map_err(|source| PgError::Service {
            action: format!("stopping PostgreSQL on {}", self.target()),
            source,
        })?;
        if self.is_running()? {
            self.stop_unmanaged(mode).await?;
        }
        tracing::info!(event = "postgres_stopped", data_dir = %s.data_dir.display(), mode = mode.as_str(), "PostgreSQL stopped");
        Ok(())
    }

    async fn service_status(&self) -> Result<ServiceStatus> {
        self.services.status(units::POSTGRES).await.map_err(|source| PgError::Service {
            action: format!("asking for the state of the PostgreSQL service for {}", self.target()),
            source,
        })
    }

    /// Poll with connections until the server answers `SELECT 1`, the
    /// service fails, or `start_timeout` passes.
    async fn wait_ready(&self) -> Result<()> {
        let s = &self.settings;
        let deadline = Instant::now() + s.start_timeout;
        loop {
            let last = match self.connect("postgres").await {
                Ok(db) => match db.query_one("checking readiness", "SELECT 1", &[]).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            let state = self.service_status().await?.state;
            if state == ActiveState::Failed || state == ActiveState::Inactive {
                return Err(PgError::Unexpected {
                    what: format!("starting PostgreSQL on {}", self.target()),
                    detail: format!("the service is {state}; last connection attempt: {last}; {}", self.log_hint()),
                });
            }
            if Instant::now() >= deadline {
                return Err(PgError::Unexpected {
                    what: format!("starting PostgreSQL on {}", self.target()),
                    detail: format!(
                        "it did not accept connections within {:?} (service {state}); last connection attempt: {last}; {}",
                        s.start_timeout,
                        self.log_hint()
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stop a server the service manager does not know: `mode`'s signal to
    /// the postmaster named in `postmaster.pid`, then wait until it is gone.
    async fn stop_unmanaged(&self, mode: StopMode) -> Result<()> {
        let s = &self.settings;
        let Some(pid) = postmaster_pid(&s.data_dir)? else { return Ok(()) };
        tracing::warn!(
            event = "postgres_unmanaged", pid, data_dir = %s.data_dir.display(), mode = mode.as_str(),
            "a PostgreSQL server the service manager did not start runs on the data directory: stopping it"
        );
        let target = Pid::from_raw(pid);
        match nix::sys::signal::kill(target, mode.signal()) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => {
                return Err(PgError::Os {
                    action: "signalling the postmaster",
                    path: s.data_dir.join("postmaster.pid"),
                    source,
                });
            }
        }
        let deadline = Instant::now() + s.start_timeout;
        while self.is_running()? {
            if Instant::now() >= deadline {
                return Err(PgError::Timeout {
                    what: format!("{} shutdown of the PostgreSQL server with pid {pid}", mode.as_str()),
                    target: self.target(),
                    timeout: s.start_timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Write the configuration files for `role` into the data directory.
    pub fn write_config(&self, role: ServerRole) -> Result<()> {
        files::write_config(&self.settings, role, self.owner)
    }

    /// Ask a running server to re-read its configuration.
    pub async fn reload(&self) -> Result<()> {
        self.connect("postgres").await?.execute("reloading the configuration", "SELECT pg_reload_conf()", &[]).await?;
        Ok(())
    }

    /// A session as the superuser over the Unix socket.
    pub async fn connect(&self, dbname: &str) -> Result<Session> {
        let s = &self.settings;
        let target = format!("{} database {dbname}", self.target());
        let mut config = tokio_postgres::Config::new();
        config.host_path(&s.socket_dir).port(s.node.port).user(render::SUPERUSER).dbname(dbname);
        let client = open_session(config, &target).await?;
        Ok(Session { client, target })
    }
}

/// Open a session with `config` over the Unix socket (the agent's
/// application name and connect timeout added); the connection is driven in
/// the background.
pub(super) async fn open_session(config: tokio_postgres::Config, target: &str) -> Result<Client> {
    open_with(config, target, NoTls).await
}

/// Open a session over TCP with TLS required, the server's certificate
/// verified against the cluster CA and the host's address, this node's
/// certificate presented as the client's (all from `tls`).
pub(super) async fn open_tls_session(mut config: tokio_postgres::Config, target: &str, tls: &Tls) -> Result<Client> {
    let tls_error = |detail: String| PgError::TlsConfig { target: target.to_string(), detail };
    let material = crate::peer::tls::TlsMaterial::from_config(tls).map_err(|e| tls_error(e.to_string()))?;
    let mut client_config = material.client_config().map_err(|e| tls_error(e.to_string()))?;
    client_config.alpn_protocols = vec![b"postgresql".to_vec()];
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    open_with(config, target, tokio_postgres_rustls::MakeRustlsConnect::new(client_config)).await
}

async fn open_with<T>(mut config: tokio_postgres::Config, target: &str, tls: T) -> Result<Client>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config
        .application_name("geminik8s-agent")
        .connect_timeout(Duration::from_secs(10))
        .connect(tls)
        .await
        .map_err(|source| PgError::Connect { target: target.to_string(), source })?;
    let target = target.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, %target, "PostgreSQL session ended");
        }
    });
    Ok(client)
}

/// Whether `data_dir`'s `postmaster.pid` names a live process.
pub fn is_running(data_dir: &Path) -> Result<bool> {
    Ok(postmaster_pid(data_dir)?.is_some())
}

/// The live process `data_dir`'s `postmaster.pid` names, if any.
fn postmaster_pid(data_dir: &Path) -> Result<Option<i32>> {
    let pid_file = data_dir.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PgError::Io { action: "reading", path: pid_file, source }),
    };
    let Some(pid) = text.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else {
        return Ok(None);
    };
    match nix::sys::signal::kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => Ok(Some(pid)),
        Err(_) => Ok(None),
    }
}

/// An SQL session whose errors name the server and the statement's purpose.
pub struct Session {
    client: Client,
    target: String,
}

impl Session {
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err(&self, what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
        let what = what.to_string();
        move |source| PgError::Sql { what, target: self.target.clone(), source }
    }

    /// Run statements without parameters (simple query protocol).
    pub async fn batch(&self, what: &str, sql: &str) -> Result<()> {
        self.client.batch_execute(sql).await.map_err(self.err(what))
    }

    pub async fn execute(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.client.execute(sql, params).await.map_err(self.err(what))
    }

    pub async fn query(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.client.query(sql, params).await.map_err(self.err(what))
    }

    pub async fn query_one(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        self.client.query_one(sql, params).await.map_err(self.err(what))
    }

    pub async fn query_opt(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>> {
        self.client.query_opt(sql, params).await.map_err(self.err(what))
    }

    /// Commits of this session do not wait for the follower: setup work
    /// must not stall while the follower is away.
    pub async fn local_commits(&self) -> Result<()> {
        self.batch("setting synchronous_commit = local", "SET synchronous_commit = local").await
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::services::supervisor::Supervisor;

    fn manager() -> Manager {
        let mut settings = Settings::from_config(&crate::config::fixture::services());
        settings.bin_dir = PathBuf::from("/pg/bin");
        settings.data_dir = PathBuf::from("/var/lib/postgresql/15/main");
        settings.log_file = PathBuf::from("/var/log/geminik8s/postgres.log");
        settings.start_timeout = Duration::from_secs(45);
        Manager { settings, owner: Owner { uid: 101, gid: 102 }, services: Arc::new(Supervisor::new()) }
    }

    #[test]
    fn the_service_runs_postgres_in_the_foreground_on_the_data_dir() {
        let spec = manager().service_spec();
        assert_eq!(spec.unit(), "geminik8s-postgres.service");
        assert_eq!(spec.expanded_argv().unwrap(), ["/pg/bin/postgres", "-D", "/var/lib/postgresql/15/main"]);
        // Under systemd the data directory reaches the unit through its environment file.
        assert_eq!(spec.env_file(), Path::new("/run/geminik8s/postgres.env"));
        assert_eq!(spec.render_env_file(), "PGDATA=\"/var/lib/postgresql/15/main\"\n");
        assert_eq!(spec.run_as, Some(RunAs { uid: 101, gid: 102 }));
        assert_eq!(spec.log_file.as_deref(), Some(Path::new("/var/log/geminik8s/postgres.log")));
        assert_eq!((spec.stop_signal, spec.stop_grace), (Signal::SIGINT, Duration::from_secs(45)));
    }

    #[test]
    fn stop_modes_are_postgres_shutdown_signals() {
        assert_eq!(StopMode::Fast.signal(), Signal::SIGINT);
        assert_eq!(StopMode::Immediate.signal(), Signal::SIGQUIT);
    }
}
