//! Capture throughput against a plain decode of the same tokens, in one run.
//! Run by scripts/bench-capture.sh.

use gguf_abliterate::activations::capture_means;
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::eval::{AblateHook, NoHook, Runner};
use gguf_abliterate::ffi::{self, Model};
use gguf_abliterate::prompts::{Kind, PromptSet};
use indicatif::ProgressBar;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .expect("usage: bench_capture MODEL.gguf");
    ffi::init_backend(false);
    let model = Model::load(path.as_ref(), 0)?;
    let fmt = ChatFormat::resolve(&model, None)?;
    let set = PromptSet::builtin(Kind::Harmless);
    let prompts: Vec<Vec<i32>> = set
        .train
        .iter()
        .take(128)
        .map(|p| fmt.tokenize(&model, &p.text))
        .collect::<Result<_, _>>()?;
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let threads = gguf_abliterate::direction::default_threads();
    let n_batch: usize = std::env::var("NB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    // The baseline is llama.cpp with no eval callback installed at all.
    let mut plain = Runner::plain(&model, n_batch, threads)?;
    let mut runner = Runner::new(&model, n_batch, threads)?;
    plain.first_token_logprobs(&prompts[..8], &mut NoHook)?; // warm up
    runner.first_token_logprobs(&prompts[..8], &mut NoHook)?;

    let mut best = [f64::INFINITY; 3];
    for _ in 0..3 {
        let t = Instant::now();
        plain.run(&prompts, &mut NoHook, |_, _| Ok(()))?;
        best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        capture_means(
            &mut runner,
            &prompts,
            model.n_layer() - 1,
            fmt.n_post(),
            &ProgressBar::hidden(),
        )?;
        best[1] = best[1].min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut hook = AblateHook::new(&vec![1.0; model.n_embd()]).unwrap();
        runner.run(&prompts, &mut hook, |_, _| Ok(()))?;
        best[2] = best[2].min(t.elapsed().as_secs_f64());
    }
    let tps = |s: f64| tokens as f64 / s;
    println!(
        "{} prompts, {tokens} tokens, {threads} threads (best of 3)",
        prompts.len()
    );
    println!("plain decode (no eval callback) {:8.0} tok/s", tps(best[0]));
    println!(
        "capture                        {:8.0} tok/s   ratio {:.2} (target >= 0.85)",
        tps(best[1]),
        best[0] / best[1]
    );
    println!(
        "ablation hook                  {:8.0} tok/s   ratio {:.2}",
        tps(best[2]),
        best[0] / best[2]
    );
    Ok(())
}
