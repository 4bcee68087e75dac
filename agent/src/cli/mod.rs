//! The `gemin_k8s` command line: one file per subcommand, each with an
//! `Args` struct and a `run()`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

pub mod backup;
pub mod backup_wal;
pub mod completion;
pub mod config;
pub mod deploy;
pub mod docs;
pub mod failover;
pub mod init;
pub mod kubeconfig;
pub mod output;
pub mod prompt;
pub mod replace_node;
pub mod restore;
mod restore_lead;
pub mod status;
pub mod upgrade;
pub mod upgrade_rolling;
pub mod version;
pub mod witness;

pub use output::OutputFormat;

/// Two-node highly available Kubernetes (K3s on PostgreSQL through Kine).
#[derive(Debug, Parser)]
#[command(name = "gemin_k8s", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Cluster file written by `init` (operator commands) or a cloud-config file (node commands).
    #[arg(long, global = true, env = "GEMINIK8S_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log level.
    #[arg(long, global = true, value_enum, default_value_t = LogLevel::Info, env = "GEMINIK8S_LOG_LEVEL")]
    pub log_level: LogLevel,
    /// Append logs to this file instead of stderr (or the journal).
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// No colours in output.
    #[arg(long, global = true, env = "NO_COLOR")]
    pub no_color: bool,
    /// Print only errors.
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print debug logs (same as --log-level debug).
    #[arg(long, short, global = true)]
    pub verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl GlobalArgs {
    /// The effective level after `--quiet` / `--verbose`.
    pub fn level(&self) -> LogLevel {
        if self.verbose {
            LogLevel::Debug
        } else if self.quiet {
            LogLevel::Error
        } else {
            self.log_level
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon (started by systemd on nodes).
    Agent(crate::daemon::Args),
    /// Generate a cluster: cluster.yaml, one cloud-config per node, CA and certificates.
    Init(init::Args),
    /// Work with cloud-config files.
    #[command(subcommand)]
    Config(config::Command),
    /// Show the cluster's state as the agents see it (exit 1 when degraded).
    Status(status::Args),
    /// Send two unconfigured nodes (the generic image, waiting for enrolment) their configuration and follow the cluster forming.
    Deploy(deploy::Args),
    /// Bring a new machine in for a node that is gone for good: fence, new certificate (the old one revoked), the survivor's new peer, deploy, catch up.
    ReplaceNode(replace_node::Args),
    /// K3s's admin kubeconfig for the VIP, from the agents.
    Kubeconfig(kubeconfig::Args),
    /// Planned switchover (proven lossless), its checks (--dry-run), or a forced failover (--force).
    Failover(failover::Args),
    /// Full backups of this node's PostgreSQL (encrypted with age), and list, verify, prune.
    Backup(backup::Args),
    /// Restore a full backup into a data directory on this node.
    Restore(restore::Args),
    /// Rolling A/B upgrade of both nodes (or --rollback), keeping a writer; on a node: stage, slots, the boot's gate.
    Upgrade(upgrade::Args),
    /// Print version information.
    Version(version::Args),
    /// The arbiter witness for split-brain protection.
    #[command(subcommand)]
    Witness(witness::Command),
    /// Print a shell completion script.
    Completion(completion::Args),
    /// Write the generated docs (man pages, cloud-config reference).
    #[command(hide = true)]
    GenDocs(docs::Args),
}

/// Entry point of the binary: parse, set up logging, run, print the error
/// chain and exit non-zero on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Agent(_) | Command::Witness(_));
    if let Err(e) = crate::logging::init(&cli.global, daemon) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => crate::daemon::run(args, &cli.global).await,
        Command::Init(args) => init::run(args, &cli.global).await,
        Command::Config(cmd) => config::run(cmd, &cli.global).await,
        Command::Status(args) => status::run(args, &cli.global).await,
        Command::Deploy(args) => deploy::run(args, &cli.global).await,
        Command::ReplaceNode(args) => replace_node::run(args, &cli.global).await,
        Command::Kubeconfig(args) => kubeconfig::run(args, &cli.global).await,
        Command::Failover(args) => failover::run(args, &cli.global).await,
        Command::Backup(args) => backup::run(args, &cli.global).await,
        Command::Restore(args) => restore::run(args, &cli.global).await,
        Command::Upgrade(args) => upgrade::run(args, &cli.global).await,
        Command::Version(args) => version::run(args).await,
        Command::Witness(cmd) => witness::run(cmd, &cli.global).await,
        Command::Completion(args) => completion::run(args),
        Command::GenDocs(args) => docs::run(args),
    }
}

/// The clap command tree (for completions, man pages and tests).
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn quiet_and_verbose_adjust_the_level() {
        let cli = Cli::try_parse_from(["gemin_k8s", "--verbose", "version"]).unwrap();
        assert_eq!(cli.global.level(), LogLevel::Debug);
        let cli = Cli::try_parse_from(["gemin_k8s", "version", "-q"]).unwrap();
        assert_eq!(cli.global.level(), LogLevel::Error);
        assert!(Cli::try_parse_from(["gemin_k8s", "-q", "-v", "version"]).is_err());
    }
}
