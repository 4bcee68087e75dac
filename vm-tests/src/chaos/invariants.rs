//! What a trial must show, checked on what the writers and the sampler
//! recorded and what the datastore returns afterwards; and which of these
//! each witness mode promises.

use std::collections::HashMap;
use std::time::Duration;

use geminik8s::config::WitnessMode;
use serde::Serialize;

use super::plan::{Fault, Scenario};
use super::sampler::Sample;
use super::writers::Ack;
use crate::probe::Kv;

/// What the product promises about writes and leaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Every acknowledged put reads back with its value and revision.
    NoLostWrite,
    /// Acknowledged revisions only go up.
    NoRevisionRegression,
    /// Never two nodes answering for the VIP.
    OneVipHolder,
    /// After the heal, one leader, a streaming synchronous follower, one
    /// VIP holder, and writes through every path, within the deadline.
    Converges,
}

impl Invariant {
    pub fn name(self) -> &'static str {
        match self {
            Invariant::NoLostWrite => "lost writes",
            Invariant::NoRevisionRegression => "revision regressions",
            Invariant::OneVipHolder => "dual VIP",
            Invariant::Converges => "unconverged",
        }
    }
}

/// One thing a witness mode does not promise, in the scenarios that contain
/// one of `faults`, and why.
struct Exception {
    mode: WitnessMode,
    invariant: Invariant,
    faults: &'static [Fault],
    why: &'static str,
}

/// What each witness mode does not promise. Everything else holds in every
/// mode, whatever single fault (and the combinations drawn) happen.
const NOT_PROMISED: &[Exception] = &[
    Exception {
        mode: WitnessMode::None,
        invariant: Invariant::OneVipHolder,
        faults: &[Fault::IsolateLeader, Fault::IsolateFollower],
        why: "witness `none` decides on peer loss alone: a node cut off from everyone is taken for dead, so the \
              follower leads while the isolated leader keeps the VIP",
    },
    Exception {
        mode: WitnessMode::None,
        invariant: Invariant::NoLostWrite,
        faults: &[Fault::IsolateLeader, Fault::IsolateFollower],
        why: "witness `none`: a node cut off from everyone is taken for dead; once the isolated leader has waited out \
              its follower's entitlement it acknowledges its own node's writes alone, and the heal discards one side",
    },
];

/// Whether `mode` promises `invariant` in `scenario`; `Err(reason)` when it
/// does not by design.
pub fn promised(mode: WitnessMode, invariant: Invariant, scenario: &Scenario) -> Result<(), &'static str> {
    let exception = NOT_PROMISED
        .iter()
        .find(|e| e.mode == mode && e.invariant == invariant && scenario.0.iter().any(|f| e.faults.contains(f)));
    match exception {
        Some(e) => Err(e.why),
        None => Ok(()),
    }
}

/// An acknowledged put that did not read back as acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostWrite {
    pub writer: String,
    pub ack: Ack,
    /// What the datastore has under the key instead: `(value, mod_revision)`.
    pub found: Option<(String, i64)>,
}

/// Every acknowledged put of `acks` (per writer) that `read` does not hold
/// with the same value and a mod revision equal to the acknowledged one (a
/// key present with another revision was overwritten or re-created: lost).
pub fn lost_writes(acks: &[(String, Vec<Ack>)], read: &[Kv]) -> Vec<LostWrite> {
    let by_key: HashMap<&str, &Kv> = read.iter().map(|kv| (kv.key.as_str(), kv)).collect();
    let mut lost = Vec::new();
    for (writer, list) in acks {
        for ack in list {
            let found = by_key.get(ack.key.as_str());
            let intact = found.is_some_and(|kv| kv.value == ack.value && kv.mod_revision == ack.revision);
            if !intact {
                lost.push(LostWrite {
                    writer: writer.clone(),
                    ack: ack.clone(),
                    found: found.map(|kv| (kv.value.clone(), kv.mod_revision)),
                });
            }
        }
    }
    lost
}

/// Consecutive acknowledgements of one writer whose revision did not go up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regression {
    pub writer: String,
    pub before: Ack,
    pub after: Ack,
}

/// In ack order, each writer's revisions must strictly increase.
pub fn regressions(writer: &str, acks: &[Ack]) -> Vec<Regression> {
    acks.windows(2)
        .filter(|w| w[1].revision <= w[0].revision)
        .map(|w| Regression { writer: writer.to_string(), before: w[0].clone(), after: w[1].clone() })
        .collect()
}

/// The times between consecutive acknowledgements of one writer.
pub fn gaps(acks: &[Ack]) -> Vec<Duration> {
    acks.windows(2).map(|w| w[1].at.saturating_sub(w[0].at)).collect()
}

/// Samples with more than one VIP holder.
pub fn dual_vip(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.holders.len() > 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(key: &str, revision: i64, at_ms: u64) -> Ack {
        let at = Duration::from_millis(at_ms);
        Ack { key: key.into(), value: format!("v-{key}"), revision, sent: at, at }
    }

    fn kv(key: &str, value: &str, mod_revision: i64) -> Kv {
        Kv { key: key.into(), value: value.into(), mod_revision }
    }

    #[test]
    fn a_write_is_lost_when_missing_changed_or_rewritten() {
        let acks = vec![("w".to_string(), vec![ack("a", 10, 0), ack("b", 11, 1), ack("c", 12, 2), ack("d", 13, 3)])];
        let read = vec![kv("a", "v-a", 10), kv("b", "other", 11), kv("c", "v-c", 20)];
        let lost = lost_writes(&acks, &read);
        let keys: Vec<&str> = lost.iter().map(|l| l.ack.key.as_str()).collect();
        assert_eq!(keys, ["b", "c", "d"]);
        assert_eq!(lost[1].found, Some(("v-c".to_string(), 20)), "a key re-created at another revision is lost");
        assert_eq!(lost[2].found, None);
    }

    #[test]
    fn revisions_must_strictly_increase_per_writer() {
        let acks = [ack("a", 10, 0), ack("b", 12, 1), ack("c", 12, 2), ack("d", 5, 3), ack("e", 6, 4)];
        let r = regressions("w", &acks);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].before.revision, r[0].after.revision), (12, 12));
        assert_eq!((r[1].before.revision, r[1].after.revision), (12, 5));
        assert!(regressions("w", &acks[..2]).is_empty());
    }

    #[test]
    fn gaps_are_between_consecutive_acks() {
        let acks = [ack("a", 1, 100), ack("b", 2, 300), ack("c", 3, 4300)];
        assert_eq!(gaps(&acks), [Duration::from_millis(200), Duration::from_millis(4000)]);
        assert!(gaps(&acks[..1]).is_empty());
    }

    #[test]
    fn only_two_holders_at_once_count_as_dual() {
        let s = |h: &[&str]| Sample { at: Duration::ZERO, holders: h.iter().map(|x| x.to_string()).collect() };
        let samples = [s(&["node1"]), s(&[]), s(&["node1", "node2"])];
        assert_eq!(dual_vip(&samples).len(), 1);
    }

    #[test]
    fn only_none_isolated_may_lose_writes_or_hold_two_vips() {
        let isolated = Scenario(vec![Fault::IsolateLeader]);
        let killed = Scenario(vec![Fault::KillLeader, Fault::IsolateFollower]);
        let cut = Scenario(vec![Fault::Cut, Fault::KillAgentLeader]);
        for inv in [Invariant::OneVipHolder, Invariant::NoLostWrite] {
            assert!(promised(WitnessMode::None, inv, &isolated).is_err());
            assert!(promised(WitnessMode::None, inv, &killed).is_err(), "a combination with an isolation");
            assert!(promised(WitnessMode::None, inv, &cut).is_ok(), "no isolation: promised");
        }
        for inv in [Invariant::NoRevisionRegression, Invariant::Converges] {
            assert!(promised(WitnessMode::None, inv, &isolated).is_ok());
        }
        for mode in [WitnessMode::Gateway, WitnessMode::Arbiter] {
            for inv in [Invariant::OneVipHolder, Invariant::NoLostWrite] {
                assert!(promised(mode, inv, &isolated).is_ok());
            }
        }
    }
}
