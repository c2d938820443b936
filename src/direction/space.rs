//! The edit space that the refinement searches with TPE: a fractional direction index, optional orthogonalization against
//! the harmless mean ("biprojection"), heretic's per-layer kernels for
//! attention and MLP writes, and the `token_embd` weight.
//!
//! Optimizer: the `tpe` crate (Tree-structured Parzen Estimator, one
//! estimator per parameter, as Optuna's default independent sampler). TPE is
//! what heretic uses through Optuna, copes with a dozen bounded parameters
//! and a few dozen noisy trials, and needs no gradient. Its objective is
//! scalar, so the two objectives are folded: refusals, plus a steep
//! penalty for KL beyond the target. Every trial is kept, and the Pareto
//! front over (refusals, KL) is reported from all of them.

use crate::activations::Means;
use crate::edit::{normalized, EditPoint, EditWeights, Kernel};
use anyhow::{Context, Result};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// A measured point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trial {
    pub point: EditPoint,
    /// Share of harmful validation replies judged refusals; None when the
    /// trial was pruned on its KL alone.
    pub refusal_rate: Option<f64>,
    pub kl: f64,
    /// For the front's finalists: the figures pooled with a second
    /// measurement on prompts the search had not used (`pick_confirmed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<Confirmed>,
    /// Directions removed (more than 1: a subspace, the point's direction
    /// and `further`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub directions: usize,
    /// Further directions removed with the point's own.
    #[serde(skip)]
    pub further: Vec<Vec<f32>>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Trial {
    /// A trial of one direction.
    pub fn new(point: EditPoint, refusal_rate: Option<f64>, kl: f64) -> Trial {
        Trial {
            point,
            refusal_rate,
            kl,
            confirmed: None,
            directions: 1,
            further: Vec::new(),
        }
    }
}

/// A trial's refusal rate and KL over the search's prompts and fresh ones
/// together.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Confirmed {
    pub refusal_rate: f64,
    pub kl: f64,
}

/// The direction a point uses (not normalized to unit length by callers:
/// `AblateHook` and `apply` normalize).
pub fn point_direction(harmful: &Means, harmless: &Means, point: &EditPoint) -> Result<Vec<f32>> {
    let last = harmful.n_layers - 1;
    let index = point.direction_index.clamp(0.0, last as f32);
    let lo = index.floor() as usize;
    let hi = (lo + 1).min(last);
    let t = index - lo as f32;
    let blend = |a: &[f32], b: &[f32]| -> Vec<f32> {
        a.iter()
            .zip(b)
            .map(|(x, y)| (1.0 - t) * x + t * y)
            .collect()
    };
    let (a, b) = (
        unit_difference(harmful, harmless, lo, point.position)?,
        unit_difference(harmful, harmless, hi, point.position)?,
    );
    let mut r = blend(&a, &b);
    if point.biprojected {
        let g = blend(
            &harmless_mean(harmless, lo, point.position),
            &harmless_mean(harmless, hi, point.position),
        );
        orthogonalize_against(&mut r, &g);
    }
    normalized(&r).context("the refined direction is zero")
}

/// Per-layer scope: layer ℓ's writers use the direction measured at ℓ's
/// output (the last layer, whose output is not captured, its input's),
/// biprojected like the point. Empty for a point of global scope.
pub fn layer_directions(
    harmful: &Means,
    harmless: &Means,
    point: &EditPoint,
    n_layer: usize,
) -> Result<Vec<Vec<f32>>> {
    if !point.per_layer {
        return Ok(Vec::new());
    }
    (0..n_layer)
        .map(|l| {
            let l = l.min(harmful.n_layers - 1);
            let mut r = unit_difference(harmful, harmless, l, point.position)?;
            if point.biprojected {
                orthogonalize_against(&mut r, &harmless_mean(harmless, l, point.position));
            }
            normalized(&r).with_context(|| format!("the direction of layer {l} is zero"))
        })
        .collect()
}

fn unit_difference(
    harmful: &Means,
    harmless: &Means,
    layer: usize,
    pos: usize,
) -> Result<Vec<f32>> {
    normalized(&harmful.minus(harmless, layer, pos))
        .with_context(|| format!("zero difference of means at layer {layer}"))
}

fn harmless_mean(harmless: &Means, layer: usize, pos: usize) -> Vec<f32> {
    harmless.at(layer, pos).iter().map(|&x| x as f32).collect()
}

/// Biprojection: `r ← r − (r·ĝ)ĝ`, which leaves the harmless mean's own
/// direction (what every prompt shares) untouched. Also any `r ⊥ g`.
pub fn orthogonalize_against(r: &mut [f32], g: &[f32]) {
    if let Some(g) = normalized(g) {
        let along = crate::edit::dot(r, &g) as f32;
        r.iter_mut().zip(&g).for_each(|(x, gi)| *x -= along * gi);
    }
}

/// The search space, given the model's depth and the layers the direction
/// may come from.
pub struct Space {
    pub n_layer: usize,
    /// Direction indices searched: the first stage's layer, a few either side.
    pub direction_layers: (usize, usize),
    pub position: usize,
    /// Whether per-layer scope may be searched (the hook can emulate it
    /// only where every writer is a plain `mul_mat`: no expert tensors).
    pub per_layer: bool,
}

/// The per-layer scope's plain edit, as a first guess the optimizer would
/// take many trials to find: each layer from two thirds of the way to
/// `first`'s direction layer onward loses its own (biprojected) direction
/// at one weight, earlier layers and `token_embd` nothing: the best
/// per-layer edit on both test models (docs/figures.md), scaled to the KL
/// target.
pub fn per_layer_seed(first: &EditPoint, n_layer: usize) -> EditPoint {
    let last = (n_layer - 1) as f32;
    let from = (first.direction_index * 2.0 / 3.0).round().min(last);
    let flat = Kernel {
        max_weight: 1.0,
        max_weight_position: (from + last) / 2.0,
        min_weight: 1.0,
        // Half the span, and a little more so that both ends are inside.
        min_weight_distance: (last - from) / 2.0 + 0.25,
    };
    EditPoint {
        direction_index: first.direction_index,
        position: first.position,
        biprojected: true,
        per_layer: true,
        scale: 1.0,
        weights: EditWeights {
            attention: Some(flat),
            mlp: Some(flat),
            embeddings: 0.0,
        },
    }
}

/// Trials sampled uniformly before TPE takes over (TPE needs a few
/// observations to split into better and worse): a third of the budget,
/// at least 2 and at most 8, so that a small budget is not all random.
pub fn startup_trials(trials: usize) -> usize {
    (trials / 3).clamp(2, 8)
}

/// The KL targets the refinement's trials aim at in turn, as shares of
/// `--kl-target`. One scalar objective would spend every trial near the
/// target; cycling through gentler ones (ParEGO's idea: a different
/// scalarization per trial, the optimizer refit to each) also fills the
/// front's low-KL end, where users who want the least damage pick. Half
/// the trials still aim at the target itself, where the default pick is.
pub const TARGET_LADDER: [f64; 4] = [1.0, 0.4, 1.0, 0.15];

/// TPE over the edit space.
pub struct Optimizer {
    space: Space,
    params: Vec<tpe::TpeOptimizer>,
    /// Each numeric parameter's half-open range (the categorical one last).
    bounds: Vec<(f64, f64)>,
    rng: rand::rngs::StdRng,
}

/// Parameter order in `Optimizer::params`: the numeric ones, then the
/// categorical ones (biprojected, per-layer scope).
const N_PARAMS: usize = 11;
const N_CATEGORICAL: usize = 2;

impl Optimizer {
    pub fn new(space: Space, seed: u64) -> Result<Optimizer> {
        let last = (space.n_layer - 1) as f64;
        let (dir_min, dir_max) = (
            space.direction_layers.0 as f64,
            space.direction_layers.1 as f64,
        );
        let r = |a: f64, b: f64| (a, b.max(a + 1e-3));
        let kernel = || {
            [
                r(0.8, 1.5),           // max_weight (heretic's range)
                r(0.0, last),          // max_weight_position
                r(0.0, 1.0),           // min_weight, as a share of max_weight
                r(1.0, last.max(1.0)), // min_weight_distance
            ]
        };
        let mut bounds = vec![r(dir_min, dir_max)];
        bounds.extend(kernel());
        bounds.extend(kernel());
        bounds.push(r(0.0, 1.0)); // token_embd weight
        let params = fresh_estimators(&bounds);
        Ok(Optimizer {
            space,
            params,
            bounds,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        })
    }

    /// Forgets every observation and learns `observed` instead: how each
    /// trial is scored under another objective.
    pub fn refit(&mut self, observed: &[(Vec<f64>, f64)]) -> Result<()> {
        self.params = fresh_estimators(&self.bounds);
        for (raw, objective) in observed {
            self.tell(raw, *objective)?;
        }
        Ok(())
    }

    /// A point drawn uniformly from the space.
    pub fn ask_random(&mut self) -> (EditPoint, Vec<f64>) {
        use rand::Rng;
        let mut raw: Vec<f64> = self
            .bounds
            .iter()
            .map(|&(a, b)| self.rng.gen_range(a..b))
            .collect();
        for _ in 0..N_CATEGORICAL {
            raw.push(if self.rng.gen_bool(0.5) { 1.0 } else { 0.0 });
        }
        (self.point_of(&raw), raw)
    }

    /// The next point to measure, with its raw parameter values.
    pub fn ask(&mut self) -> Result<(EditPoint, Vec<f64>)> {
        let mut raw = Vec::with_capacity(self.params.len());
        for p in &mut self.params {
            raw.push(
                p.ask(&mut self.rng)
                    .map_err(|e| anyhow::anyhow!("TPE: {e}"))?,
            );
        }
        Ok((self.point_of(&raw), raw))
    }

    /// Records a measured objective for the raw parameters of `ask`.
    pub fn tell(&mut self, raw: &[f64], objective: f64) -> Result<()> {
        for (i, (p, &x)) in self.params.iter_mut().zip(raw).enumerate() {
            // A point told from outside may sit on a range's open end.
            let x = match self.bounds.get(i) {
                Some(&(a, b)) => x.clamp(a, b - 1e-6 * (b - a)),
                None => x,
            };
            p.tell(x, objective)
                .map_err(|e| anyhow::anyhow!("TPE: {e}"))?;
        }
        Ok(())
    }

    /// Raw parameters describing a point (to tell the optimizer about a
    /// point it did not propose, such as the first stage's choice).
    pub fn raw_of(&self, point: &EditPoint) -> Vec<f64> {
        let last = (self.space.n_layer - 1) as f32;
        let kernel = |k: Option<Kernel>| match k {
            Some(k) => [
                k.max_weight,
                k.max_weight_position,
                if k.max_weight > 0.0 {
                    k.min_weight / k.max_weight
                } else {
                    0.0
                },
                k.min_weight_distance,
            ],
            // Uniform: a flat kernel as wide as the model.
            None => [1.0, last / 2.0, 1.0, last.max(1.0)],
        };
        let kernel = |k: Option<Kernel>| {
            let mut raw = kernel(k);
            raw[0] *= point.scale;
            raw
        };
        let mut raw = vec![point.direction_index as f64];
        raw.extend(kernel(point.weights.attention).map(f64::from));
        raw.extend(kernel(point.weights.mlp).map(f64::from));
        raw.push(point.weights.embeddings as f64);
        raw.push(if point.biprojected { 1.0 } else { 0.0 });
        raw.push(if point.per_layer { 1.0 } else { 0.0 });
        raw
    }

    fn point_of(&self, raw: &[f64]) -> EditPoint {
        let kernel = |k: &[f64]| Kernel {
            max_weight: k[0] as f32,
            max_weight_position: k[1] as f32,
            min_weight: (k[2] * k[0]) as f32,
            min_weight_distance: k[3] as f32,
        };
        EditPoint {
            direction_index: raw[0] as f32,
            position: self.space.position,
            biprojected: raw[10] >= 0.5,
            per_layer: self.space.per_layer && raw[11] >= 0.5,
            scale: 1.0,
            weights: EditWeights {
                attention: Some(kernel(&raw[1..5])),
                mlp: Some(kernel(&raw[5..9])),
                embeddings: raw[9] as f32,
            },
        }
    }
}

fn fresh_estimators(bounds: &[(f64, f64)]) -> Vec<tpe::TpeOptimizer> {
    let mut params: Vec<tpe::TpeOptimizer> = bounds
        .iter()
        .map(|&(a, b)| {
            tpe::TpeOptimizer::new(
                tpe::parzen_estimator(),
                tpe::range(a, b).expect("valid range"),
            )
        })
        .collect();
    for _ in 0..N_CATEGORICAL {
        params.push(tpe::TpeOptimizer::new(
            tpe::histogram_estimator(),
            tpe::categorical_range(2).expect("valid range"),
        ));
    }
    debug_assert_eq!(params.len(), N_PARAMS + N_CATEGORICAL);
    params
}

/// The scalar TPE minimizes: refusals, plus a penalty that makes any point
/// beyond the KL target worse than every point within it.
pub fn objective(refusal_rate: Option<f64>, kl: f64, kl_target: f64) -> f64 {
    let over = (kl - kl_target).max(0.0) / kl_target;
    match refusal_rate {
        Some(r) if over == 0.0 => r + 0.05 * kl / kl_target,
        Some(r) => 1.0 + r + over,
        None => 2.0 + over,
    }
}

/// Trials not beaten on both refusals and KL, by rising KL.
pub fn pareto_front(trials: &[Trial]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..trials.len())
        .filter(|&i| trials[i].refusal_rate.is_some())
        .collect();
    idx.sort_by(|&a, &b| {
        trials[a].kl.total_cmp(&trials[b].kl).then(
            trials[a]
                .refusal_rate
                .unwrap()
                .total_cmp(&trials[b].refusal_rate.unwrap()),
        )
    });
    let mut best = f64::INFINITY;
    let mut front = Vec::new();
    for i in idx {
        let r = trials[i].refusal_rate.unwrap();
        if r < best {
            best = r;
            front.push(i);
        }
    }
    front
}

/// The default pick: the fewest refusals within the KL target; but among
/// the points whose refusals are within the measurement's noise of that
/// (`noise`, with rates measured on `n` prompts), the lowest KL. A few
/// replies out of 32 or 64 are noise, while the KL a point costs is not:
/// held back, the stronger of two such points kept none of its advantage
/// and more of its KL (docs/figures.md).
pub fn pick(trials: &[Trial], kl_target: f64, n: usize) -> Option<usize> {
    pick_by(trials, kl_target, n, |t| Some((t.refusal_rate?, t.kl)))
}

/// The points worth measuring again before the pick: the front's points
/// within the KL target, fewest refusals first, at most `n`; and the
/// point `pick` took on the search's prompts (`picked`), if those left it
/// out. Otherwise a gentler point within noise of the fewest refusals
/// would never be confirmed, and the pooled pick could not prefer it.
pub fn finalists(trials: &[Trial], kl_target: f64, n: usize, picked: Option<usize>) -> Vec<usize> {
    let mut idx: Vec<usize> = pareto_front(trials)
        .into_iter()
        .filter(|&i| trials[i].kl <= kl_target)
        .collect();
    idx.sort_by(|&a, &b| {
        let key = |i: usize| (trials[i].refusal_rate.unwrap(), trials[i].kl);
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx.truncate(n);
    if let Some(gentler) = picked {
        if !idx.contains(&gentler) {
            idx.push(gentler);
        }
    }
    idx
}

/// `pick` among the confirmed trials, by their pooled figures. The search
/// keeps the best of many noisy measurements, so its best figures are
/// biased low (most on the point picked); the second measurement is not.
/// When no confirmed trial stays within the target, `pick` among the
/// others (a point that failed its confirmation is never picked). Pooled
/// rates stand on `n_pooled` prompts, the search's on `n_search`.
pub fn pick_confirmed(
    trials: &[Trial],
    kl_target: f64,
    n_search: usize,
    n_pooled: usize,
) -> Option<usize> {
    pick_by(trials, kl_target, n_pooled, |t| {
        t.confirmed.map(|c| (c.refusal_rate, c.kl))
    })
    .or_else(|| {
        pick_by(trials, kl_target, n_search, |t| match t.confirmed {
            Some(_) => None,
            None => Some((t.refusal_rate?, t.kl)),
        })
    })
}

/// How far apart two refusal rates, each measured on `n` prompts, may be
/// and still be the same within noise: one standard error of their
/// difference, and at least one prompt (the measurement's resolution).
fn noise(a: f64, b: f64, n: usize) -> f64 {
    let n = n.max(1) as f64;
    ((a * (1.0 - a) + b * (1.0 - b)) / n).sqrt().max(1.0 / n)
}

fn pick_by(
    trials: &[Trial],
    kl_target: f64,
    n: usize,
    figures: impl Fn(&Trial) -> Option<(f64, f64)>,
) -> Option<usize> {
    let measured: Vec<(usize, f64, f64)> = trials
        .iter()
        .enumerate()
        .filter_map(|(i, t)| figures(t).map(|(r, kl)| (i, r, kl)))
        .filter(|&(_, _, kl)| kl <= kl_target)
        .collect();
    gentlest_within_noise(&measured, n)
}

/// Of `(index, refusal rate, KL)` triples, rates measured on `n` prompts:
/// the lowest KL among those whose refusals are within noise of the
/// fewest. The rule of the default pick, and of the first stage's choice.
pub fn gentlest_within_noise(measured: &[(usize, f64, f64)], n: usize) -> Option<usize> {
    let fewest = measured
        .iter()
        .map(|&(_, r, _)| r)
        .fold(f64::INFINITY, f64::min);
    measured
        .iter()
        .filter(|&&(_, r, _)| r <= fewest + noise(fewest, r, n) + 1e-9)
        .min_by(|a, b| {
            (a.2, a.1)
                .partial_cmp(&(b.2, b.1))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|&(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(r: Option<f64>, kl: f64) -> Trial {
        let point = EditPoint {
            direction_index: 0.0,
            position: 0,
            biprojected: false,
            per_layer: false,
            scale: 1.0,
            weights: EditWeights::default(),
        };
        Trial::new(point, r, kl)
    }

    #[test]
    fn front_and_pick() {
        let t = vec![
            trial(Some(0.5), 0.1),
            trial(Some(0.3), 0.2),
            trial(Some(0.4), 0.25),
            trial(None, 0.05),
            trial(Some(0.1), 0.5),
        ];
        assert_eq!(pareto_front(&t), vec![0, 1, 4]);
        assert_eq!(pick(&t, 0.3, 100), Some(1));
        assert_eq!(pick(&t, 0.05, 100), None);
        // On 5 prompts 0.5 and 0.3 are one reply apart: noise.
        assert_eq!(pick(&t, 0.3, 5), Some(0));
        // Qwen's front: one refusal in 32 more buys a KL six times lower;
        // two more do not count as noise.
        let q = vec![
            trial(Some(0.0), 0.23),
            trial(Some(0.0625), 0.06),
            trial(Some(0.22), 0.02),
        ];
        assert_eq!(pick(&q, 0.25, 32), Some(0));
        let mut q = q;
        q.push(trial(Some(0.03125), 0.04));
        assert_eq!(pick(&q, 0.25, 32), Some(3));
        assert!(objective(Some(1.0), 0.1, 0.3) < objective(Some(0.0), 0.31, 0.3));
    }

    #[test]
    fn finalists_are_measured_again_and_picked_by_pooled_figures() {
        let mut t = vec![
            trial(Some(0.5), 0.1),
            trial(Some(0.3), 0.2),
            trial(Some(0.25), 0.24),
            trial(Some(0.1), 0.5),
        ];
        // Within the target, fewest refusals first; never a point over it.
        assert_eq!(finalists(&t, 0.25, 2, pick(&t, 0.25, 10_000)), vec![2, 1]);
        assert_eq!(
            finalists(&t, 0.25, 5, pick(&t, 0.25, 10_000)),
            vec![2, 1, 0]
        );
        // On 4 prompts 0.5 is within noise of 0.25: the gentlest point,
        // which `pick` would take, is measured again too.
        assert_eq!(pick(&t, 0.25, 4), Some(0));
        assert_eq!(finalists(&t, 0.25, 2, pick(&t, 0.25, 4)), vec![2, 1, 0]);
        assert_eq!(finalists(&t, 0.25, 1, pick(&t, 0.25, 4)), vec![2, 0]);
        // 10 000 prompts: noise plays no part here.
        let n = 10_000;
        assert_eq!(pick_confirmed(&t, 0.25, n, n), Some(2));
        // A point over the target once pooled is never picked.
        t[2].confirmed = Some(Confirmed {
            refusal_rate: 0.4,
            kl: 0.26,
        });
        assert_eq!(pick_confirmed(&t, 0.25, n, n), Some(1));
        // The search's best (2) falls back on fresh prompts; 1 holds.
        t[1].confirmed = Some(Confirmed {
            refusal_rate: 0.3,
            kl: 0.21,
        });
        assert_eq!(pick(&t, 0.25, n), Some(2));
        assert_eq!(pick_confirmed(&t, 0.25, n, n), Some(1));
    }

    /// Two finalists two replies apart in 64, within one standard error:
    /// the lower KL. A gap larger than one standard error still buys the
    /// fewer refusals.
    #[test]
    fn refusals_within_noise_give_way_to_the_lower_kl() {
        let mut q = vec![trial(Some(0.03), 0.079), trial(Some(0.06), 0.045)];
        q[0].confirmed = Some(Confirmed {
            refusal_rate: 4.0 / 64.0,
            kl: 0.082,
        });
        q[1].confirmed = Some(Confirmed {
            refusal_rate: 6.0 / 64.0,
            kl: 0.047,
        });
        assert_eq!(pick_confirmed(&q, 0.25, 32, 64), Some(1));
        let f = vec![trial(Some(0.22), 0.24), trial(Some(0.33), 0.17)];
        assert_eq!(pick(&f, 0.25, 64), Some(0));
        assert!((noise(0.0, 0.0, 64) - 1.0 / 64.0).abs() < 1e-12);
    }

    #[test]
    fn optimizer_round_trips_points() {
        let mut o = Optimizer::new(
            Space {
                n_layer: 30,
                direction_layers: (0, 23),
                position: 3,
                per_layer: true,
            },
            7,
        )
        .unwrap();
        let (p, raw) = o.ask().unwrap();
        assert_eq!(p.position, 3);
        assert!((0.0..=23.0).contains(&p.direction_index));
        p.weights.validate().unwrap();
        let again = o.raw_of(&p);
        for (a, b) in raw.iter().zip(&again) {
            // The categorical parameter comes back as 0 or 1.
            assert!(
                (a - b).abs() < 1e-4 || (a.round() - b).abs() < 1e-9,
                "{raw:?} vs {again:?}"
            );
        }
        o.tell(&raw, 0.5).unwrap();
    }
}
