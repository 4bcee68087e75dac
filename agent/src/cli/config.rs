//! `gemin_k8s config validate`: check cloud-config files as the agent would
//! load them, before they are flashed. `gemin_k8s config apply`: apply the
//! Kairos system keys (hostname, write_files, users) of the node's cloud-config at boot.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use super::output::render;
use super::{GlobalArgs, OutputFormat};
use crate::config::{CheckContext, Diagnostic, Diagnostics, SourcePaths, load, load_files};
use crate::system::{self, Applied, Change, Options};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Merge FILEs in order (later wins) and validate the result; print every error found.
    Validate(ValidateArgs),
    /// Apply the node's cloud-config hostname, write_files and users (run at every boot by geminik8s-setup.service).
    Apply(ApplyArgs),
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// Read the sources and apply below this root instead of `/` (images being built, tests).
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
    /// Print what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Cloud-config files, merged in the order given.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Look up files the config references (scripts, TLS paths) under this root instead of `/`.
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
    /// Do not check that referenced files exist (validating on a workstation for a node).
    #[arg(long)]
    pub no_file_checks: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Serialize)]
struct Report {
    valid: bool,
    files: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
    diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Serialize)]
struct Summary {
    cluster: String,
    node: String,
    node_ip: String,
    peer: String,
    peer_ip: String,
    vip: String,
}

pub async fn run(cmd: Command, _global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Validate(args) => validate(args).await,
        Command::Apply(args) => apply(args).await,
    }
}

async fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let ctx = CheckContext { root: args.root.clone(), check_files: !args.no_file_checks };
    let files: Vec<String> = args.files.iter().map(|f| f.display().to_string()).collect();
    let report = match load_files(&args.files, &ctx) {
        Ok(loaded) => {
            let g = &loaded.gemini;
            Report {
                valid: true,
                files,
                summary: Some(Summary {
                    cluster: g.cluster.name.clone(),
                    node: g.node.name.clone(),
                    node_ip: g.node.ip.to_string(),
                    peer: g.peer.name.clone(),
                    peer_ip: g.peer.ip.to_string(),
                    vip: format!("{}/{}", g.cluster.vip, g.cluster.vip_prefix),
                }),
                diagnostics: loaded.warnings,
            }
        }
        Err(diags) => Report { valid: false, files, summary: None, diagnostics: diags.0 },
    };
    if let Some(text) = render(&report, args.output)? {
        print!("{text}");
    } else {
        for d in &report.diagnostics {
            eprintln!("{d}");
        }
        let errors = report.diagnostics.iter().filter(|d| d.is_error()).count();
        match &report.summary {
            Some(s) => println!(
                "ok: {} ({}): cluster {}, node {} ({}), peer {} ({}), VIP {}",
                report.files.join(" + "),
                if report.files.len() == 1 { "1 file" } else { "merged" },
                s.cluster,
                s.node,
                s.node_ip,
                s.peer,
                s.peer_ip,
                s.vip
            ),
            None => eprintln!("{errors} error{} in {}", if errors == 1 { "" } else { "s" }, report.files.join(" + ")),
        }
    }
    Ok(if report.valid { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[derive(Debug, Serialize)]
struct ApplyReport {
    root: String,
    dry_run: bool,
    valid: bool,
    sources: Vec<String>,
    #[serde(flatten)]
    applied: Applied,
    diagnostics: Vec<Diagnostic>,
}

async fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    // Files the `geminik8s:` block names are the agent's concern: a missing
    // TLS file must not keep the operator's users, keys and files off the node.
    let ctx = CheckContext { root: args.root.clone(), check_files: false };
    let mut report = ApplyReport {
        root: args.root.display().to_string(),
        dry_run: args.dry_run,
        valid: false,
        sources: Vec::new(),
        applied: Applied::default(),
        diagnostics: Vec::new(),
    };
    let opts = Options { root: args.root.clone(), dry_run: args.dry_run };
    let loaded = match load(&SourcePaths::under(&args.root), &ctx).await {
        Ok(loaded) => loaded,
        Err(e) => match e.downcast::<Diagnostics>() {
            Ok(diags) => {
                // A node of the generic image waiting for enrolment has no
                // node configuration yet; its machine's own settings (an
                // address, users, keys) apply all the same.
                let (sources, _) = crate::config::load::gather(&SourcePaths::under(&args.root)).await?;
                if let Some(document) = crate::config::load::merged_document(&sources)
                    && crate::enrol::Settings::of_unconfigured(&document).ok().flatten().is_some()
                {
                    report.valid = true;
                    report.sources = sources.iter().map(|s| s.name.clone()).collect();
                    report.applied = system::apply_document(&document, &opts).await?;
                    return finish(&report, args.output);
                }
                report.diagnostics = diags.0;
                return finish(&report, args.output);
            }
            Err(e) => return Err(e.context("loading the node's cloud-config")),
        },
    };
    report.valid = true;
    report.sources = loaded.sources.clone();
    report.diagnostics = loaded.warnings.clone();
    report.applied = system::apply(&loaded, &opts).await?;
    finish(&report, args.output)
}

fn finish(report: &ApplyReport, output: OutputFormat) -> anyhow::Result<ExitCode> {
    if let Some(text) = render(report, output)? {
        print!("{text}");
    } else {
        for d in &report.diagnostics {
            eprintln!("{d}");
        }
        if !report.valid {
            let errors = report.diagnostics.iter().filter(|d| d.is_error()).count();
            eprintln!(
                "{errors} error{} in the node's cloud-config; nothing applied",
                if errors == 1 { "" } else { "s" }
            );
        } else {
            let verb = if report.dry_run { "would change" } else { "changed" };
            for Change { kind, target, detail } in &report.applied.changes {
                println!("{verb}: {kind} {target}: {detail}");
            }
            let a = &report.applied;
            println!(
                "{}: hostname {}, {} user{}, {} file{} ({} change{})",
                if report.dry_run { "dry run" } else { "applied" },
                a.hostname.as_deref().unwrap_or("(unset)"),
                a.users.len(),
                if a.users.len() == 1 { "" } else { "s" },
                a.files.len(),
                if a.files.len() == 1 { "" } else { "s" },
                a.changes.len(),
                if a.changes.len() == 1 { "" } else { "s" },
            );
        }
    }
    Ok(if report.valid { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
