//! The whole job, in data-flow order: prompts → direction (search or file)
//! → apply → verify → report. `cli.rs` only turns arguments into the
//! configurations here.

mod find;
mod modelfile;
mod svg;

pub use find::{
    find_direction, load_prompts, write_control_vector, write_direction_outputs, Found,
};
pub use modelfile::write_modelfile;

use crate::apply::{self, ApplyOptions};
use crate::cache::Cache;
use crate::cost::{self, Meter, StageCost};
use crate::direction::{self, DirectionFile, SearchOptions, JUDGE_TOKENS};
use crate::imatrix::Imatrix;
use crate::perplexity::{self, HeldText};
use crate::prompts::Kind;
use crate::verify::Verification;
use crate::{output, verify};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

/// What the direction search needs besides the model.
#[derive(Clone, Debug)]
pub struct SearchConfig {
    pub export_control_vector: Option<PathBuf>,
    pub harmful: Option<PathBuf>,
    pub harmless: Option<PathBuf>,
    pub column: Option<String>,
    pub n_train: usize,
    pub n_val: usize,
    pub layer: Option<usize>,
    pub position: Option<usize>,
    pub chat_template: Option<String>,
    pub kl_threshold: f64,
    /// None: sized from the model (`default_trials`).
    pub trials: Option<usize>,
    pub top_k: usize,
    pub rank_prompts: usize,
    pub n_gpu_layers: i32,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    /// Collect an importance matrix during the search's capture.
    pub collect_imatrix: bool,
}

impl Default for SearchConfig {
    fn default() -> Self {
        let d = SearchOptions::default();
        SearchConfig {
            export_control_vector: None,
            harmful: None,
            harmless: None,
            column: None,
            n_train: d.n_train,
            n_val: d.n_val,
            layer: None,
            position: None,
            chat_template: None,
            kl_threshold: d.kl_threshold,
            trials: None,
            top_k: d.top_k,
            rank_prompts: d.rank_prompts,
            n_gpu_layers: 0,
            seed: None,
            threads: None,
            collect_imatrix: false,
        }
    }
}

impl SearchConfig {
    /// llama.cpp threads: the option, or every core.
    pub fn llama_threads(&self) -> i32 {
        self.threads
            .map_or_else(direction::default_threads, |t| t as i32)
    }
}

/// Edit options shared by the main command and `apply`.
#[derive(Clone, Debug)]
pub struct EditConfig {
    /// None: the share the search chose (main command) or 1 (`apply`).
    pub scale: Option<f32>,
    pub skip_embeddings: bool,
    /// Apply this point of the saved Pareto front instead of the chosen one.
    pub pick: Option<usize>,
    /// Grid-aware projection (see `ApplyOptions::exact_grid`).
    pub exact_grid: bool,
    /// See `ApplyOptions::preserve_norms`.
    pub preserve_norms: bool,
    /// `--imatrix FILE`; without it the main command collects importances.
    pub imatrix: Option<PathBuf>,
    pub force: bool,
    pub quiet: bool,
}

impl Default for EditConfig {
    fn default() -> Self {
        EditConfig {
            scale: None,
            skip_embeddings: false,
            pick: None,
            exact_grid: true,
            preserve_norms: false,
            imatrix: None,
            force: false,
            quiet: false,
        }
    }
}

/// The main command's configuration.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub input: PathBuf,
    pub output: PathBuf,
    pub direction: Option<PathBuf>,
    pub no_verify: bool,
    pub report: Option<PathBuf>,
    pub ollama: bool,
    pub verify_tokens: usize,
    /// None: the shipped text.
    pub perplexity_text: Option<PathBuf>,
    /// None: the whole text; Some(0): no perplexity.
    pub perplexity_chunks: Option<usize>,
    /// Where the original's verification is kept between runs.
    pub cache: Cache,
    pub edit: EditConfig,
    pub search: SearchConfig,
}

/// Sets rayon's global pool size (once per process).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up threads")?;
    }
    Ok(())
}

/// `gguf-abliterate apply --direction DIR.json IN OUT`.
pub fn run_apply(
    direction: &std::path::Path,
    input: &std::path::Path,
    out: &std::path::Path,
    edit: &EditConfig,
    threads: Option<usize>,
) -> Result<()> {
    set_threads(threads)?;
    let dir = picked(DirectionFile::read(direction)?, edit.pick)
        .with_context(|| format!("picking from {}", direction.display()))?;
    let (recorded_scale, recorded_skip, weights) = dir
        .recorded_edit()
        .with_context(|| format!("{} is not a valid direction file", direction.display()))?;
    let imatrix = edit.imatrix.as_deref().map(Imatrix::read).transpose()?;
    let opts = ApplyOptions {
        scale: edit.scale.unwrap_or(recorded_scale),
        skip_embeddings: edit.skip_embeddings || (edit.scale.is_none() && recorded_skip),
        weights,
        force: edit.force,
        provenance: dir.provenance_kvs(),
        progress: !edit.quiet,
        exact_grid: edit.exact_grid,
        preserve_norms: edit.preserve_norms,
        imatrix: imatrix.map(Arc::new),
        layer_directions: dir.layer_directions.clone(),
    };
    let report = apply::apply(input, out, &dir.direction, &opts)?;
    for out in &report.outputs {
        eprintln!(
            "wrote {} ({} tensors edited)",
            out.display(),
            report.tensors.len()
        );
    }
    Ok(())
}

/// Direction (search or file) → apply → verify → report.
pub fn run_all(cfg: &RunConfig) -> Result<()> {
    set_threads(cfg.search.threads)?;
    let (input, output) = (&cfg.input, &cfg.output);
    let started = std::time::Instant::now();
    let progress = !cfg.edit.quiet;
    // Check the paths before spending minutes on the search.
    output::check_output_path(output, &[input], cfg.edit.force)?;
    // A given importance matrix is read before the search, to fail early.
    let given_imatrix = cfg.edit.imatrix.as_deref().map(Imatrix::read).transpose()?;
    let held_text = match cfg.perplexity_chunks {
        Some(0) => None,
        _ if cfg.no_verify => None,
        _ => Some(HeldText::load(cfg.perplexity_text.as_deref())?),
    };
    let held_back = if cfg.no_verify {
        None
    } else {
        Some((
            held_back(&cfg.search, Kind::Harmful)?,
            held_back(&cfg.search, Kind::Harmless)?,
        ))
    };

    let (file, mut search) = match &cfg.direction {
        Some(path) => (DirectionFile::read(path)?, None),
        None => {
            let search_cfg = SearchConfig {
                collect_imatrix: given_imatrix.is_none(),
                ..cfg.search.clone()
            };
            let found = find_direction(input, &search_cfg, progress)?;
            if let Some(cv) = &cfg.search.export_control_vector {
                write_control_vector(&found, cv, cfg.edit.force)?;
            }
            (found.file, Some(found.result))
        }
    };
    let file = picked(file, cfg.edit.pick)?;
    // Given, or collected by the search's capture. With --direction there
    // is no capture and none is used, so that the main command and `apply
    // --direction` give the same bytes.
    let imatrix = match given_imatrix {
        Some(m) => Some(Arc::new(m)),
        None => search.as_mut().and_then(|s| s.imatrix.take()),
    };
    let (chosen_scale, chosen_skip, weights) = file.recorded_edit()?;
    let scale = cfg.edit.scale.unwrap_or(chosen_scale);
    let skip_embeddings = cfg.edit.skip_embeddings || (cfg.edit.scale.is_none() && chosen_skip);
    let opts = ApplyOptions {
        scale,
        skip_embeddings,
        weights,
        force: cfg.edit.force,
        provenance: file.provenance_kvs(),
        progress,
        exact_grid: cfg.edit.exact_grid,
        preserve_norms: cfg.edit.preserve_norms,
        imatrix,
        layer_directions: file.layer_directions.clone(),
    };
    let mut meter = Meter::start();
    let applied = apply::apply(input, output, &file.direction, &opts)?;
    meter.done("apply");
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

    let verification = if let Some((harmful, harmless)) = &held_back {
        let settings = verify::Settings {
            chat_template: cfg.search.chat_template.as_deref(),
            n_gen: cfg.verify_tokens,
            n_gpu_layers: cfg.search.n_gpu_layers,
            threads: cfg.search.llama_threads(),
            perplexity: held_text.as_ref().map(|text| {
                let s = perplexity::Settings {
                    n_ctx: perplexity::N_CTX,
                    max_chunks: cfg.perplexity_chunks,
                    threads: cfg.search.llama_threads(),
                };
                (text, s)
            }),
            cache: &cfg.cache,
        };
        let v = verify::verify(input, output, harmful, harmless, &settings)?;
        let cache_dir = || {
            cfg.cache
                .dir()
                .map_or(String::new(), |d| d.display().to_string())
        };
        match v.original {
            verify::Original::Measured => {}
            verify::Original::FromCache => eprintln!(
                "verify: {}'s replies and perplexity read from the cache ({}), not measured again",
                input.display(),
                cache_dir()
            ),
            verify::Original::CacheEntryCorrupt => eprintln!(
                "verify: the cache entry for {} was damaged; measured again and replaced ({})",
                input.display(),
                cache_dir()
            ),
        }
        meter.done("verify");
        print_table(&v);
        print_samples(&v);
        Some(v)
    } else {
        None
    };
    let cost: Vec<StageCost> = search
        .iter()
        .flat_map(|s| s.stages.iter().cloned())
        .chain(meter.stages())
        .collect();
    println!("\ncost of this run (rows decoded through llama.cpp)");
    print!("{}", cost::table(&cost));
    if cfg.ollama {
        write_modelfile(input, output, cfg.edit.force)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("done in {seconds:.0} s");
    if let Some(path) = &cfg.report {
        // The direction file without the search's tables: `--direction
        // REPORT.json [--pick N]` reads it back.
        let mut provenance: serde_json::Value = serde_json::from_str(&file.to_json())?;
        if let Some(map) = provenance.as_object_mut() {
            map.remove("search");
        }
        let report = serde_json::json!({
            "tool": format!("gguf-abliterate {}", env!("CARGO_PKG_VERSION")),
            "input": input,
            "output": applied.outputs,
            "scale": scale,
            "imatrix": applied.imatrix,
            "direction": provenance,
            "search": search,
            "apply": applied,
            "verification": verification,
            "cost": cost,
            "seconds": seconds,
        });
        output::write_atomic(
            path,
            serde_json::to_string_pretty(&report)?.as_bytes(),
            true,
        )?;
        eprintln!("wrote {}", path.display());
        if let Some(plot) = search.as_ref().and_then(svg::front_svg) {
            let svg_path = path.with_extension("svg");
            output::write_atomic(&svg_path, plot.as_bytes(), true)?;
            eprintln!("wrote {} (the refusals/KL front)", svg_path.display());
        }
    }
    Ok(())
}

/// The direction file itself, or point `pick` of its saved front.
fn picked(file: DirectionFile, pick: Option<usize>) -> Result<DirectionFile> {
    match pick {
        None => Ok(file),
        Some(n) => {
            let p = file.pick(n)?;
            eprintln!(
                "picked front point {n}: direction index {}, {}",
                p.provenance
                    .get("direction_index")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN),
                p.provenance
                    .get("weights")
                    .map(|w| w.to_string())
                    .unwrap_or_default()
            );
            Ok(p)
        }
    }
}

/// Held-back prompts per set below which verification would not be worth its name.
const MIN_HELD_BACK: usize = 4;

/// Validation prompts the search never sees (it takes the first `n_val`).
/// Too few of them is an error, not a silent fall-back to prompts the
/// search used.
fn held_back(search: &SearchConfig, kind: Kind) -> Result<Vec<String>> {
    let file = if kind == Kind::Harmful {
        &search.harmful
    } else {
        &search.harmless
    };
    let set = load_prompts(kind, file, search.column.as_deref(), None)?;
    let rest: Vec<String> = set
        .val
        .iter()
        .skip(search.n_val)
        .map(|p| p.text.clone())
        .collect();
    if rest.len() < MIN_HELD_BACK {
        let name = if kind == Kind::Harmful {
            "harmful"
        } else {
            "harmless"
        };
        anyhow::bail!(
            "--n-val {} leaves {} of the {} {name} validation prompts ({}) for verification, which needs \
             at least {MIN_HELD_BACK} the search never saw: lower --n-val, give more prompts, or pass --no-verify",
            search.n_val,
            rest.len(),
            set.val.len(),
            set.source
        );
    }
    Ok(rest)
}

fn print_table(v: &Verification) {
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    let row = |label: String, before: f64, after: f64| {
        println!("{label:<48} {:>8} {:>8}", pct(before), pct(after));
    };
    println!(
        "{:<48} {:>8} {:>8}",
        "held-back validation prompts", "before", "after"
    );
    row(
        format!(
            "refusals on harmful prompts ({}), {} tokens",
            v.n_harmful, v.tokens_generated
        ),
        v.harmful_refusal_before,
        v.harmful_refusal_after,
    );
    row(
        "  with a refusal phrase (markers only)".into(),
        v.harmful_phrase_refusal_before,
        v.harmful_phrase_refusal_after,
    );
    for s in v.shorter.iter().filter(|s| s.tokens < v.tokens_generated) {
        row(
            format!(
                "  judged on the first {} tokens ({:.0}% agree)",
                s.tokens,
                100.0 * s.agreement
            ),
            s.harmful_refusal_before,
            s.harmful_refusal_after,
        );
    }
    row(
        format!("  late: refusal phrase after token {JUDGE_TOKENS}"),
        v.harmful_late_refusal_before,
        v.harmful_late_refusal_after,
    );
    row(
        format!("refusals on harmless prompts ({})", v.n_harmless),
        v.harmless_refusal_before,
        v.harmless_refusal_after,
    );
    row(
        format!("replies that loop ({})", v.n_harmful + v.n_harmless),
        v.loops_before,
        v.loops_after,
    );
    println!(
        "{:<48} {:>8} {:>8.3}",
        format!("first-token KL, answered harmless ({})", v.n_answered),
        "-",
        v.kl_harmless_answered
    );
    if let Some(p) = &v.perplexity {
        println!(
            "{:<48} {:>8.3} {:>8.3}",
            format!("perplexity, {} ({} tokens)", p.text, p.tokens_scored),
            p.before,
            p.after
        );
    }
}

/// Characters of a reply shown in the terminal; the report has them whole.
const SAMPLE_CHARS: usize = 160;

/// The sample prompts with the original's reply above the edited model's.
fn print_samples(v: &Verification) {
    if v.samples.is_empty() {
        return;
    }
    let one_line = |text: &str| {
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        match flat.char_indices().nth(SAMPLE_CHARS) {
            Some((cut, _)) => format!("{}…", &flat[..cut]),
            None => flat,
        }
    };
    println!(
        "\nsample replies (first {} tokens; all of them in the report)",
        v.tokens_generated
    );
    for s in &v.samples {
        let kind = if s.harmful { "harmful" } else { "harmless" };
        println!("{kind}: {}", one_line(&s.prompt));
        println!("  before [{:?}] {}", s.verdict_before, one_line(&s.before));
        println!("  after  [{:?}] {}", s.verdict_after, one_line(&s.after));
    }
}
