//! The state machine itself; the types it speaks are in the parent module.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::WitnessMode;
use crate::hostmeta::{HostMeta, Role};

use super::{
    Action, Claim, Completion, Component, Heartbeat, Input, LocalMeta, Observation, PeerStatus, Settings, State,
    WalPosition, WitnessView, compare_claims,
};

/// Where the node is in its life cycle; [`State`] adds the overlays
/// (fault detected, health check) for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Init,
    Election,
    Leader,
    Follower,
    Promoting { epoch: u64 },
    Demoting,
    Fenced,
}

#[derive(Debug, Clone, Copy, Default)]
struct ServiceHealth {
    failing: bool,
    consecutive_failures: u32,
    attempts: u32,
    next_restart: Duration,
    gave_up: bool,
}

/// The role state machine of one node. See the module documentation for
/// how to drive it.
#[derive(Debug, Clone)]
pub struct Machine {
    s: Settings,
    local: LocalMeta,
    mode: Mode,
    holds_vip: bool,
    /// Last heartbeat answer or second-path success (initially: start).
    last_contact: Option<Duration>,
    /// Last heartbeat request from the peer. Delays promotion only: the
    /// peer reaching us says nothing about whether it hears us, so it never
    /// keeps a leader from fencing.
    last_called: Option<Duration>,
    /// Last time the witness backed this node (gateway reachable, lease mine).
    last_witness: Option<Duration>,
    misses: u32,
    last_rtt: Option<Duration>,
    second_path_down: bool,
    /// The peer's status from this tick's heartbeat; `None` when it missed.
    peer: Option<PeerStatus>,
    peer_epoch_seen: u64,
    witness: WitnessView,
    position: Option<WalPosition>,
    handing_over: bool,
    needs_rejoin: bool,
    rejoining: bool,
    retry_at: Duration,
    services: BTreeMap<Component, ServiceHealth>,
}

impl Machine {
    /// A machine for a node that just started, with the hostMeta it found.
    pub fn new(settings: Settings, local: LocalMeta) -> Machine {
        let local = match local {
            LocalMeta::Loaded(m) if m.node.name != settings.own_name || m.cluster != settings.cluster => {
                tracing::error!(file_node = %m.node.name, file_cluster = %m.cluster,
                    "hostMeta describes another node or cluster; treating it as unusable");
                LocalMeta::Unusable
            }
            other => other,
        };
        let mode = if matches!(local, LocalMeta::Unusable) { Mode::Init } else { Mode::Election };
        Machine {
            s: settings,
            local,
            mode,
            holds_vip: false,
            last_contact: None,
            last_called: None,
            last_witness: None,
            misses: 0,
            last_rtt: None,
            second_path_down: false,
            peer: None,
            peer_epoch_seen: 0,
            witness: WitnessView::NoOpinion,
            position: None,
            handing_over: false,
            needs_rejoin: false,
            rejoining: false,
            retry_at: Duration::ZERO,
            services: BTreeMap::new(),
        }
    }

    /// Feed one input observed at monotonic time `now`; returns the actions
    /// to run, in order.
    pub fn step(&mut self, now: Duration, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick(obs) => self.tick(now, obs, &mut out),
            Input::Done(done) => self.done(now, done, &mut out),
            Input::Switchover => {
                if self.can_hand_over() {
                    tracing::info!(event = "switchover", node = %self.s.own_name, "handing leadership to the peer");
                    self.hand_over(&mut out);
                } else {
                    tracing::warn!(state = %self.state(), peer_reachable = self.peer.is_some(),
                        "switchover needs this node leading and the peer following; ignored");
                }
            }
        }
        out
    }

    /// The state for `status`.
    pub fn state(&self) -> State {
        match self.mode {
            Mode::Init => State::Init,
            Mode::Election => State::Election,
            Mode::Promoting { .. } => State::Promoting,
            Mode::Demoting => State::Demoting,
            Mode::Fenced => State::Fenced,
            Mode::Leader | Mode::Follower => {
                if self.misses >= self.s.failure_threshold {
                    State::FaultDetected
                } else if self.services.values().any(|h| h.failing) {
                    State::HealthCheck
                } else if self.mode == Mode::Leader {
                    State::Leader
                } else {
                    State::Follower
                }
            }
        }
    }

    /// What the peer API serves to the peer.
    pub fn status(&self) -> PeerStatus {
        PeerStatus {
            meta: self.meta().cloned(),
            state: self.state(),
            leading: self.leading(),
            handing_over: self.handing_over,
            vote: self.vote(),
        }
    }

    /// Who this node thinks should lead.
    fn vote(&self) -> Option<String> {
        let me = || Some(self.s.own_name.clone());
        let peer = || Some(self.s.peer_name.clone());
        match self.mode {
            Mode::Leader | Mode::Promoting { .. } | Mode::Fenced => me(),
            _ if self.handing_over => peer(),
            _ => {
                let status = self.peer.as_ref()?;
                let pm = status.meta.as_ref()?;
                if status.leading || !self.i_win_against(status, pm) { peer() } else { me() }
            }
        }
    }

    /// Whether the peer (heard this tick) votes for this node.
    fn peer_votes_for_me(&self) -> bool {
        self.peer.as_ref().and_then(|p| p.vote.as_deref()) == Some(self.s.own_name.as_str())
    }

    /// The current hostMeta, when there is a usable one.
    pub fn meta(&self) -> Option<&HostMeta> {
        match &self.local {
            LocalMeta::Loaded(m) => Some(m),
            _ => None,
        }
    }

    /// Whether this node believes it holds the VIP.
    pub fn holds_vip(&self) -> bool {
        self.holds_vip
    }

    /// Whether this node holds leadership (leader, or promoting).
    pub fn leading(&self) -> bool {
        matches!(self.mode, Mode::Leader | Mode::Promoting { .. })
    }

    /// Whether a planned switchover can start now: this node leads and the
    /// peer answered the last heartbeat as a follower able to take over.
    pub fn can_hand_over(&self) -> bool {
        self.mode == Mode::Leader && self.peer_can_take_over()
    }

    fn peer_can_take_over(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| !p.leading && p.meta.is_some() && matches!(p.state, State::Follower | State::HealthCheck))
    }

    /// The witness's latest answer.
    pub fn witness(&self) -> WitnessView {
        self.witness
    }

    /// Round-trip time of the latest answered heartbeat.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// Whether the machine has seen its first tick.
    pub fn started(&self) -> bool {
        self.last_contact.is_some()
    }

    /// Consecutive missed heartbeats.
    pub fn missed_heartbeats(&self) -> u32 {
        self.misses
    }

    /// Components whose restarts are exhausted.
    pub fn failed_components(&self) -> Vec<Component> {
        self.services.iter().filter(|(_, h)| h.gave_up).map(|(c, _)| *c).collect()
    }

    fn tick(&mut self, now: Duration, obs: Observation, out: &mut Vec<Action>) {
        if self.last_contact.is_none() {
            // First tick since start: whatever a previous run left configured,
            // this node holds no VIP until it wins leadership again.
            out.push(Action::ReleaseVip);
        }
        let contact = self.last_contact.get_or_insert(now);
        match obs.heartbeat {
            Heartbeat::Ok { peer, rtt } => {
                *contact = now;
                self.last_rtt = Some(rtt);
                self.misses = 0;
                if let Some(m) = &peer.meta {
                    self.peer_epoch_seen = self.peer_epoch_seen.max(m.epoch);
                }
                self.peer = Some(*peer);
            }
            Heartbeat::Missed => {
                self.misses = self.misses.saturating_add(1);
                self.peer = None;
            }
        }
        self.second_path_down = obs.second_path == Some(false);
        if obs.second_path == Some(true) {
            self.last_contact = Some(now);
        }
        self.witness = obs.witness;
        if matches!(obs.witness, WitnessView::GatewayReachable | WitnessView::LeaseHeldByMe) {
            self.last_witness = Some(now);
        }
        self.last_called = self.last_called.max(obs.peer_called_at);
        if obs.position.is_some() {
            self.position = obs.position;
        }
        if let (Some(p), LocalMeta::Loaded(meta)) = (self.position, &mut self.local) {
            meta.timeline = Some(p.timeline);
            meta.lsn = Some(p.lsn);
        }
        self.check_health(now, &obs.health, out);
        match self.mode {
            Mode::Init | Mode::Election => self.elect(now, out),
            Mode::Leader => self.lead_tick(now, out),
            Mode::Follower => self.follow_tick(now, out),
            Mode::Fenced => self.fenced_tick(now, out),
            Mode::Promoting { epoch } => {
                if self.s.witness == WitnessMode::Arbiter {
                    out.push(Action::AcquireLease { epoch });
                }
            }
            Mode::Demoting => {}
        }
    }

    fn done(&mut self, now: Duration, done: Completion, out: &mut Vec<Action>) {
        match (self.mode, done) {
            (Mode::Promoting { epoch }, Completion::PromotionDone) => {
                tracing::info!(event = "promoted", node = %self.s.own_name, epoch, "promotion complete");
                if self.witness == WitnessView::LeaseHeldByPeer || self.peer_outranks_me(true) {
                    self.lose(out);
                    return;
                }
                self.mode = Mode::Leader;
                self.last_witness = Some(now);
                self.take_vip_if_free(out);
            }
            (Mode::Promoting { .. }, Completion::PromotionFailed) => {
                tracing::error!(event = "promotion_failed", node = %self.s.own_name, "promotion failed; staying follower");
                self.mode = Mode::Follower;
                self.retry_at = now + self.s.restart_backoff;
                self.persist_role(Role::Follower, out);
                if self.s.witness == WitnessMode::Arbiter {
                    out.push(Action::ReleaseLease);
                }
            }
            (Mode::Demoting, Completion::DemotionDone) => {
                self.mode = Mode::Follower;
                self.needs_rejoin = true;
                self.rejoining = false;
            }
            (_, Completion::RejoinDone) => {
                self.rejoining = false;
                self.needs_rejoin = false;
            }
            (_, Completion::RejoinFailed) => {
                self.rejoining = false;
                self.needs_rejoin = true;
                self.retry_at = now + self.s.restart_backoff;
            }
            (mode, done) => tracing::warn!(?mode, ?done, "completion does not match the current state; ignored"),
        }
    }

    // ---- election ----

    fn elect(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !matches!(self.local, LocalMeta::Loaded(_)) && self.try_recover(out) {
            return;
        }
        let Some(meta) = self.meta() else {
            if self.local == LocalMeta::Missing {
                self.elect_fresh(now, out);
            }
            return;
        };
        let former_leader = meta.node.role == Role::Leader;
        match self.peer.clone() {
            Some(peer) => {
                let Some(pm) = peer.meta.as_ref() else {
                    // The peer has no usable record; it recovers from ours.
                    if former_leader {
                        self.lead(now, true, out);
                    }
                    return;
                };
                let i_win = self.i_win_against(&peer, pm);
                if peer.leading {
                    if i_win && former_leader {
                        // The peer sees our higher claim and steps down; wait.
                        return;
                    }
                    self.become_follower(out);
                } else if i_win && self.peer_votes_for_me() {
                    self.lead(now, former_leader, out);
                }
            }
            None => {
                if self.peer_down_confirmed() {
                    if former_leader {
                        self.lead(now, true, out);
                    } else if self.fence_window_passed(now) {
                        self.lead(now, false, out);
                    }
                }
            }
        }
    }

    /// No hostMeta on this node: the bootstrap leader starts the cluster at
    /// epoch 1, unless the peer turns out to have a record (then we recover).
    fn elect_fresh(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.s.own_name != self.s.bootstrap_leader {
            return;
        }
        let peer_is_fresh = self.peer.as_ref().is_some_and(|p| p.meta.is_none());
        if peer_is_fresh || self.peer_down_confirmed() {
            let mut meta = self.s.fresh_meta();
            meta.epoch = 0;
            self.local = LocalMeta::Loaded(meta);
            if !self.lead(now, false, out) {
                self.local = LocalMeta::Missing;
            }
        }
    }

    /// Rebuild our record from the peer's when ours is missing or unusable
    /// and the peer has one for this cluster and this node.
    fn try_recover(&mut self, out: &mut Vec<Action>) -> bool {
        let Some(pm) = self.peer.as_ref().and_then(|p| p.meta.clone()) else { return false };
        if pm.cluster != self.s.cluster {
            tracing::warn!(peer_cluster = %pm.cluster, "the peer belongs to another cluster; not recovering from it");
            return false;
        }
        match HostMeta::derive_from_peer(&pm, &self.s.own_name) {
            Ok(mut meta) => {
                meta.timeline = self.position.map(|p| p.timeline);
                meta.lsn = self.position.map(|p| p.lsn);
                tracing::warn!(event = "hostmeta_recovery", peer = %pm.node.name, epoch = pm.epoch,
                    "recovering hostMeta from the peer's copy");
                out.push(Action::RecoverHostMeta(pm));
                self.local = LocalMeta::Loaded(meta);
                self.mode = Mode::Election;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot recover hostMeta from the peer");
                false
            }
        }
    }

    /// Whether our claim beats the peer's, both read from hostMeta. A node
    /// handing over, or whose data must rejoin the peer's first, loses.
    fn i_win_against(&self, peer: &PeerStatus, pm: &HostMeta) -> bool {
        if self.needs_rejoin || self.rejoining {
            return false;
        }
        if peer.handing_over != self.handing_over {
            return peer.handing_over;
        }
        let Some(mine) = self.meta() else { return false };
        compare_claims(&Claim::of(mine, &self.s.bootstrap_leader), &Claim::of(pm, &self.s.bootstrap_leader))
            == Ordering::Greater
    }

    /// Whether the peer (heard this tick) claims leadership with a claim at
    /// least ours. `equal_counts`: ties count as the peer's.
    fn peer_outranks_me(&self, equal_counts: bool) -> bool {
        let (Some(peer), Some(mine)) = (&self.peer, self.meta()) else { return false };
        let Some(pm) = &peer.meta else { return false };
        if !(peer.leading || pm.node.role == Role::Leader) || peer.handing_over {
            return false;
        }
        match compare_claims(&Claim::of(pm, &self.s.bootstrap_leader), &Claim::of(mine, &self.s.bootstrap_leader)) {
            Ordering::Greater => true,
            Ordering::Equal => equal_counts,
            Ordering::Less => false,
        }
    }

    fn peer_down_confirmed(&self) -> bool {
        self.misses >= self.s.failure_threshold && self.second_path_down
    }

    fn fence_window_passed(&self, now: Duration) -> bool {
        let last = self.last_contact.max(self.last_called).unwrap_or(now);
        now.saturating_sub(last) >= self.s.fence_timeout + self.s.promotion_margin
    }

    /// Start leading: `resume` keeps the epoch (a former leader), otherwise
    /// the epoch goes up by one. Returns whether it started; the witness and
    /// the local datastore must allow it.
    fn lead(&mut self, now: Duration, resume: bool, out: &mut Vec<Action>) -> bool {
        let Some(mut meta) = self.meta().cloned() else { return false };
        let epoch = if resume { meta.epoch.max(1) } else { meta.epoch.max(self.peer_epoch_seen) + 1 };
        let datastore_failing = self.services.get(&Component::Postgres).is_some_and(|h| h.failing);
        if now < self.retry_at || datastore_failing || self.needs_rejoin || self.rejoining {
            return false;
        }
        let allowed = match self.s.witness {
            WitnessMode::None => true,
            WitnessMode::Gateway => self.witness == WitnessView::GatewayReachable,
            WitnessMode::Arbiter => {
                if matches!(self.witness, WitnessView::LeaseFree) {
                    out.push(Action::AcquireLease { epoch });
                }
                self.witness == WitnessView::LeaseHeldByMe
            }
        };
        if !allowed {
            return false;
        }
        meta.node.role = Role::Leader;
        meta.peer.role = Role::Follower;
        meta.epoch = epoch;
        if let Some(p) = self.position {
            meta.timeline = Some(p.timeline);
            meta.lsn = Some(p.lsn);
        }
        tracing::info!(event = "promoting", node = %self.s.own_name, epoch, resume, "taking leadership");
        self.local = LocalMeta::Loaded(meta.clone());
        self.handing_over = false;
        out.push(Action::PersistHostMeta(meta));
        if self.s.witness == WitnessMode::Arbiter {
            out.push(Action::AcquireLease { epoch });
        }
        out.push(Action::Promote { epoch });
        self.mode = Mode::Promoting { epoch };
        true
    }

    fn become_follower(&mut self, out: &mut Vec<Action>) {
        let leader = self.s.peer_name.clone();
        tracing::info!(event = "following", node = %self.s.own_name, %leader, "following the peer");
        out.push(Action::ReleaseVip);
        self.holds_vip = false;
        self.mode = Mode::Follower;
        // The leader's epoch is adopted once our data follows it (rejoined).
        self.persist_role(Role::Follower, out);
        self.needs_rejoin = false;
        self.rejoining = true;
        out.push(Action::Rejoin { leader });
    }

    // ---- steady states ----

    fn lead_tick(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.peer_outranks_me(false) {
            self.lose(out);
            return;
        }
        if self.s.witness == WitnessMode::Arbiter && self.witness == WitnessView::LeaseHeldByPeer {
            tracing::error!(event = "fenced", node = %self.s.own_name, reason = "lease held by peer", "fencing");
            self.fence(out);
            return;
        }
        if self.s.witness != WitnessMode::None {
            let last = self.last_contact.max(self.last_witness).unwrap_or(Duration::ZERO);
            // Act on the last tick before the deadline so the fence is in
            // place by `last + fence_timeout`.
            if now + self.s.heartbeat_interval >= last + self.s.fence_timeout {
                tracing::error!(event = "fenced", node = %self.s.own_name, reason = "neither peer nor witness reachable",
                    "fencing");
                self.fence(out);
                return;
            }
        }
        if self.s.witness == WitnessMode::Arbiter {
            out.push(Action::AcquireLease { epoch: self.epoch() });
        }
        let critical_failed = self.services.iter().any(|(c, h)| c.critical() && h.gave_up);
        let peer_can_take_over =
            self.peer.as_ref().is_some_and(|p| !p.leading && matches!(p.state, State::Follower | State::HealthCheck));
        if critical_failed && peer_can_take_over {
            tracing::error!(event = "giving_up_leadership", node = %self.s.own_name, failed = ?self.failed_components(),
                "a critical component stays failed; handing over");
            self.hand_over(out);
            return;
        }
        self.take_vip_if_free(out);
    }

    fn follow_tick(&mut self, now: Duration, out: &mut Vec<Action>) {
        let Some(peer) = self.peer.clone() else {
            if self.peer_down_confirmed() && self.fence_window_passed(now) {
                self.lead(now, false, out);
            }
            return;
        };
        let Some(pm) = peer.meta.as_ref() else { return };
        if peer.leading && pm.epoch > self.epoch() && !self.needs_rejoin && !self.rejoining {
            self.bump_epoch(pm.epoch);
            self.persist_role(Role::Follower, out);
        }
        if peer.leading {
            self.handing_over = false;
            if self.needs_rejoin && !self.rejoining && now >= self.retry_at {
                self.rejoining = true;
                out.push(Action::Rejoin { leader: pm.node.name.clone() });
            }
        } else if peer.state != State::Fenced && self.i_win_against(&peer, pm) && self.peer_votes_for_me() {
            // The peer hands over, or our claim wins and it agrees.
            self.lead(now, false, out);
        }
        // A lease taken for a promotion that did not happen would keep the
        // peer from leading: give it back.
        if self.mode == Mode::Follower && self.witness == WitnessView::LeaseHeldByMe {
            out.push(Action::ReleaseLease);
        }
    }

    fn fenced_tick(&mut self, now: Duration, out: &mut Vec<Action>) {
        let Some(peer) = self.peer.clone() else { return };
        if self.peer_outranks_me(false) {
            self.lose(out);
            return;
        }
        if peer.leading || !self.peer_votes_for_me() {
            return;
        }
        if self.s.witness == WitnessMode::Arbiter && self.witness != WitnessView::LeaseHeldByMe {
            if self.witness == WitnessView::LeaseFree {
                out.push(Action::AcquireLease { epoch: self.epoch() });
            }
            return;
        }
        tracing::info!(event = "unfenced", node = %self.s.own_name, "peer reachable and following; resuming");
        out.push(Action::Unfence);
        self.mode = Mode::Leader;
        self.last_contact = Some(now);
        self.last_witness = Some(now);
        self.take_vip_if_free(out);
    }

    // ---- transitions ----

    /// The peer outranks us: release the VIP before anything else, demote,
    /// and rejoin once demoted.
    fn lose(&mut self, out: &mut Vec<Action>) {
        let peer_epoch = self.peer.as_ref().and_then(|p| p.meta.as_ref()).map_or(0, |m| m.epoch);
        tracing::warn!(event = "demoting", node = %self.s.own_name, peer_epoch, "the peer outranks this node");
        out.push(Action::ReleaseVip);
        self.holds_vip = false;
        if self.s.witness == WitnessMode::Arbiter {
            out.push(Action::ReleaseLease);
        }
        out.push(Action::Demote);
        // Our epoch stays until our data has rejoined the new leader's.
        self.persist_role(Role::Follower, out);
        self.mode = Mode::Demoting;
    }

    fn hand_over(&mut self, out: &mut Vec<Action>) {
        self.lose(out);
        self.handing_over = true;
    }

    fn fence(&mut self, out: &mut Vec<Action>) {
        out.push(Action::ReleaseVip);
        self.holds_vip = false;
        out.push(Action::Fence);
        self.mode = Mode::Fenced;
    }

    fn take_vip_if_free(&mut self, out: &mut Vec<Action>) {
        if self.holds_vip {
            return;
        }
        if self.peer.as_ref().is_some_and(|p| p.leading) {
            // Never take the VIP while the peer still leads; it steps down first.
            return;
        }
        tracing::info!(event = "taking_vip", node = %self.s.own_name, vip = %self.s.vip, epoch = self.epoch(), "taking the VIP");
        out.push(Action::TakeVip);
        self.holds_vip = true;
    }

    fn epoch(&self) -> u64 {
        self.meta().map_or(0, |m| m.epoch)
    }

    fn bump_epoch(&mut self, epoch: u64) {
        if let LocalMeta::Loaded(m) = &mut self.local {
            m.epoch = m.epoch.max(epoch);
        }
    }

    fn persist_role(&mut self, role: Role, out: &mut Vec<Action>) {
        let peer_role = self.peer.as_ref().and_then(|p| p.meta.as_ref()).map(|m| m.node.role);
        if let LocalMeta::Loaded(m) = &mut self.local {
            m.node.role = role;
            if let Some(r) = peer_role {
                m.peer.role = r;
            } else if role == Role::Follower {
                m.peer.role = Role::Leader;
            }
            out.push(Action::PersistHostMeta(m.clone()));
        }
    }

    // ---- local health ----

    fn check_health(&mut self, now: Duration, results: &[(Component, bool)], out: &mut Vec<Action>) {
        for &(c, ok) in results {
            let h = self.services.entry(c).or_default();
            if ok {
                *h = ServiceHealth::default();
                continue;
            }
            h.failing = true;
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            if !c.restartable() {
                h.gave_up = h.consecutive_failures >= self.s.failure_threshold;
            } else if now >= h.next_restart {
                if h.attempts < self.s.restart_attempts {
                    h.attempts += 1;
                    h.next_restart = now + self.s.restart_backoff * 2u32.saturating_pow(h.attempts - 1);
                    tracing::warn!(event = "service_restart", component = ?c, attempt = h.attempts, "restarting");
                    out.push(Action::RestartService(c));
                } else if !h.gave_up {
                    h.gave_up = true;
                    tracing::error!(event = "service_failed", component = ?c, attempts = h.attempts,
                        "restarts exhausted");
                }
            }
        }
    }
}
