//! The agent loop: observe, step the role machine, act, publish.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use super::observe::{self, LeaseState};
use super::subsystems::Database;
use crate::cli::version::VERSION;
use crate::config::{GeminiConfig, WitnessMode};
use crate::election::{Action, Completion, Component, Input, LocalMeta, Machine, Observation, Settings, WitnessView};
use crate::hostmeta::{self, HostMeta};
use crate::k3s::K3sSettings;
use crate::kine::{KineRecovery, KineSettings, RecoveryPolicy};
use crate::netlink::Vip;
use crate::peer::client::AgentClient;
use crate::peer::server::{self, ApiHooks, Control};
use crate::peer::tls::TlsMaterial;
use crate::peer::{
    ABSENT, ComponentHealth, Counters, DISABLED, FAILED, FailoverView, NodeStatus, OK, PeerView, Published, Shared,
    VipView, WitnessView as WitnessStatus,
};
use crate::services::Services;
use crate::witness::LeaseClient;

/// The subsystems wired on this host; `None` runs without (and says so).
#[derive(Default)]
pub struct Subsystems {
    pub database: Option<Arc<dyn Database>>,
    pub vip: Option<Arc<dyn Vip>>,
    pub services: Option<Arc<dyn Services>>,
    /// Kine, run through `services` (needs them).
    pub kine: Option<KineSettings>,
    /// K3s, run through `services` when its binary is there.
    pub k3s: Option<K3sSettings>,
}

/// K3s as the agent runs it: readiness through `/readyz` with the admin
/// credentials K3s generates, and a kubeconfig for the VIP once they exist.
struct K3sRun {
    tls_dir: PathBuf,
    kubeconfig: PathBuf,
    /// `None` until K3s has generated its credentials.
    ready: Option<bool>,
    kubeconfig_written: bool,
}

/// Kine as the agent runs it: its settings and the restart bookkeeping.
struct KineRun {
    settings: KineSettings,
    recovery: KineRecovery,
    healthy: bool,
}

pub struct Driver {
    cfg: GeminiConfig,
    state_dir: PathBuf,
    machine: Machine,
    subsystems: Subsystems,
    kine: Option<KineRun>,
    k3s: Option<K3sRun>,
    peer: AgentClient,
    lease_client: Option<LeaseClient>,
    lease: LeaseState,
    shared: Shared,
    hooks: Arc<ApiHooks>,
    control_rx: mpsc::Receiver<Control>,
    done_tx: mpsc::Sender<Completion>,
    done_rx: mpsc::Receiver<Completion>,
    started: Instant,
    counters: Counters,
    peer_last_heard: Option<Instant>,
    health: Vec<(Component, bool)>,
    replication: Option<crate::peer::ReplicationView>,
    last_failover: Option<FailoverView>,
    promotion: Option<PromotionTiming>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Phases of a promotion in progress, for `status` and the failover benchmark.
struct PromotionTiming {
    decided: Instant,
    silent_ms: Option<u64>,
    promoted: Option<Instant>,
}

/// The kubeconfig the agent writes, pointing at the VIP.
pub const KUBECONFIG: &str = "/etc/rancher/k3s/geminik8s.yaml";

/// Time limit for starting, stopping or restarting a service.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(60);

/// The service behind a component the machine may restart.
fn service_name(component: Component) -> Option<&'static str> {
    match component {
        // PostgreSQL is restarted through the datastore, not the service manager.
        Component::Postgres => None,
        Component::Kine => Some(crate::kine::SERVICE),
        Component::K3s => Some(crate::k3s::SERVICE),
        Component::Network | Component::Script => None,
    }
}

fn local_meta(dir: &std::path::Path, cluster: &str) -> LocalMeta {
    match hostmeta::load(dir, cluster) {
        Ok(Some(meta)) => LocalMeta::Loaded(meta),
        Ok(None) => LocalMeta::Missing,
        Err(e) => {
            tracing::error!(error = %e, "hostMeta is unusable; it is kept as is and will be recovered from the peer");
            LocalMeta::Unusable
        }
    }
}

impl Driver {
    /// Bind the API and the socket and build the machine.
    pub async fn start(
        cfg: GeminiConfig,
        state_dir: PathBuf,
        socket: PathBuf,
        subsystems: Subsystems,
    ) -> anyhow::Result<Driver> {
        let tls = TlsMaterial::from_config(&cfg.tls).context("loading the agent's TLS certificates")?;
        let settings = Settings::from_config(&cfg);
        let machine = Machine::new(settings, local_meta(&state_dir, &cfg.cluster.name));
        let (control_tx, control_rx) = mpsc::channel(8);
        let hooks = Arc::new(ApiHooks::with_control(control_tx));
        // Filled by `publish` below, before the API serves anything.
        let shared: Shared = Arc::new(RwLock::new(Published {
            hostmeta: None,
            status: NodeStatus::default(),
            counters: Counters::default(),
            election: None,
        }));
        let addr = cfg.node.api_addr();
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the agent API on {addr}"))?;
        let unix = server::bind_unix(&socket)?;
        let server_config = tls.server_config()?;

        let timeout = cfg.health.interval.mul_f64(0.8).max(Duration::from_millis(200));
        let peer = AgentClient::https(&format!("https://{}", cfg.peer.api_addr()), &tls, None, timeout)?;
        let lease_client = match (cfg.cluster.witness.mode, cfg.cluster.witness.targets.first()) {
            (WitnessMode::Arbiter, Some(target)) => {
                Some(LeaseClient::new(target, &tls, &cfg.cluster.name, &cfg.node.name, cfg.cluster.witness.lease_ttl)?)
            }
            _ => None,
        };
        let (done_tx, done_rx) = mpsc::channel(16);
        let mut subsystems = subsystems;
        let kine = match (subsystems.kine.take(), &subsystems.services) {
            (Some(settings), Some(services)) => {
                settings.write_ca()?;
                services.configure(&settings.spec()).await.context("configuring Kine")?;
                services.start(crate::kine::SERVICE, SERVICE_TIMEOUT).await.context("starting Kine")?;
                tracing::info!(listen = %settings.listen, datastore = %settings.db_host, "Kine started");
                Some(KineRun { settings, recovery: KineRecovery::new(RecoveryPolicy::default()), healthy: false })
            }
            (Some(_), None) => {
                tracing::warn!("Kine needs the service manager; running without it");
                None
            }
            _ => None,
        };
        let k3s = match (subsystems.k3s.take(), &subsystems.services) {
            (Some(settings), Some(services)) if settings.available() => {
                services.configure(&settings.spec()).await.context("configuring K3s")?;
                services.start(crate::k3s::SERVICE, SERVICE_TIMEOUT).await.context("starting K3s")?;
                tracing::info!(binary = %settings.binary.display(), "K3s started");
                Some(K3sRun {
                    tls_dir: PathBuf::from(crate::k3s::SERVER_TLS_DIR),
                    kubeconfig: PathBuf::from(KUBECONFIG),
                    ready: None,
                    kubeconfig_written: false,
                })
            }
            (Some(settings), _) => {
                tracing::warn!(binary = %settings.binary.display(), "K3s is enabled but its binary is missing (or no service manager); running without it");
                None
            }
            _ => None,
        };
        let mut driver = Driver {
            cfg,
            state_dir,
            machine,
            subsystems,
            kine,
            k3s,
            peer,
            lease_client,
            lease: LeaseState::default(),
            shared,
            hooks,
            control_rx,
            done_tx,
            done_rx,
            started: Instant::now(),
            counters: Counters::default(),
            peer_last_heard: None,
            health: Vec::new(),
            replication: None,
            last_failover: None,
            promotion: None,
            tasks: Vec::new(),
        };
        driver.publish();
        let auth = server::Auth::tls(&driver.cfg.peer.name, &driver.cfg.api.token);
        let app = server::router(driver.shared.clone(), auth, driver.hooks.clone());
        driver.tasks.push(tokio::spawn(server::serve_tls(listener, server_config, app, driver.hooks.clone())));
        let local = server::router(driver.shared.clone(), server::Auth::Local, driver.hooks.clone());
        driver.tasks.push(tokio::spawn(server::serve_unix(unix, local)));
        tracing::info!(api = %addr, socket = %socket.display(), "agent API listening");
        Ok(driver)
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Run until SIGTERM or Ctrl-C.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(self.cfg.health.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        // Under systemd (Type=notify): ready now, and the watchdog is pinged
        // from this loop, so a stuck loop gets the agent restarted.
        let notifier = crate::services::notify::Notifier::from_env();
        if let Some(n) = &notifier {
            n.ready("agent running").context("notifying systemd")?;
        }
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let obs = self.observe().await;
                    let actions = self.machine.step(self.now(), Input::Tick(obs));
                    self.execute(actions).await;
                    self.upkeep().await;
                    if let Some(n) = &notifier
                        && let Err(e) = n.watchdog()
                    {
                        tracing::warn!(error = %e, "pinging the systemd watchdog failed");
                    }
                }
                Some(done) = self.done_rx.recv() => {
                    let actions = self.machine.step(self.now(), Input::Done(done));
                    self.note_completion(done);
                    self.execute(actions).await;
                }
                Some(control) = self.control_rx.recv() => match control {
                    Control::Switchover(reply) => {
                        let answer = if self.machine.can_hand_over() {
                            let actions = self.machine.step(self.now(), Input::Switchover);
                            self.execute(actions).await;
                            Ok(())
                        } else {
                            Err(format!("switchover needs this node leading and the peer following (state {})", self.machine.state()))
                        };
                        if reply.send(answer).is_err() {
                            tracing::debug!("the switchover caller went away");
                        }
                    }
                },
                _ = term.recv() => break,
                r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; break; }
            }
            self.publish();
        }
        self.shutdown().await;
        Ok(())
    }

    /// A planned stop hands the VIP and the lease back so the peer can lead.
    async fn shutdown(&mut self) {
        tracing::info!(leading = self.machine.leading(), "agent stopping");
        if self.machine.holds_vip()
            && let Some(vip) = &self.subsystems.vip
            && let Err(e) = vip.release().await
        {
            tracing::error!(error = %e, "releasing the VIP on shutdown failed");
        }
        if self.machine.leading()
            && let Some(lease) = &self.lease_client
            && let Err(e) = lease.release().await
        {
            tracing::warn!(error = %format!("{e:#}"), "releasing the lease on shutdown failed");
        }
        for t in &self.tasks {
            t.abort();
        }
        // The supervisor's services (PostgreSQL, Kine) stop with the agent,
        // cleanly; systemd's units keep running.
        if let Some(services) = &self.subsystems.services
            && let Err(e) = services.shutdown(SERVICE_TIMEOUT).await
        {
            tracing::error!(error = %e, "stopping the services on shutdown failed");
        }
    }

    async fn observe(&mut self) -> Observation {
        let interval = self.cfg.health.interval;
        let probe_timeout = interval.mul_f64(0.8).max(Duration::from_millis(200));
        // The peer (heartbeat, then the second path on a miss) and the
        // witness are asked at the same time, so a tick stays short even when
        // both are unreachable and every probe runs into its timeout.
        let cfg = &self.cfg;
        let peer_probe = async {
            let (heartbeat, why) = observe::heartbeat(&self.peer).await;
            let second_path = match heartbeat {
                crate::election::Heartbeat::Ok { .. } => None,
                crate::election::Heartbeat::Missed => {
                    tracing::debug!(reason = why.as_deref().unwrap_or("?"), "heartbeat missed");
                    Some(observe::second_path(cfg.peer.ip, cfg.postgres.port, cfg.peer.api_port, probe_timeout).await)
                }
            };
            (heartbeat, second_path)
        };
        let (lease_client, lease) = (&self.lease_client, &mut self.lease);
        let witness_probe = async {
            match cfg.cluster.witness.mode {
                WitnessMode::None => WitnessView::NoOpinion,
                WitnessMode::Gateway => observe::gateway(&cfg.cluster.witness.targets, probe_timeout).await,
                WitnessMode::Arbiter => match lease_client {
                    Some(client) => observe::arbiter(client, lease).await,
                    None => WitnessView::ArbiterUnreachable,
                },
            }
        };
        let ((heartbeat, second_path), witness) = tokio::join!(peer_probe, witness_probe);
        match heartbeat {
            crate::election::Heartbeat::Ok { .. } => self.peer_last_heard = Some(Instant::now()),
            crate::election::Heartbeat::Missed => self.counters.heartbeats_missed_total += 1,
        }
        let mut health = Vec::new();
        let mut position = None;
        if let Some(db) = &self.subsystems.database {
            match db.healthy().await {
                Ok(Some(ok)) => health.push((Component::Postgres, ok)),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "PostgreSQL health check failed");
                    health.push((Component::Postgres, false));
                }
            }
            position = db.position().await.ok().flatten();
        }
        if let Some(script) = &self.cfg.health.checks.script {
            let result = observe::script(script, self.cfg.health.checks.script_timeout).await;
            if let Err(e) = &result {
                tracing::warn!(script = %script.display(), error = %e, "custom health check failed");
            }
            health.push((Component::Script, result.is_ok()));
        }
        if let Some(Some(ready)) = self.k3s.as_ref().map(|k| k.ready) {
            health.push((Component::K3s, ready));
        }
        self.health = health.clone();
        let peer_called_at = self.hooks.last_health_call().map(|t| t.saturating_duration_since(self.started));
        Observation { heartbeat, second_path, witness, health, position, peer_called_at }
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            tracing::debug!(?action, "action");
            match action {
                Action::PersistHostMeta(mut meta) => self.persist(&mut meta),
                Action::RecoverHostMeta(peer_meta) => {
                    match hostmeta::recover_from_peer(
                        &self.state_dir,
                        &self.cfg.cluster.name,
                        &self.cfg.node.name,
                        &peer_meta,
                    ) {
                        Ok(_) => {
                            tracing::info!(event = "hostmeta_recovered", "hostMeta recovered from the peer's copy")
                        }
                        Err(e) => tracing::error!(error = %e, "recovering hostMeta from the peer failed"),
                    }
                }
                Action::Promote { epoch } => {
                    self.primary_moved();
                    tracing::debug!(epoch, "promoting the datastore");
                    let silent_ms = self.peer_last_heard.map(|t| t.elapsed().as_millis() as u64);
                    self.promotion = Some(PromotionTiming { decided: Instant::now(), silent_ms, promoted: None });
                    let db = self.subsystems.database.clone();
                    self.background(async move {
                        match db {
                            Some(db) => match db.promote(epoch).await {
                                Ok(()) => Completion::PromotionDone,
                                Err(e) => {
                                    tracing::error!(error = %format!("{e:#}"), "promotion failed");
                                    Completion::PromotionFailed
                                }
                            },
                            None => Completion::PromotionDone,
                        }
                    });
                }
                Action::Demote => {
                    tracing::debug!("demoting the datastore");
                    let db = self.subsystems.database.clone();
                    self.background(async move {
                        if let Some(db) = db
                            && let Err(e) = db.demote().await
                        {
                            tracing::error!(error = %format!("{e:#}"), "demotion failed; carrying on as follower");
                        }
                        Completion::DemotionDone
                    });
                }
                Action::Rejoin { leader } => {
                    self.primary_moved();
                    tracing::info!(event = "rejoin", leader = %leader, "rejoining the datastore as a standby");
                    let db = self.subsystems.database.clone();
                    self.background(async move {
                        match db {
                            Some(db) => match db.rejoin(&leader).await {
                                Ok(()) => Completion::RejoinDone,
                                Err(e) => {
                                    tracing::error!(error = %format!("{e:#}"), "rejoin failed");
                                    Completion::RejoinFailed
                                }
                            },
                            None => Completion::RejoinDone,
                        }
                    });
                }
                Action::Fence => {
                    tracing::debug!("fencing the datastore");
                    if let Some(db) = &self.subsystems.database
                        && let Err(e) = db.fence().await
                    {
                        tracing::error!(error = %format!("{e:#}"), "fencing the database failed");
                    }
                }
                Action::Unfence => {
                    tracing::debug!("unfencing the datastore");
                    if let Some(db) = &self.subsystems.database
                        && let Err(e) = db.unfence().await
                    {
                        tracing::error!(error = %format!("{e:#}"), "unfencing the database failed");
                    }
                }
                Action::TakeVip => {
                    tracing::debug!(vip = %self.cfg.cluster.vip, "taking the VIP");
                    let started = Instant::now();
                    if let Some(vip) = &self.subsystems.vip
                        && let Err(e) = vip.take().await
                    {
                        tracing::error!(error = %e, "taking the VIP failed");
                    }
                    self.note_vip_taken(started);
                }
                Action::ReleaseVip => {
                    tracing::debug!(vip = %self.cfg.cluster.vip, "releasing the VIP");
                    if let Some(vip) = &self.subsystems.vip
                        && let Err(e) = vip.release().await
                    {
                        tracing::error!(error = %e, "releasing the VIP failed");
                    }
                }
                Action::AcquireLease { epoch } => {
                    if let Some(client) = &self.lease_client {
                        let view = client.acquire(false).await;
                        tracing::debug!(epoch, ?view, "lease");
                        self.lease.record(view);
                    }
                }
                Action::ReleaseLease => {
                    if let Some(client) = &self.lease_client {
                        if let Err(e) = client.release().await {
                            tracing::warn!(error = %format!("{e:#}"), "releasing the lease failed; it expires by itself");
                        }
                        self.lease = LeaseState::default();
                    }
                }
                Action::RestartService(Component::Postgres) => {
                    if let Some(db) = &self.subsystems.database
                        && let Err(e) = db.restart().await
                    {
                        tracing::error!(error = %format!("{e:#}"), "restarting PostgreSQL failed");
                    }
                }
                Action::RestartService(component) => {
                    tracing::debug!(?component, "restarting a service");
                    if let (Some(services), Some(name)) = (&self.subsystems.services, service_name(component))
                        && let Err(e) = services.restart(name, SERVICE_TIMEOUT).await
                    {
                        tracing::error!(?component, error = %e, "restart failed");
                    }
                }
            }
        }
    }

    /// Kine reconnects through the VIP by itself; give it time before restarting it.
    fn primary_moved(&mut self) {
        if let Some(kine) = &mut self.kine {
            kine.recovery.primary_moved(Instant::now());
        }
    }

    /// Per-tick upkeep of the datastore, and its replication state for status.
    async fn upkeep(&mut self) {
        if let Some(k3s) = &mut self.k3s {
            match crate::k3s::ClusterCredentials::from_server_tls(&k3s.tls_dir) {
                Ok(creds) => {
                    let timeout = self.cfg.health.interval.mul_f64(0.8).max(Duration::from_millis(200));
                    let local = crate::k3s::api_url(self.cfg.node.ip);
                    k3s.ready = Some(crate::k3s::ready(&local, &creds, timeout).await.is_ok());
                    if !k3s.kubeconfig_written {
                        let text = crate::k3s::render_kubeconfig(
                            &self.cfg.cluster.name,
                            &crate::k3s::api_url(self.cfg.cluster.vip),
                            &creds,
                        );
                        match crate::k3s::write_kubeconfig(&k3s.kubeconfig, &text) {
                            Ok(()) => {
                                k3s.kubeconfig_written = true;
                                tracing::info!(path = %k3s.kubeconfig.display(), "kubeconfig for the VIP written");
                            }
                            Err(e) => tracing::warn!(error = %format!("{e:#}"), "writing the kubeconfig failed"),
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "K3s credentials not there yet"),
            }
        }
        if let (Some(kine), Some(services)) = (&mut self.kine, &self.subsystems.services) {
            let endpoint = kine.settings.etcd_endpoint();
            let timeout = self.cfg.health.interval.mul_f64(0.8).max(Duration::from_millis(200));
            match crate::kine::check_and_recover(services.as_ref(), &mut kine.recovery, &endpoint, timeout).await {
                Ok(verdict) => kine.healthy = verdict == crate::kine::Verdict::Healthy,
                Err(e) => {
                    kine.healthy = false;
                    tracing::error!(error = %e, "restarting Kine failed");
                }
            }
        }
        if let Some(db) = self.subsystems.database.clone() {
            if let Err(e) = db.tick(self.machine.leading()).await {
                tracing::warn!(error = %format!("{e:#}"), "datastore upkeep failed");
            }
            self.replication = match db.replication().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "reading the replication state failed");
                    None
                }
            };
        }
        if let Some(client) = &self.lease_client
            && self.machine.leading()
        {
            // The peer can take over with every acknowledged write while
            // commits wait for it; with `durability: async` (the operator's
            // choice to risk the tail) while it streams; never while degraded.
            // Without a datastore on this agent there is nothing to lose.
            let eligible = match (&self.subsystems.database, &self.replication) {
                (None, _) => true,
                (Some(_), Some(r)) => r.durability == "synchronous" || (r.durability == "async" && r.streaming),
                (Some(_), None) => false,
            };
            let desired = eligible.then_some(self.cfg.peer.name.as_str());
            observe::record_sync(client, &mut self.lease, desired).await;
        }
    }

    fn background(&mut self, work: impl std::future::Future<Output = Completion> + Send + 'static) {
        let tx = self.done_tx.clone();
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(tokio::spawn(async move {
            let done = work.await;
            if tx.send(done).await.is_err() {
                tracing::debug!("the agent loop ended before a completion arrived");
            }
        }));
    }

    fn note_completion(&mut self, done: Completion) {
        match (done, &mut self.promotion) {
            (Completion::PromotionDone, Some(p)) => p.promoted = Some(Instant::now()),
            (Completion::PromotionFailed, _) => self.promotion = None,
            _ => {}
        }
    }

    /// The VIP is on this node after a promotion: record the failover's phases.
    fn note_vip_taken(&mut self, vip_started: Instant) {
        let Some(p) = self.promotion.take() else { return };
        let Some(promoted) = p.promoted else { return };
        let now = Instant::now();
        self.counters.failovers_total += 1;
        let view = FailoverView {
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            from: self.cfg.peer.name.clone(),
            to: self.cfg.node.name.clone(),
            duration_ms: now.duration_since(p.decided).as_millis() as u64,
            silent_ms: p.silent_ms,
            promote_ms: promoted.duration_since(p.decided).as_millis() as u64,
            vip_ms: now.duration_since(vip_started).as_millis() as u64,
        };
        tracing::info!(event = "failover_timing", node = %self.cfg.node.name, silent_ms = ?view.silent_ms,
            promote_ms = view.promote_ms, vip_ms = view.vip_ms, "leadership taken");
        self.last_failover = Some(view);
    }

    fn persist(&self, meta: &mut HostMeta) {
        meta.touch();
        meta.agent_version = VERSION.to_string();
        if let Err(e) = hostmeta::store(&self.state_dir, meta) {
            tracing::error!(error = %e, "writing hostMeta failed");
        }
    }

    fn publish(&self) {
        let status = self.status();
        let mut p = self.shared.write().unwrap_or_else(|p| p.into_inner());
        p.hostmeta = self.machine.meta().cloned();
        p.election = Some(self.machine.status());
        p.status = status;
        p.counters = self.counters.clone();
    }

    fn status(&self) -> NodeStatus {
        let cfg = &self.cfg;
        let m = &self.machine;
        let election = m.status();
        let mut components = Vec::new();
        let absent =
            |name: &str, what: &str| ComponentHealth { name: name.into(), state: ABSENT.into(), detail: what.into() };
        match &self.subsystems.database {
            Some(_) => {
                let ok =
                    self.health.iter().find(|(c, _)| *c == Component::Postgres).map(|(_, ok)| *ok).unwrap_or(false);
                components.push(ComponentHealth {
                    name: "postgres".into(),
                    state: if ok { OK } else { FAILED }.into(),
                    detail: String::new(),
                });
            }
            None => components.push(absent("postgres", "the datastore is not managed by this agent yet")),
        }
        match &self.kine {
            Some(k) => components.push(ComponentHealth {
                name: "kine".into(),
                state: if k.healthy { OK } else { FAILED }.into(),
                detail: if k.healthy {
                    String::new()
                } else {
                    format!("{} does not answer", k.settings.etcd_endpoint())
                },
            }),
            None => components.push(absent("kine", "Kine is not run by this agent")),
        }
        if self.subsystems.vip.is_none() {
            components.push(absent("vip", "the VIP is not managed by this agent yet"));
        }
        match (&self.k3s, cfg.k3s.enabled) {
            (_, false) => components.push(ComponentHealth {
                name: "k3s".into(),
                state: DISABLED.into(),
                detail: "k3s.enabled is false".into(),
            }),
            (Some(k), true) => components.push(ComponentHealth {
                name: "k3s".into(),
                state: match k.ready {
                    Some(true) => OK,
                    Some(false) => FAILED,
                    None => "starting",
                }
                .into(),
                detail: if k.ready == Some(false) { "/readyz does not answer ok".into() } else { String::new() },
            }),
            (None, true) => components.push(absent("k3s", "no K3s binary (set GEMINIK8S_K3S_BINARY or install it)")),
        }
        if let Some((_, ok)) = self.health.iter().find(|(c, _)| *c == Component::Script) {
            components.push(ComponentHealth {
                name: "script".into(),
                state: if *ok { OK } else { FAILED }.into(),
                detail: String::new(),
            });
        }
        let peer_reachable = self.peer_last_heard.is_some_and(|t| t.elapsed() < cfg.health.interval * 2);
        let mut degraded = Vec::new();
        if !peer_reachable {
            degraded.push(format!("peer {} is unreachable", cfg.peer.name));
        }
        for c in components.iter().filter(|c| !c.is_ok()) {
            degraded.push(format!("{}: {}", c.name, if c.detail.is_empty() { &c.state } else { &c.detail }));
        }
        if m.state() == crate::election::State::Fenced {
            degraded.push("fenced: this node released the VIP and does not accept writes".into());
        }
        let witness_state = match m.witness() {
            WitnessView::NoOpinion => "n/a",
            WitnessView::GatewayReachable => "reachable",
            WitnessView::GatewayUnreachable => "unreachable",
            WitnessView::LeaseHeldByMe => "lease held here",
            WitnessView::LeaseHeldByPeer => "lease held by peer",
            WitnessView::LeaseFree => "lease free",
            WitnessView::ArbiterUnreachable => "unreachable",
        };
        let mode = serde_json::to_value(cfg.cluster.witness.mode)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let role = if election.leading {
            "leader"
        } else if m.state() == crate::election::State::Fenced {
            "fenced"
        } else if m.state() == crate::election::State::Follower {
            "follower"
        } else {
            "unknown"
        };
        NodeStatus {
            cluster: cfg.cluster.name.clone(),
            node: cfg.node.name.clone(),
            address: cfg.node.ip.to_string(),
            agent_version: VERSION.to_string(),
            role: role.into(),
            state: m.state().to_string(),
            epoch: m.meta().map(|h| h.epoch).unwrap_or(0),
            peer: PeerView {
                name: cfg.peer.name.clone(),
                address: cfg.peer.ip.to_string(),
                reachable: peer_reachable,
                role: None,
                epoch: None,
                last_heard_ms: self.peer_last_heard.map(|t| t.elapsed().as_millis() as u64),
                rtt_ms: m.last_rtt().map(|d| d.as_secs_f64() * 1000.0),
            },
            witness: WitnessStatus { mode, state: witness_state.into() },
            vip: VipView { address: cfg.cluster.vip.to_string(), held_here: m.holds_vip() },
            replication: self.replication.clone(),
            last_failover: self.last_failover.clone(),
            components,
            degraded,
        }
    }
}
