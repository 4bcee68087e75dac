//! Who holds the VIP, sampled through a trial. A node counts as a holder
//! when it is powered on (its switch port is up) and the VIP is on its
//! interface: then it answers ARP for the VIP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::netns::Lab;

pub const EVERY: Duration = Duration::from_millis(200);

/// The VIP holders at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Since the trial started.
    #[serde(serialize_with = "super::secs::serialize")]
    pub at: Duration,
    pub holders: Vec<String>,
}

/// Sample every [`EVERY`] until `stop`.
pub fn run(lab: &Lab, start: Instant, stop: &AtomicBool) -> Vec<Sample> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + EVERY;
        samples.push(Sample { at: start.elapsed(), holders: lab.vip_holders() });
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    samples
}
