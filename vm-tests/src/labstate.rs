//! What both labs share: running the host's tools with their stderr in
//! errors, the namespaces that exist, and the state file (`lab.json` in the
//! run directory) that later commands, and `down` after a crash, read.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The state file inside a lab's run directory.
pub const STATE_FILE: &str = "lab.json";

/// Run `cmd` to completion; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip netns list` names.
pub fn namespaces() -> anyhow::Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect())
}

pub fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join(STATE_FILE)
}

/// Read a lab's state; `up` names the command that creates it.
pub fn load<T: DeserializeOwned>(run_dir: &Path, up: &str) -> anyhow::Result<T> {
    let path = state_path(run_dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is a lab up? `{up}` creates it)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a state file of this lab", path.display()))
}

/// Write a lab's state atomically.
pub fn save<T: Serialize>(run_dir: &Path, state: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(state)?;
    geminik8s::fsutil::write_atomic(&state_path(run_dir), text.as_bytes(), 0o644)
}

/// The node called `name` among `nodes`, or an error listing them.
pub fn find_node<'a, T>(nodes: &'a [T], name: &str, name_of: impl Fn(&T) -> &str) -> anyhow::Result<&'a T> {
    nodes.iter().find(|n| name_of(n) == name).with_context(|| {
        let names: Vec<&str> = nodes.iter().map(&name_of).collect();
        format!("no node `{name}` in this lab (nodes: {})", names.join(", "))
    })
}
