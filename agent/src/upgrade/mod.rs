//! Upgrades of a node's operating system image, A/B: the bundle a new
//! version comes as ([`bundle`]), writing it into the root slot the node
//! did not boot from ([`slot`]), and the health gate a new boot must pass
//! before it is kept ([`gate`]).

pub mod bundle;
pub mod gate;
pub mod node;
pub mod slot;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use bundle::Release;
use gate::{FailedGate, Trial};
use slot::{BootPaths, Counter, Slot};

/// Where a node keeps its boot and upgrade state.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub boot: BootPaths,
    /// The running system's root (its release is in `usr/lib/geminik8s/image.json`).
    pub root: PathBuf,
    /// The trial and the last failed gate ([`gate::STATE_DIR`]).
    pub state_dir: PathBuf,
}

impl Default for NodeFiles {
    fn default() -> Self {
        NodeFiles { boot: BootPaths::default(), root: PathBuf::from("/"), state_dir: PathBuf::from(gate::STATE_DIR) }
    }
}

impl NodeFiles {
    pub fn trial(&self) -> PathBuf {
        self.state_dir.join(gate::TRIAL_FILE)
    }

    pub fn failed_gate(&self) -> PathBuf {
        self.state_dir.join(gate::FAILED_GATE_FILE)
    }
}

/// A slot's boot entry as `upgrade slots` and `status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryView {
    pub slot: Slot,
    pub file: String,
    pub title: String,
    pub version: u64,
    pub counter: Counter,
}

/// A node's slots and upgrade state: the booted slot and its release, the
/// next boot, both entries, the trial and the last failed gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootState {
    pub booted: Option<Slot>,
    pub next_boot: Option<Slot>,
    pub release: Option<Release>,
    pub entries: Vec<EntryView>,
    pub trial: Option<Trial>,
    pub last_failed_gate: Option<FailedGate>,
    /// The release in the slot not booted, as recorded when an upgrade
    /// wrote either slot: what a rollback boots.
    #[serde(default)]
    pub other_release: Option<Release>,
}

impl BootState {
    /// Read it from the node's files.
    pub fn read(files: &NodeFiles) -> anyhow::Result<BootState> {
        let entries = slot::entries(&files.boot)?;
        Ok(BootState {
            booted: slot::booted_slot(&files.boot).ok(),
            next_boot: slot::next_boot(&entries),
            release: Release::of_root(&files.root)?,
            entries: entries
                .iter()
                .map(|e| EntryView {
                    slot: e.slot,
                    file: e.file.clone(),
                    title: e.title().to_string(),
                    version: e.version,
                    counter: e.counter,
                })
                .collect(),
            trial: Trial::read(&files.trial())?,
            last_failed_gate: FailedGate::read(&files.failed_gate())?,
            other_release: match slot::booted_slot(&files.boot) {
                Ok(booted) => gate::read_json(&files.slot_record(booted.other()))?,
                Err(_) => None,
            },
        })
    }

    /// A node's, when it booted from a geminik8s disk; `None` elsewhere
    /// (a live or PXE boot, a development machine).
    pub fn of_node(files: &NodeFiles) -> Option<anyhow::Result<BootState>> {
        slot::booted_slot(&files.boot).ok()?;
        Some(BootState::read(files))
    }

    /// Whether the booted slot is blessed (passed its gate, or never on trial).
    pub fn is_good(&self) -> bool {
        self.booted.and_then(|b| self.entries.iter().find(|e| e.slot == b)).is_some_and(|e| e.counter == Counter::Good)
    }

    /// What a rollback would boot: the other slot's recorded release, when
    /// its entry is there and did not use up its tries.
    pub fn rollback_release(&self) -> Option<&Release> {
        let other = self.booted?.other();
        let entry = self.entries.iter().find(|e| e.slot == other)?;
        (!matches!(entry.counter, Counter::Bad { .. })).then_some(self.other_release.as_ref()).flatten()
    }

    /// The version the booted slot runs.
    pub fn version(&self) -> Option<&str> {
        self.release.as_ref().map(|r| r.version.as_str())
    }

    /// One line: the booted slot, its release and state, the next boot.
    pub fn summary(&self) -> String {
        let show = |s: Option<Slot>| s.map_or("none".to_string(), |s| s.to_string());
        let running =
            self.release.as_ref().map_or("release unrecorded".to_string(), |r| format!("{} {}", r.name, r.version));
        let state = self
            .booted
            .and_then(|b| self.entries.iter().find(|e| e.slot == b))
            .map_or("no entry", |e| if e.counter == Counter::Good { "good" } else { "on trial" });
        let trial =
            self.trial.as_ref().map(|t| format!("; trial of {} in slot {}", t.version, t.slot)).unwrap_or_default();
        let other =
            self.other_release.as_ref().map(|r| format!("; the other slot holds {}", r.version)).unwrap_or_default();
        format!(
            "slot {} ({running}, {state}), next boot slot {}{trial}{other}",
            show(self.booted),
            show(self.next_boot)
        )
    }

    /// The last failed gate, one line per reason.
    pub fn failure_lines(&self) -> Vec<String> {
        let Some(f) = &self.last_failed_gate else { return Vec::new() };
        let mut out = vec![format!("last failed upgrade gate: version {} in slot {} at {}", f.version, f.slot, f.at)];
        out.extend(f.reasons.iter().map(|r| format!("  - {r}")));
        out
    }
}
