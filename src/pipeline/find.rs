//! Finding the direction: prompts, search, and the direction file with its provenance.

use super::SearchConfig;
use crate::chat::ChatFormat;
use crate::direction::{self, control_vector, DirectionFile, SearchOptions, SearchResult};
use crate::edit::{EditRecord, PostNorms};
use crate::gguf::GgufFile;
use crate::imatrix::{self, Imatrix, InputSums};
use crate::judge::MarkerJudge;
use crate::prompts::{Kind, PromptSet};
use crate::report::{Reporter, Searched};
use crate::{ffi, output};
use anyhow::{Context, Result};
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A direction found by search, with what is needed to record it.
pub struct Found {
    pub result: SearchResult,
    pub file: DirectionFile,
    pub arch: String,
    /// Importances collected during the capture, when asked for.
    pub imatrix: Option<Arc<Imatrix>>,
}

impl Found {
    pub fn searched(&self) -> Searched<'_> {
        Searched {
            result: &self.result,
            imatrix: self.imatrix.as_deref(),
        }
    }
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

/// What the search learns from the GGUF's header before loading it.
struct ModelFacts {
    arch: String,
    name: String,
    tied_embeddings: bool,
    model_bytes: u64,
    post_norms: PostNorms,
    /// Expert writers are `mul_mat_id`s the hook does not see one by one.
    has_experts: bool,
    /// The weights whose importances to collect (None: collect none).
    imatrix_weights: Option<std::collections::HashSet<String>>,
}

impl ModelFacts {
    fn read(shards: &[GgufFile], collect_imatrix: bool) -> Result<ModelFacts> {
        let arch = shards[0].architecture().unwrap_or("unknown").to_string();
        // Before any search: an unsupported family could only be edited in part.
        crate::edit::check_supported(&arch)?;
        Ok(ModelFacts {
            name: shards[0].get_str("general.name").unwrap_or("").to_string(),
            tied_embeddings: !shards.iter().any(|s| s.tensor("output.weight").is_some()),
            model_bytes: shards
                .iter()
                .map(|s| s.tensors.iter().map(|t| t.size).sum::<u64>())
                .sum(),
            post_norms: PostNorms::read(shards)?,
            has_experts: shards
                .iter()
                .any(|s| s.tensors.iter().any(|t| t.name.contains("_exps"))),
            imatrix_weights: collect_imatrix.then(|| imatrix::edit_targets(shards)),
            arch,
        })
    }
}

pub fn find_direction(input: &Path, args: &SearchConfig, progress: bool) -> Result<Found> {
    let set = |kind, file| load_prompts(kind, file, args.column.as_deref(), args.seed);
    let (harmful, harmless) = (
        set(Kind::Harmful, &args.harmful)?,
        set(Kind::Harmless, &args.harmless)?,
    );
    // Read the header ourselves first: a clear error for a bad file beats llama.cpp's log.
    let facts = ModelFacts::read(&crate::gguf::open_model(input)?, args.collect_imatrix)?;
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
        tied_embeddings: facts.tied_embeddings,
        trials: args
            .trials
            .unwrap_or_else(|| default_trials(facts.model_bytes)),
        seed: args.seed.unwrap_or(0),
        post_norms: facts.post_norms.clone(),
        per_layer: !facts.has_experts,
        max_directions: args.directions,
    };
    let mut inputs = facts.imatrix_weights.clone().map(InputSums::new);
    let result = direction::search(
        &model,
        &fmt,
        &harmful,
        &harmless,
        &opts,
        &MarkerJudge,
        inputs.as_mut(),
    )?;
    let imatrix = inputs.map(|s| s.finish().map(Arc::new)).transpose()?;
    let mut provenance = Map::new();
    provenance.insert("model".into(), facts.name.clone().into());
    provenance.insert("architecture".into(), facts.arch.clone().into());
    provenance.insert("front".into(), front_entries(&result)?.into());
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
    let mut file = DirectionFile::new(result.vectors.clone(), provenance)
        .context("the search produced an unusable direction")?;
    file.edit = Some(EditRecord::of(&result.point));
    Ok(Found {
        result,
        file,
        arch: facts.arch,
        imatrix,
    })
}

/// The front, each point with its direction, so that `--pick N` can apply
/// another point without searching again.
fn front_entries(result: &SearchResult) -> Result<Vec<Json>> {
    result
        .front
        .iter()
        .map(|f| {
            let t = &result.trials[f.trial];
            let mut entry = serde_json::Map::new();
            entry.insert("refusal_rate".into(), serde_json::to_value(t.refusal_rate)?);
            entry.insert("kl".into(), serde_json::to_value(t.kl)?);
            entry.insert("point".into(), serde_json::to_value(&t.point)?);
            direction::put_vectors(&f.vectors, &mut entry);
            Ok(Json::Object(entry))
        })
        .collect()
}

pub fn write_control_vector(
    found: &Found,
    cv: &Path,
    force: bool,
    reporter: &mut dyn Reporter,
) -> Result<()> {
    let result = &found.result;
    let bytes = control_vector::encode(
        &found.arch,
        result.n_layer,
        result.layer(),
        &result.vectors.direction,
    )?;
    output::write_atomic(cv, &bytes, force)?;
    // A control vector adds one vector at one layer: it can steer along the
    // refusal direction, not remove a subspace.
    let subspace = match result.directions() {
        1 => String::new(),
        k => format!(
            "; the refusal direction only, not the other {} directions of the edit's subspace",
            k - 1
        ),
    };
    reporter.wrote(
        cv,
        &format!(
            "llama-cli --control-vector-scaled {}:-1{subspace}",
            cv.display()
        ),
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

#[cfg(test)]
mod tests {
    #[test]
    fn trial_budget_shrinks_with_the_model() {
        assert_eq!(super::default_trials(145_000_000), 20);
        assert_eq!(super::default_trials(491_400_064), 6);
        assert_eq!(super::default_trials(4_000_000_000), 6);
    }
}
