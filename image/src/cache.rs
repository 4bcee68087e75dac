//! The download cache: files kept by their sha256, verified on the way in.
//!
//! Layout under the cache directory:
//! - `blobs/sha256/<hex>`: verified downloads (artifacts, OCI blobs);
//! - `partial/<hex>.part`: a download in progress, resumed with an HTTP
//!   range request after a cut;
//! - `bases/<key>.tar`: base root filesystems, keyed by a hash of their inputs.
//!
//! A digest already in `blobs/` is never downloaded again, so a build whose
//! inputs are all cached needs no network.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::progress::{Event, Progress};

/// How many times a cut download is resumed before giving up.
const ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "checksum mismatch for {name} from {url}:\n  expected sha256:{expected}\n  got      sha256:{actual}\nthe download was discarded; check the URL and the sha256 in the spec"
    )]
    ChecksumMismatch { name: String, url: String, expected: String, actual: String },
    #[error("downloading {name} from {url} failed after {attempts} attempts: {message}")]
    Http { name: String, url: String, attempts: u32, message: String },
    #[error("downloading {name} from {url}: the server answered {status}")]
    Status { name: String, url: String, status: reqwest::StatusCode },
    #[error("{name} (sha256:{sha256}) is not in the cache at {cache} and the build is offline")]
    Offline { name: String, sha256: String, cache: PathBuf },
    #[error("cache I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.to_path_buf(), source }
}

/// sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One file to fetch into the cache.
#[derive(Debug, Clone)]
pub struct Request {
    /// Shown in progress and errors.
    pub name: String,
    pub url: String,
    pub sha256: String,
    /// `Authorization` header value (OCI registries).
    pub authorization: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    client: reqwest::Client,
    offline: bool,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> anyhow::Result<Cache> {
        geminik8s::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("gemin-image/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Cache { root: root.into(), client, offline: false })
    }

    /// Refuse every download: only cached digests can be used.
    pub fn offline(mut self, offline: bool) -> Cache {
        self.offline = offline;
        self
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256)
    }

    pub fn bases_dir(&self) -> PathBuf {
        self.root.join("bases")
    }

    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_file()
    }

    /// Move a verified file into the cache under its digest.
    pub fn insert_file(&self, src: &Path, sha256: &str) -> Result<PathBuf, FetchError> {
        let dest = self.blob_path(sha256);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::rename(src, &dest).map_err(io_err(&dest))?;
        Ok(dest)
    }

    /// Store bytes (small OCI manifests and configs) under their digest.
    pub fn insert_bytes(&self, bytes: &[u8]) -> Result<(String, PathBuf), FetchError> {
        let sha256 = sha256_bytes(bytes);
        let dest = self.blob_path(&sha256);
        if !dest.is_file() {
            let dir = dest.parent().expect("blob paths have a parent");
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            geminik8s::fsutil::write_atomic(&dest, bytes, 0o644)
                .map_err(|e| FetchError::Io { path: dest.clone(), source: io::Error::other(format!("{e:#}")) })?;
        }
        Ok((sha256, dest))
    }

    /// The cached file for `req.sha256`, downloading it first when missing.
    /// A cut download is resumed from where it stopped; a file whose digest
    /// does not match is discarded and refused.
    pub async fn fetch(&self, req: &Request, progress: &Progress) -> Result<PathBuf, FetchError> {
        let dest = self.blob_path(&req.sha256);
        if dest.is_file() {
            let bytes = fs::metadata(&dest).map_err(io_err(&dest))?.len();
            let event =
                Event::DownloadFinished { name: req.name.clone(), sha256: req.sha256.clone(), bytes, cached: true };
            progress.emit(event);
            return Ok(dest);
        }
        if self.offline {
            return Err(FetchError::Offline {
                name: req.name.clone(),
                sha256: req.sha256.clone(),
                cache: self.root.clone(),
            });
        }
        let partial_dir = self.root.join("partial");
        fs::create_dir_all(&partial_dir).map_err(io_err(&partial_dir))?;
        let part = partial_dir.join(format!("{}.part", req.sha256));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.download_once(req, &part, progress).await {
                Ok(()) => break,
                Err(DownloadError::Fatal(e)) => return Err(e),
                Err(DownloadError::Retry(message)) if attempt >= ATTEMPTS => {
                    return Err(FetchError::Http {
                        name: req.name.clone(),
                        url: req.url.clone(),
                        attempts: attempt,
                        message,
                    });
                }
                Err(DownloadError::Retry(e)) => {
                    let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    progress.emit(Event::Warning {
                        message: format!("download of {} cut after {have} bytes ({e}); resuming", req.name),
                    });
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
        let actual = sha256_file(&part).map_err(io_err(&part))?;
        if actual != req.sha256 {
            fs::remove_file(&part).map_err(io_err(&part))?;
            return Err(FetchError::ChecksumMismatch {
                name: req.name.clone(),
                url: req.url.clone(),
                expected: req.sha256.clone(),
                actual,
            });
        }
        let bytes = fs::metadata(&part).map_err(io_err(&part))?.len();
        let path = self.insert_file(&part, &req.sha256)?;
        progress.emit(Event::DownloadFinished { name: req.name.clone(), sha256: actual, bytes, cached: false });
        Ok(path)
    }

    async fn download_once(&self, req: &Request, part: &Path, progress: &Progress) -> Result<(), DownloadError> {
        let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        let mut builder = self.client.get(&req.url);
        if let Some(auth) = &req.authorization {
            builder = builder.header(reqwest::header::AUTHORIZATION, auth);
        }
        if have > 0 {
            builder = builder.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut response = builder.send().await.map_err(|e| DownloadError::Retry(error_chain(&e)))?;
        let status = response.status();
        let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT && range_start(&response) == Some(have);
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            // The part is complete or longer than the file: start over.
            fs::remove_file(part).map_err(|e| DownloadError::Fatal(io_err(part)(e)))?;
            return Err(DownloadError::Retry(format!("the server refused to resume at byte {have}; starting over")));
        }
        if !status.is_success() {
            return Err(if status.is_server_error() {
                DownloadError::Retry(format!("the server answered {status}"))
            } else {
                DownloadError::Fatal(FetchError::Status { name: req.name.clone(), url: req.url.clone(), status })
            });
        }
        let total = response.content_length().map(|len| if resumed { len + have } else { len });
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(part)
            .map_err(|e| DownloadError::Fatal(io_err(part)(e)))?;
        let mut bar = progress.download(&req.name, &req.url, total, if resumed { have } else { 0 });
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    file.write_all(&chunk).map_err(|e| DownloadError::Fatal(io_err(part)(e)))?;
                    bar.advance(chunk.len() as u64);
                }
                Ok(None) => break,
                Err(e) => {
                    file.sync_all().map_err(|e| DownloadError::Fatal(io_err(part)(e)))?;
                    return Err(DownloadError::Retry(error_chain(&e)));
                }
            }
        }
        file.sync_all().map_err(|e| DownloadError::Fatal(io_err(part)(e)))?;
        Ok(())
    }
}

enum DownloadError {
    /// Worth another attempt, resuming from what was written.
    Retry(String),
    Fatal(FetchError),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` answer.
fn range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.split('-').next()?.parse().ok()
}

/// The sha256 of a local artifact; when `expected` is given, a different
/// digest is refused with both printed.
pub fn hash_local(name: &str, path: &Path, expected: Option<&str>) -> Result<String, FetchError> {
    let actual = sha256_file(path).map_err(io_err(path))?;
    match expected {
        Some(expected) if expected != actual => Err(FetchError::ChecksumMismatch {
            name: name.to_string(),
            url: path.display().to_string(),
            expected: expected.to_string(),
            actual,
        }),
        _ => Ok(actual),
    }
}
