//! The terminal reporter: one line per tensor as `llama-quantize` prints
//! them, the search's summary and front, and the verification's tables.

use super::{Reporter, Searched};
use crate::apply::{ApplyReport, TensorReport, TensorSink};
use crate::cache::Cache;
use crate::cost::{self, StageCost};
use crate::direction::{DirectionFile, SearchResult};
use crate::judge::JUDGE_TOKENS;
use crate::verify::{self, Verification};
use std::path::Path;

/// Prints to the terminal: tables to stdout, progress lines to stderr.
pub struct Terminal;

impl TensorSink for Terminal {
    fn tensor(&mut self, done: usize, total: usize, shape: &str, t: &TensorReport) {
        eprintln!("{}", tensor_line(done, total, shape, t));
    }
}

impl Reporter for Terminal {
    fn searched(&mut self, found: &Searched) {
        if found.result.fallback {
            eprintln!(
                "warning: no candidate passed the filters; taking the one with the lowest KL"
            );
        }
        print_search(found);
        print_front(found.result);
    }

    fn picked(&mut self, n: usize, file: &DirectionFile) {
        let edit = file.recorded_edit();
        eprintln!(
            "picked front point {n}: direction index {}, {}",
            edit.direction_index,
            serde_json::to_string(&edit.weights).unwrap_or_default()
        );
    }

    fn applied(&mut self, applied: &ApplyReport, scale: f32, skip_embeddings: bool) {
        for out in &applied.outputs {
            eprintln!(
                "wrote {} ({} tensors edited, scale {scale}{}{})",
                out.display(),
                applied.tensors.len(),
                subspace_note(applied),
                if skip_embeddings {
                    ", token_embd kept"
                } else {
                    ""
                }
            );
        }
    }

    fn applied_direction(&mut self, applied: &ApplyReport) {
        for out in &applied.outputs {
            eprintln!(
                "wrote {} ({} tensors edited{})",
                out.display(),
                applied.tensors.len(),
                subspace_note(applied)
            );
        }
    }

    fn verified(&mut self, input: &Path, v: &Verification, cache: &Cache) {
        let cache_dir = || {
            cache
                .dir()
                .map_or(String::new(), |d| d.display().to_string())
        };
        match v.original {
            verify::Original::Measured => {}
            verify::Original::FromCache => eprintln!(
                "verify: {}'s replies and perplexity read from the cache ({}), not measured again",
                input.display(),
                cache_dir()
            ),
            verify::Original::CacheEntryCorrupt => eprintln!(
                "verify: the cache entry for {} was damaged; measured again and replaced ({})",
                input.display(),
                cache_dir()
            ),
        }
        if let Some(e) = &v.cache_error {
            eprintln!("warning: {e}");
        }
        print_table(v);
        print_samples(v);
        print_still_refused(v);
    }

    fn cost(&mut self, stages: &[StageCost]) {
        println!("\ncost of this run (rows decoded through llama.cpp)");
        print!("{}", cost::table(stages));
    }

    fn wrote(&mut self, path: &Path, what: &str) {
        if what.is_empty() {
            eprintln!("wrote {}", path.display());
        } else {
            eprintln!("wrote {} ({what})", path.display());
        }
    }

    fn modelfile(&mut self, path: &Path, tag: &str) {
        eprintln!(
            "wrote {}; import it with:\n  cd {} && ollama create {tag} -f Modelfile",
            path.display(),
            path.parent()
                .map_or(".".into(), |p| p.display().to_string())
        );
    }

    fn done(&mut self, seconds: f64) {
        eprintln!("done in {seconds:.0} s");
    }
}

/// ", a 2-dimensional subspace" where more than one direction was removed.
fn subspace_note(applied: &ApplyReport) -> String {
    match applied.subspace_dim {
        1 => String::new(),
        k => format!(", a {k}-dimensional subspace"),
    }
}

/// One tensor's line: what happened to it.
pub fn tensor_line(done: usize, total: usize, shape: &str, t: &TensorReport) -> String {
    format!(
        "[{:>4}/{total}] {:<32} {:>7} {:>18}  max|{}ᵀW| {:.4} -> {:.4}  kept {:.3} of {:.2}, error x{:.2} ({}){}{}",
        done,
        t.name,
        t.ggml_type,
        shape,
        if t.directions > 1 { "U" } else { "r" },
        t.max_before,
        t.max_after,
        t.kept,
        (1.0 - t.removed).abs(),
        t.error_ratio,
        match (t.passes, t.moves) {
            (1, 0) => "1 pass".to_string(),
            (1, 1) => "1 code moved".to_string(),
            (1, m) => format!("{m} codes moved"),
            (p, _) => format!("{p} passes"),
        },
        if t.removed == 1.0 {
            String::new()
        } else {
            format!("  ({:.0}% removed)", 100.0 * t.removed)
        },
        t.post_norm
            .as_deref()
            .map(|n| format!("  (via {n})"))
            .unwrap_or_default()
    )
}

/// The first stage's choice, the refusal tokens and the candidates' frontier.
fn print_search(found: &Searched) {
    let (result, c) = (found.result, &found.result.chosen);
    let point = &result.point;
    eprintln!(
        "direction: layer {} position {} of {} layers, scale {}{} | refusal score on harmful prompts {:.2} -> {:.2} ablated ({:.0}% of replies refuse) | induce {:.2} (threshold {:.2}) | KL {:.3} ({:.0} s)",
        result.layer(),
        point.position,
        result.n_layer,
        point.scale,
        if point.weights.embeddings == 0.0 { ", token_embd kept" } else { "" },
        result.baseline_harmful,
        c.bypass.unwrap_or(f64::NAN),
        100.0 * c.refusal_rate.unwrap_or(f64::NAN),
        c.induce.unwrap_or(f64::NAN),
        result.induce_threshold,
        c.kl.unwrap_or(f64::NAN),
        result.seconds
    );
    if let Some(m) = found.imatrix {
        eprintln!("importance matrix: {} matrices, {}", m.len(), m.source);
    }
    let tokens: Vec<String> = result
        .refusal_tokens
        .iter()
        .map(|t| format!("{:?}", t.text))
        .collect();
    eprintln!("refusal tokens: {}", tokens.join(" "));
    let evaluated = result.candidates.iter().filter(|c| c.kl.is_some()).count();
    eprintln!(
        "searched {} candidates, evaluated {evaluated} fully; bypass/KL frontier (layer/pos: KL -> bypass):",
        result.candidates.len()
    );
    for f in &result.frontier {
        eprintln!(
            "  {:>3}/{} scale {}: KL {:.3} -> bypass {:.2}, {:.0}% refusals",
            f.layer,
            f.position,
            f.scale,
            f.kl.unwrap_or(f64::NAN),
            f.bypass.unwrap_or(f64::NAN),
            100.0 * f.refusal_rate.unwrap_or(f64::NAN)
        );
    }
}

/// The refinement's Pareto front, as a table.
fn print_front(result: &SearchResult) {
    if result.trials.is_empty() {
        return;
    }
    eprintln!(
        "refined the edit with {} trials; refusals/KL Pareto front (* = chosen, by the figures pooled with fresh prompts where given):",
        result.trials.len() - 1
    );
    eprintln!(
        "  {:>3} {:>8} {:>6} {:>4}  {:>5} {:>6} {:>5} {:>5}  {:<28} {:<28}",
        "#",
        "refusals",
        "KL",
        "dirs",
        "index",
        "scope",
        "biprj",
        "embd",
        "attention max@pos min/dist",
        "mlp max@pos min/dist"
    );
    let kernel = |k: Option<crate::edit::Kernel>| match k {
        Some(k) => format!(
            "{:.2}@{:.1} {:.2}/{:.1}",
            k.max_weight, k.max_weight_position, k.min_weight, k.min_weight_distance
        ),
        None => "uniform".into(),
    };
    for (n, f) in result.front.iter().enumerate() {
        let t = &result.trials[f.trial];
        let p = &t.point;
        let chosen = *p == result.point && t.directions == result.directions();
        eprintln!(
            "{} {:>3} {:>7.0}% {:>6.3} {:>4}  {:>5.2} {:>6} {:>5} {:>5.2}  {:<28} {:<28}{}",
            if chosen { "*" } else { " " },
            n,
            100.0 * t.refusal_rate.unwrap_or(f64::NAN),
            t.kl,
            t.directions,
            p.direction_index,
            if p.per_layer { "layer" } else { "global" },
            if p.biprojected { "yes" } else { "no" },
            p.weights.embeddings * p.scale,
            kernel(p.weights.attention),
            kernel(p.weights.mlp),
            if p.scale == 1.0 {
                String::new()
            } else {
                format!("  scale {:.2}", p.scale)
            }
        );
        if let Some(c) = t.confirmed {
            eprintln!(
                "  {:>3} {:>7.0}% {:>6.3}  with fresh prompts pooled",
                "",
                100.0 * c.refusal_rate,
                c.kl
            );
        }
    }
    print_subspace_trials(result);
}

/// What each further direction cost and bought (`--directions`), front or
/// not: a subspace trial is usually dominated, and would go unseen.
fn print_subspace_trials(result: &SearchResult) {
    let subspace: Vec<String> = result
        .trials
        .iter()
        .filter(|t| t.directions > 1)
        .map(|t| {
            format!(
                "{} directions {:.0}% at KL {:.3}",
                t.directions,
                100.0 * t.refusal_rate.unwrap_or(f64::NAN),
                t.kl
            )
        })
        .collect();
    if !subspace.is_empty() {
        eprintln!("subspace trials: {}", subspace.join("; "));
    }
}

fn print_table(v: &Verification) {
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    let row = |label: String, before: f64, after: f64| {
        println!("{label:<48} {:>8} {:>8}", pct(before), pct(after));
    };
    println!(
        "{:<48} {:>8} {:>8}",
        "held-back validation prompts", "before", "after"
    );
    row(
        format!(
            "refusals on harmful prompts ({}), {} tokens",
            v.n_harmful, v.tokens_generated
        ),
        v.harmful_refusal_before,
        v.harmful_refusal_after,
    );
    row(
        "  with a refusal phrase (markers only)".into(),
        v.harmful_phrase_refusal_before,
        v.harmful_phrase_refusal_after,
    );
    for s in v.shorter.iter().filter(|s| s.tokens < v.tokens_generated) {
        row(
            format!(
                "  judged on the first {} tokens ({:.0}% agree)",
                s.tokens,
                100.0 * s.agreement
            ),
            s.harmful_refusal_before,
            s.harmful_refusal_after,
        );
    }
    row(
        format!("  late: refusal phrase after token {JUDGE_TOKENS}"),
        v.harmful_late_refusal_before,
        v.harmful_late_refusal_after,
    );
    row(
        format!("refusals on harmless prompts ({})", v.n_harmless),
        v.harmless_refusal_before,
        v.harmless_refusal_after,
    );
    row(
        format!("replies that loop ({})", v.n_harmful + v.n_harmless),
        v.loops_before,
        v.loops_after,
    );
    println!(
        "{:<48} {:>8} {:>8.3}",
        format!("first-token KL, answered harmless ({})", v.n_answered),
        "-",
        v.kl_harmless_answered
    );
    if let Some(p) = &v.perplexity {
        println!(
            "{:<48} {:>8.3} {:>8.3}",
            format!("perplexity, {} ({} tokens)", p.text, p.tokens_scored),
            p.before,
            p.after
        );
    }
}

/// Characters of a reply shown in the terminal; the report has them whole.
const SAMPLE_CHARS: usize = 160;

/// `text` on one line, cut at [`SAMPLE_CHARS`].
fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(SAMPLE_CHARS) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// The sample prompts with the original's reply above the edited model's.
fn print_samples(v: &Verification) {
    if v.samples.is_empty() {
        return;
    }
    println!(
        "\nsample replies (first {} tokens; all of them in the report)",
        v.tokens_generated
    );
    for s in &v.samples {
        let kind = if s.harmful { "harmful" } else { "harmless" };
        println!("{kind}: {}", one_line(&s.prompt));
        println!("  before [{:?}] {}", s.verdict_before, one_line(&s.before));
        println!("  after  [{:?}] {}", s.verdict_after, one_line(&s.after));
    }
}

/// What one direction's removal left: every harmful prompt still refused.
fn print_still_refused(v: &Verification) {
    if v.still_refused.is_empty() {
        return;
    }
    println!(
        "\nstill refused after the edit ({} of {} harmful prompts; whole replies in the report)",
        v.still_refused.len(),
        v.n_harmful
    );
    for r in &v.still_refused {
        println!("{}", one_line(&r.prompt));
        println!("  [{:?}] {}", r.verdict, one_line(&r.reply));
    }
}
