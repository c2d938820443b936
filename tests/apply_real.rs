//! `apply` on real third-party GGUFs (fetched by scripts/fetch-models.sh).

use crate::common::*;
use gguf_abliterate::edit::{self, classify, EditKind};
use gguf_abliterate::gguf::GgufFile;
use gguf_abliterate::quant;
use std::path::Path;

/// Applies a random direction and checks the output end to end.
fn check_real_model(input: &Path, prompt: &str) {
    let original = GgufFile::open(input).unwrap();
    let arch = original.architecture().unwrap().to_string();
    let n_embd = original.arch_u64("embedding_length").unwrap() as usize;
    let r = unit(&noise(n_embd, 2024));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let report = apply_quietly(input, &out, &r);
    let edited = GgufFile::open(&out).unwrap();

    // Metadata: byte-identical and in order, then our provenance keys.
    for (a, b) in original.kvs.iter().zip(&edited.kvs) {
        assert_eq!(
            original.mmap[a.raw.clone()],
            edited.mmap[b.raw.clone()],
            "{}",
            a.key
        );
    }
    assert_eq!(edited.kvs.len(), original.kvs.len() + 9);
    assert_eq!(
        edited.get("abliterate.preserve_norms"),
        Some(&gguf_abliterate::gguf::Value::Bool(false))
    );
    assert_eq!(
        edited.get("abliterate.per_layer"),
        Some(&gguf_abliterate::gguf::Value::Bool(false))
    );
    // An independent reader agrees on the layout.
    let mut container = gguf_rs::get_gguf_container(out.to_str().unwrap()).unwrap();
    let decoded = container.decode().unwrap();
    assert_eq!(decoded.num_tensor() as usize, original.tensors.len());
    assert_eq!(decoded.data_offset(), edited.data_start);

    let mut n_edited = 0;
    for t in &original.tensors {
        let te = edited.tensor(&t.name).unwrap();
        assert_eq!((te.ty, &te.dims, te.offset), (t.ty, &t.dims, t.offset));
        let Some((kind, post_norm)) = classify(&arch, &t.name) else {
            assert_eq!(
                original.tensor_data(t),
                edited.tensor_data(te),
                "{} must be byte-identical",
                t.name
            );
            continue;
        };
        n_edited += 1;
        let u = match post_norm.and_then(|n| original.tensor(&n)) {
            Some(norm) => {
                let g = original.read_f32(norm).unwrap();
                unit(&g.iter().zip(&r).map(|(g, r)| g * r).collect::<Vec<_>>())
            }
            None => r.clone(),
        };
        let row_len = t.row_len() as usize;
        let before = quant::dequantize(t.ty, original.tensor_data(t), row_len).unwrap();
        let after = quant::dequantize(te.ty, edited.tensor_data(te), row_len).unwrap();
        let (b, a) = (
            edit::max_component(kind, &before, row_len, &u),
            edit::max_component(kind, &after, row_len, &u),
        );
        // Within the requantization noise of these 4–8-bit types.
        let tolerance = if kind == EditKind::EmbeddingRows {
            0.05
        } else {
            0.6
        };
        assert!(
            a <= tolerance * b,
            "{} ({}): max|uᵀW| {b:.4} -> {a:.4}",
            t.name,
            t.ty
        );
    }
    assert_eq!(n_edited, report.tensors.len());

    // The output loads in llama.cpp (through the llama-cpp-2 crate) and writes text.
    let text = generate_with_llama_cpp_2(&out, prompt, 12);
    assert!(text.trim().len() >= 3, "generated {text:?}");
}

#[test]
fn smollm2_q4_1() {
    let _cores = all_cores();
    check_real_model(
        &require_model!(SMOLLM2_Q4_1),
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    );
}

#[test]
fn gemma3_270m_mixed_k_quants_with_post_norms() {
    let _cores = all_cores();
    check_real_model(&require_model!(GEMMA3_270M), "The capital of France is");
}

/// A 2-dimensional subspace through the command line: the output's
/// `abliterate.*` keys record both directions, a direction file rebuilt
/// from those keys alone gives the same bytes, and the output still loads
/// and generates.
#[test]
fn a_subspace_is_recorded_in_the_file_and_reapplied_byte_for_byte() {
    use gguf_abliterate::gguf::Value;
    let _cores = all_cores();
    let input = require_model!(SMOLLM2_Q4_1);
    let n_embd = GgufFile::open(&input)
        .unwrap()
        .arch_u64("embedding_length")
        .unwrap() as usize;
    let (r, f) = (noise(n_embd, 31), noise(n_embd, 32));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, r: &[f32], f: &[f32]| {
        let path = dir.path().join(name);
        let json = serde_json::json!({"direction": r, "further_directions": [f]});
        std::fs::write(&path, json.to_string()).unwrap();
        path
    };
    let first = dir.path().join("first.gguf");
    let run = run_apply(&write("given.json", &r, &f), &input, &first, &["-q"]);
    assert_success(&run);
    let edited = GgufFile::open(&first).unwrap();
    assert_eq!(edited.get_u64("abliterate.subspace_dim"), Some(2));
    let floats = |key: &str| -> Vec<f32> {
        match edited.get(key) {
            Some(Value::ScalarArray(ty, bytes))
                if *ty == gguf_abliterate::gguf::value_type::F32 =>
            {
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            }
            _ => panic!("{key} is not an f32 array"),
        }
    };
    let (kept_r, kept_f) = (
        floats("abliterate.direction"),
        floats("abliterate.further_directions"),
    );
    assert_eq!((kept_r.as_slice(), kept_f.as_slice()), (&r[..], &f[..]));
    let second = dir.path().join("second.gguf");
    let rebuilt = write("from-keys.json", &kept_r, &kept_f);
    assert_success(&run_apply(&rebuilt, &input, &second, &["-q"]));
    assert!(
        std::fs::read(&first).unwrap() == std::fs::read(&second).unwrap(),
        "the subspace recorded in the keys gives other bytes"
    );
    let text = generate_with_llama_cpp_2(
        &first,
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
        12,
    );
    assert!(text.trim().len() >= 3, "generated {text:?}");
}
