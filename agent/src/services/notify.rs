//! The `sd_notify` protocol: readiness, status and watchdog pings to systemd
//! when the agent runs as a `Type=notify` unit.
//!
//! systemd passes `NOTIFY_SOCKET` (a unix datagram socket; a leading `@` means
//! the abstract namespace) and, with `WatchdogSec=`, `WATCHDOG_USEC` and
//! `WATCHDOG_PID`. Outside systemd none is set and [`Notifier::from_env`]
//! returns `None`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Sends notifications to one socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: String,
}

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET`, when set.
    pub fn from_env() -> Option<Notifier> {
        std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty()).map(Notifier::new)
    }

    /// A notifier for a socket path (or `@name` for the abstract namespace).
    pub fn new(socket: impl Into<String>) -> Notifier {
        Notifier { socket: socket.into() }
    }

    /// Send raw `KEY=value` lines.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let addr = match self.socket.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(PathBuf::from(&self.socket))?,
        };
        let sock = UnixDatagram::unbound()?;
        let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
        if sent != state.len() {
            return Err(io::Error::other(format!("short write to {}: {sent} of {} bytes", self.socket, state.len())));
        }
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `STOPPING=1`, sent when shutting down.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// Ping the watchdog every `interval` until the task is aborted. A failed
    /// ping is logged; systemd restarts the agent if pings stop arriving.
    pub fn spawn_watchdog(self, interval: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.watchdog() {
                    tracing::warn!(socket = %self.socket, error = %e, "cannot ping the systemd watchdog");
                }
            }
        })
    }
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

/// The ping interval for this process: half of `WATCHDOG_USEC`, when the
/// watchdog is enabled and meant for us (`WATCHDOG_PID` unset or our PID).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from explicit values.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Tell systemd the agent is ready and start pinging its watchdog, when run
/// under systemd; a no-op otherwise. Returns the watchdog task, if any.
pub fn announce_ready(status: &str) -> io::Result<Option<JoinHandle<()>>> {
    let Some(notifier) = Notifier::from_env() else {
        return Ok(None);
    };
    notifier.ready(status)?;
    Ok(watchdog_interval().map(|interval| {
        tracing::debug!(?interval, "pinging the systemd watchdog");
        notifier.spawn_watchdog(interval)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_ready_status_and_watchdog_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let notifier = Notifier::new(path.to_str().unwrap());
        notifier.ready("leader\nwith VIP").unwrap();
        assert_eq!(receive(&sock), "READY=1\nSTATUS=leader with VIP");
        notifier.status("follower").unwrap();
        assert_eq!(receive(&sock), "STATUS=follower");
        notifier.watchdog().unwrap();
        assert_eq!(receive(&sock), "WATCHDOG=1");
    }

    #[test]
    fn abstract_socket_names_work() {
        let name = format!("geminik8s-notify-test-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Notifier::new(format!("@{name}")).stopping().unwrap();
        assert_eq!(receive(&sock), "STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error() {
        assert!(Notifier::new("/nonexistent/notify").watchdog().is_err());
    }

    #[tokio::test]
    async fn watchdog_task_pings_repeatedly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let task = Notifier::new(path.to_str().unwrap()).spawn_watchdog(Duration::from_millis(20));
        let received = tokio::task::spawn_blocking(move || (0..3).map(|_| receive(&sock)).collect::<Vec<_>>());
        let received = received.await.unwrap();
        task.abort();
        assert_eq!(received, ["WATCHDOG=1"; 3]);
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_our_pid() {
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
    }
}
