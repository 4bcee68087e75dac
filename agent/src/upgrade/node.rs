//! The node's side of an upgrade, shared by `gemin_k8s upgrade stage` on a
//! node and the agent API the operator's `gemin_k8s upgrade` drives:
//! staging a bundle into the passive slot with its trial, and rolling back
//! to the slot the node ran before.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

use super::NodeFiles;
use super::bundle::{self, Bundle, Release};
use super::gate::{Trial, read_json};
use super::slot::{self, Counter, Slot};
use crate::fsutil::write_atomic;

/// Where the agent API receives a bundle (in the state directory).
pub const INCOMING_DIR: &str = "incoming";

impl NodeFiles {
    /// Where the agent API receives a bundle's files.
    pub fn incoming(&self) -> PathBuf {
        self.state_dir.join(INCOMING_DIR)
    }

    /// The release written into `slot`, as recorded when it was staged.
    pub fn slot_record(&self, slot: Slot) -> PathBuf {
        self.state_dir.join(format!("slot-{}.json", slot.letter()))
    }
}

/// How to stage: `upgrade stage`'s flags, the body of `POST /v1/upgrade/stage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRequest {
    /// Boots the new slot gets to pass the gate.
    pub tries: u32,
    /// How long each boot of the new slot has to pass the gate.
    pub rollback_timeout_secs: u64,
    /// Check the bundle, write nothing.
    pub dry_run: bool,
}

/// What staging did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    pub dry_run: bool,
    pub booted: Slot,
    pub slot: Slot,
    pub from_version: Option<String>,
    pub version: String,
    pub root_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    pub tries: u32,
    pub rollback_timeout_secs: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Stage the bundle in `dir` into the passive slot (see [`slot::stage`]),
/// after checking it against the running release; record the trial first
/// (a power cut right after the last step still boots the new slot on
/// trial) and the release of both slots, which a rollback names.
pub fn stage(
    files: &NodeFiles,
    dir: &Path,
    req: &StageRequest,
    progress: impl FnMut(u64, u64),
) -> anyhow::Result<StageReport> {
    let bundle = Bundle::open(dir)?;
    let next = bundle.release().clone();
    let running = Release::of_root(&files.root)?;
    let mut warnings = Vec::new();
    match &running {
        Some(running) => {
            if let Some(why) = running.refuses(&next) {
                bail!("refusing {}: {why}", dir.display());
            }
        }
        None => warnings.push(format!(
            "this node's image records no release ({} is missing); the PostgreSQL major version is not compared",
            files.root.join(bundle::RELEASE_FILE).display()
        )),
    }
    let booted = slot::booted_slot(&files.boot)?;
    let mut report = StageReport {
        dry_run: req.dry_run,
        booted,
        slot: booted.other(),
        from_version: running.as_ref().map(|r| r.version.clone()),
        version: next.version.clone(),
        root_bytes: bundle.file(bundle::ROOT).bytes,
        entry: None,
        tries: req.tries,
        rollback_timeout_secs: req.rollback_timeout_secs,
        warnings,
    };
    if req.dry_run {
        bundle.verify()?;
        return Ok(report);
    }
    let trial = Trial {
        slot: report.slot.letter().to_string(),
        version: next.version.clone(),
        from_version: report.from_version.clone().unwrap_or_default(),
        deadline_secs: req.rollback_timeout_secs,
    };
    std::fs::create_dir_all(&files.state_dir).with_context(|| format!("creating {}", files.state_dir.display()))?;
    write_json(&files.trial(), &trial)?;
    let staged = match slot::stage(&bundle, &files.boot, &files.state_dir, req.tries, progress) {
        Ok(staged) => staged,
        Err(e) => {
            remove(&files.trial())?;
            return Err(e);
        }
    };
    if let Some(running) = &running {
        write_json(&files.slot_record(booted), running)?;
    }
    write_json(&files.slot_record(staged.slot), &next)?;
    report.entry = Some(staged.entry);
    Ok(report)
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackReport {
    pub booted: Slot,
    /// The slot that boots next.
    pub slot: Slot,
    /// The release in it, as recorded when it was staged.
    pub version: String,
    pub entry: String,
}

/// Make the slot the node ran before the next boot again (no trial: it was
/// good before). Refused when that slot's release was never recorded (a
/// slot no upgrade wrote may hold nothing) or its boots failed.
pub fn rollback(files: &NodeFiles) -> anyhow::Result<RollbackReport> {
    let booted = slot::booted_slot(&files.boot)?;
    let other = booted.other();
    let Some(release) = read_json::<Release>(&files.slot_record(other))? else {
        bail!(
            "slot {other} holds no release this node recorded ({} is missing): no upgrade wrote it, so there is nothing to roll back to",
            files.slot_record(other).display()
        );
    };
    let entries = slot::entries(&files.boot)?;
    match entries.iter().find(|e| e.slot == other) {
        None => bail!("slot {other} has no boot entry (an upgrade of it was interrupted): nothing to roll back to"),
        Some(e) if matches!(e.counter, Counter::Bad { .. }) => bail!(
            "slot {other} (version {}) used up its tries without passing its gate ({}): it does not boot into a useful member",
            release.version,
            e.file
        ),
        Some(_) => {}
    }
    let entry = slot::make_next(&files.boot, other)?;
    // The running slot is left as it is; a trial of it is over.
    remove(&files.trial())?;
    Ok(RollbackReport { booted, slot: other, version: release.version, entry: entry.file })
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).expect("the record serialises");
    text.push(b'\n');
    write_atomic(path, &text, 0o644)
}

/// Remove a file that may be missing.
pub fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Check that a name is one of a bundle's files (what the API accepts).
pub fn bundle_file_name(name: &str) -> anyhow::Result<&str> {
    ensure!(
        name == bundle::MANIFEST || bundle::FILES.contains(&name),
        "{name:?} is not a file of an upgrade bundle (those are {}, {})",
        bundle::MANIFEST,
        bundle::FILES.join(", ")
    );
    Ok(name)
}
