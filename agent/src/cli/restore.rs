//! `gemin_k8s restore`: a full backup into a data directory PostgreSQL
//! starts from, on this node, as root.
//!
//! The data directory is named explicitly (`--data-dir`); one that holds
//! data is refused unless `--force`, and then moved aside, never deleted. A
//! server running on it is always refused: stop the agent first.
//! `--dry-run` decrypts and checks the backup end to end and says what
//! would be done.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::GlobalArgs;
use crate::backup::crypto::Identities;
use crate::backup::{self, DEFAULT_DESTINATION, human_size};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Destination holding the backups (a directory, or file:///path).
    #[arg(long, default_value = DEFAULT_DESTINATION, value_name = "DEST")]
    pub from: String,
    /// The backup to restore (default: the newest complete one).
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// One backup given by its directory (or its manifest.json), instead of --from and --backup.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["from", "backup"])]
    pub backup_file: Option<PathBuf>,
    /// Decrypt with this identity (repeatable): an age identity file, or passphrase:FILE.
    #[arg(long, value_name = "FILE")]
    pub identity: Vec<String>,
    /// The data directory to restore into.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Move a data directory that holds data aside (to DIR.pre-restore-TIME) instead of refusing.
    #[arg(long)]
    pub force: bool,
    /// Check the backup end to end and say what would be done; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// OS user that owns the restored data directory and runs PostgreSQL.
    #[arg(long, default_value = "postgres", value_name = "USER")]
    pub owner: String,
    /// Directory of the PostgreSQL tools (pg_verifybackup, pg_waldump).
    #[arg(long, default_value = crate::postgres::settings::DEFAULT_BIN_DIR, value_name = "DIR")]
    pub pg_bin_dir: PathBuf,
    /// Point-in-time recovery (not built yet: needs continuous WAL archiving).
    #[arg(long, value_name = "TIME")]
    pub target_time: Option<String>,
}

/// `--backup-file`: the destination and id of a backup directory or its manifest.
fn split_backup_path(path: &std::path::Path) -> anyhow::Result<(String, String)> {
    let dir = if path.file_name().is_some_and(|n| n == backup::manifest::MANIFEST_FILE) {
        path.parent().context("--backup-file has no directory")?
    } else {
        path
    };
    let id = dir.file_name().with_context(|| format!("--backup-file {}: no backup directory name", path.display()))?;
    let root = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    Ok((root.display().to_string(), id.to_string_lossy().into_owned()))
}

pub async fn run(a: Args, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    if a.target_time.is_some() {
        bail!(
            "--target-time (point-in-time recovery) is not built yet: it needs continuous WAL archiving; restore a full backup without it"
        );
    }
    let (dest, id) = match &a.backup_file {
        Some(path) => {
            let (root, id) = split_backup_path(path)?;
            (root, Some(id))
        }
        None => (a.from.clone(), a.backup.clone()),
    };
    let store: Arc<dyn backup::Store> = Arc::from(backup::store::open(&dest)?);
    let manifest = match &id {
        Some(id) => backup::verify::manifest(store.as_ref(), id)?,
        None => backup::verify::latest(store.as_ref())?,
    };
    let identities = Arc::new(Identities::load(&a.identity)?);
    let owner = crate::postgres::files::Owner::lookup(&a.owner)?;
    let opts = backup::restore::Options {
        data_dir: a.data_dir.clone(),
        force: a.force,
        owner,
        bin_dir: a.pg_bin_dir.clone(),
        dry_run: a.dry_run,
    };
    let done = backup::restore::restore(store.clone(), &manifest, identities, &opts).await?;
    let data = human_size(done.content_bytes);
    if done.dry_run {
        println!(
            "dry run: backup {} ({} of {} on {}, taken {}) is intact end to end ({data})",
            manifest.id,
            manifest.cluster,
            manifest.node,
            store.url(),
            manifest.start_time
        );
        match &done.moved_aside {
            Some(aside) => println!(
                "would move {} aside to {} and restore into {}",
                done.data_dir.display(),
                aside.display(),
                done.data_dir.display()
            ),
            None => println!("would restore into {}", done.data_dir.display()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "restored backup {} ({} of {}, taken {}, timeline {}, LSN {}) into {} in {:.1} s ({data})",
        manifest.id,
        manifest.cluster,
        manifest.node,
        manifest.start_time,
        manifest.postgres.timeline,
        manifest.postgres.stop_lsn,
        done.data_dir.display(),
        done.elapsed.as_secs_f64()
    );
    if let Some(aside) = &done.moved_aside {
        println!("the previous data directory is kept at {}", aside.display());
    }
    println!(
        "PostgreSQL replays the backup's WAL when it starts; Kine's revision is not advanced yet (see docs/backup.md)"
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_path_names_its_destination_and_id() {
        let want = ("/mnt/usb".to_string(), "20260821T101502Z".to_string());
        assert_eq!(split_backup_path(std::path::Path::new("/mnt/usb/20260821T101502Z")).unwrap(), want);
        assert_eq!(split_backup_path(std::path::Path::new("/mnt/usb/20260821T101502Z/manifest.json")).unwrap(), want);
    }
}
