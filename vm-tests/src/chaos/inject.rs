//! A drawn scenario played on the lab: the faults start, hold for the drawn
//! time, end, and everything is healed.

use std::time::Duration;

use super::plan::{Draw, Fault};
use crate::netns::Lab;

/// The roles when the trial started; faults aim at them.
#[derive(Debug, Clone)]
pub struct Roles {
    pub leader: String,
    pub follower: String,
}

/// Start one fault.
fn start(lab: &Lab, fault: Fault, roles: &Roles, draw: &Draw) -> anyhow::Result<()> {
    let (leader, follower) = (roles.leader.as_str(), roles.follower.as_str());
    match fault {
        Fault::Cut => lab.cut(leader, follower, false)?,
        Fault::CutOneWay if draw.from_leader => lab.cut(leader, follower, true)?,
        Fault::CutOneWay => lab.cut(follower, leader, true)?,
        Fault::IsolateLeader => lab.isolate(leader)?,
        Fault::IsolateFollower => lab.isolate(follower)?,
        Fault::KillLeader => {
            lab.kill(leader)?;
        }
        Fault::KillFollower => {
            lab.kill(follower)?;
        }
        Fault::KillAgentLeader => {
            lab.kill_agent(leader)?;
        }
        Fault::PauseAgentLeader => {
            lab.pause_agent(leader)?;
        }
        Fault::WitnessDown => lab.witness_down()?,
        Fault::PowerCycleLeaderFirst | Fault::PowerCycleFollowerFirst => {
            lab.kill(leader)?;
            lab.kill(follower)?;
        }
    }
    Ok(())
}

/// End the faults that end in a particular way before the general heal:
/// a power cycle boots its nodes in its order, with its delay between them.
fn end(
    lab: &Lab,
    fault: Fault,
    roles: &Roles,
    draw: &Draw,
    wait: &dyn Fn(Duration) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let order = match fault {
        Fault::PowerCycleLeaderFirst => [&roles.leader, &roles.follower],
        Fault::PowerCycleFollowerFirst => [&roles.follower, &roles.leader],
        _ => return Ok(()),
    };
    for (i, node) in order.into_iter().enumerate() {
        if i > 0 {
            wait(draw.power_on_delay)?;
        }
        if !lab.powered(node) {
            lab.start(node)?;
        }
    }
    Ok(())
}

/// Play `draw`: the first fault, the second after `second_after`, hold
/// until `duration`, end them, heal. `wait` sleeps (and stops early when
/// the run is interrupted). Returns what the heal did.
pub fn play(
    lab: &Lab,
    roles: &Roles,
    draw: &Draw,
    wait: &dyn Fn(Duration) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    let faults = &draw.scenario.0;
    let mut elapsed = Duration::ZERO;
    let held = (|| {
        for (i, fault) in faults.iter().enumerate() {
            if i > 0 {
                wait(draw.second_after)?;
                elapsed = draw.second_after;
            }
            start(lab, *fault, roles, draw)?;
        }
        wait(draw.duration.saturating_sub(elapsed))?;
        for fault in faults {
            end(lab, *fault, roles, draw, wait)?;
        }
        Ok::<(), anyhow::Error>(())
    })();
    // Whatever happened above, the lab is healed before anything else.
    let healed = lab.heal();
    held?;
    healed
}
