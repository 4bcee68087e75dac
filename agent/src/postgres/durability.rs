//! Durability on the primary: commits wait for the follower
//! (`synchronous`), unless the follower has been gone for `degrade_after`,
//! in which case the primary degrades to async until the follower streams
//! again. The decision is pure; [`super::Manager::durability_tick`] applies it.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Durability;

/// What the primary currently does with commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// Commits wait until the follower has flushed them (RPO 0).
    Synchronous,
    /// Configured synchronous, but the follower is gone: commits do not wait.
    Degraded,
    /// Configured async: commits never wait.
    Async,
}

impl DurabilityMode {
    /// Whether commits wait for the follower.
    pub fn waits_for_follower(self) -> bool {
        self == DurabilityMode::Synchronous
    }
}

/// Decides the durability mode of a primary from "is the follower
/// streaming?" observed on each tick.
#[derive(Debug, Clone)]
pub struct DurabilityController {
    configured: Durability,
    degrade_after: Duration,
    mode: DurabilityMode,
    /// When the follower was first seen missing while synchronous.
    gone_since: Option<Instant>,
    /// The mode last handed out to be applied (`None` before the first tick).
    applied: Option<DurabilityMode>,
}

impl DurabilityController {
    /// A controller starting in `initial` (ignored when `configured` is
    /// async). A primary that just started with its follower expected starts
    /// `Synchronous`; a freshly promoted primary, whose peer just failed,
    /// starts `Degraded` so writes do not stall for `degrade_after`.
    pub fn new(configured: Durability, degrade_after: Duration, initial: DurabilityMode) -> Self {
        let mode = match (configured, initial) {
            (Durability::Async, _) => DurabilityMode::Async,
            (Durability::Synchronous, DurabilityMode::Async) => DurabilityMode::Degraded,
            (Durability::Synchronous, m) => m,
        };
        DurabilityController { configured, degrade_after, mode, gone_since: None, applied: None }
    }

    pub fn mode(&self) -> DurabilityMode {
        self.mode
    }

    /// How long the follower has been missing while synchronous, if it is.
    pub fn follower_gone_for(&self, now: Instant) -> Option<Duration> {
        self.gone_since.map(|t| now.saturating_duration_since(t))
    }

    /// Feed one observation. Returns the mode to apply when it differs from
    /// what was last applied (always on the first tick).
    pub fn tick(&mut self, follower_streaming: bool, now: Instant) -> Option<DurabilityMode> {
        if self.configured == Durability::Synchronous {
            if follower_streaming {
                self.gone_since = None;
                self.mode = DurabilityMode::Synchronous;
            } else if self.mode == DurabilityMode::Synchronous {
                let since = *self.gone_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.degrade_after {
                    self.mode = DurabilityMode::Degraded;
                    self.gone_since = None;
                }
            }
        }
        if self.applied == Some(self.mode) { None } else { Some(self.mode) }
    }

    /// Record that `mode` was applied to the server. Until then, every tick
    /// hands the mode out again, so a failed apply is retried.
    pub fn applied(&mut self, mode: DurabilityMode) {
        self.applied = Some(mode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(30);

    fn sync(initial: DurabilityMode) -> DurabilityController {
        DurabilityController::new(Durability::Synchronous, AFTER, initial)
    }

    fn step(c: &mut DurabilityController, streaming: bool, now: Instant) -> Option<DurabilityMode> {
        let change = c.tick(streaming, now);
        if let Some(m) = change {
            c.applied(m);
        }
        change
    }

    #[test]
    fn first_tick_applies_the_starting_mode() {
        let t0 = Instant::now();
        let mut c = sync(DurabilityMode::Synchronous);
        assert_eq!(step(&mut c, true, t0), Some(DurabilityMode::Synchronous));
        assert_eq!(step(&mut c, true, t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn degrades_only_after_the_follower_is_gone_for_degrade_after() {
        let t0 = Instant::now();
        let mut c = sync(DurabilityMode::Synchronous);
        step(&mut c, true, t0);
        let gone = t0 + Duration::from_secs(1);
        assert_eq!(step(&mut c, false, gone), None);
        assert_eq!(c.follower_gone_for(gone + Duration::from_secs(5)), Some(Duration::from_secs(5)));
        assert_eq!(step(&mut c, false, gone + AFTER - Duration::from_millis(1)), None);
        assert_eq!(c.mode(), DurabilityMode::Synchronous);
        assert_eq!(step(&mut c, false, gone + AFTER), Some(DurabilityMode::Degraded));
        assert_eq!(step(&mut c, false, gone + AFTER * 3), None);
        assert_eq!(c.mode(), DurabilityMode::Degraded);
    }

    #[test]
    fn a_brief_absence_resets_the_timer() {
        let t0 = Instant::now();
        let mut c = sync(DurabilityMode::Synchronous);
        step(&mut c, false, t0);
        step(&mut c, true, t0 + AFTER / 2);
        assert_eq!(step(&mut c, false, t0 + AFTER), None);
        assert_eq!(step(&mut c, false, t0 + AFTER + AFTER / 2), None);
        assert_eq!(c.mode(), DurabilityMode::Synchronous);
        assert_eq!(step(&mut c, false, t0 + AFTER * 2), Some(DurabilityMode::Degraded));
    }

    #[test]
    fn restores_synchronous_when_the_follower_streams_again() {
        let t0 = Instant::now();
        let mut c = sync(DurabilityMode::Degraded);
        assert_eq!(step(&mut c, false, t0), Some(DurabilityMode::Degraded));
        assert_eq!(step(&mut c, true, t0 + Duration::from_secs(1)), Some(DurabilityMode::Synchronous));
        assert!(c.mode().waits_for_follower());
    }

    #[test]
    fn async_never_waits() {
        let t0 = Instant::now();
        let mut c = DurabilityController::new(Durability::Async, AFTER, DurabilityMode::Synchronous);
        assert_eq!(step(&mut c, true, t0), Some(DurabilityMode::Async));
        assert_eq!(step(&mut c, false, t0 + AFTER * 2), None);
        assert!(!c.mode().waits_for_follower());
    }

    #[test]
    fn an_unapplied_mode_is_handed_out_again() {
        let t0 = Instant::now();
        let mut c = sync(DurabilityMode::Synchronous);
        assert_eq!(c.tick(true, t0), Some(DurabilityMode::Synchronous));
        assert_eq!(c.tick(true, t0), Some(DurabilityMode::Synchronous));
    }

    #[test]
    fn mode_serialises_lowercase() {
        assert_eq!(serde_json::to_string(&DurabilityMode::Degraded).unwrap(), "\"degraded\"");
    }
}
