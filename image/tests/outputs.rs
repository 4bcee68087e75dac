//! The outputs without a Debian base: reproducible tarballs, an OCI archive
//! that reads back as the same tree, and a whole build from a tarball base
//! (artifacts, overlay, cloud-config, users, layout, manifest, warm re-run).

mod common;
use common::describe;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use gemin_image::build::{BuildOptions, build};
use gemin_image::cache::{Cache, sha256_file};
use gemin_image::oci::{layout, unpack};
use gemin_image::output::{write_oci_archive, write_rootfs_tar};
use gemin_image::progress::Progress;
use gemin_image::spec::{ImageSpec, Platform};

fn small_tree(root: &Path) {
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("etc/app")).unwrap();
    fs::write(root.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
    symlink("../usr/bin/tool", root.join("etc/app/link")).unwrap();
    fs::write(root.join("etc/app/conf"), "x = 1\n").unwrap();
    let deep = root.join("opt/".to_string() + &"long-directory-name/".repeat(8));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("file-with-a-long-path"), "deep\n").unwrap();
    nix::unistd::mkfifo(&root.join("etc/app/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn tarballs_are_byte_identical_and_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    small_tree(&tree);
    let a = write_rootfs_tar(&tree, 1_000_000, &dir.path().join("a.tar")).unwrap().0;
    // Touch everything: a rebuild of the same content at another time.
    let later = dir.path().join("later");
    fs::create_dir(&later).unwrap();
    for entry in fs::read_dir(&tree).unwrap() {
        let entry = entry.unwrap();
        fs::rename(entry.path(), later.join(entry.file_name())).unwrap();
    }
    let b = write_rootfs_tar(&later, 1_000_000, &dir.path().join("b.tar")).unwrap().0;
    assert_eq!(a.sha256, b.sha256, "same tree and epoch, same bytes");
    assert_eq!(a.sha256, sha256_file(&a.path).unwrap());

    let mut archive = tar::Archive::new(fs::File::open(&a.path).unwrap());
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert!(h.mtime().unwrap() <= 1_000_000, "mtime clamped");
        assert_eq!(h.username_bytes(), Some(&b""[..]), "no user names");
        names.push(entry.path().unwrap().display().to_string());
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");
    assert!(names.iter().any(|n| n.ends_with("file-with-a-long-path")));
}

#[test]
fn the_oci_archive_reads_back_as_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    small_tree(&tree);
    let layer = write_rootfs_tar(&tree, 1_000_000, &dir.path().join("rootfs.tar")).unwrap().0;
    let labels = serde_json::json!({});
    let archive_path = dir.path().join("oci.tar");
    let archive = write_oci_archive(&layer, &Platform::host(), 1_000_000, "t:1", &labels, &archive_path).unwrap();
    let again = write_oci_archive(&layer, &Platform::host(), 1_000_000, "t:1", &labels, &dir.path().join("oci2.tar"));
    assert_eq!(archive.sha256, again.unwrap().sha256, "the archive is reproducible too");

    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let opened = layout::open_archive(&archive_path, &scratch).unwrap();
    assert!(opened.join("oci-layout").is_file());
    let image = layout::resolve(&opened, &Platform::host()).unwrap();
    assert_eq!(image.layers.len(), 1);
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    unpack::apply_layer(unpack::open_layer(&image.layers[0]).unwrap(), &back, "layer").unwrap();
    assert_eq!(describe(&back), describe(&tree));
}

fn spec_file(dir: &Path, base_tar: &Path, artifact: &Path, overlay: &Path) -> PathBuf {
    fs::write(dir.join("cc.yaml"), "#cloud-config\ngeminik8s:\n  health:\n    interval: 1s\n").unwrap();
    let text = format!(
        "name: t\nsource_date_epoch: 1700000000\nbase:\n  tarball:\n    path: {}\n\
         artifacts:\n  - name: kine\n    path: {}\n    dest: /usr/bin/kine\n    mode: 0755\n\
         overlays: [{}]\ncloud_config: cc.yaml\n\
         users:\n  - name: ops\n    ssh_authorized_keys: [\"ssh-ed25519 AAAA ops@site\"]\n\
         enable_units: [x.service]\noutputs: [rootfs-tar, oci-archive]\n",
        base_tar.display(),
        artifact.display(),
        overlay.display()
    );
    let path = dir.join("spec.yaml");
    fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_build_from_a_tarball_base_lays_everything_down_and_reruns_warm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A base with account files, built by the tarball writer itself.
    let base = d.join("base");
    fs::create_dir_all(base.join("etc")).unwrap();
    fs::create_dir_all(base.join("etc/ssh")).unwrap();
    fs::write(base.join("etc/ssh/ssh_host_ed25519_key"), "secret").unwrap();
    fs::create_dir_all(base.join("etc/ssl/private")).unwrap();
    fs::write(base.join("etc/ssl/private/ssl-cert-snakeoil.key"), "secret").unwrap();
    fs::write(
        base.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\npostgres:x:104:110::/var/lib/postgresql:/bin/sh\n",
    )
    .unwrap();
    fs::write(base.join("etc/group"), "root:x:0:\n").unwrap();
    let base_tar = d.join("base.tar");
    write_rootfs_tar(&base, 1, &base_tar).unwrap();
    let artifact = d.join("kine-bin");
    fs::write(&artifact, "kine binary").unwrap();
    let overlay = d.join("overlay");
    fs::create_dir_all(overlay.join("etc/systemd/system")).unwrap();
    fs::write(overlay.join("etc/systemd/system/x.service"), "[Install]\nWantedBy=multi-user.target\n").unwrap();
    let spec = ImageSpec::load(&spec_file(d, &base_tar, &artifact, &overlay)).unwrap();

    let cache = Cache::new(d.join("cache")).unwrap();
    let opts = BuildOptions {
        spec,
        target: d.join("out/rootfs"),
        out_dir: d.join("out"),
        source_date_epoch: 1_700_000_000,
        replace_target: true,
        refresh_base: false,
        force: false,
        tag: None,
    };
    let first = build(&opts, &cache, &Progress::quiet()).await.unwrap();
    let root = &opts.target;
    assert_eq!(fs::read_to_string(root.join("usr/bin/kine")).unwrap(), "kine binary");
    assert_eq!(fs::metadata(root.join("usr/bin/kine")).unwrap().mode() & 0o7777, 0o755);
    assert!(root.join("etc/systemd/system/x.service").is_file());
    let wants = root.join("etc/systemd/system/multi-user.target.wants/x.service");
    assert_eq!(fs::read_link(wants).unwrap(), Path::new("/etc/systemd/system/x.service"), "the unit is enabled");
    assert!(root.join("oem/00_geminik8s-default.yaml").is_file());
    assert!(fs::read_to_string(root.join("etc/passwd")).unwrap().contains("ops:x:1000:1000::/home/ops:/bin/bash"));
    assert!(root.join("home/ops/.ssh/authorized_keys").is_file());
    for dir in gemin_image::rootfs::PERSISTENT_DIRS {
        assert!(root.join(dir.trim_start_matches('/')).is_dir(), "{dir}");
    }
    assert_eq!(fs::read(root.join("etc/machine-id")).unwrap(), b"");
    assert!(!root.join("etc/ssh/ssh_host_ed25519_key").exists(), "host keys are not baked in");
    assert!(!root.join("etc/ssl/private/ssl-cert-snakeoil.key").exists(), "nor the snakeoil key");
    assert!(root.join("usr/lib/geminik8s/layout.json").is_file());
    assert_eq!(first.outputs.len(), 2);
    assert_eq!(first.artifacts[0].sha256, sha256_file(&artifact).unwrap());
    assert!(
        first.notes.iter().any(|n| n.contains("geminik8s.cluster.vip must be given per node")),
        "{:?}",
        first.notes
    );
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(opts.manifest_path()).unwrap()).unwrap();
    assert_eq!(manifest["outputs"][0]["sha256"], first.outputs[0].sha256.as_str());

    // Unchanged inputs: nothing is rebuilt.
    let mtime = fs::metadata(&first.outputs[0].path).unwrap().modified().unwrap();
    let warm = build(&opts, &cache, &Progress::quiet()).await.unwrap();
    assert_eq!(warm.outputs, first.outputs);
    assert_eq!(fs::metadata(&first.outputs[0].path).unwrap().modified().unwrap(), mtime, "outputs not rewritten");

    // A forced rebuild gives the same bytes; a changed overlay does not.
    let forced = build(&BuildOptions { force: true, ..opts.clone() }, &cache, &Progress::quiet()).await.unwrap();
    assert_eq!(forced.outputs, first.outputs);
    fs::write(overlay.join("etc/systemd/system/x.service"), "[Install]\nWantedBy=multi-user.target\n# changed\n")
        .unwrap();
    let changed = build(&opts, &cache, &Progress::quiet()).await.unwrap();
    assert_ne!(changed.outputs[0].sha256, first.outputs[0].sha256);

    // A bad default cloud-config fails the build with its position.
    fs::write(d.join("cc.yaml"), "#cloud-config\ngeminik8s:\n  helth: {}\n").unwrap();
    let err = build(&opts, &cache, &Progress::quiet()).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("cc.yaml:3:3") && text.contains("did you mean `health`"), "{text}");
}
