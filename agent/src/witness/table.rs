//! The witness's lease table: per cluster, the node holding (or last holding)
//! the lease, until when, and which node the holder last reported as its
//! synchronous standby. Pure: time is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{LeaseAnswer, LeaseRequest, ReleaseRequest, SyncAnswer, SyncRequest};

/// One cluster's record.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    /// The node that holds or last held the lease.
    holder: String,
    /// Until when it holds it, by the witness's clock; `None` once released.
    expires: Option<Instant>,
    /// The node the holder last reported as its synchronous standby.
    sync_standby: Option<String>,
}

impl Record {
    fn held(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e > now)
    }
}

/// What is kept of a cluster's record across restarts (the state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persisted {
    pub last_holder: String,
    /// Whether the lease was not released when this was written. A held
    /// lease is honoured for one maximum TTL after a restart.
    pub held: bool,
    #[serde(default)]
    pub sync_standby: Option<String>,
}

/// How an acquire request was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The holder renewed, or took back its own free lease (the sync record stays).
    Renewed,
    /// A new holder; the sync record is cleared. `previous` is the last
    /// holder; `forced` when only the request's `force` allowed it.
    New { previous: Option<String>, forced: bool },
    /// Another node holds an unexpired lease.
    Held,
    /// The lease is free but this node is neither its last holder nor the
    /// recorded synchronous standby, and did not force it.
    NotEligible,
}

impl Grant {
    pub fn granted(&self) -> bool {
        matches!(self, Grant::Renewed | Grant::New { .. })
    }
}

/// Leases per cluster (one witness can serve several sites).
#[derive(Debug, Clone)]
pub struct LeaseTable {
    max_ttl: Duration,
    records: BTreeMap<String, Record>,
}

impl LeaseTable {
    /// `restored`: the records persisted before a restart; a lease that was
    /// held is honoured for `max_ttl` from `now`.
    pub fn new(max_ttl: Duration, restored: BTreeMap<String, Persisted>, now: Instant) -> Self {
        let records = restored
            .into_iter()
            .map(|(cluster, p)| {
                let record = Record {
                    holder: p.last_holder,
                    expires: p.held.then_some(now + max_ttl),
                    sync_standby: p.sync_standby,
                };
                (cluster, record)
            })
            .collect();
        LeaseTable { max_ttl, records }
    }

    /// Grant or renew the lease for `req.node`. The holder renews; a free
    /// lease (expired or released) goes to a node only when the cluster has
    /// no record yet, or the node is the last holder, or the recorded
    /// synchronous standby, or the request forces it. A new holder starts
    /// without a synchronous standby.
    pub fn acquire(&mut self, req: &LeaseRequest, now: Instant) -> (LeaseAnswer, Grant) {
        let ttl = Duration::from_millis(req.ttl_ms).min(self.max_ttl);
        let grant = match self.records.get(&req.cluster) {
            None => Grant::New { previous: None, forced: false },
            Some(r) if r.holder == req.node => Grant::Renewed,
            Some(r) if r.held(now) => Grant::Held,
            Some(r) if r.sync_standby.as_deref() == Some(req.node.as_str()) => {
                Grant::New { previous: Some(r.holder.clone()), forced: false }
            }
            Some(r) if req.force => Grant::New { previous: Some(r.holder.clone()), forced: true },
            Some(_) => Grant::NotEligible,
        };
        match &grant {
            Grant::Renewed => {
                if let Some(r) = self.records.get_mut(&req.cluster) {
                    r.expires = Some(now + ttl);
                }
            }
            Grant::New { .. } => {
                let record = Record { holder: req.node.clone(), expires: Some(now + ttl), sync_standby: None };
                self.records.insert(req.cluster.clone(), record);
            }
            Grant::Held | Grant::NotEligible => {}
        }
        (self.answer(&req.cluster, grant.granted(), now), grant)
    }

    /// Give the lease up; the record of the last holder and its synchronous
    /// standby stays. Only the holder can release.
    pub fn release(&mut self, req: &ReleaseRequest, now: Instant) -> LeaseAnswer {
        if let Some(r) = self.records.get_mut(&req.cluster).filter(|r| r.holder == req.node) {
            r.expires = None;
        }
        self.answer(&req.cluster, false, now)
    }

    /// Record the holder's synchronous standby (or none). Accepted only from
    /// the current holder of an unexpired lease.
    pub fn record_sync(&mut self, req: &SyncRequest, now: Instant) -> SyncAnswer {
        let accepted = match self.records.get_mut(&req.cluster) {
            Some(r) if r.holder == req.node && r.held(now) => {
                r.sync_standby = req.sync_standby.clone();
                true
            }
            _ => false,
        };
        let record = self.records.get(&req.cluster);
        SyncAnswer {
            accepted,
            sync_standby: record.and_then(|r| r.sync_standby.clone()),
            holder: record.filter(|r| r.held(now)).map(|r| r.holder.clone()),
        }
    }

    pub fn holder(&self, cluster: &str, now: Instant) -> LeaseAnswer {
        self.answer(cluster, false, now)
    }

    fn answer(&self, cluster: &str, granted: bool, now: Instant) -> LeaseAnswer {
        let Some(r) = self.records.get(cluster) else {
            return LeaseAnswer { granted, holder: None, remaining_ms: 0, sync_standby: None, last_holder: None };
        };
        let held = r.held(now);
        LeaseAnswer {
            granted,
            holder: held.then(|| r.holder.clone()),
            remaining_ms: match r.expires {
                Some(e) if held => e.saturating_duration_since(now).as_millis() as u64,
                _ => 0,
            },
            sync_standby: r.sync_standby.clone(),
            last_holder: Some(r.holder.clone()),
        }
    }

    /// What the state file holds. It changes only when a holder, a release or
    /// a sync record changes, not on renewals.
    pub fn persisted(&self) -> BTreeMap<String, Persisted> {
        self.records
            .iter()
            .map(|(c, r)| {
                let p = Persisted {
                    last_holder: r.holder.clone(),
                    held: r.expires.is_some(),
                    sync_standby: r.sync_standby.clone(),
                };
                (c.clone(), p)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(30);

    fn req(node: &str, ttl_ms: u64) -> LeaseRequest {
        LeaseRequest { cluster: "lab".into(), node: node.into(), ttl_ms, force: false }
    }

    fn forced(node: &str) -> LeaseRequest {
        LeaseRequest { force: true, ..req(node, 10_000) }
    }

    fn release(node: &str) -> ReleaseRequest {
        ReleaseRequest { cluster: "lab".into(), node: node.into() }
    }

    fn sync(node: &str, standby: Option<&str>) -> SyncRequest {
        SyncRequest { cluster: "lab".into(), node: node.into(), sync_standby: standby.map(str::to_string) }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn one_holder_until_expiry_then_the_sync_standby() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(MAX, BTreeMap::new(), t0);
        let (a, grant) = table.acquire(&req("a", 10_000), t0);
        assert_eq!(grant, Grant::New { previous: None, forced: false }, "the first node of a new cluster");
        assert!(a.granted);
        assert!(table.record_sync(&sync("a", Some("b")), secs(t0, 1)).accepted);
        let (denied, grant) = table.acquire(&req("b", 10_000), secs(t0, 9));
        assert_eq!(grant, Grant::Held);
        assert_eq!(
            (denied.holder.as_deref(), denied.remaining_ms, denied.sync_standby.as_deref()),
            (Some("a"), 1_000, Some("b"))
        );
        assert_eq!(table.acquire(&req("a", 10_000), secs(t0, 9)).1, Grant::Renewed);
        assert_eq!(table.acquire(&req("b", 10_000), secs(t0, 18)).1, Grant::Held);
        let (taken, grant) = table.acquire(&req("b", 10_000), secs(t0, 19));
        assert_eq!(grant, Grant::New { previous: Some("a".into()), forced: false }, "the sync standby takes over");
        assert_eq!(
            (taken.holder.as_deref(), taken.last_holder.as_deref(), taken.sync_standby),
            (Some("b"), Some("b"), None),
            "a new holder starts without a synchronous standby"
        );
    }

    #[test]
    fn a_free_lease_goes_only_to_the_last_holder_the_sync_standby_or_by_force() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(MAX, BTreeMap::new(), t0);
        assert!(table.acquire(&req("a", 10_000), t0).0.granted);
        // No synchronous standby recorded (the leader degraded, or never had one).
        assert!(table.record_sync(&sync("a", None), t0).accepted);
        let later = secs(t0, 11);
        let (free, grant) = table.acquire(&req("b", 10_000), later);
        assert_eq!(grant, Grant::NotEligible);
        assert_eq!((free.granted, free.holder, free.last_holder.as_deref()), (false, None, Some("a")));
        // Expired, but the last holder may take its own lease back, keeping the record.
        assert!(!table.record_sync(&sync("a", Some("b")), later).accepted, "expired: not the holder");
        assert_eq!(table.acquire(&req("a", 10_000), later).1, Grant::Renewed);
        assert!(table.record_sync(&sync("a", Some("b")), later).accepted);
        assert!(table.record_sync(&sync("a", None), later).accepted);
        table.release(&release("a"), later);
        assert_eq!(table.acquire(&req("b", 10_000), later).1, Grant::NotEligible, "released, still not eligible");
        let (forced_answer, grant) = table.acquire(&forced("b"), later);
        assert_eq!(grant, Grant::New { previous: Some("a".into()), forced: true });
        assert_eq!(forced_answer.holder.as_deref(), Some("b"));
        // Force never takes a held lease.
        assert_eq!(table.acquire(&forced("a"), later).1, Grant::Held);
    }

    #[test]
    fn only_the_current_holder_records_the_sync_standby() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(MAX, BTreeMap::new(), t0);
        let none = table.record_sync(&sync("a", Some("b")), t0);
        assert_eq!((none.accepted, none.holder, none.sync_standby), (false, None, None), "no record yet");
        table.acquire(&req("a", 10_000), t0);
        let refused = table.record_sync(&sync("b", Some("b")), t0);
        assert_eq!((refused.accepted, refused.holder.as_deref(), refused.sync_standby), (false, Some("a"), None));
        let stored = table.record_sync(&sync("a", Some("b")), t0);
        assert_eq!((stored.accepted, stored.sync_standby.as_deref()), (true, Some("b")));
        assert_eq!(table.holder("lab", t0).sync_standby.as_deref(), Some("b"));
        table.release(&release("a"), t0);
        assert!(!table.record_sync(&sync("a", None), t0).accepted, "released: no longer the holder");
        let answer = table.holder("lab", t0);
        assert_eq!(
            (answer.holder, answer.last_holder.as_deref(), answer.sync_standby.as_deref()),
            (None, Some("a"), Some("b")),
            "releasing keeps the last holder and its record"
        );
    }

    #[test]
    fn ttl_is_capped_and_only_the_holder_releases() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(5), BTreeMap::new(), t0);
        assert_eq!(table.acquire(&req("a", 60_000), t0).0.remaining_ms, 5_000);
        table.release(&release("b"), t0);
        assert_eq!(table.acquire(&req("b", 1000), t0).1, Grant::Held, "only the holder can release");
    }

    #[test]
    fn renewals_do_not_change_what_is_persisted() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(MAX, BTreeMap::new(), t0);
        table.acquire(&req("a", 10_000), t0);
        let before = table.persisted();
        table.acquire(&req("a", 10_000), secs(t0, 5));
        table.acquire(&req("a", 10_000), secs(t0, 50));
        assert_eq!(table.persisted(), before);
        assert_eq!(before["lab"], Persisted { last_holder: "a".into(), held: true, sync_standby: None });
        table.record_sync(&sync("a", Some("b")), secs(t0, 50));
        table.release(&release("a"), secs(t0, 50));
        assert_eq!(
            table.persisted()["lab"],
            Persisted { last_holder: "a".into(), held: false, sync_standby: Some("b".into()) }
        );
    }

    #[test]
    fn restored_records_are_honoured() {
        let t0 = Instant::now();
        let restored = BTreeMap::from([
            ("lab".to_string(), Persisted { last_holder: "a".into(), held: true, sync_standby: Some("b".into()) }),
            ("shop".to_string(), Persisted { last_holder: "x".into(), held: false, sync_standby: None }),
        ]);
        let mut table = LeaseTable::new(Duration::from_secs(10), restored, t0);
        assert_eq!(table.acquire(&req("b", 1000), secs(t0, 9)).1, Grant::Held, "held for one max TTL");
        assert_eq!(table.acquire(&req("a", 1000), secs(t0, 1)).1, Grant::Renewed, "the old holder may renew");
        assert_eq!(
            table.acquire(&req("b", 1000), secs(t0, 11)).1,
            Grant::New { previous: Some("a".into()), forced: false },
            "then the recorded sync standby"
        );
        let shop = LeaseRequest { cluster: "shop".into(), node: "y".into(), ttl_ms: 1000, force: false };
        assert_eq!(table.acquire(&shop, t0).1, Grant::NotEligible, "released before the restart, record kept");
    }

    #[test]
    fn clusters_are_independent() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(MAX, BTreeMap::new(), t0);
        assert!(table.acquire(&req("a", 1000), t0).0.granted);
        let other = LeaseRequest { cluster: "shop-2".into(), node: "b".into(), ttl_ms: 1000, force: false };
        assert!(table.acquire(&other, t0).0.granted);
        assert_eq!(
            table.holder("nowhere", t0),
            LeaseAnswer { granted: false, holder: None, remaining_ms: 0, sync_standby: None, last_holder: None }
        );
    }
}
