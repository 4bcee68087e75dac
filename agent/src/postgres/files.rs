//! Writing the rendered configuration into a data directory, owned by the
//! server's OS user.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{Gid, Uid, User, chown};

use super::render::{self, ServerRole};
use super::settings::Settings;
use super::{PgError, Result};

/// The OS account the server runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// Look up `name` in the user database.
    pub fn lookup(name: &str) -> Result<Owner> {
        match User::from_name(name) {
            Ok(Some(u)) => Ok(Owner { uid: u.uid.as_raw(), gid: u.gid.as_raw() }),
            Ok(None) => Err(PgError::NoUser { user: name.to_string() }),
            Err(source) => Err(PgError::UserLookup { user: name.to_string(), source }),
        }
    }

    pub fn chown(&self, path: &Path) -> Result<()> {
        chown(path, Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid))).map_err(|source| PgError::Os {
            action: "changing owner",
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Whether `data_dir` holds a PostgreSQL cluster.
pub fn has_cluster(data_dir: &Path) -> bool {
    data_dir.join("PG_VERSION").is_file()
}

/// Whether `dir` is missing or empty.
pub fn is_empty_or_missing(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(PgError::Io { action: "reading directory", path: dir.to_path_buf(), source }),
    }
}

/// Create `dir` (and missing parents) with `mode`, owned by `owner`. An
/// existing directory gets the mode and owner too.
pub fn ensure_dir(dir: &Path, mode: u32, owner: Owner) -> Result<()> {
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir).map_err(|source| PgError::Io {
        action: "creating directory",
        path: dir.to_path_buf(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|source| PgError::Io {
        action: "setting permissions",
        path: dir.to_path_buf(),
        source,
    })?;
    owner.chown(dir)
}

/// Atomically write `contents` to `path` (mode 0600) owned by `owner`.
pub fn write_owned(path: &Path, contents: &str, owner: Owner) -> Result<()> {
    crate::fsutil::write_atomic(path, contents.as_bytes(), 0o600)
        .map_err(|e| PgError::Write { path: path.to_path_buf(), source: e.into() })?;
    owner.chown(path)
}

/// Copy the cluster CA, the node's certificate and its key into
/// [`Settings::tls_dir`] (0700, every file 0600, owned by `owner`): the
/// server's `ssl_*_file`s and the `sslrootcert=` of the tools run as the
/// OS user. Rewritten before every start, so a re-issued certificate is
/// picked up.
pub fn write_tls(settings: &Settings, owner: Owner) -> Result<()> {
    let dir = settings.tls_dir();
    if let Some(parent) = dir.parent()
        && !parent.is_dir()
    {
        ensure_dir(parent, 0o755, owner)?;
    }
    ensure_dir(&dir, 0o700, owner)?;
    let tls = &settings.tls;
    for (key, value, file) in [
        ("tls.ca", &tls.ca, super::settings::CA_FILE),
        ("tls.cert", &tls.cert, super::settings::CERT_FILE),
        ("tls.key", &tls.key, super::settings::KEY_FILE),
    ] {
        let pem = crate::config::Tls::resolve(value).map_err(|source| PgError::TlsMaterial { key, source })?;
        write_owned(&dir.join(file), &pem, owner)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(PgError::Io { action: "reading", path: path.to_path_buf(), source }),
    }
}

/// Write every file geminik8s owns in the data directory for `role`: the
/// include file (and its line in `postgresql.conf`), `pg_hba.conf`,
/// `pg_ident.conf`, `postgresql.auto.conf` without settings copied from the
/// other node, and `standby.signal` exactly when `role` is standby.
pub fn write_config(settings: &Settings, role: ServerRole, owner: Owner) -> Result<()> {
    let data = &settings.data_dir;
    write_owned(&data.join(render::INCLUDE_FILE), &render::render_conf(settings, role), owner)?;

    let main_conf = data.join("postgresql.conf");
    if let Some(updated) = render::ensure_include(&read(&main_conf)?) {
        write_owned(&main_conf, &updated, owner)?;
    }

    let auto_conf = data.join("postgresql.auto.conf");
    let auto = read(&auto_conf)?;
    let stripped = render::strip_settings(&auto, render::OWNED_AUTO_SETTINGS);
    if stripped != auto {
        write_owned(&auto_conf, &stripped, owner)?;
    }

    write_owned(&data.join("pg_hba.conf"), &render::render_hba(settings), owner)?;
    write_owned(&data.join("pg_ident.conf"), &render::render_ident(&settings.os_user), owner)?;

    let signal = data.join("standby.signal");
    match role {
        ServerRole::Standby => write_owned(&signal, "", owner)?,
        ServerRole::Primary => match fs::remove_file(&signal) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(PgError::Io { action: "removing standby.signal", path: signal, source }),
        },
    }
    Ok(())
}
