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

/// The ids to delete so that only the `keep` newest complete backups
/// remain (at least one); incomplete backups as [`plan`] judges them.
pub fn plan_count(candidates: &[Candidate], now: SystemTime, keep: usize) -> Vec<String> {
    let mut complete: Vec<&Candidate> = candidates.iter().filter(|c| c.complete).collect();
    complete.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    let excess = complete.len().saturating_sub(keep.max(1));
    let incomplete_cutoff = now.checked_sub(INCOMPLETE_GRACE).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut out: Vec<String> = complete[..excess].iter().map(|c| c.id.clone()).collect();
    out.extend(candidates.iter().filter(|c| !c.complete && c.time < incomplete_cutoff).map(|c| c.id.clone()));
    out.sort();
    out
}

/// What [`prune`] removed or, with `dry_run`, would remove.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pruned {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
    /// Archived WAL files removed: older than every backup kept, so no
    /// recovery can use them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wal_removed: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// How many backups [`prune`] keeps.
#[derive(Debug, Clone, Copy)]
pub enum Retention {
    /// Those that started within this long (and always the newest).
    Age(Duration),
    /// The newest this many.
    Count(usize),
}

/// Apply [`plan`] (or [`plan_count`]) to `store`, then remove the archived
/// WAL that only the removed backups could use.
pub fn prune(store: &dyn Store, retention: impl Into<Retention>, dry_run: bool) -> Result<Pruned> {
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
    let remove = match retention.into() {
        Retention::Age(age) => plan(&candidates, SystemTime::now(), age),
        Retention::Count(keep) => plan_count(&candidates, SystemTime::now(), keep),
    };
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
    if !out.removed.is_empty() && !dry_run {
        out.wal_removed = prune_wal(store)?;
    }
    Ok(out)
}

impl From<Duration> for Retention {
    fn from(age: Duration) -> Retention {
        Retention::Age(age)
    }
}

/// Remove the archived WAL older than the oldest complete backup's start
/// (timeline history files stay: they are small and every recovery reads
/// them). Returns how many files went.
pub fn prune_wal(store: &dyn Store) -> Result<usize> {
    let oldest = list(store)?.into_iter().find_map(|l| match l {
        Listed::Ok(m) => Some(*m),
        Listed::Unreadable { .. } => None,
    });
    let Some(oldest) = oldest else { return Ok(0) };
    let Some(start) = super::wal::segment_of(oldest.postgres.timeline, &oldest.postgres.start_lsn) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in store.list_wal()? {
        if super::wal::older_than(&entry.name, &start) {
            store.delete_wal(&entry.name)?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(event = "wal_pruned", files = removed, before = %start, destination = %store.url(), "removed archived WAL older than every backup");
    }
    Ok(removed)
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
    fn a_count_keeps_the_newest_and_at_least_one() {
        let now = SystemTime::UNIX_EPOCH + DAY * 1000;
        let all = [c("a", true, 30, now), c("b", false, 20, now), c("c", true, 2, now), c("d", true, 1, now)];
        assert_eq!(plan_count(&all, now, 2), ["a", "b"]);
        assert_eq!(plan_count(&all, now, 5), ["b"], "only the old incomplete one");
        assert_eq!(plan_count(&all, now, 0), ["a", "b", "c"], "never the newest");
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
