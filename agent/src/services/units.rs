//! The services' specs that are not owned by another module (PostgreSQL, the
//! agent itself), and the check that the unit files shipped under
//! `overlays/etc/systemd/system/` run the same command lines as the specs.
//!
//! The unit files are written by hand (they carry systemd-only settings such as
//! `Delegate=` or `Type=notify`); a test parses each one and compares
//! `ExecStart=`, `EnvironmentFile=`, `User=`, `Restart=`, `RestartSec=` and
//! `KillSignal=` with what the spec renders, so the two cannot drift.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{RestartPolicy, RunAs, ServiceSpec};

/// The service name of PostgreSQL (`geminik8s-postgres.service`).
pub const POSTGRES: &str = "postgres";
/// PostgreSQL's server binaries in the image.
pub const POSTGRES_BINDIR: &str = "/usr/lib/postgresql/15/bin";
/// The agent's command line (its unit is enabled at boot and starts the others).
pub const AGENT_ARGV: [&str; 2] = ["/usr/bin/gemin_k8s", "agent"];

/// PostgreSQL running in the foreground on `data_dir` as `run_as` (the
/// `postgres` user). Its configuration (port, socket directory, replication)
/// lives in the data directory.
pub fn postgres_spec(bindir: &Path, data_dir: &Path, run_as: RunAs, log_file: Option<PathBuf>) -> ServiceSpec {
    let mut spec = ServiceSpec::new(
        POSTGRES,
        vec![bindir.join("postgres").display().to_string(), "-D".into(), "${PGDATA}".into()],
    );
    spec.env.insert("PGDATA".into(), data_dir.display().to_string());
    spec.run_as = Some(run_as);
    spec.working_dir = Some(data_dir.to_path_buf());
    spec.log_file = log_file;
    // Fast shutdown: smart shutdown (SIGTERM) would wait for Kine's connections forever.
    spec.stop_signal = Signal::SIGINT;
    spec.stop_grace = Duration::from_secs(60);
    spec.restart = RestartPolicy { backoff: Duration::from_secs(1), ..RestartPolicy::default() };
    spec
}

/// The `postgres` user's uid and gid.
pub fn postgres_user() -> Result<RunAs, String> {
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(RunAs { uid: user.uid.as_raw(), gid: user.gid.as_raw() }),
        Ok(None) => Err("there is no `postgres` user (install PostgreSQL)".to_string()),
        Err(e) => Err(format!("looking up the `postgres` user: {e}")),
    }
}

/// A parsed unit file: `(section, key, value)` in file order.
#[derive(Debug, Clone, Default)]
pub struct UnitFile {
    pub entries: Vec<(String, String, String)>,
}

impl UnitFile {
    /// Parse systemd's unit syntax: sections, `Key=Value`, comments, and lines
    /// continued with a trailing backslash.
    pub fn parse(text: &str) -> UnitFile {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let full = std::mem::take(&mut pending);
            if full.starts_with('[') && full.ends_with(']') {
                section = full[1..full.len() - 1].to_string();
            } else if let Some((key, value)) = full.split_once('=') {
                entries.push((section.clone(), key.trim().to_string(), value.trim().to_string()));
            }
        }
        UnitFile { entries }
    }

    /// The last value of `key` in `section`.
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str())
    }

    /// `ExecStart=` split into words (double and single quotes group words).
    pub fn exec_start(&self) -> Option<Vec<String>> {
        self.get("Service", "ExecStart").map(split_words)
    }
}

fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k3s::K3sSettings;
    use crate::kine::KineSettings;

    fn overlays() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/etc/systemd/system")
    }

    fn unit(name: &str) -> UnitFile {
        let path = overlays().join(name);
        UnitFile::parse(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn specs() -> Vec<ServiceSpec> {
        let kine = KineSettings {
            binary: crate::kine::KINE_BINARY.into(),
            db_host: "10.0.0.100".parse().unwrap(),
            db_port: 5432,
            password: "pw".into(),
            listen: "127.0.0.1:2379".parse().unwrap(),
            compaction_interval: Duration::from_secs(300),
            log_file: None,
            ca: "/etc/geminik8s/ca.crt".into(),
            ca_file: "/run/geminik8s/kine-ca.crt".into(),
        };
        let k3s = K3sSettings {
            binary: crate::k3s::K3S_BINARY.into(),
            node_name: "a".into(),
            node_ip: "10.0.0.11".parse().unwrap(),
            vip: "10.0.0.100".parse().unwrap(),
            token: "t".into(),
            datastore_endpoint: "http://127.0.0.1:2379".into(),
            data_dir: "/var/lib/rancher/k3s".into(),
            config_dir: "/etc/rancher/k3s".into(),
            extra_args: Vec::new(),
            log_file: None,
        };
        let pg = postgres_spec(
            Path::new(POSTGRES_BINDIR),
            Path::new("/var/lib/postgresql/15/main"),
            RunAs { uid: 0, gid: 0 },
            None,
        );
        vec![kine.spec(), k3s.spec(), pg]
    }

    #[test]
    fn unit_files_run_what_the_specs_render() {
        for spec in specs() {
            let file = unit(&spec.unit());
            assert_eq!(file.exec_start().unwrap(), spec.argv, "{}: ExecStart", spec.unit());
            assert_eq!(
                file.get("Service", "EnvironmentFile").map(PathBuf::from),
                Some(spec.env_file()),
                "{}: EnvironmentFile",
                spec.unit()
            );
            assert_eq!(file.get("Service", "Restart"), Some(spec.restart.mode.systemd()), "{}: Restart", spec.unit());
            assert_eq!(
                file.get("Service", "RestartSec").map(|s| humantime::parse_duration(&format!("{s}s")).unwrap()),
                Some(spec.restart.backoff),
                "{}: RestartSec",
                spec.unit()
            );
            assert_eq!(
                file.get("Unit", "StartLimitBurst").map(|s| s.parse::<u32>().unwrap()),
                Some(spec.restart.burst),
                "{}: StartLimitBurst",
                spec.unit()
            );
            let kill_signal = file.get("Service", "KillSignal").unwrap_or("SIGTERM");
            assert_eq!(kill_signal, spec.stop_signal.as_str(), "{}: KillSignal", spec.unit());
            // Nothing but the agent starts these.
            assert_eq!(file.get("Install", "WantedBy"), None, "{} must not be enabled", spec.unit());
        }
    }

    #[test]
    fn postgres_runs_as_postgres() {
        let file = unit("geminik8s-postgres.service");
        assert_eq!(file.get("Service", "User"), Some("postgres"));
    }

    #[test]
    fn agent_unit_is_a_notify_service_enabled_at_boot() {
        let file = unit("geminik8s-agent.service");
        assert_eq!(file.exec_start().unwrap(), AGENT_ARGV);
        assert_eq!(file.get("Service", "Type"), Some("notify"));
        assert_eq!(file.get("Service", "Restart"), Some("always"));
        assert!(file.get("Service", "WatchdogSec").is_some());
        assert_eq!(file.get("Install", "WantedBy"), Some("multi-user.target"));
        let link = overlays().join("multi-user.target.wants/geminik8s-agent.service");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../geminik8s-agent.service"));
        // Only the agent is enabled.
        let wants: Vec<_> = std::fs::read_dir(overlays().join("multi-user.target.wants"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(wants, ["geminik8s-agent.service"]);
    }

    #[test]
    fn unit_parser_handles_continuations_comments_and_quotes() {
        let file = UnitFile::parse("# c\n[Service]\nExecStart=/bin/a \\\n  \"b c\" 'd'\n; x\nUser=u\nUser=v\n");
        assert_eq!(file.exec_start().unwrap(), ["/bin/a", "b c", "d"]);
        assert_eq!(file.get("Service", "User"), Some("v"));
    }
}
