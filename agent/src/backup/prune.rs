//! Retention: remove backups older than a number of days, never the newest
//! complete one. Incomplete backups (no manifest: interrupted or failed)
//! older than the same limit, and at least a day old so that a backup being
//! written is never touched, go too.

use std::time::{Duration, SystemTime};

use super::Result;
use super::store::{Entry, Store};
use super::verify::{Listed, list};

/// An incomplete backup younger than this is left alone (it may be running).
pub const INCOMPLETE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// A backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub complete: bool,
    /// The backup's start (complete) or its last write (incomplete).
    pub time: SystemTime,
}

/// The ids to delete so that only backups younger than `retention` remain,
/// keeping the newest complete backup whatever its age.
pub fn plan(candidates: &[Candidate], now: SystemTime, retention: Duration) -> Vec<String> {
    let cutoff = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    let newest = candidates.iter().filter(|c| c.complete).max_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    let incomplete_cutoff = cutoff.min(now.checked_sub(INCOMPLETE_GRACE).unwrap_or(SystemTime::UNIX_EPOCH));
    let mut out: Vec<String> = candidates
        .iter()
        .filter(|c| Some(&c.id) != newest.map(|n| &n.id))
        .filter(|c| if c.complete { c.time < cutoff } else { c.time < incomplete_cutoff })
        .map(|c| c.id.clone())
        .collect();
    out.sort();
    out
}

/// What [`prune`] removed or, with `dry_run`, would remove.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pruned {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

/// Apply [`plan`] to `store`.
pub fn prune(store: &dyn Store, retention: Duration, dry_run: bool) -> Result<Pruned> {
    let entries: Vec<Entry> = store.list()?;
    let manifests = list(store)?;
    let mut candidates = Vec::new();
    for e in &entries {
        let time = if e.complete {
            match manifests.iter().find_map(|l| match l {
                Listed::Ok(m) if m.id == e.id => m.start(),
                _ => None,
            }) {
                Some(t) => t,
                // An unreadable manifest: judged by the directory's time,
                // and never taken for the newest backup.
                None => {
                    candidates.push(Candidate { id: e.id.clone(), complete: false, time: e.modified });
                    continue;
                }
            }
        } else {
            e.modified
        };
        candidates.push(Candidate { id: e.id.clone(), complete: e.complete, time });
    }
    let remove = plan(&candidates, SystemTime::now(), retention);
    let mut out = Pruned::default();
    for c in &candidates {
        if remove.contains(&c.id) {
            if !dry_run {
                store.delete(&c.id)?;
                tracing::info!(event = "backup_pruned", backup = %c.id, destination = %store.url(), "removed a backup past retention");
            }
            out.removed.push(c.id.clone());
        } else {
            out.kept.push(c.id.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn c(id: &str, complete: bool, days_ago: u64, now: SystemTime) -> Candidate {
        Candidate { id: id.into(), complete, time: now - DAY * days_ago as u32 }
    }

    #[test]
    fn old_backups_go_but_the_newest_complete_one_always_stays() {
        let now = SystemTime::UNIX_EPOCH + DAY * 1000;
        let all = [c("a", true, 30, now), c("b", true, 10, now), c("c", true, 2, now), c("d", true, 0, now)];
        assert_eq!(plan(&all, now, DAY * 7), ["a", "b"]);
        assert_eq!(plan(&all, now, DAY * 60), Vec::<String>::new());
        // Retention 0: everything but the newest.
        assert_eq!(plan(&all, now, Duration::ZERO), ["a", "b", "c"]);
        // Only old backups: the newest of them stays.
        let old = [c("a", true, 30, now), c("b", true, 20, now)];
        assert_eq!(plan(&old, now, DAY * 7), ["a"]);
    }

    #[test]
    fn incomplete_backups_go_only_when_old_and_never_count_as_newest() {
        let now = SystemTime::UNIX_EPOCH + DAY * 1000;
        let all = [c("a", true, 30, now), c("b", false, 20, now), c("c", false, 0, now)];
        // "a" is the newest complete backup although "b" and "c" are newer;
        // "c" may still be being written.
        assert_eq!(plan(&all, now, DAY * 7), ["b"]);
        assert_eq!(plan(&all, now, Duration::ZERO), ["b"], "a running backup is never removed");
    }
}
