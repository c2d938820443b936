//! Stage 6: the chosen direction's edit refined with TPE over the edit
//! space ([`crate::direction::space`]), each trial aimed at a KL target
//! from a ladder; then the front's finalists measured again on fresh
//! prompts, and the pick made on both measurements pooled.

use super::baseline::{answered_prompts, Baseline};
use super::evaluate::Chosen;
use super::measure::{Fit, Measure};
use super::prompts::{tokenize_all, train_after, Prompts};
use super::{bar, median, Setup};
use crate::direction::space::{self, Confirmed, Optimizer, Space, Trial};
use crate::edit::EditPoint;
use crate::eval::{AblateHook, Runner};
use anyhow::{Context, Result};
use indicatif::ProgressBar;

/// Front points measured again on fresh prompts before the pick, fewest
/// refusals first (with the gentler point `pick` prefers, when it is not
/// among them).
const FINALISTS: usize = 2;

/// The run-time edit of a point: what `apply` would write for it.
pub fn hook_for(s: &Setup, b: &Baseline, point: &EditPoint) -> Result<AblateHook> {
    hook_for_subspace(s, b, point, &[])
}

/// The run-time edit of a trial, subspace included.
pub fn hook_for_trial(s: &Setup, b: &Baseline, t: &Trial) -> Result<AblateHook> {
    hook_for_subspace(s, b, &t.point, &t.further)
}

/// `hook_for` with `further` directions removed too.
pub fn hook_for_subspace(
    s: &Setup,
    b: &Baseline,
    point: &EditPoint,
    further: &[Vec<f32>],
) -> Result<AblateHook> {
    let opts = s.opts;
    let r = space::point_direction(&b.harmful, &b.harmless, point)?;
    let layers = space::layer_directions(&b.harmful, &b.harmless, point, s.n_layer)?;
    let mut hook = s
        .ablation_of_subspace(&r, further)
        .context("zero refined direction")?
        .with_layer_directions(&layers, &opts.post_norms);
    hook.scale = point.scale;
    hook.weights = point.weights;
    Ok(hook)
}

/// Runs trials, learning KL's exponent in the scale as it goes.
struct Refiner<'a> {
    s: &'a Setup<'a>,
    b: &'a Baseline,
    measure: &'a Measure<'a>,
    powers: Vec<f64>,
    pb: ProgressBar,
}

impl Refiner<'_> {
    /// One trial. The fit starts from the median exponent measured so far
    /// in this run (one model's KL grows alike with most edits' scale),
    /// quadratic before any: a good start saves KL passes.
    fn trial(
        &mut self,
        runner: &mut Runner,
        point: &EditPoint,
        target: f64,
        best: f64,
    ) -> Result<Trial> {
        let mut hook = hook_for(self.s, self.b, point)?;
        let start = median(&self.powers).unwrap_or(2.0);
        let (refusal_rate, Fit { scale, kl, power }) =
            self.measure.trial(runner, &mut hook, target, best, start)?;
        self.powers.extend(power);
        self.pb.inc(1);
        let point = EditPoint {
            scale,
            ..point.clone()
        };
        Ok(Trial::new(point, refusal_rate, kl))
    }
}

/// Every trial, the first stage's choice first.
pub fn run_trials(
    s: &Setup,
    runner: &mut Runner,
    b: &Baseline,
    measure: &Measure,
    chosen: &Chosen,
    max_layer: usize,
) -> Result<Vec<Trial>> {
    let opts = s.opts;
    let (first, best) = (chosen.point(), &chosen.best);
    let space = Space {
        n_layer: s.n_layer,
        direction_layers: (
            best.layer.saturating_sub(4),
            (best.layer + 2).min(max_layer.max(1) - 1),
        ),
        position: best.position,
        per_layer: opts.per_layer,
    };
    let mut optimizer = Optimizer::new(space, opts.seed)?;
    let mut refiner = Refiner {
        s,
        b,
        measure,
        powers: chosen.powers.clone(),
        pb: bar(opts.progress, opts.trials as u64 + 1, "refine"),
    };
    // The first stage measured its choice already, on the same prompts
    // and with the edit the file gets for it: not measured again.
    let t = match (best.refusal_rate, best.kl) {
        (Some(refusal_rate), Some(kl)) if best.scale > 0.0 && kl <= opts.kl_threshold => {
            refiner.pb.inc(1);
            Trial::new(first.clone(), Some(refusal_rate), kl)
        }
        _ => refiner.trial(runner, &first, opts.kl_threshold, 1.0)?,
    };
    // Every trial's raw parameters, to refit the optimizer to each target.
    let mut raws = vec![optimizer.raw_of(&first)];
    let mut trials = vec![t];
    let startup = space::startup_trials(opts.trials);
    let seed = opts
        .per_layer
        .then(|| space::per_layer_seed(&first, s.n_layer));
    for i in 0..opts.trials {
        let target = opts.kl_threshold
            * space::TARGET_LADDER[i.saturating_sub(startup) % space::TARGET_LADDER.len()];
        let (point, raw) = match &seed {
            // The first startup trial: the per-layer scope's plain edit.
            Some(seed) if i == 0 => (seed.clone(), optimizer.raw_of(seed)),
            _ if i < startup => optimizer.ask_random(),
            _ => {
                let observed: Vec<(Vec<f64>, f64)> = raws
                    .iter()
                    .zip(&trials)
                    .map(|(raw, t)| (raw.clone(), space::objective(t.refusal_rate, t.kl, target)))
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
        let t = refiner.trial(runner, &point, target, best)?;
        raws.push(raw);
        trials.push(t);
    }
    refiner.pb.finish_and_clear();
    Ok(trials)
}

/// The finalists measured again on prompts the search has not used, and
/// the pick made on both measurements pooled. Returns the picked trial.
pub fn confirm(
    s: &Setup,
    runner: &mut Runner,
    p: &Prompts,
    b: &Baseline,
    measure: &Measure,
    trials: &mut [Trial],
) -> Result<Option<usize>> {
    let opts = s.opts;
    let n_search = p.harm_val.len();
    let picked = space::pick(trials, opts.kl_threshold, n_search);
    // Fresh prompts: training prompts neither the capture nor the KL set used.
    let fresh_harm = train_after(s.harmful, p.harm_train.len(), opts.n_val);
    let fresh_harm_texts: Vec<String> = fresh_harm.iter().map(|p| p.text.clone()).collect();
    let fresh_harm = tokenize_all(s.model, s.fmt, &fresh_harm)?;
    let fresh_safe = train_after(s.harmless, p.safe_train.len() + b.spare, opts.n_val);
    let (fresh_answered, fresh_base) = answered_prompts(
        runner,
        tokenize_all(s.model, s.fmt, &fresh_safe)?,
        &b.refusal_ids,
    )?;
    if fresh_harm.is_empty() || fresh_answered.is_empty() {
        return Ok(picked);
    }
    let fresh = Measure {
        harm_val: &fresh_harm,
        harm_texts: &fresh_harm_texts,
        safe_answered: &fresh_answered,
        base_answered: &fresh_base,
        ..*measure
    };
    let pool = |a: f64, n: usize, b: f64, m: usize| (a * n as f64 + b * m as f64) / (n + m) as f64;
    for i in space::finalists(trials, opts.kl_threshold, FINALISTS, picked) {
        let t = &trials[i];
        let mut hook = hook_for_trial(s, b, t)?;
        let kl = fresh.kl(runner, &mut hook)?;
        let (refusal_rate, _) = fresh.refusals(runner, &mut hook)?;
        trials[i].confirmed = Some(Confirmed {
            refusal_rate: pool(
                t.refusal_rate.unwrap(),
                n_search,
                refusal_rate,
                fresh.harm_val.len(),
            ),
            kl: pool(
                t.kl,
                measure.safe_answered.len(),
                kl,
                fresh.safe_answered.len(),
            ),
        });
    }
    let n = n_search + fresh.harm_val.len();
    Ok(space::pick_confirmed(
        trials,
        opts.kl_threshold,
        n_search,
        n,
    ))
}
