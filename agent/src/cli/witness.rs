//! `gemin_k8s witness serve`: the arbiter for split-brain protection, on any
//! third box.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use super::GlobalArgs;
use crate::peer::server::serve_tls;
use crate::witness;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Grant leadership leases to the nodes of one or more clusters.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7440", value_name = "IP:PORT")]
    pub listen: SocketAddr,
    /// A cluster's pki/ directory from `init --witness arbiter` (ca.crt, witness.crt, witness.key).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ca", "cert", "key"])]
    pub pki_dir: Option<PathBuf>,
    /// CA certificate the nodes' certificates are signed by.
    #[arg(long, value_name = "FILE", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// The witness's certificate.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The witness's private key.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Longest lease granted, whatever the nodes ask for; also the grace period after a restart.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_ttl: Duration,
    /// Where the lease records (holders, last holders, sync-standby records) are kept across restarts.
    #[arg(long, default_value = "/var/lib/geminik8s-witness", value_name = "DIR")]
    pub state_dir: PathBuf,
}

pub async fn run(cmd: Command, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let Command::Serve(args) = cmd;
    let (ca, cert, key) = match (&args.pki_dir, &args.ca, &args.cert, &args.key) {
        (Some(dir), ..) => (dir.join("ca.crt"), dir.join("witness.crt"), dir.join("witness.key")),
        (None, Some(ca), Some(cert), Some(key)) => (ca.clone(), cert.clone(), key.clone()),
        _ => bail!("give --pki-dir DIR, or --ca, --cert and --key"),
    };
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    // The revocation list the operator sent last (`replace-node`), else one
    // next to the certificates.
    let crl_file = args.state_dir.join("crl.pem");
    let crl = [Some(crl_file.clone()), args.pki_dir.as_ref().map(|d| d.join("crl.pem"))]
        .into_iter()
        .flatten()
        .find_map(|p| std::fs::read_to_string(p).ok());
    let (ca, cert, key) = (read(&ca)?, read(&cert)?, read(&key)?);
    let what = if crl.is_some() { "the revocation list crl.pem" } else { "the witness's certificates" };
    let initial = witness::Revocation::config_for(&ca, &cert, &key, crl.as_deref()).context(what)?;
    let (tls, rx) = tokio::sync::watch::channel(initial);
    let revocation = witness::Revocation { file: crl_file, ca, cert, key, tls };
    let hooks = std::sync::Arc::new(crate::peer::server::ApiHooks::default());
    let app = witness::router(args.max_ttl, &args.state_dir.join("leases.json"), hooks.clone(), Some(revocation))?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, max_ttl = ?args.max_ttl, revocation_list = crl.is_some(), "witness serving leases");
    tokio::select! {
        () = serve_tls(listener, rx, app, hooks) => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(ExitCode::SUCCESS)
}
