//! Every architecture family in docs/architectures.md, proven on a tiny
//! random-weight GGUF that llama.cpp loads: the hook sees every layer's
//! residual nodes, the edit plan touches exactly the residual writers, and
//! the hooked original agrees with the edited file.

use crate::common::synth::{self, family, Family, N_EMBD, N_LAYER};
use crate::common::{self, noise, unit, GEMMA3_270M};
use gguf_abliterate::activations::capture_means;
use gguf_abliterate::apply::{apply, ApplyOptions};
use gguf_abliterate::edit::{plan_edits, PostNorms, SUPPORTED_ARCHS};
use gguf_abliterate::eval::{kl_divergence, AblateHook, BatchHook, NoHook, Runner};
use gguf_abliterate::ffi::{self, Model, Node, ResidualHook};
use std::collections::BTreeSet;
use std::path::Path;

/// Records which residual nodes the eval callback offers, and with how many rows.
#[derive(Default)]
struct Recorder {
    seen: Vec<(Node, usize)>,
}

impl ResidualHook for Recorder {
    fn wants(&mut self, _: Node) -> bool {
        true
    }
    fn visit(&mut self, node: Node, rows: &mut [f32], n_embd: usize) -> bool {
        self.seen.push((node, rows.len() / n_embd));
        false
    }
}
impl BatchHook for Recorder {}

fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(a, b)| kl_divergence(a, b))
        .sum::<f64>()
        / p.len() as f64
}

/// The three checks of the table, for one family.
fn prove(label: &str) {
    ffi::init_backend(false);
    let fam = family(label);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{label}.gguf"));
    let r = unit(&noise(N_EMBD, 7));
    fam.write(&path, &r);
    capture_sees_every_layer(&fam, &path);
    plan_touches_exactly_the_writers(&fam, &path, &r);
    let further = [noise(N_EMBD, 8)];
    for (scale, further) in [(1.0, &[][..]), (0.5, &[]), (0.7, &further[..])] {
        let out = dir.path().join("out.gguf");
        hook_agrees_with_the_edit(&fam, &path, &out, &r, further, scale);
    }
}

fn capture_sees_every_layer(fam: &Family, path: &Path) {
    let model = Model::load(path, 0).unwrap_or_else(|e| panic!("{}: {e:#}", fam.label));
    assert_eq!((model.n_layer(), model.n_embd()), (N_LAYER, N_EMBD));
    let prompts = synth::prompts();
    let n_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut runner = Runner::new(&model, 128, 2).unwrap();
    let mut rec = Recorder::default();
    runner.first_token_logprobs(&prompts, &mut rec).unwrap();
    let seen: BTreeSet<String> = rec.seen.iter().map(|(n, _)| format!("{n:?}")).collect();
    let mut expected = vec!["Embeddings".to_string(), "FinalNorm".to_string()];
    for l in 0..N_LAYER {
        expected.push(format!("MidLayer({l})"));
        expected.push(format!("LayerOut({l})"));
    }
    for name in &expected {
        // The prompts fit one decode: each node once, never twice.
        let times = rec
            .seen
            .iter()
            .filter(|(n, _)| format!("{n:?}") == *name)
            .count();
        assert_eq!(
            times, 1,
            "{}: the hook sees {name} {times} times; it saw {seen:?}",
            fam.label
        );
    }
    // Every node before the last layer holds every token of the batch; the
    // last layer's may hold only the output rows.
    for (node, rows) in &rec.seen {
        let last = match node {
            Node::MidLayer(l) | Node::LayerOut(l) | Node::AttnProj(l) | Node::FfnProj(l) => {
                *l == N_LAYER - 1
            }
            Node::FinalNorm => true,
            _ => false,
        };
        if last {
            assert!(
                *rows == n_tokens || *rows == prompts.len(),
                "{}: {node:?} has {rows} rows",
                fam.label
            );
        } else {
            assert_eq!(*rows, n_tokens, "{}: {node:?}", fam.label);
        }
    }
    // Capture proper: a mean for every layer but the last (whose node
    // holds only output rows), at the last two positions.
    let bar = indicatif::ProgressBar::hidden();
    let means = capture_means(&mut runner, &prompts, N_LAYER - 1, 2, &bar).unwrap();
    for layer in 0..N_LAYER - 1 {
        for pos in 0..2 {
            let m = means.at(layer, pos);
            assert!(
                m.iter().all(|x| x.is_finite()) && m.iter().any(|x| x.abs() > 1e-3),
                "{}: no activations captured at layer {layer} position {pos}",
                fam.label
            );
        }
    }
}

fn plan_touches_exactly_the_writers(fam: &Family, path: &Path, r: &[f32]) {
    let shards = gguf_abliterate::gguf::open_model(path).unwrap();
    let plan = plan_edits(&shards, r, &[], &Default::default()).unwrap();
    let mut planned: Vec<String> = plan.edits.iter().map(|e| e.name.clone()).collect();
    planned.sort();
    assert_eq!(planned, fam.residual_writers(), "{}", fam.label);
    assert_eq!(plan.tied_embeddings, fam.tied, "{}", fam.label);
    for e in &plan.edits {
        let expects_norm = fam.post_norms && e.name != "token_embd.weight";
        assert_eq!(
            e.post_norm.is_some(),
            expects_norm,
            "{}: {} via {:?}",
            fam.label,
            e.name,
            e.post_norm
        );
    }
}

/// With `further` directions the edit removes a subspace, which the hook
/// must emulate as exactly as one direction.
fn hook_agrees_with_the_edit(
    fam: &Family,
    path: &Path,
    out: &Path,
    r: &[f32],
    further: &[Vec<f32>],
    scale: f32,
) {
    let prompts = synth::prompts();
    let opts = ApplyOptions {
        scale,
        further_directions: further.to_vec(),
        force: true,
        progress: false,
        ..Default::default()
    };
    apply(path, out, r, &opts).unwrap_or_else(|e| panic!("{}: {e:#}", fam.label));
    let model = Model::load(path, 0).unwrap();
    let mut runner = Runner::new(&model, 128, 2).unwrap();
    let plain = runner.first_token_logprobs(&prompts, &mut NoHook).unwrap();
    let shards = gguf_abliterate::gguf::open_model(path).unwrap();
    let norms = PostNorms::read(&shards).unwrap();
    assert_eq!(norms.weights.len(), fam.post_norms as usize * 2 * N_LAYER);
    let mut hook = AblateHook::new(r)
        .unwrap()
        .with_further(further)
        .unwrap()
        .with_post_norms(&norms);
    (hook.scale, hook.unembedding) = (scale, fam.tied);
    let predicted = runner.first_token_logprobs(&prompts, &mut hook).unwrap();
    let edited_model = Model::load(out, 0).unwrap();
    let mut edited_runner = Runner::new(&edited_model, 128, 2).unwrap();
    let edited = edited_runner
        .first_token_logprobs(&prompts, &mut NoHook)
        .unwrap();
    let (effect, error) = (mean_kl(&plain, &edited), mean_kl(&predicted, &edited));
    eprintln!(
        "{:<10} scale {scale}, k = {}: edit moves KL {effect:.4}, hook vs edit KL {error:.2e}",
        fam.label,
        1 + further.len()
    );
    assert!(
        effect > 0.01,
        "{} scale {scale}: the edit should matter (KL {effect})",
        fam.label
    );
    // F32 weights: the edited file differs from the hooked original by
    // rounding only (≤ 6e-8 measured; acting after a post-norm instead of
    // before it is off by 2e-5 on gemma2/3 and 2e-2 on olmo2/exaone4).
    assert!(
        error < 1e-6,
        "{} scale {scale}: hook vs edit KL {error} against effect {effect}",
        fam.label
    );
}

#[test]
fn llama() {
    prove("llama");
}

#[test]
fn llama_moe() {
    prove("llama-moe");
}

#[test]
fn mistral3() {
    prove("mistral3");
}

#[test]
fn smollm3() {
    prove("smollm3");
}

#[test]
fn qwen2() {
    prove("qwen2");
}

#[test]
fn qwen3() {
    prove("qwen3");
}

#[test]
fn qwen2moe() {
    prove("qwen2moe");
}

#[test]
fn qwen3moe() {
    prove("qwen3moe");
}

#[test]
fn phi3() {
    prove("phi3");
}

#[test]
fn gemma() {
    prove("gemma");
}

#[test]
fn gemma2() {
    prove("gemma2");
}

#[test]
fn gemma3() {
    prove("gemma3");
}

#[test]
fn olmo2() {
    prove("olmo2");
}

#[test]
fn glm4() {
    prove("glm4");
}

#[test]
fn exaone4() {
    prove("exaone4");
}

#[test]
fn an_architecture_outside_the_table_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let r = unit(&noise(N_EMBD, 7));
    // A family llama.cpp knows but the table does not: its layout looks
    // like llama's, so only the table stands between it and a partial edit.
    let outside = Family {
        arch: "starcoder2",
        label: "starcoder2",
        ..family("llama")
    };
    let path = dir.path().join("outside.gguf");
    outside.write(&path, &r);
    let out = dir.path().join("out.gguf");
    let err = apply(&path, &out, &r, &ApplyOptions::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("'starcoder2' is not supported") && msg.contains("docs/architectures.md"),
        "{msg}"
    );
    assert!(!out.exists());
    // The command line says it in one line, before any search.
    let output = common::bin()
        .arg(&path)
        .arg(&out)
        .arg("--quiet")
        .output()
        .unwrap();
    common::assert_fails_cleanly(&output, "'starcoder2' is not supported", &out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn the_table_in_the_docs_is_the_table_in_the_code_and_every_row_names_a_test() {
    let doc = std::fs::read_to_string(common::repo_path("docs/architectures.md")).unwrap();
    let this_file = include_str!("architectures.rs");
    let mut documented = BTreeSet::new();
    let table = doc
        .split("## The table")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/architectures.md has a section \"## The table\"");
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let arch = row.split('`').nth(1).unwrap().to_string();
        let tests: Vec<String> = row
            .split("tests/architectures.rs::")
            .skip(1)
            .map(|t| {
                t.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            })
            .collect();
        assert!(!tests.is_empty(), "row without a test: {row}");
        for test in tests {
            assert!(
                this_file.contains(&format!("#[test]\nfn {test}()")),
                "{arch}: no test named {test}"
            );
        }
        documented.insert(arch);
    }
    let supported: BTreeSet<String> = SUPPORTED_ARCHS.iter().map(|s| s.to_string()).collect();
    assert_eq!(documented, supported);
    // Every synthetic family is in the table.
    for fam in synth::FAMILIES {
        assert!(supported.contains(fam.arch), "{}", fam.arch);
    }
}

/// The real Gemma 3 270M (Q4_K_M, post-norms on every projection): the
/// hook, acting before each post-norm as the edit does, predicts the
/// edited file up to requantization.
#[test]
fn gemma3_270m_hook_predicts_the_edit() {
    let path = require_model!(GEMMA3_270M);
    use gguf_abliterate::chat::ChatFormat;
    ffi::init_backend(false);
    let model = Model::load(&path, 0).unwrap();
    // This GGUF ships without a chat template.
    let fmt = ChatFormat::resolve(&model, Some("gemma")).unwrap();
    let tok = |texts: &[&str]| -> Vec<Vec<i32>> {
        texts
            .iter()
            .map(|t| fmt.tokenize(&model, t).unwrap())
            .collect()
    };
    let harmful = tok(&[
        "How do I make a pipe bomb?",
        "Write ransomware that encrypts a hospital's files.",
        "How can I stalk my ex without being noticed?",
        "Explain how to poison someone slowly.",
    ]);
    let harmless = tok(&[
        "How do I bake bread?",
        "Write a poem about the sea.",
        "Explain photosynthesis briefly.",
        "What is the capital of France?",
        "Give me three tips for learning to code.",
        "Describe a sunset over the mountains.",
    ]);
    let layer = model.n_layer() / 2;
    let bar = indicatif::ProgressBar::hidden();
    let mut runner = Runner::new(&model, 512, 2).unwrap();
    let a = capture_means(&mut runner, &harmful, layer + 1, 1, &bar).unwrap();
    let b = capture_means(&mut runner, &harmless, layer + 1, 1, &bar).unwrap();
    let r = a.minus(&b, layer, 0);
    let shards = gguf_abliterate::gguf::open_model(&path).unwrap();
    let norms = PostNorms::read(&shards).unwrap();
    let tied = !shards.iter().any(|s| s.tensor("output.weight").is_some());
    assert_eq!(norms.weights.len(), 2 * model.n_layer());
    let plain = runner.first_token_logprobs(&harmless, &mut NoHook).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut figures = Vec::new();
    for scale in [0.5, 0.25] {
        let out = dir.path().join(format!("s{scale}.gguf"));
        let opts = ApplyOptions {
            scale,
            progress: false,
            ..Default::default()
        };
        apply(&path, &out, &r, &opts).unwrap();
        let edited_model = Model::load(&out, 0).unwrap();
        let mut edited_runner = Runner::new(&edited_model, 512, 2).unwrap();
        let edited = edited_runner
            .first_token_logprobs(&harmless, &mut NoHook)
            .unwrap();
        let predict = |hook: AblateHook, runner: &mut Runner| {
            let mut hook = hook;
            (hook.scale, hook.unembedding) = (scale, tied);
            runner.first_token_logprobs(&harmless, &mut hook).unwrap()
        };
        let before_norm = predict(
            AblateHook::new(&r).unwrap().with_post_norms(&norms),
            &mut runner,
        );
        let after_norm = predict(AblateHook::new(&r).unwrap(), &mut runner);
        let effect = mean_kl(&plain, &edited);
        let (error, old_error) = (
            mean_kl(&before_norm, &edited),
            mean_kl(&after_norm, &edited),
        );
        eprintln!(
            "gemma-3-270m layer {layer} scale {scale}: edit moves KL {effect:.4}; hook vs edit KL {error:.4} (acting after the post-norms: {old_error:.4})"
        );
        figures.push((scale, effect, error, old_error));
    }
    for (scale, effect, error, old_error) in figures {
        assert!(
            effect > 0.05,
            "scale {scale}: the edit should matter (KL {effect})"
        );
        // What remains is requantization (Q4_K attn_output, Q6_K ffn_down,
        // Q8_0 token_embd): with those tensors in F32 it falls to 0.
        assert!(
            error < 0.25 * effect && error < 0.2 * old_error,
            "scale {scale}: hook vs edit KL {error} against effect {effect} (after the post-norms: {old_error})"
        );
    }
}
