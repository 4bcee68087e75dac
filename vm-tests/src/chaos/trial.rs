//! One trial: writers and the VIP sampler run while a drawn scenario plays;
//! after the heal the cluster must converge, and then every acknowledged
//! write is read back and checked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use geminik8s::config::WitnessMode;

use super::inject::{self, Roles};
use super::invariants::{dual_vip, gaps, lost_writes, regressions};
use super::plan::Draw;
use super::report::TrialReport;
use super::writers::{CLIENT, Writer, WriterSpec};
use super::{interrupted, pause, sampler};
use crate::netns::Lab;
use crate::poll;
use crate::probe::{put, range, roles};

/// How long the writers may take to get going before the fault.
const WARM_UP: Duration = Duration::from_secs(30);
/// How long reading back and the fresh write may take once converged.
const READ_BACK: Duration = Duration::from_secs(30);

/// What a trial needs besides the lab.
pub struct TrialInput<'a> {
    pub mode: WitnessMode,
    pub trial: usize,
    pub draw: &'a Draw,
    pub roles: &'a Roles,
    /// The largest revision acknowledged in earlier trials.
    pub max_acked_before: i64,
    pub converge_timeout: Duration,
}

/// Run one trial on a formed cluster.
pub fn run(lab: &Lab, input: &TrialInput) -> anyhow::Result<TrialReport> {
    let start = Instant::now();
    let writers: Vec<Writer> = WriterSpec::all(lab).into_iter().map(Writer::new).collect();
    let stop = AtomicBool::new(false);
    let mut notes = Vec::new();
    let (samples, converged) = std::thread::scope(|s| -> anyhow::Result<_> {
        for w in &writers {
            let stop = &stop;
            s.spawn(move || w.run(lab, input.trial, start, stop));
        }
        let sampler = s.spawn(|| sampler::run(lab, start, &stop));
        // However the trial goes, the writers and the sampler stop, or the scope would wait for them forever.
        let played = play(lab, input, &writers, start, &mut notes);
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().map_err(|_| anyhow::anyhow!("the VIP sampler panicked"))?;
        Ok((samples, played?))
    })?;
    let (converged_after, last_seen) = match converged {
        Ok(d) => (Some(d), None),
        Err(seen) => (None, Some(seen)),
    };

    let acks: Vec<(String, Vec<_>)> = writers.iter().map(|w| (w.spec.name.clone(), w.acks())).collect();
    for w in &writers {
        if !w.powered_off().is_zero() {
            notes.push(format!("{}: its node was off for about {:.1} s", w.spec.name, w.powered_off().as_secs_f64()));
        }
        if let Some(e) = w.last_error() {
            notes.push(format!("{}: {} attempts, last error: {}", w.spec.name, w.attempts(), last_line(&e)));
        }
    }
    let prefix = format!("/chaos/{}/", input.trial);
    let read = poll::until("the acknowledged writes to read back", READ_BACK, Duration::from_millis(500), || {
        range(lab, &prefix)
    });
    let (read_back, lost) = match &read {
        Ok(kvs) => (true, lost_writes(&acks, kvs)),
        Err(e) => {
            notes.push(format!("reading back failed: {}", last_line(e)));
            (false, Vec::new())
        }
    };
    let max_acked_revision =
        acks.iter().flat_map(|(_, a)| a.iter().map(|a| a.revision)).max().unwrap_or(0).max(input.max_acked_before);
    let fresh = poll::until("a fresh write through the VIP", READ_BACK, Duration::from_millis(500), || {
        put(lab, &format!("{prefix}fresh"), "fresh")
    });
    let fresh_revision = match fresh {
        Ok(r) => Some(r),
        Err(e) => {
            notes.push(format!("no fresh write after the trial: {}", last_line(&e)));
            None
        }
    };
    let mut client_gaps = Vec::new();
    let mut longest_gap = BTreeMap::new();
    let mut regress = Vec::new();
    for (writer, list) in &acks {
        regress.extend(regressions(writer, list));
        let g = gaps(list);
        let longest = g.iter().max().copied().unwrap_or_default();
        longest_gap.insert(writer.clone(), (longest.as_secs_f64() * 1000.0).round() / 1000.0);
        if writer == CLIENT {
            client_gaps = g;
        }
    }
    let dual = dual_vip(&samples);
    Ok(TrialReport {
        mode: input.mode,
        trial: input.trial,
        draw: input.draw.clone(),
        leader_before: input.roles.leader.clone(),
        took: start.elapsed(),
        acked: acks.iter().map(|(w, a)| (w.clone(), a.len())).collect::<BTreeMap<_, _>>(),
        read_back,
        lost,
        regressions: regress,
        max_acked_revision,
        fresh_revision,
        samples: samples.len(),
        dual_vip_samples: dual.len(),
        first_dual_vip: dual.first().map(|s| (*s).clone()),
        converged_after,
        last_seen,
        client_gaps,
        longest_gap,
        notes,
        logs: None,
    })
}

/// Warm up, play the scenario, wait for convergence. `Ok(Ok(d))`: converged
/// `d` after the heal; `Ok(Err(seen))`: not within the deadline.
fn play(
    lab: &Lab,
    input: &TrialInput,
    writers: &[Writer],
    start: Instant,
    notes: &mut Vec<String>,
) -> anyhow::Result<Result<Duration, String>> {
    let warm = poll::until("every writer to be acknowledged once", WARM_UP, Duration::from_millis(50), || {
        let waiting: Vec<&str> = writers.iter().filter(|w| w.acks().is_empty()).map(|w| w.spec.name.as_str()).collect();
        if waiting.is_empty() { Ok(()) } else { Err(waiting) }
    });
    if let Err(e) = warm {
        notes.push(format!("before the fault: {e}"));
    }
    let healed = inject::play(lab, input.roles, input.draw, &pause)?;
    notes.extend(healed);
    let healed_at = start.elapsed();
    Ok(converge(lab, writers, start, healed_at, input.converge_timeout))
}

/// Wait until the cluster has formed again (one leader with the VIP, a
/// synchronous streaming follower) and every writer has been acknowledged
/// after that. Returns how long it took from the heal, or what was seen last.
fn converge(
    lab: &Lab,
    writers: &[Writer],
    start: Instant,
    healed_at: Duration,
    timeout: Duration,
) -> Result<Duration, String> {
    let deadline = Instant::now() + timeout;
    let mut formed_at: Option<Duration> = None;
    loop {
        let seen = match (formed_at, roles(lab)) {
            (_, Err(e)) => {
                formed_at = None;
                e
            }
            (None, Ok(_)) => {
                formed_at = Some(start.elapsed());
                "formed; waiting for writes through every writer".to_string()
            }
            (Some(t), Ok(_)) => {
                let waiting: Vec<&str> =
                    writers.iter().filter(|w| !w.acked_after(t)).map(|w| w.spec.name.as_str()).collect();
                if waiting.is_empty() {
                    return Ok(start.elapsed().saturating_sub(healed_at));
                }
                format!("formed; no write acknowledged since through {}", waiting.join(", "))
            }
        };
        if Instant::now() >= deadline || interrupted() {
            return Err(seen);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The gist of an error from a tool: its last line (the tool's own message).
fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}
