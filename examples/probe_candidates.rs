//! Measures the generation refusal rate and KL of given candidates.
use gguf_abliterate::activations::capture;
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::direction::DirectionFile;
use gguf_abliterate::eval::{AblateHook, NoHook, Runner};
use gguf_abliterate::ffi::{self, Model};
use gguf_abliterate::prompts::{Kind, PromptSet};
use gguf_abliterate::verify::{judge_replies, mean_kl_on_answered};
use indicatif::ProgressBar;
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let cands: Vec<(usize, usize)> = std::env::args()
        .skip(2)
        .map(|a| {
            let (l, p) = a.split_once('/').unwrap();
            (l.parse().unwrap(), p.parse().unwrap())
        })
        .collect();
    ffi::init_backend(false);
    let model = Model::load(path.as_ref(), 0)?;
    let fmt = ChatFormat::resolve(&model, None)?;
    let (h, s) = (
        PromptSet::builtin(Kind::Harmful),
        PromptSet::builtin(Kind::Harmless),
    );
    let tok = |v: &[gguf_abliterate::prompts::Prompt]| {
        v.iter()
            .map(|p| fmt.tokenize(&model, &p.text).unwrap())
            .collect::<Vec<_>>()
    };
    let txt = |v: &[gguf_abliterate::prompts::Prompt]| {
        v.iter().map(|p| p.text.clone()).collect::<Vec<_>>()
    };
    let ntr: usize = std::env::var("NTR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut runner = Runner::new(&model, 2048, 2)?;
    let bar = ProgressBar::hidden();
    let (hm, _) = capture(
        &mut runner,
        &tok(&h.train[..ntr]),
        model.n_layer() - 1,
        fmt.n_post(),
        &bar,
    )?;
    let (sm, _) = capture(
        &mut runner,
        &tok(&s.train[..ntr]),
        model.n_layer() - 1,
        fmt.n_post(),
        &bar,
    )?;
    let hv = &h.val[32..];
    let sv = &s.val[32..];
    let base_h = judge_replies(&mut runner, &txt(hv), &tok(hv), 24, &mut NoHook)?;
    let base_s = judge_replies(&mut runner, &txt(sv), &tok(sv), 24, &mut NoHook)?;
    println!(
        "base refusal harmful {:.2} harmless {:.2}",
        base_h.refusal_rate(),
        base_s.refusal_rate()
    );
    let _ = DirectionFile::parse;
    for (l, p) in cands {
        let r: Vec<f32> = hm
            .at(l, p)
            .iter()
            .zip(sm.at(l, p))
            .map(|(a, b)| (a - b) as f32)
            .collect();
        let mut hook = AblateHook::new(&r).unwrap();
        hook.scale = std::env::var("SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.0);
        let jh = judge_replies(&mut runner, &txt(hv), &tok(hv), 24, &mut hook)?;
        let js = judge_replies(&mut runner, &txt(sv), &tok(sv), 24, &mut hook)?;
        let (kl, n) = mean_kl_on_answered(&base_s, &js.first_log_probs);
        let mut per: Vec<f64> = base_s
            .first_log_probs
            .iter()
            .zip(&js.first_log_probs)
            .zip(&base_s.replies)
            .filter(|(_, r)| r.verdict == gguf_abliterate::verify::Verdict::Complied)
            .map(|((p, q), _)| gguf_abliterate::eval::kl_divergence(p, q))
            .collect();
        per.sort_by(|a, b| a.total_cmp(b));
        println!(
            "per-prompt KL: {:?}",
            per.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
        println!(
            "{l}/{p}: refusal harmful {:.2} harmless {:.2} KL {kl:.3} (n={n}) e.g. {:?}",
            jh.refusal_rate(),
            js.refusal_rate(),
            jh.replies[0].reply.chars().take(60).collect::<String>()
        );
    }
    Ok(())
}
