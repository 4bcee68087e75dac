//! What a chaos run found: one record per trial, a summary per witness
//! mode and per fault, rendered as a table (Markdown, as it goes into
//! docs/reliability.md) or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use geminik8s::config::WitnessMode;
use serde::Serialize;

use super::invariants::{Invariant, LostWrite, Regression, promised};
use super::plan::{Draw, Scenario};
use super::sampler::Sample;

/// One trial, checked.
#[derive(Debug, Clone, Serialize)]
pub struct TrialReport {
    pub mode: WitnessMode,
    /// 1-based, per mode.
    pub trial: usize,
    pub draw: Draw,
    pub leader_before: String,
    /// The whole trial, from the writers' start to the checks' end.
    #[serde(serialize_with = "super::secs::serialize")]
    pub took: Duration,
    /// Acknowledged puts per writer.
    pub acked: BTreeMap<String, usize>,
    /// Whether the acknowledged puts could be read back (not when the
    /// cluster did not converge far enough to serve a read).
    pub read_back: bool,
    pub lost: Vec<LostWrite>,
    pub regressions: Vec<Regression>,
    /// The largest revision acknowledged so far in this mode's run, and the
    /// revision of a fresh write after convergence (must be greater).
    pub max_acked_revision: i64,
    pub fresh_revision: Option<i64>,
    pub samples: usize,
    pub dual_vip_samples: usize,
    pub first_dual_vip: Option<Sample>,
    /// From the heal to convergence; `None`: not within the deadline.
    #[serde(serialize_with = "super::secs::opt")]
    pub converged_after: Option<Duration>,
    /// What was seen last while waiting for convergence, when it was not reached.
    pub last_seen: Option<String>,
    /// Every gap between two consecutive acknowledgements of the writer
    /// through the VIP (what a user of the cluster sees).
    #[serde(skip)]
    pub client_gaps: Vec<Duration>,
    /// Each writer's longest gap, in seconds. A node's own writer does not
    /// write while its node is powered off, so its gap spans the outage.
    pub longest_gap: BTreeMap<String, f64>,
    /// What the heal had to do, writers' last errors, and the like.
    pub notes: Vec<String>,
    /// Where the agents' logs of a trial with a violation were saved.
    pub logs: Option<PathBuf>,
}

impl TrialReport {
    pub fn total_acked(&self) -> usize {
        self.acked.values().sum()
    }

    /// The longest gap of the writer through the VIP.
    pub fn client_gap(&self) -> Duration {
        self.client_gaps.iter().max().copied().unwrap_or_default()
    }

    /// The longest gap of a node's own writer, and whose.
    pub fn node_gap(&self) -> (Duration, String) {
        self.longest_gap
            .iter()
            .filter(|(w, _)| w.as_str() != super::writers::CLIENT)
            .map(|(w, g)| (Duration::from_secs_f64(*g), w.clone()))
            .max()
            .unwrap_or_default()
    }

    /// Fresh write not above the largest acknowledged revision.
    pub fn fresh_not_above(&self) -> bool {
        self.fresh_revision.is_some_and(|r| r <= self.max_acked_revision)
    }

    /// The invariants this trial broke.
    pub fn broken(&self) -> Vec<Invariant> {
        let mut broken = Vec::new();
        if !self.lost.is_empty() {
            broken.push(Invariant::NoLostWrite);
        }
        if !self.regressions.is_empty() || self.fresh_not_above() {
            broken.push(Invariant::NoRevisionRegression);
        }
        if self.dual_vip_samples > 0 {
            broken.push(Invariant::OneVipHolder);
        }
        if self.converged_after.is_none() {
            broken.push(Invariant::Converges);
        }
        broken
    }

    /// Broken invariants the mode promises.
    pub fn violations(&self) -> Vec<Invariant> {
        self.broken().into_iter().filter(|i| promised(self.mode, *i, &self.draw.scenario).is_ok()).collect()
    }

    /// Broken invariants the mode does not promise, with the reason.
    pub fn by_design(&self) -> Vec<(Invariant, &'static str)> {
        self.broken()
            .into_iter()
            .filter_map(|i| promised(self.mode, i, &self.draw.scenario).err().map(|why| (i, why)))
            .collect()
    }

    /// The trial's line in the progress output.
    pub fn line(&self) -> String {
        let mode = mode_name(self.mode);
        let converged = match self.converged_after {
            Some(d) => format!("converged in {:.1} s", d.as_secs_f64()),
            None => "NOT CONVERGED".to_string(),
        };
        let lost = if self.read_back { self.lost.len().to_string() } else { "unchecked".to_string() };
        let mut line = format!(
            "[{mode}] trial {} {} (leader {}): acked {}, lost {lost}, regressions {}, dual VIP {}/{} samples, {converged}, longest gap {:.1} s through the VIP, {:.1} s node-local ({}), took {:.0} s",
            self.trial,
            self.draw,
            self.leader_before,
            self.total_acked(),
            self.regressions.len() + usize::from(self.fresh_not_above()),
            self.dual_vip_samples,
            self.samples,
            self.client_gap().as_secs_f64(),
            self.node_gap().0.as_secs_f64(),
            self.node_gap().1,
            self.took.as_secs_f64(),
        );
        let violations = self.violations();
        if !violations.is_empty() {
            let names: Vec<&str> = violations.iter().map(|i| i.name()).collect();
            let _ = write!(line, " VIOLATION: {}", names.join(", "));
        }
        for (i, _) in self.by_design() {
            let _ = write!(line, " ({} expected by design)", i.name());
        }
        line
    }
}

/// `none`, `gateway`, `arbiter`.
pub fn mode_name(mode: WitnessMode) -> String {
    serde_json::to_value(mode).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Trials of one mode with one scenario, or all of a mode's trials.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mode: WitnessMode,
    /// `None`: every scenario.
    pub scenario: Option<Scenario>,
    pub trials: usize,
    pub acked: usize,
    pub lost: usize,
    /// Trials whose acknowledged puts could not be read back.
    pub unchecked: usize,
    pub regressions: usize,
    pub dual_vip_samples: usize,
    pub unconverged: usize,
    #[serde(serialize_with = "super::secs::serialize")]
    pub gap_p50: Duration,
    #[serde(serialize_with = "super::secs::serialize")]
    pub gap_p99: Duration,
    #[serde(serialize_with = "super::secs::serialize")]
    pub gap_max: Duration,
    /// The longest gap of a node's own writer.
    #[serde(serialize_with = "super::secs::serialize")]
    pub node_gap_max: Duration,
    /// Broken invariants the mode promises (violations), and those it does not.
    pub violated: Vec<Invariant>,
    pub by_design: Vec<Invariant>,
}

impl Summary {
    pub fn of(mode: WitnessMode, scenario: Option<Scenario>, trials: &[&TrialReport]) -> Summary {
        let mut gaps: Vec<Duration> = trials.iter().flat_map(|t| t.client_gaps.iter().copied()).collect();
        gaps.sort();
        let mut violated = Vec::new();
        let mut by_design = Vec::new();
        for t in trials {
            for i in t.violations() {
                if !violated.contains(&i) {
                    violated.push(i);
                }
            }
            for (i, _) in t.by_design() {
                if !by_design.contains(&i) {
                    by_design.push(i);
                }
            }
        }
        Summary {
            mode,
            scenario,
            trials: trials.len(),
            acked: trials.iter().map(|t| t.total_acked()).sum(),
            lost: trials.iter().map(|t| t.lost.len()).sum(),
            unchecked: trials.iter().filter(|t| !t.read_back).count(),
            regressions: trials.iter().map(|t| t.regressions.len() + usize::from(t.fresh_not_above())).sum(),
            dual_vip_samples: trials.iter().map(|t| t.dual_vip_samples).sum(),
            unconverged: trials.iter().filter(|t| t.converged_after.is_none()).count(),
            gap_p50: percentile(&gaps, 50.0),
            gap_p99: percentile(&gaps, 99.0),
            gap_max: gaps.last().copied().unwrap_or_default(),
            node_gap_max: trials.iter().map(|t| t.node_gap().0).max().unwrap_or_default(),
            violated,
            by_design,
        }
    }

    fn verdict(&self) -> String {
        let mut parts = Vec::new();
        if !self.violated.is_empty() {
            let names: Vec<&str> = self.violated.iter().map(|i| i.name()).collect();
            parts.push(format!("VIOLATED: {}", names.join(", ")));
        }
        for i in &self.by_design {
            parts.push(format!("{} expected by design", i.name()));
        }
        if parts.is_empty() { "holds".to_string() } else { parts.join("; ") }
    }

    fn lost_cell(&self) -> String {
        if self.unchecked > 0 {
            format!("{} ({} trials unchecked)", self.lost, self.unchecked)
        } else {
            self.lost.to_string()
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub faults: Vec<Scenario>,
    pub timings: String,
    pub trials: Vec<TrialReport>,
    /// Per mode, all scenarios.
    pub modes: Vec<Summary>,
    /// Per mode and scenario drawn.
    pub by_fault: Vec<Summary>,
}

impl Report {
    pub fn new(seed: u64, faults: Vec<Scenario>, timings: String, trials: Vec<TrialReport>) -> Report {
        let mut modes = Vec::new();
        let mut by_fault = Vec::new();
        let mut seen_modes: Vec<WitnessMode> = Vec::new();
        for t in &trials {
            if !seen_modes.contains(&t.mode) {
                seen_modes.push(t.mode);
            }
        }
        for mode in seen_modes {
            let of_mode: Vec<&TrialReport> = trials.iter().filter(|t| t.mode == mode).collect();
            modes.push(Summary::of(mode, None, &of_mode));
            let mut scenarios: Vec<Scenario> = of_mode.iter().map(|t| t.draw.scenario.clone()).collect();
            scenarios.sort();
            scenarios.dedup();
            for s in scenarios {
                let of_fault: Vec<&TrialReport> = of_mode.iter().copied().filter(|t| t.draw.scenario == s).collect();
                by_fault.push(Summary::of(mode, Some(s), &of_fault));
            }
        }
        Report { seed, faults, timings, trials, modes, by_fault }
    }

    /// Whether any trial broke an invariant its mode promises.
    pub fn violated(&self) -> bool {
        self.modes.iter().any(|m| !m.violated.is_empty())
    }

    /// The tables, in Markdown.
    pub fn table(&self) -> String {
        let s = |d: Duration| format!("{:.2}", d.as_secs_f64());
        let mut out = String::new();
        let _ = writeln!(out, "seed {}, {} timings", self.seed, self.timings);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| witness | trials | acked | lost | revision regressions | dual-VIP samples | unconverged | VIP gap p50 s | VIP gap p99 s | VIP gap max s | node gap max s | verdict |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for m in &self.modes {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mode_name(m.mode),
                m.trials,
                m.acked,
                m.lost_cell(),
                m.regressions,
                m.dual_vip_samples,
                m.unconverged,
                s(m.gap_p50),
                s(m.gap_p99),
                s(m.gap_max),
                s(m.node_gap_max),
                m.verdict()
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| witness | fault | trials | acked | lost | revision regressions | dual-VIP samples | unconverged | longest VIP gap s | longest node gap s |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for f in &self.by_fault {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mode_name(f.mode),
                f.scenario.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                f.trials,
                f.acked,
                f.lost_cell(),
                f.regressions,
                f.dual_vip_samples,
                f.unconverged,
                s(f.gap_max),
                s(f.node_gap_max)
            );
        }
        let violating: Vec<&TrialReport> = self.trials.iter().filter(|t| !t.violations().is_empty()).collect();
        if !violating.is_empty() {
            let _ = writeln!(out, "\nviolations:");
            for t in violating {
                let _ = writeln!(out, "- {}", t.line());
                if let Some(l) = t.lost.first() {
                    let _ = writeln!(
                        out,
                        "  first lost write: {} from {} sent at {:.1} s, acked at revision {} at {:.1} s, read back as {:?}",
                        l.ack.key,
                        l.writer,
                        l.ack.sent.as_secs_f64(),
                        l.ack.revision,
                        l.ack.at.as_secs_f64(),
                        l.found
                    );
                }
                if let Some(s) = &t.first_dual_vip {
                    let _ = writeln!(out, "  first dual VIP sample at {:.1} s: {:?}", s.at.as_secs_f64(), s.holders);
                }
                if let Some(seen) = &t.last_seen {
                    let _ = writeln!(out, "  last seen while converging: {seen}");
                }
                if let Some(logs) = &t.logs {
                    let _ = writeln!(out, "  logs: {}", logs.display());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::plan::{Fault, Scenario};
    use crate::chaos::writers::Ack;

    fn trial(mode: WitnessMode, dual: usize, lost: usize) -> TrialReport {
        let ack =
            Ack { key: "/k".into(), value: "v".into(), revision: 5, sent: Duration::ZERO, at: Duration::from_secs(1) };
        TrialReport {
            mode,
            trial: 1,
            draw: Draw {
                scenario: Scenario(vec![Fault::Cut]),
                duration: Duration::from_secs(10),
                second_after: Duration::ZERO,
                from_leader: true,
                power_on_delay: Duration::ZERO,
            },
            leader_before: "node1".into(),
            took: Duration::from_secs(20),
            acked: BTreeMap::from([("client".to_string(), 10)]),
            read_back: true,
            lost: (0..lost).map(|_| LostWrite { writer: "client".into(), ack: ack.clone(), found: None }).collect(),
            regressions: Vec::new(),
            max_acked_revision: 100,
            fresh_revision: Some(101),
            samples: 50,
            dual_vip_samples: dual,
            first_dual_vip: None,
            converged_after: Some(Duration::from_secs(3)),
            last_seen: None,
            client_gaps: vec![Duration::from_millis(100), Duration::from_secs(4)],
            longest_gap: BTreeMap::from([("client".to_string(), 4.0), ("node1".to_string(), 9.5)]),
            notes: Vec::new(),
            logs: None,
        }
    }

    #[test]
    fn dual_vip_in_none_isolated_is_by_design_and_elsewhere_a_violation() {
        let mut none = trial(WitnessMode::None, 3, 0);
        assert_eq!(none.violations(), [Invariant::OneVipHolder], "a cut is not an isolation");
        none.draw.scenario = Scenario(vec![Fault::IsolateLeader]);
        assert!(none.violations().is_empty());
        assert_eq!(none.by_design().len(), 1);
        assert!(none.line().contains("dual VIP expected by design"), "{}", none.line());
        let gw = trial(WitnessMode::Gateway, 3, 0);
        assert_eq!(gw.violations(), [Invariant::OneVipHolder]);
        let report = Report::new(1, vec![], "fast".into(), vec![none, gw]);
        assert!(report.violated());
        let table = report.table();
        assert!(table.contains("| none | 1 | 10 | 0 | 0 | 3 | 0 |"), "{table}");
        assert!(table.contains("VIOLATED: dual VIP"), "{table}");
    }

    #[test]
    fn a_fresh_revision_not_above_the_acked_ones_is_a_regression() {
        let mut t = trial(WitnessMode::Arbiter, 0, 0);
        assert!(t.broken().is_empty());
        t.fresh_revision = Some(100);
        assert_eq!(t.violations(), [Invariant::NoRevisionRegression]);
        t.fresh_revision = None;
        assert!(t.broken().is_empty());
    }

    #[test]
    fn lost_writes_and_unconverged_trials_are_violations_everywhere() {
        let mut t = trial(WitnessMode::None, 0, 2);
        t.converged_after = None;
        assert_eq!(t.violations(), [Invariant::NoLostWrite, Invariant::Converges]);
        let s = Summary::of(WitnessMode::None, None, &[&t]);
        assert_eq!((s.lost, s.unconverged), (2, 1));
        assert_eq!(s.gap_max, Duration::from_secs(4));
        assert_eq!(s.gap_p50, Duration::from_millis(100));
        assert_eq!(s.node_gap_max, Duration::from_millis(9500));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
