//! Stage 4: every candidate direction (a layer and a post-instruction
//! position) ranked cheaply: bypass and KL on the shortest few prompts,
//! with the candidate ablated, in one batch.

use super::baseline::Baseline;
use super::prompts::Prompts;
use super::{bar, mean, mean_kl, Setup};
use crate::eval::Runner;
use crate::judge::refusal_scores;
use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct CandidateScores {
    pub layer: usize,
    /// Post-instruction position, counted from the first suffix token.
    pub position: usize,
    /// Cheap ranking: mean refusal score and KL on a few prompts, r ablated.
    pub rank_bypass: f64,
    pub rank_kl: f64,
    /// Full evaluation (top K only), at `scale`.
    pub scale: f32,
    /// Share of harmful validation replies judged refusals (or degenerate).
    pub refusal_rate: Option<f64>,
    /// Measured with `token_embd` left unedited.
    pub skip_embeddings: bool,
    /// Mean first-token refusal score on harmful validation prompts.
    pub bypass: Option<f64>,
    pub induce: Option<f64>,
    pub kl: Option<f64>,
    /// Why it was discarded, if it was.
    pub rejected: Option<String>,
}

/// The candidates by rank, best first.
pub struct Ranked {
    pub candidates: Vec<CandidateScores>,
    /// Layers a direction may come from (below 0.8 of the depth).
    pub max_layer: usize,
}

pub fn rank(s: &Setup, runner: &mut Runner, p: &Prompts, b: &Baseline) -> Result<Ranked> {
    let opts = s.opts;
    let capture_layers = s.capture_layers();
    let max_layer = ((0.8 * s.n_layer as f64).ceil() as usize).min(capture_layers);
    let layers: Vec<usize> = match opts.layer {
        Some(l) if l >= capture_layers => {
            bail!("--layer {l} is out of range (0..{})", capture_layers - 1)
        }
        Some(l) => vec![l],
        None => (0..max_layer).collect(),
    };
    let positions: Vec<usize> = match opts.position {
        Some(p) if p >= s.n_post => {
            bail!(
                "--position {p} is out of range (the template adds {} tokens)",
                s.n_post
            )
        }
        Some(p) => vec![p],
        None => (0..s.n_post).collect(),
    };
    let shortest = |set: &[Vec<i32>], n: usize| {
        let mut idx: Vec<usize> = (0..set.len()).collect();
        idx.sort_by_key(|&i| set[i].len());
        idx.truncate(n);
        idx
    };
    let r_harm = shortest(&p.harm_val, opts.rank_prompts);
    let r_safe = shortest(&b.safe_answered, opts.rank_prompts);
    let rank_batch: Vec<Vec<i32>> = r_harm
        .iter()
        .map(|&i| p.harm_val[i].clone())
        .chain(r_safe.iter().map(|&i| b.safe_answered[i].clone()))
        .collect();
    let rank_base: Vec<Vec<f32>> = r_safe.iter().map(|&i| b.base_answered[i].clone()).collect();
    // Coarse to fine: every other layer first, then the layers beside the
    // best few. Neighbouring layers' directions are nearly parallel, so
    // this finds the same top candidates at about half the cost.
    let coarse: Vec<usize> = if layers.len() > 4 {
        layers.iter().copied().step_by(2).collect()
    } else {
        layers.clone()
    };
    let k = opts.top_k.max(1);
    let n_cand = coarse.len() * positions.len() + 2 * k;
    let pb = bar(opts.progress, n_cand as u64, "rank");
    let rank = |runner: &mut Runner, layer: usize, position: usize| -> Result<CandidateScores> {
        let r = b.direction(layer, position);
        let (rank_bypass, rank_kl) = match s.ablation(&r) {
            Some(mut hook) => {
                let lps = runner.first_token_logprobs(&rank_batch, &mut hook)?;
                let (harm, safe) = lps.split_at(r_harm.len());
                (
                    mean(&refusal_scores(harm, &b.refusal_ids)),
                    mean_kl(safe, &rank_base),
                )
            }
            None => (f64::INFINITY, f64::INFINITY),
        };
        pb.inc(1);
        Ok(CandidateScores {
            layer,
            position,
            rank_bypass,
            rank_kl,
            scale: 1.0,
            refusal_rate: None,
            skip_embeddings: false,
            bypass: None,
            induce: None,
            kl: None,
            rejected: None,
        })
    };
    // Lowest bypass first among those whose (noisy) KL is near the
    // threshold; the others after them, gentlest first.
    let lenient = 2.0 * opts.kl_threshold;
    let order = |a: &CandidateScores, b: &CandidateScores| {
        let (fa, fb) = (a.rank_kl > lenient, b.rank_kl > lenient);
        fa.cmp(&fb).then(if fa {
            a.rank_kl.total_cmp(&b.rank_kl)
        } else {
            a.rank_bypass.total_cmp(&b.rank_bypass)
        })
    };
    let mut candidates = Vec::with_capacity(n_cand);
    for &layer in &coarse {
        for &position in &positions {
            candidates.push(rank(runner, layer, position)?);
        }
    }
    candidates.sort_by(order);
    let best_coarse: Vec<(usize, usize)> = candidates
        .iter()
        .take(k)
        .map(|c| (c.layer, c.position))
        .collect();
    for (layer, position) in best_coarse {
        for beside in [layer.wrapping_sub(1), layer + 1] {
            let ranked = candidates
                .iter()
                .any(|c| c.layer == beside && c.position == position);
            if layers.contains(&beside) && !ranked {
                candidates.push(rank(runner, beside, position)?);
            }
        }
    }
    pb.finish_and_clear();
    candidates.sort_by(order);
    Ok(Ranked {
        candidates,
        max_layer,
    })
}
