//! Continuous WAL archiving under steady writes: PostgreSQL's
//! `archive_command` (`gemin_k8s backup wal-spool`) spools each finished WAL
//! file while a writer inserts Kine rows at a steady rate, and an uploader
//! does what the agent does every few seconds (`backup::wal::upload`,
//! compressed and encrypted into a directory). For each stored file, the
//! lag from PostgreSQL finishing it (the spooled file's mtime) to its
//! stored object being written (that object's mtime).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use geminik8s::backup::crypto::Keys;
use geminik8s::backup::manifest::Compression;
use geminik8s::backup::s3::S3Options;
use geminik8s::backup::wal::{self, Role};
use geminik8s::backup::{Store, store};
use geminik8s::daemon::archiver::INTERVAL;
use tokio::sync::watch;

use crate::data::{INSERT_ONE, row};
use crate::lab::Node;

/// Connections the writer spreads its rows over, so that one slow commit
/// does not hold the next ones back.
const WRITERS: u64 = 4;
/// About the size of each row the writer inserts.
pub const ROW_BYTES: usize = 1024;

/// What a writer did.
pub struct Writes {
    pub rows: u64,
    pub value_bytes: u64,
    pub took: Duration,
    /// Each insert's commit latency, sorted.
    pub latencies: Vec<Duration>,
}

impl Writes {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.took.as_secs_f64().max(f64::EPSILON)
    }
}

/// Insert rows of about [`ROW_BYTES`] at `rate` per second for `duration`,
/// each its own transaction as Kine's writes are; row `i` is due at
/// `i / rate` seconds (a writer that falls behind catches up). Keys start
/// at sequence number `first`.
pub async fn write_steadily(node: &Node, rate: u32, duration: Duration, first: u64) -> anyhow::Result<Writes> {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let mut sessions = Vec::new();
    for _ in 0..WRITERS {
        sessions.push(node.connect("kine").await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for (w, db) in (0..WRITERS).zip(sessions) {
        tasks.spawn(async move {
            let (mut latencies, mut bytes) = (Vec::new(), 0u64);
            for i in (w..total).step_by(WRITERS as usize) {
                let (key, value) = row(first + i, ROW_BYTES);
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / f64::from(rate))).await;
                let sent = Instant::now();
                db.execute("writing a Kine row", INSERT_ONE, &[&key, &value]).await?;
                latencies.push(sent.elapsed());
                bytes += value.len() as u64;
            }
            Ok::<_, anyhow::Error>((latencies, bytes))
        });
    }
    let mut writes = Writes { rows: 0, value_bytes: 0, took: Duration::ZERO, latencies: Vec::new() };
    while let Some(done) = tasks.join_next().await {
        let (latencies, bytes) = done.context("a writer task")??;
        writes.rows += latencies.len() as u64;
        writes.value_bytes += bytes;
        writes.latencies.extend(latencies);
    }
    writes.took = start.elapsed();
    writes.latencies.sort();
    Ok(writes)
}

/// What the uploader saw.
#[derive(Default)]
pub struct Uploads {
    /// Per stored file: its lag, sorted.
    pub lags: Vec<Duration>,
    /// Files stored whose spooling was not seen (spooled and stored within one pass).
    pub untimed: usize,
    /// WAL bytes stored, before compression, and as stored.
    pub wal_bytes: u64,
    pub stored_bytes: u64,
    /// The most files the spool held at the start of a pass.
    pub peak_pending: usize,
    /// Each pass's duration, sorted.
    pub passes: Vec<Duration>,
    /// Set when the writer's last WAL file was not stored by the deadline.
    pub unfinished: Option<String>,
}

/// Upload every [`INTERVAL`], as the agent does, until the WAL file named
/// on `last` (the writer's last, sent when it is done) is stored, or
/// `drain` after that name arrived.
pub async fn upload(
    spool: PathBuf,
    dest: PathBuf,
    keys: Arc<Keys>,
    last: watch::Receiver<Option<String>>,
    drain: Duration,
) -> anyhow::Result<Uploads> {
    let url = dest.to_str().context("the destination's path is not UTF-8")?.to_string();
    let store: Arc<dyn Store> = Arc::from(store::open(&url, &S3Options::default())?);
    let mut out = Uploads::default();
    let mut finished: HashMap<String, SystemTime> = HashMap::new();
    let mut newest_stored = String::new();
    let mut drain_until = None;
    loop {
        let spooled = wal::spooled(&spool)?;
        out.peak_pending = out.peak_pending.max(spooled.len());
        for (name, _, modified) in spooled {
            finished.entry(name).or_insert(modified);
        }
        let started = Instant::now();
        let (s, st, k) = (spool.clone(), store.clone(), keys.clone());
        let done = tokio::task::spawn_blocking(move || {
            wal::upload(&s, st.as_ref(), &k, Compression::Zstd { level: 3 }, Role::Archive)
        })
        .await??;
        out.passes.push(started.elapsed());
        out.wal_bytes += done.bytes;
        for name in &done.files {
            let stored = stored_path(&dest, name);
            let meta = std::fs::metadata(&stored).with_context(|| format!("reading {}", stored.display()))?;
            out.stored_bytes += meta.len();
            match finished.get(name) {
                Some(at) => out.lags.push(meta.modified()?.duration_since(*at).unwrap_or_default()),
                None => out.untimed += 1,
            }
            newest_stored = newest_stored.max(name.clone());
        }
        if let Some(last) = last.borrow().clone() {
            if newest_stored >= last {
                break;
            }
            let until = *drain_until.get_or_insert_with(|| Instant::now() + drain);
            if Instant::now() >= until {
                out.unfinished = Some(last);
                break;
            }
        }
        // The agent's cadence: the next pass INTERVAL after this one ended.
        tokio::time::sleep(INTERVAL).await;
    }
    out.lags.sort();
    out.passes.sort();
    Ok(out)
}

/// Where the local store keeps archived WAL file `name` (compressed, encrypted).
fn stored_path(dest: &Path, name: &str) -> PathBuf {
    dest.join("wal").join(format!("{name}.zst.age"))
}

/// The WAL file holding everything written so far.
pub async fn current_wal_file(node: &Node) -> anyhow::Result<String> {
    let db = node.connect("postgres").await?;
    let row = db.query_one("naming the current WAL file", "SELECT pg_walfile_name(pg_current_wal_lsn())", &[]).await?;
    let name: String = row.get(0);
    if wal::WalName::parse(&name).is_none() {
        bail!("PostgreSQL named the current WAL file {name:?}");
    }
    Ok(name)
}
