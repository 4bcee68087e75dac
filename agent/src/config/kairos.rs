//! The Kairos keys geminik8s applies on the node itself: `hostname:`,
//! `users:` and `write_files:` (see [`crate::system`]). Their checks run with
//! the rest of the validation, so a bad entry is reported with its file and line.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::diag::did_you_mean;
use super::schema;
use super::validate::{LeafError, check_leaf};
use super::yaml::{Kind as NodeKind, Node, Pos};

/// One entry of `users:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    #[serde(default)]
    pub passwd: Option<String>,
    #[serde(default)]
    pub lock_passwd: bool,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub primary_group: Option<String>,
    #[serde(default)]
    pub shell: Option<String>,
    #[serde(default)]
    pub homedir: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
}

/// What `passwd:` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password<'a> {
    /// A crypt(3) hash, stored as is.
    Hash(&'a str),
    /// Plain text, hashed before it is stored.
    Plain(&'a str),
}

impl UserSpec {
    pub fn password(&self) -> Option<Password<'_>> {
        self.passwd.as_deref().map(|p| if p.starts_with('$') { Password::Hash(p) } else { Password::Plain(p) })
    }
}

/// One entry of `write_files:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    pub path: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub permissions: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub append: bool,
    #[serde(default)]
    pub defer: bool,
}

/// How `content` is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    Base64,
    Gzip,
    GzipBase64,
}

impl Encoding {
    /// cloud-init's names (`None` for an unknown one).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "" | "text/plain" => Some(Encoding::Plain),
            "b64" | "base64" => Some(Encoding::Base64),
            "gz" | "gzip" => Some(Encoding::Gzip),
            "gz+b64" | "gz+base64" | "gzip+b64" | "gzip+base64" => Some(Encoding::GzipBase64),
            _ => None,
        }
    }
}

/// The default mode of a written file.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

impl WriteFile {
    pub fn encoding(&self) -> Result<Encoding, String> {
        let name = self.encoding.as_deref().unwrap_or("");
        Encoding::parse(name).ok_or_else(|| format!("unknown encoding `{name}`"))
    }

    /// The bytes to write: `content` decoded.
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        decode(self.content.as_deref().unwrap_or(""), self.encoding()?)
    }

    /// The mode (`permissions`, default 0644).
    pub fn mode(&self) -> Result<u32, String> {
        self.permissions.as_deref().map_or(Ok(DEFAULT_FILE_MODE), parse_permissions)
    }

    /// `(user, group)` (`owner`, default `root:root`).
    pub fn owner(&self) -> Result<(String, String), String> {
        self.owner.as_deref().map_or(Ok(("root".into(), "root".into())), parse_owner)
    }
}

/// Decode standard base64 (RFC 4648; whitespace ignored, padding optional).
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::Engine::decode(&LENIENT, compact).map_err(|e| format!("not valid base64: {e}"))
}

/// `content` as bytes.
pub fn decode(content: &str, encoding: Encoding) -> Result<Vec<u8>, String> {
    let gunzip = |data: &[u8]| -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data).read_to_end(&mut out).map_err(|e| format!("not gzip data: {e}"))?;
        Ok(out)
    };
    match encoding {
        Encoding::Plain => Ok(content.as_bytes().to_vec()),
        Encoding::Base64 => decode_base64(content),
        // A YAML `!!binary` scalar arrives here as its base64 text.
        Encoding::Gzip | Encoding::GzipBase64 => match decode_base64(content) {
            Ok(bytes) => gunzip(&bytes),
            Err(e) if encoding == Encoding::GzipBase64 => Err(e),
            Err(_) => gunzip(content.as_bytes()),
        },
    }
}

/// An octal mode such as `0644`, `644` or `0o600`.
pub fn parse_permissions(text: &str) -> Result<u32, String> {
    let digits = text.trim();
    let digits = digits.strip_prefix("0o").unwrap_or(digits);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if !digits.is_empty() && mode <= 0o7777 => Ok(mode),
        _ => Err(format!("`{text}` is not an octal file mode")),
    }
}

/// `USER:GROUP`, or `USER` alone (group `root`); names or numeric IDs.
pub fn parse_owner(text: &str) -> Result<(String, String), String> {
    let (user, group) = text.split_once(':').unwrap_or((text, "root"));
    for name in [user, group] {
        if !(valid_account_name(name) || (!name.is_empty() && name.chars().all(|c| c.is_ascii_digit()))) {
            return Err(format!("`{name}` in `{text}` is not a user or group name"));
        }
    }
    Ok((user.to_string(), group.to_string()))
}

/// Why `path` cannot be written: it must be absolute, name a file and not
/// climb out of the root.
pub fn file_path_problem(path: &str) -> Option<String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        Some(format!("`{path}` is not an absolute path"))
    } else if p.components().any(|c| c == Component::ParentDir) {
        Some(format!("`{path}` contains `..`"))
    } else if path.ends_with('/') || p.file_name().is_none() {
        Some(format!("`{path}` names a directory, not a file"))
    } else {
        None
    }
}

/// The `write_files:` list of a validated document.
pub fn write_files(document: &Value) -> anyhow::Result<Vec<WriteFile>> {
    match document.get("write_files") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| anyhow::anyhow!("reading `write_files`: {e}")),
    }
}

/// The hostname to apply: `hostname:`, else `geminik8s.node.name`.
pub fn hostname(document: &Value) -> Option<String> {
    document
        .get("hostname")
        .and_then(Value::as_str)
        .or_else(|| document.pointer("/geminik8s/node/name").and_then(Value::as_str))
        .map(str::to_string)
}

/// The `users:` list of a validated document.
pub fn users(document: &Value) -> anyhow::Result<Vec<UserSpec>> {
    match document.get("users") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| anyhow::anyhow!("reading `users`: {e}")),
    }
}

/// One problem found in the Kairos keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub pos: Pos,
    pub key: String,
    pub message: String,
    pub hint: Option<String>,
}

fn finding(pos: Pos, key: impl Into<String>, message: impl Into<String>, hint: Option<String>) -> Finding {
    Finding { pos, key: key.into(), message: message.into(), hint }
}

/// Why `name` is not a hostname the kernel and resolvers accept.
pub fn hostname_problem(name: &str) -> Option<String> {
    if name.contains("{{") {
        return Some("Kairos templates are not expanded by geminik8s".into());
    }
    if name.is_empty() || name.len() > 64 {
        return Some("a hostname has 1 to 64 characters".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Some(format!("`{label}` is not a valid hostname label"));
        }
    }
    None
}

/// Whether `name` is a portable user or group name (what `useradd` accepts
/// with Debian's defaults).
pub fn valid_account_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else { return false };
    name.len() <= 32
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// cloud-init user keys geminik8s does not apply, with what to do instead.
const UNSUPPORTED_USER_KEYS: &[(&str, &str)] = &[
    ("sudo", "add the user to the `sudo` group instead: `groups: [sudo]`"),
    ("gecos", "not applied by geminik8s; remove it"),
    ("ssh_import_id", "use `ssh_authorized_keys: [github:USER]`"),
    ("system", "not applied by geminik8s; remove it"),
    ("no_create_home", "not applied by geminik8s; remove it"),
    ("inactive", "use `lock_passwd: true`"),
];

const ACCOUNT_NAME_HINT: &str =
    "lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 32 characters";

/// Check `hostname:` and `users:` of the merged document.
pub fn check(doc: &Node) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(node) = doc.get("hostname") {
        match node.to_json() {
            Value::Null => {}
            Value::String(name) => {
                if let Some(problem) = hostname_problem(&name) {
                    out.push(finding(
                        node.pos,
                        "hostname",
                        format!("`{name}`: {problem}"),
                        Some("letters, digits and `-` in dot-separated labels, e.g. `edge-a1`; or remove it to use `geminik8s.node.name`".into()),
                    ));
                }
            }
            other => out.push(finding(
                node.pos,
                "hostname",
                format!("expected a string, found {}", node.type_name()),
                Some(format!("quote the value: `hostname: \"{}\"`", other.to_string().trim_matches('"'))),
            )),
        }
    }
    if let Some(node) = doc.get("users") {
        check_users(node, &mut out);
    }
    if let Some(node) = doc.get("write_files") {
        check_write_files(node, &mut out);
    }
    out
}

/// cloud-init `write_files` keys geminik8s does not apply, with what to do instead.
const UNSUPPORTED_FILE_KEYS: &[(&str, &str)] = &[
    ("source", "remote sources are not fetched by geminik8s; put the data in `content` (with `encoding: b64`)"),
    ("mode", "the mode is written `permissions: \"0644\"`"),
    ("user", "write `owner: USER:GROUP`"),
    ("group", "write `owner: USER:GROUP`"),
];

/// A list of mappings (`users:`, `write_files:`) and the words its findings use.
struct MappingList {
    /// The top-level key.
    key: &'static str,
    /// What one entry describes: `user`, `file`.
    entry: &'static str,
    /// The key every entry starts with: `name`, `path`.
    id_key: &'static str,
    /// What to write when the value is not a list.
    list_hint: &'static str,
    /// What to write when an entry is not a mapping.
    entry_hint: &'static str,
    keys: &'static [schema::Key],
    /// cloud-init keys geminik8s does not apply, with what to do instead.
    unsupported: &'static [(&'static str, &'static str)],
}

const USER_LIST: MappingList = MappingList {
    key: "users",
    entry: "user",
    id_key: "name",
    list_hint: "one `- name: ...` entry per user",
    entry_hint: "write `- name: ops` (Kairos does not know cloud-init's `default` entry)",
    keys: schema::USER_KEYS,
    unsupported: UNSUPPORTED_USER_KEYS,
};

const FILE_LIST: MappingList = MappingList {
    key: "write_files",
    entry: "file",
    id_key: "path",
    list_hint: "one `- path: /etc/...` entry per file",
    entry_hint: "write `- path: /etc/...` followed by `content: ...`",
    keys: schema::WRITE_FILE_KEYS,
    unsupported: UNSUPPORTED_FILE_KEYS,
};

impl MappingList {
    /// Call `each` with every entry of `node` that is a mapping, with its
    /// place (`users[0]`); a finding instead for a value that is not a list
    /// (null is an empty list) and for an entry that is not a mapping.
    fn each_entry<'a>(
        &self,
        node: &'a Node,
        out: &mut Vec<Finding>,
        mut each: impl FnMut(&str, &'a Node, &'a [(String, Pos, Node)], &mut Vec<Finding>),
    ) {
        let items = match &node.kind {
            NodeKind::Seq(items) => items,
            NodeKind::Scalar { .. } if node.to_json().is_null() => return,
            _ => {
                out.push(finding(
                    node.pos,
                    self.key,
                    format!("expected a list of {}s, found {}", self.entry, node.type_name()),
                    Some(self.list_hint.into()),
                ));
                return;
            }
        };
        for (index, item) in items.iter().enumerate() {
            let at = format!("{}[{index}]", self.key);
            match &item.kind {
                NodeKind::Map(entries) => each(&at, item, entries, out),
                _ => out.push(finding(
                    item.pos,
                    at,
                    format!("expected a mapping with `{}:`, found {}", self.id_key, item.type_name()),
                    Some(self.entry_hint.into()),
                )),
            }
        }
    }

    /// Check the keys of the entry at `at`: an unknown key gets a finding
    /// with what to do instead, a close known key or the list of known keys;
    /// `problem` checks the value of a known key. Whether anything was found.
    fn check_keys(
        &self,
        at: &str,
        entries: &[(String, Pos, Node)],
        out: &mut Vec<Finding>,
        problem: impl Fn(&str, &schema::Key, &Node) -> Option<LeafError>,
    ) -> bool {
        let mut bad = false;
        for (key, key_pos, value) in entries {
            let path = format!("{at}.{key}");
            let found = match self.keys.iter().find(|k| k.path == key) {
                Some(spec) => problem(key, spec, value).map(|(message, hint)| finding(value.pos, path, message, hint)),
                None => {
                    let known = self.keys.iter().map(|k| k.path);
                    let hint = if let Some((_, instead)) = self.unsupported.iter().find(|(k, _)| k == key) {
                        instead.to_string()
                    } else if let Some(close) = did_you_mean(key, known.clone()) {
                        format!("did you mean `{close}`?")
                    } else {
                        format!("keys of a {}: {}", self.entry, known.collect::<Vec<_>>().join(", "))
                    };
                    Some(finding(*key_pos, path, format!("unknown key `{key}`"), Some(hint)))
                }
            };
            if let Some(found) = found {
                out.push(found);
                bad = true;
            }
        }
        bad
    }
}

fn check_write_files(node: &Node, out: &mut Vec<Finding>) {
    let mut seen = BTreeSet::new();
    FILE_LIST.each_entry(node, out, |at, item, entries, out| {
        let bad = FILE_LIST.check_keys(at, entries, out, |key, spec, value| {
            if key == "permissions"
                && let NodeKind::Scalar { text, quoted: false } = &value.kind
                && matches!(value.to_json(), Value::Number(_))
            {
                return Some((
                    format!("`{text}` is a number, not an octal mode string"),
                    Some(format!("quote it: `permissions: \"{text}\"` (YAML 1.2 reads `{text}` as a decimal number)")),
                ));
            }
            check_leaf(spec.kind, value, !spec.required).err().or_else(|| check_file_value(key, &value.to_json()))
        });
        match item.get("path").map(|n| (n, n.to_json())) {
            None => {
                out.push(finding(
                    item.pos,
                    format!("{at}.path"),
                    "required key is missing",
                    Some("every file needs an absolute `path:`".into()),
                ));
                return;
            }
            Some((n, Value::String(p))) if !seen.insert(p.clone()) => {
                out.push(finding(
                    n.pos,
                    format!("{at}.path"),
                    format!("`{p}` is listed twice"),
                    Some("merge the two entries into one (or use `append: true` in the second)".into()),
                ));
                // Appending to a file listed before is what cloud-init allows.
                if item.get("append").is_some_and(|a| a.to_json() == Value::Bool(true)) {
                    out.pop();
                }
            }
            Some(_) => {}
        }
        // The content must decode with the encoding given.
        if !bad
            && let Ok(file) = serde_json::from_value::<WriteFile>(item.to_json())
            && let Err(e) = file.bytes()
        {
            let pos = item.get("content").map_or(item.pos, |c| c.pos);
            out.push(finding(
                pos,
                format!("{at}.content"),
                format!("cannot decode the content as `{}`: {e}", file.encoding.as_deref().unwrap_or("text/plain")),
                Some(
                    "check `encoding` (e.g. `base64 -w0 FILE` for `b64`, `gzip -c FILE | base64 -w0` for `gz+b64`)"
                        .into(),
                ),
            ));
        }
    });
}

/// Checks beyond the type of one `write_files` key's value.
fn check_file_value(key: &str, value: &Value) -> Option<(String, Option<String>)> {
    let text = value.as_str()?;
    match key {
        "path" => file_path_problem(text).map(|p| {
            (p, Some("write the absolute path on the node, e.g. `/etc/systemd/network/10-lan.network`".into()))
        }),
        "permissions" => parse_permissions(text)
            .err()
            .map(|e| (e, Some("an octal mode in quotes, e.g. `\"0644\"` or `\"0600\"`".into()))),
        "owner" => parse_owner(text).err().map(|e| (e, Some("write `USER:GROUP`, e.g. `root:root`".into()))),
        _ => None,
    }
}

fn check_users(node: &Node, out: &mut Vec<Finding>) {
    let mut seen = BTreeSet::new();
    USER_LIST.each_entry(node, out, |at, item, entries, out| {
        USER_LIST.check_keys(at, entries, out, |key, spec, value| {
            check_leaf(spec.kind, value, !spec.required).err().or_else(|| check_value(key, &value.to_json()))
        });
        match item.get("name").map(|n| (n, n.to_json())) {
            None => out.push(finding(
                item.pos,
                format!("{at}.name"),
                "required key is missing",
                Some("every user needs a `name:`".into()),
            )),
            Some((n, Value::String(name))) if !seen.insert(name.clone()) => out.push(finding(
                n.pos,
                format!("{at}.name"),
                format!("user `{name}` is listed twice"),
                Some("merge the two entries into one".into()),
            )),
            Some(_) => {}
        }
    });
}

/// Checks beyond the type of one user key's value.
fn check_value(key: &str, value: &Value) -> Option<(String, Option<String>)> {
    let text = value.as_str();
    match key {
        "name" | "primary_group" => {
            let name = text?;
            (!valid_account_name(name))
                .then(|| (format!("`{name}` is not a valid account name"), Some(ACCOUNT_NAME_HINT.into())))
        }
        "groups" => value
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .find(|g| !valid_account_name(g))
            .map(|g| (format!("`{g}` is not a valid group name"), Some(ACCOUNT_NAME_HINT.into()))),
        "passwd" => {
            let p = text?;
            if p.is_empty() {
                Some((
                    "the password is empty".into(),
                    Some("remove `passwd` to leave password login off (SSH keys only)".into()),
                ))
            } else if p.contains(['\n', '\r']) {
                Some(("the password spans several lines".into(), None))
            } else if p.starts_with('$') && (p.split('$').count() < 4 || p.contains(':')) {
                Some((
                    "this looks like a crypt hash but is not one".into(),
                    Some("paste the whole hash (`$6$SALT$HASH`, e.g. from `openssl passwd -6`), or plain text that does not start with `$`".into()),
                ))
            } else {
                None
            }
        }
        "ssh_authorized_keys" => {
            for (i, entry) in value.as_array()?.iter().filter_map(Value::as_str).enumerate() {
                if let Some(user) = entry.strip_prefix("github:").or_else(|| entry.strip_prefix("gitlab:")) {
                    if user.is_empty() || user.contains(['/', ' ']) {
                        return Some((format!("entry {}: `{entry}` names no account", i + 1), None));
                    }
                } else if entry.trim().is_empty() || entry.contains('\n') {
                    return Some((
                        format!("entry {} is not one public key", i + 1),
                        Some("one key per entry: `ssh-ed25519 AAAA... comment`".into()),
                    ));
                } else if entry.split_whitespace().count() < 2 {
                    return Some((
                        format!("entry {}: `{entry}` is not a public key", i + 1),
                        Some("a key reads `TYPE BASE64 [comment]`, or write `github:USER`".into()),
                    ));
                }
            }
            None
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::yaml;

    fn findings(text: &str) -> Vec<Finding> {
        check(&yaml::parse(text, 0).unwrap())
    }

    #[test]
    fn a_kairos_user_list_parses_into_specs() {
        let doc = yaml::parse(
            "users:\n- name: ops\n  passwd: secret\n  groups: [sudo, adm]\n  ssh_authorized_keys:\n  - ssh-ed25519 AAAA ops@site\n  shell: /bin/bash\n- name: root\n  passwd: $6$salt$hash\n  lock_passwd: true\n",
            0,
        )
        .unwrap();
        assert!(check(&doc).is_empty(), "{:?}", check(&doc));
        let users = users(&doc.to_json()).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].password(), Some(Password::Plain("secret")));
        assert_eq!(users[0].groups, ["sudo", "adm"]);
        assert_eq!(users[0].shell.as_deref(), Some("/bin/bash"));
        assert_eq!(users[1].password(), Some(Password::Hash("$6$salt$hash")));
        assert!(users[1].lock_passwd);
        assert!(users[1].ssh_authorized_keys.is_empty());
    }

    #[test]
    fn hostname_falls_back_to_the_node_name() {
        assert_eq!(hostname(&json!({"hostname": "h1", "geminik8s": {"node": {"name": "a"}}})).as_deref(), Some("h1"));
        assert_eq!(hostname(&json!({"geminik8s": {"node": {"name": "a"}}})).as_deref(), Some("a"));
        assert_eq!(hostname(&json!({})), None);
    }

    #[test]
    fn bad_entries_are_positioned_with_hints() {
        let f = findings("users:\n- name: Ops\n  pasword: x\n- name: b\n  groups: wheel\n  sudo: ALL\n");
        let summary: Vec<(usize, &str, &str)> =
            f.iter().map(|f| (f.pos.line, f.key.as_str(), f.message.as_str())).collect();
        assert_eq!(
            summary,
            [
                (2, "users[0].name", "`Ops` is not a valid account name"),
                (3, "users[0].pasword", "unknown key `pasword`"),
                (5, "users[1].groups", "expected a list, found the string `wheel`"),
                (6, "users[1].sudo", "unknown key `sudo`"),
            ]
        );
        assert_eq!(f[1].hint.as_deref(), Some("did you mean `passwd`?"));
        assert!(f[3].hint.as_deref().unwrap().contains("groups: [sudo]"));
    }

    #[test]
    fn missing_and_duplicate_names_and_bad_keys() {
        let f = findings("users:\n- passwd: x\n- name: a\n- name: a\n  ssh_authorized_keys: [AAAA]\n");
        let keys: Vec<&str> = f.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["users[0].name", "users[2].ssh_authorized_keys", "users[2].name"], "{f:?}");
        assert!(findings("users: ops\n")[0].message.contains("expected a list of users"));
        assert!(findings("users:\n- default\n")[0].message.contains("expected a mapping"));
        assert!(findings("users:\n- name: a\n  passwd: $6$x\n")[0].message.contains("crypt hash"));
    }

    #[test]
    fn hostnames_are_checked() {
        assert_eq!(hostname_problem("edge-a1.example.org"), None);
        assert!(hostname_problem("-bad").is_some());
        assert!(hostname_problem("a_b").is_some());
        assert!(hostname_problem(&"a".repeat(65)).is_some());
        assert!(hostname_problem("kairos-{{ trunc 4 .MachineID }}").unwrap().contains("templates"));
        let f = findings("hostname: 'no spaces'\n");
        assert_eq!((f[0].pos.line, f[0].key.as_str()), (1, "hostname"));
        assert_eq!(findings("hostname: 12\n")[0].message, "expected a string, found a number");
    }

    #[test]
    fn base64_decodes_rfc4648_vectors() {
        for (plain, encoded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(decode_base64(encoded).unwrap(), plain.as_bytes(), "{encoded}");
        }
        assert_eq!(decode_base64("Zm9v\nYmFy\n").unwrap(), b"foobar");
        assert_eq!(decode_base64("Zg").unwrap(), b"f", "padding is optional");
        for bad in ["Zm9v!", "Zg==Zg", "Z", "Zh=="] {
            assert!(decode_base64(bad).unwrap_err().starts_with("not valid base64"), "{bad}");
        }
    }

    #[test]
    fn contents_decode_by_encoding() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"[Match]\nName=eth0\n").unwrap();
        let gz = gz.finish().unwrap();
        let gz_b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &gz);
        assert_eq!(decode("a: b\n", Encoding::Plain).unwrap(), b"a: b\n");
        assert_eq!(decode("aGk=", Encoding::Base64).unwrap(), b"hi");
        assert_eq!(decode(&gz_b64, Encoding::GzipBase64).unwrap(), b"[Match]\nName=eth0\n");
        // `encoding: gzip` with `!!binary` content arrives as base64 text.
        assert_eq!(decode(&gz_b64, Encoding::Gzip).unwrap(), b"[Match]\nName=eth0\n");
        assert!(decode("aGk=", Encoding::GzipBase64).unwrap_err().contains("not gzip"));
        for (name, enc) in
            [("b64", Encoding::Base64), ("BASE64", Encoding::Base64), ("gzip+base64", Encoding::GzipBase64)]
        {
            assert_eq!(Encoding::parse(name), Some(enc), "{name}");
        }
        assert_eq!(Encoding::parse("text/plain"), Some(Encoding::Plain));
        assert_eq!(Encoding::parse("uuencode"), None);
        // Every name the schema documents parses.
        for name in schema::FILE_ENCODINGS {
            assert!(Encoding::parse(name).is_some(), "{name}");
        }
    }

    #[test]
    fn permissions_owners_and_paths_parse() {
        assert_eq!(parse_permissions("0644"), Ok(0o644));
        assert_eq!(parse_permissions("600"), Ok(0o600));
        assert_eq!(parse_permissions("0o4755"), Ok(0o4755));
        for bad in ["", "0x1a4", "rw-r--r--", "0888", "17777"] {
            assert!(parse_permissions(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_owner("root:root"), Ok(("root".into(), "root".into())));
        assert_eq!(parse_owner("ops"), Ok(("ops".into(), "root".into())));
        assert_eq!(parse_owner("1000:1000"), Ok(("1000".into(), "1000".into())));
        assert!(parse_owner("ops:").is_err());
        assert!(parse_owner("Ops:x y").is_err());
        assert_eq!(file_path_problem("/etc/systemd/network/10-lan.network"), None);
        assert!(file_path_problem("etc/motd").unwrap().contains("not an absolute path"));
        assert!(file_path_problem("/etc/../../x").unwrap().contains("`..`"));
        assert!(file_path_problem("/etc/").unwrap().contains("directory"));
        let f = WriteFile { path: "/x".into(), ..WriteFile::default() };
        assert_eq!((f.mode(), f.owner(), f.bytes()), (Ok(0o644), Ok(("root".into(), "root".into())), Ok(Vec::new())));
    }

    #[test]
    fn a_write_files_list_parses_into_specs() {
        let doc = yaml::parse(
            "write_files:\n- path: /etc/systemd/network/10-lab.network\n  permissions: \"0644\"\n  owner: root:root\n  content: |\n    [Match]\n    Name=eth0\n- path: /etc/motd\n  encoding: b64\n  content: aGk=\n  append: true\n  defer: true\n",
            0,
        )
        .unwrap();
        assert!(check(&doc).is_empty(), "{:?}", check(&doc));
        let files = write_files(&doc.to_json()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].bytes().unwrap(), b"[Match]\nName=eth0\n");
        assert_eq!(files[1].bytes().unwrap(), b"hi");
        assert!(files[1].append && files[1].defer);
    }

    #[test]
    fn bad_write_files_are_positioned_with_hints() {
        let f = findings(
            "write_files:\n- path: etc/motd\n- path: /a\n  permissions: 0644\n- path: /b\n  permissions: \"rw\"\n  contnet: x\n- path: /c\n  encoding: b64\n  content: \"!!\"\n- content: x\n- path: /a\n  source: {uri: http://x}\n",
        );
        let summary: Vec<(usize, &str, &str)> =
            f.iter().map(|f| (f.pos.line, f.key.as_str(), f.message.as_str())).collect();
        assert_eq!(
            summary,
            [
                (2, "write_files[0].path", "`etc/motd` is not an absolute path"),
                (4, "write_files[1].permissions", "`0644` is a number, not an octal mode string"),
                (6, "write_files[2].permissions", "`rw` is not an octal file mode"),
                (7, "write_files[2].contnet", "unknown key `contnet`"),
                (
                    10,
                    "write_files[3].content",
                    "cannot decode the content as `b64`: not valid base64: Invalid symbol 33, offset 0."
                ),
                (11, "write_files[4].path", "required key is missing"),
                (13, "write_files[5].source", "unknown key `source`"),
                (12, "write_files[5].path", "`/a` is listed twice"),
            ],
            "{f:#?}"
        );
        assert!(f[1].hint.as_deref().unwrap().contains("permissions: \"0644\""));
        assert_eq!(f[3].hint.as_deref(), Some("did you mean `content`?"));
        assert!(f[6].hint.as_deref().unwrap().contains("put the data in `content`"));
        assert!(findings("write_files: /etc/motd\n")[0].message.contains("expected a list of files"));
        assert!(findings("write_files:\n- path: /a\n- path: /a\n  append: true\n").is_empty());
    }

    #[test]
    fn account_names() {
        for ok in ["ops", "_svc", "a-b_c1"] {
            assert!(valid_account_name(ok), "{ok}");
        }
        for bad in ["", "1ops", "Ops", "a b", "a:b", &"a".repeat(33)] {
            assert!(!valid_account_name(bad), "{bad}");
        }
    }
}
