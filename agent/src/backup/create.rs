//! Taking a full backup: `pg_basebackup -D - -Ft -X fetch` streamed into
//! the store as one object, with PostgreSQL's own `backup_manifest` and the
//! WAL range read from the stream on the way.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::crypto::Keys;
use super::manifest::{Compression, MANIFEST_VERSION, Manifest, Object, PostgresInfo, TAR};
use super::store::Store;
use super::stream::{Counting, ObjectSink, Phase, Progress};
use super::{BackupError, Result};
use crate::cmd::Tool;

/// The one object of a full backup, before its suffixes.
pub const BASE_OBJECT: &str = "base.tar";

/// How to reach the PostgreSQL server to back up.
#[derive(Debug, Clone)]
pub struct Source {
    /// Directory of `pg_basebackup`.
    pub bin_dir: PathBuf,
    /// Unix socket directory (starts with `/`) or host name.
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// What a backup records about where it came from.
#[derive(Debug, Clone)]
pub struct Labels {
    pub cluster: String,
    pub node: String,
    /// The node bundle ([`super::node::render`]), stored with the backup
    /// when the node's cloud-config was read.
    pub node_config: Option<String>,
}

/// What [`create`] did.
#[derive(Debug, Clone)]
pub struct Created {
    pub manifest: Manifest,
    pub elapsed: Duration,
}

/// The parts of PostgreSQL's `backup_manifest` a backup records.
#[derive(Debug, Deserialize)]
struct PgManifest {
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<WalRange>,
}

#[derive(Debug, Deserialize)]
struct WalRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start_lsn: String,
    #[serde(rename = "End-LSN")]
    end_lsn: String,
}

/// Timeline and LSN range from PostgreSQL's `backup_manifest`.
fn wal_range(pg_manifest: &[u8]) -> std::result::Result<(u32, String, String), String> {
    let m: PgManifest = serde_json::from_slice(pg_manifest)
        .map_err(|e| format!("PostgreSQL's backup_manifest is not readable: {e}"))?;
    let (Some(first), Some(last)) = (m.wal_ranges.first(), m.wal_ranges.last()) else {
        return Err("PostgreSQL's backup_manifest lists no WAL range".into());
    };
    Ok((last.timeline, first.start_lsn.clone(), last.end_lsn.clone()))
}

/// Copies everything read from `inner` into `tap`.
struct Tee<R, W> {
    inner: R,
    tap: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tap.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Server facts read over SQL before the backup.
struct ServerFacts {
    major: u32,
    server_version: String,
    system_identifier: String,
    /// The databases' size: about what pg_basebackup will send (for the
    /// progress display only; `None` when it could not be read).
    size: Option<u64>,
}

impl Source {
    /// What the errors call this server.
    pub fn describe(&self) -> String {
        format!("PostgreSQL at {} port {} as {}", self.host, self.port, self.user)
    }

    /// A connection to the `postgres` database, and the task that drives it
    /// (abort it when done).
    pub async fn connect(&self) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname("postgres")
            .application_name("gemin_k8s backup")
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = std::env::var_os("PGPASSWORD") {
            config.password(password.to_string_lossy().as_bytes());
        }
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| BackupError::Postgres {
            what: format!("connecting to {}", self.describe()),
            detail: format!("{e}; is PostgreSQL running on this node? (--pg-host/--pg-port name another server)"),
        })?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "the backup's PostgreSQL connection ended");
            }
        });
        Ok((client, driver))
    }
}

async fn server_facts(source: &Source) -> Result<ServerFacts> {
    let target = source.describe();
    let (client, driver) = source.connect().await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
             system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| BackupError::Postgres {
            what: format!("reading the server's version on {target}"),
            detail: e.to_string(),
        })?;
    // Only the progress display uses it: a role that may not read every
    // database's size still backs up.
    let size = match client.query_one("SELECT sum(pg_database_size(datname))::bigint FROM pg_database", &[]).await {
        Ok(row) => row.get::<_, Option<i64>>(0).map(|n| n.max(0) as u64),
        Err(e) => {
            tracing::debug!(error = %e, "reading the databases' size for the progress display");
            None
        }
    };
    drop(client);
    driver.abort();
    let num: i32 = row.get(0);
    Ok(ServerFacts { major: (num / 10000) as u32, server_version: row.get(1), system_identifier: row.get(2), size })
}

/// Take a full backup of `source` into `store`: returns its manifest.
/// Nothing is listed as a backup unless every step succeeded (the manifest
/// is written last). The bytes read from pg_basebackup go to `progress`.
pub async fn create(
    source: &Source,
    store: std::sync::Arc<dyn Store>,
    labels: &Labels,
    compression: Compression,
    keys: std::sync::Arc<Keys>,
    progress: std::sync::Arc<dyn Progress>,
) -> Result<Created> {
    let started = Instant::now();
    let facts = server_facts(source).await?;
    // Ids are UTC seconds; a second backup within the same second waits.
    let (id, start_time) = loop {
        let id = super::backup_id(time::OffsetDateTime::now_utc());
        match store.begin(&id) {
            Ok(()) => break (id, super::now_rfc3339()),
            Err(BackupError::Io { cause, .. }) if cause.kind() == io::ErrorKind::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // The manifest's description of the keys: public keys only.
    let encryption = keys.describe();
    let object_name = format!("{BASE_OBJECT}{}{}", compression.suffix(), encryption.kind.suffix());
    tracing::info!(event = "backup_started", backup = %id, destination = %store.url(), "taking a full backup");

    let tool = Tool::new(source.bin_dir.join("pg_basebackup"))
        .args(["-D", "-", "-F", "tar", "-X", "fetch", "-c", "fast", "-w"])
        .arg("-h")
        .arg(&source.host)
        .arg("-p")
        .arg(source.port.to_string())
        .arg("-U")
        .arg(&source.user)
        .arg("-l")
        .arg(format!("gemin_k8s backup {id}"))
        .current_dir("/");
    let (store2, id2, name2, size, keys2) = (store.clone(), id.clone(), object_name.clone(), facts.size, keys.clone());
    let streamed = tokio::task::spawn_blocking(move || {
        let sink = Sink { store: store2.as_ref(), id: &id2, name: &name2, compression, keys: &keys2 };
        stream_backup(&tool, sink, size, progress.as_ref())
    })
    .await
    .map_err(|e| BackupError::Postgres { what: "the backup task".into(), detail: e.to_string() })?;
    // Nothing of a failed backup stays behind (it has no manifest yet).
    let abandon = |e: BackupError| {
        if let Err(cleanup) = store.delete(&id) {
            tracing::warn!(backup = %id, error = %cleanup, "could not remove the failed backup's partial files");
        }
        e
    };
    let (written, pg_manifest) = streamed.map_err(abandon)?;
    let mut objects = vec![Object {
        name: object_name,
        size: written.size,
        sha256: written.sha256,
        content: TAR.into(),
        content_size: written.content_size,
        content_sha256: written.content_sha256,
    }];
    if let Some(text) = &labels.node_config {
        objects.push(super::node::store(store.as_ref(), &id, text, compression, &keys).map_err(abandon)?);
    }
    let (timeline, start_lsn, stop_lsn) =
        wal_range(&pg_manifest).map_err(|detail| BackupError::Postgres { what: format!("backup {id}"), detail })?;
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        id: id.clone(),
        kind: "full".into(),
        cluster: labels.cluster.clone(),
        node: labels.node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        postgres: PostgresInfo {
            major: facts.major,
            server_version: facts.server_version,
            system_identifier: facts.system_identifier,
            timeline,
            start_lsn,
            stop_lsn,
        },
        start_time,
        stop_time: super::now_rfc3339(),
        compression,
        encryption,
        objects,
        verified: None,
    };
    store.put_manifest(&id, &manifest.to_json())?;
    let elapsed = started.elapsed();
    tracing::info!(
        event = "backup_done", backup = %id, size = manifest.stored_size(), ms = elapsed.as_millis() as u64,
        "full backup complete"
    );
    Ok(Created { manifest, elapsed })
}

/// Where [`stream_backup`] writes: object `name` of backup `id`.
struct Sink<'a> {
    store: &'a dyn Store,
    id: &'a str,
    name: &'a str,
    compression: Compression,
    keys: &'a Keys,
}

/// Run pg_basebackup and stream its tar into the store, telling `progress`
/// the bytes read (of about `size`). Returns the object's sizes and
/// checksums and PostgreSQL's `backup_manifest` (read from the stream).
fn stream_backup(
    tool: &Tool,
    to: Sink<'_>,
    size: Option<u64>,
    progress: &dyn Progress,
) -> Result<(super::stream::Written, Vec<u8>)> {
    let Sink { store, id, name, compression, keys } = to;
    let action = format!("taking a base backup with `{}`", tool.display());
    let (child, stdout) =
        tool.spawn_streaming().map_err(|source| BackupError::Tool { action: action.clone(), cause: source })?;
    let mut sink = match store.put_object(id, name).and_then(|o| ObjectSink::new(o, name, compression, keys)) {
        Ok(s) => s,
        Err(e) => {
            child.kill();
            return Err(e);
        }
    };
    let reading = progress.phase(Phase::Reading, size);
    let read = read_tar(Tee { inner: Counting::new(stdout, |n| reading.advance(n)), tap: &mut sink });
    drop(reading);
    let pg_manifest = match read {
        Ok(m) => m,
        Err(e) => {
            // The tool's own error explains a short stream best.
            child.kill();
            return Err(BackupError::Io {
                action: format!("{action}: reading its output and writing backup {id}"),
                path: name.into(),
                cause: e,
            });
        }
    };
    child.wait().map_err(|source| BackupError::Tool { action, cause: source })?;
    let (object, written) =
        sink.finish().map_err(super::io(format!("finishing object {name} of backup {id}"), name))?;
    object.commit()?;
    let pg_manifest = pg_manifest.ok_or_else(|| BackupError::Postgres {
        what: format!("backup {id}"),
        detail: "pg_basebackup's output holds no backup_manifest; the server must be PostgreSQL 13 or newer".into(),
    })?;
    Ok((written, pg_manifest))
}

/// Read a tar stream to its end, returning the `backup_manifest` it holds.
fn read_tar(input: impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut archive = tar::Archive::new(input);
    let mut manifest = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == "backup_manifest" {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            manifest = Some(bytes);
        }
    }
    // The end-of-archive blocks and any padding go into the backup too.
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_range_comes_from_postgres_backup_manifest() {
        let text = br#"{ "PostgreSQL-Backup-Manifest-Version": 1,
            "Files": [],
            "WAL-Ranges": [ { "Timeline": 2, "Start-LSN": "0/3000028", "End-LSN": "0/3000100" } ],
            "Manifest-Checksum": "00" }"#;
        assert_eq!(wal_range(text).unwrap(), (2, "0/3000028".to_string(), "0/3000100".to_string()));
        assert!(wal_range(b"{\"WAL-Ranges\": []}").unwrap_err().contains("no WAL range"));
    }

    #[test]
    fn the_tar_is_read_to_its_end_and_its_manifest_kept() {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in [("PG_VERSION", &b"15\n"[..]), ("backup_manifest", &b"{\"x\":1}"[..])] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let mut copy = Vec::new();
        let manifest = read_tar(Tee { inner: &bytes[..], tap: &mut copy }).unwrap();
        assert_eq!(manifest.as_deref(), Some(&b"{\"x\":1}"[..]));
        assert!(copy == bytes, "every byte of the stream, end blocks included, is kept");
    }
}
