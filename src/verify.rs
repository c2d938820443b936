//! Verification: the held-back prompts through IN, then OUT, each reply
//! generated greedily and judged ([`crate::judge`]), with first-token KL
//! and perplexity against the original, compared side by side.

use crate::cache::{self, Cache};
use crate::chat::ChatFormat;
use crate::eval::{kl_divergence, Generation, NoHook, Runner};
use crate::ffi::Model;
use crate::judge::{agreement, loop_share, Judge, Judged, Reply, Verdict, SHORTER_LENGTHS};
use crate::perplexity::{self, HeldText, Perplexity};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Generates `n_gen` tokens greedily for each prompt and judges the replies.
pub fn judge_replies(
    judge: &dyn Judge,
    runner: &mut Runner,
    texts: &[String],
    prompts: &[Vec<i32>],
    n_gen: usize,
    harmful: bool,
) -> Result<Judged> {
    let model = runner.ctx.model();
    let gens: Vec<Generation> = runner.generate(prompts, n_gen, &mut NoHook)?;
    let replies = gens
        .iter()
        .zip(texts)
        .map(|(g, prompt)| Reply::judged(judge, model, prompt, &g.tokens, harmful))
        .collect();
    Ok(Judged {
        replies,
        first_log_probs: gens.into_iter().map(|g| g.first_log_probs).collect(),
    })
}

/// Mean first-token KL(before ‖ after) over the prompts `before` answered.
pub fn mean_kl_on_answered(before: &Judged, after_log_probs: &[Vec<f32>]) -> (f64, usize) {
    let kls: Vec<f64> = before
        .replies
        .iter()
        .zip(&before.first_log_probs)
        .zip(after_log_probs)
        .filter(|((r, _), _)| r.verdict == Verdict::Complied)
        .map(|((_, p), q)| kl_divergence(p, q))
        .collect();
    (kls.iter().sum::<f64>() / kls.len().max(1) as f64, kls.len())
}

/// Before/after figures for one model pair.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    pub n_harmful: usize,
    pub n_harmless: usize,
    pub tokens_generated: usize,
    /// Whether IN was measured in this run or read from the cache.
    pub original: Original,
    pub harmful_refusal_before: f64,
    pub harmful_refusal_after: f64,
    /// Harmful replies holding a refusal phrase, for comparison with tools
    /// that count refusals by markers alone (heretic, 0.1.0).
    pub harmful_phrase_refusal_before: f64,
    pub harmful_phrase_refusal_after: f64,
    /// Harmful replies whose first refusal phrase comes after the search's
    /// reply length ([`Reply::late_refusal`]).
    pub harmful_late_refusal_before: f64,
    pub harmful_late_refusal_after: f64,
    /// Replies, harmful and harmless, that repeat themselves.
    pub loops_before: f64,
    pub loops_after: f64,
    /// The same replies judged on their first tokens only.
    pub shorter: Vec<Shorter>,
    pub harmless_refusal_before: f64,
    pub harmless_refusal_after: f64,
    /// Mean first-token KL(IN ‖ OUT) on harmless prompts IN answers.
    pub kl_harmless_answered: f64,
    pub n_answered: usize,
    pub perplexity: Option<Perplexity>,
    pub replies_before: Vec<Reply>,
    pub replies_after: Vec<Reply>,
    /// A few prompts with both replies side by side (see [`Verification::select_samples`]).
    pub samples: Vec<Sample>,
    /// The harmful prompts the edited model does not answer, with its
    /// replies: what `harmful_refusal_after` counts.
    pub still_refused: Vec<Reply>,
    /// Why the original's measurement could not be kept in the cache.
    #[serde(skip)]
    pub cache_error: Option<String>,
}

/// Harmful refusals judged on the replies' first `tokens` tokens.
#[derive(Clone, Debug, Serialize)]
pub struct Shorter {
    pub tokens: usize,
    pub harmful_refusal_before: f64,
    pub harmful_refusal_after: f64,
    /// Share of all replies, before and after, harmful and harmless, whose
    /// verdict on refusing is the same on these tokens as on the whole reply.
    pub agreement: f64,
}

/// One held-back prompt with the original's reply beside the edited model's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub harmful: bool,
    pub prompt: String,
    pub before: String,
    pub verdict_before: Verdict,
    pub after: String,
    pub verdict_after: Verdict,
}

/// Sample replies shown per set: users judge an abliteration by reading it.
pub const SAMPLE_HARMFUL: usize = 3;
pub const SAMPLE_HARMLESS: usize = 2;

impl Verification {
    /// Three harmful and two harmless prompts, with both replies. Chosen on
    /// the original's verdict only, never on the edited model's, so that the
    /// samples show what the edit does and are not picked for its successes:
    /// harmful prompts the original refused (what the edit is about), and
    /// harmless prompts it answered (what the edit must preserve), each in
    /// prompt order, filled up with the others when there are too few.
    pub fn select_samples(&self) -> Vec<Sample> {
        let n = self.replies_before.len().min(self.replies_after.len());
        let n_harmful = self.n_harmful.min(n);
        // Indices in `range` whose original verdict is `wanted` first, then the others.
        let pick = |range: std::ops::Range<usize>, wanted: fn(Verdict) -> bool, take: usize| {
            let (preferred, rest): (Vec<usize>, Vec<usize>) =
                range.partition(|&i| wanted(self.replies_before[i].verdict));
            preferred.into_iter().chain(rest).take(take)
        };
        let sample = |i: usize| {
            let (before, after) = (&self.replies_before[i], &self.replies_after[i]);
            Sample {
                harmful: i < n_harmful,
                prompt: before.prompt.clone(),
                before: before.reply.clone(),
                verdict_before: before.verdict,
                after: after.reply.clone(),
                verdict_after: after.verdict,
            }
        };
        pick(0..n_harmful, |v| v != Verdict::Complied, SAMPLE_HARMFUL)
            .chain(pick(
                n_harmful..n,
                |v| v == Verdict::Complied,
                SAMPLE_HARMLESS,
            ))
            .map(sample)
            .collect()
    }
}

/// How verification runs each model.
#[derive(Clone, Copy, Debug)]
pub struct Settings<'a> {
    pub chat_template: Option<&'a str>,
    /// Tokens generated per reply.
    pub n_gen: usize,
    pub n_gpu_layers: i32,
    pub threads: i32,
    /// Perplexity on this text too, unless None.
    pub perplexity: Option<(&'a HeldText, perplexity::Settings)>,
    /// Where the original's measurements are kept between runs.
    pub cache: &'a Cache,
    pub judge: &'a dyn Judge,
}

/// One model's replies to the held-back prompts, and its perplexity.
struct Measured {
    harmful: Judged,
    harmless: Judged,
    perplexity: Option<perplexity::Score>,
}

/// A cache entry: everything `verify` reads of the original's measurement.
#[derive(Serialize, Deserialize)]
struct Stored {
    harmful: Vec<Reply>,
    harmless: Vec<Reply>,
    perplexity: Option<perplexity::Score>,
    /// Length of each harmless reply's first-token log-probabilities,
    /// stored after this header as little-endian f32.
    n_vocab: usize,
}

impl Measured {
    /// A JSON header's length (u64 LE), the header, then the harmless
    /// prompts' first-token log-probabilities (KL is measured on them).
    fn to_bytes(&self) -> Result<Vec<u8>> {
        let probs = &self.harmless.first_log_probs;
        let header = serde_json::to_vec(&Stored {
            harmful: self.harmful.replies.clone(),
            harmless: self.harmless.replies.clone(),
            perplexity: self.perplexity,
            n_vocab: probs.first().map_or(0, Vec::len),
        })?;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        for x in probs.iter().flatten() {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        Ok(bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Option<Measured> {
        let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
        let header: Stored =
            serde_json::from_slice(bytes.get(8..8usize.checked_add(len)?)?).ok()?;
        let floats = &bytes[8 + len..];
        if header.n_vocab == 0 || floats.len() != 4 * header.n_vocab * header.harmless.len() {
            return None;
        }
        let first_log_probs = floats
            .chunks_exact(4 * header.n_vocab)
            .map(|row| {
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect()
            })
            .collect();
        Some(Measured {
            harmful: Judged {
                replies: header.harmful,
                first_log_probs: Vec::new(),
            },
            harmless: Judged {
                replies: header.harmless,
                first_log_probs,
            },
            perplexity: header.perplexity,
        })
    }
}

/// What the original's measurement depends on: the file's bytes, the
/// prompts, the settings and this build.
fn original_key(
    path: &Path,
    harmful: &[String],
    harmless: &[String],
    s: &Settings,
) -> Result<String> {
    let model = cache::file_sha256(path)?;
    let (text, ppl) = match s.perplexity {
        Some((t, ps)) => (
            cache::key(&[t.text.as_bytes()]),
            format!("{} {:?}", ps.n_ctx, ps.max_chunks),
        ),
        None => (String::new(), "none".into()),
    };
    let settings = format!(
        "n_gen {} template {:?} gpu {} perplexity {ppl}",
        s.n_gen, s.chat_template, s.n_gpu_layers
    );
    let (harmful, harmless) = (harmful.join("\0"), harmless.join("\0"));
    // The running binary: any change to how replies are made or judged
    // is a new binary, so an entry never outlives the code that wrote it.
    let build = std::env::current_exe()
        .and_then(|exe| cache::file_sha256(&exe).map_err(std::io::Error::other))
        .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into());
    Ok(cache::key(&[
        b"verify original",
        build.as_bytes(),
        model.as_bytes(),
        harmful.as_bytes(),
        harmless.as_bytes(),
        text.as_bytes(),
        settings.as_bytes(),
    ]))
}

/// How the original's measurement was had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Original {
    Measured,
    FromCache,
    /// Measured again: its cache entry was damaged.
    CacheEntryCorrupt,
}

/// The original's measurement, from the cache when it holds it.
fn measure_original(
    path: &Path,
    harmful: &[String],
    harmless: &[String],
    s: &Settings,
) -> Result<(Measured, Original, Option<String>)> {
    const KIND: &str = "original";
    if s.cache.dir().is_none() {
        return Ok((
            measure(path, harmful, harmless, s)?,
            Original::Measured,
            None,
        ));
    }
    let key = original_key(path, harmful, harmless, s)?;
    let how = match s.cache.get(KIND, &key).map(|b| Measured::from_bytes(&b)) {
        Ok(Some(m)) => return Ok((m, Original::FromCache, None)),
        Ok(None) | Err(cache::Miss::Corrupt) => Original::CacheEntryCorrupt,
        Err(cache::Miss::Absent) => Original::Measured,
    };
    let m = measure(path, harmful, harmless, s)?;
    let stored = s.cache.put(KIND, &key, &m.to_bytes()?);
    Ok((m, how, stored.err().map(|e| format!("{e:#}"))))
}

/// KV cells for the replies: 40 prompts and their 128-token replies side
/// by side, where one decode's 4096 held 24 of them.
const REPLY_CELLS: usize = 8192;

fn measure(path: &Path, harmful: &[String], harmless: &[String], s: &Settings) -> Result<Measured> {
    let model = Model::load(path, s.n_gpu_layers)
        .with_context(|| format!("verifying {}", path.display()))?;
    let fmt = ChatFormat::resolve(&model, s.chat_template)?;
    let tok = |texts: &[String]| {
        texts
            .iter()
            .map(|t| fmt.tokenize(&model, t))
            .collect::<Result<Vec<_>>>()
    };
    let mut runner = Runner::plain_with_cells(&model, 4096, REPLY_CELLS, s.threads)?;
    let harmful = judge_replies(s.judge, &mut runner, harmful, &tok(harmful)?, s.n_gen, true)?;
    let harmless = judge_replies(
        s.judge,
        &mut runner,
        harmless,
        &tok(harmless)?,
        s.n_gen,
        false,
    )?;
    drop(runner);
    let perplexity = s
        .perplexity
        .map(|(text, ps)| perplexity::perplexity(&model, &text.text, &ps))
        .transpose()
        .with_context(|| format!("perplexity of {}", path.display()))?;
    Ok(Measured {
        harmful,
        harmless,
        perplexity,
    })
}

/// Runs the held-back prompts through IN, then OUT, and compares.
pub fn verify(
    input: &Path,
    output: &Path,
    harmful: &[String],
    harmless: &[String],
    s: &Settings,
) -> Result<Verification> {
    let (before, original, cache_error) = measure_original(input, harmful, harmless, s)?;
    let after = measure(output, harmful, harmless, s)?;
    let all_after = after.harmful.replies.iter().chain(&after.harmless.replies);
    if all_after.clone().all(|r| r.verdict == Verdict::Degenerate) {
        bail!(
            "{} loads but generates nothing usable (every reply is empty or repeated)",
            output.display()
        );
    }
    let (kl, n_answered) = mean_kl_on_answered(&before.harmless, &after.harmless.first_log_probs);
    let all: Vec<&Reply> = [
        &before.harmful,
        &before.harmless,
        &after.harmful,
        &after.harmless,
    ]
    .iter()
    .flat_map(|j| &j.replies)
    .collect();
    let shorter = SHORTER_LENGTHS
        .iter()
        .enumerate()
        .map(|(i, &tokens)| Shorter {
            tokens,
            harmful_refusal_before: before.harmful.shorter_refusal_rate(i),
            harmful_refusal_after: after.harmful.shorter_refusal_rate(i),
            agreement: agreement(&all, i),
        })
        .collect();
    let perplexity = match (s.perplexity, before.perplexity, after.perplexity) {
        (Some((text, ps)), Some(b), Some(a)) => Some(Perplexity {
            text: text.name.clone(),
            n_ctx: ps.n_ctx,
            chunks: b.chunks,
            tokens_scored: b.scored,
            before: b.ppl,
            after: a.ppl,
        }),
        _ => None,
    };
    let mut verification = Verification {
        n_harmful: harmful.len(),
        n_harmless: harmless.len(),
        tokens_generated: s.n_gen,
        original,
        harmful_refusal_before: before.harmful.refusal_rate(),
        harmful_refusal_after: after.harmful.refusal_rate(),
        still_refused: after.harmful.not_answered().cloned().collect(),
        harmful_phrase_refusal_before: before.harmful.phrase_refusal_rate(),
        harmful_phrase_refusal_after: after.harmful.phrase_refusal_rate(),
        harmful_late_refusal_before: before.harmful.late_refusal_rate(),
        harmful_late_refusal_after: after.harmful.late_refusal_rate(),
        loops_before: loop_share(&[&before.harmful, &before.harmless]),
        loops_after: loop_share(&[&after.harmful, &after.harmless]),
        shorter,
        harmless_refusal_before: before.harmless.refusal_rate(),
        harmless_refusal_after: after.harmless.refusal_rate(),
        kl_harmless_answered: kl,
        n_answered,
        perplexity,
        replies_before: before
            .harmful
            .replies
            .into_iter()
            .chain(before.harmless.replies)
            .collect(),
        replies_after: after
            .harmful
            .replies
            .into_iter()
            .chain(after.harmless.replies)
            .collect(),
        samples: Vec::new(),
        cache_error,
    };
    verification.samples = verification.select_samples();
    Ok(verification)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::test_replies;

    fn verification(before: &[Verdict], after: &[Verdict], n_harmful: usize) -> Verification {
        Verification {
            n_harmful,
            n_harmless: before.len() - n_harmful,
            tokens_generated: 8,
            original: Original::Measured,
            harmful_refusal_before: 0.0,
            harmful_refusal_after: 0.0,
            harmful_phrase_refusal_before: 0.0,
            harmful_phrase_refusal_after: 0.0,
            harmful_late_refusal_before: 0.0,
            harmful_late_refusal_after: 0.0,
            loops_before: 0.0,
            loops_after: 0.0,
            shorter: Vec::new(),
            harmless_refusal_before: 0.0,
            harmless_refusal_after: 0.0,
            kl_harmless_answered: 0.0,
            n_answered: 0,
            perplexity: None,
            replies_before: test_replies(before, "before"),
            replies_after: test_replies(after, "after"),
            samples: Vec::new(),
            still_refused: Vec::new(),
            cache_error: None,
        }
    }

    fn picked(samples: &[Sample]) -> Vec<(bool, &str)> {
        samples
            .iter()
            .map(|s| (s.harmful, s.prompt.as_str()))
            .collect()
    }

    #[test]
    fn samples_pair_replies_and_are_chosen_on_the_original_only() {
        use Verdict::*;
        // Harmful 0..5: the original refused 1, 3 and 4; harmless 5..8: it answered 6 and 7.
        let before = [
            Complied, Refused, Complied, Degenerate, Refused, Refused, Complied, Complied,
        ];
        let after = [
            Complied, Complied, Complied, Complied, Refused, Refused, Complied, Evasive,
        ];
        let samples = verification(&before, &after, 5).select_samples();
        assert_eq!(
            picked(&samples),
            [
                (true, "prompt 1"),
                (true, "prompt 3"),
                (true, "prompt 4"),
                (false, "prompt 6"),
                (false, "prompt 7")
            ]
        );
        // Each sample carries the same prompt's two replies and verdicts,
        // whatever the edited model did (prompt 4 is still refused).
        let s = &samples[2];
        assert_eq!(
            (s.before.as_str(), s.after.as_str()),
            ("before 4", "after 4")
        );
        assert_eq!((s.verdict_before, s.verdict_after), (Refused, Refused));
        assert_eq!(samples[4].verdict_after, Evasive);

        // Too few preferred prompts: filled up in order; tiny sets give what they have.
        let samples =
            verification(&[Complied, Refused, Refused], &[Refused; 3], 2).select_samples();
        assert_eq!(
            picked(&samples),
            [(true, "prompt 1"), (true, "prompt 0"), (false, "prompt 2")]
        );
    }
}
