//! Finding the direction: prompts, search, and the direction file with its provenance.

use super::SearchConfig;
use crate::chat::ChatFormat;
use crate::direction::{self, control_vector, DirectionFile, SearchOptions, SearchResult};
use crate::imatrix;
use crate::prompts::{Kind, PromptSet};
use crate::{ffi, output};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// A direction found by search, with what is needed to record it.
pub struct Found {
    pub result: SearchResult,
    pub file: DirectionFile,
    pub arch: String,
}

pub fn load_prompts(
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

pub fn find_direction(input: &Path, args: &SearchConfig, progress: bool) -> Result<Found> {
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
    let shards = crate::gguf::open_model(input)?;
    let arch = shards[0].architecture().unwrap_or("unknown").to_string();
    // Before any search: an unsupported family could only be edited in part.
    crate::edit::check_supported(&arch)?;
    let name = shards[0].get_str("general.name").unwrap_or("").to_string();
    let tied_embeddings = !shards.iter().any(|s| s.tensor("output.weight").is_some());
    let model_bytes: u64 = shards
        .iter()
        .map(|s| s.tensors.iter().map(|t| t.size).sum::<u64>())
        .sum();
    let post_norms = crate::edit::PostNorms::read(&shards)?;
    // Expert writers are `mul_mat_id`s the hook does not see one by one.
    let has_experts = shards
        .iter()
        .any(|s| s.tensors.iter().any(|t| t.name.contains("_exps")));
    let imatrix_weights = args.collect_imatrix.then(|| imatrix::edit_targets(&shards));
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
        threads: args.llama_threads(),
        progress,
        tied_embeddings,
        trials: args.trials.unwrap_or_else(|| default_trials(model_bytes)),
        seed: args.seed.unwrap_or(0),
        post_norms,
        imatrix_weights,
        per_layer: !has_experts,
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
    if let Some(m) = &result.imatrix {
        eprintln!("importance matrix: {} matrices, {}", m.len(), m.source);
    }
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

    print_front(&result);

    let mut provenance = serde_json::Map::new();
    provenance.insert("model".into(), name.into());
    provenance.insert("architecture".into(), arch.clone().into());
    provenance.insert("layer".into(), result.layer.into());
    provenance.insert("position".into(), result.position.into());
    provenance.insert("scale".into(), (result.scale as f64).into());
    provenance.insert("skip_embeddings".into(), result.skip_embeddings.into());
    provenance.insert(
        "direction_index".into(),
        (result.point.direction_index as f64).into(),
    );
    provenance.insert("biprojected".into(), result.point.biprojected.into());
    provenance.insert("per_layer".into(), result.point.per_layer.into());
    provenance.insert(
        "weights".into(),
        serde_json::to_value(result.point.weights)?,
    );
    // The front, each point with its direction, so that `--pick N` can
    // apply another point without searching again.
    let front: Vec<serde_json::Value> = result
        .front
        .iter()
        .zip(&result.front_directions)
        .zip(&result.front_layer_directions)
        .map(|((&i, direction), layers)| {
            let t = &result.trials[i];
            let mut entry = serde_json::json!({
                "refusal_rate": t.refusal_rate,
                "kl": t.kl,
                "point": t.point,
                "direction": direction,
            });
            if !layers.is_empty() {
                entry["layer_directions"] = serde_json::to_value(layers)?;
            }
            Ok(entry)
        })
        .collect::<Result<_>>()?;
    provenance.insert("front".into(), front.into());
    provenance.insert("chat_template".into(), fmt.origin.clone().into());
    provenance.insert("harmful_prompts".into(), harmful.source.clone().into());
    provenance.insert("harmless_prompts".into(), harmless.source.clone().into());
    provenance.insert(
        "tool".into(),
        format!("gguf-abliterate {}", env!("CARGO_PKG_VERSION")).into(),
    );
    provenance.insert("search".into(), serde_json::to_value(&result)?);
    // Checked before anything is written: NaN/Inf or a zero difference of
    // means would otherwise become a corrupted model.
    let file = DirectionFile::new(result.direction.clone(), provenance)
        .and_then(|f| f.with_layer_directions(result.layer_directions.clone()))
        .context("the search produced an unusable direction")?;
    Ok(Found { result, file, arch })
}

pub fn write_direction_outputs(
    found: &Found,
    out: &Path,
    args: &SearchConfig,
    force: bool,
) -> Result<()> {
    output::write_atomic(out, found.file.to_json().as_bytes(), force)?;
    eprintln!("wrote {}", out.display());
    if let Some(cv) = &args.export_control_vector {
        write_control_vector(found, cv, force)?;
    }
    Ok(())
}

pub fn write_control_vector(found: &Found, cv: &Path, force: bool) -> Result<()> {
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

/// Refinement trials when `--trials` is not given: a trial costs about as
/// much as a few forward passes over the validation prompts, so the budget
/// shrinks with the model (20 up to 150 MB of weights, never under 6).
pub fn default_trials(model_bytes: u64) -> usize {
    let full = SearchOptions::default().trials;
    ((full as u64 * 150_000_000) / model_bytes.max(1)).clamp(6, full as u64) as usize
}

/// The refinement's Pareto front, as a table.
fn print_front(result: &SearchResult) {
    if result.trials.is_empty() {
        return;
    }
    eprintln!(
        "refined the edit with {} trials; refusals/KL Pareto front (* = chosen, by the figures pooled with fresh prompts where given):",
        result.trials.len() - 1
    );
    eprintln!(
        "  {:>3} {:>8} {:>6}  {:>5} {:>6} {:>5} {:>5}  {:<28} {:<28}",
        "#",
        "refusals",
        "KL",
        "index",
        "scope",
        "biprj",
        "embd",
        "attention max@pos min/dist",
        "mlp max@pos min/dist"
    );
    let kernel = |k: Option<crate::edit::Kernel>| match k {
        Some(k) => format!(
            "{:.2}@{:.1} {:.2}/{:.1}",
            k.max_weight, k.max_weight_position, k.min_weight, k.min_weight_distance
        ),
        None => "uniform".into(),
    };
    for (n, &i) in result.front.iter().enumerate() {
        let t = &result.trials[i];
        let p = &t.point;
        eprintln!(
            "{} {:>3} {:>7.0}% {:>6.3}  {:>5.2} {:>6} {:>5} {:>5.2}  {:<28} {:<28}{}",
            if *p == result.point { "*" } else { " " },
            n,
            100.0 * t.refusal_rate.unwrap_or(f64::NAN),
            t.kl,
            p.direction_index,
            if p.per_layer { "layer" } else { "global" },
            if p.biprojected { "yes" } else { "no" },
            p.weights.embeddings * p.scale,
            kernel(p.weights.attention),
            kernel(p.weights.mlp),
            if p.scale == 1.0 {
                String::new()
            } else {
                format!("  scale {:.2}", p.scale)
            }
        );
        if let Some(c) = t.confirmed {
            eprintln!(
                "  {:>3} {:>7.0}% {:>6.3}  with fresh prompts pooled",
                "",
                100.0 * c.refusal_rate,
                c.kl
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trial_budget_shrinks_with_the_model() {
        assert_eq!(super::default_trials(145_000_000), 20);
        assert_eq!(super::default_trials(491_400_064), 6);
        assert_eq!(super::default_trials(4_000_000_000), 6);
    }
}
