use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<ImageSpec, SpecError> {
    ImageSpec::parse(text, "spec.yaml", Path::new("/specs"))
}

/// The single error of a bad spec, as (line, col, key, message, hint).
fn one_error(text: &str) -> Diagnostic {
    let err = parse(text).unwrap_err();
    assert_eq!(err.0.len(), 1, "expected one error, got:\n{err}");
    err.0.into_iter().next().unwrap()
}

const GOOD: &str = "\
name: edge
base:
  debian:
    suite: bookworm
    mirror: http://deb.debian.org/debian
packages: [systemd, postgresql-15]
artifacts:
  - name: kine
    url: https://example.invalid/kine
    sha256: 0000000000000000000000000000000000000000000000000000000000000000
    dest: /usr/bin/kine
    mode: 0755
  - name: airgap
    path: images/airgap.tar
    dest: /var/lib/rancher/k3s/agent/images/
    mode: 0644
overlays: [../overlays]
cloud_config: default.yaml
users:
  - name: ops
    groups: [sudo]
    ssh_authorized_keys: [\"ssh-ed25519 AAAA ops@site\"]
outputs: [rootfs-tar, oci-archive]
sizes: {root: 2G, persistent: 512MiB}
";

#[test]
fn a_good_spec_resolves_paths_modes_and_defaults() {
    let spec = parse(GOOD).unwrap();
    assert_eq!(spec.name, "edge");
    let Base::Debian(debian) = &spec.base else { panic!("{:?}", spec.base) };
    assert_eq!((debian.variant.as_str(), debian.components.as_slice()), ("minbase", &["main".to_string()][..]));
    assert_eq!(spec.artifacts[0].mode, 0o755, "a plain 0755 is octal");
    assert_eq!(spec.artifacts[1].mode, 0o644);
    assert_eq!(
        spec.artifacts[1].source,
        ArtifactSource::Path { path: "/specs/images/airgap.tar".into(), sha256: None }
    );
    assert_eq!(spec.overlays, vec![PathBuf::from("/specs/../overlays")]);
    assert_eq!(spec.cloud_config.as_ref().unwrap().dest, DEFAULT_CLOUD_CONFIG_DEST);
    assert_eq!(spec.users[0].shell, "/bin/bash");
    assert_eq!(spec.outputs, vec![OutputFormat::RootfsTar, OutputFormat::OciArchive]);
    assert_eq!(spec.sizes.root, Some(2 << 30));
    assert_eq!(spec.sizes.persistent, Some(512 << 20));
}

#[test]
fn the_shipped_default_spec_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/default.yaml");
    let spec = ImageSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(spec.packages.iter().any(|p| p == "postgresql-15"));
    // The binaries land where the agent and the unit files run them from.
    let dest = |name: &str| spec.artifacts.iter().find(|a| a.name == name).map(|a| a.dest.clone());
    assert_eq!(dest("kine").as_deref(), Some(geminik8s::kine::KINE_BINARY));
    assert_eq!(dest("gemin_k8s").as_deref(), Some(geminik8s::services::units::AGENT_ARGV[0]));
    assert_eq!(dest("k3s").as_deref(), Some(geminik8s::k3s::K3S_BINARY));
    // K3s is the pinned release, downloaded and checked against its digest.
    let k3s = spec.artifacts.iter().find(|a| a.name == "k3s").unwrap();
    match &k3s.source {
        ArtifactSource::Url { url, sha256 } => {
            assert!(url.ends_with("/v1.34.2%2Bk3s1/k3s"), "{url}");
            assert_eq!(sha256, "15811d34187e03fe29d0e46108c42cc33e62cec1b3d9d80f50944536ebcad40a");
        }
        other => panic!("K3s comes from a URL with a digest, not {other:?}"),
    }
}

#[test]
fn unknown_keys_are_positioned_with_a_suggestion() {
    let d = one_error("base:\n  debian:\n    suite: bookworm\n    mirorr: http://x/debian\n");
    assert_eq!((d.line, d.col), (4, 5));
    assert_eq!(d.key, "base.debian.mirorr");
    assert_eq!(d.message, "unknown key `mirorr`");
    assert_eq!(d.hint.as_deref(), Some("did you mean `mirror`?"));
    assert_eq!(d.source, "spec.yaml");

    let d = one_error("base: {tarball: {path: a.tar}}\npackges: [x]\n");
    assert_eq!((d.line, d.key.as_str()), (2, "packges"));
    assert_eq!(d.hint.as_deref(), Some("did you mean `packages`?"));
}

#[test]
fn a_download_without_a_checksum_is_refused() {
    let d = one_error(
        "base: {tarball: {path: a.tar}}\nartifacts:\n  - name: k3s\n    url: https://x/k3s\n    dest: /usr/bin/k3s\n",
    );
    assert_eq!((d.line, d.key.as_str(), d.message.as_str()), (3, "artifacts[0].sha256", "required key is missing"));
    assert!(d.hint.unwrap().contains("sha256sum"));
}

#[test]
fn bad_values_each_get_their_own_error() {
    let text = "\
base:
  debian:
    variant: minbse
artifacts:
  - name: kine
    path: kine
    sha256: abc
    dest: usr/bin/kine
    mode: 0999
outputs: [rootfs-tar, qcow3]
sizes: {root: 2X}
users:
  - name: Bad User
    ssh_authorized_keys: [not-a-key]
";
    let err = parse(text).unwrap_err();
    let found: Vec<(usize, &str)> = err.0.iter().map(|d| (d.line, d.key.as_str())).collect();
    assert_eq!(
        found,
        [
            (3, "base.debian.variant"),
            (7, "artifacts[0].sha256"),
            (8, "artifacts[0].dest"),
            (9, "artifacts[0].mode"),
            (10, "outputs[1]"),
            (11, "sizes.root"),
            (13, "users[0].name"),
            (14, "users[0].ssh_authorized_keys[0]"),
        ]
    );
    let text = err.to_string();
    assert!(text.starts_with("invalid image spec (8 errors):"), "{text}");
    assert!(
        text.contains(
            "spec.yaml:3:14: error: base.debian.variant: unknown variant `minbse`\n    hint: did you mean `minbase`?"
        ),
        "{text}"
    );
}

#[test]
fn exactly_one_base_and_one_source() {
    let d = one_error("base:\n  debian: {}\n  tarball: {path: x.tar}\n");
    assert_eq!((d.line, d.key.as_str(), d.message.as_str()), (3, "base.tarball", "more than one base given"));

    let d = one_error("base:\n  oci:\n    platform: linux/amd64\n");
    assert_eq!((d.line, d.message.as_str()), (3, "neither `ref` nor `archive` is given"));

    let d = one_error("base: {oci: {ref: 'Bad Ref'}}\n");
    assert_eq!(d.key, "base.oci.ref");

    let d = one_error("name: x\n");
    assert_eq!((d.key.as_str(), d.message.as_str()), ("base", "required key is missing"));

    let d = one_error("base: {oci: {archive: a.tar}}\npackages: [vim]\n");
    assert_eq!((d.line, d.key.as_str()), (2, "packages"));
}

#[test]
fn yaml_syntax_errors_are_positioned() {
    let err = parse("base:\n  debian: {suite: [bookworm\n").unwrap_err();
    assert!(err.0[0].line >= 2, "{err}");
    assert!(err.0[0].message.starts_with("invalid YAML"), "{err}");
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("512M"), Some(512 << 20));
    assert_eq!(parse_size("2GiB"), Some(2 << 30));
    assert_eq!(parse_size("4096"), Some(4096));
    assert_eq!(parse_size("2X"), None);
}

#[test]
fn partition_labels_are_checked_and_defaulted() {
    let spec = parse("base:\n  tarball: {path: x.tar}\nlabels: {esp: site-esp}\n").unwrap();
    assert_eq!(spec.labels.get("esp"), "site-esp");
    assert_eq!(spec.labels.get("root_b"), "gemin-root-b", "unset labels take the default");

    let d = one_error("base:\n  tarball: {path: x.tar}\nlabels:\n  oem: has space\n");
    assert_eq!((d.line, d.key.as_str()), (4, "labels.oem"));
    assert!(d.message.contains("not a usable partition name"), "{}", d.message);

    // A label clashing with another partition's default is caught too.
    let d = one_error("base:\n  tarball: {path: x.tar}\nlabels:\n  root_a: gemin-root-b\n");
    assert_eq!((d.line, d.key.as_str()), (4, "labels.root_a"));
    assert!(d.message.contains("also the name of `root_b`"), "{}", d.message);

    let d = one_error("base:\n  tarball: {path: x.tar}\nlabels:\n  roota: x\n");
    assert_eq!(d.key, "labels.roota");
    assert!(d.hint.as_deref().unwrap_or_default().contains("root_a"), "{:?}", d.hint);
}

#[test]
fn the_upgrade_output_needs_a_version_and_a_version_is_a_plain_name() {
    let spec = parse("version: 1.4.0+site.2\nbase: {tarball: {path: a.tar}}\noutputs: [raw, upgrade]\n").unwrap();
    assert_eq!(spec.version.as_deref(), Some("1.4.0+site.2"));
    assert_eq!(spec.outputs, vec![OutputFormat::Raw, OutputFormat::Upgrade]);

    let d = one_error("base: {tarball: {path: a.tar}}\noutputs: [raw, upgrade]\n");
    assert_eq!((d.line, d.key.as_str()), (2, "outputs"));
    assert!(d.message.contains("needs the image's `version`"), "{}", d.message);

    let d = one_error("version: 1.0 beta\nbase: {tarball: {path: a.tar}}\n");
    assert_eq!((d.line, d.key.as_str(), d.message.as_str()), (1, "version", "`1.0 beta` is not a version"));
}
