//! Command-line interface: parses straight into the pipeline's
//! configurations and dispatches.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use gguf_abliterate::pipeline::{self, ApplyConfig, DirectionConfig, RunConfig};
use gguf_abliterate::report::Terminal;
use gguf_abliterate::{ffi, inspect, output};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gguf-abliterate",
    version,
    about = "Remove the refusal direction from a quantized GGUF chat model"
)]
#[command(args_conflicts_with_subcommands = true)]
#[command(
    after_help = "Run `gguf-abliterate IN.gguf OUT.gguf` to find the direction, rewrite the model and verify it."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Show llama.cpp's own log.
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Project a given direction out of a GGUF's residual-stream writers.
    Apply(ApplyConfig),
    /// Find the refusal direction of a GGUF chat model.
    Direction(DirectionConfig),
    /// Show a GGUF's layout and which tensors an edit would touch.
    Inspect {
        /// The GGUF to inspect.
        input: PathBuf,
    },
}

/// The whole job: `gguf-abliterate IN.gguf OUT.gguf`. The paths are
/// optional to clap only because a subcommand may stand in their place.
#[derive(Args)]
struct RunArgs {
    /// Input GGUF chat model.
    input: Option<PathBuf>,
    /// Output GGUF.
    output: Option<PathBuf>,
    #[command(flatten)]
    config: RunConfig,
}

pub fn run() -> Result<()> {
    // llama.cpp spells it -ngl; clap long options need two dashes.
    let args = std::env::args().map(|a| if a == "-ngl" { "--ngl".to_string() } else { a });
    let cli = Cli::parse_from(args);
    ffi::init_backend(cli.verbose);
    output::install_interrupt_cleanup();
    let mut reporter = Terminal;
    match cli.command {
        Some(Command::Inspect { input }) => {
            print!("{}", inspect::inspect(&input)?);
            Ok(())
        }
        Some(Command::Apply(cfg)) => pipeline::run_apply(&cfg, &mut reporter),
        Some(Command::Direction(cfg)) => pipeline::run_direction(&cfg, &mut reporter),
        None => {
            let (Some(input), Some(output)) = (&cli.run.input, &cli.run.output) else {
                anyhow::bail!(
                    "usage: gguf-abliterate IN.gguf OUT.gguf (or a subcommand; see --help)"
                );
            };
            pipeline::run_all(input, output, &cli.run.config, &mut reporter)
        }
    }
}
