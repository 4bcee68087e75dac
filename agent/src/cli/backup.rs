//! `gemin_k8s backup`: full backups of this node's PostgreSQL (the Kine
//! datastore) to a local directory or an S3 bucket, encrypted with age, and
//! the commands around them.
//!
//! `gemin_k8s backup --output DEST` (the design document's form) is the
//! same as `gemin_k8s backup create --output DEST`; `backup list`, `verify`,
//! `prune` and `keygen` are subcommands. It runs on a node as root: it
//! reads the node's cloud-config (`--config FILE`, or the node's sources)
//! for the cluster and node names and how to reach PostgreSQL, or takes
//! `--pg-host`/`--pg-port` and `--cluster` explicitly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::GlobalArgs;
use crate::backup::crypto::{Identities, Keys};
use crate::backup::manifest::{Compression, Manifest};
use crate::backup::prune::Pruned;
use crate::backup::stream::{Phase, Progress};
use crate::backup::verify::Listed;
use crate::backup::{self, DEFAULT_DESTINATION, human_size};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub create: CreateArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Take a full backup (the same as `gemin_k8s backup` with these flags).
    Create(CreateArgs),
    /// List the complete backups in a destination.
    List(ListArgs),
    /// Check backups against their manifests; with --identity, end to end.
    Verify(VerifyArgs),
    /// Remove backups older than --retention days (never the newest).
    Prune(PruneArgs),
    /// Make an age key pair for backups: the secret key into --out, the public key printed.
    Keygen(KeygenArgs),
    /// PostgreSQL's archive_command: copy one finished WAL file into the spool (the agent sets it up).
    WalSpool(super::backup_wal::SpoolArgs),
    /// Store the spooled WAL in a destination, compressed and encrypted (the agent does it continuously).
    WalPush(super::backup_wal::PushArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackupType {
    /// A base backup of the whole datastore (pg_basebackup), with the node bundle.
    Full,
    /// On PostgreSQL 15, the WAL since the last full backup: the leader's current WAL file is
    /// closed and the command waits until the destination's WAL archive (backup.archive_wal)
    /// holds it, continuous from the newest full backup. It stores nothing itself.
    Incremental,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

/// `--compress`: a zstd level (1-19) or `none`.
fn parse_compression(text: &str) -> Result<Compression, String> {
    if text == "none" {
        return Ok(Compression::None);
    }
    match text.parse::<i32>() {
        Ok(level) if (1..=19).contains(&level) => Ok(Compression::Zstd { level }),
        _ => Err(format!("{text:?} is neither a zstd level from 1 to 19 nor `none`")),
    }
}

/// How `backup create` reaches PostgreSQL, when not from the cloud-config.
#[derive(Debug, Clone, clap::Args)]
pub struct PgArgs {
    /// PostgreSQL's Unix socket directory or host (default: the node's socket, /run/geminik8s/postgres-NODE).
    #[arg(long, value_name = "DIR|HOST")]
    pub pg_host: Option<String>,
    /// PostgreSQL's port (default: `postgres.port` of the cloud-config).
    #[arg(long, value_name = "PORT")]
    pub pg_port: Option<u16>,
    /// The role pg_basebackup connects as (over the socket, root maps to it).
    #[arg(long, default_value = crate::postgres::render::SUPERUSER, value_name = "ROLE")]
    pub pg_user: String,
    /// Directory of the PostgreSQL tools.
    #[arg(long, default_value = crate::postgres::settings::DEFAULT_BIN_DIR, value_name = "DIR")]
    pub pg_bin_dir: PathBuf,
}

/// How to reach an `s3://BUCKET/PREFIX` destination (unused for a directory).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "S3 destinations")]
pub struct S3Args {
    /// S3-compatible server, http:// or https:// [default: $AWS_ENDPOINT_URL, else AWS's].
    #[arg(long, value_name = "URL", value_parser = backup::s3::parse_endpoint)]
    pub s3_endpoint: Option<String>,
    /// Region [default: $AWS_REGION, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// File with `access_key_id = ...` and `secret_access_key = ...` lines (or an AWS credentials file's
    /// [default]) [default: $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY].
    #[arg(long, value_name = "FILE")]
    pub s3_credentials: Option<PathBuf>,
}

impl S3Args {
    pub fn options(&self) -> backup::s3::S3Options {
        backup::s3::S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            credentials: self.s3_credentials.clone(),
        }
    }
}

/// How what is written to a destination is compressed and encrypted
/// (`backup create`, `backup wal-push`).
#[derive(Debug, Clone, clap::Args)]
pub struct Sealing {
    /// Compression: a zstd level (1-19) or `none`.
    #[arg(long, default_value = "3", value_parser = parse_compression, value_name = "LEVEL|none")]
    pub compress: Compression,
    /// Encrypt to this key (repeatable): an age recipient (age1...), a file of recipients, or
    /// passphrase:FILE (the first line of FILE).
    #[arg(long, value_name = "KEY")]
    pub encryption_key: Vec<String>,
    /// Write unencrypted (backups and WAL hold every Kubernetes Secret).
    #[arg(long, conflicts_with = "encryption_key")]
    pub no_encryption: bool,
}

impl Sealing {
    /// The keys of `--encryption-key`; none only when `--no-encryption`
    /// asks for it (`what` is what would be written in the clear).
    pub fn keys(&self, what: &str) -> anyhow::Result<Keys> {
        let keys = Keys::parse(&self.encryption_key)?;
        if matches!(keys, Keys::None) && !self.no_encryption {
            bail!(
                "no encryption key: {what} holds every Kubernetes Secret. Give --encryption-key age1... \
                 (make a key pair with `gemin_k8s backup keygen --out FILE` on a machine you trust and keep FILE \
                 off the nodes), --encryption-key passphrase:FILE, or --no-encryption to write it in the clear"
            );
        }
        Ok(keys)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Destination: a directory (a path or file:///path) or s3://BUCKET/PREFIX. Each backup is a
    /// subdirectory (a prefix).
    #[arg(long, default_value = DEFAULT_DESTINATION, value_name = "DEST")]
    pub output: String,
    /// Backup type: full, or incremental (PostgreSQL 15 has no incremental base backup: here it
    /// means the WAL since the last full backup, made restorable up to now).
    #[arg(long = "type", value_enum, default_value_t = BackupType::Full, value_name = "TYPE")]
    pub kind: BackupType,
    /// --type incremental: how long to wait for the archive to hold the closed WAL file.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    #[command(flatten)]
    pub sealing: Sealing,
    /// Then remove backups in the destination older than this many days (never the newest).
    #[arg(long, value_name = "DAYS")]
    pub retention: Option<u32>,
    /// Then read the backup back and check it against its manifest.
    #[arg(long)]
    pub verify: bool,
    /// Cluster name recorded in the manifest (default: the cloud-config's; must match it).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Node name recorded in the manifest (default: the cloud-config's, or the hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// Print the result as JSON: the manifest, the time taken and the throughput.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pg: PgArgs,
    #[command(flatten)]
    pub s3: Box<S3Args>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Destination to list: a directory or s3://BUCKET/PREFIX.
    #[arg(long, default_value = DEFAULT_DESTINATION, value_name = "DEST")]
    pub from: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = ListFormat::Table)]
    pub output: ListFormat,
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Destination holding the backups.
    #[arg(long, default_value = DEFAULT_DESTINATION, value_name = "DEST")]
    pub from: String,
    /// The backup to check (default: every complete backup).
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Decrypt with this identity (repeatable): an age identity file, or passphrase:FILE.
    /// Then the content is checked end to end, not only the stored checksums.
    #[arg(long, value_name = "FILE")]
    pub identity: Vec<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = ListFormat::Table)]
    pub output: ListFormat,
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Destination holding the backups.
    #[arg(long, default_value = DEFAULT_DESTINATION, value_name = "DEST")]
    pub from: String,
    /// Keep backups younger than this many days (and always the newest complete one).
    #[arg(long, value_name = "DAYS")]
    pub retention: u32,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = ListFormat::Table)]
    pub output: ListFormat,
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (created 0600; never overwritten). Keep it off the nodes.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub async fn run(args: Args, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        None => create(args.create, global).await,
        Some(Command::Create(a)) => create(a, global).await,
        Some(Command::List(a)) => list(a),
        Some(Command::Verify(a)) => verify(a).await,
        Some(Command::Prune(a)) => prune(a),
        Some(Command::Keygen(a)) => {
            let public = backup::crypto::write_new_identity(&a.out)?;
            eprintln!(
                "wrote the secret key to {}; keep it off the nodes. The public key (--encryption-key):",
                a.out.display()
            );
            println!("{public}");
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::WalSpool(a)) => super::backup_wal::spool(a),
        Some(Command::WalPush(a)) => super::backup_wal::push(a).await,
    }
}

fn days(n: u32) -> Duration {
    Duration::from_secs(u64::from(n) * 24 * 3600)
}

/// The node's cloud-config, from `--config FILE` or the node's sources.
pub(super) async fn node_config(global: &GlobalArgs) -> anyhow::Result<crate::config::GeminiConfig> {
    let ctx = crate::config::CheckContext { root: PathBuf::from("/"), check_files: false };
    let loaded = match &global.config {
        Some(path) => crate::config::load_files(std::slice::from_ref(path), &ctx)?,
        None => crate::config::load(&crate::config::SourcePaths::under(std::path::Path::new("/")), &ctx)
            .await
            .context("reading the node's cloud-config (or give --pg-host, --pg-port and --cluster)")?,
    };
    Ok(loaded.gemini)
}

fn hostname() -> String {
    crate::system::hosts::current("unknown")
}

/// How to reach PostgreSQL, and what the backup records; the node bundle
/// only when `with_bundle` (a full backup) and the cloud-config was read.
async fn source_and_labels(
    a: &CreateArgs,
    global: &GlobalArgs,
    with_bundle: bool,
) -> anyhow::Result<(backup::create::Source, backup::create::Labels)> {
    let cfg = if a.pg.pg_host.is_none() || global.config.is_some() { Some(node_config(global).await?) } else { None };
    let cluster = match (&a.cluster, &cfg) {
        (Some(given), Some(c)) if *given != c.cluster.name => {
            bail!("--cluster {given} does not match the cloud-config's cluster {}", c.cluster.name)
        }
        (Some(given), _) => given.clone(),
        (None, Some(c)) => c.cluster.name.clone(),
        (None, None) => {
            bail!("give --cluster NAME (the cluster name comes from the cloud-config, which --pg-host skips)")
        }
    };
    let node = a.node.clone().or_else(|| cfg.as_ref().map(|c| c.node.name.clone())).unwrap_or_else(hostname);
    let host = match (&a.pg.pg_host, &cfg) {
        (Some(h), _) => h.clone(),
        (None, Some(c)) => crate::postgres::Settings::from_config(c).socket_dir.display().to_string(),
        (None, None) => unreachable!("the config is read when --pg-host is missing"),
    };
    let port = a.pg.pg_port.or_else(|| cfg.as_ref().map(|c| c.postgres.port)).unwrap_or(5432);
    let source = backup::create::Source { bin_dir: a.pg.pg_bin_dir.clone(), host, port, user: a.pg.pg_user.clone() };
    // With the node's cloud-config, the backup carries it (the node bundle).
    let node_config = match &cfg {
        Some(c) if with_bundle => Some(backup::node::render(c).map_err(|e| anyhow::anyhow!("the node bundle: {e}"))?),
        _ => None,
    };
    Ok((source, backup::create::Labels { cluster, node, node_config }))
}

async fn create(a: CreateArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    if a.kind == BackupType::Incremental {
        return incremental(a, global).await;
    }
    let keys = a.sealing.keys("a backup")?;
    let store: Arc<dyn backup::Store> = Arc::from(backup::store::open(&a.output, &a.s3.options())?);
    let (source, labels) = source_and_labels(&a, global, true).await?;
    let progress = Arc::new(Bars::new(global.quiet));
    let created =
        backup::create::create(&source, store.clone(), &labels, a.sealing.compress, Arc::new(keys), progress).await?;
    let mut m = created.manifest;
    let content_bytes = m.objects.iter().map(|o| o.content_size).sum();
    let rate = per_second(content_bytes, created.elapsed);
    if !a.json {
        println!(
            "backup {} complete in {}: {} stored ({} of data) in {:.1} s ({}/s); timeline {}, LSN {} to {}; {}",
            m.id,
            store.url(),
            human_size(m.stored_size()),
            human_size(content_bytes),
            created.elapsed.as_secs_f64(),
            human_size(rate),
            m.postgres.timeline,
            m.postgres.start_lsn,
            m.postgres.stop_lsn,
            encryption_text(&m),
        );
    }
    if a.verify {
        let s = store.clone();
        let (level, recorded) = tokio::task::spawn_blocking(move || {
            let level = backup::verify::verify(s.as_ref(), &m, &Identities::default(), false)?;
            backup::verify::record(s.as_ref(), &mut m, level)?;
            Ok::<_, backup::BackupError>((level, m))
        })
        .await??;
        m = recorded;
        if !a.json {
            println!("verified: {level}");
        }
    }
    let pruned = match a.retention {
        Some(n) => {
            let pruned = backup::prune::prune(store.as_ref(), days(n), false)?;
            if !a.json && !pruned.removed.is_empty() {
                println!("removed past {n} days: {}", pruned.removed.join(", "));
            }
            Some(pruned)
        }
        None => None,
    };
    if a.json {
        let report = CreatedReport {
            stored_bytes: m.stored_size(),
            content_bytes,
            elapsed_seconds: seconds(created.elapsed),
            content_bytes_per_second: rate,
            manifest: m,
            pruned,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `backup --type incremental`: the WAL since the newest full backup,
/// archived up to now.
async fn incremental(a: CreateArgs, global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    if a.verify || a.retention.is_some() {
        bail!(
            "--verify and --retention go with --type full; an incremental backup checks that the archived WAL is \
             continuous from the newest full backup"
        );
    }
    let store: Arc<dyn backup::Store> = Arc::from(backup::store::open(&a.output, &a.s3.options())?);
    let (source, _) = source_and_labels(&a, global, false).await?;
    let progress = Bars::new(global.quiet);
    let done = backup::incremental::take(&source, store.clone(), a.timeout, &progress).await?;
    drop(progress);
    if a.json {
        #[derive(Serialize)]
        struct Report<'a> {
            kind: &'static str,
            #[serde(flatten)]
            incremental: &'a backup::incremental::Incremental,
            destination: String,
            elapsed_seconds: f64,
        }
        let report = Report {
            kind: "incremental",
            incremental: &done,
            destination: store.url(),
            elapsed_seconds: seconds(done.elapsed),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "incremental backup complete in {:.1} s: {} holds the WAL from backup {} ({}) through {} ({} files, \
             continuous); restorable to {} (restore --target-time)",
            done.elapsed.as_secs_f64(),
            store.url(),
            done.base,
            done.from_segment,
            done.through_segment,
            done.wal_files,
            done.restorable_to
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `backup create --json`.
#[derive(Debug, Serialize)]
struct CreatedReport {
    /// The manifest as written (with `verified` after --verify).
    manifest: Manifest,
    stored_bytes: u64,
    content_bytes: u64,
    /// From connecting to PostgreSQL to the manifest written.
    elapsed_seconds: f64,
    content_bytes_per_second: u64,
    /// What --retention removed and kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pruned: Option<Pruned>,
}

/// `elapsed` in seconds, to the millisecond.
pub(super) fn seconds(elapsed: Duration) -> f64 {
    elapsed.as_millis() as f64 / 1000.0
}

/// Bytes a second over `elapsed` (0 when no time passed).
pub(super) fn per_second(bytes: u64, elapsed: Duration) -> u64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { (bytes as f64 / s).round() as u64 } else { 0 }
}

/// The progress of `backup create` and `restore` on standard error: a bar
/// or a spinner for each phase, cleared when the phase ends. indicatif's
/// standard-error target draws nothing when standard error is not a
/// terminal (or TERM is `dumb`); `--quiet` hides it too. Never on stdout.
pub(super) struct Bars {
    current: Mutex<Option<indicatif::ProgressBar>>,
    quiet: bool,
}

impl Bars {
    pub(super) fn new(quiet: bool) -> Bars {
        Bars { current: Mutex::new(None), quiet }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<indicatif::ProgressBar>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a phase is drawn (short enough for 80 columns).
fn template(phase: Phase, total: Option<u64>) -> &'static str {
    match (phase, total) {
        (Phase::Reading, Some(_)) => {
            "{spinner} reading {binary_bytes} of ~{binary_total_bytes} [{bar:20}] {binary_bytes_per_sec}, {elapsed}"
        }
        (Phase::Reading, None) => "{spinner} reading {binary_bytes}, {binary_bytes_per_sec}, {elapsed}",
        (Phase::Unpacking, Some(_)) => {
            "{spinner} unpacking {binary_bytes} of {binary_total_bytes} [{bar:20}] {binary_bytes_per_sec}, {eta} left"
        }
        (Phase::Unpacking, None) => "{spinner} unpacking {binary_bytes}, {binary_bytes_per_sec}, {elapsed}",
        (Phase::Checking, _) => "{spinner} checking the backup, {elapsed}",
        (Phase::FetchingWal, _) => "{spinner} fetching archived WAL: {pos} files, {elapsed}",
        (Phase::Replaying, _) => "{spinner} replaying WAL, {elapsed}",
        (Phase::WaitingForArchive, _) => "{spinner} waiting for the WAL archive to hold the closed WAL file, {elapsed}",
    }
}

impl Progress for Bars {
    fn begin(&self, phase: Phase, total: Option<u64>) {
        let target =
            if self.quiet { indicatif::ProgressDrawTarget::hidden() } else { indicatif::ProgressDrawTarget::stderr() };
        let style = indicatif::ProgressStyle::with_template(template(phase, total))
            .expect("the templates are valid")
            .progress_chars("=> ");
        let bar = indicatif::ProgressBar::with_draw_target(total, target).with_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        if let Some(previous) = self.current().replace(bar) {
            previous.finish_and_clear();
        }
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = self.current().as_ref() {
            bar.inc(n);
            // An approximate total (the databases' size) can be passed.
            if let Some(len) = bar.length()
                && bar.position() > len
            {
                bar.set_length(bar.position());
            }
        }
    }

    fn end(&self) {
        if let Some(bar) = self.current().take() {
            bar.finish_and_clear();
        }
    }

    fn suspend(&self, f: &mut dyn FnMut()) {
        match self.current().as_ref() {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.end();
    }
}

fn encryption_text(m: &Manifest) -> String {
    match m.encryption.recipients.as_slice() {
        [] => m.encryption.kind.to_string(),
        r => format!("{} to {}", m.encryption.kind, r.join(", ")),
    }
}

fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let store = backup::store::open(&a.from, &a.s3.options())?;
    let rows = backup::verify::list(store.as_ref())?;
    let archived = store.list_wal()?;
    let windows: Vec<Option<backup::verify::Window>> = rows
        .iter()
        .map(|r| match r {
            Listed::Ok(m) => Some(backup::verify::window(m, &archived)),
            Listed::Unreadable { .. } => None,
        })
        .collect();
    match a.output {
        ListFormat::Json => {
            let mut out = Vec::new();
            for (r, w) in rows.iter().zip(&windows) {
                let mut v = serde_json::to_value(r)?;
                if let (Some(w), Some(fields)) = (w, v.as_object_mut()) {
                    fields.insert("restorable".into(), serde_json::to_value(w)?);
                }
                out.push(v);
            }
            println!("{}", serde_json::to_string_pretty(&out)?)
        }
        ListFormat::Table => {
            print!("{}", list_table(&rows, &windows, &store.url()));
            let incomplete: Vec<String> = store.list()?.into_iter().filter(|e| !e.complete).map(|e| e.id).collect();
            if !incomplete.is_empty() {
                println!(
                    "incomplete (no manifest: running, interrupted or failed; never restored): {}",
                    incomplete.join(", ")
                );
            }
            if let Some(gap) = windows.iter().flatten().filter_map(|w| w.gap.as_deref()).next_back() {
                println!("archived WAL missing: {gap}; point-in-time recovery cannot cross it");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A backup's restorable times as a table cell.
fn window_text(w: &backup::verify::Window) -> String {
    match &w.to {
        Some(to) => format!("{} .. ~{to}", w.from),
        None => format!("{} (its end only)", w.from),
    }
}

fn list_table(rows: &[Listed], windows: &[Option<backup::verify::Window>], url: &str) -> String {
    if rows.is_empty() {
        return format!("no backups in {url}\n");
    }
    let header = ["ID", "RESTORABLE", "SIZE", "DATA", "TL", "LSN RANGE", "ENCRYPTION", "VERIFIED"].map(String::from);
    let mut table = vec![header.to_vec()];
    for (r, w) in rows.iter().zip(windows) {
        table.push(match r {
            Listed::Ok(m) => vec![
                m.id.clone(),
                w.as_ref().map(window_text).unwrap_or_default(),
                human_size(m.stored_size()),
                human_size(m.objects.iter().map(|o| o.content_size).sum()),
                m.postgres.timeline.to_string(),
                format!("{}-{}", m.postgres.start_lsn, m.postgres.stop_lsn),
                m.encryption.kind.to_string(),
                m.verified.as_ref().map_or("never".into(), |v| format!("{} ({})", v.at, v.level)),
            ],
            Listed::Unreadable { id, error } => vec![id.clone(), format!("unreadable: {error}")],
        });
    }
    render_table(&table)
}

/// Columns padded to their widest cell; the last column is not padded.
fn render_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter().filter(|r| r.len() > 1).filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

/// One backup's result in `backup verify`.
#[derive(Debug, Serialize)]
struct VerifyRow {
    backup: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    level: Option<backup::manifest::VerifyLevel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// What was checked, for the archived WAL's row.
    #[serde(skip_serializing_if = "Option::is_none")]
    checked: Option<String>,
}

async fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store: Arc<dyn backup::Store> = Arc::from(backup::store::open(&a.from, &a.s3.options())?);
    let identities = Arc::new(Identities::load(&a.identity)?);
    let full = !identities.is_empty();
    let s = store.clone();
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<VerifyRow>> {
        let targets: Vec<Result<Manifest, (String, String)>> = match &a.backup {
            Some(id) => vec![backup::verify::manifest(s.as_ref(), id).map_err(|e| (id.clone(), e.to_string()))],
            None => backup::verify::list(s.as_ref())?
                .into_iter()
                .map(|l| match l {
                    Listed::Ok(m) => Ok(*m),
                    Listed::Unreadable { id, error } => Err((id, error)),
                })
                .collect(),
        };
        if targets.is_empty() {
            bail!("no complete backup in {}", s.url());
        }
        let mut rows = Vec::new();
        for t in targets {
            let row = match t {
                Err((backup, error)) => VerifyRow { backup, ok: false, level: None, error: Some(error), checked: None },
                Ok(mut m) => {
                    // A backup written without encryption is checked end to end without a key.
                    let full = full || m.encryption.kind == backup::manifest::EncryptionKind::None;
                    match backup::verify::verify(s.as_ref(), &m, &identities, full) {
                        Ok(level) => {
                            if let Err(e) = backup::verify::record(s.as_ref(), &mut m, level) {
                                tracing::warn!(backup = %m.id, error = %e, "could not record the verification in the manifest");
                            }
                            VerifyRow { backup: m.id, ok: true, level: Some(level), error: None, checked: None }
                        }
                        Err(e) => VerifyRow {
                            backup: m.id,
                            ok: false,
                            level: None,
                            error: Some(e.to_string()),
                            checked: None,
                        },
                    }
                }
            };
            rows.push(row);
        }
        if a.backup.is_none() {
            rows.extend(wal_row(s.as_ref())?);
        }
        Ok(rows)
    })
    .await??;
    match a.output {
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        ListFormat::Table => {
            let mut table = vec![["BACKUP", "RESULT"].map(String::from).to_vec()];
            for r in &rows {
                let result = match (&r.level, &r.error, &r.checked) {
                    (Some(level), _, _) => format!("ok ({level})"),
                    (None, Some(e), _) => format!("FAILED: {e}"),
                    (None, None, Some(checked)) if r.ok => format!("ok ({checked})"),
                    (None, None, _) => "FAILED".into(),
                };
                table.push(vec![r.backup.clone(), result]);
            }
            print!("{}", render_table(&table));
        }
    }
    Ok(if rows.iter().all(|r| r.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The archived WAL's row of `backup verify`: every segment from the
/// newest backup's start on is there (`None` when nothing is archived).
fn wal_row(store: &dyn backup::Store) -> anyhow::Result<Option<VerifyRow>> {
    let names: Vec<String> = store.list_wal()?.into_iter().map(|e| e.name).collect();
    let Ok(newest) = backup::verify::latest(store) else { return Ok(None) };
    if names.is_empty() {
        return Ok(None);
    }
    let p = &newest.postgres;
    let start = backup::wal::segment_of(p.timeline, &p.start_lsn)
        .with_context(|| format!("backup {}: start LSN {:?} is not an LSN", newest.id, p.start_lsn))?;
    let missing = backup::wal::missing_segments(&names, &start);
    let last = names.iter().rev().find(|n| backup::wal::strip_stored_suffixes(n).len() == 24);
    let checked = format!(
        "{} files; continuous from {start} (backup {}) to {}",
        names.len(),
        newest.id,
        last.map(|n| backup::wal::strip_stored_suffixes(n)).unwrap_or("-")
    );
    Ok(Some(VerifyRow {
        backup: format!("{}/ (archived WAL)", backup::store::WAL_PREFIX),
        ok: missing.is_empty(),
        level: None,
        error: (!missing.is_empty()).then(|| {
            format!(
                "WAL missing after backup {}: {}; point-in-time recovery cannot cross it (a full backup after it can)",
                newest.id,
                missing.join(", ")
            )
        }),
        checked: missing.is_empty().then_some(checked),
    }))
}

fn prune(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let store = backup::store::open(&a.from, &a.s3.options())?;
    let pruned = backup::prune::prune(store.as_ref(), days(a.retention), a.dry_run)?;
    match a.output {
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&pruned)?),
        ListFormat::Table => {
            let verb = if a.dry_run { "would remove" } else { "removed" };
            let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
            println!("{verb}: {}", list(&pruned.removed));
            println!("kept: {}", list(&pruned.kept));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command as Top};

    fn parse(args: &[&str]) -> Args {
        match Cli::try_parse_from(args).unwrap().command {
            Top::Backup(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_design_documents_form_and_the_subcommands_both_parse() {
        let a =
            parse(&["gemin_k8s", "backup", "--output", "/mnt/usb", "--encryption-key", "age1x", "--retention", "7"]);
        assert!(a.command.is_none());
        assert_eq!((a.create.output.as_str(), a.create.retention), ("/mnt/usb", Some(7)));
        assert_eq!(a.create.sealing.compress, Compression::Zstd { level: 3 });
        let a = parse(&["gemin_k8s", "backup", "create", "--compress", "none", "--no-encryption"]);
        let Some(Command::Create(c)) = a.command else { panic!() };
        assert_eq!(
            (c.sealing.compress, c.sealing.no_encryption, c.output.as_str()),
            (Compression::None, true, DEFAULT_DESTINATION)
        );
        let a = parse(&["gemin_k8s", "backup", "list", "--from", "/mnt/usb", "-o", "json"]);
        assert!(matches!(a.command, Some(Command::List(ListArgs { output: ListFormat::Json, .. }))));
        assert!(parse(&["gemin_k8s", "backup", "--json"]).create.json);
        let a = parse(&["gemin_k8s", "backup", "create", "--json", "--output", "/mnt/usb"]);
        assert!(matches!(a.command, Some(Command::Create(CreateArgs { json: true, .. }))));
        let a = parse(&["gemin_k8s", "backup", "--type", "incremental", "--timeout", "90s"]);
        assert_eq!((a.create.kind, a.create.timeout), (BackupType::Incremental, Duration::from_secs(90)));
        assert!(Cli::try_parse_from(["gemin_k8s", "backup", "--compress", "25"]).is_err());
        assert!(Cli::try_parse_from(["gemin_k8s", "backup", "--encryption-key", "k", "--no-encryption"]).is_err());
    }

    #[test]
    fn every_phase_draws_and_the_figures_are_per_second() {
        let phases = [
            Phase::Reading,
            Phase::Unpacking,
            Phase::Checking,
            Phase::FetchingWal,
            Phase::Replaying,
            Phase::WaitingForArchive,
        ];
        for (phase, total) in phases.iter().flat_map(|p| [(*p, None), (*p, Some(10))]) {
            let t = template(phase, total);
            assert!(indicatif::ProgressStyle::with_template(t).is_ok(), "{phase:?}: {t}");
        }
        assert_eq!(per_second(50 << 20, Duration::from_millis(2500)), 20 << 20);
        assert_eq!(per_second(1, Duration::ZERO), 0);
        assert_eq!(seconds(Duration::from_micros(1_234_567)), 1.234);
    }

    #[test]
    fn the_table_pads_columns_and_says_when_there_is_nothing() {
        let rows = vec![
            vec!["ID".to_string(), "SIZE".into(), "VERIFIED".into()],
            vec!["20260821T101502Z".to_string(), "3.1 MiB".into(), "never".into()],
        ];
        assert_eq!(render_table(&rows), "ID                SIZE     VERIFIED\n20260821T101502Z  3.1 MiB  never\n");
        assert_eq!(list_table(&[], &[], "file:///b"), "no backups in file:///b\n");
    }
}
