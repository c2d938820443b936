//! Perplexity on a held text, computed the way llama.cpp's `llama-perplexity`
//! computes it by default, so that users can compare our figure with theirs:
//! the text tokenized whole (BOS added where the tokenizer adds one), cut
//! into chunks of `n_ctx` tokens whose first token becomes BOS, and each
//! chunk's second half scored, every position predicting the next token.

use crate::ffi::{Batch, Context, ContextOptions, Model};
use anyhow::{bail, Context as _, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The held text shipped with the tool (its source: `data/README.md`).
pub const DEFAULT_TEXT: &str = include_str!("../data/perplexity.txt");
/// How the report names the shipped text.
pub const DEFAULT_TEXT_NAME: &str = "data/perplexity.txt";
/// llama-perplexity's customary context (`-c 512`).
pub const N_CTX: usize = 512;
/// Chunks decoded at once, as llama-perplexity packs `n_batch / n_ctx` of them.
const CHUNKS_PER_DECODE: usize = 4;

/// The text perplexity is measured on.
#[derive(Clone, Debug)]
pub struct HeldText {
    /// As the report names it: the shipped text's repository path, or the file given.
    pub name: String,
    pub text: String,
}

impl HeldText {
    /// The shipped text, or the file given (`--perplexity-text`).
    pub fn load(path: Option<&Path>) -> Result<HeldText> {
        match path {
            None => Ok(HeldText {
                name: DEFAULT_TEXT_NAME.into(),
                text: DEFAULT_TEXT.into(),
            }),
            Some(p) => Ok(HeldText {
                name: p.display().to_string(),
                text: std::fs::read_to_string(p)
                    .with_context(|| format!("reading the perplexity text {}", p.display()))?,
            }),
        }
    }
}

/// One model's perplexity.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub ppl: f64,
    pub chunks: usize,
    /// Tokens scored: `chunks × (n_ctx/2 − 1)`.
    pub scored: usize,
}

/// IN's and OUT's perplexity on the same text, for the report (made by `verify`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Perplexity {
    pub text: String,
    pub n_ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub before: f64,
    pub after: f64,
}

/// How much of the text to score.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub n_ctx: usize,
    /// At most this many chunks (llama-perplexity's `--chunks`); None: all.
    pub max_chunks: Option<usize>,
    pub threads: i32,
}

/// The text's tokens cut into llama-perplexity's chunks.
fn chunks(model: &Model, text: &str, s: &Settings) -> Result<Vec<Vec<i32>>> {
    // llama-perplexity drops one trailing newline of the file it reads.
    let text = text.strip_suffix('\n').unwrap_or(text);
    let tokens = model.tokenize(text, true, false)?;
    if tokens.len() < 2 * s.n_ctx {
        bail!(
            "the perplexity text has {} tokens; it needs at least {} (2 × n_ctx)",
            tokens.len(),
            2 * s.n_ctx
        );
    }
    let n = tokens.len() / s.n_ctx;
    let n = s.max_chunks.map_or(n, |m| m.clamp(1, n));
    let bos = model.adds_bos().then(|| model.bos()).flatten();
    Ok(tokens
        .chunks_exact(s.n_ctx)
        .take(n)
        .map(|c| {
            let mut c = c.to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect())
}

/// Perplexity of `model` on `text`.
pub fn perplexity(model: &Model, text: &str, s: &Settings) -> Result<Score> {
    let chunks = chunks(model, text, s)?;
    let first = s.n_ctx / 2;
    let per_decode = CHUNKS_PER_DECODE.min(chunks.len());
    let cells = (per_decode * s.n_ctx) as u32;
    let mut ctx = Context::new(
        model,
        ContextOptions {
            n_ctx: cells,
            n_batch: cells,
            n_seq: per_decode as u32,
            threads: s.threads,
            eval_callback: false,
        },
    )?;
    let mut batch = Batch::new(cells as usize, 1);
    let (mut nll, mut scored) = (0.0f64, 0usize);
    for group in chunks.chunks(per_decode) {
        batch.clear();
        // Rows whose logits predict a scored token: (batch row, next token).
        let mut targets = Vec::new();
        for (seq, chunk) in group.iter().enumerate() {
            for (pos, &tok) in chunk.iter().enumerate() {
                let scored_row = pos >= first && pos + 1 < chunk.len();
                let row = batch.push(tok, pos, seq as i32, scored_row);
                if scored_row {
                    targets.push((row, chunk[pos + 1]));
                }
            }
        }
        ctx.clear();
        ctx.decode(&batch)?;
        let logits = targets
            .iter()
            .map(|&(row, _)| ctx.logits(row))
            .collect::<Result<Vec<_>>>()?;
        nll += logits
            .par_iter()
            .zip(&targets)
            .map(|(l, &(_, tok))| -log_prob(l, tok as usize))
            .sum::<f64>();
        scored += targets.len();
    }
    Ok(Score {
        ppl: (nll / scored as f64).exp(),
        chunks: chunks.len(),
        scored,
    })
}

/// log softmax(logits)[token], in f64 as llama-perplexity sums it.
fn log_prob(logits: &[f32], token: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[token] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_a_normalized_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let total: f64 = (0..3).map(|i| log_prob(&logits, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_prob(&logits, 2) > log_prob(&logits, 0));
        // Shifting every logit changes nothing.
        let shifted = [1001.0f32, 1002.0, 1003.0];
        assert!((log_prob(&logits, 1) - log_prob(&shifted, 1)).abs() < 1e-6);
    }

    #[test]
    fn the_shipped_text_is_long_enough() {
        // 10,000 tokens at about 4.5 bytes each for English prose.
        assert!(DEFAULT_TEXT.len() > 45_000, "{}", DEFAULT_TEXT.len());
    }
}
