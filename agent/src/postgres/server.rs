//! The [`Manager`]: running the server (start, stop, the foreground argv)
//! and SQL sessions with it over its Unix socket.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::files::{self, Owner};
use super::render::{self, ServerRole};
use super::settings::Settings;
use super::{PgError, Result};
use crate::cmd::Tool;

/// How to stop the server (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a shutdown checkpoint (a clean stop).
    Fast,
    /// Stop at once; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Carries out PostgreSQL operations for one node. It never decides roles:
/// the agent's state machine tells it what to do.
#[derive(Debug, Clone)]
pub struct Manager {
    pub(super) settings: Settings,
    pub(super) owner: Owner,
}

impl Manager {
    /// A manager for `settings`; fails when the OS user does not exist.
    pub fn new(settings: Settings) -> Result<Manager> {
        let owner = Owner::lookup(&settings.os_user)?;
        Ok(Manager { settings, owner })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The OS account the server runs as.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The argv running the server in the foreground, for a process
    /// supervisor; run it as [`Manager::owner`] after
    /// [`Manager::prepare_run_dirs`].
    pub fn postgres_command(&self) -> Vec<OsString> {
        render::postgres_argv(&self.settings)
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

    /// Create the socket directory and the log file, owned by the OS user.
    pub fn prepare_run_dirs(&self) -> Result<()> {
        files::ensure_dir(&self.settings.socket_dir, 0o755, self.owner)?;
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

    /// Start the server with `pg_ctl start -w`, waiting until it accepts
    /// connections (a standby: until it is consistent). Does nothing when it runs.
    pub async fn start(&self) -> Result<()> {
        if self.is_running()? {
            return Ok(());
        }
        self.prepare_run_dirs()?;
        let s = &self.settings;
        self.tool("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&s.data_dir)
            .arg("-l")
            .arg(&s.log_file)
            .args(["-w", "-s", "-t"])
            .arg(s.start_timeout.as_secs().max(1).to_string())
            .timeout(s.start_timeout + Duration::from_secs(5))
            .run()
            .await
            .map_err(|source| PgError::Tool {
                action: format!("starting PostgreSQL on {} (log: {})", self.target(), s.log_file.display()),
                source,
            })?;
        tracing::info!(event = "postgres_started", data_dir = %s.data_dir.display(), port = s.node.port, "PostgreSQL started");
        Ok(())
    }

    /// Stop the server with `pg_ctl stop -w`. Does nothing when it is not running.
    pub async fn stop(&self, mode: StopMode) -> Result<()> {
        if !self.is_running()? {
            return Ok(());
        }
        let s = &self.settings;
        self.tool("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&s.data_dir)
            .args(["-m", mode.as_arg(), "-w", "-s", "-t"])
            .arg(s.start_timeout.as_secs().max(1).to_string())
            .timeout(s.start_timeout + Duration::from_secs(5))
            .run()
            .await
            .map_err(|source| PgError::Tool { action: format!("stopping PostgreSQL on {}", self.target()), source })?;
        tracing::info!(event = "postgres_stopped", data_dir = %s.data_dir.display(), mode = mode.as_arg(), "PostgreSQL stopped");
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

/// Open a session with `config` (the agent's application name and connect
/// timeout added); the connection is driven in the background.
pub(super) async fn open_session(mut config: tokio_postgres::Config, target: &str) -> Result<Client> {
    let (client, connection) = config
        .application_name("geminik8s-agent")
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
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
    let pid_file = data_dir.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(PgError::Io { action: "reading", path: pid_file, source }),
    };
    let Some(pid) = text.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else {
        return Ok(false);
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => Ok(true),
        Err(_) => Ok(false),
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
