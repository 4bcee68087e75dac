//! Skipping tests that need root or a tool, with a printed reason.
//!
//! CI runs as root with every tool installed, so there these tests run;
//! elsewhere they print why they did not and return.

use std::path::PathBuf;

/// Whether the process runs as root.
pub fn is_root() -> bool {
    // The effective UID from procfs keeps this crate free of libc bindings.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Find `tool` on PATH or in the usual extra places (PostgreSQL's bindir).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(PathBuf::from("/usr/lib/postgresql/15/bin"));
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Returns `Some(reason)` when the test must skip: not root, or a tool
/// missing. Print it with [`skip`].
pub fn requires(root: bool, tools: &[&str]) -> Option<String> {
    if root && !is_root() {
        return Some("needs root (CI runs as root)".to_string());
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| find_tool(t).is_none()).collect();
    if !missing.is_empty() {
        return Some(format!("missing tools: {} (install them with `just deps`)", missing.join(", ")));
    }
    None
}

/// Print a skip notice that shows up in `cargo test` output.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
}

/// Skip the calling test (return early) unless the requirements hold.
#[macro_export]
macro_rules! require {
    (root: $root:expr, tools: [$($tool:expr),* $(,)?]) => {
        if let Some(reason) = $crate::skip::requires($root, &[$($tool),*]) {
            $crate::skip::skip(module_path!(), &reason);
            return;
        }
    };
}
