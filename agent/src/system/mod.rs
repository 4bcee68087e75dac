//! Applying the Kairos system keys of cloud-config to a root filesystem:
//! `hostname:` (else `geminik8s.node.name`), `write_files:` and `users:`.
//!
//! Order, as in cloud-init (files early, deferred files last): the hostname,
//! then `write_files` entries without `defer`, then `users`, then the
//! entries with `defer: true` (whose owner may be a user created by
//! `users:`). When a file under `/etc/systemd/network` changed on the live
//! system and systemd-networkd runs, `networkctl reload` follows.
//!
//! This is `gemin_k8s config apply`, run by `geminik8s-setup.service` at every
//! boot: the image's `/etc` and `/home` are reset at boot, so every run starts
//! from the image and each step only changes what differs. Applying into
//! another root (`--root`) edits that tree's files and runs the shadow tools
//! with `--root`; only the live system (`/`) also gets its kernel hostname set.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::config::{Loaded, kairos};

pub mod files;
pub mod hosts;
pub mod users;

/// Where and how to apply.
#[derive(Debug, Clone)]
pub struct Options {
    /// The root to apply below; `/` is the running system.
    pub root: PathBuf,
    /// Report what would change, change nothing.
    pub dry_run: bool,
}

impl Options {
    /// Whether this is the running system (kernel hostname, no `--root` for tools).
    pub fn live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `path` (absolute, on the node) below the root.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }
}

/// One change made (or, in a dry run, to be made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `hostname`, `hosts`, `kernel-hostname`, `directory`, `file`,
    /// `networkd-reload`, `group`, `user`, `password`, `ssh-dir` or
    /// `authorized-keys`.
    pub kind: &'static str,
    /// The file, user or group changed.
    pub target: String,
    pub detail: String,
}

impl Change {
    pub fn new(kind: &'static str, target: impl Into<String>, detail: impl Into<String>) -> Self {
        Change { kind, target: target.into(), detail: detail.into() }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    pub hostname: Option<String>,
    pub users: Vec<String>,
    /// Paths of the `write_files` entries, in the order written.
    pub files: Vec<String>,
    pub changes: Vec<Change>,
}

/// Apply the hostname, files and users of `loaded` below `opts.root`.
pub async fn apply(loaded: &Loaded, opts: &Options) -> anyhow::Result<Applied> {
    apply_document(&loaded.document, opts).await
}

/// [`apply`] for a merged cloud-config `document` (Kairos keys only): also
/// for a node that has no node configuration yet (waiting for enrolment).
pub async fn apply_document(document: &serde_json::Value, opts: &Options) -> anyhow::Result<Applied> {
    let mut applied = Applied { hostname: kairos::hostname(document), ..Applied::default() };
    if let Some(name) = &applied.hostname {
        let changes = hosts::apply(name, opts).with_context(|| format!("setting the hostname `{name}`"))?;
        applied.changes.extend(changes);
    }
    let (deferred, early): (Vec<_>, Vec<_>) =
        kairos::write_files(document)?.into_iter().enumerate().partition(|(_, f)| f.defer);
    write_files(&early, opts, &mut applied)?;
    for user in kairos::users(document)? {
        let changes = users::apply(&user, opts).await.with_context(|| format!("applying user `{}`", user.name))?;
        applied.changes.extend(changes);
        applied.users.push(user.name);
    }
    write_files(&deferred, opts, &mut applied)?;
    if files::touches_networkd(&applied.changes)
        && let Some(change) = files::reload_networkd(opts).await
    {
        applied.changes.push(change);
    }
    Ok(applied)
}

fn write_files(entries: &[(usize, kairos::WriteFile)], opts: &Options, applied: &mut Applied) -> anyhow::Result<()> {
    for (index, file) in entries {
        let changes =
            files::apply(file, opts).with_context(|| format!("writing `write_files[{index}]` ({})", file.path))?;
        applied.changes.extend(changes);
        applied.files.push(file.path.clone());
    }
    Ok(())
}
