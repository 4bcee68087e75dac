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
use serde::Serialize;

use super::GlobalArgs;
use super::backup::{Bars, per_second, seconds};
use crate::backup::crypto::Identities;
use crate::backup::restore::Restored;
use crate::backup::{self, DEFAULT_DESTINATION, human_size};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Destination holding the backups (a directory, file:///path, or s3://BUCKET/PREFIX).
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
    /// Also check the restored data before it is put in place: pg_amcheck over every database
    /// (tables, B-tree indexes, every row found in its indexes), and count Kine's live keys.
    #[arg(long)]
    pub verify: bool,
    /// OS user that owns the restored data directory and runs PostgreSQL.
    #[arg(long, default_value = "postgres", value_name = "USER")]
    pub owner: String,
    /// Directory of the PostgreSQL tools (pg_verifybackup, pg_waldump).
    #[arg(long, default_value = crate::postgres::settings::DEFAULT_BIN_DIR, value_name = "DIR")]
    pub pg_bin_dir: PathBuf,
    /// Point-in-time recovery: replay the archived WAL up to this time (RFC 3339, e.g.
    /// 2026-08-21T10:15:02Z). Without --backup, the newest backup that ended by then is used.
    #[arg(long, value_name = "TIME", value_parser = parse_target_time)]
    pub target_time: Option<std::time::SystemTime>,
    /// The agent's runtime directory (`gemin_k8s agent --runtime-dir`): where this node's PostgreSQL
    /// socket and TLS files are, for the configuration written into the restored directory.
    #[arg(long, default_value = "/run/geminik8s", value_name = "DIR")]
    pub runtime_dir: PathBuf,
    /// How far Kine's revision jumps after the restore, so that clients holding newer revisions
    /// list again instead of missing changes (see docs/backup.md).
    #[arg(long, value_name = "N", default_value_t = backup::recover::DEFAULT_BUMP,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000_000_000))]
    pub bump_revision: i64,
    /// The agent's state directory (`gemin_k8s agent --state-dir`): restored into this node's own
    /// datastore, the node's hostMeta there records that it leads with the restored data.
    #[arg(long, default_value = crate::hostmeta::DEFAULT_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Also write the node bundle the backup carries to FILE (for new hardware:
    /// /var/lib/geminik8s/cloud-config/90_geminik8s.yaml, which the agent reads): the cloud-config
    /// of the node the backup was taken on, with the cluster's identity, the K3s token, and that
    /// node's certificate and key. Its settings are used for the restored configuration. An
    /// existing FILE needs --force and is kept as FILE.pre-restore-TIME.
    #[arg(long, value_name = "FILE")]
    pub node_config: Option<PathBuf>,
    /// Print the result as JSON: what was restored, the time taken and the throughput.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub s3: super::backup::S3Args,
}

/// This node's cloud-config (`--config`, or the node's sources), so the
/// restored directory gets this node's configuration files; `None`, with a
/// note, when there is none to read.
async fn node_config(global: &GlobalArgs) -> Option<crate::config::GeminiConfig> {
    match super::backup::node_config(global).await {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            eprintln!(
                "note: no cloud-config of this node ({e:#}); the restored configuration files are those of the node \
                 the backup was taken on, until the agent configures PostgreSQL"
            );
            None
        }
    }
}

fn settings_of(a: &Args, cfg: &crate::config::GeminiConfig) -> crate::postgres::Settings {
    let mut s = crate::postgres::Settings::from_config(cfg);
    s.socket_dir = a.runtime_dir.join(format!("postgres-{}", cfg.node.name));
    s
}

/// `--node-config`: the backup's node bundle, refused before anything is
/// restored when the backup has none or FILE exists without `--force`.
fn node_bundle(
    a: &Args,
    store: &dyn backup::Store,
    m: &backup::manifest::Manifest,
    identities: &Identities,
) -> anyhow::Result<Option<(PathBuf, String, crate::config::GeminiConfig)>> {
    let Some(path) = &a.node_config else { return Ok(None) };
    if path.exists() && !a.force {
        bail!(
            "--node-config {}: the file exists; give --force to replace it (the old one is kept as {}.pre-restore-TIME)",
            path.display(),
            path.display()
        );
    }
    let Some(text) = backup::node::read(store, m, identities)? else {
        bail!(
            "backup {} carries no node bundle: it was taken without the node's cloud-config (--pg-host) or by an \
             older gemin_k8s. Restore without --node-config and give the node its cloud-config from `gemin_k8s init` \
             (gemin_k8s deploy, or a file in /var/lib/geminik8s/cloud-config)",
            m.id
        );
    };
    let cfg = backup::node::parse(&text, &m.id).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some((path.clone(), text, cfg)))
}

/// Write the node bundle to `path` (0600, atomically), keeping what was there.
fn write_bundle(path: &std::path::Path, text: &str) -> anyhow::Result<Option<PathBuf>> {
    let aside = path.exists().then(|| backup::restore::aside_path(path, time::OffsetDateTime::now_utc()));
    if let Some(aside) = &aside {
        std::fs::rename(path, aside)
            .with_context(|| format!("moving {} aside to {}", path.display(), aside.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fsutil::write_atomic(path, text.as_bytes(), 0o600)?;
    Ok(aside)
}

/// `--target-time`: RFC 3339, with a time zone (`Z` or an offset).
fn parse_target_time(text: &str) -> Result<std::time::SystemTime, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(std::time::SystemTime::from)
        .map_err(|e| {
            format!(
                "{e}: give an RFC 3339 time with its zone, such as 2026-08-21T10:15:02Z or 2026-08-21T12:15:02+02:00"
            )
        })
}

/// A time as PostgreSQL's `recovery_target_time` reads it, in UTC.
fn postgres_time(t: std::time::SystemTime) -> String {
    let text = humantime::format_rfc3339_micros(t).to_string();
    format!("{}+00", text.trim_end_matches('Z').replace('T', " "))
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

/// `restore --json`.
#[derive(Debug, Serialize)]
struct RestoredReport<'a> {
    #[serde(flatten)]
    restored: &'a Restored,
    /// From the first check to the data directory in place.
    elapsed_seconds: f64,
    content_bytes_per_second: u64,
    /// `--node-config`: where the node bundle went (or would go).
    #[serde(skip_serializing_if = "Option::is_none")]
    node_config: Option<&'a NodeConfigWritten>,
    /// Restored into this node's datastore: how it leads.
    #[serde(skip_serializing_if = "Option::is_none")]
    leads: Option<&'a super::restore_lead::Led>,
}

#[derive(Debug, Serialize)]
struct NodeConfigWritten {
    path: PathBuf,
    node: String,
    cluster: String,
    /// Where the file that was there went.
    #[serde(skip_serializing_if = "Option::is_none")]
    moved_aside: Option<PathBuf>,
}

impl NodeConfigWritten {
    fn describe(&self, dry_run: bool) -> String {
        let what = format!("the cloud-config of node {} of cluster {}", self.node, self.cluster);
        match (dry_run, &self.moved_aside) {
            (true, _) => format!("would write {what} to {}", self.path.display()),
            (false, Some(aside)) => {
                format!("wrote {what} to {} (the previous file is kept at {})", self.path.display(), aside.display())
            }
            (false, None) => format!("wrote {what} to {}", self.path.display()),
        }
    }
}

pub async fn run(a: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let (dest, id) = match &a.backup_file {
        Some(path) => {
            let (root, id) = split_backup_path(path)?;
            (root, Some(id))
        }
        None => (a.from.clone(), a.backup.clone()),
    };
    let store: Arc<dyn backup::Store> = Arc::from(backup::store::open(&dest, &a.s3.options())?);
    let manifest = match &id {
        Some(id) => backup::verify::manifest(store.as_ref(), id)?,
        None => backup::verify::latest_ending_by(store.as_ref(), a.target_time)?,
    };
    let identities = Arc::new(Identities::load(&a.identity)?);
    let bundle = node_bundle(&a, store.as_ref(), &manifest, &identities)?;
    let owner = crate::postgres::files::Owner::lookup(&a.owner)?;
    let cfg = match &bundle {
        Some((_, _, cfg)) => Some(cfg.clone()),
        None => node_config(global).await,
    };
    // Into this node's own datastore: the node leads with the restored data.
    let lead = match &cfg {
        Some(cfg) if super::restore_lead::is_node_datastore(cfg, &a.data_dir) => {
            Some(super::restore_lead::prepare(cfg, &a.state_dir).await?)
        }
        _ => None,
    };
    let opts = backup::restore::Options {
        data_dir: a.data_dir.clone(),
        force: a.force,
        owner,
        bin_dir: a.pg_bin_dir.clone(),
        dry_run: a.dry_run,
        target_time: a.target_time.map(postgres_time),
        bump: a.bump_revision,
        verify: a.verify,
        node: cfg.as_ref().map(|cfg| settings_of(&a, cfg)),
    };
    let progress = Arc::new(Bars::new(global.quiet));
    let done = backup::restore::restore(store.clone(), &manifest, identities, &opts, progress).await?;
    let node_config = match &bundle {
        Some((path, text, cfg)) => {
            let kept = if done.dry_run { None } else { write_bundle(path, text)? };
            Some(NodeConfigWritten {
                path: path.clone(),
                node: cfg.node.name.clone(),
                cluster: cfg.cluster.name.clone(),
                moved_aside: kept,
            })
        }
        None => None,
    };
    let led = match lead {
        Some(lead) => Some(lead.apply(done.dry_run).await?),
        None => None,
    };
    let rate = per_second(done.content_bytes, done.elapsed);
    if a.json {
        let report = RestoredReport {
            restored: &done,
            elapsed_seconds: seconds(done.elapsed),
            content_bytes_per_second: rate,
            node_config: node_config.as_ref(),
            leads: led.as_ref(),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let data = human_size(done.content_bytes);
    if done.dry_run {
        println!(
            "dry run: backup {} ({} of {} on {}, taken {}) is intact end to end ({data}, {}/s)",
            manifest.id,
            manifest.cluster,
            manifest.node,
            store.url(),
            manifest.start_time,
            human_size(rate)
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
        if let Some(n) = &node_config {
            println!("{}", n.describe(true));
        }
        if let Some(l) = &led {
            println!("{}", l.describe(true));
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "restored backup {} ({} of {}, taken {}, timeline {}, LSN {}) into {} in {:.1} s ({data}, {}/s)",
        manifest.id,
        manifest.cluster,
        manifest.node,
        manifest.start_time,
        manifest.postgres.timeline,
        manifest.postgres.stop_lsn,
        done.data_dir.display(),
        done.elapsed.as_secs_f64(),
        human_size(rate)
    );
    if let Some(aside) = &done.moved_aside {
        println!("the previous data directory is kept at {}", aside.display());
    }
    if let Some(n) = &node_config {
        println!("{}", n.describe(false));
    }
    if let Some(l) = &led {
        println!("{}", l.describe(false));
    }
    if let Some(r) = &done.recovered {
        match (&a.target_time, &r.last_transaction) {
            (Some(t), last) => println!(
                "recovered to {} through {} archived WAL files (last transaction replayed: {}; now timeline {})",
                humantime::format_rfc3339_seconds(*t),
                done.wal_files,
                last.as_deref().unwrap_or("none after the backup"),
                r.timeline
            ),
            (None, _) => println!("recovered to the end of the backup (timeline {})", r.timeline),
        }
        match &r.kine {
            Some(k) => println!(
                "Kine's revision moved from {} to {}: older revisions read as compacted, so watchers list again",
                k.newest, k.revision
            ),
            None => println!("no Kine table in the backup: no revision to move"),
        }
        if let Some(c) = &r.checked {
            let keys = c.kine_keys.map(|n| format!("; Kine holds {n} live keys")).unwrap_or_default();
            println!("verified: pg_amcheck found no corruption in {}{keys}", c.databases.join(", "));
        }
    }
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

    #[test]
    fn target_times_are_rfc3339_with_a_zone_and_reach_postgres_in_utc() {
        let t = parse_target_time("2026-08-21T12:15:02.5+02:00").unwrap();
        assert_eq!(t, parse_target_time("2026-08-21T10:15:02.5Z").unwrap());
        assert_eq!(postgres_time(t), "2026-08-21 10:15:02.500000+00");
        let err = parse_target_time("2026-08-21 10:15").unwrap_err();
        assert!(err.contains("2026-08-21T10:15:02Z"), "{err}");
        assert!(parse_target_time("2026-08-21T10:15:02").is_err(), "a time without a zone is ambiguous");
    }
}
