//! Plain llama.cpp decode rates on a model, for `scripts/bench-search.sh`.
//! The search's kind of rows, on the built-in validation prompts: prompt
//! rows (first-token passes, prompts packed into batches) and generated
//! rows (greedy replies, one row per sequence and decode), each through a
//! context with no eval callback, then through the search's hook with a
//! direction ablated. Prints one JSON object of rows per second.
//!
//! `cargo run --release --example bench_decode -- MODEL.gguf`

use anyhow::{Context, Result};
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::direction::default_threads;
use gguf_abliterate::eval::{AblateHook, BatchHook, NoHook, Runner};
use gguf_abliterate::ffi::{self, decode_count, Model};
use gguf_abliterate::judge::JUDGE_TOKENS;
use gguf_abliterate::prompts::{Kind, PromptSet};
use std::time::Instant;

/// Passes per measurement; the fastest counts (the machine's speed drifts).
const REPEAT: usize = 3;
/// Validation prompts per set, as the search uses.
const PROMPTS: usize = 32;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: bench_decode MODEL.gguf")?;
    ffi::init_backend(false);
    let model = Model::load(path.as_ref(), 0)?;
    let fmt = ChatFormat::resolve(&model, None)?;
    let prompts: Vec<Vec<i32>> = [Kind::Harmful, Kind::Harmless]
        .iter()
        .flat_map(|&kind| PromptSet::builtin(kind).val.into_iter().take(PROMPTS))
        .map(|p| fmt.tokenize(&model, &p.text))
        .collect::<Result<_>>()?;
    let threads = default_threads();
    let mut plain = Runner::plain(&model, 2048, threads)?;
    let (prompt, generated) = rates(&mut plain, &prompts, &mut NoHook)?;
    drop(plain);
    let direction: Vec<f32> = (0..model.n_embd())
        .map(|i| ((i * 7919 % 997) as f32 / 997.0) - 0.5)
        .collect();
    let mut hook = AblateHook::new(&direction).context("zero direction")?;
    let mut hooked = Runner::new(&model, 2048, threads)?;
    let (hooked_prompt, hooked_generated) = rates(&mut hooked, &prompts, &mut hook)?;
    println!(
        "{}",
        serde_json::json!({
            "prompt_rows_per_s": prompt,
            "generated_rows_per_s": generated,
            "hooked_prompt_rows_per_s": hooked_prompt,
            "hooked_generated_rows_per_s": hooked_generated,
            "threads": threads,
        })
    );
    Ok(())
}

/// Rows per second as prompt rows and as generated rows. Generated rows
/// are timed as replies of `JUDGE_TOKENS` tokens less replies of one
/// token, which decode the same prompts and nothing else.
fn rates(
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    hook: &mut dyn BatchHook,
) -> Result<(f64, f64)> {
    let prompt = fastest(|| {
        runner.first_token_logprobs(prompts, hook)?;
        Ok(())
    })?;
    let whole = fastest(|| {
        runner.generate(prompts, JUDGE_TOKENS, hook)?;
        Ok(())
    })?;
    let prefill = fastest(|| {
        runner.generate(prompts, 1, hook)?;
        Ok(())
    })?;
    let generated = (whole.generated - prefill.generated) as f64;
    Ok((
        prompt.rows as f64 / prompt.seconds,
        generated / (whole.seconds - prefill.seconds).max(1e-9),
    ))
}

struct Pass {
    seconds: f64,
    rows: u64,
    generated: u64,
}

/// The fastest of `REPEAT` passes of `f`, with the rows it decoded.
fn fastest(mut f: impl FnMut() -> Result<()>) -> Result<Pass> {
    let mut best: Option<Pass> = None;
    for _ in 0..REPEAT {
        let (at, since) = (decode_count(), Instant::now());
        f()?;
        let now = decode_count();
        let pass = Pass {
            seconds: since.elapsed().as_secs_f64(),
            rows: now.rows - at.rows,
            generated: now.generated - at.generated,
        };
        if best.as_ref().is_none_or(|b| pass.seconds < b.seconds) {
            best = Some(pass);
        }
    }
    Ok(best.expect("REPEAT > 0"))
}
