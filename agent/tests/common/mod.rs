//! Shared by the tests that run `gemin_k8s` processes on loopback.

use std::path::{Path, PathBuf};

/// A free TCP port on loopback (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `gemin_k8s init` for a cluster on loopback (node1 127.0.0.1, node2
/// 127.0.0.2, VIP 127.0.0.3/8) in `root/lab`, both agents on `api_port`.
/// `block` is extra YAML under `geminik8s:` (indented by two spaces), and
/// `extra` more init flags. Returns the cluster directory.
pub fn init_loopback(root: &Path, api_port: u16, block: &str, extra: &[&str]) -> PathBuf {
    let dir = root.join("lab");
    let template = root.join("template.yaml");
    std::fs::write(
        &template,
        format!(
            "#cloud-config\ngeminik8s:\n  node:\n    api_port: {api_port}\n  peer:\n    api_port: {api_port}\n{block}"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemin_k8s"))
        .args(["init", "--name", "lab", "--node1-ip", "127.0.0.1", "--node2-ip", "127.0.0.2"])
        .args(["--vip", "127.0.0.3", "--vip-prefix", "8"])
        .args(extra)
        .args(if extra.contains(&"--witness") { &[][..] } else { &["--witness", "none"][..] })
        .arg("--template")
        .arg(&template)
        .arg("--config-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}
