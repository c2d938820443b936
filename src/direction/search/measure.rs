//! Measuring an edit through the hook: first-token KL on answered
//! harmless prompts, the largest scale within a KL limit, and refusals of
//! generated replies (each ended as soon as the judge's verdict settles).

use super::rank::CandidateScores;
use super::{mean, mean_kl};
use crate::eval::kl_divergence;
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
/// A trial's replies stop at the first half when an earlier trial at no
/// more KL refused a smaller share by this much: it cannot reach the front.
const RACE_MARGIN: f64 = 0.2;
/// The share of its target at which a trial's sample KL has the rest of
/// the KL prompts measured before its replies.
const NEAR_TARGET: f64 = 0.9;

/// Whether `refused` of `n` replies, before the rest are generated,
/// already lose to the rate `best`: even with every other reply an answer,
/// the rate could not beat it by much.
fn loses(refused: usize, n: usize, best: f64) -> bool {
    refused as f64 / n as f64 > best + 0.1
}

/// A scale fitted to a KL limit (`Measure::fit_scale`).
pub struct Fit {
    pub scale: f32,
    /// On every KL prompt.
    pub kl: f64,
    /// KL's exponent in the scale, where two measurements gave one.
    pub power: Option<f64>,
}

/// Per-prompt KLs on the fit's sample at one scale.
struct Sampled {
    scale: f32,
    kls: Vec<f64>,
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
    /// The first `fit_len` answered prompts are the scale fit's sample.
    pub fit_len: usize,
    pub refusal_ids: &'a [i32],
    pub kl_threshold: f64,
}

impl Measure<'_> {
    pub fn kl(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<f64> {
        let ablated = runner.first_token_logprobs(self.safe_answered, hook)?;
        Ok(mean_kl(&ablated, self.base_answered))
    }

    /// Per-prompt KLs on the answered prompts in `range`.
    fn kls(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<f64>> {
        let ablated = runner.first_token_logprobs(&self.safe_answered[range.clone()], hook)?;
        Ok(ablated
            .iter()
            .zip(&self.base_answered[range])
            .map(|(q, p)| kl_divergence(p, q))
            .collect())
    }

    fn sample(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<Sampled> {
        Ok(Sampled {
            scale: hook.scale,
            kls: self.kls(runner, hook, 0..self.fit_len)?,
        })
    }

    /// The KL on every prompt at `at.scale`: the sample's measured, the
    /// rest decoded now. Where it is over `limit` (the sample misled the
    /// fit), one more step down, measured on every prompt.
    fn complete(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        at: Sampled,
        limit: f64,
        power: f64,
    ) -> Result<(f32, f64)> {
        let start = hook.scale;
        hook.scale = at.scale;
        let mut kls = at.kls;
        kls.extend(self.kls(runner, hook, self.fit_len..self.safe_answered.len())?);
        let mut result = (at.scale, mean(&kls));
        if result.1 > limit && result.1 > 0.0 {
            let scale = at.scale * (AIM * limit / result.1).powf(1.0 / power) as f32;
            hook.scale = scale;
            result = (scale, self.kl(runner, hook)?);
        }
        hook.scale = start;
        Ok(result)
    }

    /// KL first (cheap); where it is over the threshold, the largest scale
    /// within it (`fit`); then refusals of generated replies and the
    /// first-token bypass score at that scale, raced against `best` as a
    /// trial's are. Returns the KL's exponent in the scale where the fit
    /// measured one.
    pub fn ablation(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        c: &mut CandidateScores,
        best: f64,
    ) -> Result<Option<f64>> {
        hook.scale = 1.0;
        let fit = self.fit(runner, hook, self.kl_threshold, 1.0, 2.0)?;
        hook.scale = fit.scale;
        (c.scale, c.kl) = (fit.scale, Some(fit.kl));
        let (rate, bypass) = self.raced_refusals(runner, hook, best)?;
        (c.refusal_rate, c.bypass) = (Some(rate), Some(bypass));
        Ok(fit.power)
    }

    /// The largest scale (at most the hook's) whose KL is within `limit`,
    /// fitted on the sample's KL (`fit_scale`) and then measured on every
    /// prompt. Scale 0 when none was found, with the KL at the hook's scale
    /// on the sample. Leaves the hook's scale as it found it.
    fn fit(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        limit: f64,
        close: f64,
        first_power: f64,
    ) -> Result<Fit> {
        let first = self.sample(runner, hook)?;
        let first_kl = mean(&first.kls);
        let (within, power) = self.fit_scale(runner, hook, limit, first, close, first_power)?;
        let Some(within) = within else {
            return Ok(Fit {
                scale: 0.0,
                kl: first_kl,
                power,
            });
        };
        let (scale, kl) =
            self.complete(runner, hook, within, limit, power.unwrap_or(first_power))?;
        Ok(Fit { scale, kl, power })
    }

    /// The largest scale (at most the hook's) whose KL on the sample is
    /// within `limit`, given `first` measured at the hook's scale: found by
    /// fitting KL ≈ a·scaleᵏ through the last two measurements (k =
    /// `first_power` to start) and aiming just under the limit. Done as soon
    /// as a KL lands within `[close·limit, limit]` (or the scales bracket it
    /// within 2 %). Returns the sample at that scale (None: none found) and
    /// KL's exponent where two measurements gave one.
    fn fit_scale(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        limit: f64,
        first: Sampled,
        close: f64,
        first_power: f64,
    ) -> Result<(Option<Sampled>, Option<f64>)> {
        let start = hook.scale;
        let kl = mean(&first.kls);
        if kl <= limit {
            return Ok((Some(first), None));
        }
        let mut measured_power = None;
        let aim = AIM * limit;
        let mut best: Option<Sampled> = None;
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
            let sampled = self.sample(runner, hook)?;
            let k = mean(&sampled.kls);
            let measured = hook.scale;
            if k <= limit {
                (within, kl_within) = (measured, k);
                best = Some(sampled);
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
        Ok((best.filter(|b| b.scale > 0.0), measured_power))
    }

    /// Share of harmful validation replies that are not real answers, and
    /// the mean first-token refusal score.
    pub fn refusals(&self, runner: &mut Runner, hook: &mut AblateHook) -> Result<(f64, f64)> {
        let replies = self.replies(runner, hook, 0..self.harm_val.len())?;
        let refused = count_refused(self.judge, self.model, &replies, self.harm_texts);
        let scores = refusal_scores(replies.iter().map(|g| &g.first_log_probs), self.refusal_ids);
        Ok((refused as f64 / replies.len() as f64, mean(&scores)))
    }

    /// `refusals`, the second half of the replies generated only when the
    /// first half does not already lose to `best` (even with every other
    /// reply an answer, it could not beat it by much): the rate then
    /// extrapolates the first half, and the score is the first half's.
    fn raced_refusals(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        best: f64,
    ) -> Result<(f64, f64)> {
        let n = self.harm_val.len();
        let half = n / 2;
        let mut replies = self.replies(runner, hook, 0..half)?;
        let first = count_refused(self.judge, self.model, &replies, &self.harm_texts[..half]);
        let scored = |replies: &[Generation]| {
            mean(&refusal_scores(
                replies.iter().map(|g| &g.first_log_probs),
                self.refusal_ids,
            ))
        };
        if half > 0 && loses(first, n, best) {
            return Ok((2.0 * first as f64 / n as f64, scored(&replies)));
        }
        let second = self.replies(runner, hook, half..n)?;
        let refused =
            first + count_refused(self.judge, self.model, &second, &self.harm_texts[half..]);
        replies.extend(second);
        Ok((refused as f64 / n as f64, scored(&replies)))
    }

    /// One refinement trial, aimed at the KL `target`: the scale fitted
    /// on the sample's KL (a point over the target is scaled down to it
    /// rather than dropped, since its shape can be good at a smaller
    /// scale); then replies, raced: the second half only when the first
    /// does not already lose, to `best` (the fewest refusals seen within
    /// the target) or to a `rival` (an earlier trial's KL and refusal
    /// rate). The rest of the KL prompts are decoded before the replies
    /// where the sample's KL is near the target (they may bring the scale
    /// down), else after them and only for a trial that ran its race out.
    /// Returns the refusal rate (None: no scale within the target) and the
    /// scale measured with its KL (the sample's, for a trial that lost).
    pub fn trial(
        &self,
        runner: &mut Runner,
        hook: &mut AblateHook,
        target: f64,
        best: f64,
        power: f64,
        rivals: &[(f64, f64)],
    ) -> Result<(Option<f64>, Fit)> {
        let first = self.sample(runner, hook)?;
        let first_kl = mean(&first.kls);
        let (within, measured) = self.fit_scale(runner, hook, target, first, TRIAL_CLOSE, power)?;
        let Some(within) = within else {
            // No scale within the target: the figures of the point as given.
            let unscaled = Fit {
                scale: hook.scale,
                kl: first_kl,
                power: measured,
            };
            return Ok((None, unscaled));
        };
        let power = measured.unwrap_or(power);
        let mut pending = Some(within);
        let (scale, kl) = match pending.take_if(|w| mean(&w.kls) >= NEAR_TARGET * target) {
            Some(near) => self.complete(runner, hook, near, target, power)?,
            None => pending.as_ref().map(|w| (w.scale, mean(&w.kls))).unwrap(),
        };
        let fit = |kl| Fit {
            scale,
            kl,
            power: measured,
        };
        hook.scale = scale;
        let n = self.harm_val.len();
        let half = n / 2;
        let first = self.refused(runner, hook, 0..half)?;
        let half_rate = first as f64 / half.max(1) as f64;
        let beaten = rivals
            .iter()
            .any(|&(rival_kl, rate)| rival_kl <= kl && rate + RACE_MARGIN < half_rate);
        if half > 0 && (loses(first, n, best) || beaten) {
            return Ok((Some(2.0 * first as f64 / n as f64), fit(kl)));
        }
        let second = self.refused(runner, hook, half..n)?;
        let kl = match pending {
            Some(w) => self.complete(runner, hook, w, f64::INFINITY, power)?.1,
            None => kl,
        };
        Ok((Some((first + second) as f64 / n as f64), fit(kl)))
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
