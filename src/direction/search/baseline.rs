//! Stage 2: the unedited model, judged from its replies: how often it
//! refuses, which tokens its refusals open with, and the harmless
//! prompts it answers (KL is measured on those).

use super::capture::Captured;
use super::prompts::{tokenize_all, train_after, Prompts};
use super::{mean, Setup};
use crate::activations::Means;
use crate::eval::{argmax, NoHook, Runner};
use crate::judge::{
    refusal_score, refusal_scores, refusal_tokens, verdict_of, Answers, RefusalToken, Verdict,
    JUDGE_TOKENS,
};
use anyhow::{bail, Result};

/// Below this share of harmful prompts refused, there is nothing to remove.
const MIN_BASELINE_REFUSAL: f64 = 0.05;

pub struct Baseline {
    pub harmful: Means,
    pub harmless: Means,
    pub refusal_ids: Vec<i32>,
    pub refusal_tokens: Vec<RefusalToken>,
    /// Share of harmful validation replies refused.
    pub refusal_rate: f64,
    /// Mean first-token refusal scores on the validation prompts.
    pub harmful_score: f64,
    pub harmless_score: f64,
    /// Harmless validation prompts the model answers.
    pub answered_val: usize,
    /// The harmless prompts KL is measured on, with their first-token
    /// log-probabilities: the answered validation prompts, then answered
    /// training prompts that the capture did not use.
    pub safe_answered: Vec<Vec<i32>>,
    pub base_answered: Vec<Vec<f32>>,
    /// Harmless training prompts taken for KL after the captured ones.
    pub spare: usize,
}

impl Baseline {
    /// The candidate direction at (layer, position): the difference of means.
    pub fn direction(&self, layer: usize, position: usize) -> Vec<f32> {
        self.harmful.minus(&self.harmless, layer, position)
    }
}

/// The unedited model's judged replies to the validation prompts.
pub struct Replies {
    /// Each harmful prompt's first-token log-probabilities, and its verdict.
    base_harm: Vec<Vec<f32>>,
    harm_verdicts: Vec<Verdict>,
    base_safe: Vec<Vec<f32>>,
    safe_verdicts: Vec<Verdict>,
}

/// The search's first decode: a model that does not refuse is told so
/// here, before the capture and minutes of search.
pub fn replies(s: &Setup, runner: &mut Runner, p: &Prompts) -> Result<Replies> {
    // The replies' prefill gives every prompt's first-token distribution:
    // no second decode of the same prompts for it.
    let (base_harm, harm_verdicts) = judged_replies(s, runner, &p.harm_val, Some(&p.harm_texts))?;
    let refused = harm_verdicts
        .iter()
        .filter(|&&v| v == Verdict::Refused)
        .count();
    let n_replies = p.harm_val.len();
    // A corrupted model's replies are noise: the capture, next, names the
    // layer where its activations turn NaN/Inf, which says more than
    // "no refusal".
    let poisoned = base_harm.iter().flatten().any(|x| x.is_nan());
    if !poisoned {
        check_refuses(refused, n_replies)?;
    }
    let (base_safe, safe_verdicts) = judged_replies(s, runner, &p.safe_val, None)?;
    Ok(Replies {
        base_harm,
        harm_verdicts,
        base_safe,
        safe_verdicts,
    })
}

/// Enough refused replies to find a direction for.
fn check_refuses(refused: usize, n_replies: usize) -> Result<()> {
    let refusal_rate = refused as f64 / n_replies.max(1) as f64;
    if refusal_rate < MIN_BASELINE_REFUSAL {
        bail!(
            "the model refuses {refused} of {n_replies} harmful validation prompts ({:.0}%, judged from its replies): \
             there is no refusal to remove (a base model, or one already abliterated?)",
            100.0 * refusal_rate
        );
    }
    Ok(())
}

/// The refusal tokens (from the replies and the capture's first tokens)
/// and the harmless prompts KL is measured on.
pub fn measure(
    s: &Setup,
    runner: &mut Runner,
    p: &Prompts,
    r: Replies,
    c: Captured,
) -> Result<Baseline> {
    let Replies {
        base_harm,
        harm_verdicts,
        base_safe,
        safe_verdicts,
    } = r;
    let n_replies = p.harm_val.len();
    let refused_first = with_verdict(&base_harm, &harm_verdicts, Verdict::Refused);
    // Made already, unless the replies were NaN and the capture came first.
    check_refuses(refused_first.len(), n_replies)?;
    let refusal_rate = refused_first.len() as f64 / n_replies.max(1) as f64;
    let complied_first = with_verdict(&base_harm, &harm_verdicts, Verdict::Complied);
    let answered_first = with_verdict(&base_safe, &safe_verdicts, Verdict::Complied);
    let refusal_ids = refusal_tokens(
        &c.harmful_first,
        &c.harmless_first,
        &refused_first,
        &Answers {
            harmless: &answered_first,
            harmful: &complied_first,
        },
    );
    if refusal_ids.is_empty() {
        // The refusals' commonest opening, which then opens other replies too.
        let openings: Vec<i32> = refused_first.iter().map(|lp| argmax(lp)).collect();
        let opening = openings
            .iter()
            .max_by_key(|&&t| openings.iter().filter(|&&o| o == t).count())
            .map(|&t| {
                let text = s.model.token_to_piece(t);
                format!(" (they open with {text:?}, as its other replies do)")
            })
            .unwrap_or_default();
        bail!(
            "the model refuses {} of {} harmful validation prompts ({:.0}%), but no first token \
             tells its refusals from its answers{opening}: too little refusal to find a direction for",
            refused_first.len(),
            n_replies,
            100.0 * refusal_rate
        );
    }
    let refusal_tokens = refusal_ids
        .iter()
        .map(|&id| RefusalToken {
            id,
            text: s.model.token_to_piece(id),
        })
        .collect();

    let safe_scores = refusal_scores(&base_safe, &refusal_ids);
    // KL is measured only where the model answers: un-refusing a harmless
    // prompt it used to refuse is the point, not damage.
    let answered: Vec<usize> = (0..p.safe_val.len())
        .filter(|&i| safe_scores[i] < 0.0)
        .collect();
    if answered.is_empty() {
        bail!(
            "the model refuses every harmless validation prompt; there is nothing to measure KL on"
        );
    }
    let mut safe_answered: Vec<Vec<i32>> =
        answered.iter().map(|&i| p.safe_val[i].clone()).collect();
    let mut base_answered: Vec<Vec<f32>> = answered.iter().map(|&i| base_safe[i].clone()).collect();
    // KL on a few prompts is noisy, and the refinement's many trials would
    // fit its noise: so it is also measured on answered training prompts
    // that the capture did not use. Not on the captured ones: the direction
    // is made from their means, so KL there is biased low.
    let spare = train_after(s.harmless, p.safe_train.len(), p.safe_val.len());
    let (spare_answered, spare_base) =
        answered_prompts(runner, tokenize_all(s.model, s.fmt, &spare)?, &refusal_ids)?;
    safe_answered.extend(spare_answered);
    base_answered.extend(spare_base);
    Ok(Baseline {
        harmful: c.harmful,
        harmless: c.harmless,
        harmful_score: mean(&refusal_scores(&base_harm, &refusal_ids)),
        harmless_score: mean(&safe_scores),
        refusal_ids,
        refusal_tokens,
        refusal_rate,
        answered_val: answered.len(),
        safe_answered,
        base_answered,
        spare: spare.len(),
    })
}

/// Greedy replies to `prompts`, judged (as harmful requests when their
/// `texts` are given): each prompt's first-token distribution and verdict.
fn judged_replies(
    s: &Setup,
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    texts: Option<&[String]>,
) -> Result<(Vec<Vec<f32>>, Vec<Verdict>)> {
    let replies = runner.generate(prompts, JUDGE_TOKENS, &mut NoHook)?;
    Ok(replies
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let verdict = verdict_of(s.judge, s.model, &g, texts.map(|t| t[i].as_str()));
            (g.first_log_probs, verdict)
        })
        .unzip())
}

/// The first-token distributions of the replies judged `verdict`.
fn with_verdict(first: &[Vec<f32>], verdicts: &[Verdict], verdict: Verdict) -> Vec<Vec<f32>> {
    first
        .iter()
        .zip(verdicts)
        .filter(|(_, &v)| v == verdict)
        .map(|(lp, _)| lp.clone())
        .collect()
}

/// Prompts (tokens) with their first-token log-probabilities.
pub type PromptsWithLogProbs = (Vec<Vec<i32>>, Vec<Vec<f32>>);

/// The prompts the unedited model answers (first-token refusal score
/// below 0), with their first-token log-probabilities.
pub fn answered_prompts(
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
