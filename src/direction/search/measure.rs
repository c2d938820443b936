//! Measuring an edit through the hook: first-token KL on answered
//! harmless prompts, the largest scale within a KL limit, and refusals of
//! generated replies (each ended as soon as the judge's verdict settles).

use super::rank::CandidateScores;
use super::{mean, mean_kl};
use crate::eval::{AblateHook, Generation, Runner};
use crate::ffi::Model;
use crate::judge::{count_refused, refusal_scores, stop_when_settled, Judge, JUDGE_TOKENS};
use anyhow::Result;

/// KL measurements when searching the largest scale within the KL threshold.
const SCALE_STEPS: usize = 3;
/// The share of the KL threshold that search aims at, so that a small
/// misfit lands within it rather than just over.
const AIM: f64 = 0.95;
/// A trial scaled down to its KL target stops at the first scale whose KL
/// is at least this share of the target: each KL costs a pass over the
/// KL prompts, and a trial only needs to land near its target.
const TRIAL_CLOSE: f64 = 0.6;

/// A scale fitted to a KL limit (`Measure::fit_scale`).
pub struct Fit {
    pub scale: f32,
    pub kl: f64,
    /// KL's exponent in the scale, where two measurements gave one.
    pub power: Option<f64>,
}

/// What a full evaluation needs: the prompts refusals and KL are
/// measured on, and the judge.
#[derive(Clone, Copy)]
pub struct Measure<'a> {
    pub model: &'a Model,
    pub judge: &'a dyn Judge,
    pub harm_val: &'a [Vec<i32>],
    pub harm_texts: &'a [String],
    pub safe_answered: &'a [Vec<i32>],
    pub base_answered: &'a [Vec<f32>],
    pub refusal_ids: &'a [i32],
    pub kl_threshold: f64,
}

impl Measure<'_> {
    pub fn kl(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<f64> {
        let ablated = runner.first_token_logprobs(self.safe_answered, hook)?;
        Ok(mean_kl(&ablated, self.base_answered))
    }

    /// KL first (cheap); where it is over the threshold, the largest scale
    /// within it (`fit_scale`); then refusals of generated replies and the
    /// first-token bypass score at that scale. Returns the KL's exponent in
    /// the scale where the fit measured one.
    pub fn ablation(
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
        // `sqrt` for the quadratic start: `powf(0.5)` may round differently.
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
    pub fn refusals(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<(f64, f64)> {
        let replies = self.replies(runner, hook, 0..self.harm_val.len())?;
        let refused = count_refused(self.judge, self.model, &replies, self.harm_texts);
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
    pub fn trial(
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
        Ok(count_refused(
            self.judge,
            self.model,
            &replies,
            &self.harm_texts[range],
        ))
    }

    /// Replies to harmful validation prompts in `range`, each ended as soon
    /// as it holds a refusal marker: counted as refused either way.
    fn replies(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<Generation>> {
        let settled = stop_when_settled(self.judge, self.model);
        runner.generate_until(&self.harm_val[range], JUDGE_TOKENS, hook, &settled)
    }
}
