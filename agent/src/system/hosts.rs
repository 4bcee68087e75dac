//! `/etc/hostname`, the `127.0.1.1` line of `/etc/hosts`, and the kernel
//! hostname.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;

use super::{Change, Options};
use crate::fsutil::write_atomic;

/// The address Debian maps the host's own name to.
pub const SELF_ADDR: &str = "127.0.1.1";

/// The kernel's hostname, or `fallback` when it cannot be read.
pub fn current(fallback: &str) -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| fallback.into())
}

/// The `127.0.1.1` line for `name`: the full name, then the short name when
/// they differ.
pub fn hosts_line(name: &str) -> String {
    match name.split_once('.') {
        Some((short, _)) => format!("{SELF_ADDR}\t{name} {short}"),
        None => format!("{SELF_ADDR}\t{name}"),
    }
}

fn addr_of(line: &str) -> Option<&str> {
    let line = line.trim_start();
    if line.starts_with('#') { None } else { line.split_whitespace().next() }
}

/// `hosts` with its `127.0.1.1` line mapping to `name`: the first such line
/// is replaced (later ones dropped); without one, the line goes after the
/// last `127.0.0.1` line, else at the end. Everything else is kept.
pub fn edit_hosts(hosts: &str, name: &str) -> String {
    let ours = hosts_line(name);
    let mut lines: Vec<String> = Vec::new();
    let mut placed = false;
    for line in hosts.lines() {
        if addr_of(line) == Some(SELF_ADDR) {
            if !placed {
                lines.push(ours.clone());
                placed = true;
            }
        } else {
            lines.push(line.to_string());
        }
    }
    if !placed {
        match lines.iter().rposition(|l| addr_of(l) == Some("127.0.0.1")) {
            Some(i) => lines.insert(i + 1, ours),
            None if lines.iter().all(|l| l.trim().is_empty()) => {
                lines = vec!["127.0.0.1\tlocalhost".to_string(), ours];
            }
            None => lines.push(ours),
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write `contents` to `path` unless it already holds them; keeps the
/// file's mode (0644 for a new file).
fn converge(path: &Path, contents: &str, opts: &Options) -> anyhow::Result<bool> {
    let current = read_optional(path)?;
    if current.as_deref() == Some(contents) {
        return Ok(false);
    }
    if !opts.dry_run {
        let mode = match std::fs::metadata(path) {
            Ok(m) => m.permissions().mode() & 0o7777,
            Err(_) => 0o644,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(path, contents.as_bytes(), mode)?;
    }
    Ok(true)
}

/// Make `name` the hostname below the root (and of the kernel when live).
pub fn apply(name: &str, opts: &Options) -> anyhow::Result<Vec<Change>> {
    let mut changes = Vec::new();
    if converge(&opts.path("/etc/hostname"), &format!("{name}\n"), opts)? {
        changes.push(Change::new("hostname", "/etc/hostname", name));
    }
    let hosts_path = opts.path("/etc/hosts");
    let hosts = read_optional(&hosts_path)?.unwrap_or_default();
    if converge(&hosts_path, &edit_hosts(&hosts, name), opts)? {
        changes.push(Change::new("hosts", "/etc/hosts", hosts_line(name)));
    }
    if opts.live() {
        let current = nix::unistd::gethostname().context("reading the kernel hostname")?;
        if current.to_str() != Some(name) {
            if !opts.dry_run {
                nix::unistd::sethostname(name).with_context(|| format!("setting the kernel hostname to `{name}`"))?;
            }
            changes.push(Change::new("kernel-hostname", name, format!("was `{}`", current.to_string_lossy())));
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_line_is_replaced_and_the_rest_kept() {
        let hosts = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n# 127.0.1.1 comment\n::1 localhost ip6-localhost\n127.0.1.1 old\n";
        assert_eq!(
            edit_hosts(hosts, "node1"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tnode1\n# 127.0.1.1 comment\n::1 localhost ip6-localhost\n"
        );
    }

    #[test]
    fn a_missing_self_line_goes_after_localhost() {
        let hosts = "127.0.0.1 localhost\n::1 localhost\n10.0.0.5 registry\n";
        assert_eq!(
            edit_hosts(hosts, "edge.example.org"),
            "127.0.0.1 localhost\n127.0.1.1\tedge.example.org edge\n::1 localhost\n10.0.0.5 registry\n"
        );
        assert_eq!(edit_hosts("", "a"), "127.0.0.1\tlocalhost\n127.0.1.1\ta\n");
        assert_eq!(edit_hosts("10.0.0.5 registry", "a"), "10.0.0.5 registry\n127.0.1.1\ta\n");
    }

    #[test]
    fn editing_is_idempotent() {
        let once = edit_hosts("127.0.0.1 localhost\n", "a");
        assert_eq!(edit_hosts(&once, "a"), once);
    }

    #[test]
    fn apply_below_a_root_writes_both_files_once() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        let opts = Options { root: root.path().to_path_buf(), dry_run: true };
        assert_eq!(apply("a", &opts).unwrap().len(), 2);
        assert!(!root.path().join("etc/hostname").exists(), "a dry run wrote a file");
        let opts = Options { dry_run: false, ..opts };
        assert_eq!(apply("a", &opts).unwrap().len(), 2);
        assert_eq!(std::fs::read_to_string(root.path().join("etc/hostname")).unwrap(), "a\n");
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n127.0.1.1\ta\n"
        );
        assert_eq!(apply("a", &opts).unwrap(), []);
    }
}
