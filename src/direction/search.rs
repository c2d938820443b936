//! Choosing the refusal direction as Arditi et al. (2024) do, measured on
//! the quantized model through llama.cpp:
//! 1. capture mean activations for harmful and harmless training prompts at
//!    every layer output and post-instruction position;
//! 2. each (layer, position) gives a candidate r = mean_harmful − mean_harmless;
//! 3. rank all candidates cheaply (bypass score on a few prompts), then
//!    fully evaluate the top K: bypass (refusal with r ablated everywhere),
//!    induce (refusal on harmless prompts with r added at its layer) and
//!    KL (first-token drift on harmless prompts the model answers);
//! 4. discard layers ≥ 0.8 L, induce ≤ 0, KL > threshold; take the lowest bypass.

use super::refine::{self, EditPoint, Optimizer, Space, Trial};
use crate::activations::capture_collecting;
use crate::chat::ChatFormat;
use crate::eval::{kl_divergence, refusal_score, AblateHook, AddHook, NoHook, Runner};
use crate::ffi::Model;
use crate::prompts::PromptSet;
use crate::verify::{detokenize, has_refusal_marker, judge, judge_answer, Verdict};

/// KL measurements when searching the largest scale within the KL threshold.
const SCALE_STEPS: usize = 3;
/// The share of the KL threshold that search aims at, so that a small
/// misfit lands within it rather than just over.
const AIM: f64 = 0.95;
/// Tokens generated per reply when judging refusals during the search:
/// enough for the judge to see whether a reply answers the request.
pub const JUDGE_TOKENS: usize = 24;
/// Front points measured again on fresh prompts before the pick.
const FINALISTS: usize = 2;
/// A trial scaled down to its KL target stops at the first scale whose KL
/// is at least this share of the target: each KL costs a pass over the
/// KL prompts, and a trial only needs to land near its target.
const TRIAL_CLOSE: f64 = 0.6;
/// Below this share of harmful prompts refused, there is nothing to remove.
const MIN_BASELINE_REFUSAL: f64 = 0.05;
use crate::cost::{Meter, StageCost};
use anyhow::{bail, Context, Result};
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
    /// Weights whose importances to collect during the capture (none: skip).
    pub imatrix_weights: Option<std::collections::HashSet<String>>,
    /// The refinement may give each layer its own direction (not on models
    /// with expert tensors, whose writes the hook cannot ablate per layer).
    pub per_layer: bool,
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
            imatrix_weights: None,
            per_layer: true,
        }
    }
}

pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as i32)
}

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

#[derive(Clone, Debug, Serialize)]
pub struct RefusalToken {
    pub id: i32,
    pub text: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    /// The raw difference of means (not normalised).
    #[serde(skip)]
    pub direction: Vec<f32>,
    pub layer: usize,
    pub position: usize,
    /// Share of the direction to remove (`apply --scale`).
    pub scale: f32,
    /// Leave `token_embd` unedited (measured to be better).
    pub skip_embeddings: bool,
    /// The chosen point of the edit space (direction index, biprojection,
    /// per-layer weights).
    pub point: EditPoint,
    /// Every refinement trial, the first stage's choice first.
    pub trials: Vec<Trial>,
    /// Indices into `trials` of the refusals/KL Pareto front, by rising KL.
    pub front: Vec<usize>,
    /// The direction of each front point, in `front`'s order (for `--pick`).
    #[serde(skip)]
    pub front_directions: Vec<Vec<f32>>,
    /// The chosen point's per-layer directions (empty: global scope).
    #[serde(skip)]
    pub layer_directions: Vec<Vec<f32>>,
    /// Each front point's per-layer directions, in `front`'s order.
    #[serde(skip)]
    pub front_layer_directions: Vec<Vec<Vec<f32>>>,
    pub n_layer: usize,
    pub refusal_tokens: Vec<RefusalToken>,
    /// Mean refusal score of the unedited model on the validation prompts.
    pub baseline_harmful: f64,
    /// Share of harmful validation replies the unedited model refuses.
    pub baseline_refusal_rate: f64,
    pub baseline_harmless: f64,
    /// Harmless validation prompts the model answers (used for KL).
    pub answered_harmless: usize,
    pub kl_threshold: f64,
    pub chosen: CandidateScores,
    /// Fully evaluated candidates not beaten on both bypass and KL, by KL.
    pub frontier: Vec<CandidateScores>,
    pub candidates: Vec<CandidateScores>,
    pub n_train: usize,
    pub n_val: usize,
    pub seconds: f64,
    /// Time and rows decoded in each stage: capture, baseline, rank,
    /// evaluate, refine, confirm.
    pub stages: Vec<StageCost>,
    /// Importances collected during the capture (`imatrix_weights`).
    #[serde(skip)]
    pub imatrix: Option<std::sync::Arc<crate::imatrix::Imatrix>>,
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

fn tokenize_all(
    model: &Model,
    fmt: &ChatFormat,
    prompts: &[crate::prompts::Prompt],
) -> Result<Vec<Vec<i32>>> {
    prompts
        .iter()
        .map(|p| fmt.tokenize(model, &p.text))
        .collect()
}

/// `take` training prompts of `set` after the first `skip`.
fn train_after(set: &PromptSet, skip: usize, take: usize) -> Vec<crate::prompts::Prompt> {
    set.train.iter().skip(skip).take(take).cloned().collect()
}

/// Prompts (tokens) with their first-token log-probabilities.
type PromptsWithLogProbs = (Vec<Vec<i32>>, Vec<Vec<f32>>);

/// The prompts the unedited model answers (first-token refusal score
/// below 0), with their first-token log-probabilities.
fn answered_prompts(
    runner: &mut Runner,
    prompts: Vec<Vec<i32>>,
    refusal_ids: &[i32],
) -> Result<PromptsWithLogProbs> {
    let base = runner.first_token_logprobs(&prompts, &mut NoHook)?;
    Ok(prompts
        .into_iter()
        .zip(base)
        .filter(|(_, lp)| refusal_score(lp, refusal_ids) < 0.0)
        .unzip())
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

/// Refusal scores of first-token log-probabilities.
fn refusal_scores<'a>(
    log_probs: impl IntoIterator<Item = &'a Vec<f32>>,
    refusal_ids: &[i32],
) -> Vec<f64> {
    log_probs
        .into_iter()
        .map(|lp| refusal_score(lp, refusal_ids))
        .collect()
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

/// Finds and scores the refusal direction.
pub fn search(
    model: &Model,
    fmt: &ChatFormat,
    harmful: &PromptSet,
    harmless: &PromptSet,
    opts: &SearchOptions,
) -> Result<SearchResult> {
    let started = Instant::now();
    let mut meter = Meter::start();
    let n_layer = model.n_layer();
    let n_post = fmt.n_post();
    let take = |v: &[crate::prompts::Prompt], n: usize| v[..n.min(v.len())].to_vec();
    let (harm_train, safe_train) = (
        take(&harmful.train, opts.n_train),
        take(&harmless.train, opts.n_train),
    );
    let (harm_val, safe_val) = (
        take(&harmful.val, opts.n_val),
        take(&harmless.val, opts.n_val),
    );
    if harm_train.is_empty() || safe_train.is_empty() || harm_val.is_empty() || safe_val.is_empty()
    {
        bail!("the prompt sets need training and validation instructions");
    }
    let harm_train = tokenize_all(model, fmt, &harm_train)?;
    let safe_train = tokenize_all(model, fmt, &safe_train)?;
    let harm_val = tokenize_all(model, fmt, &harm_val)?;
    let safe_val = tokenize_all(model, fmt, &safe_val)?;
    let longest = [&harm_train, &safe_train, &harm_val, &safe_val]
        .iter()
        .flat_map(|s| s.iter())
        .map(Vec::len)
        .max();
    let mut runner = Runner::new(model, 2048.max(longest.unwrap_or(0)), opts.threads)?;

    // 1. Capture (all layers but the last, whose output may hold only output rows).
    let capture_layers = n_layer - 1;
    let tokens: u64 = harm_train
        .iter()
        .chain(&safe_train)
        .map(|p| p.len() as u64)
        .sum();
    let pb = bar(opts.progress, tokens, "capture");
    let mut inputs = opts
        .imatrix_weights
        .clone()
        .map(crate::imatrix::InputSums::new);
    let (harm_means, lp_harm) = capture_collecting(
        &mut runner,
        &harm_train,
        capture_layers,
        n_post,
        &pb,
        inputs.as_mut(),
    )?;
    let (safe_means, lp_safe) = capture_collecting(
        &mut runner,
        &safe_train,
        capture_layers,
        n_post,
        &pb,
        inputs.as_mut(),
    )?;
    let imatrix = inputs
        .map(|s| s.finish().map(std::sync::Arc::new))
        .transpose()?;
    pb.finish_and_clear();
    meter.done("capture");
    // A corrupted tensor (NaN/Inf weights, an F16 overflow) poisons every
    // later activation: say so here, before it becomes a NaN direction.
    for (set, means) in [("harmful", &harm_means), ("harmless", &safe_means)] {
        if let Some(i) = means.values.iter().position(|x| !x.is_finite()) {
            bail!(
                "the model's activations on {set} prompts hold NaN/Inf (first at layer {}); is a tensor corrupted?",
                i / (means.n_pos * means.n_embd).max(1)
            );
        }
    }

    // The baseline, judged from replies: how often the model refuses, and
    // how its refusals begin. A model that does not refuse is told so now,
    // before minutes of search.
    let harm_texts: Vec<String> = take(&harmful.val, opts.n_val)
        .into_iter()
        .map(|p| p.text)
        .collect();
    let replies = runner.generate(&harm_val, JUDGE_TOKENS, &mut NoHook)?;
    // The first-token distributions of the replies judged refusals and of
    // those judged real answers (and, below, of the harmless answers).
    let mut refused_first = Vec::new();
    let mut complied_first = Vec::new();
    for (g, request) in replies.into_iter().zip(&harm_texts) {
        match judge_answer(request, &detokenize(model, &g.tokens), &g.tokens) {
            Verdict::Refused => refused_first.push(g.first_log_probs),
            Verdict::Complied => complied_first.push(g.first_log_probs),
            _ => {}
        }
    }
    let n_replies = harm_val.len();
    let baseline_refusal_rate = refused_first.len() as f64 / n_replies.max(1) as f64;
    if baseline_refusal_rate < MIN_BASELINE_REFUSAL {
        bail!(
            "the model refuses {} of {} harmful validation prompts ({:.0}%, judged from its replies): \
             there is no refusal to remove (a base model, or one already abliterated?)",
            refused_first.len(),
            n_replies,
            100.0 * baseline_refusal_rate
        );
    }
    let answered_first: Vec<Vec<f32>> = runner
        .generate(&safe_val, JUDGE_TOKENS, &mut NoHook)?
        .into_iter()
        .filter(|g| judge(&detokenize(model, &g.tokens), &g.tokens) == Verdict::Complied)
        .map(|g| g.first_log_probs)
        .collect();
    let refusal_ids = refusal_tokens(
        &lp_harm,
        &lp_safe,
        &refused_first,
        &Answers {
            harmless: &answered_first,
            harmful: &complied_first,
        },
    );
    if refusal_ids.is_empty() {
        bail!("the model's refusals begin with no token: there is nothing to score refusals by");
    }
    drop(lp_harm);
    let refusal: Vec<RefusalToken> = refusal_ids
        .iter()
        .map(|&id| RefusalToken {
            id,
            text: model.token_to_piece(id),
        })
        .collect();

    // Baselines on validation prompts.
    let base_harm = runner.first_token_logprobs(&harm_val, &mut NoHook)?;
    let base_safe = runner.first_token_logprobs(&safe_val, &mut NoHook)?;
    let score = |lps: &[Vec<f32>]| refusal_scores(lps, &refusal_ids);
    let safe_scores = score(&base_safe);
    // KL is measured only where the model answers: un-refusing a harmless
    // prompt it used to refuse is the point, not damage.
    let answered: Vec<usize> = (0..safe_val.len())
        .filter(|&i| safe_scores[i] < 0.0)
        .collect();
    if answered.is_empty() {
        bail!(
            "the model refuses every harmless validation prompt; there is nothing to measure KL on"
        );
    }
    let mut safe_answered: Vec<Vec<i32>> = answered.iter().map(|&i| safe_val[i].clone()).collect();
    let mut base_answered: Vec<Vec<f32>> = answered.iter().map(|&i| base_safe[i].clone()).collect();
    // KL is cheap (first tokens only) and noisy on a few prompts: the
    // refinement's many trials would fit its noise. So it is also measured
    // on answered training prompts the capture did not use (up to as many
    // again). Not on the captured ones: the direction is made from their
    // means (and biprojection removes their harmless mean), so KL there is
    // biased low; on the fixture a per-layer point measured 0.22 on them
    // with the validation prompts, 0.26 on the validation prompts alone.
    drop(lp_safe);
    let spare = train_after(harmless, safe_train.len(), safe_val.len());
    let (spare_answered, spare_base) =
        answered_prompts(&mut runner, tokenize_all(model, fmt, &spare)?, &refusal_ids)?;
    safe_answered.extend(spare_answered);
    base_answered.extend(spare_base);
    meter.done("baseline");

    // 2. Candidates.
    let max_layer = ((0.8 * n_layer as f64).ceil() as usize).min(capture_layers);
    let layers: Vec<usize> = match opts.layer {
        Some(l) if l >= capture_layers => {
            bail!("--layer {l} is out of range (0..{})", capture_layers - 1)
        }
        Some(l) => vec![l],
        None => (0..max_layer).collect(),
    };
    let positions: Vec<usize> = match opts.position {
        Some(p) if p >= n_post => {
            bail!("--position {p} is out of range (the template adds {n_post} tokens)")
        }
        Some(p) => vec![p],
        None => (0..n_post).collect(),
    };
    let direction_of = |l: usize, p: usize| harm_means.minus(&safe_means, l, p);

    // 3a. Cheap ranking: bypass and KL on the shortest few prompts, in one batch.
    let shortest = |set: &[Vec<i32>], n: usize| {
        let mut idx: Vec<usize> = (0..set.len()).collect();
        idx.sort_by_key(|&i| set[i].len());
        idx.truncate(n);
        idx
    };
    let r_harm = shortest(&harm_val, opts.rank_prompts);
    let r_safe = shortest(&safe_answered, opts.rank_prompts);
    let rank_batch: Vec<Vec<i32>> = r_harm
        .iter()
        .map(|&i| harm_val[i].clone())
        .chain(r_safe.iter().map(|&i| safe_answered[i].clone()))
        .collect();
    let rank_base: Vec<Vec<f32>> = r_safe.iter().map(|&i| base_answered[i].clone()).collect();
    // Coarse to fine: every other layer first, then the layers beside the
    // best few. Neighbouring layers' directions are nearly parallel, so
    // this finds the same top candidates at about half the cost (Qwen2.5-
    // Coder-0.5B: 100 candidates -> 55).
    let coarse: Vec<usize> = if layers.len() > 4 {
        layers.iter().copied().step_by(2).collect()
    } else {
        layers.clone()
    };
    let k = opts.top_k.max(1);
    let n_cand = coarse.len() * positions.len() + 2 * k;
    let pb = bar(opts.progress, n_cand as u64, "rank");
    let rank = |runner: &mut Runner, layer: usize, position: usize| -> Result<CandidateScores> {
        let r = direction_of(layer, position);
        let hook = AblateHook::new(&r).map(|h| h.with_post_norms(&opts.post_norms));
        let (rank_bypass, rank_kl) = match hook {
            Some(mut hook) => {
                hook.unembedding = opts.tied_embeddings;
                let lps = runner.first_token_logprobs(&rank_batch, &mut hook)?;
                let (harm, safe) = lps.split_at(r_harm.len());
                (mean(&score(harm)), mean_kl(safe, &rank_base))
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
            candidates.push(rank(&mut runner, layer, position)?);
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
                candidates.push(rank(&mut runner, beside, position)?);
            }
        }
    }
    pb.finish_and_clear();
    candidates.sort_by(order);

    // 3b. Full evaluation of the top K. KL first (cheap); where it is over
    // the threshold, remove less of the direction (scale < 1) until it is
    // not; then judge generated replies at that scale.
    meter.done("rank");
    let k = k.min(candidates.len());
    let induce_set = &safe_val[..safe_val.len().div_ceil(2)];
    let pb = bar(opts.progress, k as u64, "evaluate");
    let measure = Measure {
        model,
        harm_val: &harm_val,
        harm_texts: &harm_texts,
        safe_answered: &safe_answered,
        base_answered: &base_answered,
        refusal_ids: &refusal_ids,
        kl_threshold: opts.kl_threshold,
    };
    // KL's exponent in the scale, from every fit that measured one.
    let mut powers: Vec<f64> = Vec::new();
    for c in candidates.iter_mut().take(k) {
        let r = direction_of(c.layer, c.position);
        let mut ablate = AblateHook::new(&r)
            .context("zero candidate direction")?
            .with_post_norms(&opts.post_norms);
        ablate.unembedding = opts.tied_embeddings;
        powers.extend(measure.ablation(&mut runner, &mut ablate, c)?);
        let mut add = AddHook {
            layer: c.layer,
            vector: r,
        };
        c.induce = Some(mean(&score(
            &runner.first_token_logprobs(induce_set, &mut add)?,
        )));
        pb.inc(1);
    }
    pb.finish_and_clear();

    // 4. Filter and choose, as the paper does: KL within the threshold and
    // induce > 0 (adding r makes harmless prompts refused); then the fewest
    // refusals, then the lowest bypass score.
    for c in candidates.iter_mut().take(k) {
        c.rejected = if c.scale == 0.0 || c.kl.unwrap() > opts.kl_threshold {
            Some(format!(
                "KL {:.3} > {} at scale {}",
                c.kl.unwrap(),
                opts.kl_threshold,
                c.scale
            ))
        } else if c.induce.unwrap() <= 0.0 {
            Some(format!("induce {:.2} <= 0", c.induce.unwrap()))
        } else {
            None
        };
    }
    let evaluated = &candidates[..k];
    let key = |c: &CandidateScores| (c.refusal_rate.unwrap(), c.bypass.unwrap());
    let best = evaluated
        .iter()
        .filter(|c| c.rejected.is_none())
        .min_by(|a, b| {
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .or_else(|| {
            eprintln!(
                "warning: no candidate passed the filters; taking the one with the lowest KL"
            );
            evaluated
                .iter()
                .min_by(|a, b| a.kl.unwrap().total_cmp(&b.kl.unwrap()))
        })
        .expect("at least one candidate")
        .clone();
    // Editing token_embd is a choice (with tied embeddings it also edits the
    // unembedding): without a refinement, which searches its weight, measure
    // the chosen direction without it and keep the better.
    let refining = opts.trials > 0 && opts.layer.is_none();
    let mut best = best;
    if best.rejected.is_none() && !refining {
        let mut without = best.clone();
        let mut ablate = AblateHook::new(&direction_of(best.layer, best.position))
            .context("zero direction")?
            .with_post_norms(&opts.post_norms);
        // Keeping token_embd keeps the tied unembedding too.
        ablate.embeddings = false;
        measure.ablation(&mut runner, &mut ablate, &mut without)?;
        without.skip_embeddings = true;
        let better = without.scale > 0.0
            && without.kl.unwrap() <= opts.kl_threshold
            && (without.refusal_rate.unwrap(), without.kl.unwrap())
                < (best.refusal_rate.unwrap(), best.kl.unwrap());
        if better {
            best = without;
        }
    }

    let frontier = frontier(&candidates[..k]);

    meter.done("evaluate");

    // 5. Refine the edit around the chosen direction with TPE.
    let first = EditPoint {
        direction_index: best.layer as f32,
        position: best.position,
        biprojected: false,
        per_layer: false,
        scale: best.scale,
        weights: crate::edit::EditWeights::uniform(!best.skip_embeddings),
    };
    let mut trials = Vec::new();
    let mut chosen_point = first.clone();
    if refining {
        let space = Space {
            n_layer,
            direction_layers: (
                best.layer.saturating_sub(4),
                (best.layer + 2).min(max_layer.max(1) - 1),
            ),
            position: best.position,
            per_layer: opts.per_layer,
        };
        let mut optimizer = Optimizer::new(space, opts.seed)?;
        let pb = bar(opts.progress, opts.trials as u64 + 1, "refine");
        let trial_hook = |point: &EditPoint| -> Result<AblateHook> {
            let r = refine::point_direction(&harm_means, &safe_means, point)?;
            let layers = refine::layer_directions(&harm_means, &safe_means, point, n_layer)?;
            let mut hook = AblateHook::new(&r)
                .context("zero refined direction")?
                .with_post_norms(&opts.post_norms)
                .with_layer_directions(&layers, &opts.post_norms);
            hook.scale = point.scale;
            hook.weights = point.weights;
            hook.unembedding = opts.tied_embeddings;
            Ok(hook)
        };
        // The fits' starting exponent: the median of those measured so far
        // in this run (one model's KL grows alike with most edits' scale),
        // quadratic before any; a good start saves KL passes.
        let mut run_trial =
            |point: &EditPoint, runner: &mut Runner, target: f64, best: f64| -> Result<Trial> {
                let mut hook = trial_hook(point)?;
                let (refusal_rate, Fit { scale, kl, power }) = measure.trial(
                    runner,
                    &mut hook,
                    target,
                    best,
                    median(&powers).unwrap_or(2.0),
                )?;
                powers.extend(power);
                pb.inc(1);
                Ok(Trial {
                    point: EditPoint {
                        scale,
                        ..point.clone()
                    },
                    refusal_rate,
                    kl,
                    confirmed: None,
                })
            };
        // The first stage measured its choice already, on the same prompts
        // and with the edit the file gets for it: not measured again.
        let t = match (best.refusal_rate, best.kl) {
            (Some(refusal_rate), Some(kl)) if best.scale > 0.0 && kl <= opts.kl_threshold => {
                pb.inc(1);
                Trial {
                    point: first.clone(),
                    refusal_rate: Some(refusal_rate),
                    kl,
                    confirmed: None,
                }
            }
            _ => run_trial(&first, &mut runner, opts.kl_threshold, 1.0)?,
        };
        // Every trial's raw parameters, to refit the optimizer to each target.
        let mut raws = vec![optimizer.raw_of(&first)];
        trials.push(t);
        let startup = refine::startup_trials(opts.trials);
        let seed = opts
            .per_layer
            .then(|| refine::per_layer_seed(&first, n_layer));
        for i in 0..opts.trials {
            let target = opts.kl_threshold
                * refine::TARGET_LADDER[i.saturating_sub(startup) % refine::TARGET_LADDER.len()];
            let (point, raw) = match &seed {
                // The first startup trial: the per-layer scope's plain edit.
                Some(seed) if i == 0 => (seed.clone(), optimizer.raw_of(seed)),
                _ if i < startup => optimizer.ask_random(),
                _ => {
                    let observed: Vec<(Vec<f64>, f64)> = raws
                        .iter()
                        .zip(&trials)
                        .map(|(raw, t)| {
                            (raw.clone(), refine::objective(t.refusal_rate, t.kl, target))
                        })
                        .collect();
                    optimizer.refit(&observed)?;
                    optimizer.ask()?
                }
            };
            let best = trials
                .iter()
                .filter(|t: &&Trial| t.kl <= target)
                .filter_map(|t| t.refusal_rate)
                .fold(1.0, f64::min);
            let t = run_trial(&point, &mut runner, target, best)?;
            raws.push(raw);
            trials.push(t);
        }
        pb.finish_and_clear();
        meter.done("refine");
        // The finalists measured again on prompts the search has not used,
        // and the pick made on both measurements pooled.
        let mut picked = refine::pick(&trials, opts.kl_threshold, harm_val.len());
        // Fresh prompts: training prompts neither the capture nor the KL
        // set used (the built-in sets have 72 harmful and 40 harmless).
        let fresh_harm = train_after(harmful, harm_train.len(), opts.n_val);
        let fresh_harm_texts: Vec<String> = fresh_harm.iter().map(|p| p.text.clone()).collect();
        let fresh_harm = tokenize_all(model, fmt, &fresh_harm)?;
        let fresh_safe = train_after(harmless, safe_train.len() + spare.len(), opts.n_val);
        let (fresh_answered, fresh_base) = answered_prompts(
            &mut runner,
            tokenize_all(model, fmt, &fresh_safe)?,
            &refusal_ids,
        )?;
        let confirm = (!fresh_harm.is_empty() && !fresh_answered.is_empty()).then(|| Measure {
            harm_val: &fresh_harm,
            harm_texts: &fresh_harm_texts,
            safe_answered: &fresh_answered,
            base_answered: &fresh_base,
            ..measure
        });
        if let Some(confirm) = &confirm {
            for i in refine::finalists(&trials, opts.kl_threshold, FINALISTS) {
                let t = &trials[i];
                let mut hook = trial_hook(&t.point)?;
                let kl = confirm.kl(&mut runner, &mut hook)?;
                let (refusal_rate, _) = confirm.refusals(&mut runner, &mut hook)?;
                let pool = |a: f64, n: usize, b: f64, m: usize| {
                    (a * n as f64 + b * m as f64) / (n + m) as f64
                };
                trials[i].confirmed = Some(refine::Confirmed {
                    refusal_rate: pool(
                        t.refusal_rate.unwrap(),
                        harm_val.len(),
                        refusal_rate,
                        confirm.harm_val.len(),
                    ),
                    kl: pool(t.kl, safe_answered.len(), kl, confirm.safe_answered.len()),
                });
            }
            let n = harm_val.len() + confirm.harm_val.len();
            picked = refine::pick_confirmed(&trials, opts.kl_threshold, harm_val.len(), n);
        }
        if let Some(i) = picked {
            chosen_point = trials[i].point.clone();
        }
    }
    meter.done(if refining { "confirm" } else { "refine" });
    let front = refine::pareto_front(&trials);
    // One function for the chosen point and the front, so that `--pick`
    // of the chosen point reproduces it exactly.
    let direction_for = |point: &EditPoint| -> Result<Vec<f32>> {
        if *point == first {
            Ok(direction_of(best.layer, best.position))
        } else {
            refine::point_direction(&harm_means, &safe_means, point)
        }
    };
    let layers_for =
        |point: &EditPoint| refine::layer_directions(&harm_means, &safe_means, point, n_layer);
    let direction = direction_for(&chosen_point)?;
    let layer_directions = layers_for(&chosen_point)?;
    let front_directions = front
        .iter()
        .map(|&i| direction_for(&trials[i].point))
        .collect::<Result<Vec<_>>>()?;
    let front_layer_directions = front
        .iter()
        .map(|&i| layers_for(&trials[i].point))
        .collect::<Result<Vec<_>>>()?;
    Ok(SearchResult {
        frontier,
        direction,
        layer_directions,
        front_layer_directions,
        layer: chosen_point.direction_index.round() as usize,
        position: best.position,
        scale: chosen_point.scale,
        skip_embeddings: chosen_point.weights.embeddings == 0.0,
        point: chosen_point,
        trials,
        front,
        front_directions,
        n_layer,
        refusal_tokens: refusal,
        baseline_harmful: mean(&score(&base_harm)),
        baseline_refusal_rate,
        baseline_harmless: mean(&safe_scores),
        answered_harmless: answered.len(),
        kl_threshold: opts.kl_threshold,
        chosen: best,
        candidates,
        n_train: harm_train.len(),
        n_val: harm_val.len(),
        seconds: started.elapsed().as_secs_f64(),
        stages: meter.stages(),
        imatrix,
    })
}

/// First-token distributions of the replies judged real answers.
struct Answers<'a> {
    harmless: &'a [Vec<f32>],
    /// To harmful prompts the model does not refuse.
    harmful: &'a [Vec<f32>],
}

/// Refusal tokens: the tokens whose first-token probability most separates
/// harmful from harmless training prompts ("I" of "I'm sorry", "As" of
/// "As an AI"), less any likelier to open the model's real answers than
/// its judged refusals: an ordinary answer opening such as "To" or "There"
/// must not count as refusing. Likelier in mean probability, not in greedy
/// openings: a token that opens one answer in 29 and no refusal in 25 (the
/// fixture's "As") would flip on one reply. Answers to harmful prompts
/// count too, pooled with the harmless ones: they open with what harmful
/// requests elicit ("There are several ways…"), which is what separates
/// harmful prompts without refusing (on Qwen2.5-Coder-0.5B "There" had
/// mean probability 0.0425 in refusals, 0.0423 in harmless answers and
/// 0.064 in harmful ones). Pooled, so that a model which answers only a
/// few harmful prompts is not judged on those few alone.
fn refusal_tokens(
    harmful: &[Vec<f32>],
    harmless: &[Vec<f32>],
    refused_first: &[Vec<f32>],
    answers: &Answers,
) -> Vec<i32> {
    let n_vocab = harmful[0].len();
    let sum_p = |lps: &[Vec<f32>], t: usize| lps.iter().map(|lp| (lp[t] as f64).exp()).sum::<f64>();
    let mean_p = |lps: &[Vec<f32>], t: usize| sum_p(lps, t) / lps.len().max(1) as f64;
    let n_answers = answers.harmless.len() + answers.harmful.len();
    // An empty set's mean is 0, which no probability exceeds: with no
    // answers to compare, no token is left out.
    let opens_answers = |t: usize| {
        let refused = mean_p(refused_first, t);
        let harmless = sum_p(answers.harmless, t);
        let pooled = (harmless + sum_p(answers.harmful, t)) / n_answers.max(1) as f64;
        harmless / answers.harmless.len().max(1) as f64 > refused || pooled > refused
    };
    let mut gaps: Vec<(f64, i32)> = (0..n_vocab)
        .map(|t| (mean_p(harmful, t) - mean_p(harmless, t), t as i32))
        .filter(|(g, _)| *g > 0.02)
        .filter(|&(_, t)| !opens_answers(t as usize))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    gaps.truncate(4);
    gaps.into_iter().map(|(_, t)| t).collect()
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

/// A scale fitted to a KL limit (`Measure::fit_scale`).
struct Fit {
    scale: f32,
    kl: f64,
    /// KL's exponent in the scale, where two measurements gave one.
    power: Option<f64>,
}

/// What a full evaluation needs.
#[derive(Clone, Copy)]
struct Measure<'a> {
    model: &'a Model,
    harm_val: &'a [Vec<i32>],
    harm_texts: &'a [String],
    safe_answered: &'a [Vec<i32>],
    base_answered: &'a [Vec<f32>],
    refusal_ids: &'a [i32],
    kl_threshold: f64,
}

impl Measure<'_> {
    fn kl(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<f64> {
        let ablated = runner.first_token_logprobs(self.safe_answered, hook)?;
        Ok(mean_kl(&ablated, self.base_answered))
    }

    /// KL first (cheap); where it is over the threshold, the largest scale
    /// within it (`fit_scale`); then refusals of generated replies and the
    /// first-token bypass score at that scale. Returns the KL's exponent in
    /// the scale where the fit measured one.
    fn ablation(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        c: &mut CandidateScores,
    ) -> Result<Option<f64>> {
        hook.scale = 1.0;
        let kl = self.kl(runner, hook)?;
        let fit = self.fit_scale(runner, hook, self.kl_threshold, kl, 1.0, 2.0)?;
        hook.scale = fit.scale;
        (c.scale, c.kl) = (fit.scale, Some(fit.kl));
        let (rate, bypass) = self.refusals(runner, hook)?;
        (c.refusal_rate, c.bypass) = (Some(rate), Some(bypass));
        Ok(fit.power)
    }

    /// The largest scale (at most the hook's) whose KL is within `limit`,
    /// given `kl` measured at the hook's scale: found by fitting
    /// KL ≈ a·scaleᵏ through the last two measurements (k = `first_power`
    /// to start) and aiming just under the limit. Done as soon as a KL lands
    /// within `[close·limit, limit]` (or the scales bracket it within 2 %).
    /// Scale 0 when none was found. Leaves the hook's scale as it found it.
    #[allow(clippy::too_many_arguments)]
    fn fit_scale(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        limit: f64,
        kl: f64,
        close: f64,
        first_power: f64,
    ) -> Result<Fit> {
        let start = hook.scale;
        if kl <= limit {
            return Ok(Fit {
                scale: start,
                kl,
                power: None,
            });
        }
        let mut measured_power = None;
        let aim = AIM * limit;
        let (mut within, mut kl_within) = (0.0f32, 0.0);
        let (mut over, mut kl_over) = (start, kl);
        // The point over the limit measured before `over`, if any.
        let mut farther: Option<(f32, f64)> = None;
        // `sqrt` for the quadratic start, as before: the same bytes.
        let root = if first_power == 2.0 {
            (aim / kl_over).sqrt()
        } else {
            (aim / kl_over).powf(1.0 / first_power)
        };
        let mut next = over * root as f32;
        for _ in 0..SCALE_STEPS {
            hook.scale = next.clamp(0.0, start);
            let k = self.kl(runner, hook)?;
            let measured = hook.scale;
            if k <= limit {
                (within, kl_within) = (measured, k);
            } else {
                farther = Some((over, kl_over));
                (over, kl_over) = (measured, k);
            }
            // The exponent through the nearest points on either side, when
            // both are known; else through the two nearest over the limit
            // (a KL that grows slower than quadratically would otherwise be
            // approached in ever smaller steps); else quadratic.
            let through = |(s0, k0): (f32, f64), (s1, k1): (f32, f64)| {
                let p = (k0 / k1).ln() / (s0 as f64 / s1 as f64).ln();
                p.is_finite().then(|| p.clamp(0.5, 4.0))
            };
            let through_measured = if within > 0.0 && kl_within > 0.0 {
                through((over, kl_over), (within, kl_within))
            } else {
                farther.and_then(|f| through(f, (over, kl_over)))
            };
            measured_power = through_measured.or(measured_power);
            let power = through_measured.unwrap_or(first_power);
            next = measured * (aim / k.max(1e-12)).powf(1.0 / power) as f32;
            next = next.clamp(within, over);
            let bracketed = within > 0.0 && (over - within) < 0.02 * over;
            if bracketed || (k <= limit && k >= close * limit) {
                break;
            }
        }
        hook.scale = start;
        Ok(Fit {
            scale: within,
            kl: kl_within,
            power: measured_power,
        })
    }

    /// Share of harmful validation replies that are not real answers, and
    /// the mean first-token refusal score.
    fn refusals(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<(f64, f64)> {
        let replies = self.replies(runner, hook, 0..self.harm_val.len())?;
        let refused = self.count_refused(&replies, self.harm_texts);
        let scores = refusal_scores(replies.iter().map(|g| &g.first_log_probs), self.refusal_ids);
        Ok((refused as f64 / replies.len() as f64, mean(&scores)))
    }

    /// One refinement trial, aimed at the KL `target`: KL first; over the
    /// target, the point is scaled down to it (`fit_scale`) rather than
    /// dropped, since a point's shape can be good at a smaller scale; then
    /// replies, the second half of them only when the first half does not
    /// already lose to `best` (the fewest refusals seen so far). Returns
    /// the refusal rate (None: no scale within the target) and the scale
    /// measured with its KL.
    fn trial(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        target: f64,
        best: f64,
        power: f64,
    ) -> Result<(Option<f64>, Fit)> {
        let kl = self.kl(runner, hook)?;
        let fit = self.fit_scale(runner, hook, target, kl, TRIAL_CLOSE, power)?;
        if fit.scale == 0.0 {
            // No scale within the target: the figures of the point as given.
            let unscaled = Fit {
                scale: hook.scale,
                kl,
                ..fit
            };
            return Ok((None, unscaled));
        }
        hook.scale = fit.scale;
        let half = self.harm_val.len() / 2;
        let first = self.refused(runner, hook, 0..half)?;
        let n = self.harm_val.len() as f64;
        // Even with every other reply an answer, it cannot beat `best` by much.
        if half > 0 && first as f64 / n > best + 0.1 {
            return Ok((Some(2.0 * first as f64 / n), fit));
        }
        let second = self.refused(runner, hook, half..self.harm_val.len())?;
        Ok((Some((first + second) as f64 / n), fit))
    }

    /// Harmful validation replies in `range` that are not real answers.
    fn refused(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        range: std::ops::Range<usize>,
    ) -> Result<usize> {
        let replies = self.replies(runner, hook, range.clone())?;
        Ok(self.count_refused(&replies, &self.harm_texts[range]))
    }

    /// Replies to harmful validation prompts in `range`, each ended as soon
    /// as it holds a refusal marker: counted as refused either way.
    fn replies(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<crate::eval::Generation>> {
        let model = self.model;
        let refused = |tokens: &[i32]| has_refusal_marker(&detokenize(model, tokens));
        runner.generate_until(&self.harm_val[range], JUDGE_TOKENS, hook, &refused)
    }

    /// Replies to `requests` that are not real answers.
    fn count_refused(&self, replies: &[crate::eval::Generation], requests: &[String]) -> usize {
        replies
            .iter()
            .zip(requests)
            .filter(|(g, request)| {
                judge_answer(request, &detokenize(self.model, &g.tokens), &g.tokens)
                    != Verdict::Complied
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::{refusal_tokens, Answers};

    #[test]
    fn median_of_measured_exponents() {
        assert_eq!(super::median(&[]), None);
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 1.5]), Some(1.75));
    }

    #[test]
    fn refusal_tokens_separate_harmful_prompts_but_never_open_answers() {
        // Vocabulary of 4; token 1 ("I") and 2 ("To") are both likelier
        // after harmful prompts, but 2 opens the model's harmless answers.
        let lp = |p: [f64; 4]| p.iter().map(|x| x.ln() as f32).collect::<Vec<f32>>();
        let harmful = vec![lp([0.1, 0.5, 0.3, 0.1])];
        let harmless = vec![lp([0.6, 0.1, 0.1, 0.2])];
        let refused = vec![lp([0.05, 0.8, 0.1, 0.05]), lp([0.1, 0.7, 0.1, 0.1])];
        let answered = vec![lp([0.3, 0.1, 0.5, 0.1]), lp([0.5, 0.05, 0.4, 0.05])];
        let harmless_only = |a| Answers {
            harmless: a,
            harmful: &[],
        };
        assert_eq!(
            refusal_tokens(&harmful, &harmless, &refused, &harmless_only(&answered)),
            vec![1]
        );
        // A token a little likelier in refusals than in answers counts,
        // though greedy decoding opens no refusal with it.
        let answered = vec![lp([0.5, 0.1, 0.08, 0.32])];
        assert_eq!(
            refusal_tokens(&harmful, &harmless, &refused, &harmless_only(&answered)),
            vec![1, 2]
        );
        // …unless it opens the answers to harmful prompts more often than
        // the refusals (Qwen2.5-Coder-0.5B's "There"), pooled with the
        // harmless answers.
        let complied = vec![lp([0.2, 0.1, 0.3, 0.4])];
        let answers = Answers {
            harmless: &answered,
            harmful: &complied,
        };
        assert_eq!(
            refusal_tokens(&harmful, &harmless, &refused, &answers),
            vec![1]
        );
        // With no answers to tell them apart, both count.
        assert_eq!(
            refusal_tokens(&harmful, &harmless, &refused, &harmless_only(&[])),
            vec![1, 2]
        );
    }
}
