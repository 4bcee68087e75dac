//! The role state machine: who leads, when to promote, demote, fence and move
//! the VIP. Pure code: no I/O, no clock reads, no async. A driver feeds it
//! [`Input`]s stamped with monotonic time and carries out the [`Action`]s it
//! returns, in order.
//!
//! # Driving the machine
//! Start with [`Machine::new`] and the hostMeta found on disk
//! ([`LocalMeta`]). Then, every heartbeat interval, the driver:
//! 1. sends a heartbeat to the peer's API (reply: the peer's [`PeerStatus`]),
//!    with a timeout below the interval; when it fails, probes the second
//!    path (a TCP connect to the peer's PostgreSQL or API port);
//! 2. asks the witness (gateway reachability or the arbiter's lease);
//! 3. collects the local health results and the local PostgreSQL position,
//!    and the time the peer's latest heartbeat request reached our API;
//! 4. calls [`Machine::step`] with [`Input::Tick`], `now` being monotonic time
//!    since the agent started, read once the observation is complete;
//! 5. executes the returned actions in order, and only then publishes
//!    [`Machine::status`] to the peer API (so the peer never sees a state
//!    whose VIP release has not happened yet).
//!
//! Long actions (Promote, Demote, Rejoin) report back with [`Input::Done`]
//! at any time. An operator's planned switchover is [`Input::Switchover`] on
//! the leader ([`Machine::can_hand_over`] says whether it would be accepted).
//!
//! # Rules
//! - Fresh cluster (no hostMeta on either node): the bootstrap leader leads at
//!   epoch 1; the other node never starts a cluster on its own.
//! - Election with the peer reachable: higher epoch, then higher (timeline,
//!   LSN), then the incumbent leader, then the bootstrap leader ([`compare_claims`]).
//!   The winner leads once the peer's status carries its vote for it, so two
//!   nodes deciding on different snapshots never both lead.
//!   Two leaders meeting after a partition resolve the same way; the loser
//!   releases the VIP before anything else, demotes and rejoins.
//! - Peer unreachable at start: a former leader resumes if the witness allows;
//!   anyone else waits like a follower whose leader failed.
//! - A follower promotes (epoch + 1) only after `failure_threshold` missed
//!   heartbeats, the second path confirming the peer is down, the witness
//!   allowing, and `fence_timeout + promotion_margin` since it last heard the
//!   leader (its own heartbeats, the second path, or the leader's requests).
//! - A leader (witness `gateway` or `arbiter`) that has reached neither peer
//!   nor witness for `fence_timeout` releases the VIP and fences itself; it
//!   acts on the last tick before the deadline, so it is fenced by then. With
//!   witness `none` it keeps leading: a partition then yields two leaders until
//!   it heals (the documented risk of that mode). An arbiter leader that sees
//!   the lease held by the peer fences at once. A fenced leader resumes only
//!   when the peer answers as a follower and votes for it.
//! - Witness `gateway` cannot tell "the peer is dead" from "the link between
//!   the nodes is cut while both still reach the gateway": in that case both
//!   lead until the link heals. Only `arbiter` excludes it.
//! - A failed local service is restarted with bounded attempts and backoff;
//!   a leader whose PostgreSQL (or custom check) stays failed hands over.
//! - The VIP is never taken while the peer reports that it leads.
//! - The wall-clock `last_modified` of hostMeta never influences a decision.

mod machine;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::cmp::Ordering;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Durability, GeminiConfig, WitnessMode};
use crate::hostmeta::{HostMeta, Lsn, Role};

pub use machine::Machine;

/// The state shown by `status`, following the design document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No usable local hostMeta yet (corrupt or foreign and the peer not reachable).
    Init,
    /// Deciding who leads.
    Election,
    Leader,
    Follower,
    /// Leader or follower with a local service being restarted.
    HealthCheck,
    /// Leader or follower that has missed `failure_threshold` heartbeats.
    FaultDetected,
    Promoting,
    Demoting,
    /// A leader that released the VIP and stopped accepting writes.
    Fenced,
}

impl State {
    /// Whether this state is plainly a leading one. A leader in HealthCheck
    /// or FaultDetected leads too: [`PeerStatus::leading`] is the flag to trust.
    pub fn is_active_leader(self) -> bool {
        matches!(self, State::Leader | State::Promoting)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            State::Init => "init",
            State::Election => "election",
            State::Leader => "leader",
            State::Follower => "follower",
            State::HealthCheck => "health_check",
            State::FaultDetected => "fault_detected",
            State::Promoting => "promoting",
            State::Demoting => "demoting",
            State::Fenced => "fenced",
        };
        f.write_str(text)
    }
}

/// What a node tells its peer on every heartbeat (served by the peer API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// `None` while the node has no usable hostMeta.
    pub meta: Option<HostMeta>,
    pub state: State,
    /// Whether the node holds leadership right now (Leader, HealthCheck or
    /// FaultDetected as leader, or Promoting).
    pub leading: bool,
    /// The node is handing leadership over to its peer (planned switchover
    /// or a failed datastore).
    pub handing_over: bool,
    /// Who this node thinks should lead, from its own and its peer's
    /// records. A node leads through an election only with the peer's vote,
    /// so two nodes deciding on different snapshots never both lead.
    pub vote: Option<String>,
    /// Changes whenever `vote` does (from a random start at each agent
    /// start). `None` from an agent that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote_gen: Option<u64>,
    /// The peer's `vote_gen` in the status of the peer this vote was cast
    /// on. A node acts on the peer's vote for it only when that is its
    /// current one: the vote then knew that this node voted for itself,
    /// never a vote from before (see `Machine::peer_votes_for_me`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_vote_gen: Option<u64>,
    /// Leader: the standby that has every acknowledged write and may take
    /// over on its own, read from PostgreSQL (its `synchronous_standby_names`
    /// and the standby's `sync_state`). `None` while commits do not wait for
    /// it (degraded, catching up, or about to degrade).
    #[serde(default)]
    pub sync_standby: Option<String>,
    /// Follower: whether it may promote on its own if the leader failed now
    /// (see [`Settings::eligibility_window`]).
    #[serde(default)]
    pub eligible: bool,
    /// Follower: it leaves on purpose (an upgrade's reboot). It does not
    /// take over while it is away, and its leader stops waiting for it
    /// through the same handshake as a degrade, without waiting out
    /// `degrade_after`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// A node handing over: how far its datastore has stopped. `None` from
    /// an agent that does not say (the peer then promotes as it always did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandOver>,
    /// Follower: the hand-over it refused because it could not prove it had
    /// everything (the old leader may resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<WalPosition>,
}

/// How far a leader handing over has got: it stops writes and shuts its
/// PostgreSQL down cleanly; the peer promotes only once it has replayed
/// past the shutdown checkpoint, so it holds every write the old leader
/// ever made and the old leader can follow it without `pg_rewind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandOver {
    /// Writes are stopped; the clean shutdown is under way.
    Stopping,
    /// Shut down cleanly: the shutdown checkpoint record starts here.
    Clean(WalPosition),
    /// The clean shutdown did not happen (or could not be verified): no
    /// proof can be given, so the peer does not promote and this node
    /// resumes leading.
    Unclean,
}

/// Result of this tick's heartbeat to the peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Heartbeat {
    Ok { rtt: Duration, peer: Box<PeerStatus> },
    Missed,
}

/// The witness's answer this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WitnessView {
    /// Mode `none`.
    NoOpinion,
    /// Mode `gateway`: at least one target answered.
    GatewayReachable,
    /// Mode `gateway`: no target answered.
    GatewayUnreachable,
    /// Mode `arbiter`: the lease is held by this node.
    LeaseHeldByMe,
    /// Mode `arbiter`: the lease is held by the peer.
    LeaseHeldByPeer,
    /// Mode `arbiter`: nobody holds the lease (expired or released).
    LeaseFree,
    /// Mode `arbiter`: the arbiter did not answer.
    ArbiterUnreachable,
}

/// Local components the health checks cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Postgres,
    Kine,
    K3s,
    Network,
    Script,
}

impl Component {
    /// Whether the agent restarts this component when it fails.
    pub fn restartable(self) -> bool {
        matches!(self, Component::Postgres | Component::Kine | Component::K3s)
    }

    /// Whether a leader gives up leadership when this component stays failed.
    pub fn critical(self) -> bool {
        matches!(self, Component::Postgres | Component::Script)
    }
}

/// The local PostgreSQL position, when the database answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WalPosition {
    pub timeline: u32,
    pub lsn: Lsn,
}

/// Replication as the primary's PostgreSQL reports it (never the agent's
/// belief): what commits wait for, and where the peer's standby stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replication {
    /// `synchronous_standby_names` names the peer: commits wait for it.
    pub sync_configured: bool,
    /// The peer streams from this primary (`pg_stat_replication` state `streaming`).
    pub peer_streaming: bool,
    /// The peer is the synchronous standby (`sync_state = 'sync'`) and has
    /// flushed past the point where commits started waiting for it: it holds
    /// every acknowledged write.
    pub peer_in_sync: bool,
}

/// The arbiter's records for this cluster, as it answered this tick.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArbiterRecord {
    /// The node recorded as synchronous standby: the only one that may take
    /// the lease from the last holder without an operator.
    pub sync_standby: Option<String>,
    /// The node that held the lease last.
    pub last_holder: Option<String>,
}

/// Everything the driver learnt during one heartbeat interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// When the probes of this round were sent (all at once). An answer
    /// proves the other side was alive at some time after this, so a leader
    /// counts its fence deadline from here, never from when the answer was
    /// read.
    pub started: Duration,
    pub heartbeat: Heartbeat,
    /// Second path to the peer (its PostgreSQL or API TCP port): `None` when
    /// not probed (the heartbeat answered), otherwise whether it answered.
    pub second_path: Option<bool>,
    pub witness: WitnessView,
    /// Arbiter mode: the arbiter's records, when it answered.
    pub arbiter: Option<ArbiterRecord>,
    /// Latest local health check results; components not listed are unchanged.
    pub health: Vec<(Component, bool)>,
    /// Local PostgreSQL position, when known.
    pub position: Option<WalPosition>,
    /// On a primary: its replication, read from PostgreSQL this tick.
    pub replication: Option<Replication>,
    /// Whether another host answers ARP (or neighbour discovery) for the
    /// VIP; `None` when not probed. Probed when the peer does not answer: a
    /// foreign holder means the peer leads (a follower then never promotes,
    /// a leader stops writing).
    pub vip_elsewhere: Option<bool>,
    /// Monotonic time of the latest heartbeat request received from the
    /// peer, if any. Extends a follower's wait before promoting (the peer was
    /// alive then); never keeps a leader from fencing.
    pub peer_called_at: Option<Duration>,
}

impl Default for Observation {
    fn default() -> Self {
        Observation {
            started: Duration::ZERO,
            heartbeat: Heartbeat::Missed,
            second_path: None,
            witness: WitnessView::NoOpinion,
            arbiter: None,
            health: Vec::new(),
            position: None,
            replication: None,
            vip_elsewhere: None,
            peer_called_at: None,
        }
    }
}

/// Completion of a long action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    PromotionDone,
    PromotionFailed,
    DemotionDone,
    /// A promotion that had to replay past a hand-over's shutdown
    /// checkpoint did not get there in time; the standby was left as it was
    /// (still in recovery on the old timeline).
    CatchUpFailed,
    /// A hand-over's clean shutdown: where its checkpoint starts, `None`
    /// when the datastore did not shut down cleanly.
    HandedOver(Option<WalPosition>),
    RejoinDone,
    RejoinFailed,
    /// A [`Action::RestartService`] ended (whether or not the service came
    /// back: the next probes say).
    Restarted(Component),
    /// The arbiter granted the lease this node asked for (it did not hold a
    /// trusted one), on a request sent at `sent` (the machine's clock).
    LeaseGranted {
        sent: Duration,
    },
}

/// One input to [`Machine::step`].
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Tick(Observation),
    Done(Completion),
    /// The operator asked this node (the leader) to hand over to its peer.
    Switchover,
    /// The driver's fence timer found [`Machine::fence_deadline`] passed and
    /// has already released the VIP and stopped the datastore.
    FenceDeadlinePassed,
    /// An operator forces this follower to take over although it is not
    /// entitled to (its leader is gone and may have acknowledged writes it
    /// lacks). [`Machine::can_force`] says whether it would be accepted.
    ForceTakeOver,
    /// An operator asks this follower to leave on purpose (it is about to
    /// reboot): it gives up taking over until the agent starts again.
    /// [`Machine::can_leave`] says whether it would be accepted.
    Leave,
}

/// Something the driver must do. Actions come in the order they must run.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write hostMeta (the driver stamps `last_modified` and stores it).
    PersistHostMeta(HostMeta),
    /// Replace the unusable local hostMeta with one derived from this peer
    /// copy (`hostmeta::recover_from_peer`).
    RecoverHostMeta(HostMeta),
    /// Make the local PostgreSQL the primary (no-op when it already is) and
    /// record `epoch`; answer with PromotionDone or PromotionFailed.
    /// `bootstrap`: the first formation of the cluster, the only promotion
    /// that may create a new, empty datastore. `not_after`: a promotion of a
    /// standby must not start after this instant (the end of its
    /// eligibility; the driver checks it right before promoting).
    /// `catch_up`: a planned hand-over's proof; the standby must have
    /// replayed past this position (the old primary's shutdown checkpoint)
    /// on its timeline before it is promoted, otherwise the promotion fails
    /// and nothing changed.
    Promote {
        epoch: u64,
        bootstrap: bool,
        not_after: Option<Duration>,
        catch_up: Option<WalPosition>,
    },
    /// Stop the local PostgreSQL acting as primary; answer with DemotionDone.
    Demote,
    /// Hand over: stop the local primary cleanly (bounded; a shutdown that
    /// does not finish in time is made immediate) and answer with
    /// HandedOver and the shutdown checkpoint's position.
    HandOver,
    /// Make the local PostgreSQL a standby of `leader` (pg_rewind, else a
    /// fresh base backup, keeping the old data as a tarball); answer with
    /// RejoinDone or RejoinFailed.
    Rejoin {
        leader: String,
    },
    /// Stop accepting writes (the VIP has been released just before).
    Fence,
    /// Accept writes again after a fence.
    Unfence,
    TakeVip,
    ReleaseVip,
    /// Acquire or renew the arbiter lease for leading at `epoch`.
    AcquireLease {
        epoch: u64,
    },
    ReleaseLease,
    RestartService(Component),
    /// Make commits wait for the peer (`true`) or not, on the local primary.
    SetDurability {
        synchronous: bool,
    },
    /// Arbiter mode, as lease holder: record who the synchronous standby is.
    RecordSync(Option<String>),
}

/// Timing and identity the machine works with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cluster: String,
    pub own_name: String,
    pub own_ip: IpAddr,
    pub peer_name: String,
    pub peer_ip: IpAddr,
    pub vip: IpAddr,
    pub bootstrap_leader: String,
    pub witness: WitnessMode,
    /// Heartbeat period; the driver ticks at least this often.
    pub heartbeat_interval: Duration,
    /// Consecutive missed heartbeats before the peer is suspected.
    pub failure_threshold: u32,
    /// A leader cut off from peer and witness fences itself within this.
    pub fence_timeout: Duration,
    /// Extra wait on top of `fence_timeout` before a follower promotes:
    /// covers the difference between the two nodes' last contact (up to one
    /// heartbeat interval) and the time the fence takes; keep it above one
    /// interval.
    pub promotion_margin: Duration,
    /// Restarts of a failed service before giving up on it.
    pub restart_attempts: u32,
    /// Wait after the first restart; doubles with every further attempt.
    pub restart_backoff: Duration,
    /// Configured durability: synchronous commits (RPO 0) or async.
    pub durability: Durability,
    /// How long the peer must have stopped streaming before the leader lets
    /// commits stop waiting for it (and only when the peer cannot promote).
    pub degrade_after: Duration,
    /// How long a follower stays leaving ([`Input::Leave`]) when it does
    /// not reboot (the operator's command gave up): its leader then counts
    /// on it again.
    pub leave_for: Duration,
}

impl Settings {
    /// Settings from the cloud-config, with `promotion_margin` two heartbeat
    /// intervals, three restart attempts and a 2 s initial backoff.
    pub fn from_config(cfg: &GeminiConfig) -> Settings {
        Settings {
            cluster: cfg.cluster.name.clone(),
            own_name: cfg.node.name.clone(),
            own_ip: cfg.node.ip,
            peer_name: cfg.peer.name.clone(),
            peer_ip: cfg.peer.ip,
            vip: cfg.cluster.vip,
            bootstrap_leader: cfg.cluster.bootstrap_leader.clone(),
            witness: cfg.cluster.witness.mode,
            heartbeat_interval: cfg.health.interval,
            failure_threshold: cfg.health.failure_threshold.max(1),
            fence_timeout: cfg.health.fence_timeout,
            promotion_margin: cfg.health.interval * 2,
            restart_attempts: 3,
            restart_backoff: Duration::from_secs(2),
            durability: cfg.postgres.durability,
            degrade_after: cfg.postgres.degrade_after,
            leave_for: Duration::from_secs(120),
        }
    }

    /// The longest a follower needs from the leader's failure to its
    /// promotion decision, as the simulation asserts it.
    pub fn promotion_bound(&self) -> Duration {
        self.heartbeat_interval * self.failure_threshold
            + self.fence_timeout
            + self.promotion_margin
            + self.heartbeat_interval
    }

    /// How long a follower that was the synchronous standby stays entitled
    /// to promote on its own after it last heard the leader say so (modes
    /// `none` and `gateway`, which have no third party to remember who was
    /// in sync): the promotion bound plus two intervals. Past it the
    /// follower waits for the leader or an operator, because the leader may
    /// have degraded and acknowledged writes it does not have.
    pub fn eligibility_window(&self) -> Duration {
        self.promotion_bound() + self.heartbeat_interval * 2
    }

    /// How long a leader whose peer is unreachable waits, from the peer's
    /// last heartbeat request, before it may degrade: `degrade_after`, and
    /// never less than the peer's eligibility window plus a heartbeat's
    /// flight and one interval, so a follower that could still promote has
    /// run out of time by then.
    pub fn degrade_wait(&self) -> Duration {
        self.degrade_after.max(self.eligibility_window() + self.heartbeat_interval * 2)
    }

    /// A fresh hostMeta for this node.
    pub fn fresh_meta(&self) -> HostMeta {
        HostMeta::fresh(&self.cluster, (&self.own_name, self.own_ip), (&self.peer_name, self.peer_ip), self.vip)
    }
}

/// The local hostMeta as the driver found it at start.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "one value per machine; boxing buys nothing")]
pub enum LocalMeta {
    /// First boot: no file.
    Missing,
    /// Corrupt or from another cluster: recoverable from the peer only.
    Unusable,
    Loaded(HostMeta),
}

/// A node's claim to leadership, as compared after a partition or a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub name: String,
    pub epoch: u64,
    pub position: Option<(u32, Lsn)>,
    /// The node's hostMeta records it as leader.
    pub incumbent: bool,
    pub bootstrap: bool,
}

impl Claim {
    pub fn of(meta: &HostMeta, bootstrap_leader: &str) -> Claim {
        Claim {
            name: meta.node.name.clone(),
            epoch: meta.epoch,
            position: meta.timeline.zip(meta.lsn),
            incumbent: meta.node.role == Role::Leader,
            bootstrap: meta.node.name == bootstrap_leader,
        }
    }
}

/// Order two claims: higher epoch, then higher (timeline, LSN) (unknown is
/// lowest), then the incumbent leader, then the bootstrap leader, then the
/// name (so the order is total and both nodes agree). `Greater` means `a` wins.
/// `last_modified` is deliberately not part of it.
pub fn compare_claims(a: &Claim, b: &Claim) -> Ordering {
    a.epoch
        .cmp(&b.epoch)
        .then(a.position.cmp(&b.position))
        .then(a.incumbent.cmp(&b.incumbent))
        .then(a.bootstrap.cmp(&b.bootstrap))
        .then(b.name.cmp(&a.name))
}
