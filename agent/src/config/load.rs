//! Finding and merging cloud-config sources.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::diag::{Diagnostic, Diagnostics, Severity};
use super::types::GeminiConfig;
use super::validate::{CheckContext, validate};
use super::yaml::{self, Node};

pub const HEADER: &str = "#cloud-config";
/// Kernel command-line parameter naming a cloud-config URL.
pub const CMDLINE_KEY: &str = "geminik8s.config_url=";
/// Where the image's initramfs mounts a NoCloud `CIDATA` (or `cidata`)
/// volume, read-only, relative to the root.
pub const CIDATA_MOUNT: &str = "run/geminik8s-boot/cidata";

/// One cloud-config text and where it came from (a path or a URL).
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Where the agent looks for cloud-config. Every path is a parameter so
/// tests can point at temporary directories.
#[derive(Debug, Clone)]
pub struct SourcePaths {
    pub oem_dir: PathBuf,
    /// Where an enrolled node keeps the configuration `gemin_k8s deploy`
    /// sent it ([`ENROLLED_DIR`]): persistent, read after `/oem`.
    pub enrolled_dir: PathBuf,
    pub etc_dir: PathBuf,
    /// Mount point of a NoCloud `CIDATA` volume, when one is mounted.
    pub cidata_dir: Option<PathBuf>,
    /// `/proc/cmdline`, or a file with the same format.
    pub cmdline: Option<PathBuf>,
    pub fetch_timeout: Duration,
    pub fetch_attempts: u32,
    /// The last cloud-config fetched from the kernel command line's URL,
    /// used when the URL cannot be reached (a node must start, and release
    /// its VIP, without the network).
    pub url_cache: Option<PathBuf>,
}

/// Where an enrolled node's configuration is written (the image's `/oem`
/// is read-only and its `/etc` forgets at reboot; the state directory
/// persists).
pub const ENROLLED_DIR: &str = "/var/lib/geminik8s/cloud-config";

/// Where the copy of the URL's cloud-config is kept, below the root.
pub const URL_CACHE: &str = "var/lib/geminik8s/config-url.yaml";

impl SourcePaths {
    /// The locations on a node.
    pub fn system() -> Self {
        Self::under(Path::new("/"))
    }

    /// The node locations below `root`. The CIDATA volume is used when the
    /// initramfs mounted one at [`CIDATA_MOUNT`].
    pub fn under(root: &Path) -> Self {
        let cidata = root.join(CIDATA_MOUNT);
        SourcePaths {
            oem_dir: root.join("oem"),
            enrolled_dir: root.join(ENROLLED_DIR.trim_start_matches('/')),
            etc_dir: root.join("etc/geminik8s"),
            cidata_dir: cidata.is_dir().then_some(cidata),
            cmdline: Some(root.join("proc/cmdline")),
            fetch_timeout: Duration::from_secs(10),
            fetch_attempts: 3,
            url_cache: Some(root.join(URL_CACHE)),
        }
    }
}

/// A merged, validated configuration.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub gemini: GeminiConfig,
    /// The whole merged document, Kairos keys included.
    pub document: Value,
    /// Source names in merge order.
    pub sources: Vec<String>,
    pub warnings: Vec<Diagnostic>,
}

impl Loaded {
    /// The Kairos `hostname:`, if set.
    pub fn hostname(&self) -> Option<&str> {
        self.document.get("hostname").and_then(Value::as_str)
    }
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading directory {}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("reading directory {}", dir.display()))?.path();
        let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> anyhow::Result<Source> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading cloud-config {}", path.display()))?;
    Ok(Source { name: path.display().to_string(), text })
}

fn has_header(text: &str) -> bool {
    text.lines().next().is_some_and(|l| l.trim_end() == HEADER)
}

/// The `geminik8s.config_url=` value from a kernel command line.
pub fn cmdline_url(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|arg| arg.strip_prefix(CMDLINE_KEY)).map(str::to_string)
}

/// Fetch a text over HTTP(S) with a timeout and retries (a cloud-config, or
/// the SSH keys of a `github:USER` entry).
pub async fn fetch(url: &str, timeout: Duration, attempts: u32) -> anyhow::Result<String> {
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder().timeout(timeout).build().context("building the HTTP client")?;
    let mut last = None;
    for attempt in 1..=attempts.max(1) {
        let result = async {
            let response = client.get(url).send().await?.error_for_status()?;
            response.text().await
        }
        .await;
        match result {
            Ok(text) => return Ok(text),
            Err(e) => {
                tracing::warn!(url, attempt, error = %e, "fetch failed");
                last = Some(e);
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
            }
        }
    }
    let e = last.expect("at least one attempt ran");
    Err(anyhow::Error::new(e)).with_context(|| format!("fetching {url} ({attempts} attempts)"))
}

/// Collect the sources in merge order. Files in the two directories without
/// the `#cloud-config` header are skipped with a warning (Kairos keeps other
/// YAML there); the CIDATA `user-data` and the URL must have it.
pub async fn gather(paths: &SourcePaths) -> anyhow::Result<(Vec<Source>, Vec<Diagnostic>)> {
    let mut sources = Vec::new();
    let mut warnings = Vec::new();
    for dir in [&paths.oem_dir, &paths.enrolled_dir, &paths.etc_dir] {
        for file in yaml_files(dir)? {
            let source = read(&file)?;
            if has_header(&source.text) {
                sources.push(source);
            } else {
                warnings.push(Diagnostic {
                    severity: Severity::Warning,
                    source: source.name,
                    line: 1,
                    col: 1,
                    key: String::new(),
                    message: format!("skipped: the first line is not `{HEADER}`"),
                    hint: Some(format!("add `{HEADER}` as the first line if this file is meant for geminik8s")),
                });
            }
        }
    }
    if let Some(dir) = &paths.cidata_dir {
        let user_data = dir.join("user-data");
        if user_data.is_file() {
            sources.push(read(&user_data)?);
        }
    }
    if let Some(cmdline) = &paths.cmdline
        && let Ok(text) = std::fs::read_to_string(cmdline)
        && let Some(url) = cmdline_url(&text)
    {
        let fetched = fetch(&url, paths.fetch_timeout, paths.fetch_attempts)
            .await
            .with_context(|| format!("reading the cloud-config named by `{CMDLINE_KEY}` on the kernel command line"));
        let text = match (fetched, &paths.url_cache) {
            (Ok(text), cache) => {
                if let Some(cache) = cache {
                    // It holds the node's secrets: private to root.
                    let saved = cache
                        .parent()
                        .map_or(Ok(()), std::fs::create_dir_all)
                        .map_err(anyhow::Error::from)
                        .and_then(|()| crate::fsutil::write_atomic(cache, text.as_bytes(), 0o600));
                    if let Err(e) = saved {
                        tracing::warn!(cache = %cache.display(), error = %format!("{e:#}"), "could not keep a copy of the fetched cloud-config");
                    }
                }
                text
            }
            (Err(e), Some(cache)) if cache.is_file() => {
                tracing::warn!(url, cache = %cache.display(), error = %format!("{e:#}"),
                    "the cloud-config URL cannot be reached: using the copy fetched last time");
                std::fs::read_to_string(cache).with_context(|| format!("reading {}", cache.display()))?
            }
            (Err(e), _) => return Err(e),
        };
        sources.push(Source { name: url, text });
    }
    Ok((sources, warnings))
}

/// Parse and merge (later wins) `sources`; a source without the header or
/// that does not parse is an error finding.
fn parse_and_merge(sources: &[Source]) -> (Option<Node>, Vec<Diagnostic>) {
    let mut findings = Vec::new();
    let mut merged: Option<Node> = None;
    for (index, source) in sources.iter().enumerate() {
        if !has_header(&source.text) {
            findings.push(Diagnostic {
                severity: Severity::Error,
                source: source.name.clone(),
                line: 1,
                col: 1,
                key: String::new(),
                message: format!("the first line is not `{HEADER}`"),
                hint: Some(format!(
                    "cloud-config files start with the line `{HEADER}` (Kairos ignores them otherwise)"
                )),
            });
            continue;
        }
        match yaml::parse(&source.text, index) {
            Ok(node) => match &mut merged {
                None => merged = Some(node),
                Some(m) => m.merge(node),
            },
            Err(e) => findings.push(Diagnostic {
                severity: Severity::Error,
                source: source.name.clone(),
                line: e.line,
                col: e.col,
                key: String::new(),
                message: format!("invalid YAML: {}", e.message),
                hint: Some("check indentation (spaces, not tabs) and quoting around this line".into()),
            }),
        }
    }
    (merged, findings)
}

/// Parse, merge (later wins) and validate `sources`. Every source must carry
/// the `#cloud-config` header.
pub fn load_sources(sources: &[Source], ctx: &CheckContext) -> Result<Loaded, Diagnostics> {
    let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
    let (merged, mut findings) = parse_and_merge(sources);
    if sources.is_empty() {
        findings.push(Diagnostic {
            severity: Severity::Error,
            source: "(no sources)".into(),
            line: 0,
            col: 0,
            key: String::new(),
            message: "no cloud-config found".into(),
            hint: Some("put a file in /oem or /etc/geminik8s, attach a CIDATA volume, or pass geminik8s.config_url= on the kernel command line".into()),
        });
    }
    if findings.iter().any(Diagnostic::is_error) {
        return Err(Diagnostics(findings));
    }
    let merged = merged.expect("at least one source parsed");
    let (config, diagnostics) = validate(&merged, &names, ctx);
    findings.extend(diagnostics);
    match config {
        Some(gemini) => Ok(Loaded { gemini, document: merged.to_json(), sources: names, warnings: findings }),
        None => Err(Diagnostics(findings)),
    }
}

/// The merged document of `sources`, not validated (`None` when one does
/// not parse): what an unconfigured node reads its enrolment settings from.
pub fn merged_document(sources: &[Source]) -> Option<Value> {
    match parse_and_merge(sources) {
        (Some(merged), findings) if findings.is_empty() => Some(merged.to_json()),
        _ => None,
    }
}

/// Read files given explicitly as sources; an unreadable one is a finding.
pub fn read_files(files: &[PathBuf]) -> Result<Vec<Source>, Diagnostics> {
    let mut sources = Vec::new();
    let mut findings = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => sources.push(Source { name: file.display().to_string(), text }),
            Err(e) => findings.push(Diagnostic {
                severity: Severity::Error,
                source: file.display().to_string(),
                line: 0,
                col: 0,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
                hint: Some("check the path and its permissions".into()),
            }),
        }
    }
    if findings.is_empty() { Ok(sources) } else { Err(Diagnostics(findings)) }
}

/// Load files given explicitly, as `gemin_k8s config validate` does.
pub fn load_files(files: &[PathBuf], ctx: &CheckContext) -> Result<Loaded, Diagnostics> {
    load_sources(&read_files(files)?, ctx)
}

/// Gather from the node locations and load, as the agent does at start.
pub async fn load(paths: &SourcePaths, ctx: &CheckContext) -> anyhow::Result<Loaded> {
    let (sources, skipped) = gather(paths).await?;
    load_gathered(&sources, skipped, ctx)
}

/// Load gathered `sources`; the gathering's warnings (`skipped`) come first.
pub fn load_gathered(sources: &[Source], mut skipped: Vec<Diagnostic>, ctx: &CheckContext) -> anyhow::Result<Loaded> {
    let mut loaded = load_sources(sources, ctx)?;
    skipped.append(&mut loaded.warnings);
    loaded.warnings = skipped;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_mounted_cidata_volume_is_read_after_the_directories() {
        let root = tempfile::tempdir().unwrap();
        assert!(SourcePaths::under(root.path()).cidata_dir.is_none());
        let cidata = root.path().join(CIDATA_MOUNT);
        std::fs::create_dir_all(&cidata).unwrap();
        std::fs::create_dir_all(root.path().join("oem")).unwrap();
        std::fs::write(cidata.join("user-data"), "#cloud-config\nhostname: b\n").unwrap();
        std::fs::write(root.path().join("oem/10.yaml"), "#cloud-config\nhostname: a\n").unwrap();
        // What `deploy` sent an unconfigured node: after /oem.
        let enrolled = root.path().join(ENROLLED_DIR.trim_start_matches('/'));
        std::fs::create_dir_all(&enrolled).unwrap();
        std::fs::write(enrolled.join("90_geminik8s.yaml"), "#cloud-config\nhostname: c\n").unwrap();
        let paths = SourcePaths::under(root.path());
        assert_eq!(paths.cidata_dir.as_deref(), Some(cidata.as_path()));
        let (sources, warnings) = gather(&paths).await.unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        let want = [root.path().join("oem/10.yaml"), enrolled.join("90_geminik8s.yaml"), cidata.join("user-data")];
        assert_eq!(names, want.iter().map(|p| p.to_str().unwrap()).collect::<Vec<_>>());
    }

    /// The URL's cloud-config is kept; when the URL cannot be reached the
    /// kept copy is used (a node cut off from its config server still starts).
    #[tokio::test]
    async fn the_url_copy_is_used_when_the_url_cannot_be_reached() {
        let root = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await.unwrap();
            let body = "#cloud-config\nhostname: from-url\n";
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            conn.write_all(reply.as_bytes()).await.unwrap();
        });
        std::fs::create_dir_all(root.path().join("proc")).unwrap();
        std::fs::write(root.path().join("proc/cmdline"), format!("quiet {CMDLINE_KEY}http://{addr}/node.yaml\n"))
            .unwrap();
        let mut paths = SourcePaths::under(root.path());
        paths.fetch_timeout = Duration::from_secs(2);
        paths.fetch_attempts = 1;
        let (sources, _) = gather(&paths).await.unwrap();
        server.await.unwrap();
        assert_eq!(sources.last().unwrap().text, "#cloud-config\nhostname: from-url\n");
        let cache = root.path().join(URL_CACHE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o600);
        // The server is gone now.
        let (sources, _) = gather(&paths).await.unwrap();
        assert_eq!(sources.last().unwrap().text, "#cloud-config\nhostname: from-url\n");
        std::fs::remove_file(&cache).unwrap();
        assert!(gather(&paths).await.is_err(), "no copy and no server: an error");
    }
}
