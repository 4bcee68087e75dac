//! The `gemin-image` binary: JSON events for CI, positioned spec errors, the
//! exit status.

use std::fs;
use std::process::Command;

fn gemin_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemin-image"))
}

/// `d/base.tar`: a base with only `/etc/passwd`.
fn base_tar(d: &std::path::Path) {
    let base = d.join("base");
    fs::create_dir_all(base.join("etc")).unwrap();
    fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let status = Command::new("tar").arg("-cf").arg(d.join("base.tar")).arg("-C").arg(&base).arg(".").status().unwrap();
    assert!(status.success());
}

/// `gemin-image build` of `d/spec.yaml` into `d/out`, caching in `d/cache`.
fn build_in(d: &std::path::Path, flags: &[&str]) -> std::process::Output {
    gemin_image()
        .arg("build")
        .args(flags)
        .arg("--spec")
        .arg(d.join("spec.yaml"))
        .arg("--out")
        .arg(d.join("out"))
        .arg("--cache")
        .arg(d.join("cache"))
        .output()
        .unwrap()
}

#[test]
fn json_events_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base_tar(d);
    fs::write(
        d.join("spec.yaml"),
        "name: j\nbase:\n  tarball:\n    path: base.tar\noutputs: [rootfs-tar, oci-archive]\n",
    )
    .unwrap();

    let out = build_in(d, &["--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"step_started") && kinds.contains(&"step_finished"), "{kinds:?}");
    let outputs: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "output").collect();
    assert_eq!(outputs.len(), 2);
    let tar = outputs.iter().find(|e| e["format"] == "rootfs-tar").unwrap();
    assert_eq!(tar["sha256"].as_str().unwrap().len(), 64);
    assert!(d.join("out/j-manifest.json").is_file());
}

#[test]
fn a_bad_spec_fails_with_file_line_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    fs::write(&spec, "base:\n  debain: {}\n").unwrap();
    let out = gemin_image().arg("check").arg(&spec).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:2:3: error: base.debain: unknown key `debain`", spec.display())), "{stderr}");
    assert!(stderr.contains("hint: did you mean `debian`?"), "{stderr}");
}

/// A build that cannot download an artifact says how to give it a local
/// file, and `--artifact NAME=PATH` does: the image carries that file and
/// the manifest its digest (how K3s goes into images on hosts without the
/// download).
#[test]
fn an_unavailable_download_is_replaced_by_a_local_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base_tar(d);
    fs::write(
        d.join("spec.yaml"),
        "name: a\nbase:\n  tarball:\n    path: base.tar\nartifacts:\n  - name: k3s\n    url: https://example.invalid/k3s\n    \
         sha256: 15811d34187e03fe29d0e46108c42cc33e62cec1b3d9d80f50944536ebcad40a\n    dest: /usr/local/bin/k3s\n",
    )
    .unwrap();
    let build = |extra: &[&str]| {
        gemin_image()
            .args(["build", "--offline", "--spec"])
            .arg(d.join("spec.yaml"))
            .arg("--out")
            .arg(d.join("out"))
            .arg("--cache")
            .arg(d.join("cache"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = build(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("give a local copy with `--artifact k3s=PATH`"), "{stderr}");

    let standin = d.join("k3s-standin");
    fs::write(&standin, "#!/bin/sh\nexit 0\n").unwrap();
    let out = build(&["--artifact", &format!("k3s={}", standin.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(d.join("out/rootfs/usr/local/bin/k3s")).unwrap(), fs::read(&standin).unwrap());
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("out/a-manifest.json")).unwrap()).unwrap();
    let k3s = manifest["artifacts"].as_array().unwrap().iter().find(|a| a["name"] == "k3s").unwrap().clone();
    let digest = gemin_image::cache::sha256_file(&standin).unwrap();
    assert_eq!(k3s["sha256"], digest, "{k3s}");
}

#[test]
fn an_upgrade_bundle_asked_on_the_command_line_needs_the_specs_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base_tar(d);
    fs::write(d.join("spec.yaml"), "name: u\nbase:\n  tarball:\n    path: base.tar\n").unwrap();
    let out = build_in(d, &["--format", "upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("the upgrade output needs the image's version") && stderr.contains("version:"), "{stderr}");
    assert!(!d.join("out/u-upgrade").exists());
}
