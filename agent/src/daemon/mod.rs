//! `gemin_k8s agent`: the node daemon.
//!
//! Loads the cloud-config, starts the agent API (mutual TLS on the node's
//! address, and the local status socket), then drives the role state
//! machine ([`crate::election::Machine`]) once per heartbeat interval:
//! observe (peer heartbeat, second path, witness, local checks), step the
//! machine, carry out its actions through the subsystem traits, publish the
//! status. Long actions (promotion, demotion, rejoin) run in the background
//! and report back into the machine.

pub mod archiver;
pub mod database;
pub mod driver;
pub mod fence;
pub mod observe;
pub mod release;
pub mod scheduler;
pub mod subsystems;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::cli::GlobalArgs;
use crate::config::{CheckContext, SourcePaths};
use crate::kine::KineSettings;
use crate::netlink::{NetlinkVip, Vip, VipSettings};
use subsystems::Database;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cloud-config files to use instead of the node's sources (`/oem`, `/etc/geminik8s`, CIDATA, kernel command line).
    #[arg(long = "cloud-config", value_name = "FILE")]
    pub cloud_config: Vec<PathBuf>,
    /// Root under which the node's cloud-config sources and referenced files are found.
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
    /// Runtime files (PostgreSQL's socket directory); `/run` is cleared at boot, so nothing stale
    /// survives there.
    #[arg(long, default_value = "/run/geminik8s", value_name = "DIR")]
    pub runtime_dir: PathBuf,
    /// Where the services' log files go (when not under systemd).
    #[arg(long, default_value = "/var/log/geminik8s", value_name = "DIR")]
    pub log_dir: PathBuf,
    /// Where hostMeta and other state live.
    #[arg(long, default_value = crate::hostmeta::DEFAULT_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The local status socket.
    #[arg(long, default_value = crate::cli::status::DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Run without managing this subsystem (repeatable); `status` reports it as absent.
    #[arg(long, value_enum, value_name = "SUBSYSTEM")]
    pub without: Vec<Subsystem>,
    /// Remove the VIP from this node and exit (the agent unit's ExecStopPost: a dead agent
    /// must not leave the VIP behind).
    #[arg(long)]
    pub release_vip: bool,
}

/// Subsystems that `--without` can leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Subsystem {
    /// The virtual IP (netlink and gratuitous ARP).
    Vip,
    /// The service manager (systemd, or the process supervisor); PostgreSQL, Kine and K3s need it.
    Services,
    /// PostgreSQL.
    Database,
    /// Kine.
    Kine,
    /// K3s.
    K3s,
}

/// What `--release-vip` needs, kept in the state directory by every start:
/// releasing the VIP must work without the configuration's sources (a
/// `config_url` may be unreachable exactly when the node is cut off).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct VipCache {
    address: std::net::IpAddr,
    prefix: u8,
    interface: Option<String>,
    node_ip: std::net::IpAddr,
}

const VIP_CACHE: &str = "vip.json";

impl VipCache {
    fn of(cfg: &crate::config::GeminiConfig) -> VipCache {
        VipCache {
            address: cfg.cluster.vip,
            prefix: cfg.cluster.vip_prefix,
            interface: cfg.cluster.interface.clone(),
            node_ip: cfg.node.ip,
        }
    }

    fn settings(&self) -> VipSettings {
        VipSettings {
            address: self.address,
            prefix: self.prefix,
            interface: match &self.interface {
                Some(name) => crate::netlink::InterfaceChoice::Named(name.clone()),
                None => crate::netlink::InterfaceChoice::Holding(self.node_ip),
            },
            announce: Default::default(),
        }
    }
}

/// The peer `gemin_k8s replace-node` gave this node, in the state directory:
/// a cloud-config read after every other source.
pub const REPLACED_PEER: &str = "peer.yaml";

/// The cloud-config sources: the `--cloud-config` files, or the node's
/// locations under `root`; then [`REPLACED_PEER`] when there is one; with
/// the gathering's warnings.
async fn read_sources(
    root: &std::path::Path,
    files: &[std::path::PathBuf],
    state_dir: &std::path::Path,
) -> anyhow::Result<(Vec<crate::config::Source>, Vec<crate::config::Diagnostic>)> {
    let (mut sources, skipped) = if files.is_empty() {
        crate::config::load::gather(&SourcePaths::under(root)).await?
    } else {
        (crate::config::load::read_files(files)?, Vec::new())
    };
    let replaced = state_dir.join(REPLACED_PEER);
    if replaced.is_file() {
        sources.extend(crate::config::load::read_files(&[replaced])?);
    }
    Ok((sources, skipped))
}

/// `--release-vip` from the cached VIP settings, when there are some.
async fn release_cached_vip(state_dir: &std::path::Path) -> anyhow::Result<bool> {
    let path = state_dir.join(VIP_CACHE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(false) };
    let cache: VipCache = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    NetlinkVip::new(cache.settings()).release().await.context("releasing the VIP")?;
    Ok(true)
}

pub async fn run(args: Args, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    if args.release_vip && !args.without.contains(&Subsystem::Vip) && release_cached_vip(&args.state_dir).await? {
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = CheckContext { root: args.root.clone(), check_files: true };
    let mut files = args.cloud_config.clone();
    let (mut sources, mut skipped) = read_sources(&args.root, &files, &args.state_dir).await?;
    // Without a node configuration: wait for one (`gemin_k8s deploy`). It is
    // written where the node's sources are read (the enrolment `config_dir`);
    // with --cloud-config files it comes first, and the files given refine it.
    if let Some(document) = crate::config::load::merged_document(&sources)
        && let Some(enrolment) = crate::enrol::Settings::of_unconfigured(&document)?
    {
        let written = crate::enrol::serve(&enrolment, &args.state_dir, &args.root).await?;
        if !files.is_empty() && !files.contains(&written) {
            files.insert(0, written);
        }
        (sources, skipped) = read_sources(&args.root, &files, &args.state_dir).await?;
    }
    // A node configured by enrolment keeps its enrolment endpoint, which
    // can release it (`deploy --force`).
    // A broken enrolment block does not stop a configured node.
    let enrolment = match crate::config::load::merged_document(&sources)
        .map(|d| crate::enrol::Settings::of_document(&d))
    {
        Some(Ok(Some(s))) => Some((s.config_dir.join(crate::enrol::FILE_NAME), s)).filter(|(file, _)| file.is_file()),
        Some(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "the enrolment settings are unusable: `deploy --force` cannot release this node");
            None
        }
        _ => None,
    };
    let loaded = crate::config::load::load_gathered(&sources, skipped, &ctx)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(sources = ?loaded.sources, node = %loaded.gemini.node.name, cluster = %loaded.gemini.cluster.name, "configuration loaded");
    let vip: Option<Arc<dyn Vip>> = (!args.without.contains(&Subsystem::Vip))
        .then(|| Arc::new(NetlinkVip::new(VipSettings::from_config(&loaded.gemini))) as Arc<dyn Vip>);
    if args.release_vip {
        let vip = vip.context("--release-vip with --without vip does nothing")?;
        vip.release().await.context("releasing the VIP")?;
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let cache = serde_json::to_vec_pretty(&VipCache::of(&loaded.gemini))?;
    crate::fsutil::write_atomic(&args.state_dir.join(VIP_CACHE), &cache, 0o644)
        .with_context(|| format!("writing {}", args.state_dir.join(VIP_CACHE).display()))?;
    let services = if args.without.contains(&Subsystem::Services) {
        None
    } else {
        Some(crate::services::detect().await.context("connecting to the service manager")?)
    };
    std::fs::create_dir_all(&args.log_dir).with_context(|| format!("creating {}", args.log_dir.display()))?;
    let database: Option<Arc<dyn Database>> = match (args.without.contains(&Subsystem::Database), &services) {
        (true, _) => None,
        (false, None) => anyhow::bail!(
            "PostgreSQL is run through the service manager, which `--without services` leaves out; \
             add `--without database` too, or drop `--without services`"
        ),
        (false, Some(services)) => {
            let mut settings = crate::postgres::Settings::from_config(&loaded.gemini);
            settings.socket_dir = args.runtime_dir.join(format!("postgres-{}", loaded.gemini.node.name));
            settings.log_file = args.log_dir.join("postgres.log");
            let mgr = crate::postgres::Manager::new(settings, services.clone())
                .context("setting up the PostgreSQL manager")?;
            Some(Arc::new(database::Postgres::new(mgr)))
        }
    };
    let kine =
        (!args.without.contains(&Subsystem::Kine)).then(|| KineSettings::from_config(&loaded.gemini, &args.log_dir));
    let k3s = (loaded.gemini.k3s.enabled && !args.without.contains(&Subsystem::K3s))
        .then(|| crate::k3s::K3sSettings::from_config(&loaded.gemini, &args.log_dir));
    let manages_database = database.is_some();
    let subsystems = driver::Subsystems { database, vip, services, kine, k3s };
    let cfg = loaded.gemini.clone();
    let driver = driver::Driver::start(loaded.gemini, args.state_dir.clone(), args.socket, subsystems).await?;
    if manages_database {
        let socket_dir = args.runtime_dir.join(format!("postgres-{}", cfg.node.name));
        archiver::start(&cfg, &driver.shared(), socket_dir, driver.backups());
    }
    if let Some((_, settings)) = &enrolment {
        let running = crate::enrol::Enrolled { cluster: cfg.cluster.name.clone(), node: cfg.node.name.clone() };
        let serving = crate::enrol::serve_running(
            settings.clone(),
            args.state_dir.clone(),
            args.root.clone(),
            running,
            driver.release_requests(),
        );
        tokio::spawn(async move {
            if let Err(e) = serving.await {
                tracing::error!(error = %format!("{e:#}"), "the enrolment endpoint (release) stopped");
            }
        });
    }
    match driver.run().await? {
        driver::Ended::Stopped => Ok(ExitCode::SUCCESS),
        driver::Ended::Released => {
            let (file, _) = enrolment.context("a release without an enrolment endpoint")?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let moved = release::set_aside(&cfg, &args.state_dir, &file, now.as_secs())?;
            tracing::warn!(event = "released", cluster = %cfg.cluster.name, node = %cfg.node.name,
                set_aside = %moved.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
                "released: this node's configuration and data are set aside; waiting for enrolment again");
            Err(release::exec_again())
        }
    }
}
