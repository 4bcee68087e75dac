//! The `gemin-image` command line.

pub mod build;
pub mod check;
pub mod flash;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gemin-image", version, about = "Build geminik8s images", propagate_version = true)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace or a tracing filter).
    #[arg(long, global = true, default_value = "warn", env = "GEMIN_IMAGE_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Assemble the root filesystem and write the rootfs tarball, OCI archive and manifest.
    Build(build::Args),
    /// Validate an image spec and print what it would build.
    Check(check::Args),
    /// Write a raw disk image to a block device (whole disk), then verify it.
    Flash(flash::Args),
}

/// Parse the command line and run it.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(args) => build::run(args).await,
        Command::Check(args) => check::run(args),
        Command::Flash(args) => flash::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
