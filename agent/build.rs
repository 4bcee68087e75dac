//! Records the git commit for `gemin_k8s version` (or "unknown" outside a
//! git checkout). `GEMINIK8S_GIT_COMMIT` in the environment takes precedence,
//! for builds from a tarball.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GEMINIK8S_GIT_COMMIT");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    if std::env::var_os("GEMINIK8S_GIT_COMMIT").is_some() {
        return;
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=GEMINIK8S_GIT_COMMIT={commit}");
    }
}
