//! Encryption keys for backups, with age (age-encryption.org/v1).
//!
//! Backups are encrypted to age X25519 *recipients*: the node holds only
//! public keys (`age1...`), so a stolen node cannot read its own backups.
//! Restoring takes the matching *identity* (`AGE-SECRET-KEY-1...`), kept
//! off the node. A passphrase (age's scrypt recipient) is the alternative
//! for small sites; it must then be on the node while backing up.
//!
//! `--encryption-key` accepts `age1...` (a recipient), `passphrase:FILE`
//! (the first line of FILE), or FILE (recipients, one a line, `#` comments).
//! `--identity` accepts FILE (identities, as `age-keygen` or
//! `gemin_k8s backup keygen` writes them) or `passphrase:FILE`.

use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use age::x25519;

use super::manifest::{Encryption, EncryptionKind};
use super::{BackupError, Result};

const PASSPHRASE_PREFIX: &str = "passphrase:";

/// What new backups are encrypted to.
pub enum Keys {
    None,
    Recipients(Vec<x25519::Recipient>),
    Passphrase(SecretString),
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keys::None => f.write_str("None"),
            Keys::Recipients(r) => f.debug_tuple("Recipients").field(r).finish(),
            Keys::Passphrase(_) => f.write_str("Passphrase(<hidden>)"),
        }
    }
}

impl Keys {
    /// Parse `--encryption-key` values (see the module documentation).
    pub fn parse(values: &[String]) -> Result<Keys> {
        let mut recipients = Vec::new();
        let mut passphrase = None;
        for value in values {
            if let Some(file) = value.strip_prefix(PASSPHRASE_PREFIX) {
                passphrase = Some(read_passphrase(Path::new(file))?);
            } else if value.starts_with("age1") {
                recipients.push(parse_recipient(value, "--encryption-key")?);
            } else if value.starts_with("AGE-SECRET-KEY-") {
                return Err(BackupError::Key(
                    "--encryption-key was given a secret key (AGE-SECRET-KEY-...): give its public key (age1...), \
                     which `gemin_k8s backup keygen` prints; the secret key stays off the node"
                        .into(),
                ));
            } else {
                recipients.extend(read_recipients(Path::new(value))?);
            }
        }
        match (recipients.is_empty(), passphrase) {
            (true, None) => Ok(Keys::None),
            (true, Some(p)) => Ok(Keys::Passphrase(p)),
            (false, None) => Ok(Keys::Recipients(recipients)),
            (false, Some(_)) => Err(BackupError::Key(
                "--encryption-key: age cannot encrypt to a passphrase and to recipients at once; give one or the other"
                    .into(),
            )),
        }
    }

    /// The manifest's (public) description of these keys.
    pub fn describe(&self) -> Encryption {
        match self {
            Keys::None => Encryption { kind: EncryptionKind::None, recipients: Vec::new() },
            Keys::Recipients(r) => {
                Encryption { kind: EncryptionKind::AgeX25519, recipients: r.iter().map(|r| r.to_string()).collect() }
            }
            Keys::Passphrase(_) => Encryption { kind: EncryptionKind::AgePassphrase, recipients: Vec::new() },
        }
    }

    /// Wrap `output` so that what is written to it is encrypted; `None`
    /// when there is no key.
    pub fn encryptor(&self) -> Result<Option<age::Encryptor>> {
        match self {
            Keys::None => Ok(None),
            Keys::Recipients(r) => {
                let encryptor = age::Encryptor::with_recipients(r.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(|e| BackupError::Key(format!("setting up encryption: {e}")))?;
                Ok(Some(encryptor))
            }
            Keys::Passphrase(p) => Ok(Some(age::Encryptor::with_user_passphrase(p.clone()))),
        }
    }
}

fn parse_recipient(text: &str, origin: &str) -> Result<x25519::Recipient> {
    x25519::Recipient::from_str(text)
        .map_err(|e| BackupError::Key(format!("{origin}: {text:?} is not an age X25519 recipient (age1...): {e}")))
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        BackupError::Key(format!(
            "reading the {what} file {}: {e}; give an age1... recipient, passphrase:FILE or a readable file",
            path.display()
        ))
    })
}

/// A recipients file: `age1...` lines, `#` comments and blank lines.
fn read_recipients(path: &Path) -> Result<Vec<x25519::Recipient>> {
    let text = read_text(path, "recipients")?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("AGE-SECRET-KEY-") {
            return Err(BackupError::Key(format!(
                "{} line {}: this is a secret key; --encryption-key takes public keys (age1...), the secret key stays off the node",
                path.display(),
                n + 1
            )));
        }
        out.push(parse_recipient(line, &format!("{} line {}", path.display(), n + 1))?);
    }
    if out.is_empty() {
        return Err(BackupError::Key(format!("{} holds no age1... recipient", path.display())));
    }
    Ok(out)
}

fn read_passphrase(path: &Path) -> Result<SecretString> {
    let text = read_text(path, "passphrase")?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(BackupError::Key(format!("the passphrase file {} is empty", path.display())));
    }
    Ok(SecretString::from(line))
}

/// What can decrypt backups: X25519 identities and passphrases, and where
/// they came from (for errors).
#[derive(Default)]
pub struct Identities {
    x25519: Vec<x25519::Identity>,
    passphrases: Vec<SecretString>,
    sources: Vec<String>,
}

impl Identities {
    /// Parse `--identity` values (see the module documentation).
    pub fn load(values: &[String]) -> Result<Identities> {
        let mut ids = Identities::default();
        for value in values {
            if let Some(file) = value.strip_prefix(PASSPHRASE_PREFIX) {
                ids.passphrases.push(read_passphrase(Path::new(file))?);
                ids.sources.push(value.clone());
                continue;
            }
            let path = Path::new(value);
            let text = read_text(path, "identity")?;
            let mut found = 0;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let id = x25519::Identity::from_str(line).map_err(|e| {
                    BackupError::Key(format!(
                        "{} line {}: not an age identity (AGE-SECRET-KEY-1...): {e}",
                        path.display(),
                        n + 1
                    ))
                })?;
                ids.x25519.push(id);
                found += 1;
            }
            if found == 0 {
                return Err(BackupError::Key(format!("{} holds no AGE-SECRET-KEY-1... identity", path.display())));
            }
            ids.sources.push(value.clone());
        }
        Ok(ids)
    }

    pub fn is_empty(&self) -> bool {
        self.x25519.is_empty() && self.passphrases.is_empty()
    }

    /// The public keys of the X25519 identities (`age1...`).
    pub fn public_keys(&self) -> Vec<String> {
        self.x25519.iter().map(|i| i.to_public().to_string()).collect()
    }

    /// A reader of the plaintext of `input`, an object of a backup
    /// encrypted as `encryption` says; `object` names it in errors.
    pub fn decrypt<'a, R: Read + 'a>(
        &self,
        input: R,
        encryption: &Encryption,
        id: &str,
        object: &str,
    ) -> Result<Box<dyn Read + 'a>> {
        if encryption.kind == EncryptionKind::None {
            return Ok(Box::new(input));
        }
        if self.is_empty() {
            return Err(BackupError::Key(format!(
                "backup {id} is encrypted ({}); give --identity FILE (or --identity passphrase:FILE) to read it",
                describe_keys(encryption)
            )));
        }
        let decryptor = age::Decryptor::new(input).map_err(|e| BackupError::Corrupt {
            id: id.into(),
            object: object.into(),
            detail: format!("not a readable age file: {e}"),
        })?;
        let scrypt: Vec<age::scrypt::Identity> =
            self.passphrases.iter().map(|p| age::scrypt::Identity::new(p.clone())).collect();
        let identities =
            self.x25519.iter().map(|i| i as &dyn age::Identity).chain(scrypt.iter().map(|i| i as &dyn age::Identity));
        match decryptor.decrypt(identities) {
            Ok(reader) => Ok(Box::new(reader)),
            Err(age::DecryptError::NoMatchingKeys) | Err(age::DecryptError::DecryptionFailed) => {
                let given = if self.public_keys().is_empty() {
                    String::new()
                } else {
                    format!(" (their public keys: {})", self.public_keys().join(", "))
                };
                Err(BackupError::Key(format!(
                    "the identity given ({}){given} cannot decrypt backup {id}: it was encrypted {}; \
                     give the identity or passphrase it was encrypted to",
                    self.sources.join(", "),
                    describe_keys(encryption)
                )))
            }
            Err(e) => {
                Err(BackupError::Corrupt { id: id.into(), object: object.into(), detail: format!("decrypting: {e}") })
            }
        }
    }
}

fn describe_keys(e: &Encryption) -> String {
    match e.kind {
        EncryptionKind::None => "without encryption".into(),
        EncryptionKind::AgeX25519 => format!("to {}", e.recipients.join(", ")),
        EncryptionKind::AgePassphrase => "with a passphrase".into(),
    }
}

/// A new identity: the file's text (age-keygen's format, with the public
/// key in a comment) and its recipient.
pub fn generate_identity() -> (SecretString, String) {
    let identity = x25519::Identity::generate();
    let public = identity.to_public().to_string();
    let text = format!(
        "# created: {}\n# public key: {public}\n{}\n",
        super::now_rfc3339(),
        identity.to_string().expose_secret()
    );
    (SecretString::from(text), public)
}

/// Write a new identity to `path` (0600; refuses to overwrite) and return
/// its recipient.
pub fn write_new_identity(path: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let (text, public) = generate_identity();
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        BackupError::Io { action: "creating the identity file (it must not exist)".into(), path: path.into(), cause: e }
    })?;
    file.write_all(text.expose_secret().as_bytes()).map_err(super::io("writing", path))?;
    file.sync_all().map_err(super::io("syncing", path))?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encrypt(keys: &Keys, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = keys.encryptor().unwrap().unwrap().wrap_output(&mut out).unwrap();
        w.write_all(plain).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn recipients_encrypt_and_only_their_identities_decrypt() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key.txt");
        let public = write_new_identity(&key).unwrap();
        assert!(write_new_identity(&key).is_err(), "an identity file is never overwritten");
        let other = tmp.path().join("other.txt");
        write_new_identity(&other).unwrap();

        // A recipients file with a comment, as well as the key itself.
        let recipients = tmp.path().join("recipients.txt");
        std::fs::write(&recipients, format!("# site key\n{public}\n")).unwrap();
        for value in [public.clone(), recipients.display().to_string()] {
            let keys = Keys::parse(&[value]).unwrap();
            assert_eq!(keys.describe().recipients, std::slice::from_ref(&public));
            let sealed = encrypt(&keys, b"rows");
            let ids = Identities::load(&[key.display().to_string()]).unwrap();
            let mut plain = String::new();
            ids.decrypt(&sealed[..], &keys.describe(), "b1", "o").unwrap().read_to_string(&mut plain).unwrap();
            assert_eq!(plain, "rows");

            let wrong = Identities::load(&[other.display().to_string()]).unwrap();
            let err = wrong.decrypt(&sealed[..], &keys.describe(), "b1", "o").err().unwrap().to_string();
            assert!(err.contains("cannot decrypt backup b1") && err.contains(&public), "{err}");
            let err =
                Identities::default().decrypt(&sealed[..], &keys.describe(), "b1", "o").err().unwrap().to_string();
            assert!(err.contains("give --identity"), "{err}");
        }
    }

    #[test]
    fn secret_keys_and_mixed_keys_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key.txt");
        write_new_identity(&key).unwrap();
        let err = Keys::parse(&[key.display().to_string()]).unwrap_err().to_string();
        assert!(err.contains("secret key"), "{err}");
        let pass = tmp.path().join("pass");
        std::fs::write(&pass, "correct horse\n").unwrap();
        let public = Identities::load(&[key.display().to_string()]).unwrap().public_keys().remove(0);
        let err = Keys::parse(&[public, format!("passphrase:{}", pass.display())]).unwrap_err().to_string();
        assert!(err.contains("passphrase and to recipients at once"), "{err}");
        let err = Keys::parse(&["age1notakey".into()]).unwrap_err().to_string();
        assert!(err.contains("not an age X25519 recipient"), "{err}");
        assert!(matches!(Keys::parse(&[]).unwrap(), Keys::None));
    }
}
