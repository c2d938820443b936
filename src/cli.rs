//! Command-line interface.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gguf_abliterate::apply::{self, ApplyOptions};
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::direction::{
    self, control_vector, DirectionFile, SearchOptions, SearchResult,
};
use gguf_abliterate::prompts::{Kind, PromptSet};
use gguf_abliterate::{ffi, inspect, output};
use std::path::Path;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "gguf-abliterate",
    version,
    about = "Remove the refusal direction from a quantized GGUF chat model"
)]
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
pub struct SearchArgs {
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
    /// Discard candidates whose first-token KL on harmless prompts exceeds this.
    #[arg(long, default_value_t = SearchOptions::default().kl_threshold, value_name = "KL")]
    kl_threshold: f64,
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
        Some(Command::Direction(args)) => {
            let found = find_direction(&args.input, &args.search, !args.quiet)?;
            write_direction_outputs(&found, &args.output, &args.search, args.force)
        }
        None => {
            Cli::parse_from(["gguf-abliterate", "--help"]);
            Ok(())
        }
    }
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up threads")?;
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
        eprintln!(
            "wrote {} ({} tensors edited)",
            out.display(),
            report.tensors.len()
        );
    }
    Ok(())
}

/// A direction found by search, with what is needed to record it.
pub struct Found {
    pub result: SearchResult,
    pub file: DirectionFile,
    pub arch: String,
}

fn load_prompts(
    kind: Kind,
    file: &Option<PathBuf>,
    column: Option<&str>,
    seed: Option<u64>,
) -> Result<PromptSet> {
    let mut set = match file {
        Some(path) => PromptSet::from_file(path, column)?,
        None => PromptSet::builtin(kind),
    };
    if let Some(seed) = seed {
        shuffle(&mut set.train, seed);
    }
    Ok(set)
}

/// Fisher–Yates with a small xorshift generator: reproducible everywhere.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    for i in (1..items.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        items.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

pub fn find_direction(input: &Path, args: &SearchArgs, progress: bool) -> Result<Found> {
    let harmful = load_prompts(
        Kind::Harmful,
        &args.harmful,
        args.column.as_deref(),
        args.seed,
    )?;
    let harmless = load_prompts(
        Kind::Harmless,
        &args.harmless,
        args.column.as_deref(),
        args.seed,
    )?;
    // Read the header ourselves first: a clear error for a bad file beats llama.cpp's log.
    let shards = gguf_abliterate::gguf::open_model(input)?;
    let arch = shards[0].architecture().unwrap_or("unknown").to_string();
    let name = shards[0].get_str("general.name").unwrap_or("").to_string();
    drop(shards);
    let model = ffi::Model::load(input, args.n_gpu_layers)?;
    let fmt = ChatFormat::resolve(&model, args.chat_template.as_deref())?;
    let opts = SearchOptions {
        n_train: args.n_train,
        n_val: args.n_val,
        layer: args.layer,
        position: args.position,
        kl_threshold: args.kl_threshold,
        top_k: args.top_k,
        rank_prompts: args.rank_prompts,
        threads: args
            .threads
            .map_or_else(direction::default_threads, |t| t as i32),
        progress,
    };
    let result = direction::search(&model, &fmt, &harmful, &harmless, &opts)?;
    let c = &result.chosen;
    eprintln!(
        "direction: layer {} position {} of {} layers | refusal score on harmful prompts {:.2} -> {:.2} ablated | induce {:.2} | KL {:.3} ({:.0} s)",
        result.layer,
        result.position,
        result.n_layer,
        result.baseline_harmful,
        c.bypass.unwrap_or(f64::NAN),
        c.induce.unwrap_or(f64::NAN),
        c.kl.unwrap_or(f64::NAN),
        result.seconds
    );
    let tokens: Vec<String> = result
        .refusal_tokens
        .iter()
        .map(|t| format!("{:?}", t.text))
        .collect();
    eprintln!("refusal tokens: {}", tokens.join(" "));
    let evaluated = result.candidates.iter().filter(|c| c.kl.is_some()).count();
    eprintln!(
        "searched {} candidates, evaluated {evaluated} fully; bypass/KL frontier (layer/pos: KL -> bypass):",
        result.candidates.len()
    );
    for f in &result.frontier {
        eprintln!(
            "  {:>3}/{}: KL {:.3} -> bypass {:.2}",
            f.layer,
            f.position,
            f.kl.unwrap_or(f64::NAN),
            f.bypass.unwrap_or(f64::NAN)
        );
    }

    let mut provenance = serde_json::Map::new();
    provenance.insert("model".into(), name.into());
    provenance.insert("architecture".into(), arch.clone().into());
    provenance.insert("layer".into(), result.layer.into());
    provenance.insert("position".into(), result.position.into());
    provenance.insert("chat_template".into(), fmt.origin.clone().into());
    provenance.insert("harmful_prompts".into(), harmful.source.clone().into());
    provenance.insert("harmless_prompts".into(), harmless.source.clone().into());
    provenance.insert(
        "tool".into(),
        format!("gguf-abliterate {}", env!("CARGO_PKG_VERSION")).into(),
    );
    provenance.insert("search".into(), serde_json::to_value(&result)?);
    let file = DirectionFile {
        direction: result.direction.clone(),
        provenance,
    };
    Ok(Found { result, file, arch })
}

fn write_direction_outputs(
    found: &Found,
    out: &Path,
    args: &SearchArgs,
    force: bool,
) -> Result<()> {
    output::write_atomic(out, found.file.to_json().as_bytes(), force)?;
    eprintln!("wrote {}", out.display());
    if let Some(cv) = &args.export_control_vector {
        let bytes = control_vector::encode(
            &found.arch,
            found.result.n_layer,
            found.result.layer,
            &found.result.direction,
        )?;
        output::write_atomic(cv, &bytes, force)?;
        eprintln!(
            "wrote {} (llama-cli --control-vector-scaled {}:-1)",
            cv.display(),
            cv.display()
        );
    }
    Ok(())
}
