//! Enabling systemd units inside the image, as `systemctl enable` would:
//! a symlink in `<target>.wants/` (or `.requires/`) for every `WantedBy=`
//! (`RequiredBy=`) of the unit's `[Install]` section. No tool runs inside the
//! image, so this works for any base and without root.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where unit files are looked up, first match wins (as systemd does).
const UNIT_DIRS: &[&str] = &["etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"];

/// The `[Install]` targets of a unit file: (`wants` or `requires`, target).
pub fn install_targets(text: &str) -> Vec<(&'static str, String)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            section = line;
            continue;
        }
        if section != "[Install]" {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let kind = match key.trim() {
            "WantedBy" => "wants",
            "RequiredBy" => "requires",
            _ => continue,
        };
        out.extend(value.split_whitespace().map(|t| (kind, t.to_string())));
    }
    out
}

fn find_unit(root: &Path, unit: &str) -> Option<(PathBuf, String)> {
    UNIT_DIRS.iter().map(|d| (root.join(d).join(unit), format!("/{d}/{unit}"))).find(|(p, _)| p.is_file())
}

/// Enable `units` under `root`; returns the links created (inside the image).
pub fn enable_units(root: &Path, units: &[String]) -> anyhow::Result<Vec<String>> {
    let mut links = Vec::new();
    for unit in units {
        let (path, in_image) = find_unit(root, unit).with_context(|| {
            format!("cannot enable {unit}: no such unit file in {} of the image", UNIT_DIRS.join(", "))
        })?;
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let targets = install_targets(&text);
        anyhow::ensure!(
            !targets.is_empty(),
            "cannot enable {unit}: it has no WantedBy= or RequiredBy= in its [Install] section"
        );
        for (kind, target) in targets {
            let dir = root.join("etc/systemd/system").join(format!("{target}.{kind}"));
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let link = dir.join(unit);
            if fs::symlink_metadata(&link).is_ok() {
                fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
            }
            symlink(&in_image, &link).with_context(|| format!("creating {}", link.display()))?;
            links.push(format!("/etc/systemd/system/{target}.{kind}/{unit} -> {in_image}"));
        }
    }
    Ok(links)
}

/// Disable `units` under `root` as `systemctl disable` would: remove their
/// links from every `*.wants/` and `*.requires/` directory of
/// `/etc/systemd/system`. Returns the links removed.
pub fn disable_units(root: &Path, units: &[String]) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    if units.is_empty() {
        return Ok(removed);
    }
    let etc = root.join("etc/systemd/system");
    let Ok(entries) = fs::read_dir(&etc) else { return Ok(removed) };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.extension().is_some_and(|x| x == "wants" || x == "requires"))
        .collect();
    dirs.sort();
    for dir in dirs {
        for unit in units {
            let link = dir.join(unit);
            if fs::symlink_metadata(&link).is_ok() {
                fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
                removed.push(format!("/{}", link.strip_prefix(root).unwrap_or(&link).display()));
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_enabled_like_systemctl_does() {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("etc/systemd/system");
        fs::create_dir_all(&units).unwrap();
        fs::write(
            units.join("a.service"),
            "[Unit]\nDescription=WantedBy=not-this\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\nRequiredBy=x.target y.target\n",
        )
        .unwrap();
        fs::write(units.join("b.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
        let links = enable_units(dir.path(), &["a.service".to_string()]).unwrap();
        assert_eq!(links.len(), 3);
        let link = units.join("multi-user.target.wants/a.service");
        assert_eq!(fs::read_link(link).unwrap(), Path::new("/etc/systemd/system/a.service"));
        assert!(units.join("y.target.requires/a.service").is_symlink());
        let err = enable_units(dir.path(), &["b.service".to_string()]).unwrap_err().to_string();
        assert!(err.contains("no WantedBy="), "{err}");
        let err = enable_units(dir.path(), &["c.service".to_string()]).unwrap_err().to_string();
        assert!(err.contains("no such unit file"), "{err}");
        let removed = disable_units(dir.path(), &["a.service".to_string()]).unwrap();
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(!units.join("multi-user.target.wants/a.service").exists());
    }
}
