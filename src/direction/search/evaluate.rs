//! Stage 5: the top K candidates fully evaluated, and the first stage's
//! choice. KL first (cheap); where it is over the threshold, less of the
//! direction is removed (scale < 1) until it is not; then generated
//! replies are judged at that scale. The choice filters as the paper
//! does (KL within the threshold, induce > 0), then takes the fewest
//! refusals and the lowest bypass score.

use super::baseline::Baseline;
use super::measure::Measure;
use super::prompts::Prompts;
use super::rank::{CandidateScores, Ranked};
use super::{bar, mean, Setup};
use crate::edit::{EditPoint, EditWeights};
use crate::eval::{AblateHook, AddHook, Runner};
use crate::judge::refusal_scores;
use anyhow::{Context, Result};

pub struct Chosen {
    /// Every ranked candidate, the evaluated ones first.
    pub candidates: Vec<CandidateScores>,
    /// Fully evaluated candidates not beaten on both bypass and KL, by KL.
    pub frontier: Vec<CandidateScores>,
    /// The first stage's choice.
    pub best: CandidateScores,
    /// No candidate passed the filters: `best` is the one with the lowest KL.
    pub fallback: bool,
    /// KL's exponent in the scale, from every fit that measured one.
    pub powers: Vec<f64>,
}

impl Chosen {
    /// The first stage's choice as a point of the edit space.
    pub fn point(&self) -> EditPoint {
        EditPoint {
            direction_index: self.best.layer as f32,
            position: self.best.position,
            biprojected: false,
            per_layer: false,
            scale: self.best.scale,
            weights: EditWeights::uniform(!self.best.skip_embeddings),
        }
    }
}

pub fn evaluate(
    s: &Setup,
    runner: &mut Runner,
    p: &Prompts,
    b: &Baseline,
    measure: &Measure,
    ranked: Ranked,
) -> Result<Chosen> {
    let opts = s.opts;
    let mut candidates = ranked.candidates;
    let k = opts.top_k.max(1).min(candidates.len());
    let induce_set = &p.safe_val[..p.safe_val.len().div_ceil(2)];
    let pb = bar(opts.progress, k as u64, "evaluate");
    let mut powers: Vec<f64> = Vec::new();
    for c in candidates.iter_mut().take(k) {
        let r = b.direction(c.layer, c.position);
        let mut ablate = s.ablation(&r).context("zero candidate direction")?;
        powers.extend(measure.ablation(runner, &mut ablate, c)?);
        let mut add = AddHook {
            layer: c.layer,
            vector: r,
        };
        let induced = runner.first_token_logprobs(induce_set, &mut add)?;
        c.induce = Some(mean(&refusal_scores(&induced, &b.refusal_ids)));
        pb.inc(1);
    }
    pb.finish_and_clear();
    for c in candidates.iter_mut().take(k) {
        c.rejected = rejection(c, opts.kl_threshold);
    }
    let (mut best, fallback) = choose(&candidates[..k]);
    // Editing token_embd is a choice (with tied embeddings it also edits the
    // unembedding): without a refinement, which searches its weight, the
    // chosen direction is measured without it too, and the better kept.
    if best.rejected.is_none() && !opts.refining() {
        best = without_embeddings(s, runner, b, measure, best)?;
    }
    Ok(Chosen {
        frontier: frontier(&candidates[..k]),
        candidates,
        best,
        fallback,
        powers,
    })
}

/// Why a fully evaluated candidate is discarded, if it is.
fn rejection(c: &CandidateScores, kl_threshold: f64) -> Option<String> {
    if c.scale == 0.0 || c.kl.unwrap() > kl_threshold {
        Some(format!(
            "KL {:.3} > {} at scale {}",
            c.kl.unwrap(),
            kl_threshold,
            c.scale
        ))
    } else if c.induce.unwrap() <= 0.0 {
        Some(format!("induce {:.2} <= 0", c.induce.unwrap()))
    } else {
        None
    }
}

/// The fewest refusals, then the lowest bypass, among those not rejected;
/// the lowest KL when all were (the second value says so).
fn choose(evaluated: &[CandidateScores]) -> (CandidateScores, bool) {
    let key = |c: &CandidateScores| (c.refusal_rate.unwrap(), c.bypass.unwrap());
    let passed = evaluated
        .iter()
        .filter(|c| c.rejected.is_none())
        .min_by(|a, b| {
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    let best = passed.or_else(|| {
        evaluated
            .iter()
            .min_by(|a, b| a.kl.unwrap().total_cmp(&b.kl.unwrap()))
    });
    (
        best.expect("at least one candidate").clone(),
        passed.is_none(),
    )
}

/// `best`, or the same direction with `token_embd` kept where that
/// measures better within the threshold.
fn without_embeddings(
    s: &Setup,
    runner: &mut Runner,
    b: &Baseline,
    measure: &Measure,
    best: CandidateScores,
) -> Result<CandidateScores> {
    let mut without = best.clone();
    let mut ablate = AblateHook::new(&b.direction(best.layer, best.position))
        .context("zero direction")?
        .with_post_norms(&s.opts.post_norms);
    // Keeping token_embd keeps the tied unembedding too.
    ablate.embeddings = false;
    measure.ablation(runner, &mut ablate, &mut without)?;
    without.skip_embeddings = true;
    let better = without.scale > 0.0
        && without.kl.unwrap() <= s.opts.kl_threshold
        && (without.refusal_rate.unwrap(), without.kl.unwrap())
            < (best.refusal_rate.unwrap(), best.kl.unwrap());
    Ok(if better { without } else { best })
}

/// The bypass/KL Pareto frontier: by rising KL, each lowers the bypass.
fn frontier(evaluated: &[CandidateScores]) -> Vec<CandidateScores> {
    let mut by_kl: Vec<&CandidateScores> = evaluated.iter().filter(|c| c.kl.is_some()).collect();
    by_kl.sort_by(|a, b| a.kl.unwrap().total_cmp(&b.kl.unwrap()));
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for c in by_kl {
        if c.bypass.unwrap() < best {
            best = c.bypass.unwrap();
            out.push(c.clone());
        }
    }
    out
}
