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
#[command(
    after_help = "Run `gguf-abliterate IN.gguf OUT.gguf` to find the direction, rewrite the model and verify it."
)]
pub struct Cli {
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
    /// Tokens generated per reply when verifying.
    #[arg(long, default_value_t = 48, value_name = "N")]
    verify_tokens: usize,
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
        Some(Command::Apply(args)) => run_apply(args),
        Some(Command::Direction(args)) => {
            let found = find_direction(&args.input, &args.search, !args.quiet)?;
            write_direction_outputs(&found, &args.output, &args.search, args.force)
        }
        None => run_all(cli.run),
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
    set_threads(args.threads)?;
    let dir = DirectionFile::read(&args.direction)?;
    let opts = ApplyOptions {
        scale: args.edit.scale.unwrap_or(1.0),
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
    let tied_embeddings = !shards.iter().any(|s| s.tensor("output.weight").is_some());
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
        tied_embeddings,
    };
    let result = direction::search(&model, &fmt, &harmful, &harmless, &opts)?;
    let c = &result.chosen;
    eprintln!(
        "direction: layer {} position {} of {} layers, scale {}{} | refusal score on harmful prompts {:.2} -> {:.2} ablated ({:.0}% of replies refuse) | induce {:.2} | KL {:.3} ({:.0} s)",
        result.layer,
        result.position,
        result.n_layer,
        result.scale,
        if result.skip_embeddings { ", token_embd kept" } else { "" },
        result.baseline_harmful,
        c.bypass.unwrap_or(f64::NAN),
        100.0 * c.refusal_rate.unwrap_or(f64::NAN),
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
            "  {:>3}/{} scale {}: KL {:.3} -> bypass {:.2}, {:.0}% refusals",
            f.layer,
            f.position,
            f.scale,
            f.kl.unwrap_or(f64::NAN),
            f.bypass.unwrap_or(f64::NAN),
            100.0 * f.refusal_rate.unwrap_or(f64::NAN)
        );
    }

    let mut provenance = serde_json::Map::new();
    provenance.insert("model".into(), name.into());
    provenance.insert("architecture".into(), arch.clone().into());
    provenance.insert("layer".into(), result.layer.into());
    provenance.insert("position".into(), result.position.into());
    provenance.insert("scale".into(), (result.scale as f64).into());
    provenance.insert("skip_embeddings".into(), result.skip_embeddings.into());
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
        write_control_vector(found, cv, force)?;
    }
    Ok(())
}

fn write_control_vector(found: &Found, cv: &Path, force: bool) -> Result<()> {
    let result = &found.result;
    let bytes =
        control_vector::encode(&found.arch, result.n_layer, result.layer, &result.direction)?;
    output::write_atomic(cv, &bytes, force)?;
    eprintln!(
        "wrote {} (llama-cli --control-vector-scaled {}:-1)",
        cv.display(),
        cv.display()
    );
    Ok(())
}

/// Direction (search or file) → apply → verify → report.
fn run_all(args: RunArgs) -> Result<()> {
    let (Some(input), Some(output)) = (args.input.clone(), args.output.clone()) else {
        anyhow::bail!("usage: gguf-abliterate IN.gguf OUT.gguf (or a subcommand; see --help)");
    };
    set_threads(args.search.threads)?;
    let started = std::time::Instant::now();
    let progress = !args.edit.quiet;
    // Check the paths before spending minutes on the search.
    output::check_output_path(&output, &[&input], args.edit.force)?;

    let (file, search) = match &args.direction {
        Some(path) => (DirectionFile::read(path)?, None),
        None => {
            let found = find_direction(&input, &args.search, progress)?;
            if let Some(cv) = &args.search.export_control_vector {
                write_control_vector(&found, cv, args.edit.force)?;
            }
            (found.file, Some(found.result))
        }
    };
    let chosen_scale = file
        .provenance
        .get("scale")
        .and_then(|v| v.as_f64())
        .unwrap_or(1.0) as f32;
    let scale = args.edit.scale.unwrap_or(chosen_scale);
    let chosen_skip = file
        .provenance
        .get("skip_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let skip_embeddings = args.edit.skip_embeddings || (args.edit.scale.is_none() && chosen_skip);
    let opts = ApplyOptions {
        scale,
        skip_embeddings,
        force: args.edit.force,
        provenance: file.provenance_kvs(),
        progress,
    };
    let applied = apply::apply(&input, &output, &file.direction, &opts)?;
    eprintln!(
        "wrote {} ({} tensors edited, scale {scale}{})",
        output.display(),
        applied.tensors.len(),
        if skip_embeddings {
            ", token_embd kept"
        } else {
            ""
        }
    );

    let verification = if args.no_verify {
        None
    } else {
        let n_val = args.search.n_val;
        let held_back = |kind| -> Result<Vec<String>> {
            let file = if kind == Kind::Harmful {
                &args.search.harmful
            } else {
                &args.search.harmless
            };
            let set = load_prompts(kind, file, args.search.column.as_deref(), None)?;
            // Validation prompts the search did not use; all of them if it used them all.
            let rest: Vec<String> = set.val.iter().skip(n_val).map(|p| p.text.clone()).collect();
            Ok(if rest.is_empty() {
                set.val.iter().map(|p| p.text.clone()).collect()
            } else {
                rest
            })
        };
        let threads = args
            .search
            .threads
            .map_or_else(direction::default_threads, |t| t as i32);
        let v = gguf_abliterate::verify::verify(
            &input,
            &output,
            args.search.chat_template.as_deref(),
            &held_back(Kind::Harmful)?,
            &held_back(Kind::Harmless)?,
            args.verify_tokens,
            args.search.n_gpu_layers,
            threads,
        )?;
        print_table(&v);
        Some(v)
    };
    if args.ollama {
        write_modelfile(&input, &output, args.edit.force)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("done in {seconds:.0} s");
    if let Some(path) = &args.report {
        let mut provenance = file.provenance.clone();
        provenance.remove("search");
        let report = serde_json::json!({
            "tool": format!("gguf-abliterate {}", env!("CARGO_PKG_VERSION")),
            "input": input,
            "output": applied.outputs,
            "scale": scale,
            "direction": provenance,
            "search": search,
            "apply": applied,
            "verification": verification,
            "seconds": seconds,
        });
        output::write_atomic(
            path,
            serde_json::to_string_pretty(&report)?.as_bytes(),
            true,
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_table(v: &gguf_abliterate::verify::Verification) {
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    println!(
        "{:<44} {:>8} {:>8}",
        "held-back validation prompts", "before", "after"
    );
    println!(
        "{:<44} {:>8} {:>8}",
        format!("refusals on harmful prompts ({})", v.n_harmful),
        pct(v.harmful_refusal_before),
        pct(v.harmful_refusal_after)
    );
    println!(
        "{:<44} {:>8} {:>8}",
        format!("refusals on harmless prompts ({})", v.n_harmless),
        pct(v.harmless_refusal_before),
        pct(v.harmless_refusal_after)
    );
    println!(
        "{:<44} {:>8} {:>8.3}",
        format!("first-token KL, answered harmless ({})", v.n_answered),
        "-",
        v.kl_harmless_answered
    );
}

/// An Ollama Modelfile: FROM the output, plus the chat template and stop
/// tokens Ollama cannot always infer from a GGUF it did not convert.
fn write_modelfile(input: &Path, out: &Path, force: bool) -> Result<()> {
    let shards = gguf_abliterate::gguf::open_model(input)?;
    let meta = &shards[0];
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.gguf");
    let mut text = format!("FROM ./{name}\n");
    let template = meta.get_str("tokenizer.chat_template").unwrap_or("");
    if template.contains("<|im_start|>") {
        text.push_str(concat!(
            "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}",
            "<|im_start|>assistant\n\"\"\"\n",
            "PARAMETER stop \"<|im_start|>\"\nPARAMETER stop \"<|im_end|>\"\n"
        ));
    } else if template.contains("<start_of_turn>") {
        text.push_str(concat!(
            "TEMPLATE \"\"\"{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n",
            "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n\"\"\"\n",
            "PARAMETER stop \"<end_of_turn>\"\n"
        ));
    } else if template.contains("<|start_header_id|>") {
        text.push_str(concat!(
            "TEMPLATE \"\"\"{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}",
            "<|start_header_id|>assistant<|end_header_id|>\n\n\"\"\"\n",
            "PARAMETER stop \"<|eot_id|>\"\n"
        ));
    }
    text.push_str("PARAMETER temperature 0.7\n");
    let path = out.with_file_name("Modelfile");
    output::write_atomic(&path, text.as_bytes(), force)?;
    let tag = name.trim_end_matches(".gguf").to_lowercase();
    eprintln!(
        "wrote {}; import it with:\n  cd {} && ollama create {tag} -f Modelfile",
        path.display(),
        path.parent()
            .map_or(".".into(), |p| p.display().to_string())
    );
    Ok(())
}
