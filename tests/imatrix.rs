//! Importance matrices: `--imatrix FILE` errors, an IQ2_XXS model that can
//! only be rewritten with one, and the matrix the main command collects.

use crate::common::*;
use gguf_abliterate::activations::{capture, capture_collecting};
use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::eval::{BatchHook, Runner};
use gguf_abliterate::ffi::{GgmlType, Model, Node, ResidualHook};
use gguf_abliterate::gguf::{GgufFile, Value};
use gguf_abliterate::imatrix::{self, InputSums};
use gguf_abliterate::pipeline::load_prompts;
use gguf_abliterate::prompts::Kind;
use gguf_abliterate::quant;
use std::path::Path;

const N: usize = 256; // IQ2_XXS rows are multiples of 256

/// The writers `apply` edits in `SynthModel` (biases aside).
fn matrices() -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string()];
    for l in 0..2 {
        names.push(format!("blk.{l}.attn_output.weight"));
        names.push(format!("blk.{l}.ffn_down.weight"));
    }
    names
}

/// Importances for the edited matrices but `token_embd` (rows of 2 N).
fn synth_entries() -> Vec<(String, Vec<f32>)> {
    matrices()[1..]
        .iter()
        .map(|n| (n.clone(), synth_importance(2 * N)))
        .collect()
}

/// A synthetic llama whose attn_output/ffn_down are `ty` (rows of 2 N).
fn model_with(dir: &Path, ty: GgmlType) -> (std::path::PathBuf, std::path::PathBuf, Vec<f32>) {
    let r = unit(&noise(N, 1));
    let mut model = SynthModel::new("llama", N, GgmlType::Q8_0, &r);
    for t in &mut model.tensors {
        if t.name.contains("attn_output.weight") || t.name.contains("ffn_down.weight") {
            t.ty = ty;
        }
    }
    let path = dir.join("in.gguf");
    model.write(&path);
    let direction = dir.join("dir.json");
    write_direction(&direction, &r);
    (path, direction, r)
}

#[test]
fn bad_imatrix_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (model, direction, _) = model_with(dir.path(), GgmlType::Q8_0);
    let out = dir.path().join("out.gguf");
    let good = dir.path().join("good.imatrix.gguf");
    let entries = synth_entries();
    write_imatrix_gguf(&good, &entries, 3.0);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let other_model = dir.path().join("other.imatrix.gguf");
    let renamed: Vec<_> = entries
        .iter()
        .map(|(n, v)| (n.replace("blk.", "layers."), v.clone()))
        .collect();
    write_imatrix_gguf(&other_model, &renamed, 3.0);
    let wrong_columns = dir.path().join("columns.imatrix.gguf");
    let short: Vec<_> = entries
        .iter()
        .map(|(n, v)| (n.clone(), v[..N].to_vec()))
        .collect();
    write_imatrix_gguf(&wrong_columns, &short, 3.0);
    let garbage = dir.path().join("garbage.dat");
    std::fs::write(&garbage, b"\x02\x00\x00\x00not an imatrix").unwrap();

    let missing = dir.path().join("missing.dat");
    let cases = [
        (&missing, "cannot open importance matrix"),
        (&truncated, "truncated.gguf is not a valid GGUF file"),
        (&garbage, "garbage.dat (legacy .dat form)"),
        (&other_model, "holds none of the 5 tensors to edit"),
        (
            &wrong_columns,
            "has 256 values, the model's tensor needs 512",
        ),
    ];
    for (file, needle) in cases {
        let result = run_apply(
            &direction,
            &model,
            &out,
            &["--imatrix", file.to_str().unwrap()],
        );
        assert_fails_cleanly(&result, needle, &out);
        assert!(!out.exists(), "{} left OUT behind", file.display());
    }
    // The good one works, in either form, and is recorded.
    let recorded = |extra: &[&str]| -> String {
        assert_success(&run_apply(&direction, &model, &out, extra));
        let written = GgufFile::open(&out).unwrap();
        written.get_str("abliterate.imatrix").unwrap().to_string()
    };
    assert_eq!(
        recorded(&["--imatrix", good.to_str().unwrap()]),
        "file:good.imatrix.gguf"
    );
    let legacy = dir.path().join("legacy.dat");
    std::fs::write(&legacy, legacy_bytes(&entries, 7)).unwrap();
    assert_eq!(
        recorded(&["-f", "--imatrix", legacy.to_str().unwrap()]),
        "file:legacy.dat"
    );
    // No --imatrix with `apply`: nothing is collected.
    assert_eq!(recorded(&["-f"]), "none");
}

/// llama-imatrix's legacy form: values are the mean times ncall.
fn legacy_bytes(entries: &[(String, Vec<f32>)], ncall: i32) -> Vec<u8> {
    let mut out = (entries.len() as i32).to_le_bytes().to_vec();
    for (name, imp) in entries {
        out.extend((name.len() as i32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(ncall.to_le_bytes());
        out.extend((imp.len() as i32).to_le_bytes());
        imp.iter()
            .for_each(|v| out.extend((v * ncall as f32).to_le_bytes()));
    }
    out.extend(1i32.to_le_bytes());
    out.extend(4i32.to_le_bytes());
    out.extend(b"data");
    out
}

/// ‖uᵀV‖ / ‖uᵀW‖ for a tensor whose rows are outputs along u.
fn kept(u: &[f32], before: &[f32], after: &[f32], row_len: usize) -> f64 {
    let project = |w: &[f32]| -> f64 {
        let mut acc = vec![0f64; row_len];
        for (row, &ui) in w.chunks(row_len).zip(u) {
            acc.iter_mut()
                .zip(row)
                .for_each(|(a, &x)| *a += ui as f64 * x as f64);
        }
        acc.iter().map(|a| a * a).sum::<f64>().sqrt()
    };
    project(after) / project(before)
}

#[test]
fn iq2_xxs_is_rewritten_with_an_imatrix_and_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let (model, direction, r) = model_with(dir.path(), GgmlType::IQ2_XXS);
    let out = dir.path().join("out.gguf");

    let result = run_apply(&direction, &model, &out, &[]);
    assert_fails_cleanly(&result, "is IQ2_XXS", &out);
    assert_clean_failure(&result, "--imatrix");
    assert!(String::from_utf8_lossy(&result.stderr).contains("attn_output.weight"));

    let imatrix = dir.path().join("model.imatrix.gguf");
    let entries = synth_entries();
    write_imatrix_gguf(&imatrix, &entries, 12.0);
    let result = run_apply(
        &direction,
        &model,
        &out,
        &["--imatrix", imatrix.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");

    let input = GgufFile::open(&model).unwrap();
    let output = GgufFile::open(&out).unwrap();
    let u = unit(&r);
    let mut worst = 0f64;
    for name in &matrices()[1..] {
        let (a, b) = (input.tensor(name).unwrap(), output.tensor(name).unwrap());
        assert_eq!(b.ty, GgmlType::IQ2_XXS);
        let row_len = a.row_len() as usize;
        let w = quant::dequantize(a.ty, input.tensor_data(a), row_len).unwrap();
        let v = quant::dequantize(b.ty, output.tensor_data(b), row_len).unwrap();
        let k = kept(&u, &w, &v, row_len);
        eprintln!("{name}: IQ2_XXS kept {k:.4} of its component along u");
        worst = worst.max(k);
    }
    eprintln!("IQ2_XXS worst kept share: {worst:.4}");
    assert!(
        worst <= 0.10,
        "IQ2_XXS keeps {worst:.4} of the component (limit 0.10)"
    );
}

/// Sums of squares of the final norm's rows: the input of the tied output
/// head, observed through the residual hook rather than the mul_mat.
struct FinalNormSquares {
    sums: Vec<f64>,
    rows: u64,
}

impl ResidualHook for FinalNormSquares {
    fn wants(&mut self, node: Node) -> bool {
        node == Node::FinalNorm
    }
    fn visit(&mut self, _: Node, rows: &mut [f32], n_embd: usize) -> bool {
        self.sums.resize(n_embd, 0.0);
        for row in rows.chunks(n_embd) {
            self.sums
                .iter_mut()
                .zip(row)
                .for_each(|(s, &x)| *s += x as f64 * x as f64);
            self.rows += 1;
        }
        false
    }
}
impl BatchHook for FinalNormSquares {}

#[test]
fn collected_importances_are_plausible_and_match_an_independent_sum() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let model = Model::load(&fixture, 0).unwrap();
    let fmt = ChatFormat::resolve(&model, None).unwrap();
    let mut prompts = Vec::new();
    for kind in [Kind::Harmful, Kind::Harmless] {
        let set = load_prompts(kind, &None, None, None).unwrap();
        for p in set.train.iter().take(8) {
            prompts.push(fmt.tokenize(&model, &p.text).unwrap());
        }
    }
    let shards = gguf_abliterate::gguf::open_model(&fixture).unwrap();
    let targets = imatrix::edit_targets(&shards);
    assert_eq!(targets.len(), 1 + 2 * 30, "{targets:?}");
    let mut runner = Runner::new(&model, 2048, 2).unwrap();

    // A plain capture, then the same capture collecting importances.
    let none = indicatif::ProgressBar::hidden();
    let t = std::time::Instant::now();
    capture(&mut runner, &prompts, 29, fmt.n_post(), &none).unwrap();
    let plain = t.elapsed().as_secs_f64();
    let mut sums = InputSums::new(targets.clone());
    let t = std::time::Instant::now();
    capture_collecting(
        &mut runner,
        &prompts,
        29,
        fmt.n_post(),
        &none,
        Some(&mut sums),
    )
    .unwrap();
    let collecting = t.elapsed().as_secs_f64();
    eprintln!(
        "capture of {} prompts: {plain:.2} s plain, {collecting:.2} s collecting",
        prompts.len()
    );
    let m = sums.finish().unwrap();
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(m.source, format!("collected: 16 prompts, {tokens} tokens"));

    // One row per edited matrix, of its row length, positive and finite.
    let mut names = m.names();
    names.sort();
    let mut expected: Vec<&str> = targets.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(names, expected);
    for name in names {
        let t = shards[0].tensor(name).unwrap();
        let v = m
            .for_tensor(name, t.row_len() as usize, 1)
            .unwrap()
            .unwrap();
        assert!(
            v.iter().all(|x| x.is_finite() && *x > 0.0),
            "{name}: {:?}",
            &v[..8]
        );
    }

    // The tied head's importances are the final norm's mean squares.
    let mut hook = FinalNormSquares {
        sums: Vec::new(),
        rows: 0,
    };
    runner.run(&prompts, &mut hook, |_, _| Ok(())).unwrap();
    assert_eq!(hook.rows, 16, "one output row per prompt");
    let head = m.get("token_embd.weight").unwrap();
    let worst = head
        .iter()
        .zip(&hook.sums)
        .map(|(&c, &s)| ((c as f64 - s / hook.rows as f64) / (s / hook.rows as f64)).abs())
        .fold(0f64, f64::max);
    assert!(worst < 1e-4, "token_embd importances differ by {worst}");
}

#[test]
fn main_command_records_the_collected_matrix() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let report = dir.path().join("report.json");
    let result = bin()
        .arg(&fixture)
        .arg(&out)
        .args(QUICK_SEARCH)
        .args(["--trials", "1", "--no-verify", "-q", "-t", "2", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(
        stderr.contains("importance matrix: 61 matrices, collected: 16 prompts"),
        "{stderr}"
    );
    let written = GgufFile::open(&out).unwrap();
    let source = written.get_str("abliterate.imatrix").unwrap();
    assert!(source.starts_with("collected: 16 prompts, "), "{source}");
    assert!(matches!(
        written.get("abliterate.imatrix"),
        Some(Value::String(_))
    ));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["imatrix"], source);
    assert_eq!(json["apply"]["imatrix"], source);

    // With --direction there is no capture and nothing is collected: the
    // main command then writes what `apply --direction` writes.
    let rerun = |extra: &[&str]| {
        let result = bin()
            .arg(&fixture)
            .arg(&out)
            .args([
                "--n-train",
                "8",
                "--no-verify",
                "-q",
                "-f",
                "-t",
                "2",
                "--direction",
            ])
            .arg(&report)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        assert!(result.status.success(), "{stderr}");
        let written = GgufFile::open(&out).unwrap();
        (
            written.get_str("abliterate.imatrix").unwrap().to_string(),
            stderr,
        )
    };
    let (again, stderr) = rerun(&[]);
    assert_eq!(again, "none");
    assert!(!stderr.contains("importance matrix:"), "{stderr}");

    // A given file is used.
    let shards = gguf_abliterate::gguf::open_model(&fixture).unwrap();
    let entries: Vec<(String, Vec<f32>)> = imatrix::edit_targets(&shards)
        .into_iter()
        .map(|n| {
            let row_len = shards[0].tensor(&n).unwrap().row_len() as usize;
            (n, vec![1.0; row_len])
        })
        .collect();
    let file = dir.path().join("fixture.imatrix.gguf");
    write_imatrix_gguf(&file, &entries, 100.0);
    let (given, stderr) = rerun(&["--imatrix", file.to_str().unwrap()]);
    assert_eq!(given, "file:fixture.imatrix.gguf");
    assert!(!stderr.contains("importance matrix:"), "{stderr}");
}
