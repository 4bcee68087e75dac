//! `k3s-standin`: a lab stand-in for K3s that serves `k3s server` with the
//! real `kube-apiserver` (see `geminik8s_vm_tests::k3s_standin`). A test
//! fixture: point `GEMINIK8S_K3S_BINARY` at it.

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("k3s-standin: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(geminik8s_vm_tests::k3s_standin::run(&argv)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("k3s-standin: {e:#}");
            ExitCode::FAILURE
        }
    }
}
