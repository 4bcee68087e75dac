//! Logging: the journal when running as a daemon under systemd, stderr
//! otherwise (without timestamps: the journal or the terminal adds them), or
//! a file with `--log-file`.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{GlobalArgs, LogLevel};

/// The journal's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

fn directive(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

/// Install the global subscriber. `daemon` selects the journal when its
/// socket exists (the agent under systemd); the CLI always logs to stderr.
pub fn init(global: &GlobalArgs, daemon: bool) -> anyhow::Result<()> {
    // Only our own crates log at the chosen level; dependencies are quieter.
    let level = directive(global.level());
    let filter =
        EnvFilter::try_new(format!("warn,geminik8s={level},gemin_image={level}")).context("building the log filter")?;
    let registry = tracing_subscriber::registry().with(filter);
    if let Some(path) = &global.log_file {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening log file {}", path.display()))?;
        let layer = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(Mutex::new(file));
        registry.with(layer).try_init().context("installing the logger")?;
    } else if daemon && Path::new(JOURNAL_SOCKET).exists() {
        let journald = tracing_journald::layer().context("connecting to the journal")?;
        registry
            .with(journald.with_syslog_identifier("gemin_k8s".into()))
            .try_init()
            .context("installing the logger")?;
    } else {
        let layer = tracing_subscriber::fmt::layer()
            .without_time()
            .with_target(false)
            .with_ansi(!global.no_color && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr);
        registry.with(layer).try_init().context("installing the logger")?;
    }
    Ok(())
}
