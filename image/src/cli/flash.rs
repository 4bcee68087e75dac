//! `gemin-image flash IMAGE DEVICE`: write a raw disk image to a block device.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;

use crate::flash::{self, FlashOptions, Plan};
use crate::progress::{Mode, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Lines for people, on stderr.
    Text,
    /// One JSON summary object on stdout.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The raw disk image built by `gemin-image build`.
    pub image: PathBuf,
    /// The whole disk to overwrite, e.g. /dev/sdb (never a partition).
    pub device: PathBuf,
    /// Do not ask for the device name before writing.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Run every check and show what would be written; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write an image without a GPT, or one made for another sector size.
    #[arg(long)]
    pub force: bool,
    /// Skip reading the device back to compare SHA-256.
    #[arg(long)]
    pub no_verify: bool,
    /// Summary format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = FlashOptions { image: args.image.clone(), device: args.device.clone(), force: args.force };
    let plan = flash::plan(&opts)
        .with_context(|| format!("flashing {} to {}", args.image.display(), args.device.display()))?;
    eprintln!("{}", flash::describe(&plan));
    let summary = if args.dry_run {
        let summary = flash::dry_run(&plan)?;
        eprintln!(
            "dry run: would write {} bytes (sha256:{}) to {}{}; nothing was written",
            summary.bytes,
            summary.sha256,
            summary.device.display(),
            if args.no_verify { "" } else { ", then read them back to verify" }
        );
        summary
    } else {
        if !args.yes {
            confirm(&plan)?;
        }
        // Progress goes to stderr only: stdout is kept for the JSON summary.
        let progress = Progress::new(Mode::detect(false));
        flash::flash(&plan, !args.no_verify, &progress)
            .with_context(|| format!("flashing {} to {}", args.image.display(), args.device.display()))?
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&summary)?),
        Output::Text if !summary.dry_run => eprintln!(
            "flashed {} to {}: {} bytes in {:.1}s, sha256:{}{}",
            summary.image.display(),
            summary.device.display(),
            summary.bytes,
            summary.seconds,
            summary.sha256,
            if summary.verified { ", verified" } else { ", not verified (--no-verify)" }
        ),
        Output::Text => {}
    }
    Ok(())
}

/// Ask for the device name on the terminal; refuse without one.
fn confirm(plan: &Plan) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let line = if stdin.is_terminal() {
        eprint!("Type the device name ({}) to overwrite it: ", plan.device.name);
        std::io::stderr().flush().context("writing the prompt")?;
        let mut line = String::new();
        stdin.lock().read_line(&mut line).context("reading the confirmation from stdin")?;
        Some(line)
    } else {
        None
    };
    flash::check_confirmation(plan, line.as_deref())?;
    Ok(())
}
