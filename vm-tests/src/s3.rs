//! An S3-compatible server (`s3s-fs`, installed by `just deps`) on a free
//! loopback port with a new data directory and one bucket: what the S3
//! backup tests and `just bench-backup` store into.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use geminik8s::backup::s3::S3Options;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::signer::Signer;

pub const SERVER: &str = "s3s-fs";
pub const BUCKET: &str = "backups";
pub const ACCESS_KEY: &str = "gemin-lab";
pub const SECRET_KEY: &str = "lab-secret-0123456789";

/// The server; killed when dropped, its directory removed.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    dir: tempfile::TempDir,
    /// A credentials file for the server's key.
    pub credentials: PathBuf,
}

impl S3Server {
    /// Start the server with its data in a new directory and create [`BUCKET`].
    pub async fn start() -> anyhow::Result<S3Server> {
        let program = crate::skip::find_tool(SERVER).with_context(|| format!("{SERVER} not found"))?;
        let dir = tempfile::Builder::new().prefix("gk8s-s3-").tempdir().context("a directory for the S3 server")?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let port = crate::pg::free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log")).context("creating the server's log")?;
        let child = Command::new(program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {SERVER}"))?;
        let credentials = dir.path().join("s3.credentials");
        let mut server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}"), dir, credentials };
        std::fs::write(
            &server.credentials,
            format!("access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"),
        )
        .context("writing the credentials file")?;
        server.wait_until_listening(port).await?;
        server.create_bucket().await?;
        Ok(server)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    async fn wait_until_listening(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self.child.try_wait()? {
                bail!("{SERVER} exited ({status}) before listening:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                bail!("{SERVER} not listening on port {port} after 30 s (last: {last}):\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `CreateBucket`, sent to the server as a pre-signed request.
    async fn create_bucket(&self) -> anyhow::Result<()> {
        let url = self.client()?.signed_url(reqwest::Method::PUT, &Key::from(""), Duration::from_secs(60)).await?;
        let response = reqwest::Client::new().put(url).send().await.context("creating the bucket")?;
        let status = response.status();
        if !status.is_success() {
            bail!("creating the bucket: {status}: {}", response.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// A client for the bucket with the server's key, to look under a store.
    pub fn client(&self) -> anyhow::Result<AmazonS3> {
        geminik8s::tls::install_crypto_provider();
        Ok(AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()?)
    }

    /// How the agent's S3 store reaches this server.
    pub fn options(&self) -> S3Options {
        S3Options { endpoint: Some(self.endpoint.clone()), region: None, credentials: Some(self.credentials.clone()) }
    }

    /// The destination flags of the `gemin_k8s` commands.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-credentials".into(),
            self.credentials.display().to_string(),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill().and_then(|()| self.child.wait().map(drop)) {
            eprintln!("stopping {SERVER}: {e}");
        }
    }
}
