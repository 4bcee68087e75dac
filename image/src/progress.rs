//! Build progress: bars on a terminal, plain lines otherwise, JSON events
//! (one object per line on stdout) for CI.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// indicatif bars on stderr.
    Tty,
    /// One line per event on stderr.
    Plain,
    /// One JSON object per event on stdout.
    Json,
    /// Nothing (library use, tests).
    Quiet,
}

impl Mode {
    /// JSON when asked, bars when stderr is a terminal, plain lines otherwise.
    pub fn detect(json: bool) -> Mode {
        if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Tty
        } else {
            Mode::Plain
        }
    }
}

/// What happened during a build. Field names are stable: CI parses them.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    StepStarted { step: String },
    StepFinished { step: String, skipped: bool, seconds: f64, detail: String },
    DownloadStarted { name: String, url: String, bytes: Option<u64>, resume_from: u64 },
    DownloadProgress { name: String, done: u64, total: Option<u64> },
    DownloadFinished { name: String, sha256: String, bytes: u64, cached: bool },
    Warning { message: String },
    Output { format: String, path: String, sha256: String, bytes: u64 },
}

pub struct Progress {
    mode: Mode,
    multi: Option<indicatif::MultiProgress>,
    stdout: Mutex<()>,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        let multi = (mode == Mode::Tty).then(indicatif::MultiProgress::new);
        Progress { mode, multi, stdout: Mutex::new(()) }
    }

    pub fn quiet() -> Progress {
        Progress::new(Mode::Quiet)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn emit(&self, event: Event) {
        match &event {
            Event::StepStarted { step } => tracing::debug!(step, "step started"),
            Event::StepFinished { step, skipped, seconds, .. } => {
                tracing::debug!(step, skipped, seconds, "step finished")
            }
            Event::Warning { message } => tracing::warn!("{message}"),
            _ => {}
        }
        match self.mode {
            Mode::Quiet => {}
            Mode::Json => {
                let line = serde_json::to_string(&event).expect("events serialise");
                let _guard = self.stdout.lock().unwrap_or_else(|e| e.into_inner());
                let mut out = std::io::stdout().lock();
                // A closed stdout (e.g. `| head`) must not fail the build.
                if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                    tracing::debug!(error = %e, "cannot write a progress event");
                }
            }
            Mode::Plain | Mode::Tty => {
                let Some(line) = plain_line(&event) else { return };
                match &self.multi {
                    Some(multi) => {
                        if let Err(e) = multi.println(&line) {
                            tracing::debug!(error = %e, "cannot print progress");
                        }
                    }
                    None => eprintln!("{line}"),
                }
            }
        }
    }

    /// Start a step; finish it with [`Step::done`] or [`Step::skipped`].
    pub fn step(&self, name: &str) -> Step<'_> {
        self.emit(Event::StepStarted { step: name.to_string() });
        Step { progress: self, name: name.to_string(), started: Instant::now() }
    }

    /// A byte counter for one download.
    pub fn download(&self, name: &str, url: &str, total: Option<u64>, resume_from: u64) -> Download<'_> {
        self.emit(Event::DownloadStarted { name: name.into(), url: url.into(), bytes: total, resume_from });
        let bar = self.multi.as_ref().map(|multi| {
            let bar = match total {
                Some(t) => indicatif::ProgressBar::new(t),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("template is valid")
            .progress_chars("=> ");
            let bar = multi.add(bar.with_style(style).with_prefix(name.to_string()));
            bar.set_position(resume_from);
            bar
        });
        Download { progress: self, name: name.into(), total, done: resume_from, bar, last_event: Instant::now() }
    }
}

fn plain_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::StepStarted { step } => format!("==> {step}"),
        Event::StepFinished { step, skipped: true, detail, .. } => format!("    {step}: unchanged, skipped {detail}"),
        Event::StepFinished { step, seconds, detail, .. } => format!("    {step}: done in {seconds:.1}s {detail}"),
        Event::DownloadStarted { name, url, bytes, resume_from } => {
            let size = bytes.map(|b| format!(" ({b} bytes)")).unwrap_or_default();
            let resume = if *resume_from > 0 { format!(", resuming at byte {resume_from}") } else { String::new() };
            format!("    downloading {name} from {url}{size}{resume}")
        }
        Event::DownloadProgress { .. } => return None,
        Event::DownloadFinished { name, sha256, cached: true, .. } => {
            format!("    {name}: sha256:{sha256} (from cache)")
        }
        Event::DownloadFinished { name, sha256, bytes, .. } => format!("    {name}: sha256:{sha256} ({bytes} bytes)"),
        Event::Warning { message } => format!("warning: {message}"),
        Event::Output { format, path, sha256, bytes } => {
            format!("    {format}: {path} sha256:{sha256} ({bytes} bytes)")
        }
    })
}

pub struct Step<'a> {
    progress: &'a Progress,
    name: String,
    started: Instant,
}

impl Step<'_> {
    pub fn done(self, detail: impl Into<String>) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.progress.emit(Event::StepFinished { step: self.name, skipped: false, seconds, detail: detail.into() });
    }

    pub fn skipped(self, detail: impl Into<String>) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.progress.emit(Event::StepFinished { step: self.name, skipped: true, seconds, detail: detail.into() });
    }
}

pub struct Download<'a> {
    progress: &'a Progress,
    name: String,
    total: Option<u64>,
    done: u64,
    bar: Option<indicatif::ProgressBar>,
    last_event: Instant,
}

impl Download<'_> {
    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        }
        if self.progress.mode == Mode::Json && self.last_event.elapsed() >= Duration::from_secs(1) {
            self.last_event = Instant::now();
            let event = Event::DownloadProgress { name: self.name.clone(), done: self.done, total: self.total };
            self.progress.emit(event);
        }
    }

    /// Start over from zero (the server ignored a range request).
    pub fn restart(&mut self) {
        self.done = 0;
        if let Some(bar) = &self.bar {
            bar.set_position(0);
        }
    }
}

impl Drop for Download<'_> {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
