use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layers").join(name)
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn apply(root: &Path, name: &str) -> LayerStats {
    let path = fixture(name);
    apply_layer(open_layer(&path).unwrap(), root, name).unwrap()
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    apply(root, "layer1.tar");
    assert_eq!(read(root, "etc/gone.conf"), "gone\n");
    let stats = apply(root, "layer2.tar.gz");
    assert_eq!((stats.whiteouts, stats.opaque_dirs), (2, 1));

    // `.wh.gone.conf` deleted the file, its neighbour stays.
    assert!(!root.join("etc/gone.conf").exists());
    assert_eq!(read(root, "etc/keep.conf"), "keep\n");
    // `.wh.dir` deleted a whole directory.
    assert!(!root.join("srv/dir").exists());
    assert!(root.join("srv").is_dir());
    // The opaque marker emptied opt/app of the lower layer but kept what
    // this layer wrote before it.
    let mut app: Vec<String> =
        fs::read_dir(root.join("opt/app")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    app.sort();
    assert_eq!(app, ["new"]);
    // No marker files end up in the tree.
    assert!(!root.join("opt/app/.wh..wh..opq").exists() && !root.join("etc/.wh.gone.conf").exists());
    // A file replaced by a directory, a replaced file, a hard link, a symlink.
    assert_eq!(read(root, "var/x/inner"), "inner\n");
    assert_eq!(read(root, "usr/bin/tool"), "#!/bin/sh\necho v2\n");
    let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
    let tool2 = fs::metadata(root.join("usr/bin/tool2")).unwrap();
    assert_eq!(tool.ino(), tool2.ino(), "tool2 is a hard link to tool");
    assert_eq!(tool.mode() & 0o7777, 0o755);
    assert_eq!(fs::read_link(root.join("usr/bin/tool-link")).unwrap(), Path::new("tool"));
    assert_eq!(tool.mtime(), 1_704_067_200);
}

#[test]
fn ownership_and_modes_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    apply(root, "layer1.tar");
    let secret = fs::metadata(root.join("home/user/file")).unwrap();
    assert_eq!(secret.mode() & 0o7777, 0o600);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((secret.uid(), secret.gid()), (1000, 1000));
    } else {
        eprintln!("SKIPPED ownership check: needs root to chown");
    }
}

#[test]
fn entries_escaping_the_root_are_refused() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    // set_path refuses `..`, so write the name bytes directly.
    header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
    header.set_cksum();
    builder.append(&header, &b"x"[..]).unwrap();
    let bytes = builder.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let err = apply_layer(&bytes[..], &root, "evil").unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
    assert!(!dir.path().join("escape").exists());
}
