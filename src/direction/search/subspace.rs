//! Stage 7: further directions for the refusals an edit leaves. The
//! harmful training prompts that the refinement's provisional pick still
//! refuses, through the hook, are captured with its edit in place against
//! harmless ones; their difference of means at the edit's layer and
//! position, orthogonal to the directions already found, is one more
//! direction of a subspace. Each subspace is measured as trials at the
//! pick's KL and at the KL limit, so that the front shows what a further
//! direction costs and buys; it grows while it lowers refusals.
//!
//! The still-refused prompts, not all harmful ones, make the direction:
//! what the first direction removed is no longer in their mean, and what
//! is left is what kept them refusing (Wollschläger et al., 2025, find
//! refusal spread over several such directions).

use super::baseline::Baseline;
use super::measure::Measure;
use super::prompts::Prompts;
use super::refine::hook_for_subspace;
use super::{bar, Setup};
use crate::activations::capture_edited;
use crate::direction::space::{self, Trial};
use crate::edit::{self, EditPoint};
use crate::eval::Runner;
use crate::judge::{self, stop_when_settled, JUDGE_TOKENS};
use anyhow::Result;
use indicatif::ProgressBar;

/// Fewest still-refused training prompts a further direction is made of:
/// a mean of fewer is mostly noise.
const MIN_REFUSED: usize = 4;
/// Harmless training prompts captured under the edit.
const HARMLESS: usize = 64;
/// A trial at the KL limit is measured too unless the pick's KL is this
/// close to it.
const DISTINCT_TARGET: f64 = 0.8;

/// Adds subspace trials (up to `max_directions` directions) after the
/// refinement's trials, starting from the provisional pick.
pub fn extend(
    s: &Setup,
    runner: &mut Runner,
    p: &Prompts,
    b: &Baseline,
    measure: &Measure,
    trials: &mut Vec<Trial>,
) -> Result<()> {
    let opts = s.opts;
    let n_search = p.harm_val.len();
    let Some(start) = space::pick(trials, opts.kl_threshold, n_search) else {
        return Ok(());
    };
    let base = trials[start].clone();
    let Some(mut best) = base.refusal_rate else {
        return Ok(());
    };
    let layer = (base.point.direction_index.round() as usize).min(s.capture_layers() - 1);
    let position = base.point.position;
    let texts: Vec<&str> = s
        .harmful
        .train
        .iter()
        .take(p.harm_train.len())
        .map(|p| p.text.as_str())
        .collect();
    let harmless = &p.safe_train[..p.safe_train.len().min(HARMLESS)];
    let r = space::point_direction(&b.harmful, &b.harmless, &base.point)?;
    let pb = bar(
        opts.progress,
        opts.max_directions.saturating_sub(1) as u64,
        "subspace",
    );
    let hidden = ProgressBar::hidden();
    let mut further: Vec<Vec<f32>> = Vec::new();
    while 1 + further.len() < opts.max_directions {
        let mut hook = hook_for_subspace(s, b, &base.point, &further)?;
        hook.scale = base.point.scale;
        let settled = stop_when_settled(s.judge, s.model);
        let replies = runner.generate_until(&p.harm_train, JUDGE_TOKENS, &mut hook, &settled)?;
        let refused: Vec<Vec<i32>> = judge::refused(s.judge, s.model, &replies, &texts)
            .zip(&p.harm_train)
            .filter(|&(refused, _)| refused)
            .map(|(_, prompt)| prompt.clone())
            .collect();
        if refused.len() < MIN_REFUSED {
            break;
        }
        // Against harmless prompts, as the first direction is made: against
        // the harmful prompts the edit lets through, or from the replies'
        // own first tokens, the fixture's subspace trials refused more
        // (docs/figures.md).
        let still = capture_edited(runner, &refused, layer + 1, s.n_post, &hidden, &mut hook)?;
        let answered = capture_edited(runner, harmless, layer + 1, s.n_post, &hidden, &mut hook)?;
        let d = still.minus(&answered, layer, position);
        let Some(basis) = edit::writer_basis(&r, &[further.as_slice(), &[d]].concat(), None) else {
            break;
        };
        if basis.len() < 2 + further.len() {
            // Already in the span: nothing further to remove.
            break;
        }
        further.push(basis[basis.len() - 1].clone());
        let unscaled = EditPoint {
            scale: 1.0,
            ..base.point.clone()
        };
        let mut targets = vec![base.kl];
        if base.kl < DISTINCT_TARGET * opts.kl_threshold {
            targets.push(opts.kl_threshold);
        }
        let mut improved = false;
        for target in targets {
            let mut hook = hook_for_subspace(s, b, &unscaled, &further)?;
            let (rate, fit) = measure.trial(runner, &mut hook, target, best, 2.0)?;
            trials.push(Trial {
                point: EditPoint {
                    scale: fit.scale,
                    ..unscaled.clone()
                },
                refusal_rate: rate,
                kl: fit.kl,
                confirmed: None,
                directions: 1 + further.len(),
                further: further.clone(),
            });
            if let Some(rate) = rate.filter(|&rate| rate < best) {
                best = rate;
                improved = true;
            }
        }
        pb.inc(1);
        if !improved {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(())
}
