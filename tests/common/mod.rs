//! Test helpers: a small GGUF writer of its own (independent of the crate's
//! container code), synthetic models, the real test models, and the CLI.

pub mod synth;

use gguf_abliterate::ffi::GgmlType;
use gguf_abliterate::quant;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gguf-abliterate"))
}

/// `path`, relative to the repository's root.
pub fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A hand-made hostile GGUF (or its direction) in tests/hostile/.
pub fn hostile(name: &str) -> PathBuf {
    repo_path("tests/hostile").join(name)
}

/// Held by every test that runs llama.cpp (or the rewrite) on a real model
/// with all cores, so that two never share them: llama.cpp's threads spin
/// at their barriers, and two such runs side by side take far longer than
/// one after the other. Tests that only parse or fail early run beside them.
pub fn all_cores() -> std::sync::MutexGuard<'static, ()> {
    static CORES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A failed test poisons the lock; the others still run.
    CORES.lock().unwrap_or_else(|e| e.into_inner())
}

/// target/e2e/, created if need be: the end-to-end tests leave their outputs
/// and reports there for CI's second llama.cpp build (.ci/run).
pub fn e2e_dir() -> PathBuf {
    let dir = repo_path("target/e2e");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// Test models. A test names the model it needs with `require_model!`; when
// the file is missing, the test is skipped with a note when run by hand and
// fails when `CI` is set (.ci/run sets CI=true), so CI cannot pass by
// skipping.

/// Third-party models in `models/`, fetched by `scripts/fetch-models.sh`.
pub const SMOLLM2_Q4_1: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3_270M: &str = "gemma-3-270m-Q4_K_M.gguf";
pub const QWEN_CODER: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// Each model in `models/` and the name `scripts/fetch-models.sh` gives it.
const FETCHED: &[(&str, &str)] = &[
    (SMOLLM2_Q4_1, "smollm2"),
    (GEMMA3_270M, "gemma"),
    (QWEN_CODER, "qwen"),
];

pub fn models_dir() -> PathBuf {
    repo_path("models")
}

/// The refusal fixture, in ../shared/models on the project's machines.
pub fn fixture_path() -> PathBuf {
    repo_path("../shared/models/smollm2-135m-refusal-q8_0.gguf")
}

/// True when the environment variable `CI` is set to anything but the
/// empty string, `false` or `0`: a missing model is then a failure.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `Some(path)` when the model exists. When it does not: `None`, with a
/// "skipped" note on stderr naming the model and how to get it, or, when
/// [`in_ci`], a panic with that message.
pub fn model_if_present(path: PathBuf) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    let how = match FETCHED.iter().find(|(name, _)| *name == file) {
        Some((_, target)) => format!("fetch it with scripts/fetch-models.sh {target}"),
        None if path == fixture_path() => "the refusal fixture cannot be fetched: it ships in \
             ../shared/models on the project's machines, where scripts/fetch-models.sh checks it"
            .to_string(),
        None => "fetch the test models with scripts/fetch-models.sh".to_string(),
    };
    let what = format!("{} is missing; {how}", path.display());
    assert!(
        !in_ci(),
        "{what} (CI is set, so a missing model is a failure)"
    );
    // Straight to stderr: libtest captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "skipped: {what}");
    None
}

/// The model a test needs, or the end of the test (see [`model_if_present`]):
/// `let m = require_model!(GEMMA3_270M);` for a file in `models/`,
/// `let fixture = require_model!(fixture);` for the shared refusal fixture.
macro_rules! require_model {
    (fixture) => {
        require_model!(@path $crate::common::fixture_path())
    };
    (@path $path:expr) => {
        match $crate::common::model_if_present($path) {
            Some(path) => path,
            None => return,
        }
    };
    ($name:expr) => {
        require_model!(@path $crate::common::models_dir().join($name))
    };
}

// ---------------------------------------------------------------------------
// Running the binary and checking what it left.

/// The smallest real search on the fixture, for tests that need one to run
/// (or to be interrupted, or to fail on its input) but not to find much:
/// few prompts, one layer and position, one candidate.
pub const QUICK_SEARCH: &[&str] = &[
    "--n-train",
    "8",
    "--n-val",
    "4",
    "--layer",
    "21",
    "--position",
    "5",
    "--top-k",
    "1",
    "--rank-prompts",
    "1",
];

/// `gguf-abliterate direction MODEL -o OUT`.
pub fn direction_command(model: &Path, out: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("direction").arg(model).arg("-o").arg(out);
    cmd
}

/// Asserts that `run` succeeded, showing its stderr if not.
pub fn assert_success(run: &Output) {
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// The names in `dir`, sorted: what a run left there.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Why `out` is not a clean failure: exit 1, no panic, and exactly one
/// `error:` line, the last (per-tensor log lines may precede it), holding
/// `needle`.
pub fn clean_failure(out: &Output, needle: &str) -> Result<(), String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors = stderr.lines().filter(|l| l.starts_with("error")).count();
    let last = stderr.trim_end().lines().last().unwrap_or("");
    if out.status.code() != Some(1) {
        Err(format!("expected exit 1, got {}: {stderr}", out.status))
    } else if stderr.contains("panicked") {
        Err(format!("panicked: {stderr}"))
    } else if errors != 1 || !last.starts_with("error: ") {
        Err(format!("expected one error line, the last, got: {stderr}"))
    } else if !last.contains(needle) {
        Err(format!("expected {needle:?} in the error line: {stderr}"))
    } else {
        Ok(())
    }
}

/// Fails cleanly, with one `error:` line that mentions `needle` (see [`clean_failure`]).
pub fn assert_clean_failure(out: &Output, needle: &str) {
    if let Err(why) = clean_failure(out, needle) {
        panic!("{why}");
    }
}

/// Nothing of the output `out` is left beside it: not OUT, not its
/// temporary file (`OUT.tmp.*`), not a shard (`STEM-00001-of-…`).
pub fn assert_nothing_written(out: &Path) {
    let name = out.file_name().unwrap().to_string_lossy();
    let stem = out.file_stem().unwrap().to_string_lossy();
    let (temp, shard) = (format!("{name}."), format!("{stem}-"));
    let dir = out.parent().unwrap();
    let left: Vec<String> = listing(dir)
        .into_iter()
        .filter(|n| *n == name || n.starts_with(&temp) || n.starts_with(&shard))
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

/// [`assert_clean_failure`], and nothing of `out` written ([`assert_nothing_written`]).
pub fn assert_fails_cleanly(run: &Output, needle: &str, out: &Path) {
    assert_clean_failure(run, needle);
    assert_nothing_written(out);
}

/// Deterministic pseudo-random values in [-0.5, 0.5).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| (*x as f64 / n) as f32).collect()
}

/// One tensor of a synthetic model: its f32 source values and stored type.
pub struct SynthTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub source: Vec<f32>,
}

pub struct SynthModel {
    pub arch: String,
    pub n_embd: usize,
    pub tensors: Vec<SynthTensor>,
    pub extra_kv: Vec<Kv>,
}

impl SynthModel {
    /// A two-layer model whose residual writers all carry a strong
    /// component along `r`, so that removing it is measurable.
    pub fn new(arch: &str, n_embd: usize, ty: GgmlType, r: &[f32]) -> SynthModel {
        let mut tensors = Vec::new();
        let mut seed = 10;
        let mut add = |name: &str, dims: Vec<u64>, ty: GgmlType, planted: Option<&[f32]>| {
            seed += 1;
            let n: u64 = dims.iter().product();
            let mut source = noise(n as usize, seed);
            if let Some(r) = planted {
                // Rows of n_embd (embeddings, biases): add 2 r to each row.
                // Output projections (rows are outputs): add 2 r_i to row i.
                let row_len = dims[0] as usize;
                for (i, row) in source.chunks_mut(row_len).enumerate() {
                    if row_len == r.len() {
                        row.iter_mut().zip(r).for_each(|(x, ri)| *x += 2.0 * ri);
                    } else {
                        let ri = r[i % r.len()];
                        row.iter_mut().for_each(|x| *x += 2.0 * ri);
                    }
                }
            }
            tensors.push(SynthTensor {
                name: name.into(),
                dims,
                ty,
                source,
            });
        };
        let e = n_embd as u64;
        add("token_embd.weight", vec![e, 64], ty, Some(r));
        for l in 0..2 {
            add(
                &format!("blk.{l}.attn_norm.weight"),
                vec![e],
                GgmlType::F32,
                None,
            );
            add(&format!("blk.{l}.attn_q.weight"), vec![e, e], ty, None);
            add(
                &format!("blk.{l}.attn_output.weight"),
                vec![2 * e, e],
                ty,
                Some(r),
            );
            add(
                &format!("blk.{l}.ffn_down.weight"),
                vec![2 * e, e],
                ty,
                Some(r),
            );
        }
        add("blk.0.ffn_down.bias", vec![e], GgmlType::F32, Some(r));
        add("output_norm.weight", vec![e], GgmlType::F32, None);
        SynthModel {
            arch: arch.into(),
            n_embd,
            tensors,
            extra_kv: Vec::new(),
        }
    }

    pub fn tensor(&self, name: &str) -> &SynthTensor {
        self.tensors.iter().find(|t| t.name == name).unwrap()
    }

    pub fn write(&self, path: &Path) {
        let arch = self.arch.as_str();
        let mut kv = vec![
            Kv::str("general.architecture", arch),
            Kv::str("general.name", "synthetic"),
            Kv::u32(&format!("{arch}.block_count"), 2),
            Kv::u32(&format!("{arch}.embedding_length"), self.n_embd as u32),
            Kv {
                key: "test.flag".into(),
                ty: 7,
                value: vec![1],
            },
            Kv {
                key: "test.f64".into(),
                ty: 12,
                value: 0.25f64.to_le_bytes().to_vec(),
            },
            // A long array: some readers skip these; it must be copied exactly.
            Kv::str_array(
                "tokenizer.ggml.tokens",
                &(0..3000).map(|i| format!("tok{i}")).collect::<Vec<_>>(),
            ),
        ];
        kv.extend(self.extra_kv.iter().cloned());
        write_gguf(path, &kv, &self.tensors);
    }
}

/// A metadata entry: key, GGUF type id, encoded value.
#[derive(Clone)]
pub struct Kv {
    pub key: String,
    pub ty: u32,
    pub value: Vec<u8>,
}

impl Kv {
    pub fn u32(key: &str, v: u32) -> Kv {
        Kv {
            key: key.into(),
            ty: 4,
            value: v.to_le_bytes().to_vec(),
        }
    }
    pub fn u16(key: &str, v: u16) -> Kv {
        Kv {
            key: key.into(),
            ty: 2,
            value: v.to_le_bytes().to_vec(),
        }
    }
    pub fn str(key: &str, v: &str) -> Kv {
        Kv {
            key: key.into(),
            ty: 8,
            value: gguf_str(v),
        }
    }
    pub fn str_array(key: &str, items: &[String]) -> Kv {
        let mut value = 8u32.to_le_bytes().to_vec();
        value.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|s| value.extend(gguf_str(s)));
        Kv {
            key: key.into(),
            ty: 9,
            value,
        }
    }
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend(s.as_bytes());
    out
}

/// Writes a GGUF v3 with 32-byte alignment.
pub fn write_gguf(path: &Path, kv: &[Kv], tensors: &[SynthTensor]) {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            if t.ty.requires_imatrix() {
                // ggml cannot quantize these without an imatrix: use the one
                // `synth_importance` stands for (tests/imatrix.rs writes it).
                let imp = synth_importance(t.dims[0] as usize);
                quant::quantize(t.ty, &t.source, t.dims[0] as usize, Some(&imp)).unwrap()
            } else {
                quant::quantize(t.ty, &t.source, t.dims[0] as usize, None).unwrap()
            }
        })
        .collect();
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for k in kv {
        out.extend(gguf_str(&k.key));
        out.extend(k.ty.to_le_bytes());
        out.extend(&k.value);
    }
    let mut offset = 0u64;
    for (t, d) in tensors.iter().zip(&data) {
        out.extend(gguf_str(&t.name));
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ty.0.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = (offset + d.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for d in &data {
        out.extend(d);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    std::fs::File::create(path)
        .unwrap()
        .write_all(&out)
        .unwrap();
}

/// The importances synthetic IQ2/IQ1 tensors are quantized with: uneven,
/// positive, as real ones are.
pub fn synth_importance(row_len: usize) -> Vec<f32> {
    (0..row_len)
        .map(|j| 0.25 + (j * 7 % 11) as f32 / 4.0)
        .collect()
}

/// An importance matrix in llama-imatrix's GGUF form: per weight,
/// `in_sum2` = importances × `count` and `counts` = [count].
pub fn write_imatrix_gguf(path: &Path, entries: &[(String, Vec<f32>)], count: f32) {
    let mut tensors = Vec::new();
    for (name, imp) in entries {
        tensors.push(SynthTensor {
            name: format!("{name}.in_sum2"),
            dims: vec![imp.len() as u64, 1],
            ty: GgmlType::F32,
            source: imp.iter().map(|x| x * count).collect(),
        });
        tensors.push(SynthTensor {
            name: format!("{name}.counts"),
            dims: vec![1, 1],
            ty: GgmlType::F32,
            source: vec![count],
        });
    }
    let kv = [
        Kv::str("general.type", "imatrix"),
        Kv::str_array("imatrix.datasets", &["synthetic.txt".to_string()]),
        Kv::u32("imatrix.chunk_count", 1),
        Kv::u32("imatrix.chunk_size", 512),
    ];
    write_gguf(path, &kv, &tensors);
}

pub fn write_direction(path: &Path, r: &[f32]) {
    let json = serde_json::json!({ "direction": r, "layer": 1, "note": "test" });
    std::fs::write(path, json.to_string()).unwrap();
}

/// Loads `path` with the llama-cpp-2 crate (not our own FFI layer) and
/// greedily generates up to `n` tokens after `prompt`.
pub fn generate_with_llama_cpp_2(path: &Path, prompt: &str, n: usize) -> String {
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::sampling::LlamaSampler;
    use std::sync::OnceLock;
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    let backend = BACKEND.get_or_init(|| {
        let mut b = LlamaBackend::init().expect("llama backend");
        b.void_logs();
        b
    });
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .expect("llama.cpp loads the model");
    let params = LlamaContextParams::default().with_n_ctx(std::num::NonZeroU32::new(512));
    let mut ctx = model.new_context(backend, params).expect("context");
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, t) in tokens.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], i + 1 == tokens.len())
            .unwrap();
    }
    ctx.decode(&mut batch).expect("decode");
    let mut sampler = LlamaSampler::greedy();
    let mut text = Vec::new();
    for pos in (tokens.len() as i32..).take(n) {
        let tok = sampler.sample(&ctx, batch.n_tokens() - 1);
        if vocab.is_eog(tok) {
            break;
        }
        text.extend(vocab.token_to_piece(tok, false, None));
        batch.clear();
        batch.add(tok, pos, &[0], true).unwrap();
        ctx.decode(&mut batch).expect("decode");
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// `apply` with defaults and no progress bar.
pub fn apply_quietly(
    input: &Path,
    output: &Path,
    r: &[f32],
) -> gguf_abliterate::apply::ApplyReport {
    let opts = gguf_abliterate::apply::ApplyOptions {
        progress: false,
        ..Default::default()
    };
    gguf_abliterate::apply::apply(input, output, r, &opts).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `gguf-abliterate apply --direction DIRECTION INPUT OUTPUT EXTRA…`.
pub fn apply_command(
    direction: &Path,
    input: &Path,
    output: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = bin();
    cmd.arg("apply")
        .arg("--direction")
        .arg(direction)
        .arg(input)
        .arg(output)
        .args(extra);
    cmd
}

/// [`apply_command`] run to completion (stderr is not a terminal, so no
/// progress bar).
pub fn run_apply(
    direction: &Path,
    input: &Path,
    output: &Path,
    extra: &[&str],
) -> std::process::Output {
    apply_command(direction, input, output, extra)
        .output()
        .unwrap()
}

/// `apply -q` of `input` with tests/hostile/direction.json into
/// `dir/out.gguf`: the run, and what `dir` then holds. The input must come
/// out byte-identical (`what` names it in the message).
pub fn apply_hostile(input: &Path, dir: &Path, what: &str) -> (Output, Vec<String>) {
    let before = std::fs::read(input).unwrap();
    let run = apply_command(
        &hostile("direction.json"),
        input,
        &dir.join("out.gguf"),
        &["-q"],
    )
    .output()
    .unwrap();
    assert!(
        std::fs::read(input).unwrap() == before,
        "{what}: input changed"
    );
    (run, listing(dir))
}

/// At least 80 % of the harmless replies in a report are real answers of
/// ten words or more: the edited model is still a chat model.
pub fn assert_harmless_replies_coherent(harmless: &[serde_json::Value]) {
    let coherent = harmless
        .iter()
        .filter(|r| {
            r["verdict"] == "Complied"
                && r["reply"].as_str().unwrap().split_whitespace().count() >= 10
        })
        .count();
    assert!(
        coherent * 10 >= harmless.len() * 8,
        "{coherent} of {} harmless replies are coherent answers",
        harmless.len()
    );
}

/// The report's long-reply figures hold together: the whole-reply, late,
/// loop and shorter-reply figures are recounted from its own replies, and
/// perplexity before and after is measured on the shipped text.
pub fn assert_long_reply_figures(v: &serde_json::Value) -> (f64, f64) {
    let n_harmful = v["n_harmful"].as_u64().unwrap() as usize;
    let tokens = v["tokens_generated"].as_u64().unwrap();
    assert!(tokens >= 128, "verification generates {tokens} tokens");
    for side in ["before", "after"] {
        let replies = v[format!("replies_{side}")].as_array().unwrap();
        let harmful = &replies[..n_harmful];
        let share = |rs: &[serde_json::Value], f: &dyn Fn(&serde_json::Value) -> bool| {
            rs.iter().filter(|r| f(r)).count() as f64 / rs.len() as f64
        };
        let late = share(harmful, &|r| {
            r["verdict"] == "Refused" && r["first_refusal_token"].as_u64().is_some_and(|n| n > 24)
        });
        assert_eq!(
            v[format!("harmful_late_refusal_{side}")].as_f64(),
            Some(late)
        );
        let loops = share(replies, &|r| r["loops"] == true);
        assert_eq!(v[format!("loops_{side}")].as_f64(), Some(loops));
        for (i, s) in v["shorter"].as_array().unwrap().iter().enumerate() {
            let refused = share(harmful, &|r| r["shorter_verdicts"][i] != "Complied");
            assert_eq!(s[format!("harmful_refusal_{side}")].as_f64(), Some(refused));
        }
        // Every phrase a reply holds was found within the tokens it has.
        for r in replies {
            if let Some(n) = r["first_refusal_token"].as_u64() {
                assert!(n <= r["tokens"].as_u64().unwrap(), "{r}");
            }
        }
    }
    let lengths: Vec<u64> = v["shorter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(lengths, [24, 48]);
    let p = &v["perplexity"];
    assert_eq!(p["text"], "data/perplexity.txt");
    // The default: ten chunks of 512 tokens, the scored half of each.
    let (chunks, n_ctx) = (p["chunks"].as_u64().unwrap(), p["n_ctx"].as_u64().unwrap());
    assert_eq!((chunks, n_ctx), (10, 512), "{p}");
    assert_eq!(p["tokens_scored"].as_u64(), Some(chunks * (n_ctx / 2 - 1)));
    let (before, after) = (p["before"].as_f64().unwrap(), p["after"].as_f64().unwrap());
    assert!(before > 1.0 && after > 1.0, "{p}");
    (before, after)
}

/// The report's cost account names every stage in order, and each stage
/// that runs llama.cpp decoded rows; the terminal prints it.
pub fn assert_cost_account(r: &serde_json::Value, stdout: &str) {
    let stages: Vec<(&str, u64, u64)> = r["cost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let (name, rows) = (s["stage"].as_str().unwrap(), s["rows"].as_u64().unwrap());
            // Generated rows: none where only prompts are decoded, some
            // (and fewer than all rows) wherever replies are generated.
            let generated = s["generated"].as_u64().unwrap();
            match name {
                "capture" | "rank" | "apply" => assert_eq!(generated, 0, "{name}"),
                _ => assert!(
                    generated > 0 && generated < rows,
                    "{name}: {generated} of {rows}"
                ),
            }
            (name, rows, s["sequences"].as_u64().unwrap())
        })
        .collect();
    let names: Vec<&str> = stages.iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        ["baseline", "capture", "rank", "evaluate", "refine", "confirm", "apply", "verify"]
    );
    for &(name, rows, sequences) in &stages {
        if name == "apply" {
            assert_eq!((rows, sequences), (0, 0), "apply decodes nothing");
        } else {
            assert!(
                rows > sequences && sequences > 0,
                "{name}: {rows} rows, {sequences} sequences"
            );
        }
    }
    assert!(stdout.contains("cost of this run"), "{stdout}");
}
