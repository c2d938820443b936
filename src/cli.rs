//! Command-line interface.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use gguf_abliterate::cache::Cache;
use gguf_abliterate::direction::SearchOptions;
use gguf_abliterate::pipeline::{self, EditConfig, RunConfig, SearchConfig};
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
    Apply(ApplyArgs),
    /// Find the refusal direction of a GGUF chat model.
    Direction(DirectionCmd),
    /// Show a GGUF's layout and which tensors an edit would touch.
    Inspect {
        /// The GGUF to inspect.
        input: PathBuf,
    },
}

#[derive(Args)]
struct DirectionCmd {
    /// Input GGUF.
    input: PathBuf,
    /// Where to write the direction (JSON).
    #[arg(short, long, value_name = "DIR.json")]
    output: PathBuf,
    /// Overwrite existing output files.
    #[arg(short, long)]
    force: bool,
    /// No progress bars.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    search: SearchArgs,
}

#[derive(Args, Clone)]
struct SearchArgs {
    /// Also write a llama.cpp control vector (use with --control-vector-scaled CV.gguf:-1).
    #[arg(long, value_name = "CV.gguf")]
    export_control_vector: Option<PathBuf>,
    /// Harmful instructions: text (one per line), JSONL or CSV. Default: built-in set.
    #[arg(long, value_name = "FILE")]
    harmful: Option<PathBuf>,
    /// Harmless instructions, in the same formats. Default: built-in set.
    #[arg(long, value_name = "FILE")]
    harmless: Option<PathBuf>,
    /// JSONL/CSV column holding the instruction (default: instruction, prompt, goal, text or question).
    #[arg(long, value_name = "NAME")]
    column: Option<String>,
    /// Training instructions per set.
    #[arg(long, default_value_t = SearchOptions::default().n_train, value_name = "N")]
    n_train: usize,
    /// Validation instructions per set.
    #[arg(long, default_value_t = SearchOptions::default().n_val, value_name = "N")]
    n_val: usize,
    /// Use this layer (block output index) instead of searching.
    #[arg(long, value_name = "L")]
    layer: Option<usize>,
    /// Use this post-instruction position (0 = first token after the instruction).
    #[arg(long, value_name = "P")]
    position: Option<usize>,
    /// A llama.cpp built-in chat template name or a template file, for models without one.
    #[arg(long, value_name = "NAME|FILE")]
    chat_template: Option<String>,
    /// First-token KL on answered harmless prompts the edit may cost: candidates
    /// above it are discarded, and the pick is the fewest refusals within it
    /// (the lowest KL among points within a standard error of the fewest).
    #[arg(long, visible_alias = "kl-target", default_value_t = SearchOptions::default().kl_threshold, value_name = "KL")]
    kl_threshold: f64,
    /// TPE trials refining the chosen direction's edit (per-layer weights,
    /// direction index, biprojection); 0 keeps the first stage's choice.
    /// Default: 20 for models up to 150 MB, fewer for larger ones (at least 6).
    #[arg(long, value_name = "N")]
    trials: Option<usize>,
    /// Candidates fully evaluated after the cheap ranking.
    #[arg(long, default_value_t = SearchOptions::default().top_k, value_name = "K")]
    top_k: usize,
    /// Prompts per set used to rank every candidate cheaply before the top K are evaluated.
    #[arg(long, default_value_t = SearchOptions::default().rank_prompts, value_name = "N")]
    rank_prompts: usize,
    /// Layers to offload to the GPU (metal/cuda builds).
    #[arg(
        long = "n-gpu-layers",
        visible_alias = "ngl",
        default_value_t = 0,
        value_name = "N"
    )]
    n_gpu_layers: i32,
    /// Shuffle the training instructions with this seed before taking --n-train.
    #[arg(long, value_name = "SEED")]
    seed: Option<u64>,
    /// Threads for llama.cpp and the rewrite (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    threads: Option<usize>,
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
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    threads: Option<usize>,
}

/// The whole job: `gguf-abliterate IN.gguf OUT.gguf`.
#[derive(Args)]
struct RunArgs {
    /// Input GGUF chat model.
    input: Option<PathBuf>,
    /// Output GGUF.
    output: Option<PathBuf>,
    /// Use this direction file instead of searching.
    #[arg(long, value_name = "DIR.json")]
    direction: Option<PathBuf>,
    /// Skip loading OUT and measuring refusals and KL afterwards.
    #[arg(long)]
    no_verify: bool,
    /// Write everything measured (direction provenance included) as JSON.
    #[arg(long, value_name = "REPORT.json")]
    report: Option<PathBuf>,
    /// Write an Ollama Modelfile beside OUT.
    #[arg(long)]
    ollama: bool,
    /// Tokens generated per reply when verifying (refusals are judged on
    /// the whole reply, and also on its first 24 and 48 tokens).
    #[arg(long, default_value_t = 128, value_name = "N")]
    verify_tokens: usize,
    /// Measure perplexity on this text instead of the shipped one
    /// (data/perplexity.txt).
    #[arg(long, value_name = "FILE")]
    perplexity_text: Option<PathBuf>,
    /// Chunks of 512 tokens scored for perplexity, as llama-perplexity's
    /// --chunks (default: the whole text; 0 skips perplexity).
    #[arg(long, value_name = "N")]
    perplexity_chunks: Option<usize>,
    /// Keep the original model's verification here between runs (default:
    /// $GGUF_ABLITERATE_CACHE, else $XDG_CACHE_HOME/gguf-abliterate or
    /// ~/.cache/gguf-abliterate).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Neither read nor write the cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    #[command(flatten)]
    edit: EditArgs,
    #[command(flatten)]
    search: SearchArgs,
}

#[derive(Args, Clone)]
struct EditArgs {
    /// Share of the refusal component to remove (1.0 removes all of it;
    /// the main command defaults to the share the search chose).
    #[arg(long, value_name = "S")]
    scale: Option<f32>,
    /// Leave token_embd untouched (with tied embeddings it is also the unembedding).
    #[arg(long)]
    skip_embeddings: bool,
    /// Apply point N of the saved Pareto front (numbered as printed) instead
    /// of the chosen one: from the direction file, or the search just run.
    #[arg(long, value_name = "N")]
    pick: Option<usize>,
    /// Grid-aware projection: requantize until the quantized tensor itself
    /// has lost the requested share of the component ("off": one plain pass,
    /// as 0.1.0 did, for comparison).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    exact_grid: String,
    /// After the projection, give every write vector its norm back: each
    /// input column of attn_output/ffn_down, each token_embd row
    /// (norm-preserving abliteration). Measured on the written file.
    #[arg(long)]
    preserve_norms: bool,
    /// Importance matrix for requantizing (llama-imatrix's GGUF or legacy
    /// .dat); needed for IQ2_XXS, IQ2_XS and IQ1_S. The main command
    /// collects one over the training prompts when none is given.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Overwrite OUT if it exists.
    #[arg(short, long)]
    force: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run() -> Result<()> {
    // llama.cpp spells it -ngl; clap long options need two dashes.
    let args = std::env::args().map(|a| if a == "-ngl" { "--ngl".to_string() } else { a });
    let cli = Cli::parse_from(args);
    ffi::init_backend(cli.verbose);
    output::install_interrupt_cleanup();
    match cli.command {
        Some(Command::Inspect { input }) => {
            print!("{}", inspect::inspect(&input)?);
            Ok(())
        }
        Some(Command::Apply(args)) => pipeline::run_apply(
            &args.direction,
            &args.input,
            &args.output,
            &args.edit.config(),
            args.threads,
        ),
        Some(Command::Direction(args)) => {
            let search = args.search.config();
            pipeline::set_threads(search.threads)?;
            let found = pipeline::find_direction(&args.input, &search, !args.quiet)?;
            pipeline::write_direction_outputs(&found, &args.output, &search, args.force)
        }
        None => pipeline::run_all(&cli.run.config()?),
    }
}

impl SearchArgs {
    fn config(&self) -> SearchConfig {
        SearchConfig {
            export_control_vector: self.export_control_vector.clone(),
            harmful: self.harmful.clone(),
            harmless: self.harmless.clone(),
            column: self.column.clone(),
            n_train: self.n_train,
            n_val: self.n_val,
            layer: self.layer,
            position: self.position,
            chat_template: self.chat_template.clone(),
            kl_threshold: self.kl_threshold,
            trials: self.trials,
            top_k: self.top_k,
            rank_prompts: self.rank_prompts,
            n_gpu_layers: self.n_gpu_layers,
            seed: self.seed,
            threads: self.threads,
            collect_imatrix: false,
        }
    }
}

impl EditArgs {
    fn config(&self) -> EditConfig {
        EditConfig {
            scale: self.scale,
            skip_embeddings: self.skip_embeddings,
            pick: self.pick,
            exact_grid: self.exact_grid == "on",
            preserve_norms: self.preserve_norms,
            imatrix: self.imatrix.clone(),
            force: self.force,
            quiet: self.quiet,
        }
    }
}

impl RunArgs {
    fn config(&self) -> Result<RunConfig> {
        let (Some(input), Some(output)) = (self.input.clone(), self.output.clone()) else {
            anyhow::bail!("usage: gguf-abliterate IN.gguf OUT.gguf (or a subcommand; see --help)");
        };
        Ok(RunConfig {
            input,
            output,
            direction: self.direction.clone(),
            no_verify: self.no_verify,
            report: self.report.clone(),
            ollama: self.ollama,
            verify_tokens: self.verify_tokens,
            perplexity_text: self.perplexity_text.clone(),
            perplexity_chunks: self.perplexity_chunks,
            cache: if self.no_cache {
                Cache::disabled()
            } else {
                Cache::at(self.cache_dir.clone())
            },
            edit: self.edit.config(),
            search: self.search.config(),
        })
    }
}
