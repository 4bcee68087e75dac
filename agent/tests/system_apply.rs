//! `gemin_k8s config apply --root`: hostname, users and write_files from
//! cloud-config applied into a copy of a minimal `/etc` with the real shadow
//! tools, twice.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use geminik8s_vm_tests::require;

/// The node's own file: a valid `geminik8s:` block (TLS paths are not checked by apply).
const NODE: &str = r#"#cloud-config
geminik8s:
  cluster: {name: lab, vip: 10.77.0.10, bootstrap_leader: node1}
  node: {name: node1, ip: 10.77.0.11}
  peer: {name: node2, ip: 10.77.0.12}
  api: {token: 0123456789abcdef0123}
  postgres: {replication_password: 0123456789abcdef0123, kine_password: 0123456789abcdef0123}
  k3s: {token: 0123456789abcdef0123}
  tls: {ca: /etc/geminik8s/tls/ca.crt, cert: /etc/geminik8s/tls/node.crt, key: /etc/geminik8s/tls/node.key}
"#;

/// `openssl passwd -6 -salt abcdefgh secret`.
const ROOT_HASH: &str =
    "$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVACtLtip/cZ/1GM/O6IND4WQhG.";

fn user_data() -> String {
    format!(
        "#cloud-config\nhostname: edge-a1\nusers:\n\
         - name: ops\n  passwd: s3cret-pass\n  groups: [sudo, edge-ops]\n  shell: /bin/bash\n  ssh_authorized_keys:\n\
         \x20 - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@site\n\
         \x20 - ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ ops@laptop\n\
         - name: root\n  passwd: \"{ROOT_HASH}\"\n  lock_passwd: true\n  ssh_authorized_keys: [ssh-ed25519 AAAAroot admin@site]\n"
    )
}

/// A root with a minimal `/etc`, the node file, and `user_data` on the CIDATA mount.
fn node_root(user_data: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for d in ["etc/geminik8s", "home", "root", "run/geminik8s-boot/cidata"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let files: [(&str, &str, u32); 7] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            0o644,
        ),
        ("etc/group", "root:x:0:\nsudo:x:27:\nnogroup:x:65534:\n", 0o644),
        ("etc/shadow", "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n", 0o640),
        ("etc/gshadow", "root:*::\nsudo:*::\nnogroup:*::\n", 0o640),
        ("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644),
        ("etc/hostname", "debian\n", 0o644),
        ("etc/geminik8s/node.yaml", NODE, 0o600),
    ];
    for (path, text, mode) in files {
        std::fs::write(root.join(path), text).unwrap();
        std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(root.join("run/geminik8s-boot/cidata/user-data"), user_data).unwrap();
    dir
}

fn apply(root: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gemin_k8s"))
        .args(["config", "apply", "--root"])
        .arg(root)
        .args(extra)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap()
}

fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines().find(|l| l.split(':').next() == Some(name)).unwrap_or_else(|| panic!("no `{name}` in:\n{text}"))
}

/// Every file below `root`: contents, mode and owner.
fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, u32, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let contents = if m.is_file() { std::fs::read(&path).unwrap() } else { Vec::new() };
            out.insert(path.display().to_string(), (contents, m.mode(), m.uid(), m.gid()));
            if m.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn hostname_and_users_are_applied_once() {
    require!(root: true, tools: ["useradd", "usermod", "groupadd", "chpasswd", "openssl"]);
    let dir = node_root(&user_data());
    let root = dir.path();

    let report = json(&apply(root, &["--output", "json"]));
    assert_eq!(report["valid"], true);
    assert_eq!(report["hostname"], "edge-a1");
    assert_eq!(report["users"], serde_json::json!(["ops", "root"]));
    assert!(report["sources"][1].as_str().unwrap().ends_with("run/geminik8s-boot/cidata/user-data"), "{report}");

    assert_eq!(read(root, "etc/hostname"), "edge-a1\n");
    assert_eq!(
        read(root, "etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tedge-a1\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    );

    let passwd = read(root, "etc/passwd");
    let ops: Vec<&str> = line(&passwd, "ops").split(':').collect();
    assert_eq!((ops[5], ops[6]), ("/home/ops", "/bin/bash"));
    let (uid, gid): (u32, u32) = (ops[2].parse().unwrap(), ops[3].parse().unwrap());
    let group = read(root, "etc/group");
    assert_eq!(line(&group, "ops").split(':').nth(2), Some(gid.to_string().as_str()), "primary group ops:\n{group}");
    assert!(line(&group, "sudo").ends_with(":ops"), "{group}");
    assert!(line(&group, "edge-ops").ends_with(":ops"), "{group}");

    // The stored hash is the password hashed with its own salt.
    let shadow = read(root, "etc/shadow");
    let hash = line(&shadow, "ops").split(':').nth(1).unwrap();
    assert!(hash.starts_with("$6$"), "{hash}");
    let salt = hash.split('$').nth(2).unwrap();
    let again = Command::new("openssl").args(["passwd", "-6", "-salt", salt, "s3cret-pass"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), hash);
    assert_eq!(line(&shadow, "root").split(':').nth(1), Some(format!("!{ROOT_HASH}").as_str()), "root locked");

    let ssh = root.join("home/ops/.ssh");
    let keys = ssh.join("authorized_keys");
    assert_eq!(
        std::fs::read_to_string(&keys).unwrap(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOps ops@site\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ ops@laptop\n"
    );
    for (path, mode) in [(&ssh, 0o700), (&keys, 0o600)] {
        let m = std::fs::metadata(path).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (mode, uid, gid), "{}", path.display());
    }
    assert_eq!(read(root, "root/.ssh/authorized_keys"), "ssh-ed25519 AAAAroot admin@site\n");

    // Every boot runs it again: the second run finds nothing to do.
    let before = snapshot(root);
    let second = json(&apply(root, &["--output", "json"]));
    assert_eq!(second["changes"], serde_json::json!([]), "{second}");
    assert_eq!(snapshot(root), before, "the second run changed files");
}

/// `--dry-run` on a fresh root with `user_data`: it succeeds, prints every
/// `expected` text and changes no file.
fn assert_dry_run_reports(user_data: &str, expected: &[&str]) {
    let dir = node_root(user_data);
    let before = snapshot(dir.path());
    let out = apply(dir.path(), &["--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in expected {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert_eq!(snapshot(dir.path()), before, "a dry run changed files");
}

#[test]
fn a_dry_run_reports_and_changes_nothing() {
    require!(root: true, tools: ["useradd", "usermod", "groupadd", "chpasswd", "openssl"]);
    assert_dry_run_reports(
        &user_data(),
        &[
            "would change: hostname /etc/hostname: edge-a1",
            "would change: group edge-ops: create",
            "would change: user ops: create (`useradd",
            "would change: password ops: set",
            "would change: authorized-keys /home/ops/.ssh/authorized_keys: 2 keys",
            "would change: password root: lock",
            "dry run: hostname edge-a1, 2 users",
        ],
    );
}

#[test]
fn bad_users_are_reported_with_positions_and_nothing_is_applied() {
    // No root needed: validation fails before any tool runs.
    let dir = node_root("#cloud-config\nhostname: edge-a1\nusers:\n- name: Ops\n  pasword: x\n");
    let out = apply(dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let user_data = dir.path().join("run/geminik8s-boot/cidata/user-data");
    let at = |line: usize, col: usize| format!("{}:{line}:{col}: error: ", user_data.display());
    assert!(stderr.contains(&format!("{}users[0].name: `Ops` is not a valid account name", at(4, 9))), "{stderr}");
    assert!(stderr.contains(&format!("{}users[0].pasword: unknown key `pasword`", at(5, 3))), "{stderr}");
    assert!(stderr.contains("hint: did you mean `passwd`?"), "{stderr}");
    assert_eq!(read(dir.path(), "etc/hostname"), "debian\n");

    let json_out = apply(dir.path(), &["--output", "json"]);
    assert_eq!(json_out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert_eq!(report["diagnostics"][0]["line"], 4);
}

/// `write_files`: a static network file, a base64 secret owned by a user that
/// `users:` creates (deferred), an append, a file for an existing account.
const FILES_USER_DATA: &str = "#cloud-config
write_files:
- path: /etc/systemd/network/10-lab.network
  permissions: \"0644\"
  owner: root:root
  content: |
    [Match]
    MACAddress=52:54:00:77:00:11
    [Network]
    Address=10.77.0.11/24
- path: /home/ops/.config/token
  encoding: b64
  content: c2VjcmV0LXRva2VuCg==
  permissions: \"0600\"
  owner: ops:ops
  defer: true
- path: /etc/motd
  append: true
  content: |
    site A
- path: /var/lib/nobody/state
  owner: nobody:nogroup
  permissions: \"0640\"
  content: x
users:
- name: ops
";

#[test]
fn write_files_are_applied_once() {
    require!(root: true, tools: ["useradd", "usermod", "groupadd", "chpasswd", "openssl"]);
    let dir = node_root(FILES_USER_DATA);
    let root = dir.path();
    std::fs::write(root.join("etc/motd"), "welcome\n").unwrap();

    let report = json(&apply(root, &["--output", "json"]));
    assert_eq!(
        report["files"],
        serde_json::json!([
            "/etc/systemd/network/10-lab.network",
            "/etc/motd",
            "/var/lib/nobody/state",
            "/home/ops/.config/token"
        ]),
        "deferred files come last: {report}"
    );
    let changes = report["changes"].as_array().unwrap();
    let file_change = |path: &str| {
        changes
            .iter()
            .find(|c| c["kind"] == "file" && c["target"] == path)
            .unwrap_or_else(|| panic!("no file change for {path} in {report}"))
    };
    assert_eq!(file_change("/etc/systemd/network/10-lab.network")["detail"], "create, 69 bytes, 0644 root:root");
    assert_eq!(file_change("/etc/motd")["detail"], "append 7 bytes, 0644 root:root");
    assert!(changes.iter().any(|c| c["kind"] == "directory" && c["target"] == "/etc/systemd/network"), "{report}");
    // The user is created before its deferred file.
    let position = |kind: &str, target: &str| changes.iter().position(|c| c["kind"] == kind && c["target"] == target);
    assert!(position("user", "ops") < position("file", "/home/ops/.config/token"), "{report}");

    let network = root.join("etc/systemd/network/10-lab.network");
    assert_eq!(
        std::fs::read_to_string(&network).unwrap(),
        "[Match]\nMACAddress=52:54:00:77:00:11\n[Network]\nAddress=10.77.0.11/24\n"
    );
    let m = std::fs::metadata(&network).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o644, 0, 0));
    for d in ["etc/systemd", "etc/systemd/network", "var/lib/nobody"] {
        let m = std::fs::metadata(root.join(d)).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o755, 0, 0), "{d}");
    }

    let passwd = read(root, "etc/passwd");
    let ops: Vec<&str> = line(&passwd, "ops").split(':').collect();
    let (uid, gid): (u32, u32) = (ops[2].parse().unwrap(), ops[3].parse().unwrap());
    let token = root.join("home/ops/.config/token");
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "secret-token\n", "base64 decoded");
    let m = std::fs::metadata(&token).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, uid, gid));

    assert_eq!(read(root, "etc/motd"), "welcome\nsite A\n");
    let m = std::fs::metadata(root.join("var/lib/nobody/state")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 65534, 65534));
    assert_eq!(read(root, "var/lib/nobody/state"), "x");

    // The next boot: nothing to do, the append is not repeated.
    let before = snapshot(root);
    let second = json(&apply(root, &["--output", "json"]));
    assert_eq!(second["changes"], serde_json::json!([]), "{second}");
    assert_eq!(snapshot(root), before, "the second run changed files");

    // A changed mode or owner is put back without rewriting the contents.
    std::fs::set_permissions(&network, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&network, Some(65534), None).unwrap();
    let third = json(&apply(root, &["--output", "json"]));
    assert_eq!(third["changes"].as_array().unwrap().len(), 1, "{third}");
    assert_eq!(third["changes"][0]["detail"], "mode 0644 (was 0600), owner root:root (was 65534:0)");
    assert_eq!(snapshot(root), before);
}

#[test]
fn a_dry_run_reports_files_and_writes_nothing() {
    require!(root: true, tools: ["useradd", "usermod", "groupadd", "chpasswd", "openssl"]);
    assert_dry_run_reports(
        FILES_USER_DATA,
        &[
            "would change: directory /etc/systemd/network: create, 0755 root:root",
            "would change: file /etc/systemd/network/10-lab.network: create, 69 bytes, 0644 root:root",
            // The owner is created by `users:` first, so a dry run cannot resolve it yet.
            "would change: file /home/ops/.config/token: create, 13 bytes, 0600 ops:ops",
            "dry run: hostname node1, 1 user, 4 files",
        ],
    );
}

#[test]
fn bad_write_files_are_reported_with_positions_and_nothing_is_applied() {
    // No root needed: validation fails before anything is written.
    let dir = node_root(
        "#cloud-config\nwrite_files:\n- path: etc/motd\n  content: x\n- path: /etc/a\n  permissions: \"rw-r--r--\"\n- path: /etc/b\n  contents: x\n",
    );
    let out = apply(dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let user_data = dir.path().join("run/geminik8s-boot/cidata/user-data");
    let at = |line: usize, col: usize| format!("{}:{line}:{col}: error: ", user_data.display());
    for expected in [
        format!("{}write_files[0].path: `etc/motd` is not an absolute path", at(3, 9)),
        format!("{}write_files[1].permissions: `rw-r--r--` is not an octal file mode", at(6, 16)),
        format!("{}write_files[2].contents: unknown key `contents`", at(8, 3)),
        "hint: did you mean `content`?".to_string(),
    ] {
        assert!(stderr.contains(&expected), "missing `{expected}` in:\n{stderr}");
    }
    assert!(!dir.path().join("etc/a").exists() && !dir.path().join("etc/b").exists());
}

/// A box of the generic image waiting for enrolment: no node configuration,
/// only the site's token and the machine's own settings. Its address and
/// users apply all the same (it must be reachable for `deploy`); a node
/// file that is merely broken still applies nothing.
#[test]
fn a_node_waiting_for_enrolment_gets_its_address_and_users() {
    require!(root: true, tools: ["useradd", "usermod", "groupadd", "chpasswd", "openssl"]);
    let waiting = "#cloud-config\ngeminik8s_enrolment:\n  token: 0123456789abcdef0123\n\
                   write_files:\n  - path: /etc/systemd/network/10-lab.network\n    content: |\n      [Network]\n      Address=10.77.0.21/24\n\
                   users:\n  - name: ops\n    ssh_authorized_keys: [ssh-ed25519 AAAAops ops@site]\n";
    let dir = node_root(waiting);
    let root = dir.path();
    std::fs::remove_file(root.join("etc/geminik8s/node.yaml")).unwrap();
    let report = json(&apply(root, &["--output", "json"]));
    assert_eq!(report["files"], serde_json::json!(["/etc/systemd/network/10-lab.network"]), "{report}");
    assert_eq!(read(root, "etc/systemd/network/10-lab.network"), "[Network]\nAddress=10.77.0.21/24\n");
    assert!(read(root, "etc/passwd").contains("\nops:"), "the user is made");

    // Without the enrolment block the same file is an invalid node: nothing applied.
    let dir = node_root("#cloud-config\ngeminik8s:\n  postgres: {}\nwrite_files:\n  - path: /etc/x\n    content: x\n");
    let root = dir.path();
    std::fs::remove_file(root.join("etc/geminik8s/node.yaml")).unwrap();
    let out = apply(root, &[]);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!root.join("etc/x").exists());
}
