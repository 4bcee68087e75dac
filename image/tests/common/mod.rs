//! Shared by the image integration tests.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use gemin_image::cache::sha256_file;

/// (path, mode, uid, gid, kind+content) for every entry below `root`.
pub fn describe(root: &Path) -> Vec<(String, u32, u32, u32, String)> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, u32, u32, u32, String)>) {
        let mut children: Vec<_> = fs::read_dir(root.join(rel)).unwrap().map(|e| e.unwrap().file_name()).collect();
        children.sort();
        for name in children {
            let rel = rel.join(name);
            let path = root.join(&rel);
            let m = fs::symlink_metadata(&path).unwrap();
            let what = if m.is_dir() {
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if m.is_file() {
                format!("file {}", sha256_file(&path).unwrap())
            } else {
                "special".to_string()
            };
            out.push((rel.display().to_string(), m.mode() & 0o7777, m.uid(), m.gid(), what));
            if m.is_dir() {
                walk(root, &rel, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}
