//! A short run of the chaos suite in each witness mode: two trials (a cut
//! of the link between the nodes, then the leader's isolation) under steady
//! writers, with a fixed seed. Each mode must keep what it promises: no acknowledged
//! write lost, no revision going back, one VIP holder (except in `none`,
//! where two are expected by design), and convergence after the heal.
//! Needs root, nftables, PostgreSQL 15, Kine and etcdctl; skips with a
//! printed reason otherwise. `gemini-lab chaos` runs the same with more
//! trials and faults.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use geminik8s::config::WitnessMode;
use geminik8s_vm_tests::chaos::{self, plan};
use geminik8s_vm_tests::probe::agent_bin;

/// The lab's namespace names are global: one lab at a time.
static LAB: Mutex<()> = Mutex::new(());

const FAULTS: &str = "cut,isolate-leader";
const SEED: u64 = 1;

fn chaos_run(mode: WitnessMode) {
    let _one = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let tools = ["ip", "nft", "etcdctl", "initdb", "pg_basebackup", "pg_rewind", "kine"];
    if let Some(reason) = geminik8s_vm_tests::skip::requires(true, &tools) {
        geminik8s_vm_tests::skip::skip("chaos", &reason);
        return;
    }
    let Some(bin) = agent_bin() else {
        geminik8s_vm_tests::skip::skip("chaos", "gemin_k8s is not built (cargo test --workspace builds it)");
        return;
    };
    let opts = chaos::Options {
        modes: vec![mode],
        trials: 2,
        scenarios: plan::parse_scenarios(FAULTS).unwrap(),
        seed: SEED,
        in_order: true,
        long_cuts: plan::LONG_CUTS,
        product_timings: false,
        agent_bin: bin,
        keep: false,
        converge_timeout: Duration::from_secs(90),
        artifacts: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos"),
        k3s: None,
    };
    let report = chaos::run(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    println!("{}", report.table());
    assert_eq!(report.trials.len(), 2);
    let names: Vec<String> = report.trials.iter().map(|t| t.draw.scenario.to_string()).collect();
    assert_eq!(names, ["cut", "isolate-leader"]);
    let violating: Vec<String> = report
        .trials
        .iter()
        .filter(|t| !t.violations().is_empty())
        .map(|t| {
            let lost: Vec<_> = t.lost.iter().take(3).collect();
            let regressions: Vec<_> = t.regressions.iter().take(3).collect();
            format!(
                "{}\n  first lost: {lost:?}\n  first regressions: {regressions:?}\n  notes: {:?}\n  logs: {:?}",
                t.line(),
                t.notes,
                t.logs
            )
        })
        .collect();
    assert!(violating.is_empty(), "witness {mode:?} broke what it promises:\n{}", violating.join("\n"));
    for t in &report.trials {
        assert!(t.total_acked() > 0, "no write was acknowledged in {}", t.line());
        assert!(t.read_back, "the acknowledged writes could not be read back: {}\n{:?}", t.line(), t.notes);
    }
}

#[test]
fn chaos_witness_none() {
    chaos_run(WitnessMode::None);
}

#[test]
fn chaos_witness_gateway() {
    chaos_run(WitnessMode::Gateway);
}

#[test]
fn chaos_witness_arbiter() {
    chaos_run(WitnessMode::Arbiter);
}
