//! Stage 5: the top K candidates fully evaluated, and the first stage's
//! choice. KL first (cheap); where it is over the threshold, less of the
//! direction is removed (scale < 1) until it is not; then generated
//! replies are judged at that scale. The choice filters as the paper
//! does (KL within the threshold, induce above [`induce_threshold`]), then
//! takes the lowest KL among the candidates whose refusals are within
//! noise of the fewest, as the default pick does.

use super::baseline::Baseline;
use super::measure::Measure;
use super::prompts::Prompts;
use super::rank::{CandidateScores, Ranked};
use super::{bar, mean, Setup};
use crate::direction::space;
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
    /// The refusal score induce had to pass (`induce_threshold`).
    pub induce_threshold: f64,
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
    let induce_min = induce_threshold(b.harmful_score, b.harmless_score);
    for c in candidates.iter_mut().take(k) {
        c.rejected = rejection(c, opts.kl_threshold, induce_min);
    }
    let (mut best, fallback) = choose(&candidates[..k], p.harm_val.len());
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
        induce_threshold: induce_min,
        powers,
    })
}

/// The mean refusal score that harmless prompts must pass with a candidate
/// added (induce): the paper's 0, likelier to refuse than not, where the
/// model's own harmful prompts pass it. Where they do not (a model that
/// opens few replies with its refusal token, as Qwen2.5-Coder-0.5B with
/// "I"), no direction can push harmless prompts past 0 and the paper's
/// test would reject every candidate; there a candidate must move them
/// halfway from the model's harmless score to its harmful one.
fn induce_threshold(harmful_score: f64, harmless_score: f64) -> f64 {
    if harmful_score > 0.0 {
        0.0
    } else {
        0.5 * (harmful_score + harmless_score)
    }
}

/// Why a fully evaluated candidate is discarded, if it is.
fn rejection(c: &CandidateScores, kl_threshold: f64, induce_min: f64) -> Option<String> {
    if c.scale == 0.0 || c.kl.unwrap() > kl_threshold {
        Some(format!(
            "KL {:.3} > {} at scale {}",
            c.kl.unwrap(),
            kl_threshold,
            c.scale
        ))
    } else if c.induce.unwrap() <= induce_min {
        Some(format!(
            "induce {:.2} <= {induce_min:.2}",
            c.induce.unwrap()
        ))
    } else {
        None
    }
}

/// Among the candidates not rejected, the lowest KL of those whose
/// refusals (on `n` prompts) are within noise of the fewest: a reply or
/// two in 32 is noise, the KL a direction costs is not. The lowest KL of
/// all when every candidate was rejected (the second value says so).
fn choose(evaluated: &[CandidateScores], n: usize) -> (CandidateScores, bool) {
    let passed: Vec<(usize, f64, f64)> = evaluated
        .iter()
        .enumerate()
        .filter(|(_, c)| c.rejected.is_none())
        .map(|(i, c)| (i, c.refusal_rate.unwrap(), c.kl.unwrap()))
        .collect();
    let chosen = space::gentlest_within_noise(&passed, n);
    let best = chosen.or_else(|| {
        (0..evaluated.len()).min_by(|&a, &b| {
            evaluated[a]
                .kl
                .unwrap()
                .total_cmp(&evaluated[b].kl.unwrap())
        })
    });
    (
        evaluated[best.expect("at least one candidate")].clone(),
        chosen.is_none(),
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

#[cfg(test)]
mod tests {
    use super::{choose, induce_threshold, rejection, CandidateScores};

    /// A fully evaluated candidate with the figures of a real run.
    fn candidate(layer: usize, position: usize, refusal_rate: f64, kl: f64) -> CandidateScores {
        CandidateScores {
            layer,
            position,
            rank_bypass: 0.0,
            rank_kl: 0.0,
            scale: 1.0,
            refusal_rate: Some(refusal_rate),
            skip_embeddings: false,
            bypass: Some(0.0),
            induce: None,
            kl: Some(kl),
            rejected: None,
        }
    }

    /// Qwen2.5-Coder-0.5B's three candidates (refusals of 32 replies, KL,
    /// induce): all pass its threshold of -3.22, where the paper's 0
    /// rejected them all and the first stage fell back to the lowest KL.
    /// 1 reply in 32 is within noise of none: the gentlest is chosen.
    #[test]
    fn the_first_stage_takes_the_gentlest_within_noise_of_the_fewest_refusals() {
        let mut qwen = [
            (candidate(18, 3, 0.0, 0.237), -2.34),
            (candidate(16, 3, 0.0, 0.236), -2.49),
            (candidate(16, 4, 1.0 / 32.0, 0.171), -2.61),
        ]
        .map(|(mut c, induce)| {
            c.induce = Some(induce);
            c
        });
        let threshold = induce_threshold(-1.75, -4.69);
        for c in &mut qwen {
            c.rejected = rejection(c, 0.25, threshold);
            assert_eq!(c.rejected, None);
        }
        let (best, fallback) = choose(&qwen, 32);
        assert_eq!((best.layer, best.position, fallback), (16, 4, false));
        // Under the paper's 0 every one is rejected: the fallback.
        for c in &mut qwen {
            c.rejected = rejection(c, 0.25, 0.0);
            assert!(c.rejected.is_some());
        }
        let (best, fallback) = choose(&qwen, 32);
        assert_eq!((best.layer, best.position, fallback), (16, 4, true));
        // The fixture: 75 % against 47 % is beyond noise, so the fewer
        // refusals win over the lower KL.
        let fixture = [
            candidate(22, 5, 0.75, 0.238),
            candidate(21, 5, 0.469, 0.246),
        ];
        let (best, fallback) = choose(&fixture, 32);
        assert_eq!((best.layer, best.position, fallback), (21, 5, false));
    }

    #[test]
    fn induce_is_judged_against_the_models_own_scores() {
        // The fixture: its harmful prompts score above 0, the paper's test.
        assert_eq!(induce_threshold(1.24, -3.29), 0.0);
        // Qwen2.5-Coder-0.5B: halfway, -3.22; its candidates at -2.34 to
        // -2.61 pass it.
        assert!((induce_threshold(-1.75, -4.69) - (-3.22)).abs() < 1e-12);
        assert!(induce_threshold(-1.75, -4.69) < -2.61);
    }
}
