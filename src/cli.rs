//! Command-line interface.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gguf_abliterate::apply::{self, ApplyOptions};
use gguf_abliterate::direction::DirectionFile;
use gguf_abliterate::{ffi, inspect, output};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "gguf-abliterate", version, about = "Remove the refusal direction from a quantized GGUF chat model")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Show llama.cpp's own log.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Project a given direction out of a GGUF's residual-stream writers.
    Apply(ApplyArgs),
    /// Show a GGUF's layout and which tensors an edit would touch.
    Inspect {
        /// The GGUF to inspect.
        input: PathBuf,
    },
}

#[derive(Args)]
struct ApplyArgs {
    /// Direction file: a JSON object with "direction": [n_embd numbers].
    #[arg(long, value_name = "DIR.json")]
    direction: PathBuf,
    /// Input GGUF (the first shard of a split GGUF).
    input: PathBuf,
    /// Output GGUF.
    output: PathBuf,
    #[command(flatten)]
    edit: EditArgs,
}

#[derive(Args, Clone)]
struct EditArgs {
    /// Share of the refusal component to remove (1.0 removes all of it).
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    scale: f32,
    /// Leave token_embd untouched (with tied embeddings it is also the unembedding).
    #[arg(long)]
    skip_embeddings: bool,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    threads: Option<usize>,
    /// Overwrite OUT if it exists.
    #[arg(short, long)]
    force: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    ffi::init_backend(cli.verbose);
    output::install_interrupt_cleanup();
    match cli.command {
        Some(Command::Inspect { input }) => {
            print!("{}", inspect::inspect(&input)?);
            Ok(())
        }
        Some(Command::Apply(args)) => run_apply(args),
        None => {
            Cli::parse_from(["gguf-abliterate", "--help"]);
            Ok(())
        }
    }
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().context("setting up threads")?;
    }
    Ok(())
}

fn run_apply(args: ApplyArgs) -> Result<()> {
    set_threads(args.edit.threads)?;
    let dir = DirectionFile::read(&args.direction)?;
    let opts = ApplyOptions {
        scale: args.edit.scale,
        skip_embeddings: args.edit.skip_embeddings,
        force: args.edit.force,
        provenance: dir.provenance_kvs(),
        progress: !args.edit.quiet,
    };
    let report = apply::apply(&args.input, &args.output, &dir.direction, &opts)?;
    for out in &report.outputs {
        eprintln!("wrote {} ({} tensors edited)", out.display(), report.tensors.len());
    }
    Ok(())
}
