//! Running external tools (pg_basebackup, pg_rewind, mmdebstrap, qemu-img...).
//!
//! Every tool goes through [`Tool`], so a failure always says which command
//! ran, how it ended, and the tail of what it printed on stderr.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// How many trailing stderr lines an error carries.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}){}", tail_suffix(stderr_tail))]
    Failed { command: String, status: String, stderr_tail: String },
    #[error("`{command}` did not finish within {timeout:?} and was killed{}", tail_suffix(stderr_tail))]
    TimedOut { command: String, timeout: Duration, stderr_tail: String },
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() { String::new() } else { format!(":\n{tail}") }
}

/// The last `n` non-empty lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// A command line to run: program, arguments, environment, working
/// directory, optional user and timeout.
#[derive(Debug, Clone)]
pub struct Tool {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    uid_gid: Option<(u32, u32)>,
    timeout: Option<Duration>,
    stdin: Option<Vec<u8>>,
    stdin_file: Option<PathBuf>,
}

impl Tool {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Tool {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            uid_gid: None,
            timeout: None,
            stdin: None,
            stdin_file: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Run as this user and group (the caller must be root).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid_gid = Some((uid, gid));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// Feed this file to the tool's standard input (for inputs too large
    /// to hold in memory).
    pub fn stdin_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.stdin_file = Some(path.into());
        self
    }

    /// The command line as a person would type it (for errors and logs).
    pub fn display(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run to completion; a non-zero exit is an error carrying the stderr tail.
    pub async fn run(&self) -> Result<Output, CmdError> {
        use tokio::io::AsyncWriteExt;

        let command = self.display();
        let stdin = match (&self.stdin, &self.stdin_file) {
            (Some(_), _) => Stdio::piped(),
            (None, Some(path)) => Stdio::from(
                std::fs::File::open(path)
                    .map_err(|source| CmdError::Spawn { command: format!("{command} < {}", path.display()), source })?,
            ),
            (None, None) => Stdio::null(),
        };
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some((uid, gid)) = self.uid_gid {
            cmd.uid(uid).gid(gid);
        }
        tracing::debug!(%command, "running");
        let mut child = cmd.spawn().map_err(|source| CmdError::Spawn { command: command.clone(), source })?;
        if let (Some(input), Some(mut pipe)) = (self.stdin.clone(), child.stdin.take()) {
            // A tool that exits without reading its input is judged by its exit status below.
            if let Err(e) = pipe.write_all(&input).await {
                tracing::debug!(%command, error = %e, "tool did not read all of its input");
            }
        }
        let wait = child.wait_with_output();
        let output = match self.timeout {
            None => wait.await,
            Some(limit) => match tokio::time::timeout(limit, wait).await {
                Ok(result) => result,
                Err(_) => {
                    // kill_on_drop ended the child when the future was dropped.
                    return Err(CmdError::TimedOut { command, timeout: limit, stderr_tail: String::new() });
                }
            },
        }
        .map_err(|source| CmdError::Spawn { command: command.clone(), source })?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if output.status.success() {
            Ok(Output { stdout, stderr })
        } else {
            Err(CmdError::Failed {
                command,
                status: describe_status(output.status),
                stderr_tail: tail(&stderr, STDERR_TAIL_LINES),
            })
        }
    }
}

/// A tool started with its standard output as a stream for the caller to
/// read (`pg_basebackup -D -`), its standard error collected in the
/// background for the error. Blocking: use it from a blocking thread.
pub struct Streaming {
    command: String,
    child: std::process::Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Tool {
    /// Start the tool with its standard output piped to the caller (see
    /// [`Streaming`]). The timeout is not applied: the caller reads at its
    /// own pace and ends the tool with [`Streaming::kill`].
    pub fn spawn_streaming(&self) -> Result<(Streaming, std::process::ChildStdout), CmdError> {
        use std::io::Read as _;
        use std::os::unix::process::CommandExt as _;

        let command = self.display();
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some((uid, gid)) = self.uid_gid {
            cmd.uid(uid).gid(gid);
        }
        tracing::debug!(%command, "running, streaming its output");
        let mut child = cmd.spawn().map_err(|source| CmdError::Spawn { command: command.clone(), source })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                // What could be read is what the error shows.
                if let Err(e) = pipe.read_to_end(&mut bytes) {
                    tracing::debug!(error = %e, "reading a tool's stderr");
                }
                String::from_utf8_lossy(&bytes).into_owned()
            })
        });
        Ok((Streaming { command, child, stderr }, stdout))
    }
}

impl Streaming {
    /// The command line (for errors and logs).
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Wait for the tool to exit; a non-zero exit is an error carrying the
    /// stderr tail. Returns what it printed on stderr.
    pub fn wait(mut self) -> Result<String, CmdError> {
        let status = self.child.wait().map_err(|source| CmdError::Spawn { command: self.command.clone(), source })?;
        let stderr = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
        if status.success() {
            Ok(stderr)
        } else {
            Err(CmdError::Failed {
                command: self.command,
                status: describe_status(status),
                stderr_tail: tail(&stderr, STDERR_TAIL_LINES),
            })
        }
    }

    /// End the tool (the reader gave up) and reap it.
    pub fn kill(mut self) {
        if let Err(e) = self.child.kill() {
            tracing::debug!(command = %self.command, error = %e, "killing a tool that may have exited");
        }
        if let Err(e) = self.child.wait() {
            tracing::debug!(command = %self.command, error = %e, "reaping a killed tool");
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

/// "exit code 2" or "killed by signal 9".
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_carries_command_status_and_stderr_tail() {
        let err = Tool::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]).run().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`sh -c"), "{text}");
        assert!(text.contains("exit code 3"), "{text}");
        assert!(text.ends_with("one\ntwo"), "{text}");
    }

    #[tokio::test]
    async fn success_returns_output_and_feeds_stdin() {
        let out = Tool::new("cat").stdin("hello").run().await.unwrap();
        assert_eq!(out.stdout, "hello");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = Tool::new("/nonexistent/tool").run().await.unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }), "{err}");
    }

    #[tokio::test]
    async fn timeout_kills_the_command() {
        let err = Tool::new("sleep").arg("30").timeout(Duration::from_millis(100)).run().await.unwrap_err();
        assert!(matches!(err, CmdError::TimedOut { .. }), "{err}");
    }

    #[test]
    fn streaming_output_is_read_and_failure_carries_the_stderr_tail() {
        use std::io::Read as _;
        let (child, mut out) = Tool::new("sh").args(["-c", "printf data; echo oops >&2"]).spawn_streaming().unwrap();
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert_eq!(text, "data");
        assert_eq!(child.wait().unwrap(), "oops\n");
        let (child, _out) = Tool::new("sh").args(["-c", "echo broken >&2; exit 4"]).spawn_streaming().unwrap();
        let text = child.wait().unwrap_err().to_string();
        assert!(text.contains("exit code 4") && text.ends_with("broken"), "{text}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b\nc");
    }
}
