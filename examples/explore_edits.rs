//! Research tool: harmful refusals (32 validation prompts, judged from
//! 24-token replies) and first-token KL (answered harmless validation
//! prompts) of edit variants through the run-time hook, with the search's
//! 128 training prompts per set for the directions. How the per-layer
//! scope was measured before the search got it (README, "Figures").
//!
//! usage: explore_edits MODEL SPEC...   (HELD=1: the held-back prompts instead)
//!   g<L>:<pos>:<scale>[:b][:from=N][:to=M]  one direction (layer L) for every writer
//!   p:<pos>:<scale>[:b][:from=N][:to=M]     each layer's writers lose their own direction
//!   point:REPORT.json:N                     front point N of a main-command report
//! `pos` is a post-instruction position, a comma list of them or `all`
//! (their normalized directions summed); `b` biprojects; `r2=P` also
//! removes each layer's direction at position P (orthogonalized: rank 2);
//! writers outside layers [from, to) are left alone; `it=N` re-estimates
//! each layer's direction N times from the residual stream under the edit,
//! `ia=1` adds that estimate as a second direction (both worse on the
//! fixture), `rc=1` adds, per layer, the difference between the harmful
//! training prompts the edit leaves refused and those it turns answered,
//! measured under the edit (worse on the fixture: 34 % at KL 0.44 against
//! 28 % at 0.26). No `token_embd` edit except in `point:`. N_TRAIN=N
//! (default 128) takes the means over N training prompts per set (on the
//! fixture 64, 128 and 200 all land within noise). FILTER=1 takes the
//! means over the harmful training prompts whose replies refuse and the
//! harmless ones whose replies answer, as the paper does (on
//! Qwen2.5-Coder-0.5B, held back: no better; 40 of 128 harmful kept).
use anyhow::Result;
use gguf_abliterate::activations::{capture, capture_edited};
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::direction::space::orthogonalize_against;
use gguf_abliterate::edit::{dot, normalized};
use gguf_abliterate::eval::{BatchHook, NoHook, Runner};
use gguf_abliterate::ffi::{self, Node, ResidualHook};
use gguf_abliterate::judge::{detokenize, Judge, MarkerJudge, Verdict};
use gguf_abliterate::prompts::{Kind, PromptSet};

/// The search's verdict on a reply to a harmful request.
fn judge_answer(request: &str, text: &str, tokens: &[i32]) -> Verdict {
    MarkerJudge.verdict(request, true, text, tokens)
}

/// The search's verdict on a reply to a harmless request.
fn judge(text: &str, tokens: &[i32]) -> Verdict {
    MarkerJudge.verdict("", false, text, tokens)
}

struct ProjHook {
    dirs: Vec<Vec<f32>>,
    /// Optional second direction per layer, orthogonal to the first.
    second: Vec<Vec<f32>>,
    share: Vec<f32>,
}
impl ResidualHook for ProjHook {
    fn wants(&mut self, node: Node) -> bool {
        matches!(node, Node::AttnProj(_) | Node::FfnProj(_))
    }
    fn visit(&mut self, node: Node, rows: &mut [f32], n_embd: usize) -> bool {
        let l = match node {
            Node::AttnProj(l) | Node::FfnProj(l) => l,
            _ => return false,
        };
        let u = &self.dirs[l];
        if u.len() != n_embd {
            return false;
        }
        let s = self.share[l];
        for u in std::iter::once(u).chain(self.second.get(l)) {
            for row in rows.chunks_exact_mut(n_embd) {
                let d = dot(row, u) as f32 * s;
                row.iter_mut().zip(u).for_each(|(x, ui)| *x -= d * ui);
            }
        }
        true
    }
}
impl BatchHook for ProjHook {}

fn main() -> Result<()> {
    ffi::init_backend(false);
    let args: Vec<String> = std::env::args().collect();
    let model = ffi::Model::load(std::path::Path::new(&args[1]), 0)?;
    let fmt = ChatFormat::resolve(&model, None)?;
    let n_layer = model.n_layer();
    let harmful = PromptSet::builtin(Kind::Harmful);
    let harmless = PromptSet::builtin(Kind::Harmless);
    let tok = |v: &[gguf_abliterate::prompts::Prompt], n: usize| -> Result<Vec<Vec<i32>>> {
        v[..n]
            .iter()
            .map(|p| fmt.tokenize(&model, &p.text))
            .collect()
    };
    let n_train: usize = std::env::var("N_TRAIN").map_or(128, |v| v.parse().unwrap());
    let (ht, st) = (
        tok(&harmful.train, n_train)?,
        tok(&harmless.train, n_train)?,
    );
    let held = std::env::var("HELD").is_ok_and(|v| !v.is_empty());
    let (hv, sv) = if held {
        let t = |v: &[gguf_abliterate::prompts::Prompt]| -> Result<Vec<Vec<i32>>> {
            v[32..72]
                .iter()
                .map(|p| fmt.tokenize(&model, &p.text))
                .collect()
        };
        (t(&harmful.val)?, t(&harmless.val)?)
    } else {
        (tok(&harmful.val, 32)?, tok(&harmless.val, 32)?)
    };
    let texts: Vec<String> = harmful.val[if held { 32..72 } else { 0..32 }]
        .iter()
        .map(|p| p.text.clone())
        .collect();
    let mut runner = Runner::new(&model, 2048, 2)?;
    let pb = indicatif::ProgressBar::hidden();
    let n_post = fmt.n_post();
    // FILTER=1: the means over the harmful training prompts whose replies
    // refuse and the harmless ones whose replies answer (the paper's filter).
    let (ht, st) = if std::env::var("FILTER").is_ok_and(|v| !v.is_empty()) {
        let keep = |runner: &mut Runner,
                    set: &[Vec<i32>],
                    texts: &[gguf_abliterate::prompts::Prompt],
                    want: bool|
         -> Result<Vec<Vec<i32>>> {
            let g = runner.generate(set, 24, &mut NoHook)?;
            Ok(g.iter()
                .zip(set)
                .zip(texts)
                .filter(|((g, _), t)| {
                    let v = judge_answer(&t.text, &detokenize(&model, &g.tokens), &g.tokens);
                    (v != Verdict::Complied) == want
                })
                .map(|((_, p), _)| p.clone())
                .collect())
        };
        let h = keep(&mut runner, &ht, &harmful.train[..n_train], true)?;
        let s = keep(&mut runner, &st, &harmless.train[..n_train], false)?;
        eprintln!(
            "filtered: {} harmful refused, {} harmless answered",
            h.len(),
            s.len()
        );
        (h, s)
    } else {
        (ht, st)
    };
    let (hm, _) = capture(&mut runner, &ht, n_layer - 1, n_post, &pb)?;
    let (sm, _) = capture(&mut runner, &st, n_layer - 1, n_post, &pb)?;
    let safe_ok: Vec<Vec<i32>> = runner
        .generate(&sv, 24, &mut NoHook)?
        .iter()
        .zip(&sv)
        .filter(|(g, _)| judge(&detokenize(&model, &g.tokens), &g.tokens) == Verdict::Complied)
        .map(|(_, p)| p.clone())
        .collect();
    let base = runner.first_token_logprobs(&safe_ok, &mut NoHook)?;
    let refused = |runner: &mut Runner, hook: &mut dyn BatchHook| -> Result<f64> {
        let g = runner.generate(&hv, 24, hook)?;
        let n = g
            .iter()
            .zip(&texts)
            .filter(|(g, t)| {
                judge_answer(t, &detokenize(&model, &g.tokens), &g.tokens) != Verdict::Complied
            })
            .count();
        Ok(n as f64 / hv.len() as f64)
    };
    let kl = |runner: &mut Runner, hook: &mut dyn BatchHook| -> Result<f64> {
        let lp = runner.first_token_logprobs(&safe_ok, hook)?;
        Ok(lp
            .iter()
            .zip(&base)
            .map(|(a, b)| gguf_abliterate::eval::kl_divergence(b, a))
            .sum::<f64>()
            / lp.len() as f64)
    };
    eprintln!(
        "n_post {n_post}, answered harmless {}, base refusals {:.2}",
        safe_ok.len(),
        refused(&mut runner, &mut NoHook)?
    );
    for spec in &args[2..] {
        if let Some(path) = spec.strip_prefix("point:") {
            // A front point of a report: point:REPORT:N
            let (path, n) = path.rsplit_once(':').unwrap();
            let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            let search = &report["search"];
            let i = search["front"][n.parse::<usize>()?].as_u64().unwrap() as usize;
            let point: gguf_abliterate::edit::EditPoint =
                serde_json::from_value(search["trials"][i]["point"].clone())?;
            let r = gguf_abliterate::direction::space::point_direction(&hm, &sm, &point)?;
            let layers =
                gguf_abliterate::direction::space::layer_directions(&hm, &sm, &point, n_layer)?;
            let mut hook = gguf_abliterate::eval::AblateHook::new(&r)
                .unwrap()
                .with_layer_directions(&layers, &Default::default());
            hook.scale = point.scale;
            hook.weights = point.weights;
            hook.unembedding = true;
            let k = kl(&mut runner, &mut hook)?;
            let rr = refused(&mut runner, &mut hook)?;
            println!(
                "{spec:<24} refusals {:>5.1}%  KL {k:.3}  (search: {} {})",
                100.0 * rr,
                search["trials"][i]["refusal_rate"],
                search["trials"][i]["kl"]
            );
            continue;
        }
        let parts: Vec<&str> = spec.split(':').collect();
        let poss: Vec<usize> = if parts[1] == "all" {
            (0..n_post).collect()
        } else {
            parts[1].split(',').map(|x| x.parse().unwrap()).collect()
        };
        let scale: f32 = parts[2].parse()?;
        let bip = parts.contains(&"b");
        let from: usize = parts
            .iter()
            .find_map(|p| p.strip_prefix("from="))
            .map_or(0, |x| x.parse().unwrap());
        let to: usize = parts
            .iter()
            .find_map(|p| p.strip_prefix("to="))
            .map_or(n_layer, |x| x.parse().unwrap());
        let dir_at = |l: usize| -> Vec<f32> {
            let l = l.min(n_layer - 2);
            let mut acc = vec![0f32; hm.n_embd];
            for &pos in &poss {
                let d = normalized(&hm.minus(&sm, l, pos)).unwrap();
                acc.iter_mut().zip(&d).for_each(|(a, x)| *a += x);
            }
            let pos = *poss.last().unwrap();
            let mut r = normalized(&acc).unwrap();
            if bip {
                let g: Vec<f32> = sm.at(l, pos).iter().map(|&x| x as f32).collect();
                orthogonalize_against(&mut r, &g);
                r = normalized(&r).unwrap();
            }
            r
        };
        let dirs: Vec<Vec<f32>> = if let Some(l) = parts[0].strip_prefix('g') {
            let l: usize = l.parse()?;
            vec![dir_at(l); n_layer]
        } else {
            (0..n_layer).map(dir_at).collect()
        };
        // r2=P: also remove each layer's direction at position P,
        // orthogonalized against the first.
        let second: Vec<Vec<f32>> = match parts.iter().find_map(|p| p.strip_prefix("r2=")) {
            None => Vec::new(),
            Some(p2) => {
                let p2: usize = p2.parse()?;
                dirs.iter()
                    .enumerate()
                    .map(|(l, u)| {
                        let l = l.min(n_layer - 2);
                        let mut v = normalized(&hm.minus(&sm, l, p2)).unwrap();
                        orthogonalize_against(&mut v, u);
                        normalized(&v).unwrap()
                    })
                    .collect()
            }
        };
        let share = (0..n_layer)
            .map(|l| if l >= from && l < to { scale } else { 0.0 })
            .collect();
        let mut hook = ProjHook {
            dirs,
            second,
            share,
        };
        // it=N: N times, measure what is left of the refusal signal at each
        // layer's output under the edit and make it that layer's direction;
        // ia=1: add it as a second one instead.
        let iters = |key: &str| -> usize {
            parts
                .iter()
                .find_map(|p| p.strip_prefix(key))
                .map_or(0, |x| x.parse().unwrap())
        };
        let (n_it, n_add) = (iters("it="), iters("ia="));
        for round in 0..n_it + n_add {
            let h2 = capture_edited(&mut runner, &ht, n_layer - 1, n_post, &pb, &mut hook)?;
            let s2 = capture_edited(&mut runner, &st, n_layer - 1, n_post, &pb, &mut hook)?;
            let pos = *poss.last().unwrap();
            let mut second = Vec::new();
            for l in 0..n_layer {
                let d = h2.minus(&s2, l.min(n_layer - 2), pos);
                let mut r = normalized(&d).unwrap();
                if bip {
                    let g: Vec<f32> = s2
                        .at(l.min(n_layer - 2), pos)
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    orthogonalize_against(&mut r, &g);
                    r = normalized(&r).unwrap();
                }
                let cos = dot(&r, &hook.dirs[l]);
                if l % 4 == 0 {
                    eprintln!(
                        "round {round} layer {l}: |diff| {:.2} cos(old) {cos:.3}",
                        dot(&d, &d).sqrt()
                    );
                }
                if round < n_it {
                    hook.dirs[l] = r;
                } else {
                    let u = &hook.dirs[l];
                    orthogonalize_against(&mut r, u);
                    second.push(normalized(&r).unwrap_or_else(|| u.clone()));
                }
            }
            if round >= n_it {
                hook.second = second;
            }
        }
        // rc=1: a second direction per layer from the harmful training
        // prompts the edit leaves refused against those it turns answered,
        // measured under the edit.
        if iters("rc=") > 0 {
            let g = runner.generate(&ht, 24, &mut hook)?;
            let (mut still, mut turned) = (Vec::new(), Vec::new());
            for ((g, p), t) in g.iter().zip(&ht).zip(&harmful.train[..n_train]) {
                let v = judge_answer(&t.text, &detokenize(&model, &g.tokens), &g.tokens);
                if v == Verdict::Refused {
                    still.push(p.clone());
                } else if v == Verdict::Complied {
                    turned.push(p.clone());
                }
            }
            eprintln!(
                "rc: {} still refused, {} answered",
                still.len(),
                turned.len()
            );
            let a = capture_edited(&mut runner, &still, n_layer - 1, n_post, &pb, &mut hook)?;
            let b = capture_edited(&mut runner, &turned, n_layer - 1, n_post, &pb, &mut hook)?;
            let pos = *poss.last().unwrap();
            let mut second = Vec::new();
            for l in 0..n_layer {
                let mut r = normalized(&a.minus(&b, l.min(n_layer - 2), pos)).unwrap();
                let u = &hook.dirs[l];
                if l % 4 == 0 {
                    eprintln!("rc layer {l}: cos(first) {:.3}", dot(&r, u));
                }
                orthogonalize_against(&mut r, u);
                second.push(normalized(&r).unwrap_or_else(|| u.clone()));
            }
            hook.second = second;
        }
        let k = kl(&mut runner, &mut hook)?;
        let r = refused(&mut runner, &mut hook)?;
        println!("{spec:<24} refusals {:>5.1}%  KL {k:.3}", 100.0 * r);
    }
    Ok(())
}
