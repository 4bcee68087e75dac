//! How an `s3://` destination is reached: the options given on the
//! command line, then the standard AWS environment variables, and the
//! credentials file.

use std::path::{Path as FsPath, PathBuf};

use crate::backup::manifest::is_plain_name;
use crate::backup::{BackupError, Result, io};

/// The region when none is given or set in the environment.
pub const DEFAULT_REGION: &str = "us-east-1";

/// How to reach an S3-compatible server, as given on the command line.
/// What is not given comes from the standard AWS environment variables:
/// `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `http(s)://host[:port]` of the server (default: AWS's for the region).
    pub endpoint: Option<String>,
    /// The region (default [`DEFAULT_REGION`]).
    pub region: Option<String>,
    /// A credentials file (see [`Credentials::parse`]).
    pub credentials: Option<PathBuf>,
}

/// An access key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Credentials {
    /// A credentials file: `KEY = VALUE` lines with `access_key_id`,
    /// `secret_access_key` and optionally `session_token` (the `aws_` prefix
    /// and upper case are accepted too, so `AWS_ACCESS_KEY_ID=...` lines
    /// work). Blank lines and lines starting with `#` or `;` are skipped.
    /// With `[section]` headers (an AWS shared credentials file), only the
    /// lines before the first header and those of `[default]` are read.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let (mut id, mut secret, mut token) = (None, None, None);
        let mut in_default = true;
        let mut sections = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let section = section.trim();
                in_default = section == "default";
                sections.push(section.to_string());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {} is not KEY = VALUE", n + 1));
            };
            if !in_default {
                continue;
            }
            let key = key.trim().to_ascii_lowercase();
            let value = Some(value.trim().to_string()).filter(|v| !v.is_empty());
            match key.strip_prefix("aws_").unwrap_or(&key) {
                "access_key_id" => id = value,
                "secret_access_key" => secret = value,
                "session_token" => token = value,
                _ => {}
            }
        }
        let missing: Vec<&str> = [("access_key_id", id.is_none()), ("secret_access_key", secret.is_none())]
            .into_iter()
            .filter_map(|(key, missing)| missing.then_some(key))
            .collect();
        match (id, secret) {
            (Some(access_key_id), Some(secret_access_key)) => {
                Ok(Credentials { access_key_id, secret_access_key, session_token: token })
            }
            _ if !sections.is_empty() && !sections.iter().any(|s| s == "default") => {
                Err(format!("it has no [default] section (sections: {}) and no keys before them", sections.join(", ")))
            }
            _ => Err(format!("it has no {} line", missing.join(" and no "))),
        }
    }
}

/// `--s3-endpoint`: an `http://` or `https://` URL, without a trailing slash.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    match url.split_once("://") {
        Some(("http" | "https", host)) if !host.is_empty() => Ok(url.to_string()),
        _ => Err(format!("{text:?} is not an http:// or https:// URL (such as https://s3.example.net:9000)")),
    }
}

/// The bucket and the prefix's segments of `s3://BUCKET/PREFIX`.
pub(crate) fn parse_destination(dest: &str) -> Result<(String, Vec<String>)> {
    let refused = |detail: &str| BackupError::Refused {
        what: format!("destination {dest}"),
        detail: format!("{detail}; an S3 destination is s3://BUCKET or s3://BUCKET/PREFIX"),
    };
    let rest = dest.strip_prefix("s3://").ok_or_else(|| refused("not an s3:// URL"))?;
    let rest = rest.trim_end_matches('/');
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || !bucket.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        return Err(refused(&format!("{bucket:?} is not a bucket name")));
    }
    let mut segments = Vec::new();
    for segment in prefix.split('/').filter(|_| !prefix.is_empty()) {
        if !is_plain_name(segment) {
            return Err(refused(&format!("the prefix {prefix:?} has an empty, `.` or `..` part")));
        }
        segments.push(segment.to_string());
    }
    Ok((bucket.to_string(), segments))
}

/// Everything needed to reach a destination, resolved from the options and
/// the environment (`env` looks a variable up: the process's, or a test's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    pub bucket: String,
    pub prefix: Vec<String>,
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: Credentials,
    /// Where the credentials came from, for errors.
    pub credentials_from: String,
}

const HOW_TO_GIVE_CREDENTIALS: &str = "give --s3-credentials FILE (lines `access_key_id = ...` and \
     `secret_access_key = ...`) or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY";

impl Settings {
    pub(super) fn resolve(dest: &str, opts: &S3Options, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let (bucket, prefix) = parse_destination(dest)?;
        let endpoint = match (&opts.endpoint, env("AWS_ENDPOINT_URL")) {
            (Some(given), _) => Some((given.clone(), "--s3-endpoint")),
            (None, Some(set)) => Some((set, "AWS_ENDPOINT_URL")),
            (None, None) => None,
        };
        let endpoint = endpoint
            .map(|(url, from)| {
                parse_endpoint(&url).map_err(|detail| BackupError::Refused { what: format!("{from} {url}"), detail })
            })
            .transpose()?;
        let region = opts
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let (credentials, credentials_from) = match &opts.credentials {
            Some(file) => (read_credentials(file)?, format!("the file {}", file.display())),
            None => (env_credentials(dest, &env)?, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".to_string()),
        };
        Ok(Settings { bucket, prefix, endpoint, region, credentials, credentials_from })
    }
}

fn read_credentials(file: &FsPath) -> Result<Credentials> {
    let text = std::fs::read_to_string(file).map_err(io("reading the S3 credentials file (--s3-credentials)", file))?;
    Credentials::parse(&text).map_err(|e| BackupError::Refused {
        what: format!("the S3 credentials file {}", file.display()),
        detail: format!(
            "{e}; it needs the lines `access_key_id = ...` and `secret_access_key = ...` (see docs/backup.md)"
        ),
    })
}

fn env_credentials(dest: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Credentials> {
    let refused = |detail: String| BackupError::Refused { what: format!("S3 credentials for {dest}"), detail };
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => {
            Ok(Credentials { access_key_id, secret_access_key, session_token: env("AWS_SESSION_TOKEN") })
        }
        (Some(_), None) => Err(refused(format!(
            "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; set both, or {HOW_TO_GIVE_CREDENTIALS}"
        ))),
        (None, Some(_)) => Err(refused(format!(
            "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set both, or {HOW_TO_GIVE_CREDENTIALS}"
        ))),
        (None, None) => Err(refused(format!("none given: {HOW_TO_GIVE_CREDENTIALS}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    fn creds(id: &str, secret: &str) -> Credentials {
        Credentials { access_key_id: id.into(), secret_access_key: secret.into(), session_token: None }
    }

    #[test]
    fn credentials_files_are_key_value_lines_or_the_default_section_of_an_aws_file() {
        let plain = "# lab server\naccess_key_id = AKIA1\nsecret_access_key=s3cr3t=\n";
        assert_eq!(Credentials::parse(plain).unwrap(), creds("AKIA1", "s3cr3t="), "a value may hold '='");
        let env_style = "AWS_ACCESS_KEY_ID=AKIA2\nAWS_SECRET_ACCESS_KEY=x\nAWS_SESSION_TOKEN=t\n";
        let parsed = Credentials::parse(env_style).unwrap();
        assert_eq!((parsed.access_key_id.as_str(), parsed.session_token.as_deref()), ("AKIA2", Some("t")));
        let aws = "[prod]\naws_access_key_id = P\naws_secret_access_key = p\n\n[default]\n\
                   aws_access_key_id = D\naws_secret_access_key = d\nregion = eu-west-1\n";
        assert_eq!(Credentials::parse(aws).unwrap(), creds("D", "d"), "only [default] is read");
    }

    #[test]
    fn a_credentials_file_missing_a_key_says_which() {
        assert_eq!(Credentials::parse("access_key_id = A\n").unwrap_err(), "it has no secret_access_key line");
        assert_eq!(
            Credentials::parse("access_key_id = A\nsecret_access_key =\n").unwrap_err(),
            "it has no secret_access_key line",
            "an empty value is missing"
        );
        assert_eq!(Credentials::parse("").unwrap_err(), "it has no access_key_id and no secret_access_key line");
        assert!(Credentials::parse("[prod]\naws_access_key_id = P\n").unwrap_err().contains("no [default] section"));
        assert_eq!(Credentials::parse("access_key_id A\n").unwrap_err(), "line 1 is not KEY = VALUE");
        let shown = format!("{:?}", creds("AKIA1", "s3cr3t"));
        assert!(shown.contains("AKIA1") && !shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn options_come_first_then_the_environment() {
        let vars = [
            ("AWS_ACCESS_KEY_ID", "E"),
            ("AWS_SECRET_ACCESS_KEY", "e"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/"),
            ("AWS_REGION", "eu-central-1"),
        ];
        let s = Settings::resolve("s3://lab/site/backups/", &S3Options::default(), &env(&vars)).unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.join("/")), ("lab", "site/backups".to_string()));
        assert_eq!((s.endpoint.as_deref(), s.region.as_str()), (Some("http://127.0.0.1:9000"), "eu-central-1"));
        assert_eq!(s.credentials, creds("E", "e"));

        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("s3.creds");
        std::fs::write(&file, "access_key_id = F\nsecret_access_key = f\n").unwrap();
        let opts = S3Options {
            endpoint: Some("https://s3.example.net".into()),
            region: Some("lab".into()),
            credentials: Some(file.clone()),
        };
        let s = Settings::resolve("s3://lab", &opts, &env(&vars)).unwrap();
        assert_eq!((s.endpoint.as_deref(), s.region.as_str()), (Some("https://s3.example.net"), "lab"));
        assert_eq!((s.credentials, s.prefix.len()), (creds("F", "f"), 0));
        assert!(s.credentials_from.contains("s3.creds"));

        let s = Settings::resolve("s3://lab/x", &S3Options::default(), &env(&vars[..2])).unwrap();
        assert_eq!((s.endpoint, s.region.as_str()), (None, DEFAULT_REGION));
    }

    #[test]
    fn missing_or_bad_settings_say_what_to_do() {
        let err = |dest: &str, opts: &S3Options, vars: &[(&str, &str)]| {
            Settings::resolve(dest, opts, &env(vars)).unwrap_err().to_string()
        };
        let none = S3Options::default();
        let e = err("s3://lab/b", &none, &[]);
        assert!(e.contains("--s3-credentials FILE") && e.contains("AWS_ACCESS_KEY_ID"), "{e}");
        let e = err("s3://lab/b", &none, &[("AWS_ACCESS_KEY_ID", "A"), ("AWS_SECRET_ACCESS_KEY", " ")]);
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not"), "{e}");
        let missing = S3Options { credentials: Some("/nonexistent/s3.creds".into()), ..S3Options::default() };
        let e = err("s3://lab/b", &missing, &[]);
        assert!(e.contains("reading the S3 credentials file") && e.contains("/nonexistent/s3.creds"), "{e}");
        let keys = [("AWS_ACCESS_KEY_ID", "A"), ("AWS_SECRET_ACCESS_KEY", "a")];
        let ftp = S3Options { endpoint: Some("ftp://host".into()), ..S3Options::default() };
        assert!(err("s3://lab/b", &ftp, &keys).contains("not an http:// or https:// URL"));
        assert!(
            err("s3://lab/b", &none, &[("AWS_ENDPOINT_URL", "host:9000"), keys[0], keys[1]])
                .contains("AWS_ENDPOINT_URL")
        );
        for dest in ["s3://", "s3:///prefix", "s3://lab/a/../b", "s3://lab//b", "s3://la b/x"] {
            assert!(err(dest, &none, &keys).contains("an S3 destination is s3://BUCKET"), "{dest}");
        }
    }
}
