//! A plain process supervisor for hosts where PID 1 is not systemd.
//!
//! Each service runs in its own process group, with stdout and stderr appended
//! to its log file. A monitor task per running service restarts it after an
//! exit according to its [`RestartPolicy`], with exponential backoff and at most
//! `burst` restarts per `window`; beyond that the service is `failed`. Stopping
//! sends SIGTERM to the whole group, SIGKILL after the grace period, and waits
//! until no process of the group is left. Dropping the supervisor kills every
//! group it started, so nothing outlives it.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ActiveState, BoxFuture, RestartMode, ServiceError, ServiceSpec, ServiceStatus, Services};
use crate::cmd::describe_status;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often a stopping service's process group is checked for leftovers.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// What the monitor task of a service reports.
#[derive(Debug)]
struct Runtime {
    state: ActiveState,
    sub_state: &'static str,
    pid: Option<u32>,
    /// Each start of the main process, oldest first (to count restarts per window).
    starts: VecDeque<Instant>,
    /// Why the last start failed (a spawn error), for `start` to report.
    spawn_error: Option<ServiceError>,
}

impl Runtime {
    fn new() -> Self {
        Runtime {
            state: ActiveState::Inactive,
            sub_state: "dead",
            pid: None,
            starts: VecDeque::new(),
            spawn_error: None,
        }
    }
}

struct Entry {
    spec: ServiceSpec,
    runtime: Arc<Mutex<Runtime>>,
    /// Present while a monitor task runs: a signal sent asks it to stop with that signal.
    monitor: Option<(watch::Sender<Option<Signal>>, JoinHandle<()>)>,
}

/// The process groups of running services. Once `closed` (the supervisor is
/// gone) no monitor spawns anything again.
#[derive(Default)]
struct Groups {
    alive: HashMap<String, i32>,
    closed: bool,
}

/// The process supervisor. Cheap to share: wrap it in an `Arc`.
#[derive(Default)]
pub struct Supervisor {
    entries: tokio::sync::Mutex<HashMap<String, Entry>>,
    /// Process groups alive right now, for the synchronous kill on drop.
    groups: Arc<Mutex<Groups>>,
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor::default()
    }

    /// Stop every service (SIGTERM, then SIGKILL after its grace period) and wait.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), ServiceError> {
        let names: Vec<String> = self.entries.lock().await.keys().cloned().collect();
        let mut first_error = None;
        for name in names {
            if let Err(e) = self.stop_service(&name, None, timeout).await {
                tracing::warn!(service = %name, error = %e, "stopping service during shutdown");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn configure_service(&self, spec: &ServiceSpec) -> Result<(), ServiceError> {
        if spec.argv.is_empty() {
            return Err(ServiceError::EmptyCommand { name: spec.name.clone() });
        }
        spec.expanded_argv()?;
        let mut entries = self.entries.lock().await;
        match entries.get_mut(&spec.name) {
            Some(entry) => entry.spec = spec.clone(),
            None => {
                entries.insert(
                    spec.name.clone(),
                    Entry { spec: spec.clone(), runtime: Arc::new(Mutex::new(Runtime::new())), monitor: None },
                );
            }
        }
        Ok(())
    }

    async fn start_service(&self, name: &str, timeout: Duration) -> Result<(), ServiceError> {
        let runtime = {
            let mut entries = self.entries.lock().await;
            let entry = entries.get_mut(name).ok_or_else(|| ServiceError::Unknown(name.to_string()))?;
            if let Some((_, handle)) = &entry.monitor
                && !handle.is_finished()
            {
                return Ok(()); // already running (or waiting to be restarted)
            }
            let (stop_tx, stop_rx) = watch::channel(None);
            {
                let mut rt = lock(&entry.runtime);
                rt.state = ActiveState::Activating;
                rt.sub_state = "start";
                rt.spawn_error = None;
                rt.starts.clear();
            }
            let task = Monitor {
                spec: entry.spec.clone(),
                runtime: entry.runtime.clone(),
                groups: self.groups.clone(),
                stop: stop_rx,
            };
            entry.monitor = Some((stop_tx, tokio::spawn(task.run())));
            entry.runtime.clone()
        };
        // Started means the first process was spawned (or the spawn failed).
        let wait = async {
            loop {
                {
                    let mut rt = lock(&runtime);
                    if let Some(error) = rt.spawn_error.take() {
                        return Err(error);
                    }
                    if rt.state == ActiveState::Active || rt.state == ActiveState::Failed || !rt.starts.is_empty() {
                        return Ok(());
                    }
                }
                tokio::time::sleep(GROUP_POLL).await;
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(ServiceError::Timeout { name: name.to_string(), operation: "start", timeout }),
        }
    }

    /// Stop `name`, asking with `signal` (its spec's stop signal when `None`).
    async fn stop_service(&self, name: &str, signal: Option<Signal>, timeout: Duration) -> Result<(), ServiceError> {
        let monitor = {
            let mut entries = self.entries.lock().await;
            let entry = entries.get_mut(name).ok_or_else(|| ServiceError::Unknown(name.to_string()))?;
            let signal = signal.unwrap_or(entry.spec.stop_signal);
            entry.monitor.take().map(|m| (m, signal))
        };
        let Some(((stop_tx, mut handle), signal)) = monitor else {
            return Ok(());
        };
        // The task may have finished on its own (restart limit); then this is a no-op.
        if stop_tx.send(Some(signal)).is_err() {
            tracing::debug!(service = %name, "service had already ended");
        }
        match tokio::time::timeout(timeout, &mut handle).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(join)) => {
                tracing::error!(service = %name, error = %join, "service monitor task panicked");
                self.kill_group_now(name);
                Ok(())
            }
            Err(_) => {
                handle.abort();
                self.kill_group_now(name);
                Err(ServiceError::Timeout { name: name.to_string(), operation: "stop", timeout })
            }
        }
    }

    fn kill_group_now(&self, name: &str) {
        if let Some(pgid) = lock(&self.groups).alive.remove(name) {
            kill_group(name, pgid, Signal::SIGKILL);
        }
    }

    async fn status_of(&self, name: &str) -> Result<ServiceStatus, ServiceError> {
        let entries = self.entries.lock().await;
        let entry = entries.get(name).ok_or_else(|| ServiceError::Unknown(name.to_string()))?;
        let rt = lock(&entry.runtime);
        Ok(ServiceStatus { state: rt.state, sub_state: rt.sub_state.to_string(), main_pid: rt.pid })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let mut groups = lock(&self.groups);
        groups.closed = true;
        for (name, pgid) in groups.alive.drain() {
            tracing::debug!(service = %name, pgid, "supervisor dropped: killing process group");
            kill_group(&name, pgid, Signal::SIGKILL);
        }
        drop(groups);
        for entry in self.entries.get_mut().values_mut() {
            if let Some((_, handle)) = entry.monitor.take() {
                handle.abort();
            }
        }
    }
}

impl Services for Supervisor {
    fn configure<'a>(&'a self, spec: &'a ServiceSpec) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.configure_service(spec))
    }

    fn start<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.start_service(name, timeout))
    }

    fn stop<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.stop_service(name, None, timeout))
    }

    fn stop_with<'a>(
        &'a self,
        name: &'a str,
        signal: Signal,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(self.stop_service(name, Some(signal), timeout))
    }

    fn restart<'a>(&'a self, name: &'a str, timeout: Duration) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(async move {
            let started = Instant::now();
            self.stop_service(name, None, timeout).await?;
            self.start_service(name, timeout.saturating_sub(started.elapsed())).await
        })
    }

    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ServiceStatus, ServiceError>> {
        Box::pin(self.status_of(name))
    }

    fn shutdown(&self, timeout: Duration) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(Supervisor::shutdown(self, timeout))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kill_group(name: &str, pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(service = %name, pgid, %signal, error = %e, "cannot signal process group"),
    }
}

/// Whether any live (non-zombie) process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return killpg(Pid::from_raw(pgid), None).is_ok();
    };
    dir.flatten().any(|entry| {
        let is_pid = entry.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        is_pid
            && std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z' && state != 'X')
    })
}

/// State and process group from `/proc/PID/stat` (the command may contain spaces and parentheses).
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// The task that runs one service: spawn, wait, restart, stop.
struct Monitor {
    spec: ServiceSpec,
    runtime: Arc<Mutex<Runtime>>,
    groups: Arc<Mutex<Groups>>,
    stop: watch::Receiver<Option<Signal>>,
}

impl Monitor {
    fn set(&self, state: ActiveState, sub_state: &'static str) {
        let mut rt = lock(&self.runtime);
        rt.state = state;
        rt.sub_state = sub_state;
        if state != ActiveState::Active && state != ActiveState::Deactivating {
            rt.pid = None;
        }
    }

    async fn run(mut self) {
        let name = self.spec.name.clone();
        let policy = self.spec.restart;
        loop {
            // Spawned under the lock, so a supervisor being dropped either sees
            // this group or stops the spawn.
            let spawned = {
                let mut groups = lock(&self.groups);
                if groups.closed {
                    return;
                }
                let spawned = self.spawn();
                if let Ok(child) = &spawned {
                    groups.alive.insert(name.clone(), child.id().unwrap_or(0) as i32);
                }
                spawned
            };
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "cannot start service");
                    lock(&self.runtime).spawn_error = Some(e);
                    self.set(ActiveState::Failed, "failed");
                    return;
                }
            };
            let pid = child.id().unwrap_or(0);
            let pgid = pid as i32; // process_group(0): the group id is the child's pid
            {
                let mut rt = lock(&self.runtime);
                rt.state = ActiveState::Active;
                rt.sub_state = "running";
                rt.pid = Some(pid);
                rt.starts.push_back(Instant::now());
            }
            tracing::info!(service = %name, pid, "service started");

            let exit = tokio::select! {
                status = child.wait() => Ok(status),
                signal = stopped(&mut self.stop) => Err(signal),
            };
            let status = match exit {
                Ok(status) => status,
                Err(signal) => {
                    self.terminate(&mut child, pgid, signal.unwrap_or(self.spec.stop_signal)).await;
                    self.set(ActiveState::Inactive, "dead");
                    return;
                }
            };
            // The main process is gone; whatever it left in its group goes too.
            kill_group(&name, pgid, Signal::SIGKILL);
            lock(&self.groups).alive.remove(&name);
            let (described, failed) = match &status {
                Ok(s) => (describe_status(*s), !s.success()),
                Err(e) => (format!("wait failed: {e}"), true),
            };
            let restart = match policy.mode {
                RestartMode::No => false,
                RestartMode::OnFailure => failed,
                RestartMode::Always => true,
            };
            if !restart {
                tracing::info!(service = %name, pid, status = %described, "service exited");
                self.set(
                    if failed { ActiveState::Failed } else { ActiveState::Inactive },
                    if failed { "failed" } else { "dead" },
                );
                return;
            }
            let recent = {
                let mut rt = lock(&self.runtime);
                let now = Instant::now();
                while rt.starts.front().is_some_and(|t| now.duration_since(*t) > policy.window) {
                    rt.starts.pop_front();
                }
                // Starts in the window, minus the first one, are restarts.
                rt.starts.len() as u32
            };
            if recent > policy.burst {
                tracing::error!(
                    service = %name, pid, status = %described, restarts = recent - 1, window = ?policy.window,
                    "service keeps failing: giving up"
                );
                self.set(ActiveState::Failed, "failed");
                return;
            }
            let delay = policy.delay(recent);
            tracing::warn!(service = %name, pid, status = %described, ?delay, "service exited: restarting");
            self.set(ActiveState::Activating, "auto-restart");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut self.stop) => {
                    self.set(ActiveState::Inactive, "dead");
                    return;
                }
            }
        }
    }

    fn spawn(&self) -> Result<tokio::process::Child, ServiceError> {
        let name = &self.spec.name;
        let argv = self.spec.expanded_argv()?;
        let (program, args) = argv.split_first().ok_or_else(|| ServiceError::EmptyCommand { name: name.clone() })?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).env_clear().env("PATH", DEFAULT_PATH).envs(&self.spec.env).stdin(Stdio::null()).process_group(0);
        if let Some(path) = &self.spec.log_file {
            let log_error = |source| ServiceError::LogFile { name: name.clone(), path: path.clone(), source };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(log_error)?;
            }
            let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path).map_err(log_error)?;
            let err = file.try_clone().map_err(log_error)?;
            cmd.stdout(file).stderr(err);
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        if let Some(dir) = &self.spec.working_dir {
            cmd.current_dir(dir);
        }
        if let Some(user) = self.spec.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.spawn().map_err(|source| ServiceError::Spawn { name: name.clone(), command: argv.join(" "), source })
    }

    /// `signal` to the group; SIGKILL after the grace period; wait until the group is empty.
    async fn terminate(&self, child: &mut tokio::process::Child, pgid: i32, signal: Signal) {
        let name = &self.spec.name;
        self.set(ActiveState::Deactivating, "stop-sigterm");
        kill_group(name, pgid, signal);
        let deadline = tokio::time::Instant::now() + self.spec.stop_grace;
        let graceful = tokio::time::timeout_at(deadline, async {
            let status = child.wait().await;
            while group_alive(pgid) {
                tokio::time::sleep(GROUP_POLL).await;
            }
            status
        })
        .await;
        match graceful {
            Ok(status) => log_stopped(name, status),
            Err(_) => {
                tracing::warn!(service = %name, pgid, grace = ?self.spec.stop_grace, "service did not stop: SIGKILL");
                self.set(ActiveState::Deactivating, "stop-sigkill");
                kill_group(name, pgid, Signal::SIGKILL);
                let status = child.wait().await;
                while group_alive(pgid) {
                    tokio::time::sleep(GROUP_POLL).await;
                }
                log_stopped(name, status);
            }
        }
        lock(&self.groups).alive.remove(name);
    }
}

fn log_stopped(name: &str, status: std::io::Result<ExitStatus>) {
    match status {
        Ok(s) => tracing::info!(service = %name, status = %describe_status(s), "service stopped"),
        Err(e) => tracing::warn!(service = %name, error = %e, "service stopped; its exit status is unknown"),
    }
}

/// Resolves once a stop was requested, with the signal asked for (`None`
/// when the supervisor side went away: stop too, with the usual signal).
async fn stopped(stop: &mut watch::Receiver<Option<Signal>>) -> Option<Signal> {
    match stop.wait_for(Option::is_some).await {
        Ok(requested) => *requested,
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        assert_eq!(parse_stat("123 (a) b (c)) S 1 456 456 0"), Some(('S', 456)));
        assert_eq!(parse_stat("7 (sh) Z 1 7 7"), Some(('Z', 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_group_is_alive() {
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(group_alive(pgid));
    }
}
