//! Table-driven tests of the decision rules, one node at a time.

use std::time::Duration;

use super::*;
use crate::hostmeta::{HostMeta, Lsn, Role};

const A: &str = "a"; // the bootstrap leader
const B: &str = "b";

pub(super) fn settings(me: &str, witness: WitnessMode) -> Settings {
    let (own_ip, peer_ip) = if me == A { ([10, 0, 0, 1], [10, 0, 0, 2]) } else { ([10, 0, 0, 2], [10, 0, 0, 1]) };
    Settings {
        cluster: "shop-17".into(),
        own_name: me.into(),
        own_ip: own_ip.into(),
        peer_name: if me == A { B } else { A }.into(),
        peer_ip: peer_ip.into(),
        vip: [10, 0, 0, 9].into(),
        bootstrap_leader: A.into(),
        witness,
        heartbeat_interval: Duration::from_secs(1),
        failure_threshold: 3,
        fence_timeout: Duration::from_secs(5),
        promotion_margin: Duration::from_secs(2),
        restart_attempts: 3,
        restart_backoff: Duration::from_secs(2),
        durability: crate::config::Durability::Synchronous,
        degrade_after: Duration::from_secs(10),
        leave_for: Duration::from_secs(30),
    }
}

fn meta(me: &str, role: Role, epoch: u64, pos: Option<(u32, u64)>) -> HostMeta {
    let mut m = settings(me, WitnessMode::None).fresh_meta();
    m.node.role = role;
    m.peer.role = if role == Role::Leader { Role::Follower } else { Role::Leader };
    m.epoch = epoch;
    m.timeline = pos.map(|p| p.0);
    m.lsn = pos.map(|p| Lsn(p.1));
    m.last_modified_unix_ms = 1_700_000_000_000;
    m
}

/// The peer's status; a leading peer votes for itself and tells its
/// follower it is the synchronous standby; others abstain.
fn status(meta: Option<HostMeta>, state: State) -> PeerStatus {
    let leading = state.is_active_leader();
    let vote = meta.as_ref().filter(|_| leading).map(|m| m.node.name.clone());
    let sync_standby = meta.as_ref().filter(|_| leading).map(|m| m.peer.name.clone());
    PeerStatus {
        meta,
        leading,
        state,
        handing_over: false,
        vote,
        vote_gen: None,
        seen_vote_gen: None,
        sync_standby,
        eligible: false,
        leaving: false,
        handover: None,
        refused: None,
    }
}

/// A leading peer that does not (or no longer) count on us as its synchronous standby.
fn not_in_sync(meta: HostMeta) -> PeerStatus {
    PeerStatus { sync_standby: None, ..status(Some(meta), State::Leader) }
}

fn voting(meta: Option<HostMeta>, state: State, vote: &str) -> PeerStatus {
    PeerStatus { vote: Some(vote.into()), ..status(meta, state) }
}

fn seen(peer: PeerStatus, witness: WitnessView) -> Observation {
    Observation {
        heartbeat: Heartbeat::Ok { rtt: Duration::from_millis(1), peer: Box::new(peer) },
        witness,
        ..Observation::default()
    }
}

fn lost(second_path: bool, witness: WitnessView) -> Observation {
    Observation { heartbeat: Heartbeat::Missed, second_path: Some(second_path), witness, ..Observation::default() }
}

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

/// One tick. The first tick of a machine always starts by releasing any VIP
/// a previous run left behind; that is checked here and left out.
fn tick(m: &mut Machine, at: Duration, mut obs: Observation) -> Vec<Action> {
    if obs.started == Duration::ZERO {
        obs.started = at;
    }
    let first = !m.started();
    let mut out = m.step(at, Input::Tick(obs));
    if first {
        assert_eq!(out.first(), Some(&Action::ReleaseVip), "first tick: {out:?}");
        out.remove(0);
    }
    out
}

/// Ticks once a second from `from` to `to` inclusive, collecting actions.
fn ticks(m: &mut Machine, from: u64, to: u64, obs: impl Fn() -> Observation) -> Vec<(u64, Action)> {
    (from..=to).flat_map(|t| tick(m, s(t), obs()).into_iter().map(move |a| (t, a))).collect()
}

fn promotes(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| if let Action::Promote { epoch, .. } = a { Some(*epoch) } else { None })
}

/// A machine that is already the leader at `epoch` and holds the VIP.
fn leader(me: &str, witness: WitnessMode, epoch: u64) -> Machine {
    leader_at(me, witness, epoch, (1, 100))
}

fn leader_at(me: &str, witness: WitnessMode, epoch: u64, pos: (u32, u64)) -> Machine {
    let mut m = Machine::new(settings(me, witness), LocalMeta::Loaded(meta(me, Role::Leader, epoch, Some(pos))));
    let w = match witness {
        WitnessMode::None => WitnessView::NoOpinion,
        WitnessMode::Gateway => WitnessView::GatewayReachable,
        WitnessMode::Arbiter => WitnessView::LeaseHeldByMe,
    };
    let peer = if me == A { B } else { A };
    let out = tick(
        &mut m,
        s(0),
        seen(voting(Some(meta(peer, Role::Follower, epoch, Some((1, 90)))), State::Follower, me), w),
    );
    assert!(promotes(&out).is_some(), "{out:?}");
    assert_eq!(out.last(), Some(&Action::TakeVip), "the VIP comes along as the promotion starts: {out:?}");
    let out = m.step(s(0), Input::Done(Completion::PromotionDone));
    assert_eq!(out, vec![]);
    assert_eq!(m.state(), State::Leader);
    m
}

/// A machine that follows a leader at `epoch`, rejoin done.
fn follower(me: &str, witness: WitnessMode, epoch: u64) -> Machine {
    let mut m = Machine::new(settings(me, witness), LocalMeta::Loaded(meta(me, Role::Follower, epoch, Some((1, 90)))));
    let peer = if me == A { B } else { A };
    let out = tick(
        &mut m,
        s(0),
        seen(status(Some(meta(peer, Role::Leader, epoch, None)), State::Leader), WitnessView::NoOpinion),
    );
    assert_eq!(out[0], Action::ReleaseVip, "{out:?}");
    assert!(out.contains(&Action::Rejoin { leader: peer.into() }), "{out:?}");
    m.step(s(0), Input::Done(Completion::RejoinDone));
    assert_eq!(m.state(), State::Follower);
    m
}

#[test]
fn fresh_cluster_bootstrap_leader_leads_at_epoch_1() {
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Missing);
    let out = tick(&mut a, s(0), seen(status(None, State::Election), WitnessView::NoOpinion));
    assert!(matches!(&out[0], Action::PersistHostMeta(m) if m.epoch == 1 && m.node.role == Role::Leader), "{out:?}");
    assert_eq!(promotes(&out), Some(1));
    assert_eq!(out.last(), Some(&Action::TakeVip), "{out:?}");
    assert_eq!(a.step(s(0), Input::Done(Completion::PromotionDone)), vec![]);

    let mut b = Machine::new(settings(B, WitnessMode::None), LocalMeta::Missing);
    assert_eq!(tick(&mut b, s(0), seen(status(None, State::Election), WitnessView::NoOpinion)), vec![]);
    let out = tick(&mut b, s(1), seen(a.status(), WitnessView::NoOpinion));
    assert!(matches!(&out[..], [Action::RecoverHostMeta(m)] if m.node.name == A), "{out:?}");
    let out = tick(&mut b, s(2), seen(a.status(), WitnessView::NoOpinion));
    assert_eq!(out.first(), Some(&Action::ReleaseVip));
    assert!(out.contains(&Action::Rejoin { leader: A.into() }), "{out:?}");
    assert_eq!((b.state(), b.meta().unwrap().epoch), (State::Follower, 1));
}

#[test]
fn fresh_cluster_needs_both_nodes() {
    // The bootstrap leader never starts a cluster while it cannot ask the
    // peer: the peer may hold the cluster's data.
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Missing);
    assert_eq!(ticks(&mut a, 0, 600, || lost(false, WitnessView::NoOpinion)), vec![]);
    assert_eq!(ticks(&mut a, 601, 620, || lost(true, WitnessView::NoOpinion)), vec![]);
    // Nor over a peer whose record is unusable (it has data but no record).
    let out = tick(&mut a, s(621), seen(status(None, State::Init), WitnessView::NoOpinion));
    assert_eq!(out, vec![]);
    // A fresh peer: epoch 1, and the only promotion allowed to create a datastore.
    let out = tick(&mut a, s(622), seen(status(None, State::Election), WitnessView::NoOpinion));
    assert!(
        out.contains(&Action::Promote { epoch: 1, bootstrap: true, not_after: None, catch_up: None }),
        "first formation: {out:?}"
    );
    // The other node never starts a cluster on its own.
    let mut b = Machine::new(settings(B, WitnessMode::None), LocalMeta::Missing);
    assert_eq!(ticks(&mut b, 0, 600, || lost(false, WitnessView::NoOpinion)), vec![]);
    assert_eq!(b.state(), State::Election);
}

/// Restart with the peer reachable: both nodes in election, each sees the
/// other's record; exactly the expected one leads, with the expected epoch.
/// A loser whose record says it led (its datastore may still run as the
/// primary, e.g. only its agent restarted) never votes the peer in before
/// it has stopped its datastore.
#[test]
fn restart_with_peer_reachable_picks_one_winner() {
    use Role::{Follower as F, Leader as L};
    #[allow(clippy::type_complexity)]
    let rows: &[(&str, (Role, u64, Option<(u32, u64)>), (Role, u64, Option<(u32, u64)>), &str, u64)] = &[
        ("higher epoch wins", (F, 4, Some((1, 10))), (L, 3, Some((1, 99))), A, 5),
        ("higher epoch wins (b)", (L, 3, Some((2, 99))), (F, 5, Some((1, 1))), B, 6),
        ("equal epoch: higher timeline", (F, 3, Some((2, 5))), (L, 3, Some((1, 99))), A, 4),
        ("equal epoch: higher lsn", (L, 3, Some((1, 50))), (F, 3, Some((1, 60))), B, 4),
        ("equal epoch: known position beats unknown", (L, 3, None), (F, 3, Some((1, 1))), B, 4),
        ("equal position: incumbent", (F, 3, Some((1, 50))), (L, 3, Some((1, 50))), B, 3),
        ("both leaders, equal: bootstrap", (L, 3, Some((1, 50))), (L, 3, Some((1, 50))), A, 3),
        ("both followers, equal: bootstrap", (F, 3, Some((1, 50))), (F, 3, Some((1, 50))), A, 4),
    ];
    // Each node's own datastore reports the position its record holds.
    let observed = |peer: PeerStatus, pos: Option<(u32, u64)>| Observation {
        position: pos.map(|(timeline, lsn)| WalPosition { timeline, lsn: Lsn(lsn) }),
        ..seen(peer, WitnessView::NoOpinion)
    };
    for (name, ma, mb, winner, epoch) in rows {
        let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(meta(A, ma.0, ma.1, ma.2)));
        let mut b = Machine::new(settings(B, WitnessMode::None), LocalMeta::Loaded(meta(B, mb.0, mb.1, mb.2)));
        let (loser_was_leader, loser_pos) = if *winner == A { (mb.0 == L, mb.2) } else { (ma.0 == L, ma.2) };
        // Exchanges until the loser votes for the winner; nobody leads before.
        let mut demoted = false;
        for round in 0..4 {
            let (sa, sb) = (a.status(), b.status());
            let out_a = tick(&mut a, s(round), observed(sb, ma.2));
            let out_b = tick(&mut b, s(round), observed(sa, mb.2));
            assert_eq!(promotes(&out_a).or(promotes(&out_b)), None, "{name}: round {round}: nobody leads yet");
            let out_loser = if *winner == A { &out_b } else { &out_a };
            if out_loser.contains(&Action::Demote) {
                assert!(loser_was_leader, "{name}: only a former leader stops its datastore: {out_loser:?}");
                assert!(loser_pos.is_some() || round >= 2, "{name}: stepped down in round {round} without a position");
                demoted = true;
                let loser = if *winner == A { &mut b } else { &mut a };
                loser.step(s(round), Input::Done(Completion::DemotionDone));
            }
            let (va, vb) = (a.status().vote, b.status().vote);
            let loser_vote = if *winner == A { vb } else { va };
            if loser_vote.as_deref() == Some(*winner) {
                break;
            }
            assert!(loser_was_leader && !demoted, "{name}: round {round}: the loser votes {loser_vote:?}");
        }
        assert_eq!(demoted, loser_was_leader, "{name}: a former leader stops its datastore before voting");
        // The winner leads once the loser's vote was cast on its own vote
        // for itself: at most one more exchange.
        let mut won = None;
        for round in 9..11 {
            let (sa, sb) = (a.status(), b.status());
            assert_eq!(sa.vote.as_deref(), Some(*winner), "{name}: a's vote");
            assert_eq!(sb.vote.as_deref(), Some(*winner), "{name}: b's vote");
            let out_a = tick(&mut a, s(round), observed(sb, ma.2));
            let out_b = tick(&mut b, s(round), observed(sa, mb.2));
            let (win, lose) = if *winner == A { (&out_a, &out_b) } else { (&out_b, &out_a) };
            assert_eq!(promotes(lose), None, "{name}: the loser does not lead: {lose:?}");
            if let Some(e) = promotes(win) {
                won = Some(e);
                break;
            }
        }
        assert_eq!(won, Some(*epoch), "{name}: the winner leads");
    }
}

#[test]
fn restart_former_follower_follows_a_running_leader_even_when_ahead() {
    // A restarted follower with a newer local position than the leader's record
    // still follows a leader that is running.
    let mut b =
        Machine::new(settings(B, WitnessMode::None), LocalMeta::Loaded(meta(B, Role::Follower, 3, Some((1, 500)))));
    let out = tick(
        &mut b,
        s(0),
        seen(status(Some(meta(A, Role::Leader, 3, Some((1, 10)))), State::Leader), WitnessView::NoOpinion),
    );
    assert_eq!(out.first(), Some(&Action::ReleaseVip));
    assert!(out.contains(&Action::Rejoin { leader: A.into() }));
    assert_eq!(promotes(&out), None);
}

#[test]
fn restart_former_leader_with_higher_epoch_waits_for_running_peer_to_step_down() {
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(meta(A, Role::Leader, 5, None)));
    let peer = meta(B, Role::Leader, 4, None);
    assert_eq!(tick(&mut a, s(0), seen(status(Some(peer.clone()), State::Leader), WitnessView::NoOpinion)), vec![]);
    // The peer is demoting: now a resumes (same epoch), and takes the VIP only once promoted.
    let out = tick(&mut a, s(1), seen(voting(Some(peer), State::Demoting, A), WitnessView::NoOpinion));
    assert_eq!(promotes(&out), Some(5));
    assert!(!out.contains(&Action::TakeVip));
}

/// Two leaders meet after a partition: the loser releases the VIP first,
/// then demotes, then rejoins; the winner does nothing.
#[test]
fn both_leaders_after_partition() {
    // (a's epoch, a's position, b's epoch, b's position, loser)
    let rows = [
        ("higher epoch", 3, (1, 900), 4, (2, 10), A),
        ("equal epochs, higher position", 4, (2, 10), 4, (2, 11), A),
        ("equal epochs and positions: bootstrap leader", 4, (2, 10), 4, (2, 10), B),
    ];
    for (name, ea, pa, eb, pb, loser) in rows {
        let mut a = leader_at(A, WitnessMode::None, ea, pa);
        let mut b = leader_at(B, WitnessMode::None, eb, pb);
        let (ma, mb) = (a.status(), b.status());
        let out_a = tick(&mut a, s(1), seen(mb.clone(), WitnessView::NoOpinion));
        let out_b = tick(&mut b, s(1), seen(ma.clone(), WitnessView::NoOpinion));
        let (l, lout, wout, winner_meta) = if loser == A {
            (&mut a, out_a, out_b, mb.meta.unwrap())
        } else {
            (&mut b, out_b, out_a, ma.meta.unwrap())
        };
        assert!(!lout.is_empty(), "{name}: the loser did nothing; the winner did {wout:?}");
        assert_eq!(lout[0], Action::ReleaseVip, "{name}: VIP released before anything else: {lout:?}");
        assert!(lout.contains(&Action::Demote), "{name}: {lout:?}");
        assert!(!lout.contains(&Action::TakeVip));
        assert_eq!(wout, vec![], "{name}: the winner keeps leading");
        assert!(!l.holds_vip());
        assert_eq!(l.state(), State::Demoting);
        l.step(s(2), Input::Done(Completion::DemotionDone));
        let leading = status(Some(winner_meta.clone()), State::Leader);
        let out = tick(l, s(3), seen(leading.clone(), WitnessView::NoOpinion));
        assert_eq!(out, vec![Action::Rejoin { leader: winner_meta.node.name.clone() }], "{name}");
        l.step(s(4), Input::Done(Completion::RejoinDone));
        tick(l, s(5), seen(leading, WitnessView::NoOpinion));
        assert_eq!(l.meta().unwrap().epoch, winner_meta.epoch.max(l.meta().unwrap().epoch), "{name}: epoch adopted");
        assert_eq!(l.state(), State::Follower);
    }
}

/// Restart with the peer unreachable. Without an arbiter nobody leads on
/// its own after a restart: a former leader's peer may have taken over
/// while it was away, and a former follower has not been told it is in
/// sync since it started. With an arbiter its records decide: the node it
/// names (last lease holder or synchronous standby) gets the lease.
#[test]
fn restart_with_peer_unreachable() {
    use WitnessMode::*;
    use WitnessView::*;
    let record = |sync: Option<&str>, last: Option<&str>| ArbiterRecord {
        sync_standby: sync.map(String::from),
        last_holder: last.map(String::from),
    };
    // (mode, witness view, arbiter record, leader resumes, follower takes over)
    let rows = [
        (None, NoOpinion, Option::None, false, false),
        (Gateway, GatewayReachable, Option::None, false, false),
        (Gateway, GatewayUnreachable, Option::None, false, false),
        (Arbiter, LeaseHeldByMe, Option::None, true, true),
        (Arbiter, LeaseHeldByPeer, Option::None, false, false),
        (Arbiter, LeaseFree, Some(record(Some(B), Some(A))), false, false),
        (Arbiter, LeaseFree, Some(record(Option::None, Some(B))), false, false),
        (Arbiter, ArbiterUnreachable, Option::None, false, false),
    ];
    for (mode, view, rec, leader_resumes, follower_takes_over) in rows {
        let obs = || Observation { arbiter: rec.clone(), ..lost(false, view) };
        let mut a = Machine::new(settings(A, mode), LocalMeta::Loaded(meta(A, Role::Leader, 3, Option::None)));
        let out: Vec<_> = ticks(&mut a, 0, 20, obs).into_iter().map(|(_, a)| a).collect();
        let resumed = if leader_resumes { Some(3) } else { Option::None };
        assert_eq!(promotes(&out), resumed, "leader {mode:?} {view:?} {rec:?}: {out:?}");
        let asks = out.iter().any(|a| matches!(a, Action::AcquireLease { .. }));
        let entitled = rec.as_ref().is_some_and(|r| r.last_holder.as_deref() == Some(A));
        if view != LeaseHeldByMe {
            assert_eq!(asks, view == LeaseFree && entitled, "leader asks for the lease when entitled: {out:?}");
        }

        let mut b = Machine::new(settings(B, mode), LocalMeta::Loaded(meta(B, Role::Follower, 3, Option::None)));
        let early = ticks(&mut b, 0, 6, obs);
        assert!(early.iter().all(|(_, a)| !matches!(a, Action::Promote { .. })), "follower must wait: {early:?}");
        let out: Vec<_> = ticks(&mut b, 7, 30, obs).into_iter().map(|(_, a)| a).collect();
        let took = if follower_takes_over { Some(4) } else { Option::None };
        assert_eq!(promotes(&out), took, "follower {mode:?} {view:?} {rec:?}: {out:?}");
        let asks = out.iter().any(|a| matches!(a, Action::AcquireLease { .. }));
        let entitled =
            rec.as_ref().is_some_and(|r| r.sync_standby.as_deref() == Some(B) || r.last_holder.as_deref() == Some(B));
        if view != LeaseHeldByMe {
            assert_eq!(asks, view == LeaseFree && entitled, "follower asks for the lease when entitled: {out:?}");
        }
    }
    // Fenced, it never resumes without the peer; a peer that took over meanwhile is followed.
    let mut fenced = meta(A, Role::Leader, 5, Option::None);
    fenced.fenced = true;
    let mut a = Machine::new(settings(A, Gateway), LocalMeta::Loaded(fenced));
    assert_eq!(ticks(&mut a, 0, 20, || lost(false, GatewayReachable)), vec![]);
    let leading = status(Some(meta(B, Role::Leader, 6, Option::None)), State::Leader);
    let out = tick(&mut a, s(21), seen(leading, GatewayReachable));
    assert!(out.contains(&Action::Rejoin { leader: B.into() }), "{out:?}");
}

/// A follower promotes only when every condition holds.
#[test]
fn follower_promotion_needs_misses_second_path_witness_fence_window_and_entitlement() {
    // (description, second path reachable, witness, VIP answered elsewhere, expected promotion second)
    let rows = [
        ("all conditions", false, WitnessView::GatewayReachable, false, Some(17)),
        ("second path still answers", true, WitnessView::GatewayReachable, false, None),
        ("witness unreachable", false, WitnessView::GatewayUnreachable, false, None),
        ("another host answers for the VIP", false, WitnessView::GatewayReachable, true, None),
    ];
    for (name, second, witness, elsewhere, expect) in rows {
        let mut b = follower(B, WitnessMode::Gateway, 3);
        let lm = meta(A, Role::Leader, 3, None);
        ticks(&mut b, 1, 10, || seen(status(Some(lm.clone()), State::Leader), WitnessView::GatewayReachable));
        assert!(b.status().eligible, "{name}: the leader said we are in sync");
        // Last heard at 10 s: misses from 11 s; fence window ends at 10 + 5 + 2 = 17 s.
        let out = ticks(&mut b, 11, 40, || Observation { vip_elsewhere: Some(elsewhere), ..lost(second, witness) });
        let at = out.iter().find(|(_, a)| matches!(a, Action::Promote { .. }));
        assert_eq!(at.map(|(t, _)| *t), expect, "{name}: {out:?}");
        if expect.is_some() {
            // Promoted no later than the end of its entitlement: 10 s + 11 s + 2 s.
            let window = Some(s(10) + settings(B, WitnessMode::Gateway).eligibility_window());
            assert_eq!(
                at.unwrap().1,
                Action::Promote { epoch: 4, bootstrap: false, not_after: window, catch_up: None }
            );
            assert_eq!(b.state(), State::Promoting);
            assert!(b.holds_vip(), "{name}: the VIP comes along as the promotion starts");
            assert_eq!(b.step(s(41), Input::Done(Completion::PromotionDone)), vec![]);
        }
    }
    // Fewer than `failure_threshold` misses in a row never promote, however long.
    let mut b = follower(B, WitnessMode::None, 3);
    let lm = meta(A, Role::Leader, 3, None);
    for t in 1..100 {
        let obs = if t % 3 == 0 {
            seen(status(Some(lm.clone()), State::Leader), WitnessView::NoOpinion)
        } else {
            lost(false, WitnessView::NoOpinion)
        };
        assert_eq!(promotes(&tick(&mut b, s(t), obs)), None, "t={t}");
    }
}

/// Without an arbiter, a follower may take over only if the leader told it
/// it is the synchronous standby, and only within the eligibility window
/// after it last heard so: past it, the leader may have stopped waiting for
/// it and acknowledged writes it lacks.
#[test]
fn follower_takes_over_only_while_entitled() {
    let w = settings(B, WitnessMode::None).eligibility_window();
    let lm = meta(A, Role::Leader, 3, None);
    // Told, then the leader says it no longer counts on us: not entitled.
    let mut b = follower(B, WitnessMode::None, 3);
    tick(&mut b, s(1), seen(status(Some(lm.clone()), State::Leader), WitnessView::NoOpinion));
    tick(&mut b, s(2), seen(not_in_sync(lm.clone()), WitnessView::NoOpinion));
    assert!(!b.status().eligible);
    let out = ticks(&mut b, 3, 60, || lost(false, WitnessView::NoOpinion));
    assert_eq!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()), None);
    assert!(b.takeover_blocked().is_some_and(|why| why.contains("failover --force")), "{:?}", b.takeover_blocked());

    // Told, then the leader gone but the second path answering past the
    // window: when the path finally goes, the entitlement is gone too.
    let mut b = follower(B, WitnessMode::None, 3);
    tick(&mut b, s(1), seen(status(Some(lm.clone()), State::Leader), WitnessView::NoOpinion));
    let end = 1 + w.as_secs();
    let out = ticks(&mut b, 2, end + 1, || lost(true, WitnessView::NoOpinion));
    assert_eq!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()), None);
    let out = ticks(&mut b, end + 2, end + 30, || lost(false, WitnessView::NoOpinion));
    assert_eq!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()), None, "past the window");

    // Configured async: no entitlement needed (the mode accepts losing the tail).
    let mut st = settings(B, WitnessMode::None);
    st.durability = crate::config::Durability::Async;
    let mut b = Machine::new(st, LocalMeta::Loaded(meta(B, Role::Follower, 3, Some((1, 90)))));
    tick(&mut b, s(0), seen(not_in_sync(lm.clone()), WitnessView::NoOpinion));
    b.step(s(0), Input::Done(Completion::RejoinDone));
    let out = ticks(&mut b, 1, 20, || lost(false, WitnessView::NoOpinion));
    assert_eq!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()), Some(4));
}

#[test]
fn arbiter_follower_acquires_the_lease_before_promoting() {
    let mut b = follower(B, WitnessMode::Arbiter, 3);
    let out = ticks(&mut b, 1, 7, || lost(false, WitnessView::LeaseHeldByPeer));
    assert!(out.iter().all(|(_, a)| !matches!(a, Action::AcquireLease { .. } | Action::Promote { .. })), "{out:?}");
    // The arbiter records the leader as the synchronous standby's... peer: not us. No lease asked for.
    let other = ArbiterRecord { sync_standby: None, last_holder: Some(A.into()) };
    let out = tick(&mut b, s(8), Observation { arbiter: Some(other), ..lost(false, WitnessView::LeaseFree) });
    assert_eq!(out, vec![]);
    let us = ArbiterRecord { sync_standby: Some(B.into()), last_holder: Some(A.into()) };
    let free = || Observation { arbiter: Some(us.clone()), ..lost(false, WitnessView::LeaseFree) };
    let mut early = b.clone();
    let out = tick(&mut b, s(8), free());
    assert_eq!(out, vec![Action::AcquireLease { epoch: 4 }]);
    let out = tick(&mut b, s(9), lost(false, WitnessView::LeaseHeldByMe));
    assert_eq!(promotes(&out), Some(4));

    // The grant itself lets it promote, without waiting for the next tick;
    // its fence deadline counts from when the lease was asked for.
    let out = tick(&mut early, s(8), free());
    assert_eq!(out, vec![Action::AcquireLease { epoch: 4 }]);
    let sent = s(8) + Duration::from_millis(2);
    let out = early.step(sent + Duration::from_millis(5), Input::Done(Completion::LeaseGranted { sent }));
    assert_eq!(promotes(&out), Some(4), "{out:?}");
    let fence_timeout = settings(B, WitnessMode::Arbiter).fence_timeout;
    assert_eq!(early.fence_deadline(), Some(sent + fence_timeout));
    // A grant that reaches a node which is not following changes nothing at once.
    let mut a = leader(A, WitnessMode::Arbiter, 3);
    assert_eq!(a.step(s(1), Input::Done(Completion::LeaseGranted { sent: s(1) })), vec![]);
}

#[test]
fn leader_fences_when_cut_off_from_peer_and_witness() {
    for mode in [WitnessMode::Gateway, WitnessMode::Arbiter] {
        let cut_off = if mode == WitnessMode::Gateway {
            WitnessView::GatewayUnreachable
        } else {
            WitnessView::ArbiterUnreachable
        };
        let mut a = leader(A, mode, 3);
        // Last contact at 0 s: with 1 s ticks the fence must be in place by 5 s.
        let out = ticks(&mut a, 1, 10, || lost(false, cut_off));
        let fence: Vec<_> = out.iter().filter(|(_, a)| matches!(a, Action::ReleaseVip | Action::Fence)).collect();
        assert_eq!(fence, vec![&(4, Action::ReleaseVip), &(4, Action::Fence)], "{mode:?}: {out:?}");
        assert_eq!((a.state(), a.holds_vip()), (State::Fenced, false));

        // Peer lost but witness still there: keeps leading.
        let mut a = leader(A, mode, 3);
        let ok = if mode == WitnessMode::Gateway { WitnessView::GatewayReachable } else { WitnessView::LeaseHeldByMe };
        let out = ticks(&mut a, 1, 60, || lost(false, ok));
        assert!(!out.iter().any(|(_, a)| matches!(a, Action::Fence | Action::ReleaseVip)), "{mode:?}: {out:?}");
        assert_eq!(a.state(), State::FaultDetected);
        // Witness lost but peer still answering (second path): keeps leading.
        let mut a = leader(A, mode, 3);
        let out = ticks(&mut a, 1, 60, || lost(true, cut_off));
        assert!(!out.iter().any(|(_, a)| matches!(a, Action::Fence)), "{mode:?}: {out:?}");
    }
    // Mode none keeps leading (documented risk).
    let mut a = leader(A, WitnessMode::None, 3);
    assert_eq!(ticks(&mut a, 1, 600, || lost(false, WitnessView::NoOpinion)), vec![]);
    assert!(a.holds_vip());
}

#[test]
fn arbiter_leader_that_loses_the_lease_fences_at_once() {
    let mut a = leader(A, WitnessMode::Arbiter, 3);
    let out = tick(&mut a, s(1), lost(false, WitnessView::LeaseHeldByPeer));
    assert_eq!(&out[..2], &[Action::ReleaseVip, Action::Fence]);
    assert!(matches!(&out[2..], [Action::PersistHostMeta(m)] if m.fenced), "the fence is remembered: {out:?}");
    assert_eq!(a.fence_deadline(), None, "a fenced node has no deadline to keep");
}

/// The driver's fence timer enforces the deadline the machine computes from
/// the last sign (as sent) of the peer or the witness; when the timer has
/// fenced, the machine follows and remembers it.
#[test]
fn fence_deadline_counts_from_the_last_sign_sent_and_the_timer_fence_is_remembered() {
    let mut a = leader(A, WitnessMode::Gateway, 3);
    let mut obs = lost(false, WitnessView::GatewayReachable);
    obs.started = Duration::from_millis(1_200);
    tick(&mut a, s(2), obs);
    assert_eq!(a.fence_deadline(), Some(Duration::from_millis(1_200) + s(5)), "from when the probe was sent");
    assert_eq!(leader(A, WitnessMode::None, 3).fence_deadline(), None, "mode none never fences");
    let out = a.step(s(7), Input::FenceDeadlinePassed);
    assert!(matches!(&out[..], [Action::PersistHostMeta(m)] if m.fenced), "{out:?}");
    assert_eq!((a.state(), a.holds_vip(), a.fence_deadline()), (State::Fenced, false, None));
}

/// A leader that hears another host answer for the VIP while its peer is
/// silent stops writing: the peer took over.
#[test]
fn leader_fences_when_another_host_answers_for_the_vip() {
    for mode in [WitnessMode::None, WitnessMode::Gateway] {
        let mut a = leader(A, mode, 3);
        let ok = if mode == WitnessMode::Gateway { WitnessView::GatewayReachable } else { WitnessView::NoOpinion };
        let out = tick(&mut a, s(1), Observation { vip_elsewhere: Some(true), ..lost(false, ok) });
        assert_eq!(&out[..2], &[Action::ReleaseVip, Action::Fence], "{mode:?}: {out:?}");
    }
}

#[test]
fn fenced_leader_resumes_only_with_the_peer_following_and_demotes_to_a_newer_leader() {
    let mut a = leader(A, WitnessMode::Gateway, 3);
    ticks(&mut a, 1, 5, || lost(false, WitnessView::GatewayUnreachable));
    assert_eq!(a.state(), State::Fenced);
    // Gateway back, peer still away: stays fenced (the peer may have promoted).
    assert_eq!(ticks(&mut a, 6, 30, || lost(false, WitnessView::GatewayReachable)), vec![]);
    // The peer is back and still a follower at our epoch: resume.
    let back = meta(B, Role::Follower, 3, None);
    let out = tick(&mut a, s(31), seen(status(Some(back.clone()), State::Follower), WitnessView::GatewayReachable));
    assert_eq!(out, vec![], "not without the peer's vote");
    let out = tick(&mut a, s(32), seen(voting(Some(back), State::Follower, A), WitnessView::GatewayReachable));
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!((&out[0], &out[2]), (&Action::Unfence, &Action::TakeVip));
    assert!(matches!(&out[1], Action::PersistHostMeta(m) if !m.fenced), "{out:?}");

    let mut a = leader(A, WitnessMode::Gateway, 3);
    ticks(&mut a, 1, 5, || lost(false, WitnessView::GatewayUnreachable));
    let out = tick(
        &mut a,
        s(31),
        seen(status(Some(meta(B, Role::Leader, 4, None)), State::Leader), WitnessView::GatewayReachable),
    );
    assert_eq!(&out[..2], &[Action::ReleaseVip, Action::Demote], "{out:?}");
    assert!(!out.contains(&Action::TakeVip) && !out.contains(&Action::Unfence));
}

/// Crossed votes: a fenced leader acts on its follower's vote only when
/// the follower cast it knowing the leader votes for itself. A vote from
/// before may be the one the follower has since changed, while the
/// follower takes over on the leader's own old vote for it.
#[test]
fn a_fenced_leader_resumes_only_on_a_vote_cast_on_its_current_one() {
    let mut a = leader(A, WitnessMode::Gateway, 3);
    ticks(&mut a, 1, 5, || lost(false, WitnessView::GatewayUnreachable));
    assert_eq!(a.state(), State::Fenced);
    let before = a.status();
    assert_eq!(before.vote, None, "no vote without the peer");
    let back = meta(B, Role::Follower, 3, None);
    let vote_on = |generation: Option<u64>| PeerStatus {
        vote_gen: Some(41),
        seen_vote_gen: generation,
        ..voting(Some(back.clone()), State::Follower, A)
    };
    // The follower's vote was cast on a status of this node from before it
    // voted for itself.
    let out = tick(&mut a, s(31), seen(vote_on(before.vote_gen), WitnessView::GatewayReachable));
    assert_eq!(out, vec![], "not on a vote cast before this node voted for itself");
    let now = a.status();
    assert_eq!((now.vote.as_deref(), now.seen_vote_gen), (Some(A), Some(41)));
    assert_ne!(now.vote_gen, before.vote_gen, "a changed vote has a new generation");
    let out = tick(&mut a, s(32), seen(vote_on(None), WitnessView::GatewayReachable));
    assert_eq!(out, vec![], "not on a vote that names no generation of this node's");
    let out = tick(&mut a, s(33), seen(vote_on(now.vote_gen), WitnessView::GatewayReachable));
    assert_eq!(out.first(), Some(&Action::Unfence), "{out:?}");
    assert_eq!(a.status().vote_gen, now.vote_gen, "an unchanged vote keeps its generation");
}

#[test]
fn never_takes_the_vip_while_the_peer_leads() {
    // Promotion finishes while a peer with a higher claim leads: no VIP, demote.
    let mut b = follower(B, WitnessMode::None, 3);
    ticks(&mut b, 1, 10, || lost(false, WitnessView::NoOpinion));
    assert_eq!(b.state(), State::Promoting);
    tick(&mut b, s(11), seen(status(Some(meta(A, Role::Leader, 9, None)), State::Leader), WitnessView::NoOpinion));
    let out = b.step(s(11), Input::Done(Completion::PromotionDone));
    assert!(!out.contains(&Action::TakeVip), "{out:?}");
    assert_eq!(out.first(), Some(&Action::ReleaseVip));

    // Promotion finishes while a peer with a lower claim still leads (it
    // came back after this node decided, on its silence, and took the VIP):
    // lead and keep the VIP; the peer steps down.
    let mut b = follower(B, WitnessMode::None, 3);
    let out = ticks(&mut b, 1, 10, || lost(false, WitnessView::NoOpinion));
    assert!(out.iter().any(|(_, a)| *a == Action::TakeVip), "{out:?}");
    let old = meta(A, Role::Leader, 3, None);
    tick(&mut b, s(11), seen(status(Some(old.clone()), State::Leader), WitnessView::NoOpinion));
    assert_eq!(b.step(s(11), Input::Done(Completion::PromotionDone)), vec![]);
    assert_eq!((b.state(), b.holds_vip()), (State::Leader, true));
    assert_eq!(tick(&mut b, s(12), seen(status(Some(old), State::Demoting), WitnessView::NoOpinion)), vec![]);

    // A node starting to lead while the peer still steps down (a clean
    // hand-over keeps the VIP until its PostgreSQL is down) waits for it.
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(meta(A, Role::Leader, 5, None)));
    let demoting = voting(Some(meta(B, Role::Leader, 4, None)), State::Demoting, A);
    let out = tick(&mut a, s(0), seen(demoting.clone(), WitnessView::NoOpinion));
    assert_eq!((promotes(&out), out.contains(&Action::TakeVip)), (Some(5), false), "{out:?}");
    assert_eq!(a.step(s(0), Input::Done(Completion::PromotionDone)), vec![]);
    let following = voting(Some(meta(B, Role::Follower, 4, None)), State::Follower, A);
    assert_eq!(tick(&mut a, s(1), seen(following, WitnessView::NoOpinion)), vec![Action::TakeVip]);
}

/// A tick whose restarts end at once (the driver reports each one's end).
fn tick_restarting(m: &mut Machine, t: u64, obs: Observation) -> Vec<Action> {
    let out = tick(m, s(t), obs);
    for a in &out {
        if let Action::RestartService(c) = a {
            m.step(s(t), Input::Done(Completion::Restarted(*c)));
        }
    }
    out
}

#[test]
fn failed_service_is_restarted_with_backoff_then_the_leader_hands_over() {
    let mut a = leader(A, WitnessMode::None, 3);
    let peer = status(Some(meta(B, Role::Follower, 3, None)), State::Follower);
    // A datastore that fails its probes reports no replication: the last
    // report (in sync, at t=0) stands.
    let obs = |ok| {
        let mut o = seen(peer.clone(), WitnessView::NoOpinion);
        o.health = vec![(Component::Postgres, ok), (Component::Kine, true)];
        o
    };
    let in_sync_report = {
        let mut o = obs(true);
        o.replication = Some(in_sync());
        o
    };
    assert_eq!(tick(&mut a, s(0), in_sync_report), vec![]);
    let mut log = vec![];
    for t in 1..=20 {
        for act in tick_restarting(&mut a, t, obs(false)) {
            log.push((t, act));
        }
    }
    let restarts: Vec<_> =
        log.iter().filter(|(_, a)| *a == Action::RestartService(Component::Postgres)).map(|(t, _)| *t).collect();
    assert_eq!(
        restarts,
        vec![3, 6, 10],
        "after 3 failed probes, then 3 more of the restarted service and backoff 2 s, 4 s; give up after 8 s: {log:?}"
    );
    let handover: Vec<_> = log.iter().filter(|(_, a)| !matches!(a, Action::RestartService(_))).collect();
    assert_eq!(handover[0], &(18, Action::ReleaseVip), "{log:?}");
    assert_eq!(handover[1], &(18, Action::Demote), "{log:?}");
    assert!(a.status().handing_over);

    // A restart that takes long (a datastore under load) spends one
    // attempt: the probes while it runs do not count, and the restarted
    // service gets its own three probes.
    let mut a = leader(A, WitnessMode::None, 3);
    let log: Vec<_> = (1..=15).flat_map(|t| tick(&mut a, s(t), obs(false))).collect();
    assert_eq!(log, vec![Action::RestartService(Component::Postgres)], "one restart while it runs");
    a.step(s(15), Input::Done(Completion::Restarted(Component::Postgres)));
    assert_eq!(tick(&mut a, s(16), obs(false)), vec![]);
    assert_eq!(tick(&mut a, s(17), obs(false)), vec![]);
    assert_eq!(tick(&mut a, s(18), obs(false)), vec![Action::RestartService(Component::Postgres)], "second attempt");
    assert!(a.failed_components().is_empty() && a.leading());

    // A peer that is not (yet) the synchronous standby, such as one still
    // rejoining after a switchover, cannot take over: the leader keeps
    // leading on its failed datastore rather than leave nobody leading.
    for report in [None, Some(Replication { sync_configured: true, peer_streaming: true, peer_in_sync: false })] {
        let mut a = leader(A, WitnessMode::None, 3);
        let mut first = obs(true);
        first.replication = report;
        tick(&mut a, s(0), first);
        let log: Vec<_> = (1..=40).flat_map(|t| tick_restarting(&mut a, t, obs(false))).collect();
        assert!(!log.iter().any(|a| matches!(a, Action::Demote | Action::ReleaseVip)), "{report:?}: {log:?}");
        assert_eq!(a.failed_components(), vec![Component::Postgres]);
        assert!(a.leading() && !a.status().handing_over, "{report:?}");
        // The datastore answers again: nothing stays failed.
        tick(&mut a, s(41), obs(true));
        assert_eq!(a.failed_components(), vec![]);
    }

    // One failed probe is not a failure.
    let mut a = leader(A, WitnessMode::None, 3);
    for t in 1..=30 {
        assert_eq!(tick(&mut a, s(t), obs(t % 3 != 0)), vec![], "t={t}");
    }
    // A service that recovers keeps its spent attempts until it has been
    // healthy for a while, so a flapping one is not restarted for ever.
    let mut a = leader(A, WitnessMode::None, 3);
    let fail = |a: &mut Machine, from: u64| {
        (from..from + 3).flat_map(|t| tick_restarting(a, t, obs(false))).collect::<Vec<_>>()
    };
    assert_eq!(fail(&mut a, 1), vec![Action::RestartService(Component::Postgres)]);
    assert_eq!(a.state(), State::HealthCheck);
    tick(&mut a, s(4), obs(true));
    assert_eq!(a.state(), State::Leader);
    assert_eq!(fail(&mut a, 5), vec![Action::RestartService(Component::Postgres)], "second attempt");
    for t in 8..=60 {
        tick(&mut a, s(t), obs(true));
    }
    assert_eq!(fail(&mut a, 61), vec![Action::RestartService(Component::Postgres)]);
    assert_eq!(fail(&mut a, 64), vec![Action::RestartService(Component::Postgres)], "budget given back");
}

#[test]
fn follower_with_failed_datastore_does_not_promote() {
    let mut b = follower(B, WitnessMode::None, 3);
    let out = ticks(&mut b, 1, 40, || {
        let mut o = lost(false, WitnessView::NoOpinion);
        o.health = vec![(Component::Postgres, false)];
        o
    });
    assert!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()).is_none());
}

/// What the primary's PostgreSQL reports with the follower streaming in sync.
fn in_sync() -> Replication {
    Replication { sync_configured: true, peer_streaming: true, peer_in_sync: true }
}

#[test]
fn planned_switchover() {
    let mut a = leader(A, WitnessMode::Arbiter, 3);
    let mut b = follower(B, WitnessMode::Arbiter, 3);
    // Not while the peer is not the synchronous standby.
    assert!(!a.can_hand_over());
    assert_eq!(a.step(s(1), Input::Switchover), vec![]);
    let record = ArbiterRecord { sync_standby: Some(B.into()), last_holder: Some(A.into()) };
    let obs = Observation {
        replication: Some(in_sync()),
        arbiter: Some(record),
        ..seen(b.status(), WitnessView::LeaseHeldByMe)
    };
    tick(&mut a, s(1), obs);
    assert_eq!(a.status().sync_standby.as_deref(), Some(B));
    assert!(a.can_hand_over());
    let out = a.step(s(1), Input::Switchover);
    assert_eq!(&out[..2], &[Action::ReleaseLease, Action::HandOver], "{out:?}");
    assert_eq!(a.status().handover, Some(HandOver::Stopping));
    // No promotion before the old primary has shut down cleanly, not even
    // with the lease.
    let out = tick(&mut b, s(1), seen(a.status(), WitnessView::LeaseHeldByMe));
    assert_eq!(promotes(&out), None, "{out:?}");
    let checkpoint = WalPosition { timeline: 1, lsn: Lsn(4096) };
    a.step(s(1), Input::Done(Completion::HandedOver(Some(checkpoint))));
    assert_eq!(a.status().handover, Some(HandOver::Clean(checkpoint)));
    let out = tick(&mut b, s(1), seen(a.status(), WitnessView::LeaseFree));
    assert_eq!(out, vec![Action::AcquireLease { epoch: 4 }]);
    let out = tick(&mut b, s(1), seen(a.status(), WitnessView::LeaseHeldByMe));
    assert_eq!(promotes(&out), Some(4));
    assert!(out.contains(&Action::Promote { epoch: 4, bootstrap: false, not_after: None, catch_up: Some(checkpoint) }));
    assert!(out.contains(&Action::TakeVip), "{out:?}");
    assert_eq!(b.step(s(1), Input::Done(Completion::PromotionDone)), vec![]);
    let out = tick(&mut a, s(2), seen(b.status(), WitnessView::LeaseHeldByPeer));
    assert_eq!(out, vec![Action::Rejoin { leader: B.into() }]);
    assert_eq!(a.meta().unwrap().epoch, 3, "the new epoch is adopted once rejoined");
    a.step(s(2), Input::Done(Completion::RejoinDone));
    let out = tick(&mut a, s(3), seen(b.status(), WitnessView::LeaseHeldByPeer));
    assert!(
        matches!(&out[..], [Action::PersistHostMeta(m)] if m.epoch == 4 && m.node.role == Role::Follower),
        "{out:?}"
    );
    // A follower ignores a switchover request.
    assert_eq!(a.step(s(3), Input::Switchover), vec![]);

    // So does a leader whose peer is not there to take over.
    let mut a = leader(A, WitnessMode::None, 3);
    tick(&mut a, s(1), Observation { replication: Some(in_sync()), ..lost(false, WitnessView::NoOpinion) });
    assert!(!a.can_hand_over());
    assert_eq!(a.step(s(1), Input::Switchover), vec![]);
    assert_eq!(a.state(), State::Leader);
}

/// The leader's durability follows PostgreSQL's word and the rules that
/// keep a degrade from losing writes (modes none and gateway).
#[test]
fn durability_waits_for_the_peer_until_it_cannot_take_over() {
    let st = settings(A, WitnessMode::Gateway);
    let gw = WitnessView::GatewayReachable;
    let follower_status =
        |eligible: bool| PeerStatus { eligible, ..status(Some(meta(B, Role::Follower, 3, None)), State::Follower) };
    let with = |peer: Option<PeerStatus>, r: Replication| {
        let base = match peer {
            Some(p) => seen(p, gw),
            None => lost(false, gw),
        };
        Observation { replication: Some(r), ..base }
    };
    let not_streaming = Replication { sync_configured: true, peer_streaming: false, peer_in_sync: false };
    let degrade = Action::SetDurability { synchronous: false };

    // A new term whose peer was never told it may take over degrades at once
    // (a fresh failover: the old leader is not a standby).
    let mut a = leader(A, WitnessMode::Gateway, 3);
    assert_eq!(tick(&mut a, s(1), with(Some(follower_status(false)), not_streaming)), vec![degrade.clone()]);
    // The peer streams: commits wait for it again; in sync, it is told so.
    let async_streaming = Replication { sync_configured: false, peer_streaming: true, peer_in_sync: false };
    assert_eq!(
        tick(&mut a, s(2), with(Some(follower_status(false)), async_streaming)),
        vec![Action::SetDurability { synchronous: true }]
    );
    assert_eq!(a.status().sync_standby, None, "not before it has caught up");
    tick(&mut a, s(3), with(Some(follower_status(true)), in_sync()));
    assert_eq!(a.status().sync_standby.as_deref(), Some(B));

    // It stops streaming but still answers and still believes it may take
    // over: nothing changes, then after degrade_after it is no longer told
    // so, and once it says it heard that, commits stop waiting.
    let after = st.degrade_after.as_secs();
    let out = ticks(&mut a, 4, 3 + after, || with(Some(follower_status(true)), not_streaming));
    assert_eq!(out, vec![]);
    assert_eq!(a.status().sync_standby, None, "the peer is not in sync any more");
    assert_eq!(tick(&mut a, s(4 + after), with(Some(follower_status(true)), not_streaming)), vec![]);
    // A "not entitled" the peer may have published before it heard us is not trusted...
    assert_eq!(tick(&mut a, s(5 + after), with(Some(follower_status(false)), not_streaming)), vec![]);
    assert_eq!(tick(&mut a, s(6 + after), with(Some(follower_status(false)), not_streaming)), vec![]);
    // ...one published after it could have heard it is.
    assert_eq!(tick(&mut a, s(7 + after), with(Some(follower_status(false)), not_streaming)), vec![degrade.clone()]);

    // The peer goes silent while in sync: commits wait until its
    // entitlement has surely run out, and never while another host answers
    // for the VIP (that one fences instead).
    let mut a = leader(A, WitnessMode::Gateway, 3);
    tick(&mut a, s(1), with(Some(follower_status(true)), in_sync()));
    let wait = st.degrade_wait().as_secs();
    let out = ticks(&mut a, 2, wait, || with(None, not_streaming));
    assert_eq!(out, vec![], "waits {wait} s from the peer's last word");
    assert_eq!(tick(&mut a, s(1 + wait), with(None, not_streaming)), vec![degrade.clone()]);

    // A leader that restarted and has not heard its peer since never
    // degrades on its own: the peer may have taken over meanwhile.
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(meta(A, Role::Leader, 3, None)));
    let mut back = seen(voting(Some(meta(B, Role::Follower, 3, None)), State::Follower, A), WitnessView::NoOpinion);
    back.started = s(0);
    tick(&mut a, s(0), back);
    a.step(s(0), Input::Done(Completion::PromotionDone));
    let mut b = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(meta(A, Role::Leader, 3, None)));
    let out = ticks(&mut b, 0, 120, || Observation {
        replication: Some(not_streaming),
        ..lost(false, WitnessView::NoOpinion)
    });
    assert!(!out.iter().any(|(_, a)| *a == degrade), "{out:?}");
}

/// With an arbiter the leader first has the arbiter forget the synchronous
/// standby, then stops waiting for it; back in sync, it records it again.
/// A follower that leaves on purpose (an upgrade's reboot) refuses to be
/// the synchronous standby: with the leader's next word it is no longer
/// entitled to take over (before that word the leader cannot have stopped
/// waiting for it, so a takeover would lose nothing), and its leader stops
/// waiting for it while it still streams, through the degrade handshake
/// (the peer's "not entitled" must be one it published after it could have
/// heard), without waiting out `degrade_after`. Once back and not leaving,
/// commits wait for it again; a leave that is not followed by a reboot ends
/// by itself.
#[test]
fn a_leaving_follower_gives_up_taking_over_and_its_leader_stops_waiting_for_it() {
    // The follower's side.
    let lm = meta(A, Role::Leader, 3, None);
    let named = || seen(status(Some(lm.clone()), State::Leader), WitnessView::GatewayReachable);
    let mut b = follower(B, WitnessMode::Gateway, 3);
    tick(&mut b, s(1), named());
    assert!(b.status().eligible, "told it is the synchronous standby");
    assert_eq!(b.step(s(1), Input::Leave), vec![]);
    assert!(b.status().leaving, "{:?}", b.status());
    // The leader still names it as its standby: it does not take that any more.
    tick(&mut b, s(2), named());
    assert!(!b.status().eligible);
    let out = ticks(&mut b, 3, 60, || lost(false, WitnessView::GatewayReachable));
    assert_eq!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()), None, "no longer entitled");
    // It did not reboot: the leave ends and it is the standby again.
    assert!(1 + settings(B, WitnessMode::Gateway).leave_for.as_secs() < 61);
    tick(&mut b, s(61), named());
    assert!(!b.status().leaving && b.status().eligible, "{:?}", b.status());
    // A leader does not leave: it hands over first.
    let a = leader(A, WitnessMode::Gateway, 3);
    assert!(a.can_leave().is_err_and(|why| why.contains("switch over")));

    // The leader's side.
    let gw = WitnessView::GatewayReachable;
    let peer = |eligible: bool, leaving: bool| {
        let p = PeerStatus { eligible, leaving, ..status(Some(meta(B, Role::Follower, 3, None)), State::Follower) };
        Observation { replication: Some(in_sync()), ..seen(p, gw) }
    };
    let degrade = Action::SetDurability { synchronous: false };
    let mut a = leader(A, WitnessMode::Gateway, 3);
    tick(&mut a, s(1), peer(true, false));
    assert_eq!(a.status().sync_standby.as_deref(), Some(B));
    // It says it leaves (still streaming, still believing it is entitled):
    // the leader stops naming it at once...
    assert_eq!(tick(&mut a, s(2), peer(true, true)), vec![]);
    assert_eq!(a.status().sync_standby, None, "the leaving peer is no longer told it may take over");
    // ...and degrades once the peer's "not entitled" can be an answer to that.
    assert_eq!(tick(&mut a, s(3), peer(false, true)), vec![], "published before it could have heard");
    assert_eq!(tick(&mut a, s(4), peer(false, true)), vec![]);
    assert_eq!(tick(&mut a, s(5), peer(false, true)), vec![degrade]);
    assert!(s(5) < s(2) + settings(A, WitnessMode::Gateway).degrade_after, "sooner than a degrade after a loss");
    // Its agent stops first, its PostgreSQL streams a moment longer: commits
    // do not wait for it again while it is silent.
    let silent =
        Observation { replication: Some(Replication { sync_configured: false, ..in_sync() }), ..lost(false, gw) };
    assert_eq!(tick(&mut a, s(6), silent), vec![]);
    // Back after its reboot, streaming and not leaving: commits wait for it again.
    let async_streaming = Replication { sync_configured: false, peer_streaming: true, peer_in_sync: false };
    let back = PeerStatus { eligible: false, ..status(Some(meta(B, Role::Follower, 3, None)), State::Follower) };
    assert_eq!(
        tick(&mut a, s(90), Observation { replication: Some(async_streaming), ..seen(back, gw) }),
        vec![Action::SetDurability { synchronous: true }]
    );
}

#[test]
fn arbiter_records_the_synchronous_standby_before_and_after_degrading() {
    let mut a = leader(A, WitnessMode::Arbiter, 3);
    let rec = |sync: Option<&str>| ArbiterRecord { sync_standby: sync.map(String::from), last_holder: Some(A.into()) };
    let obs = |r: Replication, record: Option<&str>| Observation {
        replication: Some(r),
        arbiter: Some(rec(record)),
        ..lost(false, WitnessView::LeaseHeldByMe)
    };
    let in_sync_heard = Observation {
        replication: Some(in_sync()),
        arbiter: Some(rec(None)),
        ..seen(status(Some(meta(B, Role::Follower, 3, None)), State::Follower), WitnessView::LeaseHeldByMe)
    };
    let out = tick(&mut a, s(1), in_sync_heard);
    assert!(out.contains(&Action::RecordSync(Some(B.into()))), "{out:?}");
    let not_streaming = Replication { sync_configured: true, peer_streaming: false, peer_in_sync: false };
    let after = settings(A, WitnessMode::Arbiter).degrade_after.as_secs();
    let out = ticks(&mut a, 2, 1 + after, || obs(not_streaming, Some(B)));
    assert!(out.iter().all(|(_, a)| matches!(a, Action::AcquireLease { .. })), "waits degrade_after: {out:?}");
    let out = tick(&mut a, s(2 + after), obs(not_streaming, Some(B)));
    assert!(out.contains(&Action::RecordSync(None)) && !out.contains(&Action::SetDurability { synchronous: false }));
    let out = tick(&mut a, s(3 + after), obs(not_streaming, None));
    assert!(out.contains(&Action::SetDurability { synchronous: false }), "{out:?}");
}

#[test]
fn first_tick_releases_a_leftover_vip() {
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(meta(A, Role::Leader, 3, None)));
    assert!(!a.started());
    let out = a.step(s(0), Input::Tick(lost(false, WitnessView::NoOpinion)));
    assert_eq!(out, vec![Action::ReleaseVip]);
    assert_eq!(a.step(s(1), Input::Tick(lost(false, WitnessView::NoOpinion))), vec![]);
}

#[test]
fn hostmeta_of_another_node_is_unusable() {
    let m = Machine::new(settings(B, WitnessMode::None), LocalMeta::Loaded(meta(A, Role::Leader, 3, None)));
    assert_eq!((m.state(), m.meta()), (State::Init, None));
}

#[test]
fn unusable_hostmeta_waits_for_the_peer_and_recovers_from_it() {
    let mut b = Machine::new(settings(B, WitnessMode::None), LocalMeta::Unusable);
    assert_eq!(b.state(), State::Init);
    assert_eq!(ticks(&mut b, 0, 600, || lost(false, WitnessView::NoOpinion)), vec![], "never acts alone");
    assert_eq!(b.status().meta, None);
    // A peer from another cluster is not trusted.
    let mut foreign = meta(A, Role::Leader, 7, None);
    foreign.cluster = "factory-2".into();
    assert_eq!(tick(&mut b, s(601), seen(status(Some(foreign), State::Leader), WitnessView::NoOpinion)), vec![]);
    let pm = meta(A, Role::Leader, 7, None);
    let out = tick(&mut b, s(602), seen(status(Some(pm.clone()), State::Leader), WitnessView::NoOpinion));
    assert_eq!(out, vec![Action::RecoverHostMeta(pm.clone())]);
    let out = tick(&mut b, s(603), seen(status(Some(pm), State::Leader), WitnessView::NoOpinion));
    assert!(out.contains(&Action::Rejoin { leader: A.into() }));
    assert_eq!((b.state(), b.meta().unwrap().epoch), (State::Follower, 7));
}

/// Wall-clock `last_modified` moved by hours either way must not change any
/// decision: the same scenarios give the same actions.
#[test]
fn wall_clock_jumps_change_nothing() {
    let hour = 3_600_000u64;
    let scenario = |shift_a: i64, shift_b: i64| {
        let shift = |mut m: HostMeta, by: i64| {
            m.last_modified_unix_ms = m.last_modified_unix_ms.saturating_add_signed(by);
            m
        };
        let mut log = vec![];
        for (ra, ea, rb, eb) in [
            (Role::Leader, 3, Role::Leader, 3),
            (Role::Leader, 3, Role::Follower, 4),
            (Role::Follower, 3, Role::Leader, 3),
        ] {
            let ma = shift(meta(A, ra, ea, Some((1, 5))), shift_a);
            let mb = shift(meta(B, rb, eb, Some((1, 5))), shift_b);
            let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Loaded(ma.clone()));
            log.push(tick(&mut a, s(0), seen(status(Some(mb.clone()), State::Election), WitnessView::NoOpinion)));
            let mut b = Machine::new(settings(B, WitnessMode::None), LocalMeta::Loaded(mb));
            log.push(tick(&mut b, s(0), seen(status(Some(ma), State::Leader), WitnessView::NoOpinion)));
        }
        // Strip the recorded timestamps themselves from persisted records.
        for acts in &mut log {
            for act in acts.iter_mut() {
                if let Action::PersistHostMeta(m) = act {
                    m.last_modified_unix_ms = 0;
                }
            }
        }
        log
    };
    let base = scenario(0, 0);
    for (da, db) in
        [(5 * hour as i64, 0), (-5 * hour as i64, 0), (0, 48 * hour as i64), (-24 * hour as i64, 24 * hour as i64)]
    {
        assert_eq!(scenario(da, db), base, "shift a by {da} ms, b by {db} ms");
    }
}

#[test]
fn settings_from_config_defaults() {
    let cfg: crate::config::GeminiConfig = serde_json::from_value(serde_json::json!({
        "cluster": {"name": "shop-17", "vip": "10.0.0.9", "bootstrap_leader": "a",
                    "witness": {"mode": "gateway", "targets": ["10.0.0.254"]}},
        "node": {"name": "a", "ip": "10.0.0.1"},
        "peer": {"name": "b", "ip": "10.0.0.2"},
        "api": {"token": "t"},
        "k3s": {"token": "t"},
        "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"},
    }))
    .unwrap();
    let st = Settings::from_config(&cfg);
    assert_eq!(st.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(st.failure_threshold, 3);
    assert_eq!(st.fence_timeout, s(2));
    assert_eq!(st.promotion_margin, s(1));
    assert_eq!(st.witness, WitnessMode::Gateway);
    assert_eq!((st.own_name.as_str(), st.peer_name.as_str(), st.bootstrap_leader.as_str()), ("a", "b", "a"));
    assert_eq!(st.promotion_bound(), s(5));
}

#[test]
fn claims_order() {
    let c = |epoch, pos: Option<(u32, u64)>, incumbent, bootstrap, name: &str| Claim {
        name: name.into(),
        epoch,
        position: pos.map(|(t, l)| (t, Lsn(l))),
        incumbent,
        bootstrap,
    };
    use std::cmp::Ordering::*;
    assert_eq!(compare_claims(&c(2, None, false, false, "b"), &c(1, Some((9, 9)), true, true, "a")), Greater);
    assert_eq!(compare_claims(&c(1, Some((2, 0)), false, false, "b"), &c(1, Some((1, 99)), true, true, "a")), Greater);
    assert_eq!(compare_claims(&c(1, Some((1, 5)), true, false, "b"), &c(1, Some((1, 5)), false, true, "a")), Greater);
    assert_eq!(compare_claims(&c(1, None, true, true, "a"), &c(1, None, true, false, "b")), Greater);
    assert_eq!(compare_claims(&c(1, None, true, false, "a"), &c(1, None, true, false, "b")), Greater);
    assert_eq!(compare_claims(&c(1, None, true, false, "b"), &c(1, None, true, false, "a")), Less);
}

/// The bootstrap leader's first promotion fails (its datastore did not
/// start); the follower's first rejoin fails too (nothing to copy yet).
/// The cluster must still form: the bootstrap leader tries again.
#[test]
fn a_failed_first_promotion_is_retried() {
    let mut a = Machine::new(settings(A, WitnessMode::None), LocalMeta::Missing);
    let mut b = Machine::new(settings(B, WitnessMode::None), LocalMeta::Missing);
    let mut promotions = 0;
    let mut trace = Vec::new();
    for t in 0..120 {
        let now = Duration::from_millis(500 * t);
        let (sa, sb) = (a.status(), b.status());
        let acts_a = a.step(now, Input::Tick(seen(sb, WitnessView::NoOpinion)));
        let acts_b = b.step(now, Input::Tick(seen(sa, WitnessView::NoOpinion)));
        for act in acts_a {
            if let Action::Promote { .. } = act {
                promotions += 1;
                let done = if promotions == 1 { Completion::PromotionFailed } else { Completion::PromotionDone };
                a.step(now, Input::Done(done));
            }
        }
        for act in acts_b {
            match act {
                Action::Rejoin { .. } => {
                    let done = if a.leading() { Completion::RejoinDone } else { Completion::RejoinFailed };
                    b.step(now, Input::Done(done));
                }
                Action::Promote { .. } => {
                    b.step(now, Input::Done(Completion::PromotionDone));
                }
                _ => {}
            }
        }
        trace.push((t, a.state(), b.state()));
        let formed = |l: &Machine, f: &Machine| l.state() == State::Leader && f.state() == State::Follower;
        if formed(&a, &b) || formed(&b, &a) {
            return;
        }
    }
    panic!("the cluster never formed after a failed first promotion: {:?}", &trace[trace.len() - 5..]);
}

/// A follower that is not entitled waits; an operator can force it once the
/// old leader is silent everywhere, and the takeover raises the epoch (the
/// old leader's divergent writes are archived when it rejoins).
#[test]
fn an_operator_can_force_a_takeover_only_once_the_old_leader_is_silent() {
    let lm = meta(A, Role::Leader, 3, None);
    let mut b = follower(B, WitnessMode::Gateway, 3);
    tick(&mut b, s(1), seen(not_in_sync(lm), WitnessView::GatewayReachable));
    assert!(b.can_force().is_err(), "the leader still answers");
    let out = ticks(&mut b, 2, 30, || lost(true, WitnessView::GatewayReachable));
    assert!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()).is_none());
    assert!(b.can_force().unwrap_err().contains("port still answers"));
    tick(&mut b, s(31), Observation { vip_elsewhere: Some(true), ..lost(false, WitnessView::GatewayReachable) });
    assert!(b.can_force().unwrap_err().contains("VIP"));
    tick(&mut b, s(32), lost(false, WitnessView::GatewayReachable));
    assert_eq!(b.can_force(), Ok(()));
    b.step(s(32), Input::ForceTakeOver);
    assert!(b.forcing());
    // Still only after the fence window since the old leader last answered,
    // for the VIP (31 s + 5 s + 2 s).
    let out = ticks(&mut b, 33, 40, || lost(false, WitnessView::GatewayReachable));
    let at = out.iter().find(|(_, a)| matches!(a, Action::Promote { .. })).map(|(t, _)| *t);
    assert_eq!(at, Some(38), "{out:?}");
    assert_eq!(promotes(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()), Some(4));
    assert!(!b.forcing(), "one takeover per force");
}

/// A leader handing over, its follower, and the checkpoint of its clean
/// shutdown; modes none.
fn handing_over() -> (Machine, Machine, WalPosition) {
    let mut a = leader(A, WitnessMode::None, 3);
    let mut b = follower(B, WitnessMode::None, 3);
    tick(&mut a, s(1), Observation { replication: Some(in_sync()), ..seen(b.status(), WitnessView::NoOpinion) });
    let out = a.step(s(1), Input::Switchover);
    // The VIP stays while PostgreSQL shuts down: no write commits past the
    // shutdown's start, and clients get an error rather than silence.
    assert_eq!(&out[..1], &[Action::HandOver], "{out:?}");
    assert!(a.holds_vip(), "{out:?}");
    tick(&mut b, s(1), seen(a.status(), WitnessView::NoOpinion));
    (a, b, WalPosition { timeline: 1, lsn: Lsn(8192) })
}

#[test]
fn a_planned_switchover_promotes_only_past_the_clean_shutdown() {
    let (mut a, mut b, checkpoint) = handing_over();
    // While the old primary shuts down, the follower waits, however long.
    for t in 2..30 {
        let out = tick(&mut b, s(t), seen(a.status(), WitnessView::NoOpinion));
        assert_eq!(promotes(&out), None, "{t}: {out:?}");
        tick(&mut a, s(t), seen(b.status(), WitnessView::NoOpinion));
    }
    let out = a.step(s(30), Input::Done(Completion::HandedOver(Some(checkpoint))));
    assert_eq!(out, vec![Action::ReleaseVip], "the VIP goes before the peer hears of the checkpoint");
    let out = tick(&mut b, s(31), seen(a.status(), WitnessView::NoOpinion));
    let promote = Action::Promote { epoch: 4, bootstrap: false, not_after: None, catch_up: Some(checkpoint) };
    let at = out.iter().position(|a| *a == promote).unwrap_or_else(|| panic!("no promotion: {out:?}"));
    assert_eq!(out.get(at + 1), Some(&Action::TakeVip), "the VIP comes along as the promotion starts: {out:?}");
    let out = tick(&mut a, s(31), seen(b.status(), WitnessView::NoOpinion));
    assert!(out.is_empty(), "no rejoin of a peer that is not primary yet: {out:?}");
    b.step(s(31), Input::Done(Completion::PromotionDone));
    // The old leader follows once the peer leads.
    let out = tick(&mut a, s(32), seen(b.status(), WitnessView::NoOpinion));
    assert_eq!(out, vec![Action::Rejoin { leader: B.into() }]);
    assert_eq!(a.status().handover, None);
}

#[test]
fn an_unclean_shutdown_aborts_the_switchover_and_the_leader_resumes() {
    let (mut a, mut b, _) = handing_over();
    a.step(s(2), Input::Done(Completion::HandedOver(None)));
    assert_eq!(a.status().handover, Some(HandOver::Unclean));
    // The follower never promotes on it; the old leader resumes once the
    // follower has had time to hear that, and still follows.
    let mut resumed = None;
    for t in 2..10 {
        let out = tick(&mut b, s(t), seen(a.status(), WitnessView::NoOpinion));
        assert_eq!(promotes(&out), None, "{t}: {out:?}");
        let out = tick(&mut a, s(t), seen(b.status(), WitnessView::NoOpinion));
        if out.contains(&Action::Unfence) {
            resumed = Some((t, out));
            break;
        }
    }
    let (t, out) = resumed.expect("the old leader resumes");
    assert!(t >= 5, "not before the follower heard the withdrawal: {t}");
    assert!(out.contains(&Action::TakeVip), "{out:?}");
    assert!(a.leading() && a.status().handover.is_none());
    assert_eq!(a.meta().unwrap().epoch, 3, "cluster unchanged");
    assert_eq!(a.meta().unwrap().node.role, Role::Leader);
}

#[test]
fn a_follower_that_cannot_catch_up_refuses_and_the_leader_resumes() {
    let (mut a, mut b, checkpoint) = handing_over();
    a.step(s(2), Input::Done(Completion::HandedOver(Some(checkpoint))));
    let out = tick(&mut b, s(2), seen(a.status(), WitnessView::NoOpinion));
    assert_eq!(promotes(&out), Some(4));
    // While the follower catches up (promoting, not yet primary), the old
    // leader neither rejoins it nor gives its hand-over up.
    for t in 3..12 {
        let out = tick(&mut a, s(t), seen(b.status(), WitnessView::NoOpinion));
        assert!(out.is_empty(), "{t}: {out:?}");
        assert_eq!(a.status().handover, Some(HandOver::Clean(checkpoint)));
    }
    b.step(s(12), Input::Done(Completion::CatchUpFailed));
    assert_eq!(b.status().refused, Some(checkpoint));
    assert!(!b.leading());
    let mut resumed = None;
    for t in 13..25 {
        // Never again on the same checkpoint, even after the backoff.
        let out = tick(&mut b, s(t), seen(a.status(), WitnessView::NoOpinion));
        assert_eq!(promotes(&out), None, "{t}: {out:?}");
        let out = tick(&mut a, s(t), seen(b.status(), WitnessView::NoOpinion));
        if out.contains(&Action::Unfence) {
            resumed = Some(t);
            break;
        }
    }
    assert!(resumed.is_some_and(|t| t >= 16), "{resumed:?}");
    assert!(a.leading());
    assert_eq!(a.meta().unwrap().epoch, 4, "at least the epoch of the peer's refused attempt");
    // The follower forgets the refusal once the old leader leads again.
    tick(&mut b, s(30), seen(a.status(), WitnessView::NoOpinion));
    assert_eq!(b.status().refused, None);
}

#[test]
fn a_withdrawn_switchover_never_resumes_over_a_peer_that_promoted() {
    let (mut a, mut b, checkpoint) = handing_over();
    a.step(s(2), Input::Done(Completion::HandedOver(Some(checkpoint))));
    let out = tick(&mut b, s(2), seen(a.status(), WitnessView::NoOpinion));
    assert_eq!(promotes(&out), Some(4));
    // The promotion itself failed after it may have started: the peer's
    // state is unknown; it keeps its new epoch and the old leader stays down.
    b.step(s(3), Input::Done(Completion::PromotionFailed));
    assert_eq!(b.status().refused, None);
    for t in 3..20 {
        let out = tick(&mut a, s(t), seen(b.status(), WitnessView::NoOpinion));
        assert!(!out.contains(&Action::Unfence), "{t}: {out:?}");
    }
    assert!(!a.leading());
    // Even if it withdrew on its own (a later unclean report): the peer's
    // epoch is higher, so it does not resume.
    let mut a2 = handing_over().0;
    a2.step(s(2), Input::Done(Completion::HandedOver(None)));
    let promoted = PeerStatus { meta: Some(meta(B, Role::Follower, 4, None)), ..status(None, State::Follower) };
    for t in 2..20 {
        let out = tick(&mut a2, s(t), seen(promoted.clone(), WitnessView::NoOpinion));
        assert!(!out.contains(&Action::Unfence), "{t}: {out:?}");
    }
    // Nor while the peer is promoting.
    let mut a3 = handing_over().0;
    a3.step(s(2), Input::Done(Completion::HandedOver(None)));
    let promoting = status(Some(meta(B, Role::Leader, 3, None)), State::Promoting);
    for t in 2..20 {
        let out = tick(&mut a3, s(t), seen(promoting.clone(), WitnessView::NoOpinion));
        assert!(!out.contains(&Action::Unfence), "{t}: {out:?}");
    }
}

#[test]
fn a_hand_over_for_a_failed_datastore_gives_no_proof_and_the_peer_promotes_as_before() {
    let mut b = follower(B, WitnessMode::None, 3);
    let legacy = PeerStatus {
        handing_over: true,
        vote: Some(B.into()),
        ..status(Some(meta(A, Role::Follower, 3, Some((1, 100)))), State::Demoting)
    };
    let out = tick(&mut b, s(1), seen(legacy, WitnessView::NoOpinion));
    assert!(out.contains(&Action::Promote { epoch: 4, bootstrap: false, not_after: None, catch_up: None }), "{out:?}");
}

#[test]
fn a_leader_whose_follower_vanished_mid_switchover_can_be_forced_back() {
    let (mut a, _b, checkpoint) = handing_over();
    a.step(s(2), Input::Done(Completion::HandedOver(Some(checkpoint))));
    // The follower is gone for good: nothing happens on its own.
    let out = ticks(&mut a, 3, 30, || lost(false, WitnessView::NoOpinion));
    assert!(
        out.iter().all(|(_, a)| !matches!(a, Action::Promote { .. } | Action::Unfence | Action::TakeVip)),
        "{out:?}"
    );
    assert!(a.can_force().is_ok(), "{:?}", a.can_force());
    a.step(s(30), Input::ForceTakeOver);
    let out = tick(&mut a, s(31), lost(false, WitnessView::NoOpinion));
    assert!(out.contains(&Action::Promote { epoch: 4, bootstrap: false, not_after: None, catch_up: None }), "{out:?}");
    assert!(a.status().handover.is_none());
}
