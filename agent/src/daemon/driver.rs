//! The agent loop: observe, step the role machine, act, publish.
//!
//! The loop never waits long: every probe of a tick runs at once with a
//! budget below the heartbeat interval, and slow actions (promotion,
//! rejoin, lease calls, service restarts, durability changes) run in the
//! background. The fence deadline is kept by a timer of its own
//! ([`super::fence`]), so even a stuck loop cannot keep a cut-off leader
//! writing.

mod report;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use super::fence::FenceTimer;
use super::observe::{self, LeaseState};
use super::subsystems::{CatchUpFailed, Database};
use crate::cli::version::VERSION;
use crate::config::{GeminiConfig, WitnessMode};
use crate::election::{
    Action, Completion, Component, Heartbeat, Input, LocalMeta, Machine, Observation, Replication, Settings,
    WitnessView,
};
use crate::hostmeta::{self, HostMeta};
use crate::k3s::K3sSettings;
use crate::kine::{KineRecovery, KineSettings, RecoveryPolicy};
use crate::netlink::Vip;
use crate::peer::client::AgentClient;
use crate::peer::server::{self, ApiHooks, Control};
use crate::peer::tls::TlsMaterial;
use crate::peer::{Counters, FailoverView, NodeStatus, PeerChange, PeerChanged, Published, ReplicationView, Shared};
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

/// K3s as the agent runs it: started once the node has a datastore to talk
/// to (never before the election), readiness through `/readyz` with the
/// admin credentials K3s generates, and a kubeconfig for the VIP once they
/// exist.
struct K3sRun {
    settings: K3sSettings,
    tls_dir: PathBuf,
    kubeconfig: PathBuf,
    /// Whether the start has been asked for.
    started: bool,
    health: Arc<Mutex<K3sHealth>>,
    kubeconfig_written: Arc<std::sync::atomic::AtomicBool>,
}

/// How long K3s may take to serve after a start or restart before a
/// failing `/readyz` counts (and gets it restarted): K3s takes tens of
/// seconds on small edge hardware, and an API server restarted before it
/// finished starting never serves.
const K3S_START_GRACE: Duration = Duration::from_secs(600);

/// What the agent knows of K3s's readiness.
#[derive(Debug, Default)]
struct K3sHealth {
    /// When K3s was last started or restarted.
    since: Option<Instant>,
    /// Whether it has served since then.
    served: bool,
    /// The verdict the health checks count: `None` while K3s is starting
    /// (no credentials yet, or not serving yet within [`K3S_START_GRACE`]).
    ready: Option<bool>,
}

impl K3sHealth {
    fn started(&mut self, now: Instant) {
        *self = K3sHealth { since: Some(now), served: false, ready: None };
    }

    fn observe(&mut self, serving: bool, now: Instant) {
        self.served |= serving;
        let starting = !self.served && self.since.is_some_and(|s| now.saturating_duration_since(s) < K3S_START_GRACE);
        self.ready = if serving {
            Some(true)
        } else if starting {
            None
        } else {
            Some(false)
        };
    }
}

/// Kine as the agent runs it: its settings and the restart bookkeeping,
/// shared with the check that runs in the background.
struct KineRun {
    settings: KineSettings,
    recovery: Arc<tokio::sync::Mutex<KineRecovery>>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
}

/// What the slow local checks found last; they run in the background, so
/// the loop never waits on a datastore or a script.
#[derive(Default)]
struct LocalChecks {
    /// The last datastore report, and when its probe started.
    db: Option<(Instant, super::subsystems::DbReport)>,
    /// When the probe in flight started.
    db_probing: Option<Instant>,
    /// Whether the datastore's last verdict was "failing" (logged once).
    db_failing: bool,
    script: Option<bool>,
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
    /// Shared with the lease calls running in the background.
    lease: Arc<Mutex<LeaseState>>,
    shared: Shared,
    hooks: Arc<ApiHooks>,
    /// What the API's TLS listener accepts connections with (a revocation
    /// list from `replace-node` replaces it).
    server_tls: tokio::sync::watch::Sender<Arc<rustls::ServerConfig>>,
    /// A peer replacement is being prepared in the background.
    replacing: Arc<std::sync::atomic::AtomicBool>,
    control_rx: mpsc::Receiver<Control>,
    /// Releases asked through the enrolment endpoint (`deploy --force`).
    release: (mpsc::Sender<crate::enrol::ReleaseRequest>, mpsc::Receiver<crate::enrol::ReleaseRequest>),
    /// The loop stopped for a release: the datastore and K3s stop too.
    released: bool,
    done_tx: mpsc::Sender<Completion>,
    done_rx: mpsc::Receiver<Completion>,
    fence_timer: FenceTimer,
    fence_rx: mpsc::Receiver<()>,
    started: Instant,
    counters: Counters,
    peer_last_heard: Option<Instant>,
    health: Vec<(Component, bool)>,
    replication: Option<ReplicationView>,
    last_failover: Option<FailoverView>,
    promotion: Option<PromotionTiming>,
    /// Background work that must not run twice at once (service restarts,
    /// durability changes), by what it works on.
    in_flight: Arc<Mutex<BTreeSet<&'static str>>>,
    checks: Arc<Mutex<LocalChecks>>,
    /// The peer's entitlement last published (as leader) and this node's own (as follower).
    told: (Option<String>, bool),
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Why [`Driver::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A signal: the agent stops.
    Stopped,
    /// A release (`deploy --force`): the node's membership is to be set aside.
    Released,
}

/// Phases of a promotion in progress, for `status` and the failover benchmark.
struct PromotionTiming {
    decided: Instant,
    silent_ms: Option<u64>,
    promoted: Option<Instant>,
    /// When taking the VIP started and ended (it is taken as the promotion starts).
    vip: Option<(Instant, Instant)>,
}

/// Time limit for starting, stopping or restarting a service.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a datastore probe may stay unanswered before it counts as a
/// failure (one that fails, such as a refused connection, counts at once).
/// A PostgreSQL that is slow (a checkpoint on slow storage, a loaded
/// machine) is not fixed by a restart, which only adds crash recovery;
/// PostgreSQL's own connection timeout here is as long.
const DB_PROBE_STUCK: Duration = Duration::from_secs(10);

/// How long a restart may keep a component's probes from counting (it
/// may wait behind a promotion or a rejoin for the datastore).
const RESTART_LIMIT: Duration = Duration::from_secs(120);

/// How long a hand-over's clean shutdown may take before it is made
/// immediate (and the hand-over withdrawn).
const HANDOVER_STOP: Duration = Duration::from_secs(10);

/// How long a stopping leader waits for its peer to take over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(15);

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

/// The background-work key of a component's restart.
fn restart_key(component: Component) -> &'static str {
    match component {
        Component::Postgres => "restart-postgres",
        Component::Kine => "restart-kine",
        Component::K3s => "restart-k3s",
        Component::Network => "restart-network",
        Component::Script => "restart-script",
    }
}

/// Restart `component`: PostgreSQL through the datastore, the others
/// through the service manager (what has no service is left alone).
async fn restart_component(component: Component, db: Option<Arc<dyn Database>>, services: Option<Arc<dyn Services>>) {
    if component == Component::Postgres {
        if let Some(db) = db
            && let Err(e) = db.restart().await
        {
            tracing::error!(error = %format!("{e:#}"), "restarting PostgreSQL failed");
        }
    } else if let (Some(services), Some(name)) = (services, service_name(component)) {
        tracing::debug!(?component, "restarting a service");
        if let Err(e) = services.restart(name, SERVICE_TIMEOUT).await {
            tracing::error!(?component, error = %e, "restart failed");
        }
    }
}

/// The hostMeta found at start. A node without hostMeta but with data (a
/// data directory, or archives of one) is not a new node: its record is
/// recovered from the peer, it never starts a new cluster over that data.
fn local_meta(dir: &std::path::Path, cluster: &str, has_data: bool) -> LocalMeta {
    match hostmeta::load(dir, cluster) {
        Ok(Some(meta)) => LocalMeta::Loaded(meta),
        Ok(None) if has_data => {
            tracing::error!(
                "no hostMeta, but the PostgreSQL data directory (or an archive of it) holds data: this node's \
                 record will be recovered from the peer; it never starts a new cluster over existing data"
            );
            LocalMeta::Unusable
        }
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
        let mut settings = Settings::from_config(&cfg);
        if subsystems.database.is_none() {
            // No datastore here, so nothing that commits could wait for.
            settings.durability = crate::config::Durability::Async;
        }
        let has_data = subsystems.database.as_ref().is_some_and(|db| db.has_data());
        let machine = Machine::new(settings, local_meta(&state_dir, &cfg.cluster.name, has_data));
        let (control_tx, control_rx) = mpsc::channel(8);
        let hooks = Arc::new(ApiHooks {
            kubeconfig: subsystems.k3s.as_ref().map(|k3s| k3s.kubeconfig_path()),
            ..ApiHooks::with_control(control_tx)
        });
        // Filled by `publish` below, before the API serves anything.
        let shared: Shared = Arc::new(RwLock::new(Published {
            hostmeta: None,
            status: NodeStatus::default(),
            counters: Counters::default(),
            election: None,
            archive: None,
        }));
        let addr = cfg.node.api_addr();
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the agent API on {addr}"))?;
        let unix = server::bind_unix(&socket)?;
        let (server_tls, server_config) = tokio::sync::watch::channel(tls.server_config()?);

        let peer = AgentClient::https(&format!("https://{}", cfg.peer.api_addr()), &tls, None, probe_budget(&cfg))?;
        let lease_client = match (cfg.cluster.witness.mode, cfg.cluster.witness.targets.first()) {
            (WitnessMode::Arbiter, Some(target)) => {
                Some(LeaseClient::new(target, &tls, &cfg.cluster.name, &cfg.node.name, cfg.cluster.witness.lease_ttl)?)
            }
            _ => None,
        };
        let (done_tx, done_rx) = mpsc::channel(16);
        let (fence_tx, fence_rx) = mpsc::channel(4);
        let fence_timer = FenceTimer::spawn(subsystems.vip.clone(), subsystems.database.clone(), fence_tx);
        let mut subsystems = subsystems;
        let kine = match (subsystems.kine.take(), &subsystems.services) {
            (Some(settings), Some(services)) => {
                settings.write_ca()?;
                services.configure(&settings.spec()).await.context("configuring Kine")?;
                services.start(crate::kine::SERVICE, SERVICE_TIMEOUT).await.context("starting Kine")?;
                tracing::info!(listen = %settings.listen, datastore = %settings.db_host, "Kine started");
                Some(KineRun {
                    settings,
                    recovery: Arc::new(tokio::sync::Mutex::new(KineRecovery::new(RecoveryPolicy::default()))),
                    healthy: Arc::default(),
                })
            }
            (Some(_), None) => {
                tracing::warn!("Kine needs the service manager; running without it");
                None
            }
            _ => None,
        };
        let k3s = match (subsystems.k3s.take(), &subsystems.services) {
            (Some(settings), Some(_)) if settings.available() => Some(K3sRun {
                tls_dir: settings.tls_dir(),
                kubeconfig: settings.kubeconfig_path(),
                settings,
                started: false,
                health: Arc::default(),
                kubeconfig_written: Arc::default(),
            }),
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
            lease: Arc::new(Mutex::new(LeaseState::default())),
            shared,
            hooks,
            server_tls,
            replacing: Arc::default(),
            control_rx,
            release: mpsc::channel(1),
            released: false,
            done_tx,
            done_rx,
            fence_timer,
            fence_rx,
            started: Instant::now(),
            counters: Counters::default(),
            peer_last_heard: None,
            health: Vec::new(),
            replication: None,
            last_failover: None,
            promotion: None,
            in_flight: Arc::new(Mutex::new(BTreeSet::new())),
            checks: Arc::default(),
            told: (None, false),
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

    /// Where the API finds what takes a backup on request.
    pub fn backups(&self) -> &std::sync::OnceLock<Arc<super::scheduler::Taker>> {
        &self.hooks.backups
    }

    /// What the API serves; the WAL archiver and the backup schedule publish into it too.
    pub fn shared(&self) -> Shared {
        self.shared.clone()
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Feed one input to the machine, carry out its actions, and hand the
    /// fence deadline to the timer.
    async fn step(&mut self, input: Input) {
        let actions = self.machine.step(self.now(), input);
        self.execute(actions).await;
        self.fence_timer.set(self.machine.fence_deadline().map(|d| self.started + d));
    }

    /// Run until SIGTERM or Ctrl-C. A leader that is asked to stop hands
    /// over to its peer first when it can (and waits up to
    /// [`HANDOVER_TIMEOUT`] for the peer to lead).
    /// Where a release (`deploy --force`) is asked for.
    pub fn release_requests(&self) -> mpsc::Sender<crate::enrol::ReleaseRequest> {
        self.release.0.clone()
    }

    pub async fn run(mut self) -> anyhow::Result<Ended> {
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
        let mut stopping: Option<Instant> = None;
        let hooks = self.hooks.clone();
        loop {
            if let Some(since) = stopping
                && (!self.machine.leading() && self.machine.peer_leading() || since.elapsed() > HANDOVER_TIMEOUT)
            {
                break;
            }
            tokio::select! {
                // A fence the timer carried out reaches the machine first;
                // the tick comes last.
                biased;
                Some(()) = self.fence_rx.recv() => {
                    self.step(Input::FenceDeadlinePassed).await;
                    self.fence_timer.acknowledge();
                }
                Some(done) = self.done_rx.recv() => {
                    self.note_completion(done);
                    self.step(Input::Done(done)).await;
                    if matches!(done, Completion::HandedOver(Some(_))) {
                        // The peer promotes once it sees the shutdown
                        // checkpoint: publish it and tell the peer to look now.
                        self.publish();
                        self.wake_peer();
                    }
                }
                () = hooks.wake.notified() => ticker.reset_immediately(),
                Some(control) = self.control_rx.recv() => match control {
                    Control::Switchover(reply) => {
                        let answer = if self.machine.can_hand_over() {
                            self.step(Input::Switchover).await;
                            Ok(())
                        } else {
                            Err(format!(
                                "switchover needs this node leading and the peer following in sync (state {}{})",
                                self.machine.state(),
                                if self.machine.leading() && self.machine.sync_standby().is_none() {
                                    ", the peer is not the synchronous standby"
                                } else {
                                    ""
                                }
                            ))
                        };
                        if reply.send(answer).is_err() {
                            tracing::debug!("the switchover caller went away");
                        }
                    }
                    Control::ForceTakeOver(reply) => {
                        let answer = self.machine.can_force();
                        if answer.is_ok() {
                            self.step(Input::ForceTakeOver).await;
                        }
                        if reply.send(answer).is_err() {
                            tracing::debug!("the forced takeover's caller went away");
                        }
                    }
                    Control::Leave(reply) => {
                        let answer = self.machine.can_leave();
                        if answer.is_ok() {
                            self.step(Input::Leave).await;
                        }
                        if reply.send(answer).is_err() {
                            tracing::debug!("the leave's caller went away");
                        }
                    }
                    Control::ReplacePeer(change, reply) => self.replace_peer(change, reply),
                    Control::ApplyPeer(prepared, reply) => {
                        let (change, done) = *prepared;
                        self.apply_peer(change, done, reply);
                    }
                    Control::ProbeWrite(reply) => {
                        let (db, vip) = (self.subsystems.database.clone(), self.cfg.cluster.vip);
                        self.tasks.push(tokio::spawn(async move {
                            let answer = match db {
                                Some(db) => db.probe_write(vip).await.map_err(|e| format!("{e:#}")),
                                None => Err("this agent manages no datastore".to_string()),
                            };
                            if reply.send(answer).is_err() {
                                tracing::debug!("the probe write's caller went away");
                            }
                        }));
                    }
                },
                Some(reply) = self.release.1.recv(), if stopping.is_none() => {
                    if reply.send(Ok(self.machine.state().to_string())).is_err() {
                        tracing::debug!("the release's caller went away");
                    }
                    self.released = true;
                    match self.begin_stop().await {
                        Some(since) => stopping = Some(since),
                        None => break,
                    }
                }
                _ = term.recv(), if stopping.is_none() => match self.begin_stop().await {
                    Some(since) => stopping = Some(since),
                    None => break,
                },
                r = tokio::signal::ctrl_c(), if stopping.is_none() => {
                    r.context("waiting for Ctrl-C")?;
                    match self.begin_stop().await {
                        Some(since) => stopping = Some(since),
                        None => break,
                    }
                }
                // Last: a tick that takes longer than the interval makes the
                // next one ready at once, and polled before the rest it would
                // starve them (operators' requests, completions, signals).
                _ = ticker.tick() => {
                    let began = Instant::now();
                    let obs = self.observe().await;
                    let observed = began.elapsed();
                    self.step(Input::Tick(obs)).await;
                    let acted = began.elapsed();
                    self.upkeep().await;
                    let took = began.elapsed();
                    if took > self.cfg.health.interval {
                        tracing::warn!(event = "slow_tick", observe_ms = observed.as_millis() as u64,
                            act_ms = (acted - observed).as_millis() as u64, upkeep_ms = (took - acted).as_millis() as u64,
                            "a tick took longer than the heartbeat interval");
                    }
                    if let Some(n) = &notifier
                        && let Err(e) = n.watchdog()
                    {
                        tracing::warn!(error = %e, "pinging the systemd watchdog failed");
                    }
                }
            }
            self.publish();
        }
        // A release stops the services and sets the data aside while the
        // unit stays active: the watchdog goes on being pinged meanwhile.
        let _pinging = notifier
            .filter(|_| self.released)
            .map(|n| crate::enrol::AbortOnDrop(Some(n.spawn_watchdog(Duration::from_secs(5)))));
        self.shutdown().await;
        Ok(if self.released { Ended::Released } else { Ended::Stopped })
    }

    /// A stop was asked for: a leader whose peer can take over hands over
    /// and the loop keeps running until the peer leads (returns when the
    /// handover started); anyone else just stops (`None`).
    async fn begin_stop(&mut self) -> Option<Instant> {
        if self.machine.can_hand_over() {
            tracing::info!(event = "stopping", "agent stopping: handing leadership to the peer first");
            self.step(Input::Switchover).await;
            Some(Instant::now())
        } else {
            tracing::info!(event = "stopping", leading = self.machine.leading(), "agent stopping");
            None
        }
    }

    /// A planned stop hands the VIP and the lease back so the peer can lead.
    async fn shutdown(&mut self) {
        tracing::info!(leading = self.machine.leading(), "agent stopping");
        self.fence_timer.set(None);
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
        if self.released && !self.stop_members().await {
            // Something of the cluster may still run here: the node must
            // not look unconfigured. It starts again as the member it was.
            tracing::error!(event = "release_failed", "not released: a service did not stop");
            self.released = false;
        }
        // The supervisor's services (PostgreSQL, Kine) stop with the agent,
        // cleanly; systemd's units keep running.
        if let Some(services) = &self.subsystems.services
            && let Err(e) = services.shutdown(SERVICE_TIMEOUT).await
        {
            tracing::error!(error = %e, "stopping the services on shutdown failed");
        }
    }

    /// A release: K3s, Kine and PostgreSQL stop whoever runs them, so
    /// nothing of the cluster runs on this node any more; whether they all did.
    async fn stop_members(&mut self) -> bool {
        let mut stopped = true;
        if let Some(services) = &self.subsystems.services {
            let managed = [(self.k3s.is_some(), crate::k3s::SERVICE), (self.kine.is_some(), crate::kine::SERVICE)];
            for (_, name) in managed.into_iter().filter(|(managed, _)| *managed) {
                if let Err(e) = services.stop(name, SERVICE_TIMEOUT).await {
                    tracing::error!(service = name, error = %e, "stopping a service for the release failed");
                    stopped = false;
                }
            }
        }
        if let Some(db) = &self.subsystems.database
            && let Err(e) = db.stop().await
        {
            tracing::error!(error = %format!("{e:#}"), "stopping PostgreSQL for the release failed");
            stopped = false;
        }
        stopped
    }

    /// One round of probes, all at once, each within the tick's budget: the
    /// peer (heartbeat; on a miss the second path and who answers for the
    /// VIP), the witness, and the local datastore.
    async fn observe(&mut self) -> Observation {
        let started = self.now();
        let budget = probe_budget(&self.cfg);
        let cfg = &self.cfg;
        let vip = self.subsystems.vip.clone();
        // Once the peer has missed a heartbeat, the second path (its ports)
        // and the link (who answers ARP for the VIP) are asked at the same
        // time as the next heartbeat, so a tick stays within its budget.
        let suspect = self.machine.missed_heartbeats() > 0;
        let peer_probe = async {
            let second = async move {
                // `health.checks.network: false`: misses are not confirmed over the peer's ports.
                suspect
                    && cfg.health.checks.network
                    && observe::second_path(cfg.peer.ip, cfg.postgres.port, cfg.peer.api_port, budget).await
            };
            let elsewhere = async {
                let vip = vip.as_ref().filter(|_| suspect)?;
                match vip.held_elsewhere(budget).await {
                    Ok(held) => Some(held),
                    Err(e) => {
                        tracing::warn!(error = %e, "asking the link who answers for the VIP failed");
                        None
                    }
                }
            };
            let ((heartbeat, why), second, elsewhere) = tokio::join!(observe::heartbeat(&self.peer), second, elsewhere);
            match heartbeat {
                Heartbeat::Ok { .. } => (heartbeat, None, None),
                Heartbeat::Missed => {
                    tracing::debug!(reason = why.as_deref().unwrap_or("?"), "heartbeat missed");
                    (heartbeat, suspect.then_some(second), elsewhere)
                }
            }
        };
        let lease_client = &self.lease_client;
        let lease = self.lease.clone();
        let leading = self.machine.leading();
        let witness_probe = async {
            match cfg.cluster.witness.mode {
                WitnessMode::None => WitnessView::NoOpinion,
                WitnessMode::Gateway => observe::gateway(&cfg.cluster.witness.targets, budget).await,
                // Within the tick's budget like every probe: a witness that
                // does not answer must not delay the heartbeat's news (the
                // leader's fence deadline counts from it).
                WitnessMode::Arbiter => match lease_client {
                    Some(client) => tokio::time::timeout(budget, observe::arbiter(client, &lease, leading))
                        .await
                        .unwrap_or(WitnessView::ArbiterUnreachable),
                    None => WitnessView::ArbiterUnreachable,
                },
            }
        };
        let ((heartbeat, second_path, vip_elsewhere), witness) = tokio::join!(peer_probe, witness_probe);
        let (pg_health, position, replication, view) = self.local_checks();
        // Without a datastore on this agent there is nothing to lose: the
        // peer counts as streaming whenever it answers.
        let replication = match (&self.subsystems.database, self.machine.leading()) {
            (None, true) => Some(Replication {
                sync_configured: false,
                peer_streaming: matches!(heartbeat, Heartbeat::Ok { .. }),
                peer_in_sync: false,
            }),
            _ => replication.map(|r| self.effective(r, &heartbeat)),
        };
        match heartbeat {
            Heartbeat::Ok { .. } => self.peer_last_heard = Some(Instant::now()),
            Heartbeat::Missed => self.counters.heartbeats_missed_total += 1,
        }
        let mut health = Vec::new();
        if let Some(ok) = pg_health.filter(|_| self.cfg.health.checks.postgres) {
            health.push((Component::Postgres, ok));
        }
        if let Some(ok) = self.checks.lock().unwrap_or_else(|p| p.into_inner()).script {
            health.push((Component::Script, ok));
        }
        let k3s_ready = self.k3s.as_ref().and_then(|k| k.health.lock().unwrap_or_else(|p| p.into_inner()).ready);
        if let Some(ready) = k3s_ready.filter(|_| self.cfg.health.checks.kubernetes_api) {
            health.push((Component::K3s, ready));
        }
        self.health = health.clone();
        self.replication = view;
        let peer_called_at = self.hooks.last_health_call().map(|t| t.saturating_duration_since(self.started));
        let arbiter = self.lease.lock().unwrap_or_else(|p| p.into_inner()).record.clone();
        Observation {
            started,
            heartbeat,
            second_path,
            witness,
            arbiter,
            health,
            position,
            replication,
            vip_elsewhere,
            peer_called_at,
        }
    }

    /// The latest datastore report (a fresh probe is started in the
    /// background for the next tick), and the custom script's result: health,
    /// position, replication, and the view for `status`. A probe that has
    /// not answered for three intervals counts as a failed health check.
    #[allow(clippy::type_complexity, reason = "one use, right below")]
    fn local_checks(
        &mut self,
    ) -> (Option<bool>, Option<crate::election::WalPosition>, Option<Replication>, Option<ReplicationView>) {
        let interval = self.cfg.health.interval;
        if let Some(db) = self.subsystems.database.clone() {
            let checks = self.checks.clone();
            let started = Instant::now();
            let mut spawned = false;
            self.spawn_once_then("db-probe", || spawned = true, async move {
                let report = db.observe().await.unwrap_or_else(|e| {
                    tracing::debug!(error = %format!("{e:#}"), "probing PostgreSQL failed");
                    super::subsystems::DbReport::default()
                });
                let mut c = checks.lock().unwrap_or_else(|p| p.into_inner());
                c.db = Some((started, report));
                c.db_probing = None;
            });
            if spawned {
                self.checks.lock().unwrap_or_else(|p| p.into_inner()).db_probing = Some(started);
            }
        }
        if let Some(script) = self.cfg.health.checks.script.clone() {
            let (checks, timeout) = (self.checks.clone(), self.cfg.health.checks.script_timeout);
            self.spawn_once("script", async move {
                let result = observe::script(&script, timeout).await;
                if let Err(e) = &result {
                    tracing::warn!(script = %script.display(), error = %e, "custom health check failed");
                }
                checks.lock().unwrap_or_else(|p| p.into_inner()).script = Some(result.is_ok());
            });
        }
        let mut c = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let stuck =
            c.db_probing.map(|since| since.elapsed()).filter(|waited| *waited > (interval * 3).max(DB_PROBE_STUCK));
        let healthy = match (&c.db, stuck) {
            (_, Some(_)) => Some(false),
            (Some((_, report)), None) => report.healthy,
            (None, None) => None,
        };
        // The verdict the role machine counts towards a restart: said once.
        let failing = healthy == Some(false);
        if failing && !c.db_failing {
            let why = match stuck {
                Some(waited) => format!("the probe has not answered for {:.1}s", waited.as_secs_f64()),
                None => c.db.as_ref().and_then(|(_, r)| r.problem.clone()).unwrap_or_default(),
            };
            tracing::warn!(event = "datastore_failing", problem = %why, "PostgreSQL fails its probe");
        } else if !failing && c.db_failing && healthy.is_some() {
            tracing::info!(event = "datastore_healthy", "PostgreSQL passes its probe again");
        }
        if healthy.is_some() {
            c.db_failing = failing;
        }
        let Some((at, report)) = &c.db else { return (healthy, None, None, None) };
        let fresh = at.elapsed() < interval * 3;
        if !fresh {
            return (healthy, None, None, None);
        }
        (healthy, report.position, report.replication, report.view.clone())
    }

    /// PostgreSQL's word on replication, checked against the agent's own
    /// detection: under silent packet loss the walsender keeps saying
    /// `streaming` until `wal_sender_timeout`, but a peer that misses its
    /// heartbeats is not streaming anything.
    fn effective(&self, mut r: Replication, heartbeat: &Heartbeat) -> Replication {
        let misses = match heartbeat {
            Heartbeat::Ok { .. } => 0,
            Heartbeat::Missed => self.machine.missed_heartbeats() + 1,
        };
        if misses >= self.cfg.health.failure_threshold.max(1) {
            r.peer_streaming = false;
            r.peer_in_sync = false;
        }
        r
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut unrecorded = false;
        for action in actions {
            tracing::debug!(?action, "action");
            match action {
                Action::PersistHostMeta(mut meta) => unrecorded |= !self.persist(&mut meta),
                Action::Promote { epoch, .. } if unrecorded => {
                    // An epoch that is not on disk could be handed out again
                    // after a restart: no promotion without it.
                    tracing::error!(event = "promotion_failed", epoch, "hostMeta could not be written; not promoting");
                    self.background(async { Completion::PromotionFailed });
                }
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
                Action::Promote { epoch, bootstrap, not_after, catch_up } => {
                    self.primary_moved();
                    tracing::debug!(epoch, bootstrap, "promoting the datastore");
                    let silent_ms = self.peer_last_heard.map(|t| t.elapsed().as_millis() as u64);
                    self.promotion =
                        Some(PromotionTiming { decided: Instant::now(), silent_ms, promoted: None, vip: None });
                    let not_after = not_after.map(|d| self.started + d);
                    let db = self.subsystems.database.clone();
                    self.background(async move {
                        match db {
                            Some(db) => match db.promote(epoch, bootstrap, not_after, catch_up).await {
                                Ok(()) => Completion::PromotionDone,
                                Err(e) if e.downcast_ref::<CatchUpFailed>().is_some() => {
                                    tracing::error!(error = %format!("{e:#}"), "not promoting");
                                    Completion::CatchUpFailed
                                }
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
                Action::HandOver => {
                    tracing::info!(event = "handover", "stopping the datastore cleanly for the hand-over");
                    let db = self.subsystems.database.clone();
                    self.background(async move {
                        let checkpoint = match db {
                            Some(db) => match db.hand_over(HANDOVER_STOP).await {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::error!(error = %format!("{e:#}"), "stopping the datastore for the hand-over failed");
                                    None
                                }
                            },
                            None => None,
                        };
                        Completion::HandedOver(checkpoint)
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
                        tracing::error!(error = %e, "taking the VIP failed; retried on the next tick");
                    }
                    self.note_vip_taken(started);
                }
                Action::ReleaseVip => {
                    tracing::debug!(vip = %self.cfg.cluster.vip, "releasing the VIP");
                    if let Some(vip) = &self.subsystems.vip
                        && let Err(e) = vip.release().await
                    {
                        tracing::error!(error = %e, "releasing the VIP failed; retried on the next tick");
                    }
                }
                Action::AcquireLease { epoch } => {
                    let every = self.cfg.cluster.witness.lease_renew;
                    let due = self.lease.lock().unwrap_or_else(|p| p.into_inner()).renewal_due(every);
                    if let (Some(client), true) = (self.lease_client.clone(), due) {
                        let (lease, done, started) = (self.lease.clone(), self.done_tx.clone(), self.started);
                        let force = self.machine.forcing();
                        self.spawn_once("lease", async move {
                            let sent = Instant::now();
                            let view = client.acquire(force).await;
                            tracing::debug!(epoch, force, ?view, "lease");
                            let granted = matches!(view, crate::witness::LeaseView::Mine { .. });
                            let newly = {
                                let mut state = lease.lock().unwrap_or_else(|p| p.into_inner());
                                let was_trusted = state.trusted(sent);
                                if granted {
                                    state.renewed_at = Some(sent);
                                }
                                state.record_view(client.node(), view);
                                granted && !was_trusted
                            };
                            if newly {
                                // The machine may be waiting on it to lead.
                                let granted = Completion::LeaseGranted { sent: sent.duration_since(started) };
                                if done.send(granted).await.is_err() {
                                    tracing::debug!("the agent loop is gone; the lease grant is not passed on");
                                }
                            }
                        });
                    }
                }
                Action::ReleaseLease => {
                    if let Some(client) = self.lease_client.clone() {
                        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = LeaseState::default();
                        self.spawn_once("lease-release", async move {
                            if let Err(e) = client.release().await {
                                tracing::warn!(error = %format!("{e:#}"), "releasing the lease failed; it expires by itself");
                            }
                        });
                    }
                }
                Action::RecordSync(standby) => {
                    if let Some(client) = self.lease_client.clone() {
                        let lease = self.lease.clone();
                        self.spawn_once("sync-record", async move {
                            match client.record_sync(standby.as_deref()).await {
                                Ok(recorded) => {
                                    tracing::info!(event = "sync_standby_recorded", sync_standby = ?recorded,
                                        "the arbiter records the synchronous standby");
                                    let mut state = lease.lock().unwrap_or_else(|p| p.into_inner());
                                    if let Some(record) = &mut state.record {
                                        record.sync_standby = recorded;
                                    }
                                }
                                Err(e) => tracing::warn!(error = %format!("{e:#}"),
                                    "recording the synchronous standby at the arbiter failed"),
                            }
                        });
                    }
                }
                Action::SetDurability { synchronous } => {
                    if let Some(db) = self.subsystems.database.clone() {
                        self.spawn_once("durability", async move {
                            if let Err(e) = db.set_durability(synchronous).await {
                                tracing::warn!(error = %format!("{e:#}"), synchronous, "changing the durability failed");
                            }
                        });
                    }
                }
                Action::RestartService(component) => {
                    if let (Component::K3s, Some(k3s)) = (component, &self.k3s) {
                        k3s.health.lock().unwrap_or_else(|p| p.into_inner()).started(Instant::now());
                    }
                    let (db, services, tx) =
                        (self.subsystems.database.clone(), self.subsystems.services.clone(), self.done_tx.clone());
                    // One restart per component at a time; the machine hears
                    // when it ended (from the one already running, if any),
                    // at the latest after RESTART_LIMIT.
                    self.spawn_once(restart_key(component), async move {
                        let restart = restart_component(component, db, services);
                        if tokio::time::timeout(RESTART_LIMIT, restart).await.is_err() {
                            tracing::error!(?component, limit = ?RESTART_LIMIT, "a restart did not end in time; probing again");
                        }
                        if tx.send(Completion::Restarted(component)).await.is_err() {
                            tracing::debug!("the agent loop ended before a restart ended");
                        }
                    });
                }
            }
        }
    }

    /// Run `work` in the background unless work under the same `key` still runs.
    fn spawn_once(&mut self, key: &'static str, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.spawn_once_then(key, || {}, work);
    }

    /// [`Self::spawn_once`], calling `started` when the work was started.
    fn spawn_once_then(
        &mut self,
        key: &'static str,
        started: impl FnOnce(),
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if !self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
            tracing::debug!(key, "still running from an earlier tick; not started again");
            return;
        }
        started();
        let in_flight = self.in_flight.clone();
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(tokio::spawn(async move {
            work.await;
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        }));
    }

    /// Kine reconnects through the VIP by itself; give it time before restarting it.
    fn primary_moved(&mut self) {
        if let Some(kine) = &self.kine {
            let (recovery, now) = (kine.recovery.clone(), Instant::now());
            self.tasks.push(tokio::spawn(async move { recovery.lock().await.primary_moved(now) }));
        }
    }

    /// Per-tick upkeep: the VIP as the kernel has it; K3s and Kine checked
    /// in the background (a restart there waits for the service).
    async fn upkeep(&mut self) {
        self.reconcile_vip().await;
        self.k3s_upkeep();
        self.k3s_probe();
        if let (Some(kine), Some(services)) = (&self.kine, self.subsystems.services.clone()) {
            let endpoint = kine.settings.etcd_endpoint();
            let (recovery, healthy) = (kine.recovery.clone(), kine.healthy.clone());
            let budget = probe_budget(&self.cfg);
            self.spawn_once("kine-check", async move {
                let mut recovery = recovery.lock().await;
                let ok = match crate::kine::check_and_recover(services.as_ref(), &mut recovery, &endpoint, budget).await
                {
                    Ok(verdict) => verdict == crate::kine::Verdict::Healthy,
                    Err(e) => {
                        tracing::error!(error = %e, "restarting Kine failed");
                        false
                    }
                };
                healthy.store(ok, std::sync::atomic::Ordering::Relaxed);
            });
        }
    }

    /// Make the kernel agree with the role machine about the VIP: a take or
    /// a release that failed is tried again. Nothing is taken back while the
    /// fence timer's fence has not reached the machine yet.
    async fn reconcile_vip(&mut self) {
        let Some(vip) = self.subsystems.vip.clone() else { return };
        let want = self.machine.holds_vip();
        if want && self.fence_timer.fired() {
            return;
        }
        let held = match vip.held().await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "reading the VIP from the kernel failed");
                return;
            }
        };
        if held == want {
            return;
        }
        tracing::warn!(event = "vip_reconciled", vip = %self.cfg.cluster.vip, want, held, "the VIP is not as it should be; correcting");
        let result = if want { vip.take().await } else { vip.release().await };
        if let Err(e) = result {
            tracing::error!(error = %e, want, "correcting the VIP failed");
        }
    }

    /// K3s starts once the election has put the node in a role (its
    /// datastore is then reachable through the local Kine and the VIP), in
    /// the background: starting it never delays the role machine.
    fn k3s_upkeep(&mut self) {
        use crate::election::State;
        let Some(k3s) = &mut self.k3s else { return };
        let settled = matches!(self.machine.state(), State::Leader | State::Follower | State::HealthCheck);
        if k3s.started || !settled {
            return;
        }
        let Some(services) = self.subsystems.services.clone() else { return };
        k3s.started = true;
        k3s.health.lock().unwrap_or_else(|p| p.into_inner()).started(Instant::now());
        let spec = k3s.settings.spec();
        let binary = k3s.settings.binary.clone();
        self.spawn_once("k3s-start", async move {
            let result = async {
                services.configure(&spec).await.context("configuring K3s")?;
                services.start(crate::k3s::SERVICE, SERVICE_TIMEOUT).await.context("starting K3s")?;
                anyhow::Ok(())
            }
            .await;
            match result {
                Ok(()) => tracing::info!(event = "k3s_started", binary = %binary.display(), "K3s started"),
                // Counted as a failed component: the health checks restart it.
                Err(e) => tracing::error!(error = %format!("{e:#}"), "starting K3s failed"),
            }
        });
    }

    /// Check K3s's `/readyz` in the background, and write the kubeconfig for
    /// the VIP once its credentials exist.
    fn k3s_probe(&mut self) {
        let budget = probe_budget(&self.cfg);
        let Some(k3s) = &self.k3s else { return };
        if !k3s.started {
            return;
        }
        let (tls_dir, kubeconfig, health, written) =
            (k3s.tls_dir.clone(), k3s.kubeconfig.clone(), k3s.health.clone(), k3s.kubeconfig_written.clone());
        let (cluster, local, vip_url) = (
            self.cfg.cluster.name.clone(),
            crate::k3s::api_url(self.cfg.node.ip),
            crate::k3s::api_url(self.cfg.cluster.vip),
        );
        self.spawn_once("k3s-probe", async move {
            let creds = match crate::k3s::ClusterCredentials::from_server_tls(&tls_dir) {
                Ok(creds) => creds,
                Err(e) => {
                    tracing::debug!(error = %e, "K3s credentials not there yet");
                    return;
                }
            };
            let ok = crate::k3s::ready(&local, &creds, budget).await.is_ok();
            health.lock().unwrap_or_else(|p| p.into_inner()).observe(ok, Instant::now());
            if !written.load(std::sync::atomic::Ordering::Relaxed) {
                let text = crate::k3s::render_kubeconfig(&cluster, &vip_url, &creds);
                match crate::k3s::write_kubeconfig(&kubeconfig, &text) {
                    Ok(()) => {
                        written.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(path = %kubeconfig.display(), "kubeconfig for the VIP written");
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "writing the kubeconfig failed"),
                }
            }
        });
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

    /// Tell the peer to tick now; it learns what changed from its heartbeat.
    fn wake_peer(&mut self) {
        let peer = self.peer.clone();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = peer.wake().await {
                tracing::debug!(error = %format!("{e:#}"), "waking the peer failed; it looks at its next tick");
            }
        }));
    }

    fn note_completion(&mut self, done: Completion) {
        match (done, &mut self.promotion) {
            (Completion::PromotionDone, Some(p)) => {
                p.promoted = Some(Instant::now());
                self.note_failover();
            }
            (Completion::PromotionFailed | Completion::CatchUpFailed, _) => self.promotion = None,
            _ => {}
        }
    }

    /// The VIP is on this node during a promotion.
    fn note_vip_taken(&mut self, vip_started: Instant) {
        if let Some(p) = &mut self.promotion {
            p.vip.get_or_insert((vip_started, Instant::now()));
        }
        self.note_failover();
    }

    /// Record the failover's phases once the datastore is primary and the VIP here.
    fn note_failover(&mut self) {
        let Some(PromotionTiming { decided, silent_ms, promoted: Some(promoted), vip: Some((vip_started, vip_done)) }) =
            self.promotion
        else {
            return;
        };
        self.promotion = None;
        self.counters.failovers_total += 1;
        let view = FailoverView {
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            from: self.cfg.peer.name.clone(),
            to: self.cfg.node.name.clone(),
            duration_ms: promoted.max(vip_done).duration_since(decided).as_millis() as u64,
            silent_ms,
            promote_ms: promoted.duration_since(decided).as_millis() as u64,
            vip_ms: vip_done.duration_since(vip_started).as_millis() as u64,
        };
        tracing::info!(event = "failover_timing", node = %self.cfg.node.name, silent_ms = ?view.silent_ms,
            promote_ms = view.promote_ms, vip_ms = view.vip_ms, "leadership taken");
        self.last_failover = Some(view);
    }

    /// Write hostMeta. A record that cannot be written is logged loudly:
    /// the epoch it carries is what keeps a restart from resuming stale.
    fn persist(&self, meta: &mut HostMeta) -> bool {
        meta.touch();
        meta.agent_version = VERSION.to_string();
        match hostmeta::store(&self.state_dir, meta) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(event = "hostmeta_write_failed", error = %e, epoch = meta.epoch, "writing hostMeta failed");
                false
            }
        }
    }

    fn publish(&mut self) {
        let told = (self.machine.sync_standby(), self.machine.status().eligible);
        if told != self.told {
            tracing::info!(event = "entitlement", sync_standby = ?told.0, eligible = told.1,
                "who may take over without the peer changed");
            self.told = told;
        }
        let status = self.status();
        let mut p = self.shared.write().unwrap_or_else(|p| p.into_inner());
        p.hostmeta = self.machine.meta().cloned();
        p.election = Some(self.machine.status());
        p.status = status;
        p.counters = self.counters.clone();
    }
}

/// How long one request removing the old machine's Kubernetes identity may take.
const FORGET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replacement keeps asking a Kubernetes API that does not answer.
const FORGET_BUDGET: Duration = Duration::from_secs(150);

impl Driver {
    /// The peer is a new machine under the same name (`replace-node`): on
    /// the leader, with the old machine silent, its slot and Kubernetes
    /// identity are removed and replication is let in from the new address
    /// (PostgreSQL re-reads its files, no restart), in the background so
    /// this loop keeps its pace; then [`Self::apply_peer`] takes the change.
    fn replace_peer(&mut self, change: PeerChange, reply: tokio::sync::oneshot::Sender<Result<PeerChanged, String>>) {
        let refuse = |reply: tokio::sync::oneshot::Sender<Result<PeerChanged, String>>, why: String| {
            tracing::warn!(event = "peer_replacement_refused", reason = %why, "the new peer was not taken");
            if reply.send(Err(why)).is_err() {
                tracing::debug!("the peer replacement's caller went away");
            }
        };
        let cfg = &self.cfg;
        if change.name != cfg.peer.name {
            let why = format!(
                "this node's peer is `{}`, not `{}`: a replacement keeps the node's name",
                cfg.peer.name, change.name
            );
            return refuse(reply, why);
        }
        if change.ip == cfg.node.ip || change.ip == cfg.cluster.vip {
            return refuse(reply, format!("{} is this node's address or the VIP, not a new peer's", change.ip));
        }
        let mut tls = cfg.tls.clone();
        tls.crl = Some(change.crl.clone());
        if let Err(e) = TlsMaterial::from_config(&tls).and_then(|m| m.check_own_certificate()) {
            return refuse(reply, format!("the revocation list: {e}"));
        }
        let moved = (change.ip, change.api_port) != (cfg.peer.ip, cfg.peer.api_port);
        if !moved {
            // Already the peer: only the list to take (or nothing at all).
            let done = PeerChanged::default();
            return self.apply_peer(change, done, reply);
        }
        if !self.machine.leading() {
            let why = format!(
                "only the leader takes a new peer, and this node is {} (let it take over first)",
                self.machine.state()
            );
            return refuse(reply, why);
        }
        let window = cfg.health.interval * cfg.health.failure_threshold.max(1);
        if let Some(heard) = self.peer_last_heard.filter(|t| t.elapsed() < window) {
            let why = format!(
                "the peer {} at {} answered {:.1} s ago: it is not gone; power it off (or stop its agent and PostgreSQL) first",
                cfg.peer.name,
                cfg.peer.ip,
                heard.elapsed().as_secs_f64()
            );
            return refuse(reply, why);
        }
        if self.replacing.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return refuse(reply, "a peer replacement is under way already".into());
        }
        let db = self.subsystems.database.clone();
        let k3s = self.k3s.as_ref().map(|k| k.tls_dir.clone());
        let (node_ip, control) = (cfg.node.ip, self.hooks.control.clone());
        let replacing = self.replacing.clone();
        self.tasks.push(tokio::spawn(async move {
            let prepared = async {
                let mut done = PeerChanged::default();
                // Each step's time, in the journal: this runs on slow hardware too.
                let mut began = Instant::now();
                let mut took = |step: &str| {
                    tracing::info!(event = "peer_replacement_step", step, ms = began.elapsed().as_millis() as u64);
                    began = Instant::now();
                };
                if let Some(db) = db.as_ref().filter(|_| !change.keep_slot) {
                    done.slot_held_bytes = db.drop_peer_slot().await.context("dropping the old machine's slot")?;
                    took("replication slot");
                }
                if let Some(tls_dir) = k3s {
                    let creds = crate::k3s::ClusterCredentials::from_server_tls(&tls_dir)
                        .context("K3s's admin credentials (is K3s running on this node?)")?;
                    let api = crate::k3s::api_url(node_ip);
                    // K3s may be busy (it has just taken over, or the
                    // hardware is slow): asked again within a budget.
                    let deadline = Instant::now() + FORGET_BUDGET;
                    done.kubernetes_removed = loop {
                        match crate::k3s::forget_node(&api, &creds, &change.name, FORGET_TIMEOUT).await {
                            Ok(removed) => break removed,
                            Err(e @ crate::k3s::K3sError::Unreachable { .. }) if Instant::now() < deadline => {
                                tracing::warn!(error = %e, "the Kubernetes API did not answer; asking again");
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            Err(e) => return Err(e).context("removing the old machine from Kubernetes"),
                        }
                    };
                    took("Kubernetes node and node-password secret");
                }
                if let Some(db) = &db {
                    db.set_peer(change.ip).await.context("letting replication in from the new address")?;
                    took("pg_hba.conf and reload");
                }
                anyhow::Ok(done)
            }
            .await;
            match (prepared, control) {
                (Ok(done), Some(control)) => {
                    if let Err(e) = control.send(Control::ApplyPeer(Box::new((change, done)), reply)).await {
                        replacing.store(false, std::sync::atomic::Ordering::SeqCst);
                        tracing::warn!(error = %e, "the agent loop stopped before the new peer was taken");
                    }
                }
                (Ok(_), None) => replacing.store(false, std::sync::atomic::Ordering::SeqCst),
                (Err(e), _) => {
                    replacing.store(false, std::sync::atomic::Ordering::SeqCst);
                    let why = format!("{e:#}");
                    tracing::warn!(event = "peer_replacement_refused", reason = %why, "the new peer was not taken");
                    if reply.send(Err(why)).is_err() {
                        tracing::debug!("the peer replacement's caller went away");
                    }
                }
            }
        }));
    }

    /// Keep the new peer (a cloud-config in the state directory, read at
    /// every start) and take it: the revocation list refuses the old
    /// certificate from now on, heartbeats go to the new address.
    fn apply_peer(
        &mut self,
        change: PeerChange,
        mut done: PeerChanged,
        reply: tokio::sync::oneshot::Sender<Result<PeerChanged, String>>,
    ) {
        self.replacing.store(false, std::sync::atomic::Ordering::SeqCst);
        let answer = self.take_peer(&change, &mut done).map(|()| done).map_err(|e| format!("{e:#}"));
        match &answer {
            Ok(done) if done.changed => tracing::info!(event = "peer_replaced", peer = %change.name, ip = %change.ip,
                slot_held_bytes = ?done.slot_held_bytes, kubernetes_removed = ?done.kubernetes_removed,
                "the peer is a new machine; the old one's certificate is refused"),
            Ok(_) => {}
            Err(e) => tracing::warn!(event = "peer_replacement_refused", reason = %e, "the new peer was not taken"),
        }
        if reply.send(answer).is_err() {
            tracing::debug!("the peer replacement's caller went away");
        }
    }

    fn take_peer(&mut self, change: &PeerChange, done: &mut PeerChanged) -> anyhow::Result<()> {
        let persisted = self.state_dir.join(super::REPLACED_PEER);
        done.persisted = persisted.display().to_string();
        let same = (change.ip, change.api_port) == (self.cfg.peer.ip, self.cfg.peer.api_port)
            && self.cfg.tls.crl.as_deref() == Some(change.crl.as_str());
        if same {
            return Ok(());
        }
        let mut tls = self.cfg.tls.clone();
        tls.crl = Some(change.crl.clone());
        let material = TlsMaterial::from_config(&tls).context("the revocation list")?;
        let block = serde_json::json!({
            "peer": { "name": change.name, "ip": change.ip, "api_port": change.api_port },
            "tls": { "crl": change.crl },
        });
        let text = format!(
            "{}\n# Written by the agent for `gemin_k8s replace-node`: this node's peer is a new machine.\n\
             # Read after the node's other sources.\n{}",
            crate::config::load::HEADER,
            crate::config::yaml::to_yaml(&serde_json::json!({ "geminik8s": block }))
        );
        crate::fsutil::write_atomic(&persisted, text.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", persisted.display()))?;
        self.server_tls.send_replace(material.server_config()?);
        let address = std::net::SocketAddr::new(change.ip, change.api_port);
        self.peer = AgentClient::https(&format!("https://{address}"), &material, None, probe_budget(&self.cfg))?;
        self.cfg.peer.ip = change.ip;
        self.cfg.peer.api_port = change.api_port;
        self.cfg.tls = tls;
        self.peer_last_heard = None;
        done.changed = true;
        Ok(())
    }
}

/// How long one probe of a tick may take: below the heartbeat interval.
fn probe_budget(cfg: &GeminiConfig) -> Duration {
    cfg.health.interval.mul_f64(0.8).max(Duration::from_millis(200))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3s_counts_as_failed_only_after_serving_or_after_the_start_grace() {
        let t0 = Instant::now();
        let mut h = K3sHealth::default();
        h.started(t0);
        assert_eq!(h.ready, None, "starting");
        h.observe(false, t0 + Duration::from_secs(30));
        assert_eq!(h.ready, None, "still starting within the grace");
        h.observe(true, t0 + Duration::from_secs(40));
        assert_eq!(h.ready, Some(true));
        h.observe(false, t0 + Duration::from_secs(41));
        assert_eq!(h.ready, Some(false), "it served, so a failure now counts");

        let restarted = t0 + Duration::from_secs(60);
        h.started(restarted);
        h.observe(false, restarted + Duration::from_secs(1));
        assert_eq!(h.ready, None, "a restart gives the grace again");
        h.observe(false, restarted + K3S_START_GRACE);
        assert_eq!(h.ready, Some(false), "never served within the grace");
    }
}
