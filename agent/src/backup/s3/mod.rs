//! Backups in an S3-compatible object store: `s3://BUCKET/PREFIX`.
//!
//! The layout is the local directory's: `PREFIX/<id>/<object>`,
//! `PREFIX/<id>/manifest.json`, and archived WAL under `PREFIX/wal/`. A
//! backup's id is claimed by an empty marker object `PREFIX/<id>/.started`
//! (object names never start with a dot), so a backup being written is
//! listed, as incomplete, from its start; a prefix with neither the marker
//! nor a manifest is not a backup (a bucket may hold other data). Objects
//! are multipart uploads completed on commit and aborted when dropped:
//! nothing appears under a name before its commit. The manifest is one PUT,
//! which S3 makes visible whole, so a backup is complete exactly when its
//! manifest is there.
//!
//! The [`Store`] trait is synchronous and is called from async tasks and
//! from blocking threads alike. [`S3Store`] never blocks on its caller's
//! runtime: it owns a one-thread runtime, hands each request to it and waits
//! on a channel. Writes go up in parts of 8 MiB (larger past 1,000 parts),
//! one part uploading while the next fills; reads come down in batches of
//! at most 1 MiB, so memory stays bounded whatever the size of a backup.

use std::future::Future;
use std::io::{self, Read, Write};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::{Path, PathPart};
use object_store::{ClientOptions, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::manifest::MANIFEST_FILE;
use super::store::{Entry, ObjectWriter, Store, WAL_PREFIX, WalEntry, plain_id, plain_object_name};
use super::{BackupError, Result, io};

pub(crate) mod config;

use config::Settings;
pub use config::{Credentials, DEFAULT_REGION, S3Options, parse_endpoint};

/// The marker object that claims a backup id.
const STARTED_MARKER: &str = ".started";
/// The size of an uploaded part (S3 needs at least 5 MiB but for the last).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts grow by [`PART_SIZE`] every this many parts, as S3 takes at most 10,000.
const PARTS_PER_STEP: usize = 1000;
/// The most a read fetches ahead.
const READ_BATCH: usize = 1024 * 1024;
/// How long dropping an uncommitted object waits for its upload to be aborted.
const ABORT_WAIT: Duration = Duration::from_secs(30);

/// An error of `action` on the object at `url`, as an I/O error whose kind
/// says whether the object was missing, existed or was refused.
fn s3_error(action: String, url: String, credentials_from: String) -> impl FnOnce(object_store::Error) -> BackupError {
    move |e| {
        let mut text = describe(&e);
        // Listing errors carry the HTTP status only in their text (the
        // type holding it is private to object_store).
        let refused =
            matches!(e, object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. })
                || text.contains(" 403 Forbidden")
                || text.contains(" 401 Unauthorized");
        let (kind, detail) = match &e {
            _ if refused => (
                io::ErrorKind::PermissionDenied,
                format!(
                    "{text}; the server refused the credentials from {credentials_from}: check the access key id, \
                     the secret and that they may use this bucket"
                ),
            ),
            _ if text.contains("NoSuchBucket") => {
                text.push_str("; the bucket does not exist on this server: create it, or correct the destination");
                (io::ErrorKind::NotFound, text)
            }
            object_store::Error::NotFound { .. } => (io::ErrorKind::NotFound, text),
            object_store::Error::AlreadyExists { .. } => (io::ErrorKind::AlreadyExists, text),
            _ => (io::ErrorKind::Other, text),
        };
        BackupError::Io { action, path: url.into(), cause: io::Error::new(kind, detail) }
    }
}

/// `e` with the causes its message leaves out (such as why a connection failed).
fn describe(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// The S3 client and the runtime its requests run on.
#[derive(Debug)]
struct Client {
    s3: Arc<AmazonS3>,
    /// Taken when dropped: a runtime is shut down in the background, as it
    /// may be dropped inside another runtime.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Client {
    /// Start `fut` on the store's runtime; its output arrives on the receiver.
    fn spawn<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the client");
        runtime.spawn(async move {
            // The receiver is gone only when its waiter gave up.
            if tx.send(fut.await).is_err() {
                tracing::debug!("an S3 request finished after its caller stopped waiting");
            }
        });
        rx
    }

    /// Run `fut` on the store's runtime and wait for it.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> object_store::Result<T> {
        wait(&self.spawn(fut))
    }
}

/// The answer of a request started with [`Client::spawn`].
fn wait<T>(rx: &mpsc::Receiver<object_store::Result<T>>) -> object_store::Result<T> {
    rx.recv().unwrap_or_else(|_| {
        Err(object_store::Error::Generic { store: "S3", source: "the request's task ended without an answer".into() })
    })
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `s3://BUCKET/PREFIX`, as a user writes it.
fn destination(bucket: &str, prefix: &[String]) -> String {
    std::iter::once(format!("s3://{bucket}")).chain(prefix.iter().cloned()).collect::<Vec<_>>().join("/")
}

/// Backups in an S3 bucket under a prefix. See the module documentation.
#[derive(Debug)]
pub struct S3Store {
    client: Arc<Client>,
    bucket: String,
    prefix: Vec<String>,
    credentials_from: String,
}

impl S3Store {
    /// Open `s3://BUCKET/PREFIX` with `opts`, the rest from the process's
    /// environment. Nothing is sent until the store is used.
    pub fn open(dest: &str, opts: &S3Options) -> Result<S3Store> {
        S3Store::with_settings(Settings::resolve(dest, opts, &|name| std::env::var(name).ok())?)
    }

    fn with_settings(s: Settings) -> Result<S3Store> {
        crate::tls::install_crypto_provider();
        let client_options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            // A request may stream a whole backup: no overall limit, but
            // one on waiting for the server.
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(60));
        let retry = RetryConfig { max_retries: 5, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_access_key_id(&s.credentials.access_key_id)
            .with_secret_access_key(&s.credentials.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_client_options(client_options)
            .with_retry(retry);
        if let Some(token) = &s.credentials.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &s.endpoint {
            builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        let destination = destination(&s.bucket, &s.prefix);
        let s3 = builder.build().map_err(|e| BackupError::Refused {
            what: format!("destination {destination}"),
            detail: format!("the S3 client cannot be set up: {e}"),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gemin-s3")
            .enable_all()
            .build()
            .map_err(io("starting the S3 client's thread", &destination))?;
        Ok(S3Store {
            client: Arc::new(Client { s3: Arc::new(s3), runtime: Some(runtime) }),
            bucket: s.bucket,
            prefix: s.prefix,
            credentials_from: s.credentials_from,
        })
    }

    /// The key `PREFIX/parts...`.
    fn key(&self, parts: &[&str]) -> Path {
        self.prefix.iter().map(String::as_str).chain(parts.iter().copied()).map(PathPart::from).collect()
    }

    /// The prefix itself (`None` for a whole bucket).
    fn root(&self) -> Option<Path> {
        (!self.prefix.is_empty()).then(|| self.key(&[]))
    }

    fn backup_key(&self, id: &str) -> Result<Path> {
        Ok(self.key(&[plain_id(id)?]))
    }

    fn object_key(&self, id: &str, name: &str) -> Result<Path> {
        Ok(self.key(&[plain_id(id)?, plain_object_name(name)?]))
    }

    fn wal_key(&self, name: &str) -> Result<Path> {
        Ok(self.key(&[WAL_PREFIX, plain_object_name(name)?]))
    }

    fn url_of(&self, key: &Path) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn error(&self, action: &str, key: &Path) -> impl FnOnce(object_store::Error) -> BackupError + use<> {
        s3_error(action.to_string(), self.url_of(key), self.credentials_from.clone())
    }

    /// Every object under `dir/`, at any depth.
    fn list_all(&self, dir: &Path) -> Result<Vec<ObjectMeta>> {
        let (s3, key) = (self.client.s3.clone(), dir.clone());
        self.client.run(async move { s3.list(Some(&key)).try_collect().await }).map_err(self.error("listing", dir))
    }

    /// The objects directly under `dir/` (or the bucket) and the names of the prefixes there.
    fn list_dir(&self, dir: Option<Path>) -> Result<object_store::ListResult> {
        let (s3, key) = (self.client.s3.clone(), dir.clone());
        self.client
            .run(async move { s3.list_with_delimiter(key.as_ref()).await })
            .map_err(self.error("listing", &dir.unwrap_or_default()))
    }

    fn put_small(&self, key: &Path, bytes: Vec<u8>, action: &str) -> Result<()> {
        let (s3, k) = (self.client.s3.clone(), key.clone());
        self.client.run(async move { s3.put(&k, PutPayload::from(bytes)).await }).map_err(self.error(action, key))?;
        Ok(())
    }

    fn delete_key(&self, key: &Path) -> Result<()> {
        let (s3, k) = (self.client.s3.clone(), key.clone());
        match self.client.run(async move { s3.delete(&k).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("removing", key)(e)),
        }
    }

    /// A reader of `key`; `None` when there is no such object.
    fn open_reader(&self, key: &Path) -> Result<Option<Box<dyn Read + Send>>> {
        let (s3, k) = (self.client.s3.clone(), key.clone());
        match self.client.run(async move { s3.get(&k).await }) {
            Ok(got) => Ok(Some(Box::new(S3Reader {
                client: self.client.clone(),
                stream: Some(got.into_stream()),
                chunk: Vec::new(),
                pos: 0,
                url: self.url_of(key),
            }))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("reading", key)(e)),
        }
    }

    fn writer(&self, key: Path) -> Box<dyn ObjectWriter> {
        Box::new(S3Object {
            client: self.client.clone(),
            url: self.url_of(&key),
            credentials_from: self.credentials_from.clone(),
            key,
            buf: Vec::new(),
            upload: None,
            in_flight: None,
            parts: 0,
            committed: false,
        })
    }
}

impl Store for S3Store {
    fn url(&self) -> String {
        destination(&self.bucket, &self.prefix)
    }

    fn begin(&self, id: &str) -> Result<()> {
        let dir = self.backup_key(id)?;
        if !self.list_all(&dir)?.is_empty() {
            return Err(BackupError::Io {
                action: "starting a backup".into(),
                path: self.url_of(&dir).into(),
                cause: io::Error::new(io::ErrorKind::AlreadyExists, format!("backup {id} exists")),
            });
        }
        self.put_small(&self.key(&[id, STARTED_MARKER]), Vec::new(), "starting a backup")
    }

    fn put_object(&self, id: &str, name: &str) -> Result<Box<dyn ObjectWriter>> {
        Ok(self.writer(self.object_key(id, name)?))
    }

    fn get_object(&self, id: &str, name: &str) -> Result<Box<dyn Read + Send>> {
        let key = self.object_key(id, name)?;
        self.open_reader(&key)?.ok_or_else(|| BackupError::Io {
            action: "opening".into(),
            path: self.url_of(&key).into(),
            cause: io::Error::new(io::ErrorKind::NotFound, "no such object"),
        })
    }

    fn put_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        self.put_small(&self.key(&[plain_id(id)?, MANIFEST_FILE]), bytes.to_vec(), "writing the manifest")
    }

    fn get_manifest(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(&[plain_id(id)?, MANIFEST_FILE]);
        let (s3, k) = (self.client.s3.clone(), key.clone());
        match self.client.run(async move { s3.get(&k).await?.bytes().await }) {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("reading", &key)(e)),
        }
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for dir in self.list_dir(self.root())?.common_prefixes {
            let Some(id) = dir.filename().map(str::to_string) else { continue };
            if id == WAL_PREFIX || plain_id(&id).is_err() {
                continue;
            }
            let objects = self.list_all(&dir)?;
            let Some(modified) = objects.iter().map(|o| SystemTime::from(o.last_modified)).max() else { continue };
            let (manifest, marker) = (dir.clone().join(MANIFEST_FILE), dir.clone().join(STARTED_MARKER));
            let complete = objects.iter().any(|o| o.location == manifest);
            // Only what a backup wrote: other data in the bucket is never
            // listed, so never pruned either.
            if complete || objects.iter().any(|o| o.location == marker) {
                out.push(Entry { id, complete, modified });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn delete(&self, id: &str) -> Result<()> {
        let dir = self.backup_key(id)?;
        self.delete_key(&dir.clone().join(MANIFEST_FILE))?;
        for object in self.list_all(&dir)? {
            self.delete_key(&object.location)?;
        }
        Ok(())
    }

    fn put_wal(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        Ok(self.writer(self.wal_key(name)?))
    }

    fn get_wal(&self, name: &str) -> Result<Option<Box<dyn Read + Send>>> {
        self.open_reader(&self.wal_key(name)?)
    }

    fn list_wal(&self) -> Result<Vec<WalEntry>> {
        let mut out: Vec<WalEntry> = self
            .list_dir(Some(self.key(&[WAL_PREFIX])))?
            .objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.filename().filter(|n| plain_object_name(n).is_ok())?.to_string();
                Some(WalEntry { name, size: o.size, modified: SystemTime::from(o.last_modified) })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete_wal(&self, name: &str) -> Result<()> {
        self.delete_key(&self.wal_key(name)?)
    }
}

/// The size of part number `sent` (counting from 0).
fn part_size(sent: usize) -> usize {
    PART_SIZE * (1 + sent / PARTS_PER_STEP)
}

/// An object being uploaded: one PUT when it fits a part, else a multipart
/// upload started with the first full part, completed on commit and
/// aborted when dropped uncommitted.
struct S3Object {
    client: Arc<Client>,
    key: Path,
    url: String,
    credentials_from: String,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    /// The part being uploaded while the next one fills.
    in_flight: Option<mpsc::Receiver<object_store::Result<()>>>,
    parts: usize,
    committed: bool,
}

impl S3Object {
    /// Upload the buffer as the next part, after the one in flight.
    fn send_part(&mut self) -> object_store::Result<()> {
        if self.upload.is_none() {
            let (s3, key) = (self.client.s3.clone(), self.key.clone());
            self.upload = Some(self.client.run(async move { s3.put_multipart(&key).await })?);
        }
        self.wait_in_flight()?;
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(part_size(self.parts + 1)));
        let upload = self.upload.as_mut().expect("started above");
        self.in_flight = Some(self.client.spawn(upload.put_part(PutPayload::from(data))));
        self.parts += 1;
        Ok(())
    }

    fn wait_in_flight(&mut self) -> object_store::Result<()> {
        match self.in_flight.take() {
            Some(rx) => wait(&rx),
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> object_store::Result<()> {
        if self.upload.is_none() {
            let (s3, key, data) = (self.client.s3.clone(), self.key.clone(), std::mem::take(&mut self.buf));
            return self.client.run(async move { s3.put(&key, PutPayload::from(data)).await }).map(drop);
        }
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        self.wait_in_flight()?;
        let mut upload = self.upload.take().expect("started with the first part");
        let answer = self.client.spawn(async move {
            let result = upload.complete().await;
            (upload, result)
        });
        match answer.recv() {
            Ok((_, Ok(_))) => Ok(()),
            // Kept, so that dropping the object aborts the upload.
            Ok((upload, Err(e))) => {
                self.upload = Some(upload);
                Err(e)
            }
            Err(_) => Err(object_store::Error::Generic {
                store: "S3",
                source: "completing the upload: the request's task ended without an answer".into(),
            }),
        }
    }
}

impl Write for S3Object {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = part_size(self.parts) - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= part_size(self.parts) {
            let part = self.parts + 1;
            self.send_part().map_err(|e| io::Error::other(format!("uploading part {part} of {}: {e}", self.url)))?;
        }
        Ok(n)
    }

    /// Data goes up a part at a time; the rest on commit.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Object {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.finish().map_err(s3_error("writing".into(), self.url.clone(), self.credentials_from.clone()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for S3Object {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // The part in flight first, so that it does not land after the abort.
        if let Err(e) = self.wait_in_flight() {
            tracing::debug!(object = %self.url, error = %e, "a part of an abandoned upload failed");
        }
        let Some(mut upload) = self.upload.take() else { return };
        let answer = self.client.spawn(async move { upload.abort().await });
        match answer.recv_timeout(ABORT_WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(object = %self.url, error = %e, "could not abort an abandoned upload; its parts stay in the bucket until a lifecycle rule removes them")
            }
            Err(_) => {
                tracing::warn!(object = %self.url, "no answer to aborting an abandoned upload; its parts may stay in the bucket")
            }
        }
    }
}

/// A blocking reader of a streamed object.
struct S3Reader {
    client: Arc<Client>,
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    chunk: Vec<u8>,
    pos: usize,
    url: String,
}

/// Up to [`READ_BATCH`] bytes from `stream`; the stream back unless it ended.
async fn next_batch(
    mut stream: BoxStream<'static, object_store::Result<Bytes>>,
) -> (Option<BoxStream<'static, object_store::Result<Bytes>>>, object_store::Result<Vec<u8>>) {
    let mut batch = Vec::new();
    while batch.len() < READ_BATCH {
        match stream.next().await {
            Some(Ok(bytes)) => batch.extend_from_slice(&bytes),
            Some(Err(e)) => return (None, Err(e)),
            None => return (None, Ok(batch)),
        }
    }
    (Some(stream), Ok(batch))
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            let Some(stream) = self.stream.take() else { return Ok(0) };
            let (stream, batch) = self
                .client
                .spawn(next_batch(stream))
                .recv()
                .map_err(|_| io::Error::other(format!("reading {}: the request's task ended", self.url)))?;
            self.stream = stream;
            self.chunk = batch.map_err(|e| io::Error::other(format!("reading {}: {e}", self.url)))?;
            self.pos = 0;
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_that_ten_thousand_hold_a_large_backup() {
        assert_eq!((part_size(0), part_size(999), part_size(1000)), (PART_SIZE, PART_SIZE, 2 * PART_SIZE));
        let total: u64 = (0..10_000).map(|n| part_size(n) as u64).sum();
        assert!(total > 400 << 30, "{total}");
    }
}
