//! The benchmark's directory, its PostgreSQL servers (a node's server set
//! up and run as the agent sets it up, as the backup tests do), and the
//! `gemin_k8s` commands it runs. Everything started here is stopped by
//! [`Lab::shutdown`], also after a failure or an interruption.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use geminik8s::postgres::render::KINE_SCHEMA;
use geminik8s::postgres::{Manager, Settings, StopMode};
use geminik8s::services::supervisor::Supervisor;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The cluster and node names the backups record.
pub const CLUSTER: &str = "lab";
pub const NODE: &str = "a";

/// A directory traversable by the `postgres` user, and the servers started in it.
pub struct Lab {
    dir: tempfile::TempDir,
    /// Each server's latest settings and its supervisor (kept here so that
    /// a server outlives the step that started it until [`Lab::shutdown`]).
    servers: Vec<(Settings, Arc<Supervisor>)>,
}

impl Lab {
    pub fn new(keep: bool) -> anyhow::Result<Lab> {
        let mut dir = tempfile::Builder::new().prefix("gk8s-bench-backup-").tempdir().context("creating a temp dir")?;
        dir.disable_cleanup(keep);
        chown_to_postgres(dir.path())?;
        Ok(Lab { dir, servers: Vec::new() })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `name` under the lab, created and owned by `postgres`.
    pub fn postgres_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.path(name);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        chown_to_postgres(&d)?;
        Ok(d)
    }

    /// Node `name`'s server on loopback, its data in `LAB/name/data`; not started.
    pub fn node(&mut self, name: &str) -> anyhow::Result<Node> {
        let dir = self.postgres_dir(name)?;
        let mut s = geminik8s_vm_tests::pg::loopback_settings(CLUSTER, name, &dir)?;
        s.start_timeout = Duration::from_secs(60);
        let supervisor = Arc::new(Supervisor::new());
        let node = Node { mgr: Manager::new(s, supervisor.clone())?, supervisor };
        self.register(&node);
        Ok(node)
    }

    /// Give `node` new settings (the server must be stopped for them to take effect).
    pub fn reconfigure(&mut self, node: &mut Node, settings: Settings) -> anyhow::Result<()> {
        node.mgr = Manager::new(settings, node.supervisor.clone())?;
        self.register(node);
        Ok(())
    }

    fn register(&mut self, node: &Node) {
        let s = node.mgr.settings().clone();
        self.servers.retain(|(old, _)| old.data_dir != s.data_dir);
        self.servers.push((s, node.supervisor.clone()));
    }

    /// Stop every server (fast shutdown, waited for), then remove the
    /// directory unless it is kept. Failures are reported, not returned:
    /// this runs after the benchmark's own error, if any.
    pub async fn shutdown(self, keep: bool) {
        for (settings, supervisor) in self.servers {
            let data_dir = settings.data_dir.clone();
            let stopped = match Manager::new(settings, supervisor.clone()) {
                Ok(mgr) => tokio::time::timeout(Duration::from_secs(90), mgr.stop(StopMode::Fast))
                    .await
                    .map_err(|_| anyhow::anyhow!("no shutdown within 90 s"))
                    .and_then(|r| r.map_err(anyhow::Error::from)),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = stopped {
                eprintln!("stopping PostgreSQL on {}: {e:#} (killing it)", data_dir.display());
            }
            // Dropping the last reference kills whatever is left of the service.
            drop(supervisor);
        }
        if keep {
            eprintln!("kept {}", self.dir.path().display());
        } else if let Err(e) = self.dir.close() {
            eprintln!("removing the benchmark's directory: {e}");
        }
    }
}

/// One node's PostgreSQL, run by its own process supervisor as the agent runs it.
pub struct Node {
    pub mgr: Manager,
    supervisor: Arc<Supervisor>,
}

impl std::ops::Deref for Node {
    type Target = Manager;
    fn deref(&self) -> &Manager {
        &self.mgr
    }
}

impl Node {
    /// Bootstrap as the agent does for a leader (idempotent: on an existing
    /// cluster it converges and starts), with Kine's table.
    pub async fn leader(&self) -> anyhow::Result<()> {
        self.bootstrap_leader().await?;
        let db = self.connect("kine").await?;
        db.batch("creating the kine table", KINE_SCHEMA).await?;
        db.batch("handing it to kine", "ALTER TABLE kine OWNER TO kine").await?;
        Ok(())
    }

    /// The `--pg-host`/`--pg-port` flags that reach this server.
    pub fn pg_flags(&self) -> Vec<String> {
        let s = self.settings();
        vec!["--pg-host".into(), s.socket_dir.display().to_string(), "--pg-port".into(), s.node.port.to_string()]
    }
}

pub fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    let user = nix::unistd::User::from_name("postgres")?.context("the postgres user does not exist")?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("giving {} to postgres", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// The `gemin_k8s` binary the benchmark measures.
pub struct Gemin {
    pub bin: PathBuf,
}

impl Gemin {
    /// Run `gemin_k8s ARGS` (without the AWS variables of the environment)
    /// and return its standard output; an error carries its standard error.
    /// It runs in its own process group, killed whole (with the tools and
    /// any private PostgreSQL it started) if the benchmark stops first.
    pub async fn run(&self, args: &[String]) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"]
        {
            cmd.env_remove(var);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let command = format!("gemin_k8s {}", args.join(" "));
        let child = cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        let mut group = Group(child.id().map(|pid| Pid::from_raw(pid as i32)));
        let out = child.wait_with_output().await.with_context(|| format!("waiting for {command}"))?;
        group.0 = None;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{command} failed ({}):\n{}", out.status, geminik8s::cmd::tail(&stderr, 15));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A process group killed when dropped, unless cleared.
struct Group(Option<Pid>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH: the group is already gone.
            if let Err(e) = killpg(pgid, Signal::SIGKILL)
                && e != nix::errno::Errno::ESRCH
            {
                eprintln!("killing process group {pgid}: {e}");
            }
        }
    }
}
