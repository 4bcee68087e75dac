//! `gemin_k8s config validate`: check cloud-config files as the agent would
//! load them, before they are flashed.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use super::output::render;
use super::{GlobalArgs, OutputFormat};
use crate::config::{CheckContext, Diagnostic, load_files};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Merge FILEs in order (later wins) and validate the result; print every error found.
    Validate(ValidateArgs),
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
    let Command::Validate(args) = cmd;
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
