//! Spec validation over the positioned YAML tree.

use std::path::{Path, PathBuf};

use geminik8s::config::diag::{Diagnostic, Severity, did_you_mean};
use geminik8s::config::yaml::{self, Kind, Node, Pos};
use serde_json::Value;

use super::*;

const TOP: &[&str] = &[
    "name",
    "version",
    "base",
    "packages",
    "artifacts",
    "overlays",
    "cloud_config",
    "users",
    "enable_units",
    "disable_units",
    "outputs",
    "sizes",
    "labels",
    "source_date_epoch",
];
const BASES: &[&str] = &["debian", "oci", "tarball"];
const DEBIAN: &[&str] = &["suite", "mirror", "variant", "components", "apt_cache", "exclude", "keep"];
const VARIANTS: &[&str] =
    &["extract", "custom", "essential", "apt", "required", "minbase", "buildd", "important", "standard"];
const OCI: &[&str] = &["ref", "archive", "platform", "plain_http"];
const TARBALL: &[&str] = &["path"];
const ARTIFACT: &[&str] = &["name", "url", "sha256", "path", "dest", "mode"];
const CLOUD_CONFIG: &[&str] = &["path", "dest"];
const USER: &[&str] = &["name", "uid", "groups", "shell", "ssh_authorized_keys"];
const SIZES: &[&str] = &["esp", "root", "oem", "persistent"];

pub(super) fn diag(
    source: &str,
    line: usize,
    col: usize,
    key: &str,
    message: String,
    hint: Option<String>,
) -> Diagnostic {
    Diagnostic { severity: Severity::Error, source: source.to_string(), line, col, key: key.to_string(), message, hint }
}

struct Checker<'a> {
    source: &'a str,
    dir: &'a Path,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn error(&mut self, pos: Pos, key: &str, message: impl Into<String>, hint: Option<String>) {
        self.out.push(diag(self.source, pos.line, pos.col, key, message.into(), hint));
    }

    /// The entries of a mapping; unknown keys are reported with a suggestion.
    fn map<'n>(&mut self, node: &'n Node, key: &str, allowed: &[&str]) -> Option<&'n [(String, Pos, Node)]> {
        let Kind::Map(entries) = &node.kind else {
            let hint = Some(format!("`{}` holds keys: {}", display_key(key), allowed.join(", ")));
            self.error(node.pos, key, format!("expected a mapping, found {}", node.type_name()), hint);
            return None;
        };
        for (k, pos, _) in entries {
            if !allowed.contains(&k.as_str()) {
                let hint = match did_you_mean(k, allowed.iter().copied()) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("known keys here: {}", allowed.join(", ")),
                };
                self.error(*pos, &join(key, k), format!("unknown key `{k}`"), Some(hint));
            }
        }
        Some(entries)
    }

    fn string(&mut self, node: &Node, key: &str) -> Option<String> {
        match (node.to_json(), &node.kind) {
            (Value::String(s), _) if !s.is_empty() => Some(s),
            // The text as written: a digest of digits only is not a number.
            (Value::Number(_), Kind::Scalar { text, .. }) => Some(text.clone()),
            _ => {
                self.error(node.pos, key, format!("expected a non-empty string, found {}", node.type_name()), None);
                None
            }
        }
    }

    fn bool(&mut self, node: &Node, key: &str) -> Option<bool> {
        match node.to_json() {
            Value::Bool(b) => Some(b),
            _ => {
                self.error(node.pos, key, format!("expected true or false, found {}", node.type_name()), None);
                None
            }
        }
    }

    fn uint(&mut self, node: &Node, key: &str, max: u64) -> Option<u64> {
        match node.to_json().as_u64() {
            Some(n) if n <= max => Some(n),
            _ => {
                self.error(
                    node.pos,
                    key,
                    format!("expected a whole number up to {max}, found {}", node.type_name()),
                    None,
                );
                None
            }
        }
    }

    fn strings(&mut self, node: &Node, key: &str) -> Vec<String> {
        let Kind::Seq(items) = &node.kind else {
            if node.to_json().is_null() {
                return Vec::new();
            }
            self.error(node.pos, key, format!("expected a list, found {}", node.type_name()), None);
            return Vec::new();
        };
        items.iter().enumerate().filter_map(|(i, item)| self.string(item, &format!("{key}[{i}]"))).collect()
    }

    fn path(&mut self, node: &Node, key: &str) -> Option<PathBuf> {
        let text = self.string(node, key)?;
        let path = Path::new(&text);
        Some(if path.is_absolute() { path.to_path_buf() } else { self.dir.join(path) })
    }

    /// An absolute path inside the image.
    fn image_path(&mut self, node: &Node, key: &str) -> Option<String> {
        let text = self.string(node, key)?;
        if !text.starts_with('/') || text.split('/').any(|c| c == "..") {
            let hint = Some("write an absolute path inside the image, e.g. /usr/bin/kine".to_string());
            self.error(node.pos, key, format!("`{text}` is not an absolute path inside the image"), hint);
            return None;
        }
        Some(text)
    }

    fn required<'n>(
        &mut self,
        entries: &'n [(String, Pos, Node)],
        at: Pos,
        parent: &str,
        key: &str,
    ) -> Option<&'n Node> {
        let found = get(entries, key);
        if found.is_none() {
            self.error(at, &join(parent, key), "required key is missing", None);
        }
        found
    }
}

fn get<'n>(entries: &'n [(String, Pos, Node)], key: &str) -> Option<&'n Node> {
    entries.iter().find(|(k, _, v)| k == key && !v.to_json().is_null()).map(|(_, _, v)| v)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

fn display_key(key: &str) -> &str {
    if key.is_empty() { "(top level)" } else { key }
}

/// `0755`, `755`, `0o755` or `"0755"`, read from the raw text so a plain
/// `0755` is not taken as decimal.
fn parse_mode(node: &Node) -> Option<u32> {
    let Kind::Scalar { text, .. } = &node.kind else { return None };
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

/// `512M`, `2G`, `2GiB`, `1T` or a number of bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let num: u64 = num.parse().ok()?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    num.checked_mul(1u64 << shift)
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(super) fn parse(text: &str, source: &str, dir: &Path) -> Result<ImageSpec, SpecError> {
    let root = yaml::parse(text, 0).map_err(|e| {
        SpecError(vec![diag(
            source,
            e.line,
            e.col,
            "",
            format!("invalid YAML: {}", e.message),
            Some("check indentation (spaces, not tabs) and quoting around this line".into()),
        )])
    })?;
    let mut c = Checker { source, dir, out: Vec::new() };
    let spec = check_top(&mut c, &root);
    c.out.sort_by_key(|d| (d.line, d.col));
    match spec {
        Some(spec) if c.out.is_empty() => Ok(spec),
        _ => Err(SpecError(c.out)),
    }
}

fn check_top(c: &mut Checker, root: &Node) -> Option<ImageSpec> {
    let top = c.map(root, "", TOP)?;
    let name = get(top, "name").and_then(|n| c.string(n, "name")).unwrap_or_else(|| "geminik8s".into());
    let version = get(top, "version").and_then(|n| {
        let text = c.string(n, "version")?;
        let fine = text.len() <= 64 && text.chars().all(|ch| ch.is_ascii_alphanumeric() || "._+~-".contains(ch));
        if !fine {
            let hint = Some("letters, digits and . _ + ~ -, at most 64 characters, such as 1.4.0".into());
            c.error(n.pos, "version", format!("`{text}` is not a version"), hint);
        }
        fine.then_some(text)
    });
    let base = c.required(top, root.pos, "", "base").and_then(|n| check_base(c, n));
    let packages = get(top, "packages").map(|n| c.strings(n, "packages")).unwrap_or_default();
    let mut artifacts = Vec::new();
    if let Some(node) = get(top, "artifacts") {
        match &node.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(a) = check_artifact(c, item, &format!("artifacts[{i}]")) {
                        if let Some(prev) = artifacts.iter().find(|p: &&ArtifactSpec| p.name == a.name) {
                            let hint = Some(format!("`{}` is already installed to {}", prev.name, prev.dest));
                            c.error(
                                item.pos,
                                &format!("artifacts[{i}].name"),
                                format!("duplicate artifact `{}`", a.name),
                                hint,
                            );
                        }
                        artifacts.push(a);
                    }
                }
            }
            _ => c.error(node.pos, "artifacts", format!("expected a list, found {}", node.type_name()), None),
        }
    }
    let overlays = get(top, "overlays")
        .map(|n| c.strings(n, "overlays"))
        .unwrap_or_default()
        .into_iter()
        .map(|p| if Path::new(&p).is_absolute() { PathBuf::from(p) } else { c.dir.join(p) })
        .collect();
    let cloud_config = get(top, "cloud_config").and_then(|n| check_cloud_config(c, n));
    let mut users = Vec::new();
    if let Some(node) = get(top, "users") {
        match &node.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    users.extend(check_user(c, item, &format!("users[{i}]")));
                }
            }
            _ => c.error(node.pos, "users", format!("expected a list, found {}", node.type_name()), None),
        }
    }
    let mut units = |key: &str| {
        let list = get(top, key).map(|n| c.strings(n, key)).unwrap_or_default();
        if let Some(Kind::Seq(items)) = get(top, key).map(|n| &n.kind) {
            const SUFFIXES: &[&str] = &[".service", ".socket", ".timer", ".path", ".mount", ".target"];
            for (i, (unit, item)) in list.iter().zip(items).enumerate() {
                if unit.contains('/') || !SUFFIXES.iter().any(|s| unit.ends_with(s)) {
                    let hint = Some("a unit file name such as geminik8s-agent.service".into());
                    c.error(item.pos, &format!("{key}[{i}]"), format!("`{unit}` is not a unit name"), hint);
                }
            }
        }
        list
    };
    let enable_units = units("enable_units");
    let disable_units = units("disable_units");
    let outputs = match get(top, "outputs") {
        None => vec![OutputFormat::RootfsTar],
        Some(node) => {
            let mut outputs = Vec::new();
            let names: Vec<&str> = OutputFormat::ALL.iter().map(|(n, _)| *n).collect();
            let items: Vec<&Node> = match &node.kind {
                Kind::Seq(items) => items.iter().collect(),
                _ => vec![node],
            };
            for (i, item) in items.into_iter().enumerate() {
                let key = format!("outputs[{i}]");
                let Some(text) = c.string(item, &key) else { continue };
                match OutputFormat::named(&text) {
                    Some(f) if !outputs.contains(&f) => outputs.push(f),
                    Some(_) => {}
                    None => {
                        let hint = match did_you_mean(&text, names.iter().copied()) {
                            Some(m) => format!("did you mean `{m}`?"),
                            None => format!("this builder writes: {}", names.join(", ")),
                        };
                        c.error(item.pos, &key, format!("unknown output format `{text}`"), Some(hint));
                    }
                }
            }
            outputs
        }
    };
    if let (Some(b), Some(n)) = (&base, get(top, "packages"))
        && !matches!(b, Base::Debian(_))
        && !packages.is_empty()
    {
        let hint = Some("use a `debian` base, or build the packages into the OCI image or tarball used as base".into());
        c.error(n.pos, "packages", "packages can only be installed on a `debian` base", hint);
    }
    if version.is_none()
        && outputs.contains(&OutputFormat::Upgrade)
        && let Some(node) = get(top, "outputs")
    {
        let hint = Some("add `version: 1.0.0` (any version name): a node compares it with the one it runs".into());
        c.error(node.pos, "outputs", "the upgrade output needs the image's `version`", hint);
    }
    let sizes = get(top, "sizes").map(|n| check_sizes(c, n)).unwrap_or_default();
    let labels = get(top, "labels").map(|n| check_labels(c, n)).unwrap_or_default();
    let source_date_epoch = get(top, "source_date_epoch").and_then(|n| c.uint(n, "source_date_epoch", i64::MAX as u64));
    Some(ImageSpec {
        name,
        version,
        base: base?,
        packages,
        artifacts,
        overlays,
        cloud_config,
        users,
        enable_units,
        disable_units,
        outputs,
        sizes,
        labels,
        source_date_epoch,
    })
}

fn check_base(c: &mut Checker, node: &Node) -> Option<Base> {
    let entries = c.map(node, "base", BASES)?;
    let given: Vec<&(String, Pos, Node)> = entries.iter().filter(|(k, _, _)| BASES.contains(&k.as_str())).collect();
    match given.as_slice() {
        [] => {
            let hint = Some("add `debian: {suite: bookworm}`, `oci: {ref: ...}` or `tarball: {path: ...}`".into());
            c.error(node.pos, "base", "no base given", hint);
            None
        }
        [(kind, _, value)] => match kind.as_str() {
            "debian" => check_debian(c, value).map(Base::Debian),
            "oci" => check_oci(c, value).map(Base::Oci),
            _ => {
                let e = c.map(value, "base.tarball", TARBALL)?;
                let path =
                    c.required(e, value.pos, "base.tarball", "path").and_then(|n| c.path(n, "base.tarball.path"));
                path.map(|path| Base::Tarball { path })
            }
        },
        [_, (second, pos, _), ..] => {
            let hint = Some("an image has exactly one base; keep one of debian, oci, tarball".into());
            c.error(*pos, &format!("base.{second}"), "more than one base given", hint);
            None
        }
    }
}

fn check_debian(c: &mut Checker, node: &Node) -> Option<DebianBase> {
    let empty = Node { kind: Kind::Map(Vec::new()), pos: node.pos };
    let node = if node.to_json().is_null() { &empty } else { node };
    let e = c.map(node, "base.debian", DEBIAN)?;
    let suite = get(e, "suite").and_then(|n| c.string(n, "base.debian.suite")).unwrap_or_else(|| "bookworm".into());
    let mirror = get(e, "mirror")
        .and_then(|n| c.string(n, "base.debian.mirror"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    if !(mirror.starts_with("http://") || mirror.starts_with("https://") || mirror.starts_with("file:/")) {
        let pos = get(e, "mirror").map_or(node.pos, |n| n.pos);
        let hint = Some("write a URL such as http://deb.debian.org/debian".into());
        c.error(pos, "base.debian.mirror", format!("`{mirror}` is not an http(s) or file URL"), hint);
    }
    let variant =
        get(e, "variant").and_then(|n| c.string(n, "base.debian.variant")).unwrap_or_else(|| "minbase".into());
    if !VARIANTS.contains(&variant.as_str()) {
        let pos = get(e, "variant").map_or(node.pos, |n| n.pos);
        let hint = match did_you_mean(&variant, VARIANTS.iter().copied()) {
            Some(m) => format!("did you mean `{m}`?"),
            None => format!("mmdebstrap variants: {}", VARIANTS.join(", ")),
        };
        c.error(pos, "base.debian.variant", format!("unknown variant `{variant}`"), Some(hint));
    }
    let components = get(e, "components").map(|n| c.strings(n, "base.debian.components")).unwrap_or_default();
    let components = if components.is_empty() { vec!["main".to_string()] } else { components };
    let apt_cache = get(e, "apt_cache").and_then(|n| c.path(n, "base.debian.apt_cache"));
    let mut globs = |key: &str| {
        let full = format!("base.debian.{key}");
        let list = get(e, key).map(|n| c.strings(n, &full)).unwrap_or_default();
        if let Some(Kind::Seq(items)) = get(e, key).map(|n| &n.kind) {
            for (i, (glob, item)) in list.iter().zip(items).enumerate() {
                if !glob.starts_with('/') {
                    let hint = Some("dpkg path filters are absolute globs, e.g. /usr/share/doc/*".into());
                    c.error(item.pos, &format!("{full}[{i}]"), format!("`{glob}` is not an absolute path"), hint);
                }
            }
        }
        list
    };
    let exclude = globs("exclude");
    let keep = globs("keep");
    Some(DebianBase { suite, mirror, variant, components, apt_cache, exclude, keep })
}

fn check_oci(c: &mut Checker, node: &Node) -> Option<OciBase> {
    let e = c.map(node, "base.oci", OCI)?;
    let source = match (get(e, "ref"), get(e, "archive")) {
        (Some(r), None) => {
            let reference = c.string(r, "base.oci.ref")?;
            let plain_http = get(e, "plain_http").and_then(|n| c.bool(n, "base.oci.plain_http")).unwrap_or(false);
            if let Err(message) = crate::oci::Reference::parse(&reference) {
                let hint = Some("write registry/repository:tag, e.g. docker.io/library/debian:bookworm".into());
                c.error(r.pos, "base.oci.ref", message, hint);
            }
            OciSource::Registry { reference, plain_http }
        }
        (None, Some(a)) => OciSource::Archive { path: c.path(a, "base.oci.archive")? },
        (Some(_), Some(a)) => {
            c.error(a.pos, "base.oci.archive", "`ref` and `archive` are both given", Some("keep one of them".into()));
            return None;
        }
        (None, None) => {
            let hint = Some("give `ref: registry/repository:tag` or `archive: path/to/image.tar`".into());
            c.error(node.pos, "base.oci", "neither `ref` nor `archive` is given", hint);
            return None;
        }
    };
    let platform = match get(e, "platform") {
        None => Platform::host(),
        Some(n) => {
            let text = c.string(n, "base.oci.platform")?;
            let parts: Vec<&str> = text.split('/').collect();
            match parts.as_slice() {
                [os, arch] if !os.is_empty() && !arch.is_empty() => {
                    Platform { os: os.to_string(), architecture: arch.to_string(), variant: None }
                }
                [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
                    Platform { os: os.to_string(), architecture: arch.to_string(), variant: Some(v.to_string()) }
                }
                _ => {
                    let hint = Some("write os/arch[/variant], e.g. linux/amd64 or linux/arm/v7".into());
                    c.error(n.pos, "base.oci.platform", format!("`{text}` is not a platform"), hint);
                    return None;
                }
            }
        }
    };
    Some(OciBase { source, platform })
}

fn check_artifact(c: &mut Checker, node: &Node, key: &str) -> Option<ArtifactSpec> {
    let e = c.map(node, key, ARTIFACT)?;
    let name = c.required(e, node.pos, key, "name").and_then(|n| c.string(n, &join(key, "name")));
    let sha256 = get(e, "sha256").and_then(|n| {
        let s = c.string(n, &join(key, "sha256"))?;
        let s = s.strip_prefix("sha256:").unwrap_or(&s).to_ascii_lowercase();
        if is_sha256(&s) {
            Some(s)
        } else {
            let hint = Some("64 hex digits, as printed by `sha256sum FILE`".into());
            c.error(n.pos, &join(key, "sha256"), "not a sha256 digest", hint);
            None
        }
    });
    let source = match (get(e, "url"), get(e, "path")) {
        (Some(u), None) => {
            let url = c.string(u, &join(key, "url"))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                c.error(u.pos, &join(key, "url"), format!("`{url}` is not an http(s) URL"), None);
            }
            match sha256 {
                Some(sha256) => ArtifactSource::Url { url, sha256 },
                None if get(e, "sha256").is_some() => return None,
                None => {
                    let hint = Some("downloads are verified: add `sha256:` (from `sha256sum FILE`)".into());
                    c.error(node.pos, &join(key, "sha256"), "required key is missing", hint);
                    return None;
                }
            }
        }
        (None, Some(p)) => ArtifactSource::Path { path: c.path(p, &join(key, "path"))?, sha256 },
        (Some(_), Some(p)) => {
            c.error(p.pos, &join(key, "path"), "`url` and `path` are both given", Some("keep one of them".into()));
            return None;
        }
        (None, None) => {
            let hint = Some("give `url:` with `sha256:`, or `path:` to a local file".into());
            c.error(node.pos, key, "neither `url` nor `path` is given", hint);
            return None;
        }
    };
    let dest = c.required(e, node.pos, key, "dest").and_then(|n| c.image_path(n, &join(key, "dest")));
    let mode = match get(e, "mode") {
        None => Some(0o755),
        Some(n) => {
            let mode = parse_mode(n);
            if mode.is_none() {
                let hint = Some("an octal mode such as 0755 or 0644".into());
                c.error(n.pos, &join(key, "mode"), "not a file mode", hint);
            }
            mode
        }
    };
    Some(ArtifactSpec { name: name?, source, dest: dest?, mode: mode? })
}

fn check_cloud_config(c: &mut Checker, node: &Node) -> Option<CloudConfigSpec> {
    if let Kind::Scalar { .. } = node.kind {
        let path = c.path(node, "cloud_config")?;
        return Some(CloudConfigSpec { path, dest: DEFAULT_CLOUD_CONFIG_DEST.into() });
    }
    let e = c.map(node, "cloud_config", CLOUD_CONFIG)?;
    let path = c.required(e, node.pos, "cloud_config", "path").and_then(|n| c.path(n, "cloud_config.path"));
    let dest = match get(e, "dest") {
        Some(n) => c.image_path(n, "cloud_config.dest"),
        None => Some(DEFAULT_CLOUD_CONFIG_DEST.into()),
    };
    Some(CloudConfigSpec { path: path?, dest: dest? })
}

fn check_user(c: &mut Checker, node: &Node, key: &str) -> Option<User> {
    let e = c.map(node, key, USER)?;
    let name = c.required(e, node.pos, key, "name").and_then(|n| c.string(n, &join(key, "name")));
    if let (Some(name), Some(n)) = (&name, get(e, "name")) {
        let valid = name.len() <= 32
            && name.starts_with(|ch: char| ch.is_ascii_lowercase() || ch == '_')
            && name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-');
        if !valid {
            let hint = Some("lower-case letters, digits, `_` and `-`, starting with a letter".into());
            c.error(n.pos, &join(key, "name"), format!("`{name}` is not a valid user name"), hint);
        }
    }
    let uid = get(e, "uid").and_then(|n| c.uint(n, &join(key, "uid"), 65_533)).map(|u| u as u32);
    let groups = get(e, "groups").map(|n| c.strings(n, &join(key, "groups"))).unwrap_or_default();
    let shell =
        get(e, "shell").and_then(|n| c.image_path(n, &join(key, "shell"))).unwrap_or_else(|| "/bin/bash".into());
    let ssh_authorized_keys =
        get(e, "ssh_authorized_keys").map(|n| c.strings(n, &join(key, "ssh_authorized_keys"))).unwrap_or_default();
    if let Some(keys) = get(e, "ssh_authorized_keys")
        && let Kind::Seq(items) = &keys.kind
    {
        for (i, item) in items.iter().enumerate() {
            let text = item.to_json();
            let text = text.as_str().unwrap_or_default();
            let is_key = ["ssh-", "ecdsa-", "sk-"].iter().any(|p| text.starts_with(p));
            if !text.is_empty() && !is_key {
                let hint = Some("paste a public key line such as `ssh-ed25519 AAAA... comment`".into());
                c.error(item.pos, &format!("{key}.ssh_authorized_keys[{i}]"), "not an SSH public key", hint);
            }
        }
    }
    Some(User { name: name?, uid, groups, shell, ssh_authorized_keys })
}

/// GPT partition names: what the boot script, fstab and the installer find
/// the partitions by.
fn check_labels(c: &mut Checker, node: &Node) -> Labels {
    let keys: Vec<&str> = Labels::DEFAULTS.iter().map(|(k, _)| *k).collect();
    let Some(e) = c.map(node, "labels", &keys) else { return Labels::default() };
    let mut labels = Labels::default();
    let mut given = Vec::new();
    for (key, _, n) in e {
        if !keys.contains(&key.as_str()) {
            continue; // reported by `map`
        }
        let Some(text) = c.string(n, &format!("labels.{key}")) else { continue };
        let valid = !text.is_empty()
            && text.len() <= 36
            && text.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
        if !valid {
            let hint = Some("1 to 36 characters: letters, digits, `-`, `_`, `.`".into());
            c.error(n.pos, &format!("labels.{key}"), format!("`{text}` is not a usable partition name"), hint);
            continue;
        }
        labels.set(key, text);
        given.push((key.as_str(), n.pos));
    }
    let resolved = labels.resolved();
    for (key, pos) in given {
        let mine = labels.get(key);
        if let Some((other, _)) = resolved.iter().find(|(k, v)| *k != key && *v == mine) {
            let hint = Some("every partition needs its own name".into());
            c.error(pos, &format!("labels.{key}"), format!("`{mine}` is also the name of `{other}`"), hint);
        }
    }
    labels
}

fn check_sizes(c: &mut Checker, node: &Node) -> Sizes {
    let Some(e) = c.map(node, "sizes", SIZES) else { return Sizes::default() };
    let mut size = |key: &str| {
        let n = get(e, key)?;
        let text = match n.to_json() {
            Value::Number(num) => num.to_string(),
            Value::String(s) => s,
            _ => String::new(),
        };
        let parsed = parse_size(&text).filter(|s| *s > 0);
        if parsed.is_none() {
            let hint = Some("a size such as 512M, 2G or 8GiB".into());
            c.error(n.pos, &format!("sizes.{key}"), format!("`{text}` is not a size"), hint);
        }
        parsed
    };
    Sizes { esp: size("esp"), root: size("root"), oem: size("oem"), persistent: size("persistent") }
}
