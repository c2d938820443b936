//! The whole job, in data-flow order: prompts → direction (search or file)
//! → apply → verify → report. `cli.rs` parses into the configurations
//! here and hands over a reporter.

mod config;
mod find;
mod modelfile;

pub use config::{ApplyConfig, DirectionConfig, EditConfig, RunConfig, SearchConfig};
pub use find::{find_direction, load_prompts, write_control_vector, Found};
pub use modelfile::write_modelfile;

use crate::apply::{self, ApplyOptions};
use crate::cache::Cache;
use crate::cost::{Meter, StageCost};
use crate::direction::{DirectionFile, SearchResult};
use crate::imatrix::Imatrix;
use crate::judge::MarkerJudge;
use crate::output;
use crate::perplexity::{self, HeldText};
use crate::prompts::Kind;
use crate::report::{self, Report, Reporter};
use crate::verify::{self, Verification};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;

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

/// The rewrite's options for a direction file and the user's edit
/// options: an option given wins over what the file records.
pub fn apply_options(
    file: &DirectionFile,
    edit: &EditConfig,
    imatrix: Option<Arc<Imatrix>>,
) -> ApplyOptions {
    let recorded = file.recorded_edit();
    ApplyOptions {
        scale: edit.scale.unwrap_or(recorded.scale()),
        skip_embeddings: edit.skip_embeddings || (edit.scale.is_none() && recorded.skip_embeddings),
        weights: recorded.weights,
        force: edit.force,
        provenance: file.provenance_kvs(),
        progress: !edit.quiet,
        exact_grid: edit.exact_grid,
        preserve_norms: edit.preserve_norms,
        imatrix,
        layer_directions: file.vectors.layer_directions.clone(),
        further_directions: file.vectors.further_directions.clone(),
    }
}

/// `gguf-abliterate apply --direction DIR.json IN OUT`.
pub fn run_apply(cfg: &ApplyConfig, reporter: &mut dyn Reporter) -> Result<()> {
    set_threads(cfg.threads)?;
    let file = picked(
        DirectionFile::read(&cfg.direction)?,
        cfg.edit.pick,
        reporter,
    )
    .with_context(|| format!("picking from {}", cfg.direction.display()))?;
    let imatrix = cfg.edit.imatrix.as_deref().map(Imatrix::read).transpose()?;
    let opts = apply_options(&file, &cfg.edit, imatrix.map(Arc::new));
    let applied = apply::apply_with(
        &cfg.input,
        &cfg.output,
        &file.vectors.direction,
        &opts,
        reporter,
    )?;
    reporter.applied_direction(&applied);
    Ok(())
}

/// `gguf-abliterate direction IN -o DIR.json`.
pub fn run_direction(cfg: &DirectionConfig, reporter: &mut dyn Reporter) -> Result<()> {
    set_threads(cfg.search.threads)?;
    let found = find_direction(&cfg.input, &cfg.search, !cfg.quiet)?;
    reporter.searched(&found.searched());
    output::write_atomic(&cfg.output, found.file.to_json().as_bytes(), cfg.force)?;
    reporter.wrote(&cfg.output, "");
    if let Some(cv) = &cfg.search.export_control_vector {
        write_control_vector(&found, cv, cfg.force, reporter)?;
    }
    Ok(())
}

/// The main command: direction (search or file) → apply → verify → report.
pub fn run_all(
    input: &Path,
    output: &Path,
    cfg: &RunConfig,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    set_threads(cfg.search.threads)?;
    let started = std::time::Instant::now();
    // Check the paths before spending minutes on the search.
    output::check_output_path(output, &[input], cfg.edit.force)?;
    // A given importance matrix is read before the search, to fail early.
    let given_imatrix = cfg.edit.imatrix.as_deref().map(Imatrix::read).transpose()?;
    let held_back = if cfg.no_verify {
        None
    } else {
        Some(HeldBack::load(cfg)?)
    };
    let (file, search, collected) = match &cfg.direction {
        Some(path) => (DirectionFile::read(path)?, None, None),
        None => {
            let search_cfg = SearchConfig {
                collect_imatrix: given_imatrix.is_none(),
                ..cfg.search.clone()
            };
            let found = find_direction(input, &search_cfg, !cfg.edit.quiet)?;
            reporter.searched(&found.searched());
            if let Some(cv) = &cfg.search.export_control_vector {
                write_control_vector(&found, cv, cfg.edit.force, reporter)?;
            }
            (found.file, Some(found.result), found.imatrix)
        }
    };
    let file = picked(file, cfg.edit.pick, reporter)?;
    // Given, or collected by the search's capture. With --direction there
    // is no capture and none is used, so that the main command and `apply
    // --direction` give the same bytes.
    let imatrix = given_imatrix.map(Arc::new).or(collected);
    let opts = apply_options(&file, &cfg.edit, imatrix);
    let mut meter = Meter::start();
    let applied = apply::apply_with(input, output, &file.vectors.direction, &opts, reporter)?;
    meter.done("apply");
    reporter.applied(&applied, opts.scale, opts.skip_embeddings);
    let verification = match &held_back {
        Some(held) => {
            let cache = cfg.cache();
            let v = verify_output(input, output, cfg, held, &cache)?;
            meter.done("verify");
            reporter.verified(input, &v, &cache);
            Some(v)
        }
        None => None,
    };
    let cost: Vec<StageCost> = search
        .iter()
        .flat_map(|s| s.stages.iter().cloned())
        .chain(meter.stages())
        .collect();
    reporter.cost(&cost);
    if cfg.ollama {
        let (path, tag) = write_modelfile(input, output, cfg.edit.force)?;
        reporter.modelfile(&path, &tag);
    }
    let seconds = started.elapsed().as_secs_f64();
    reporter.done(seconds);
    if let Some(path) = &cfg.report {
        let report = Report {
            tool: format!("gguf-abliterate {}", env!("CARGO_PKG_VERSION")),
            input,
            output: &applied.outputs,
            scale: opts.scale,
            imatrix: &applied.imatrix,
            direction: report::direction_provenance(&file),
            search: search.as_ref(),
            apply: &applied,
            verification: verification.as_ref(),
            cost: &cost,
            seconds,
        };
        write_report(path, &report, search.as_ref(), reporter)?;
    }
    Ok(())
}

/// The report, and the front's plot beside it.
fn write_report(
    path: &Path,
    report: &Report,
    search: Option<&SearchResult>,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    output::write_atomic(path, report.to_json()?.as_bytes(), true)?;
    reporter.wrote(path, "");
    if let Some(plot) = search.and_then(report::front_svg) {
        let svg_path = path.with_extension("svg");
        output::write_atomic(&svg_path, plot.as_bytes(), true)?;
        reporter.wrote(&svg_path, "the refusals/KL front");
    }
    Ok(())
}

/// What verification reads: the held-back prompts and the perplexity text.
struct HeldBack {
    harmful: Vec<String>,
    harmless: Vec<String>,
    text: Option<HeldText>,
}

impl HeldBack {
    fn load(cfg: &RunConfig) -> Result<HeldBack> {
        let text = match cfg.perplexity_chunks {
            0 => None,
            _ => Some(HeldText::load(cfg.perplexity_text.as_deref())?),
        };
        Ok(HeldBack {
            harmful: held_back(&cfg.search, Kind::Harmful)?,
            harmless: held_back(&cfg.search, Kind::Harmless)?,
            text,
        })
    }
}

/// IN and OUT on the held-back prompts, judged alike, with perplexity.
fn verify_output(
    input: &Path,
    output: &Path,
    cfg: &RunConfig,
    held: &HeldBack,
    cache: &Cache,
) -> Result<Verification> {
    let threads = cfg.search.llama_threads();
    let settings = verify::Settings {
        chat_template: cfg.search.chat_template.as_deref(),
        n_gen: cfg.verify_tokens,
        n_gpu_layers: cfg.search.n_gpu_layers,
        threads,
        perplexity: held.text.as_ref().map(|text| {
            let s = perplexity::Settings {
                n_ctx: perplexity::N_CTX,
                max_chunks: Some(cfg.perplexity_chunks),
                threads,
            };
            (text, s)
        }),
        cache,
        judge: &MarkerJudge,
    };
    verify::verify(input, output, &held.harmful, &held.harmless, &settings)
}

/// The direction file itself, or point `pick` of its saved front.
fn picked(
    file: DirectionFile,
    pick: Option<usize>,
    reporter: &mut dyn Reporter,
) -> Result<DirectionFile> {
    match pick {
        None => Ok(file),
        Some(n) => {
            let p = file.pick(n)?;
            reporter.picked(n, &p);
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
