//! Choosing the refusal direction as Arditi et al. (2024) do, measured on
//! the quantized model through llama.cpp, in stages that each take the
//! previous stage's result and return their own:
//! 1. [`prompts`]: the training and validation prompts, tokenized;
//! 2. [`baseline`]: how the unedited model refuses (its replies first, so
//!    that a model with no refusal is told before the capture), and its
//!    refusal tokens;
//! 3. [`capture`]: mean activations at every layer output and
//!    post-instruction position;
//! 4. [`rank`]: every candidate r = mean_harmful − mean_harmless, ranked cheaply;
//! 5. [`evaluate`]: the top K fully evaluated, and the first stage's choice;
//! 6. [`refine`]: the choice's edit refined with TPE, the finalists
//!    confirmed on fresh prompts.

mod baseline;
mod capture;
mod evaluate;
mod measure;
mod prompts;
mod rank;
mod refine;
mod subspace;

pub use rank::CandidateScores;

use super::space::{self, Trial};
use crate::chat::ChatFormat;
use crate::cost::{Meter, StageCost};
use crate::edit::{EditPoint, EditVectors};
use crate::eval::{kl_divergence, AblateHook, Runner};
use crate::ffi::Model;
use crate::imatrix::InputSums;
use crate::judge::{Judge, RefusalToken};
use crate::prompts::PromptSet;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub n_train: usize,
    pub n_val: usize,
    pub layer: Option<usize>,
    pub position: Option<usize>,
    /// Candidates whose harmless-prompt KL exceeds this are discarded.
    pub kl_threshold: f64,
    /// Candidates fully evaluated after the cheap ranking.
    pub top_k: usize,
    /// Harmful prompts used by the cheap ranking.
    pub rank_prompts: usize,
    pub threads: i32,
    pub progress: bool,
    /// The model has no `output.weight`: editing `token_embd` edits the unembedding too.
    pub tied_embeddings: bool,
    /// TPE trials refining the chosen direction's edit (0: none).
    pub trials: usize,
    pub seed: u64,
    /// Post-norm weights, so that the ablation acts where the edit does.
    pub post_norms: crate::edit::PostNorms,
    /// The refinement may give each layer its own direction (not on models
    /// with expert tensors, whose writes the hook cannot ablate per layer).
    pub per_layer: bool,
    /// Directions the edit may remove at most (1: no subspace stage).
    pub max_directions: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            n_train: 128,
            n_val: 32,
            layer: None,
            position: None,
            kl_threshold: 0.25,
            top_k: 3,
            rank_prompts: 3,
            threads: default_threads(),
            progress: true,
            tied_embeddings: false,
            trials: 20,
            seed: 0,
            post_norms: Default::default(),
            per_layer: true,
            max_directions: 1,
        }
    }
}

impl SearchOptions {
    /// Whether the refinement runs: trials asked for, and no layer forced.
    pub fn refining(&self) -> bool {
        self.trials > 0 && self.layer.is_none()
    }
}

pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as i32)
}

/// What every stage reads.
pub struct Setup<'a> {
    model: &'a Model,
    fmt: &'a ChatFormat,
    judge: &'a dyn Judge,
    opts: &'a SearchOptions,
    harmful: &'a PromptSet,
    harmless: &'a PromptSet,
    n_layer: usize,
    /// Post-instruction positions of the chat template.
    n_post: usize,
}

impl Setup<'_> {
    /// Layers captured: all but the last, whose output may hold only
    /// output rows.
    fn capture_layers(&self) -> usize {
        self.n_layer - 1
    }

    /// The run-time edit that removes `direction` from every writer, as
    /// `apply` would (None for a zero direction).
    fn ablation(&self, direction: &[f32]) -> Option<AblateHook> {
        self.ablation_of_subspace(direction, &[])
    }

    /// `ablation` of the subspace `direction` spans with `further`.
    fn ablation_of_subspace(&self, direction: &[f32], further: &[Vec<f32>]) -> Option<AblateHook> {
        let mut hook = AblateHook::new(direction)?
            .with_further(further)?
            .with_post_norms(&self.opts.post_norms);
        hook.unembedding = self.opts.tied_embeddings;
        Some(hook)
    }
}

/// A point of the refusals/KL Pareto front, with what `--pick` applies.
#[derive(Clone, Debug, Serialize)]
pub struct FrontPoint {
    /// Index into `SearchResult::trials`.
    pub trial: usize,
    #[serde(skip)]
    pub vectors: EditVectors,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    /// The chosen point of the edit space.
    pub point: EditPoint,
    /// The chosen point's vectors (its direction is the raw difference of
    /// means for the first stage's choice).
    #[serde(skip)]
    pub vectors: EditVectors,
    /// Every refinement trial, the first stage's choice first.
    pub trials: Vec<Trial>,
    /// The refusals/KL Pareto front, by rising KL.
    pub front: Vec<FrontPoint>,
    pub n_layer: usize,
    pub refusal_tokens: Vec<RefusalToken>,
    /// Mean refusal score of the unedited model on the validation prompts.
    pub baseline_harmful: f64,
    /// Share of harmful validation replies the unedited model refuses.
    pub baseline_refusal_rate: f64,
    pub baseline_harmless: f64,
    /// The refusal score harmless prompts must pass with a candidate added
    /// (induce), from the model's own scores.
    pub induce_threshold: f64,
    /// Harmless validation prompts the model answers (used for KL).
    pub answered_harmless: usize,
    pub kl_threshold: f64,
    /// The first stage's choice.
    pub chosen: CandidateScores,
    /// No first-stage candidate passed the filters: `chosen` has the lowest KL.
    pub fallback: bool,
    /// Fully evaluated candidates not beaten on both bypass and KL, by KL.
    pub frontier: Vec<CandidateScores>,
    pub candidates: Vec<CandidateScores>,
    pub n_train: usize,
    pub n_val: usize,
    pub seconds: f64,
    /// Time and rows decoded in each stage.
    pub stages: Vec<StageCost>,
}

impl SearchResult {
    /// Directions the chosen edit removes.
    pub fn directions(&self) -> usize {
        self.vectors.directions()
    }

    /// The layer whose direction the chosen point's is nearest.
    pub fn layer(&self) -> usize {
        self.point.direction_index.round() as usize
    }
}

/// Finds and scores the refusal direction. `imatrix` observes the
/// capture's decode, collecting importances in the same pass.
pub fn search(
    model: &Model,
    fmt: &ChatFormat,
    harmful: &PromptSet,
    harmless: &PromptSet,
    opts: &SearchOptions,
    judge: &dyn Judge,
    imatrix: Option<&mut InputSums>,
) -> Result<SearchResult> {
    let started = Instant::now();
    let mut meter = Meter::start();
    let s = Setup {
        model,
        fmt,
        judge,
        opts,
        harmful,
        harmless,
        n_layer: model.n_layer(),
        n_post: fmt.n_post(),
    };
    let p = prompts::tokenize(&s, opts)?;
    let mut runner = Runner::new(model, 2048.max(p.longest()), opts.threads)?;
    let replies = baseline::replies(&s, &mut runner, &p)?;
    meter.done("baseline");
    let captured = capture::capture(&s, &mut runner, &p, imatrix)?;
    meter.done("capture");
    let b = baseline::measure(&s, &mut runner, &p, replies, captured)?;
    // The baseline's second part: the account adds it to the first.
    meter.done("baseline");
    let ranked = rank::rank(&s, &mut runner, &p, &b)?;
    let max_layer = ranked.max_layer;
    meter.done("rank");
    let measure = measure::Measure {
        model,
        judge,
        harm_val: &p.harm_val,
        harm_texts: &p.harm_texts,
        safe_answered: &b.safe_answered,
        base_answered: &b.base_answered,
        refusal_ids: &b.refusal_ids,
        kl_threshold: opts.kl_threshold,
    };
    let chosen = evaluate::evaluate(&s, &mut runner, &p, &b, &measure, ranked)?;
    meter.done("evaluate");
    let (trials, picked) = if opts.refining() {
        let mut trials = refine::run_trials(&s, &mut runner, &b, &measure, &chosen, max_layer)?;
        meter.done("refine");
        if opts.max_directions > 1 {
            subspace::extend(&s, &mut runner, &p, &b, &measure, &mut trials)?;
            meter.done("subspace");
        }
        let picked = refine::confirm(&s, &mut runner, &p, &b, &measure, &mut trials)?;
        meter.done("confirm");
        (trials, picked)
    } else {
        meter.done("refine");
        (Vec::new(), None)
    };
    let first = chosen.point();
    let point = picked.map_or_else(|| first.clone(), |i| trials[i].point.clone());
    let further = picked.map_or_else(Vec::new, |i| trials[i].further.clone());
    // One function for the chosen point and the front, so that `--pick`
    // of the chosen point reproduces it exactly.
    let vectors_for = |point: &EditPoint, further: &[Vec<f32>]| -> Result<EditVectors> {
        let direction = if *point == first {
            b.direction(chosen.best.layer, chosen.best.position)
        } else {
            space::point_direction(&b.harmful, &b.harmless, point)?
        };
        Ok(EditVectors {
            direction,
            layer_directions: space::layer_directions(&b.harmful, &b.harmless, point, s.n_layer)?,
            further_directions: further.to_vec(),
        })
    };
    let front = space::pareto_front(&trials)
        .into_iter()
        .map(|i| {
            Ok(FrontPoint {
                trial: i,
                vectors: vectors_for(&trials[i].point, &trials[i].further)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SearchResult {
        vectors: vectors_for(&point, &further)?,
        point,
        trials,
        front,
        n_layer: s.n_layer,
        refusal_tokens: b.refusal_tokens,
        baseline_harmful: b.harmful_score,
        baseline_refusal_rate: b.refusal_rate,
        baseline_harmless: b.harmless_score,
        induce_threshold: chosen.induce_threshold,
        answered_harmless: b.answered_val,
        kl_threshold: opts.kl_threshold,
        chosen: chosen.best,
        fallback: chosen.fallback,
        frontier: chosen.frontier,
        candidates: chosen.candidates,
        n_train: p.harm_train.len(),
        n_val: p.harm_val.len(),
        seconds: started.elapsed().as_secs_f64(),
        stages: meter.stages(),
    })
}

fn bar(progress: bool, len: u64, what: &str) -> ProgressBar {
    if !progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>10} [{{bar:30}}] {{pos}}/{{len}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}

/// Mean KL(base ‖ ablated) over paired first-token distributions.
fn mean_kl(ablated: &[Vec<f32>], base: &[Vec<f32>]) -> f64 {
    mean(
        &ablated
            .iter()
            .zip(base)
            .map(|(q, p)| kl_divergence(p, q))
            .collect::<Vec<_>>(),
    )
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        }
    })
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_measured_exponents() {
        assert_eq!(super::median(&[]), None);
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 1.5]), Some(1.75));
    }
}
