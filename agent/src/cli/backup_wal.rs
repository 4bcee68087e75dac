//! `gemin_k8s backup wal-spool` and `gemin_k8s backup wal-push`: the two
//! steps of continuous WAL archiving (see `backup::wal`).
//!
//! `wal-spool` is PostgreSQL's `archive_command` (the agent writes it into
//! the server's configuration): it copies one finished WAL file into the
//! spool and returns at once. `wal-push` stores what is spooled in a
//! destination, compressed and encrypted; the agent does the same on its
//! own, and the command is there for a node without the agent and for
//! scripts.

use std::path::PathBuf;
use std::process::ExitCode;

use super::backup::{S3Args, Sealing};
use crate::backup::wal::{self, DEFAULT_SPOOL, DEFAULT_SPOOL_LIMIT, Role, Spooled};
use crate::backup::{self, DEFAULT_DESTINATION, human_size};

#[derive(Debug, clap::Args)]
pub struct SpoolArgs {
    /// The spool directory.
    #[arg(long, default_value = DEFAULT_SPOOL, value_name = "DIR")]
    pub spool: PathBuf,
    /// Bytes the spool may hold; past it the file is dropped and the gap recorded (the cluster
    /// keeps serving; point-in-time recovery cannot cross the gap).
    #[arg(long, default_value_t = DEFAULT_SPOOL_LIMIT, value_name = "BYTES")]
    pub limit: u64,
    /// The WAL file's path (PostgreSQL's %p, relative to the data directory).
    pub path: PathBuf,
    /// The WAL file's name (PostgreSQL's %f).
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The spool directory.
    #[arg(long, default_value = DEFAULT_SPOOL, value_name = "DIR")]
    pub spool: PathBuf,
    /// Destination: a directory or s3://BUCKET/PREFIX (WAL goes under wal/).
    #[arg(long, default_value = DEFAULT_DESTINATION, value_name = "DEST")]
    pub output: String,
    #[command(flatten)]
    pub sealing: Sealing,
    /// Only remove from the spool what the destination already holds (the other node archives).
    #[arg(long)]
    pub tidy_only: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub s3: S3Args,
}

/// PostgreSQL's `archive_command`. A non-zero exit makes PostgreSQL keep
/// the file and try again; a full spool is not a failure (see `--limit`).
pub fn spool(a: SpoolArgs) -> anyhow::Result<ExitCode> {
    match wal::spool(&a.path, &a.name, &a.spool, a.limit)? {
        Spooled::Copied | Spooled::AlreadyThere => {}
        Spooled::Dropped => eprintln!(
            "WAL spool {} is full ({} bytes): {} is not archived; point-in-time recovery has a gap from now until \
             the next base backup",
            a.spool.display(),
            a.limit,
            a.name
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn push(a: PushArgs) -> anyhow::Result<ExitCode> {
    let keys = a.sealing.keys("WAL")?;
    let store = backup::store::open(&a.output, &a.s3.options())?;
    let role = if a.tidy_only { Role::Tidy } else { Role::Archive };
    let done =
        tokio::task::spawn_blocking(move || wal::upload(&a.spool, store.as_ref(), &keys, a.sealing.compress, role))
            .await??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!(
            "archived {} WAL files ({}); {} already archived; {} still spooled{}",
            done.files.len(),
            human_size(done.bytes),
            done.already_archived,
            done.pending,
            done.oldest_pending.as_deref().map(|t| format!(" (oldest from {t})")).unwrap_or_default()
        );
        if let Some(gap) = &done.gap {
            println!(
                "point-in-time recovery gap since {}: {} WAL files from {} were not archived (the spool was full); \
                 take a base backup to close it",
                gap.since, gap.files, gap.first
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
