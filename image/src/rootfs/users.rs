//! Users and SSH keys from the spec, written straight into the image's
//! account files (no tools run inside the image, so any base works).

use std::fs;
use std::path::Path;

use anyhow::Context;

use super::{chown, set_mode};
use crate::spec::User;

fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_lines(path: &Path, lines: &[String], mode: u32) -> anyhow::Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn field(line: &str, n: usize) -> Option<&str> {
    line.split(':').nth(n)
}

fn ids_in_use(lines: &[String]) -> Vec<u32> {
    lines.iter().filter_map(|l| field(l, 2)?.parse().ok()).collect()
}

/// Add `users` to the image under `root`: passwd, group, shadow (password
/// locked: key login only), supplementary groups, home and authorized_keys.
/// `epoch` fills the shadow "last changed" day so builds stay reproducible.
pub fn add_users(root: &Path, users: &[User], epoch: u64) -> anyhow::Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let etc = root.join("etc");
    let (passwd_p, group_p, shadow_p, gshadow_p) =
        (etc.join("passwd"), etc.join("group"), etc.join("shadow"), etc.join("gshadow"));
    let mut passwd = read_lines(&passwd_p)?;
    let mut group = read_lines(&group_p)?;
    let mut shadow = read_lines(&shadow_p)?;
    let mut gshadow = read_lines(&gshadow_p)?;
    let day = epoch / 86_400;
    for user in users {
        anyhow::ensure!(
            !passwd.iter().any(|l| field(l, 0) == Some(&user.name)),
            "user `{}` already exists in the base image; pick another name",
            user.name
        );
        let used: Vec<u32> = ids_in_use(&passwd).into_iter().chain(ids_in_use(&group)).collect();
        let uid = match user.uid {
            Some(uid) => {
                anyhow::ensure!(
                    !ids_in_use(&passwd).contains(&uid),
                    "uid {uid} of user `{}` is already taken",
                    user.name
                );
                uid
            }
            None => (1000..60_000).find(|id| !used.contains(id)).context("no free uid between 1000 and 60000")?,
        };
        let gid = if ids_in_use(&group).contains(&uid) {
            (1000..60_000).find(|id| !used.contains(id)).context("no free gid between 1000 and 60000")?
        } else {
            uid
        };
        let home = format!("/home/{}", user.name);
        passwd.push(format!("{}:x:{uid}:{gid}::{home}:{}", user.name, user.shell));
        group.push(format!("{}:x:{gid}:", user.name));
        shadow.push(format!("{}:!:{day}:0:99999:7:::", user.name));
        gshadow.push(format!("{}:!::", user.name));
        for wanted in &user.groups {
            let line = group.iter_mut().find(|l| field(l, 0) == Some(wanted.as_str())).with_context(|| {
                format!(
                    "user `{}`: group `{wanted}` does not exist in the image (add the package that creates it)",
                    user.name
                )
            })?;
            let sep = if line.ends_with(':') { "" } else { "," };
            line.push_str(&format!("{sep}{}", user.name));
            if let Some(gline) = gshadow.iter_mut().find(|l| field(l, 0) == Some(wanted.as_str())) {
                let sep = if gline.ends_with(':') { "" } else { "," };
                gline.push_str(&format!("{sep}{}", user.name));
            }
        }
        let home_dir = root.join(home.trim_start_matches('/'));
        fs::create_dir_all(&home_dir).with_context(|| format!("creating {}", home_dir.display()))?;
        set_mode(&home_dir, 0o750)?;
        chown(&home_dir, uid, gid)?;
        if !user.ssh_authorized_keys.is_empty() {
            let ssh = home_dir.join(".ssh");
            fs::create_dir_all(&ssh).with_context(|| format!("creating {}", ssh.display()))?;
            set_mode(&ssh, 0o700)?;
            chown(&ssh, uid, gid)?;
            let keys = ssh.join("authorized_keys");
            write_lines(&keys, &user.ssh_authorized_keys, 0o600)?;
            chown(&keys, uid, gid)?;
        }
    }
    write_lines(&passwd_p, &passwd, 0o644)?;
    write_lines(&group_p, &group, 0o644)?;
    write_lines(&shadow_p, &shadow, 0o640)?;
    write_lines(&gshadow_p, &gshadow, 0o640)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_get_accounts_groups_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        fs::write(etc.join("group"), "root:x:0:\nsudo:x:27:\n").unwrap();
        fs::write(etc.join("shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        fs::write(etc.join("gshadow"), "root:*::\nsudo:*::\n").unwrap();
        let user = User {
            name: "ops".into(),
            uid: None,
            groups: vec!["sudo".into()],
            shell: "/bin/bash".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3 ops@site".into()],
        };
        add_users(dir.path(), std::slice::from_ref(&user), 86_400 * 20_000).unwrap();
        let passwd = fs::read_to_string(etc.join("passwd")).unwrap();
        assert!(passwd.contains("ops:x:1000:1000::/home/ops:/bin/bash"), "{passwd}");
        assert!(fs::read_to_string(etc.join("group")).unwrap().contains("sudo:x:27:ops"));
        assert!(fs::read_to_string(etc.join("shadow")).unwrap().contains("ops:!:20000:"));
        let keys = fs::read_to_string(dir.path().join("home/ops/.ssh/authorized_keys")).unwrap();
        assert_eq!(keys, "ssh-ed25519 AAAAC3 ops@site\n");
        let err = add_users(dir.path(), &[user], 0).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }
}
