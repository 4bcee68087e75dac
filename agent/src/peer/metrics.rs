//! `GET /metrics`: Prometheus text exposition.

use std::fmt::Write;

use super::Published;

/// Roles a node can report; each gets a 0/1 series so dashboards can sum them.
const ROLES: &[&str] = &["leader", "follower", "fenced", "unknown"];

fn line(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

pub fn render(p: &Published, refused_total: u64) -> String {
    let s = &p.status;
    let mut out = String::new();
    let node = format!("node=\"{}\"", s.node);
    let with = |extra: &str| if extra.is_empty() { format!("{{{node}}}") } else { format!("{{{node},{extra}}}") };
    let role = s.role.to_lowercase();
    let roles: Vec<(String, f64)> =
        ROLES.iter().map(|r| (with(&format!("role=\"{r}\"")), if role == *r { 1.0 } else { 0.0 })).collect();
    line(&mut out, "geminik8s_role", "1 for the role this node has now.", "gauge", &roles);
    line(&mut out, "geminik8s_epoch", "Election epoch in hostMeta.", "gauge", &[(with(""), s.epoch as f64)]);
    line(
        &mut out,
        "geminik8s_peer_reachable",
        "1 when the peer answers heartbeats.",
        "gauge",
        &[(with(""), f64::from(u8::from(s.peer.reachable)))],
    );
    if let Some(rtt) = s.peer.rtt_ms {
        line(
            &mut out,
            "geminik8s_heartbeat_rtt_seconds",
            "Round trip of the last heartbeat.",
            "gauge",
            &[(with(""), rtt / 1000.0)],
        );
    }
    line(
        &mut out,
        "geminik8s_vip_held",
        "1 when this node holds the VIP.",
        "gauge",
        &[(with(""), f64::from(u8::from(s.vip.held_here)))],
    );
    line(
        &mut out,
        "geminik8s_failovers_total",
        "Promotions of this node.",
        "counter",
        &[(with(""), p.counters.failovers_total as f64)],
    );
    line(
        &mut out,
        "geminik8s_heartbeats_missed_total",
        "Heartbeats the peer did not answer.",
        "counter",
        &[(with(""), p.counters.heartbeats_missed_total as f64)],
    );
    line(
        &mut out,
        "geminik8s_refused_connections_total",
        "API connections refused (certificate or token).",
        "counter",
        &[(with(""), refused_total as f64)],
    );
    if let Some(a) = &p.archive {
        line(
            &mut out,
            "geminik8s_wal_archive_pending_files",
            "WAL files in this node's spool, not yet archived.",
            "gauge",
            &[(with(""), a.pending_files as f64)],
        );
        line(
            &mut out,
            "geminik8s_wal_archive_oldest_pending_seconds",
            "Age of the oldest unarchived WAL file (0 when none waits).",
            "gauge",
            &[(with(""), a.oldest_pending_seconds.unwrap_or(0) as f64)],
        );
        line(
            &mut out,
            "geminik8s_wal_archive_uploading",
            "1 when this node uploads the WAL (the streaming follower, or the leader alone).",
            "gauge",
            &[(with(""), f64::from(u8::from(a.uploading)))],
        );
        line(
            &mut out,
            "geminik8s_wal_archive_gap",
            "1 when WAL was dropped from a full spool: point-in-time recovery has a gap until the next full backup.",
            "gauge",
            &[(with(""), f64::from(u8::from(a.gap.is_some())))],
        );
        line(
            &mut out,
            "geminik8s_wal_archive_failing",
            "1 when the last attempt to reach the destination failed.",
            "gauge",
            &[(with(""), f64::from(u8::from(a.last_error.is_some())))],
        );
    }
    if let Some(f) = &s.last_failover {
        line(
            &mut out,
            "geminik8s_last_failover_duration_seconds",
            "Duration of the last promotion.",
            "gauge",
            &[(with(""), f.duration_ms as f64 / 1000.0)],
        );
    }
    if let Some(r) = &s.replication {
        if let Some(b) = r.lag_bytes {
            line(
                &mut out,
                "geminik8s_replication_lag_bytes",
                "Bytes the standby is behind.",
                "gauge",
                &[(with(""), b as f64)],
            );
        }
        if let Some(sec) = r.lag_seconds {
            line(
                &mut out,
                "geminik8s_replication_lag_seconds",
                "Replay lag of the standby.",
                "gauge",
                &[(with(""), sec)],
            );
        }
    }
    let healthy: Vec<(String, f64)> = s
        .components
        .iter()
        .map(|c| (with(&format!("component=\"{}\"", c.name)), f64::from(u8::from(c.is_ok()))))
        .collect();
    line(&mut out, "geminik8s_component_healthy", "1 when the local component is healthy.", "gauge", &healthy);
    out
}
