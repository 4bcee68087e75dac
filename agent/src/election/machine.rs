//! The state machine itself; the types it speaks are in the parent module.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{Durability, WitnessMode};
use crate::hostmeta::{HostMeta, Role};

use super::{
    Action, ArbiterRecord, Claim, Completion, Component, HandOver, Heartbeat, Input, LocalMeta, Observation,
    PeerStatus, Replication, Settings, State, WalPosition, WitnessView, compare_claims,
};

/// A component must stay healthy this long before its restart budget is
/// given back (a flapping service is not restarted for ever).
const STABLE_AFTER: Duration = Duration::from_secs(30);

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
    healthy_since: Option<Duration>,
    /// A restart was asked for and has not ended: its probes say nothing
    /// (a slow restart must not spend the whole budget by itself).
    restarting: bool,
}

/// The role state machine of one node. See the module documentation for
/// how to drive it.
#[derive(Debug, Clone)]
pub struct Machine {
    s: Settings,
    local: LocalMeta,
    mode: Mode,
    holds_vip: bool,
    /// Last heartbeat answer or second-path success, stamped when it was
    /// read (initially: start). A follower waits from here.
    last_contact: Option<Duration>,
    /// The same contact, stamped when its probe was sent: the peer was
    /// alive after this. A leader's fence deadline counts from here.
    last_contact_sent: Option<Duration>,
    /// Last heartbeat request from the peer. Delays promotion only: the
    /// peer reaching us says nothing about whether it hears us, so it never
    /// keeps a leader from fencing.
    last_called: Option<Duration>,
    /// Last time the witness backed this node (gateway reachable, lease
    /// mine), stamped when the probe was sent.
    last_witness: Option<Duration>,
    /// The time of the latest step.
    clock: Duration,
    /// The peer answered or called since this agent started.
    peer_seen: bool,
    misses: u32,
    last_rtt: Option<Duration>,
    second_path_down: bool,
    /// The peer's status from this tick's heartbeat; `None` when it missed.
    peer: Option<PeerStatus>,
    peer_epoch_seen: u64,
    witness: WitnessView,
    /// Arbiter mode: the arbiter's records as it answered this tick.
    arbiter: Option<ArbiterRecord>,
    /// Another host answered for the VIP this tick.
    vip_elsewhere: bool,
    /// When another host last answered for the VIP (received).
    vip_heard: Option<Duration>,
    position: Option<WalPosition>,
    handing_over: bool,
    /// Election rounds in which this node, a former leader, lost to the
    /// peer's claim without knowing its own position.
    losing_rounds: u32,
    /// A planned hand-over: how far this node's datastore has stopped.
    /// `None` for a hand-over without proof (a failed datastore).
    handover: Option<HandOver>,
    /// When this node withdrew its hand-over (shutdown not clean, or the
    /// peer could not catch up): it resumes leading once the peer has had
    /// time to hear it and still follows.
    withdrawn_at: Option<Duration>,
    /// Follower: the shutdown checkpoint it is promoting past.
    catching_up: Option<WalPosition>,
    /// Follower: a hand-over it could not catch up with; never promoted on again.
    refused: Option<WalPosition>,
    /// The peer refused this node's hand-over (it never promoted, though
    /// its attempt raised its epoch).
    peer_refused: bool,
    needs_rejoin: bool,
    rejoining: bool,
    retry_at: Duration,
    services: BTreeMap<Component, ServiceHealth>,
    /// Leader: the primary's replication as last read.
    replication: Option<Replication>,
    /// Whether it was read this tick.
    replication_fresh: bool,
    /// Leader: since when the peer has not been streaming.
    not_streaming_since: Option<Duration>,
    /// Leader: commits should stop waiting for the peer; until they do,
    /// the peer is no longer told it may take over.
    degrade_wanted: bool,
    /// When `degrade_wanted` was set: the peer's word that it is not
    /// entitled counts only once it can have heard that.
    degrade_marked: Duration,
    /// Leader: this term has told the peer it may take over (it was in
    /// sync). Until then the peer cannot promote on its own.
    told_peer_in_sync: bool,
    /// Follower: may promote on its own until then (modes none and
    /// gateway; see [`Settings::eligibility_window`]).
    eligible_until: Option<Duration>,
    /// An operator forced a takeover: entitled until it happened.
    forced: bool,
    /// Leader: the peer last said it leaves on purpose; kept while it is
    /// silent (its agent stops before its PostgreSQL does), until it
    /// answers again without leaving.
    peer_leaving: bool,
    /// Follower: leaving on purpose ([`Input::Leave`]) until then, or
    /// until the agent starts again (the reboot it leaves for).
    leaving_until: Option<Duration>,
    /// The vote this node publishes, recomputed after every step.
    own_vote: OwnVote,
}

/// A node's published vote with its generation and the peer's generation
/// it was cast on (see [`PeerStatus::vote_gen`]).
#[derive(Debug, Clone)]
struct OwnVote {
    vote: Option<String>,
    generation: u64,
    seen: Option<u64>,
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
            last_contact_sent: None,
            last_called: None,
            last_witness: None,
            clock: Duration::ZERO,
            peer_seen: false,
            misses: 0,
            last_rtt: None,
            second_path_down: false,
            peer: None,
            peer_epoch_seen: 0,
            witness: WitnessView::NoOpinion,
            arbiter: None,
            vip_elsewhere: false,
            vip_heard: None,
            position: None,
            handing_over: false,
            losing_rounds: 0,
            handover: None,
            withdrawn_at: None,
            catching_up: None,
            refused: None,
            peer_refused: false,
            needs_rejoin: false,
            rejoining: false,
            retry_at: Duration::ZERO,
            services: BTreeMap::new(),
            replication: None,
            replication_fresh: false,
            not_streaming_since: None,
            degrade_wanted: false,
            degrade_marked: Duration::ZERO,
            told_peer_in_sync: false,
            leaving_until: None,
            peer_leaving: false,
            eligible_until: None,
            forced: false,
            own_vote: OwnVote { vote: None, generation: rand::random(), seen: None },
        }
    }

    /// Feed one input observed at monotonic time `now`; returns the actions
    /// to run, in order.
    pub fn step(&mut self, now: Duration, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.clock = self.clock.max(now);
        match input {
            Input::ForceTakeOver => match self.can_force() {
                Ok(()) => {
                    tracing::warn!(event = "forced_takeover", node = %self.s.own_name,
                        "an operator forces this node to take over; writes only the old leader has are given up");
                    if self.handing_over && !self.rejoining {
                        // Its own hand-over's peer is gone: its data never
                        // followed anyone, so it may lead again (at a new epoch).
                        tracing::warn!(event = "handover_withdrawn", node = %self.s.own_name,
                            reason = "forced takeover", "the switchover is given up");
                        self.handing_over = false;
                        self.handover = None;
                        self.withdrawn_at = None;
                        self.needs_rejoin = false;
                    }
                    self.forced = true;
                }
                Err(why) => tracing::warn!(%why, "forced takeover refused"),
            },
            Input::FenceDeadlinePassed => {
                if self.leading() {
                    tracing::error!(event = "fenced", node = %self.s.own_name, reason = "fence deadline passed",
                        "the fence timer released the VIP and stopped writes");
                    self.holds_vip = false;
                    self.enter_fenced(&mut out);
                }
            }
            Input::Tick(obs) => self.tick(now, obs, &mut out),
            Input::Done(done) => self.done(now, done, &mut out),
            Input::Leave => match self.can_leave() {
                Ok(()) => {
                    tracing::info!(event = "leaving", node = %self.s.own_name, for_at_most = ?self.s.leave_for,
                        "leaving on purpose: the leader is asked to stop counting on this node");
                    self.leaving_until = Some(now + self.s.leave_for);
                }
                Err(why) => tracing::warn!(%why, "leave refused"),
            },
            Input::Switchover => {
                if self.can_hand_over() {
                    tracing::info!(event = "switchover", node = %self.s.own_name, "handing leadership to the peer");
                    self.hand_over(true, &mut out);
                } else {
                    tracing::warn!(state = %self.state(), peer_reachable = self.peer.is_some(),
                        "switchover needs this node leading and the peer following; ignored");
                }
            }
        }
        self.note_vote();
        out
    }

    /// Whether the node follows the leader (whatever its health overlay:
    /// a follower whose K3s is failing still follows).
    pub fn following(&self) -> bool {
        self.mode == Mode::Follower
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
            vote: self.own_vote.vote.clone(),
            vote_gen: Some(self.own_vote.generation),
            seen_vote_gen: self.own_vote.seen,
            sync_standby: self.sync_standby(),
            eligible: self.mode == Mode::Follower && self.entitled(self.clock),
            leaving: self.leaving(),
            handover: if self.handing_over { self.handover } else { None },
            refused: self.refused,
        }
    }

    /// A planned hand-over under way on this node: how far it has got.
    pub fn handover(&self) -> Option<HandOver> {
        if self.handing_over { self.handover } else { None }
    }

    /// Whether a peer handing over (as heard this tick) lets this node
    /// promote, and past which position it must have replayed first:
    /// `Some(None)` without a proof to wait for (the peer is not handing
    /// over, or its agent gives none), `Some(Some(checkpoint))` once the
    /// peer's datastore shut down cleanly, `None` while it has not (or it
    /// withdrew, or this node already failed to catch up with it).
    fn handover_proof(&self, peer: &PeerStatus) -> Option<Option<WalPosition>> {
        if !peer.handing_over {
            return Some(None);
        }
        match peer.handover {
            None => Some(None),
            Some(HandOver::Clean(c)) if self.refused != Some(c) => Some(Some(c)),
            Some(_) => None,
        }
    }

    /// Leader: the peer, when PostgreSQL says it is the synchronous standby
    /// holding every acknowledged write and no degrade is under way.
    pub fn sync_standby(&self) -> Option<String> {
        let in_sync = self.replication.is_some_and(|r| r.sync_configured && r.peer_in_sync);
        (self.leading() && in_sync && !self.degrade_wanted).then(|| self.s.peer_name.clone())
    }

    /// When a leader in mode `gateway` or `arbiter` must be fenced at the
    /// latest: `fence_timeout` after the last sign (sent) that the peer or the
    /// witness was there. The driver keeps this deadline with a timer of its
    /// own, so a slow tick cannot delay the fence.
    pub fn fence_deadline(&self) -> Option<Duration> {
        if self.s.witness == WitnessMode::None || !self.leading() {
            return None;
        }
        let last = self.last_contact_sent.max(self.last_witness)?;
        Some(last + self.s.fence_timeout)
    }

    /// Follower: leaving on purpose. It refuses to be the synchronous
    /// standby, so its leader stops counting on it through the degrade
    /// handshake, and its entitlement to take over ends with the next word
    /// from the leader (until then the leader cannot have stopped waiting
    /// for it, so taking over would still lose nothing).
    fn leaving(&self) -> bool {
        !self.leading() && self.leaving_until.is_some_and(|until| self.clock <= until)
    }

    /// Whether [`Input::Leave`] would be accepted: only a follower leaves;
    /// a leader hands over first (a switchover).
    pub fn can_leave(&self) -> Result<(), String> {
        if self.leading() {
            return Err(format!("{} leads: switch over to its peer before it leaves", self.s.own_name));
        }
        Ok(())
    }

    /// Whether an operator may force this node to take over: it follows (or
    /// waits in an election), its peer has missed its heartbeats, and no
    /// other host answers for the VIP (a peer still serving it must be
    /// stopped first, or two nodes would take writes).
    pub fn can_force(&self) -> Result<(), String> {
        if !matches!(self.mode, Mode::Follower | Mode::Election) || self.meta().is_none() {
            return Err(format!("this node is {} and cannot be forced to take over", self.state()));
        }
        if self.misses < self.s.failure_threshold {
            return Err("the peer still answers: use a planned switchover instead".into());
        }
        if self.vip_elsewhere {
            return Err("another host still answers for the VIP: power the old leader off first".into());
        }
        if !self.second_path_down {
            return Err("the old leader's PostgreSQL or agent port still answers: stop it first".into());
        }
        Ok(())
    }

    /// Whether a forced takeover is under way.
    pub fn forcing(&self) -> bool {
        self.forced
    }

    /// Why this follower does not take over although its leader is gone,
    /// for `status`; `None` when it would (or the leader is there).
    pub fn takeover_blocked(&self) -> Option<String> {
        if self.mode != Mode::Follower && self.mode != Mode::Election || !self.peer_down_confirmed() {
            return None;
        }
        if self.vip_elsewhere {
            return Some("another host answers for the VIP: the peer still serves it".into());
        }
        if self.entitled(self.clock) {
            return None;
        }
        Some(match self.s.witness {
            WitnessMode::Arbiter => format!(
                "the arbiter does not record this node as the synchronous standby (it records {}): \
                 the leader may have acknowledged writes this node lacks; wait for it, or force a failover \
                 (`gemin_k8s failover --force`) to accept losing them",
                self.arbiter.as_ref().and_then(|a| a.sync_standby.as_deref()).unwrap_or("none")
            ),
            _ => "this node was not the synchronous standby when it last heard the leader (or heard it too \
                  long ago): the leader may have acknowledged writes this node lacks; wait for it, or force a \
                  failover (`gemin_k8s failover --force`) to accept losing them"
                .into(),
        })
    }

    /// Who this node thinks should lead.
    fn vote(&self) -> Option<String> {
        let me = || Some(self.s.own_name.clone());
        let peer = || Some(self.s.peer_name.clone());
        match self.mode {
            // A fenced node votes on the claims like everyone else: the peer
            // may hold more than it does.
            Mode::Leader | Mode::Promoting { .. } => me(),
            // Its datastore is still stopping: until it has, it may take
            // writes the peer would not have.
            Mode::Demoting => None,
            _ if self.handing_over => peer(),
            _ => {
                let status = self.peer.as_ref()?;
                let pm = status.meta.as_ref()?;
                if !status.leading && self.i_win_against(status, pm) {
                    me()
                } else if matches!(self.mode, Mode::Init | Mode::Election) && self.unfenced_former_leader() {
                    // A former leader after a restart: its datastore may
                    // still run as the primary (only the agent died), so it
                    // never votes the peer in before it has stopped it.
                    None
                } else {
                    peer()
                }
            }
        }
    }

    /// This node's record says it led and it never fenced: its datastore
    /// may be a running primary.
    fn unfenced_former_leader(&self) -> bool {
        self.meta().is_some_and(|m| m.node.role == Role::Leader && !m.fenced)
    }

    /// Whether the peer (heard this tick) names this node in its vote.
    fn peer_vote_names_me(&self) -> bool {
        self.peer.as_ref().and_then(|p| p.vote.as_deref()) == Some(self.s.own_name.as_str())
    }

    /// Whether the peer (heard this tick) votes for this node, knowing that
    /// this node votes for itself. Votes follow positions each node learns
    /// of the other a heartbeat late, so a vote that just flipped can meet
    /// the peer's vote from before the flip: two nodes acting on such
    /// crossed votes would both lead (a fenced leader resuming on its
    /// follower's old vote as the follower takes over on the fenced
    /// leader's). The peer's vote counts only when cast on this node's
    /// current vote, for itself: then, of two nodes, at most one can act,
    /// since each vote would have been cast after the other.
    fn peer_votes_for_me(&self) -> bool {
        let Some(peer) = &self.peer else { return false };
        let mine = &self.own_vote;
        self.peer_vote_names_me()
            && (peer.vote_gen.is_none() // an agent from before vote generations
                || (mine.vote.as_deref() == Some(self.s.own_name.as_str()) && peer.seen_vote_gen == Some(mine.generation)))
    }

    /// After every step: the vote to publish, a new generation when it
    /// changed, and the peer's generation it was cast on.
    fn note_vote(&mut self) {
        let vote = self.vote();
        if vote != self.own_vote.vote {
            self.own_vote.vote = vote;
            self.own_vote.generation = self.own_vote.generation.wrapping_add(1);
        }
        self.own_vote.seen = self.peer.as_ref().and_then(|p| p.vote_gen);
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
        let in_sync = self.s.durability == Durability::Async || self.sync_standby().is_some();
        self.mode == Mode::Leader && self.peer_can_take_over() && in_sync
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

    /// Whether the peer led when it last answered.
    pub fn peer_leading(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| p.leading)
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
            self.last_contact = Some(now);
            self.last_contact_sent = Some(obs.started);
        }
        match obs.heartbeat {
            Heartbeat::Ok { peer, rtt } => {
                self.last_contact = Some(now);
                self.last_contact_sent = Some(obs.started);
                self.peer_seen = true;
                self.last_rtt = Some(rtt);
                self.misses = 0;
                if let Some(m) = &peer.meta {
                    self.peer_epoch_seen = self.peer_epoch_seen.max(m.epoch);
                }
                if !self.leading() {
                    // Only a leading peer's word entitles this node to take
                    // over; anything else it says (restarting, electing,
                    // degrading) takes the entitlement away.
                    let told = peer.leading
                        && peer.sync_standby.as_deref() == Some(self.s.own_name.as_str())
                        && !self.leaving();
                    self.eligible_until = told.then(|| now + self.s.eligibility_window());
                }
                self.peer_leaving = peer.leaving;
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
            self.last_contact_sent = Some(obs.started);
        }
        self.witness = obs.witness;
        if matches!(obs.witness, WitnessView::GatewayReachable | WitnessView::LeaseHeldByMe) {
            self.last_witness = Some(obs.started);
        }
        self.arbiter = obs.arbiter;
        self.vip_elsewhere = obs.vip_elsewhere == Some(true);
        if self.vip_elsewhere {
            self.vip_heard = Some(now);
        }
        if obs.peer_called_at.is_some() && obs.peer_called_at > self.last_called {
            self.peer_seen = true;
        }
        self.last_called = self.last_called.max(obs.peer_called_at);
        if obs.position.is_some() {
            self.position = obs.position;
        }
        // A datastore that did not answer this tick changes nothing it said
        // before (only a fresh report, or this node's own SetDurability, can
        // tell the peer it is no longer in sync); no decision is taken on it.
        self.replication_fresh = obs.replication.is_some();
        if obs.replication.is_some() || !self.leading() {
            self.replication = obs.replication;
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
                self.take_vip_if_free(out);
            }
            (Mode::Promoting { .. }, Completion::CatchUpFailed) => {
                // Nothing was promoted: the old leader may resume.
                tracing::error!(event = "handover_refused", node = %self.s.own_name, checkpoint = ?self.catching_up,
                    "did not replay past the old primary's shutdown checkpoint in time; not promoting");
                self.refused = self.catching_up.take();
                self.release_vip(out);
                self.mode = Mode::Follower;
                self.retry_at = now + self.s.restart_backoff;
                self.persist_role(Role::Follower, out);
                if self.s.witness == WitnessMode::Arbiter {
                    out.push(Action::ReleaseLease);
                }
            }
            (Mode::Promoting { .. }, Completion::PromotionFailed) => {
                tracing::error!(event = "promotion_failed", node = %self.s.own_name, "promotion failed; staying follower");
                self.catching_up = None;
                self.release_vip(out);
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
            (Mode::Demoting, Completion::HandedOver(checkpoint)) => {
                // PostgreSQL is down: the VIP goes before the peer hears of the checkpoint.
                self.release_vip(out);
                self.mode = Mode::Follower;
                self.needs_rejoin = true;
                self.rejoining = false;
                match checkpoint {
                    Some(c) => {
                        tracing::info!(event = "handover_stopped", node = %self.s.own_name, timeline = c.timeline,
                            checkpoint = %c.lsn, "PostgreSQL shut down cleanly; the peer promotes once it has replayed past the shutdown checkpoint");
                        self.handover = Some(HandOver::Clean(c));
                    }
                    None => self.withdraw(now, "PostgreSQL did not shut down cleanly"),
                }
            }
            (Mode::Follower, Completion::LeaseGranted { sent }) => {
                // Decide now, on the last tick's view of the peer plus the
                // lease, instead of at the next tick: while the peer is
                // gone, a tick's heartbeat runs to its timeout before the
                // machine sees anything.
                self.witness = WitnessView::LeaseHeldByMe;
                self.last_witness = self.last_witness.max(Some(sent));
                self.follow_tick(now, out);
            }
            // Anyone else sees the lease at the next tick.
            (_, Completion::LeaseGranted { .. }) => {}
            (_, Completion::RejoinDone) => {
                self.rejoining = false;
                self.needs_rejoin = false;
            }
            (_, Completion::RejoinFailed) => {
                self.rejoining = false;
                self.needs_rejoin = true;
                self.retry_at = now + self.s.restart_backoff;
            }
            (_, Completion::Restarted(c)) => {
                let h = self.services.entry(c).or_default();
                h.restarting = false;
                h.consecutive_failures = 0;
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
        let was_leader = meta.node.role == Role::Leader;
        // A leader that fenced itself must not resume without the peer: the
        // peer may have taken over meanwhile.
        let former_leader = was_leader && !meta.fenced;
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
                    if i_win && was_leader {
                        // The peer sees our higher claim and steps down; wait.
                        return;
                    }
                    self.become_follower(out);
                } else if i_win && self.peer_votes_for_me() && self.handover_proof(&peer).is_some() {
                    self.lead(now, was_leader, out);
                } else if former_leader && !i_win {
                    // The peer's claim wins: stop the datastore (it may still
                    // take writes) before the peer can have this node's vote.
                    // Judged on this node's own fresh position, or, when its
                    // datastore tells none, after a few rounds without one.
                    self.losing_rounds += 1;
                    if self.position.is_some() || self.losing_rounds >= 3 {
                        tracing::warn!(event = "former_leader_steps_down", node = %self.s.own_name,
                            "the peer's claim wins: stopping this node's datastore before voting for it");
                        self.lose(out);
                    }
                }
            }
            None => {
                // Without the peer's vote only a node entitled to lead on its
                // own does: with an arbiter, by its records; without one, a
                // follower within its eligibility window (never right after a
                // restart), and never a former leader, because the peer may
                // have taken over while this node was away.
                if self.peer_down_confirmed() && self.may_take_over(now) {
                    if former_leader {
                        self.lead(now, true, out);
                    } else if self.fence_window_passed(now) {
                        self.lead(now, false, out);
                    }
                }
            }
        }
    }

    /// No hostMeta on this node (and no data: the driver treats a data
    /// directory without hostMeta as unusable): the bootstrap leader starts
    /// the cluster at epoch 1 once the peer answers and is fresh too, never
    /// while the peer cannot be asked (it may hold the cluster's data).
    /// Otherwise it waits, and recovers its record if the peer has one.
    fn elect_fresh(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.s.own_name != self.s.bootstrap_leader {
            return;
        }
        let peer_is_fresh = self.peer.as_ref().is_some_and(|p| p.meta.is_none() && p.state == State::Election);
        if peer_is_fresh {
            let mut meta = self.s.fresh_meta();
            meta.epoch = 0;
            self.local = LocalMeta::Loaded(meta);
            if !self.start_leading(now, LeadKind::Bootstrap, out) {
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
        // With an arbiter, only a node its records name can get the lease:
        // when they name one of the two, that one wins.
        if self.s.witness == WitnessMode::Arbiter
            && let Some(rec) = &self.arbiter
        {
            let named = |n: &str| {
                rec.last_holder.as_deref() == Some(n)
                    || rec.sync_standby.as_deref() == Some(n)
                    || (rec.last_holder.is_none() && rec.sync_standby.is_none())
            };
            let (me, them) = (named(&self.s.own_name), named(&pm.node.name));
            if me != them {
                return me;
            }
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

    /// Whether a leader that may still live has surely fenced: its deadline
    /// counts from its last contact with this node or the witness, and a
    /// leader still answering for the VIP may have reached the witness then,
    /// even while this node heard nothing else from it.
    fn fence_window_passed(&self, now: Duration) -> bool {
        let last = self.last_contact.max(self.last_called).max(self.vip_heard).unwrap_or(now);
        now.saturating_sub(last) >= self.s.fence_timeout + self.s.promotion_margin
    }

    /// Whether this node may lead without the peer's vote: entitled to, the
    /// gateway reachable in mode `gateway`, and nobody else answering for
    /// the VIP. (In mode `arbiter` the lease decides, in [`Self::lead`].)
    fn may_take_over(&self, now: Duration) -> bool {
        let witness = self.s.witness != WitnessMode::Gateway || self.witness == WitnessView::GatewayReachable;
        witness && !self.vip_elsewhere && self.entitled(now)
    }

    /// Whether this node holds every acknowledged write as far as it can
    /// know, so that leading without the peer loses nothing: with an
    /// arbiter, its records name this node (synchronous standby or last
    /// lease holder, or there are none yet); without one, the leader told it
    /// so less than an eligibility window ago. Configured async: always.
    fn entitled(&self, now: Duration) -> bool {
        if self.s.durability == Durability::Async || self.forced {
            return true;
        }
        let me = Some(self.s.own_name.as_str());
        match self.s.witness {
            WitnessMode::Arbiter => {
                self.witness == WitnessView::LeaseHeldByMe
                    || self.arbiter.as_ref().is_some_and(|a| {
                        a.sync_standby.as_deref() == me
                            || a.last_holder.as_deref() == me
                            || (a.sync_standby.is_none() && a.last_holder.is_none())
                    })
            }
            _ => self.eligible_until.is_some_and(|until| now <= until),
        }
    }

    /// Start leading: `resume` keeps the epoch (a former leader), otherwise
    /// the epoch goes up by one. Returns whether it started; the witness and
    /// the local datastore must allow it.
    fn lead(&mut self, now: Duration, resume: bool, out: &mut Vec<Action>) -> bool {
        let kind = if resume { LeadKind::Resume } else { LeadKind::TakeOver };
        self.start_leading(now, kind, out)
    }

    fn start_leading(&mut self, now: Duration, kind: LeadKind, out: &mut Vec<Action>) -> bool {
        let Some(mut meta) = self.meta().cloned() else { return false };
        let epoch = match kind {
            LeadKind::Resume => meta.epoch.max(1),
            LeadKind::TakeOver | LeadKind::Bootstrap => meta.epoch.max(self.peer_epoch_seen) + 1,
        };
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
        // A standby taking over without the peer's vote must be promoted
        // while it is still entitled to (modes none and gateway).
        let not_after = match (kind, self.peer.is_some(), self.s.witness, self.s.durability) {
            (LeadKind::TakeOver, false, WitnessMode::None | WitnessMode::Gateway, Durability::Synchronous) => {
                self.eligible_until
            }
            _ => None,
        };
        let catch_up = self.peer.as_ref().and_then(|p| self.handover_proof(p)).flatten();
        meta.node.role = Role::Leader;
        meta.peer.role = Role::Follower;
        meta.epoch = epoch;
        meta.fenced = false;
        if let Some(p) = self.position {
            meta.timeline = Some(p.timeline);
            meta.lsn = Some(p.lsn);
        }
        tracing::info!(event = "promoting", node = %self.s.own_name, epoch, kind = ?kind, "taking leadership");
        self.local = LocalMeta::Loaded(meta.clone());
        self.handing_over = false;
        self.handover = None;
        self.withdrawn_at = None;
        self.refused = None;
        self.eligible_until = None;
        self.forced = false;
        self.leaving_until = None;
        self.not_streaming_since = None;
        self.degrade_wanted = false;
        self.told_peer_in_sync = false;
        out.push(Action::PersistHostMeta(meta));
        if self.s.witness == WitnessMode::Arbiter {
            out.push(Action::AcquireLease { epoch });
        }
        self.catching_up = catch_up;
        out.push(Action::Promote { epoch, bootstrap: kind == LeadKind::Bootstrap, not_after, catch_up });
        self.mode = Mode::Promoting { epoch };
        // The VIP comes along at once: until PostgreSQL is primary, clients
        // reach a datastore that refuses writes and answers with an error,
        // rather than an address nobody holds. Given back if the promotion fails.
        self.take_vip_if_free(out);
        true
    }

    fn become_follower(&mut self, out: &mut Vec<Action>) {
        let leader = self.s.peer_name.clone();
        tracing::info!(event = "following", node = %self.s.own_name, %leader, "following the peer");
        self.release_vip(out);
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
        if self.vip_elsewhere && self.peer.is_none() {
            // The peer took the VIP: it leads now, and this node must not write.
            tracing::error!(event = "fenced", node = %self.s.own_name, reason = "another host answers for the VIP",
                "fencing");
            self.fence(out);
            return;
        }
        if let Some(deadline) = self.fence_deadline() {
            // Act on the last tick before the deadline so the fence is in
            // place by then (the driver's timer enforces it regardless).
            if now + self.s.heartbeat_interval >= deadline {
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
        // Only to a peer that has every acknowledged write (the synchronous
        // standby as PostgreSQL last reported it; configured async: one that
        // streams): a peer still rejoining or catching up cannot promote, or
        // must not, and handing over to it would leave nobody leading.
        let peer_has_everything = match self.s.durability {
            Durability::Synchronous => self.sync_standby().is_some(),
            Durability::Async => self.replication.is_some_and(|r| r.peer_streaming),
        };
        let peer_can_take_over = peer_has_everything
            && self
                .peer
                .as_ref()
                .is_some_and(|p| !p.leading && matches!(p.state, State::Follower | State::HealthCheck));
        if critical_failed && peer_can_take_over {
            tracing::error!(event = "giving_up_leadership", node = %self.s.own_name, failed = ?self.failed_components(),
                "a critical component stays failed; handing over");
            self.hand_over(false, out);
            return;
        }
        self.durability(now, out);
        self.take_vip_if_free(out);
    }

    /// Commits wait for the peer whenever it streams. They stop waiting only
    /// after it has stopped streaming for `degrade_after`, and only once the
    /// peer cannot take over on its own: it said so, or it was never told
    /// it may this term, or (arbiter) the arbiter records no synchronous
    /// standby, or (no arbiter) it has been silent for longer than any
    /// eligibility it may hold and no other host answers for the VIP.
    fn durability(&mut self, now: Duration, out: &mut Vec<Action>) {
        let Some(r) = self.replication.filter(|_| self.replication_fresh) else { return };
        let peer = Some(self.s.peer_name.as_str());
        let recorded = self.arbiter.as_ref().map(|a| a.sync_standby.as_deref());
        if self.s.durability == Durability::Async {
            if r.sync_configured {
                out.push(Action::SetDurability { synchronous: false });
            }
            // Async is the operator's choice to risk the tail: a streaming
            // peer may take over, and the arbiter is told so.
            if self.s.witness == WitnessMode::Arbiter && r.peer_streaming && recorded.is_some_and(|r| r != peer) {
                out.push(Action::RecordSync(Some(self.s.peer_name.clone())));
            }
            return;
        }
        // A peer leaving on purpose said it gives up taking over: commits
        // stop waiting for it now, through the degrade handshake below, and
        // do not wait for it again until it answers without leaving.
        let leaving = self.peer_leaving;
        if r.peer_streaming && !leaving {
            self.not_streaming_since = None;
            self.degrade_wanted = false;
            if !r.sync_configured {
                tracing::info!(event = "durability", node = %self.s.own_name, "the peer streams: commits wait for it again");
                out.push(Action::SetDurability { synchronous: true });
            } else if r.peer_in_sync {
                self.told_peer_in_sync = true;
                if self.s.witness == WitnessMode::Arbiter && recorded.is_some_and(|r| r != peer) {
                    out.push(Action::RecordSync(Some(self.s.peer_name.clone())));
                }
            }
            return;
        }
        let since = *self.not_streaming_since.get_or_insert(now);
        if !r.sync_configured {
            return;
        }
        let peer_may_take_over =
            self.told_peer_in_sync || (self.s.witness == WitnessMode::Arbiter && recorded.is_none_or(|r| r == peer));
        if peer_may_take_over && !leaving && now.saturating_sub(since) < self.s.degrade_after {
            return;
        }
        if !self.degrade_wanted {
            self.degrade_wanted = true;
            self.degrade_marked = now;
        }
        // The peer's status must be one it published after hearing that it
        // is no longer in sync: a tick of ours to publish it, one of the
        // peer's to hear it, and one more for its answer to reach us.
        let peer_heard_since = now.saturating_sub(self.degrade_marked) >= self.s.heartbeat_interval * 3;
        let safe = match self.s.witness {
            WitnessMode::Arbiter => match recorded {
                Some(r) if r != peer => true,
                Some(_) => {
                    out.push(Action::RecordSync(None));
                    false
                }
                None => false,
            },
            _ => {
                !self.told_peer_in_sync
                    || (peer_heard_since && self.peer.as_ref().is_some_and(|p| !p.leading && !p.eligible))
                    || (self.peer.is_none() && self.peer_seen && !self.vip_elsewhere && {
                        let heard = self.last_called.max(self.last_contact).unwrap_or(Duration::ZERO);
                        now.saturating_sub(heard) >= self.s.degrade_wait()
                    })
            }
        };
        if safe {
            tracing::warn!(event = "durability", node = %self.s.own_name, degraded_after = ?now.saturating_sub(since),
                "the peer is gone and cannot take over: commits stop waiting for it");
            out.push(Action::SetDurability { synchronous: false });
        }
    }

    fn follow_tick(&mut self, now: Duration, out: &mut Vec<Action>) {
        let Some(peer) = self.peer.clone() else {
            if self.peer_down_confirmed() && self.fence_window_passed(now) && self.may_take_over(now) {
                self.lead(now, false, out);
            }
            return;
        };
        let Some(pm) = peer.meta.as_ref() else { return };
        if self.handover().is_some() && peer.state == State::Promoting {
            // The peer is proving it holds everything of this node's
            // hand-over (it is not primary yet, and may refuse): the
            // hand-over stands until it leads or refuses.
            return;
        }
        if peer.leading && pm.epoch > self.epoch() && !self.needs_rejoin && !self.rejoining {
            self.bump_epoch(pm.epoch);
            self.persist_role(Role::Follower, out);
        }
        if let Some(HandOver::Clean(c)) = self.handover()
            && peer.refused == Some(c)
        {
            self.withdraw(now, "the peer could not replay past the shutdown checkpoint in time");
            self.peer_refused = true;
        }
        if peer.leading {
            self.handing_over = false;
            self.handover = None;
            self.refused = None;
            self.withdrawn_at = None;
            if self.needs_rejoin && !self.rejoining && now >= self.retry_at {
                self.rejoining = true;
                out.push(Action::Rejoin { leader: pm.node.name.clone() });
            }
        } else if self.may_resume(now, &peer, pm) {
            self.resume(now, out);
        } else if self.handover_proof(&peer).is_none() {
            // The peer hands over but has not proven (yet) that this node
            // can have everything: no promotion, not even through the lease.
        } else if self.i_win_against(&peer, pm)
            && (if peer.handing_over { self.peer_vote_names_me() } else { self.peer_votes_for_me() })
        {
            // The peer hands over (it leads no more), or our claim wins and
            // it agrees (also a fenced peer whose data is behind ours).
            self.lead(now, false, out);
        } else if self.witness == WitnessView::LeaseHeldByMe {
            // The arbiter granted us the lease (the leader lost it): it names
            // us the leader now, and the peer cannot lead without it.
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
        if let LocalMeta::Loaded(m) = &mut self.local {
            m.fenced = false;
            out.push(Action::PersistHostMeta(m.clone()));
        }
        self.take_vip_if_free(out);
    }

    // ---- transitions ----

    /// The peer outranks us: release the VIP before anything else, demote,
    /// and rejoin once demoted.
    fn lose(&mut self, out: &mut Vec<Action>) {
        self.step_down(false, out);
    }

    /// Stop the datastore: `clean` through a hand-over's clean shutdown,
    /// otherwise at once, after releasing the VIP. A clean hand-over keeps
    /// the VIP until PostgreSQL is down (released at `HandedOver`): no write
    /// can commit once the shutdown has begun, and meanwhile clients get an
    /// error at once instead of connecting to an address nobody holds (a
    /// connection attempt there costs a client its own retry back-off).
    fn step_down(&mut self, clean: bool, out: &mut Vec<Action>) {
        let peer_epoch = self.peer.as_ref().and_then(|p| p.meta.as_ref()).map_or(0, |m| m.epoch);
        tracing::warn!(event = "demoting", node = %self.s.own_name, peer_epoch, "the peer outranks this node");
        if !clean {
            self.release_vip(out);
        }
        if self.s.witness == WitnessMode::Arbiter {
            out.push(Action::ReleaseLease);
        }
        out.push(if clean { Action::HandOver } else { Action::Demote });
        // Our epoch stays until our data has rejoined the new leader's.
        self.persist_role(Role::Follower, out);
        self.mode = Mode::Demoting;
    }

    /// Give leadership to the peer. `planned`: an operator's switchover,
    /// with the proof (clean shutdown, the peer promotes only once it has
    /// replayed past it); otherwise (a failed datastore) the peer promotes
    /// at once, as the synchronous standby.
    fn hand_over(&mut self, planned: bool, out: &mut Vec<Action>) {
        self.step_down(planned, out);
        self.handing_over = true;
        self.handover = planned.then_some(HandOver::Stopping);
        self.withdrawn_at = None;
        self.peer_refused = false;
    }

    /// Give up a planned hand-over: the peer must not promote on it any more.
    fn withdraw(&mut self, now: Duration, why: &str) {
        tracing::warn!(event = "handover_withdrawn", node = %self.s.own_name, reason = why,
            "the switchover is aborted; resuming leadership once the peer is heard still following");
        self.handover = Some(HandOver::Unclean);
        self.withdrawn_at.get_or_insert(now);
    }

    /// Whether a withdrawn hand-over can end with this node leading again:
    /// the peer has had three intervals to hear the withdrawal (its status
    /// is then one published after it), and it still follows, never
    /// promoted: at an epoch no higher than ours, or higher only by an
    /// attempt it reports it gave up before promoting (it refused).
    fn may_resume(&self, now: Duration, peer: &PeerStatus, pm: &HostMeta) -> bool {
        let Some(at) = self.withdrawn_at.filter(|_| self.handover() == Some(HandOver::Unclean)) else {
            return false;
        };
        let never_promoted = pm.epoch <= self.epoch() || (self.peer_refused && peer.refused.is_some());
        now.saturating_sub(at) >= self.s.heartbeat_interval * 3
            && !peer.leading
            && matches!(peer.state, State::Follower | State::HealthCheck | State::Election)
            && never_promoted
    }

    /// Lead again after a withdrawn hand-over: the datastore (stopped, never
    /// followed anyone) restarts as the primary it was.
    fn resume(&mut self, now: Duration, out: &mut Vec<Action>) {
        tracing::warn!(event = "switchover_aborted", node = %self.s.own_name, epoch = self.epoch(),
            "the peer never promoted: leading again, cluster unchanged");
        self.handing_over = false;
        self.handover = None;
        self.withdrawn_at = None;
        self.peer_refused = false;
        // The peer's refused attempt raised its epoch: lead at least at it,
        // so its claim never outranks this node's data.
        let peer_epoch = self.peer.as_ref().and_then(|p| p.meta.as_ref()).map_or(0, |m| m.epoch);
        self.bump_epoch(peer_epoch);
        self.needs_rejoin = false;
        self.rejoining = false;
        self.mode = Mode::Leader;
        self.last_contact = Some(now);
        self.persist_role(Role::Leader, out);
        out.push(Action::Unfence);
        self.take_vip_if_free(out);
    }

    fn fence(&mut self, out: &mut Vec<Action>) {
        self.release_vip(out);
        out.push(Action::Fence);
        self.enter_fenced(out);
    }

    /// Fenced (the VIP and writes are already stopped): remember it across
    /// restarts, so this node never resumes leading without the peer.
    fn enter_fenced(&mut self, out: &mut Vec<Action>) {
        self.mode = Mode::Fenced;
        if let LocalMeta::Loaded(m) = &mut self.local {
            m.fenced = true;
            out.push(Action::PersistHostMeta(m.clone()));
        }
    }

    /// Let the VIP go (whether or not this node thinks it holds it: the
    /// kernel is told either way).
    fn release_vip(&mut self, out: &mut Vec<Action>) {
        out.push(Action::ReleaseVip);
        self.holds_vip = false;
    }

    fn take_vip_if_free(&mut self, out: &mut Vec<Action>) {
        if self.holds_vip {
            return;
        }
        if self.peer.as_ref().is_some_and(|p| p.leading || p.state == State::Demoting) {
            // Never take the VIP while the peer still leads, or steps down
            // (a clean hand-over keeps it until PostgreSQL is down).
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
            m.fenced &= role == Role::Leader;
            if let Some(r) = peer_role {
                m.peer.role = r;
            } else if role == Role::Follower {
                m.peer.role = Role::Leader;
            }
            out.push(Action::PersistHostMeta(m.clone()));
        }
    }

    // ---- local health ----

    /// Restart a component only after `failure_threshold` failed probes in
    /// a row, with bounded attempts and backoff; its budget comes back only
    /// after it stayed healthy for a while. While a restart runs its probes
    /// are not counted, and the restarted service gets `failure_threshold`
    /// probes of its own.
    fn check_health(&mut self, now: Duration, results: &[(Component, bool)], out: &mut Vec<Action>) {
        for &(c, ok) in results {
            let h = self.services.entry(c).or_default();
            if h.restarting {
                continue;
            }
            if ok {
                let since = *h.healthy_since.get_or_insert(now);
                h.failing = false;
                h.consecutive_failures = 0;
                h.gave_up = false;
                if now.saturating_sub(since) >= STABLE_AFTER {
                    h.attempts = 0;
                }
                continue;
            }
            h.healthy_since = None;
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            if h.consecutive_failures < self.s.failure_threshold {
                continue;
            }
            h.failing = true;
            if !c.restartable() {
                h.gave_up = true;
            } else if now >= h.next_restart {
                if h.attempts < self.s.restart_attempts {
                    h.attempts += 1;
                    h.next_restart = now + self.s.restart_backoff * 2u32.saturating_pow(h.attempts - 1);
                    h.restarting = true;
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

/// How a node starts leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeadKind {
    /// The first formation of the cluster (epoch 1, a new datastore).
    Bootstrap,
    /// A former leader carries on at its epoch.
    Resume,
    /// A new term: the epoch goes up.
    TakeOver,
}
