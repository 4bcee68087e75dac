//! A node gives up the configuration it took at enrolment (`gemin_k8s
//! deploy --force`, through [`crate::enrol::serve_running`]).
//!
//! The agent loop stops first, as on a planned stop (a leader whose peer
//! follows in sync hands over), and stops PostgreSQL, Kine and K3s. Then
//! what made this node a member is set aside, renamed in place with a
//! `.released-SECONDS` suffix and never deleted: the configuration file
//! deploy sent, PostgreSQL's data directory, the WAL spool, K3s's data
//! directory, and the agent's state (hostMeta, the peer, the VIP cache)
//! moved into `STATE_DIR/released-SECONDS/` (the enrolment certificate stays,
//! so the fingerprint the operator checked stays the same). The agent then
//! runs again from the start ([`exec_again`]) and, unconfigured, waits for
//! enrolment.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::GeminiConfig;

/// The state directory's files that stay: the enrolment identity.
const KEPT: [&str; 2] = ["enrolment.crt", "enrolment.key"];

/// Set aside what made this node a member of `cfg`'s cluster; returns
/// the new names.
pub fn set_aside(cfg: &GeminiConfig, state_dir: &Path, enrolled_file: &Path, now: u64) -> anyhow::Result<Vec<PathBuf>> {
    let suffix = format!("released-{now}");
    let mut moved = Vec::new();
    let mut rename = |from: &Path, to: PathBuf| -> anyhow::Result<()> {
        std::fs::rename(from, &to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        tracing::info!(event = "set_aside", from = %from.display(), to = %to.display(), "set aside");
        moved.push(to);
        Ok(())
    };
    let with_suffix = |path: &Path| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{suffix}"));
        PathBuf::from(name)
    };
    let mut places = vec![cfg.postgres.data_dir.clone(), cfg.backup.spool_dir.clone()];
    if cfg.k3s.enabled {
        places.push(cfg.k3s.data_dir.clone());
    }
    for place in places {
        if place.exists() {
            rename(&place, with_suffix(&place))?;
        }
    }
    let aside = state_dir.join(&suffix);
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries.collect::<Result<Vec<_>, _>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    for entry in entries.with_context(|| format!("reading {}", state_dir.display()))? {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if KEPT.contains(&name) || name.starts_with("released-") {
            continue;
        }
        std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
        rename(&path, aside.join(name))?;
    }
    // Last: until this is gone the node starts again as the member it was
    // (whatever was renamed before a failure here is still there, renamed).
    rename(enrolled_file, with_suffix(enrolled_file))?;
    Ok(moved)
}

/// Run this program again, from the start, with the same arguments, in
/// this process (same PID: the service manager and the watchdog see the
/// same agent). Returns only on failure.
pub fn exec_again() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "gemin_k8s".into());
    let error = std::process::Command::new("/proc/self/exe").arg0(argv0).args(args).exec();
    anyhow::Error::new(error).context("running the agent again after the release")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_membership_is_renamed_aside_and_the_enrolment_identity_stays() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut cfg = crate::config::fixture::services();
        cfg.postgres.data_dir = root.join("pg/15/main");
        cfg.backup.spool_dir = root.join("spool-absent");
        cfg.k3s.enabled = true;
        cfg.k3s.data_dir = root.join("k3s");
        let (state, enrolled) = (root.join("state"), root.join("cloud-config/90_geminik8s.yaml"));
        for d in [&cfg.postgres.data_dir, &cfg.k3s.data_dir, &state, enrolled.parent().unwrap()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(cfg.postgres.data_dir.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(&enrolled, "#cloud-config\n").unwrap();
        for f in ["hostmeta.json", "peer.yaml", "enrolment.crt", "enrolment.key"] {
            std::fs::write(state.join(f), f).unwrap();
        }
        let moved = set_aside(&cfg, &state, &enrolled, 42).unwrap();
        assert!(!enrolled.exists() && !cfg.postgres.data_dir.exists() && !cfg.k3s.data_dir.exists());
        let kept_data = root.join("pg/15/main.released-42/PG_VERSION");
        assert_eq!(std::fs::read_to_string(kept_data).unwrap(), "15\n", "the data is kept, renamed");
        assert!(root.join("cloud-config/90_geminik8s.yaml.released-42").is_file());
        assert!(root.join("k3s.released-42").is_dir());
        assert_eq!(std::fs::read_to_string(state.join("released-42/hostmeta.json")).unwrap(), "hostmeta.json");
        assert!(state.join("released-42/peer.yaml").is_file());
        assert_eq!(std::fs::read_to_string(state.join("enrolment.key")).unwrap(), "enrolment.key");
        assert_eq!(moved.len(), 5, "{moved:?}");
        // A second release later leaves the first one's leftovers where they are.
        std::fs::write(state.join("hostmeta.json"), "again").unwrap();
        std::fs::write(&enrolled, "#cloud-config\n").unwrap();
        set_aside(&cfg, &state, &enrolled, 43).unwrap();
        assert!(state.join("released-42/hostmeta.json").is_file() && state.join("released-43/hostmeta.json").is_file());
    }
}
