//! What a trial does: the fault kinds, scenarios (one fault or two
//! combined), and the seeded draw of a scenario and its timings. The same
//! seed and fault list give the same draws.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One fault, with the role it hits (roles as they are when the trial starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The link between the two nodes' addresses, both ways.
    Cut,
    /// The link between the two nodes' addresses, one way (drawn: from the leader or to it).
    CutOneWay,
    IsolateLeader,
    IsolateFollower,
    /// Power cut, powered on again at the end of the fault.
    KillLeader,
    KillFollower,
    /// The leader's agent crashes (SIGKILL); restarted at the end, as by systemd.
    KillAgentLeader,
    /// The leader's agent hangs (SIGSTOP); continued at the end.
    PauseAgentLeader,
    /// The witness host is unreachable from both nodes.
    WitnessDown,
    /// Both nodes lose power; the leader boots first, the follower after a drawn delay.
    PowerCycleLeaderFirst,
    PowerCycleFollowerFirst,
}

impl Fault {
    pub const ALL: [Fault; 11] = [
        Fault::Cut,
        Fault::CutOneWay,
        Fault::IsolateLeader,
        Fault::IsolateFollower,
        Fault::KillLeader,
        Fault::KillFollower,
        Fault::KillAgentLeader,
        Fault::PauseAgentLeader,
        Fault::WitnessDown,
        Fault::PowerCycleLeaderFirst,
        Fault::PowerCycleFollowerFirst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Cut => "cut",
            Fault::CutOneWay => "cut-one-way",
            Fault::IsolateLeader => "isolate-leader",
            Fault::IsolateFollower => "isolate-follower",
            Fault::KillLeader => "kill-leader",
            Fault::KillFollower => "kill-follower",
            Fault::KillAgentLeader => "kill-agent-leader",
            Fault::PauseAgentLeader => "pause-agent-leader",
            Fault::WitnessDown => "witness-down",
            Fault::PowerCycleLeaderFirst => "power-cycle-leader-first",
            Fault::PowerCycleFollowerFirst => "power-cycle-follower-first",
        }
    }

    fn parse(name: &str) -> Result<Fault, String> {
        Fault::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault `{name}`; the faults are: {}", names.join(", "))
        })
    }

    /// A network cut, which sometimes lasts long enough to cross the
    /// leader's degrade time.
    fn is_cut(self) -> bool {
        matches!(self, Fault::Cut | Fault::CutOneWay | Fault::IsolateLeader | Fault::IsolateFollower)
    }

    fn is_power_cycle(self) -> bool {
        matches!(self, Fault::PowerCycleLeaderFirst | Fault::PowerCycleFollowerFirst)
    }
}

/// One fault, or two combined (`witness-down+isolate-leader`): the second
/// starts a drawn time after the first, and both end together.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Scenario(pub Vec<Fault>);

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|x| x.name()).collect();
        f.write_str(&names.join("+"))
    }
}

impl From<Scenario> for String {
    fn from(s: Scenario) -> String {
        s.to_string()
    }
}

/// The default `--faults`: every fault alone, and the combinations that
/// test a second fault on top of a first.
pub const DEFAULT_FAULTS: &str = "cut,cut-one-way,isolate-leader,isolate-follower,kill-leader,kill-follower,\
kill-agent-leader,pause-agent-leader,witness-down,power-cycle-leader-first,power-cycle-follower-first,\
witness-down+isolate-leader,cut+kill-leader";

/// Parse `cut,kill-leader,witness-down+isolate-leader`.
pub fn parse_scenarios(list: &str) -> Result<Vec<Scenario>, String> {
    let scenarios = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let faults = s.split('+').map(|f| Fault::parse(f.trim())).collect::<Result<Vec<_>, _>>()?;
            match faults.len() {
                1 | 2 => Ok(Scenario(faults)),
                n => Err(format!("`{s}` combines {n} faults; a scenario is one fault or two joined by `+`")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if scenarios.is_empty() {
        return Err(format!("no faults in `{list}`; name at least one, e.g. `cut,kill-leader`"));
    }
    Ok(scenarios)
}

/// What one trial does, drawn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Draw {
    pub scenario: Scenario,
    /// From the first fault to the heal (for a power cycle: how long both nodes stay off).
    #[serde(serialize_with = "super::secs::serialize")]
    pub duration: Duration,
    /// When the second fault of a combination starts, after the first.
    #[serde(serialize_with = "super::secs::serialize")]
    pub second_after: Duration,
    /// `cut-one-way`: whether the leader's packets to the follower are dropped
    /// (else the follower's to the leader).
    pub from_leader: bool,
    /// Power cycles: between the first and the second node powering on.
    #[serde(serialize_with = "super::secs::serialize")]
    pub power_on_delay: Duration,
}

impl fmt::Display for Draw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} for {:.1} s", self.scenario, self.duration.as_secs_f64())?;
        if self.scenario.0.len() > 1 {
            write!(f, " (second fault after {:.1} s)", self.second_after.as_secs_f64())?;
        }
        if self.scenario.0.contains(&Fault::CutOneWay) {
            f.write_str(if self.from_leader { ", leader->follower dropped" } else { ", follower->leader dropped" })?;
        }
        if self.scenario.0.iter().any(|x| x.is_power_cycle()) {
            write!(f, ", second node on {:.1} s after the first", self.power_on_delay.as_secs_f64())?;
        }
        Ok(())
    }
}

/// Fault durations: most cross the detection and fencing times (about 1-3 s
/// with the fast timings, 2-5 s with the defaults); one cut in five lasts
/// [`LONG_CUTS`], past the leader's `degrade_after` (30 s by default).
const DURATION_MS: (u64, u64) = (5_000, 25_000);
pub const LONG_CUTS: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(40));
const LONG_CUT_ONE_IN: u32 = 5;
const POWER_ON_DELAY_MS: (u64, u64) = (0, 8_000);

/// Draws trials from a list of scenarios with a seeded generator.
#[derive(Debug)]
pub struct Planner {
    rng: StdRng,
    scenarios: Vec<Scenario>,
    in_order: bool,
    long_cuts: (Duration, Duration),
    next: usize,
}

impl Planner {
    /// `in_order`: take the scenarios in list order, round robin, instead of drawing them.
    pub fn new(seed: u64, scenarios: Vec<Scenario>, in_order: bool) -> Planner {
        Planner { rng: StdRng::seed_from_u64(seed), scenarios, in_order, long_cuts: LONG_CUTS, next: 0 }
    }

    /// The range of the long cuts instead of [`LONG_CUTS`].
    pub fn long_cuts(mut self, min: Duration, max: Duration) -> Planner {
        self.long_cuts = (min.min(max), max.max(min));
        self
    }

    pub fn draw(&mut self) -> Draw {
        let pick = if self.in_order {
            self.next % self.scenarios.len()
        } else {
            self.rng.random_range(0..self.scenarios.len())
        };
        self.next += 1;
        let scenario = self.scenarios[pick].clone();
        // Every number is drawn every time, so one trial's kind does not shift the next trial's draws.
        let long = self.rng.random_ratio(1, LONG_CUT_ONE_IN);
        let short_ms = self.rng.random_range(DURATION_MS.0..=DURATION_MS.1);
        let long_ms = self.rng.random_range(self.long_cuts.0.as_millis() as u64..=self.long_cuts.1.as_millis() as u64);
        let second_share: f64 = self.rng.random_range(0.0..0.5);
        let from_leader = self.rng.random_bool(0.5);
        let delay_ms = self.rng.random_range(POWER_ON_DELAY_MS.0..=POWER_ON_DELAY_MS.1);
        let cut = scenario.0.iter().any(|f| f.is_cut());
        let duration = Duration::from_millis(if long && cut { long_ms } else { short_ms });
        Draw {
            second_after: if scenario.0.len() > 1 { duration.mul_f64(second_share) } else { Duration::ZERO },
            scenario,
            duration,
            from_leader,
            power_on_delay: Duration::from_millis(delay_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_with_combinations_and_name_the_faults_on_error() {
        let s = parse_scenarios("cut, witness-down+isolate-leader").unwrap();
        assert_eq!(s, vec![Scenario(vec![Fault::Cut]), Scenario(vec![Fault::WitnessDown, Fault::IsolateLeader])]);
        assert_eq!(s[1].to_string(), "witness-down+isolate-leader");
        let err = parse_scenarios("cut,kill-leeder").unwrap_err();
        assert!(err.contains("kill-leeder") && err.contains("kill-leader"), "{err}");
        assert!(parse_scenarios("cut+kill-leader+witness-down").is_err());
        assert!(parse_scenarios(" , ").is_err());
        assert_eq!(parse_scenarios(DEFAULT_FAULTS).unwrap().len(), 13);
    }

    #[test]
    fn the_same_seed_draws_the_same_trials() {
        let list = parse_scenarios(DEFAULT_FAULTS).unwrap();
        let draws = |seed| {
            let mut p = Planner::new(seed, list.clone(), false);
            (0..30).map(|_| p.draw()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn durations_stay_in_range_and_only_cuts_run_long() {
        let list = parse_scenarios(DEFAULT_FAULTS).unwrap();
        let mut p = Planner::new(1, list, false);
        let mut long_cuts = 0;
        for _ in 0..500 {
            let d = p.draw();
            let ms = d.duration.as_millis() as u64;
            let cut = d.scenario.0.iter().any(|f| f.is_cut());
            if ms > DURATION_MS.1 {
                assert!(cut, "{d}");
                assert!((LONG_CUTS.0..=LONG_CUTS.1).contains(&d.duration), "{d}");
                long_cuts += 1;
            } else {
                assert!(ms >= DURATION_MS.0, "{d}");
            }
            assert!(d.second_after < d.duration / 2 + Duration::from_millis(1), "{d}");
        }
        assert!(long_cuts > 0, "no long cut in 500 draws");
    }

    #[test]
    fn long_cuts_take_the_range_given() {
        let list = parse_scenarios("cut").unwrap();
        let (min, max) = (Duration::from_secs(95), Duration::from_secs(100));
        let mut p = Planner::new(1, list, false).long_cuts(max, min);
        let long: Vec<Duration> =
            (0..100).map(|_| p.draw().duration).filter(|d| *d > Duration::from_secs(25)).collect();
        assert!(!long.is_empty());
        assert!(long.iter().all(|d| (min..=max).contains(d)), "{long:?}");
    }

    #[test]
    fn in_order_takes_the_list_round_robin() {
        let list = parse_scenarios("kill-leader,cut").unwrap();
        let mut p = Planner::new(3, list, true);
        let names: Vec<String> = (0..3).map(|_| p.draw().scenario.to_string()).collect();
        assert_eq!(names, ["kill-leader", "cut", "kill-leader"]);
    }
}
