//! Whether a prompt's logits depend on what else is in its batch: the
//! question behind trial packing (several trials' sequences in one decode),
//! which could keep the CPU output byte-identical only if they did not.
//! Decodes 20 harmless validation prompts alone, then with 20 others after
//! them, then twice over in one batch, and compares each prompt's last
//! logits bit for bit with the first decode's.
//!
//! `cargo run --release --example batch_position -- MODEL.gguf`

use anyhow::{Context, Result};
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::direction::default_threads;
use gguf_abliterate::eval::{NoHook, Runner};
use gguf_abliterate::ffi::{self, Model};
use gguf_abliterate::prompts::{Kind, PromptSet};

const PROMPTS: usize = 20;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: batch_position MODEL.gguf")?;
    ffi::init_backend(false);
    let model = Model::load(path.as_ref(), 0)?;
    let fmt = ChatFormat::resolve(&model, None)?;
    let prompts: Vec<Vec<i32>> = PromptSet::builtin(Kind::Harmless)
        .val
        .into_iter()
        .take(2 * PROMPTS)
        .map(|p| fmt.tokenize(&model, &p.text))
        .collect::<Result<_>>()?;
    let mut runner = Runner::plain(&model, 2048, default_threads())?;
    let alone = last_logits(&mut runner, &prompts[..PROMPTS])?;
    let packed = last_logits(&mut runner, &prompts)?;
    let twice: Vec<Vec<i32>> = prompts[..PROMPTS]
        .iter()
        .chain(&prompts[..PROMPTS])
        .cloned()
        .collect();
    let doubled = last_logits(&mut runner, &twice)?;
    for (what, other) in [
        (
            "first in a batch with 20 others after them",
            &packed[..PROMPTS],
        ),
        ("first copy of two in one batch", &doubled[..PROMPTS]),
        ("second copy of two in one batch", &doubled[PROMPTS..]),
    ] {
        let same = alone.iter().zip(other).filter(|(a, b)| a == b).count();
        let max_diff = alone
            .iter()
            .zip(other)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        println!("{what}: {same} of {PROMPTS} bit-identical, largest logit difference {max_diff}");
    }
    Ok(())
}

/// Each prompt's logits at its last token, the prompts packed into one batch.
fn last_logits(runner: &mut Runner, prompts: &[Vec<i32>]) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); prompts.len()];
    runner.run(prompts, &mut NoHook, |ctx, entries| {
        for e in entries {
            out[e.prompt] = ctx.logits(e.last())?.to_vec();
        }
        Ok(())
    })?;
    Ok(out)
}
