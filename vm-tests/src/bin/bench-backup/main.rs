//! `bench-backup`: a real PostgreSQL 15 set up as the agent sets up a
//! node's, Kine's table filled to a size with values like Kubernetes
//! objects; `gemin_k8s backup create` of it (age-encrypted) to a directory
//! and to an `s3://` bucket on an `s3s-fs` server on loopback,
//! `gemin_k8s restore` of each into a new data directory; then continuous
//! WAL archiving under a steady writer, with the lag from PostgreSQL
//! finishing each WAL file to it being stored, and the writer's commit
//! latency with and without archiving. A benchmark: it prints, it does not
//! judge. Needs root (the servers run as `postgres`).

mod archiving;
mod data;
mod lab;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use geminik8s::backup::crypto::Keys;
use geminik8s::backup::s3::S3Options;
use geminik8s::backup::{Manifest, store};
use geminik8s::postgres::settings::WalArchive;
use geminik8s::postgres::{ServerRole, StopMode};
use geminik8s_vm_tests::chaos::report::percentile;
use geminik8s_vm_tests::probe::agent_bin;
use geminik8s_vm_tests::skip::{find_tool, requires};

use crate::lab::{CLUSTER, Gemin, Lab, NODE, Node};
use geminik8s_vm_tests::s3::{BUCKET, S3Server, SERVER};

#[derive(Debug, Parser)]
#[command(
    name = "bench-backup",
    about = "Backup, restore and WAL archiving of a real PostgreSQL 15 holding Kine's table"
)]
struct Args {
    /// Size of Kine's database to build, in GB (10^9 bytes, as pg_database_size counts them).
    #[arg(long, default_value_t = 1.0, value_parser = size_gb)]
    size_gb: f64,
    /// The gemin_k8s binary (default: next to this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Rows per second (about 1 KB each) the writer inserts while WAL is archived.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    write_rate: u32,
    /// How long the writer writes, in each of its runs (seconds, or with a unit: 90s, 2m).
    #[arg(long, default_value = "60", value_parser = seconds)]
    duration: Duration,
    /// PostgreSQL's archive_timeout while archiving (seconds, or with a unit; the agent's default is 60 s).
    #[arg(long, default_value = "10", value_parser = seconds)]
    archive_timeout: Duration,
    /// Skip the writer's run without archiving (its commit latency is the baseline).
    #[arg(long)]
    no_baseline: bool,
    /// Skip the s3:// destination.
    #[arg(long)]
    no_s3: bool,
    /// Keep the benchmark's directory (data directories, backups, logs) when done.
    #[arg(long)]
    keep: bool,
}

fn size_gb(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of GB")),
    }
}

/// `60` (seconds) or a duration with its unit (`90s`, `2m`).
fn seconds(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(n) => Duration::from_secs(n),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (seconds, or e.g. 90s, 2m)"))?,
    };
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: at least one second"));
    }
    Ok(d)
}

const TOOLS: [&str; 6] = ["initdb", "pg_basebackup", "pg_verifybackup", "pg_waldump", "postgres", "psql"];

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = requires(true, &TOOLS) {
        println!("SKIPPED bench-backup: {reason}");
        return ExitCode::SUCCESS;
    }
    match start(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-backup: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    let bin = args.agent_bin.clone().or_else(agent_bin).context("gemin_k8s not found: build it or pass --agent-bin")?;
    let bin = bin.canonicalize().with_context(|| format!("{} not found", bin.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args, Gemin { bin }))
}

/// The benchmark, then the clean-up of what it started: after it ends,
/// fails, or is interrupted (SIGINT, SIGTERM).
async fn run(args: Args, gemin: Gemin) -> anyhow::Result<()> {
    let mut lab = Lab::new(args.keep)?;
    let outcome = tokio::select! {
        r = bench(&mut lab, &gemin, &args) => r,
        s = interrupted() => Err(anyhow!("interrupted by {s}")),
    };
    if outcome.is_err() {
        eprintln!("stopping what the benchmark started");
    }
    lab.shutdown(args.keep).await;
    outcome
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("signals cannot stop the benchmark cleanly here: {e}");
            std::future::pending().await
        }
    }
}

async fn bench(lab: &mut Lab, gemin: &Gemin, args: &Args) -> anyhow::Result<()> {
    let target = (args.size_gb * 1e9) as u64;
    let mut node = lab.node(NODE)?;
    node.leader().await?;
    let db = node.connect("postgres").await?;
    let version: String = db.query_one("reading the version", "SHOW server_version", &[]).await?.get(0);
    drop(db);
    eprintln!("filling Kine's table to {} MB", target / 1_000_000);
    let filled = data::fill(&node, target).await?;
    println!(
        "datastore: PostgreSQL {version} as the agent runs it; Kine's database {} MB (pg_database_size: table, TOAST, \
         indexes) in {} rows of 1-4 KB JSON-like values (average {} B, {} MB of values), filled in {:.0} s",
        mb(filled.db_bytes),
        filled.rows,
        filled.value_bytes / filled.rows.max(1),
        mb(filled.value_bytes),
        filled.took.as_secs_f64()
    );
    println!("MB = 10^6 bytes; MB/s = the backup's data (the tar PostgreSQL's files make) / seconds");

    // Backups.
    let key = lab.path("backup.key");
    let public = gemin.run(&strings(&["backup", "keygen", "--out", &path(&key)?])).await?.trim().to_string();
    let mut destinations = vec![Destination {
        label: "directory",
        url: path(&lab.path("backups"))?,
        flags: Vec::new(),
        options: S3Options::default(),
    }];
    let s3 = if args.no_s3 {
        println!("s3:// destination: skipped (--no-s3)");
        None
    } else if find_tool(SERVER).is_none() {
        println!("s3:// destination: skipped: {SERVER} is not installed (`just deps` installs it)");
        None
    } else {
        let server = S3Server::start().await?;
        destinations.push(Destination {
            label: "s3 (s3s-fs, loopback)",
            url: format!("s3://{BUCKET}/bench"),
            flags: server.flags(),
            options: server.options(),
        });
        Some(server)
    };
    println!("backups: gemin_k8s backup create (zstd level 3, age to one X25519 recipient)");
    println!("  {:<24} {:>10} {:>10} {:>9} {:>8}", "destination", "data MB", "stored MB", "seconds", "MB/s");
    let mut backups = Vec::new();
    for d in &destinations {
        let b = backup(gemin, &node, d, &public).await?;
        println!(
            "  {:<24} {:>10} {:>10} {:>9.1} {:>8.1}",
            d.label,
            mb(b.data),
            mb(b.stored),
            b.took.as_secs_f64(),
            rate(b.data, b.took)
        );
        backups.push(b);
    }

    // Restores, with the server stopped so that they run alone.
    node.stop(StopMode::Fast).await?;
    println!("restores: gemin_k8s restore --identity into a new data directory (decrypt, unpack, verify, recover)");
    println!("  {:<24} {:>10} {:>9} {:>8}", "from", "data MB", "seconds", "MB/s");
    for (i, (d, b)) in destinations.iter().zip(&backups).enumerate() {
        let took = restore(lab, gemin, d, &key, i).await?;
        println!("  {:<24} {:>10} {:>9.1} {:>8.1}", d.label, mb(b.data), took.as_secs_f64(), rate(b.data, took));
    }
    drop(s3);

    archiving(lab, &mut node, gemin, args, &public).await
}

/// Where backups go, and how `gemin_k8s` and the library reach it.
struct Destination {
    label: &'static str,
    url: String,
    flags: Vec<String>,
    options: S3Options,
}

struct Backup {
    data: u64,
    stored: u64,
    took: Duration,
}

async fn backup(gemin: &Gemin, node: &Node, d: &Destination, public: &str) -> anyhow::Result<Backup> {
    let mut a = strings(&["backup", "create", "--output", &d.url, "--cluster", CLUSTER, "--node", NODE]);
    a.extend(strings(&["--encryption-key", public]));
    a.extend(node.pg_flags());
    a.extend(d.flags.iter().cloned());
    eprintln!("backing up to {}", d.url);
    let started = Instant::now();
    let said = gemin.run(&a).await?;
    let took = started.elapsed();
    eprint!("{said}");
    let (url, options) = (d.url.clone(), d.options.clone());
    let m: Manifest = tokio::task::spawn_blocking(move || {
        let store = store::open(&url, &options)?;
        geminik8s::backup::verify::latest(store.as_ref())
    })
    .await??;
    let data = m.objects.iter().map(|o| o.content_size).sum();
    Ok(Backup { data, stored: m.stored_size(), took })
}

/// Restore the newest backup of `d` into a new data directory; how long it
/// took. The directory is removed afterwards (it is as large as the data).
async fn restore(lab: &Lab, gemin: &Gemin, d: &Destination, key: &Path, n: usize) -> anyhow::Result<Duration> {
    let dir = lab.postgres_dir(&format!("restore-{n}"))?;
    let data_dir = dir.join("data");
    let mut a = strings(&["restore", "--from", &d.url, "--data-dir", &path(&data_dir)?, "--identity", &path(key)?]);
    a.extend(d.flags.iter().cloned());
    eprintln!("restoring from {}", d.url);
    let started = Instant::now();
    let said = gemin.run(&a).await?;
    let took = started.elapsed();
    eprint!("{said}");
    if !data_dir.join("PG_VERSION").is_file() {
        bail!("gemin_k8s restore succeeded but {} holds no PostgreSQL data directory", data_dir.display());
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(took)
}

/// Continuous archiving's lag under steady writes, on the same datastore:
/// the writer without archiving (the baseline), then with it.
async fn archiving(lab: &mut Lab, node: &mut Node, gemin: &Gemin, args: &Args, public: &str) -> anyhow::Result<()> {
    let rows_per_run = (f64::from(args.write_rate) * args.duration.as_secs_f64()).round() as u64;
    let mut first = 1 << 40;
    let baseline = if args.no_baseline {
        None
    } else {
        node.start().await?;
        eprintln!("writing {} rows/s for {} s without archiving", args.write_rate, args.duration.as_secs());
        let w = archiving::write_steadily(node, args.write_rate, args.duration, first).await?;
        first += rows_per_run;
        node.stop(StopMode::Fast).await?;
        Some(w)
    };

    // The server's OS user runs the archive command: a copy it can execute.
    let program = lab.path("gemin_k8s");
    std::fs::copy(&gemin.bin, &program).with_context(|| format!("copying {}", gemin.bin.display()))?;
    lab::chown_to_postgres(&program)?;
    let spool = lab.postgres_dir("wal-spool")?;
    let mut settings = node.settings().clone();
    settings.wal_archive = Some(WalArchive {
        program,
        spool: spool.clone(),
        spool_limit: geminik8s::backup::wal::DEFAULT_SPOOL_LIMIT,
        timeout: args.archive_timeout,
    });
    lab.reconfigure(node, settings)?;
    node.write_config(ServerRole::Primary)?;
    node.start().await?;
    // PostgreSQL 15's checkpointer starts while the server is still starting
    // up and computes its first sleep (up to checkpoint_timeout) without
    // archive_timeout; a reload wakes it, so that archive_timeout applies
    // from now on and not only after the first checkpoint.
    node.reload().await?;
    let db = node.connect("postgres").await?;
    let mode: String = db.query_one("reading archive_mode", "SHOW archive_mode", &[]).await?.get(0);
    if mode != "always" {
        bail!("archive_mode is {mode:?} after configuring archiving");
    }
    drop(db);

    let keys = Arc::new(Keys::parse(&[public.to_string()])?);
    let dest = lab.path("archive");
    let (tell_last, last) = tokio::sync::watch::channel(None);
    let drain = args.archive_timeout + 2 * geminik8s::daemon::archiver::INTERVAL + Duration::from_secs(60);
    eprintln!("writing {} rows/s for {} s with archiving", args.write_rate, args.duration.as_secs());
    let writer = async {
        let w = archiving::write_steadily(node, args.write_rate, args.duration, first).await?;
        tell_last.send_replace(Some(archiving::current_wal_file(node).await?));
        Ok::<_, anyhow::Error>(w)
    };
    let (with, up) = tokio::try_join!(writer, archiving::upload(spool, dest, keys, last, drain))?;

    println!(
        "continuous WAL archiving: archive_timeout {} s; an upload pass every {} s as the agent does \
         (backup::wal::upload: zstd level 3, age, to a directory); a writer inserting {} rows/s of ~{} B for {} s",
        args.archive_timeout.as_secs(),
        geminik8s::daemon::archiver::INTERVAL.as_secs(),
        args.write_rate,
        archiving::ROW_BYTES,
        args.duration.as_secs()
    );
    println!(
        "  WAL files archived: {} ({} MB of WAL stored as {} MB)",
        up.lags.len() + up.untimed,
        mb(up.wal_bytes),
        mb(up.stored_bytes)
    );
    if up.lags.is_empty() {
        println!("  lag: no file timed");
    } else {
        println!(
            "  lag, PostgreSQL finished the file -> stored: median {:.1} s, p95 {:.1} s, max {:.1} s ({})",
            percentile(&up.lags, 50.0).as_secs_f64(),
            percentile(&up.lags, 95.0).as_secs_f64(),
            up.lags.last().copied().unwrap_or_default().as_secs_f64(),
            files(up.lags.len())
        );
    }
    if up.untimed > 0 {
        println!("  ({} spooled and stored within one pass: not timed)", files(up.untimed));
    }
    println!("  spool: at most {} pending at a pass", files(up.peak_pending));
    println!("  (the server was sent a reload after its start: until then its checkpointer ignores archive_timeout)");
    println!(
        "  upload passes: {}, median {:.2} s, longest {:.2} s",
        up.passes.len(),
        percentile(&up.passes, 50.0).as_secs_f64(),
        up.passes.last().copied().unwrap_or_default().as_secs_f64()
    );
    if let Some(name) = &up.unfinished {
        println!(
            "  the writer's last WAL file ({name}) was not stored within {} s of the writer's end",
            drain.as_secs()
        );
    }
    for (label, w) in [("without archiving", baseline.as_ref()), ("with archiving", Some(&with))] {
        let Some(w) = w else { continue };
        println!(
            "  writer {label}: {} rows in {:.1} s ({:.1} rows/s), commit latency median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            w.rows,
            w.took.as_secs_f64(),
            w.rate(),
            ms(percentile(&w.latencies, 50.0)),
            ms(percentile(&w.latencies, 99.0)),
            ms(w.latencies.last().copied().unwrap_or_default())
        );
    }
    Ok(())
}

fn files(n: usize) -> String {
    if n == 1 { "1 file".into() } else { format!("{n} files") }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn path(p: &Path) -> anyhow::Result<String> {
    p.to_str().map(str::to_string).with_context(|| format!("{} is not UTF-8", p.display()))
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(f64::EPSILON)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["bench-backup"]).unwrap();
        assert_eq!((a.size_gb, a.write_rate), (1.0, 200));
        assert_eq!((a.duration, a.archive_timeout), (Duration::from_secs(60), Duration::from_secs(10)));
    }

    #[test]
    fn durations_are_seconds_or_carry_their_unit() {
        assert_eq!(seconds("90"), Ok(Duration::from_secs(90)));
        assert_eq!(seconds("2m"), Ok(Duration::from_secs(120)));
        assert!(seconds("0").is_err() && seconds("soon").is_err());
        assert!(size_gb("0").is_err() && size_gb("-1").is_err());
        assert_eq!(size_gb("0.5"), Ok(0.5));
    }
}
