//! The `gemin-image` binary: JSON events for CI, positioned spec errors, the
//! exit status.

use std::fs;
use std::process::Command;

fn gemin_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gemin-image"))
}

#[test]
fn json_events_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base");
    fs::create_dir_all(base.join("etc")).unwrap();
    fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let status = Command::new("tar").arg("-cf").arg(d.join("base.tar")).arg("-C").arg(&base).arg(".").status().unwrap();
    assert!(status.success());
    fs::write(
        d.join("spec.yaml"),
        "name: j\nbase:\n  tarball:\n    path: base.tar\noutputs: [rootfs-tar, oci-archive]\n",
    )
    .unwrap();

    let out = gemin_image()
        .args(["build", "--json", "--spec"])
        .arg(d.join("spec.yaml"))
        .arg("--out")
        .arg(d.join("out"))
        .arg("--cache")
        .arg(d.join("cache"))
        .output()
        .unwrap();
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
