//! `apply` on synthetic GGUFs of every rewritable type family.

use crate::common::*;
use gguf_abliterate::apply::{apply, ApplyOptions};
use gguf_abliterate::edit::{self, EditKind};
use gguf_abliterate::ffi::GgmlType;
use gguf_abliterate::gguf::GgufFile;
use gguf_abliterate::quant;

const N_EMBD: usize = 256; // K-quant rows need multiples of 256

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

fn kind_of(name: &str) -> EditKind {
    if name == "token_embd.weight" {
        EditKind::EmbeddingRows
    } else if name.ends_with(".bias") {
        EditKind::Bias
    } else {
        EditKind::OutputProjection
    }
}

fn edited(name: &str) -> bool {
    name == "token_embd.weight" || name.contains("attn_output") || name.contains("ffn_down")
}

/// Asserts everything `apply` promises about one output.
fn check_output(
    model: &SynthModel,
    input: &GgufFile,
    output: &GgufFile,
    u_for: impl Fn(&str) -> Vec<f32>,
) {
    // Metadata: the input's entries, byte for byte and in order, then ours.
    assert!(output.kvs.len() > input.kvs.len());
    for (a, b) in input.kvs.iter().zip(&output.kvs) {
        assert_eq!(a.key, b.key);
        assert_eq!(
            input.mmap[a.raw.clone()],
            output.mmap[b.raw.clone()],
            "metadata {} changed",
            a.key
        );
    }
    assert!(output.kvs[input.kvs.len()..]
        .iter()
        .all(|kv| kv.key.starts_with("abliterate.")));
    assert_eq!(
        input.mmap[input.tensor_info_range.clone()],
        output.mmap[output.tensor_info_range.clone()]
    );

    for st in &model.tensors {
        let ti = input.tensor(&st.name).unwrap();
        let to = output.tensor(&st.name).unwrap();
        let (bi, bo) = (input.tensor_data(ti), output.tensor_data(to));
        if !edited(&st.name) {
            assert_eq!(bi, bo, "{} should be untouched", st.name);
            continue;
        }
        let row_len = st.dims[0] as usize;
        let kind = kind_of(&st.name);
        let u = u_for(&st.name);
        let stored = quant::dequantize(ti.ty, bi, row_len).unwrap();
        let mut ideal = stored.clone();
        match kind {
            EditKind::OutputProjection => edit::orthogonalize_output(&mut ideal, row_len, &u, 1.0),
            _ => edit::orthogonalize_rows(&mut ideal, &u, 1.0),
        }
        let got = quant::dequantize(to.ty, bo, row_len).unwrap();
        // The type's own round-trip error on this tensor.
        let round_trip = rms(
            &quant::dequantize(
                ti.ty,
                &quant::quantize(ti.ty, &st.source, row_len, None).unwrap(),
                row_len,
            )
            .unwrap(),
            &st.source,
        );
        let err = rms(&got, &ideal);
        assert!(
            err <= 1.5 * round_trip + 1e-6,
            "{} {}: distance to the ideal edit {err:.3e} exceeds the type's round-trip error {round_trip:.3e}",
            st.name,
            ti.ty
        );
        let before = edit::max_component(kind, &stored, row_len, &u);
        let after = edit::max_component(kind, &got, row_len, &u);
        // What remains along u must be no more than the quantization error
        // itself could contribute: |uᵀe| ≤ |e| for each error vector e
        // (a column of the output projection, or a row).
        let diff: Vec<f32> = got.iter().zip(&ideal).map(|(a, b)| a - b).collect();
        let noise = match kind {
            EditKind::OutputProjection => (0..row_len)
                .map(|j| {
                    diff.iter()
                        .skip(j)
                        .step_by(row_len)
                        .map(|e| (*e as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .fold(0.0, f64::max),
            _ => diff
                .chunks(row_len)
                .map(|row| edit::dot(row, row).sqrt())
                .fold(0.0, f64::max),
        };
        assert!(
            after <= noise + 1e-4,
            "{} {}: |uᵀW| {before:.4} -> {after:.4} (noise {noise:.4})",
            st.name,
            ti.ty
        );
        if ti.ty.type_size() * 8 / ti.ty.block_size() >= 8 {
            assert!(
                after <= 0.05 * before,
                "{} {}: |uᵀW| {before:.4} -> {after:.4}",
                st.name,
                ti.ty
            );
        }
        assert!(
            before > 1.0,
            "the planted component should be large, got {before}"
        );
    }
}

#[test]
fn every_type_family_is_orthogonalized_and_the_rest_kept() {
    let r = unit(&noise(N_EMBD, 99));
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];
    let dir = tempfile::tempdir().unwrap();
    for ty in types {
        let model = SynthModel::new("llama", N_EMBD, ty, &r);
        let inp = dir.path().join(format!("{ty}.gguf"));
        let out = dir.path().join(format!("{ty}-abl.gguf"));
        model.write(&inp);
        let report = apply_quietly(&inp, &out, &r);
        assert_eq!(
            report.tensors.len(),
            6,
            "{ty}: embd + 2 attn_output + 2 ffn_down + 1 bias"
        );
        let (input, output) = (GgufFile::open(&inp).unwrap(), GgufFile::open(&out).unwrap());
        check_output(&model, &input, &output, |_| r.clone());
        let stray = listing(dir.path()).into_iter().find(|n| n.contains(".tmp"));
        assert_eq!(stray, None, "{ty}: temporary file left");
    }
}

#[test]
fn post_norm_architectures_remove_the_scaled_direction() {
    let r = unit(&noise(N_EMBD, 5));
    let mut model = SynthModel::new("gemma3", N_EMBD, GgmlType::F32, &r);
    // Post-norm weights far from uniform, so g ⊙ r differs from r.
    for l in 0..2 {
        for norm in ["post_attention_norm", "post_ffw_norm"] {
            let g: Vec<f32> = (0..N_EMBD)
                .map(|i| 0.2 + ((i * (l + 3)) % 17) as f32 / 4.0)
                .collect();
            model.tensors.push(SynthTensor {
                name: format!("blk.{l}.{norm}.weight"),
                dims: vec![N_EMBD as u64],
                ty: GgmlType::F32,
                source: g,
            });
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("g.gguf"), dir.path().join("g-abl.gguf"));
    model.write(&inp);
    let report = apply_quietly(&inp, &out, &r);
    assert!(report.tied_embeddings);
    let post_norm = |name: &str| -> Option<String> {
        let layer = name.strip_prefix("blk.")?.split('.').next()?;
        let norm = if name.contains("attn_output") {
            "post_attention_norm"
        } else {
            "post_ffw_norm"
        };
        Some(format!("blk.{layer}.{norm}.weight"))
    };
    let u_for = |name: &str| match post_norm(name) {
        Some(norm) => {
            let g = &model.tensor(&norm).source;
            unit(&g.iter().zip(&r).map(|(g, r)| g * r).collect::<Vec<_>>())
        }
        None => r.clone(),
    };
    let (input, output) = (GgufFile::open(&inp).unwrap(), GgufFile::open(&out).unwrap());
    check_output(&model, &input, &output, u_for);
    // And the residual really gets nothing along r: r · (g ⊙ (W' x)) = 0.
    let t = output.tensor("blk.1.ffn_down.weight").unwrap();
    let w = quant::dequantize(t.ty, output.tensor_data(t), 2 * N_EMBD).unwrap();
    let g = &model.tensor("blk.1.post_ffw_norm.weight").source;
    let x = noise(2 * N_EMBD, 77);
    let y: f64 = w
        .chunks(2 * N_EMBD)
        .enumerate()
        .map(|(i, row)| edit::dot(row, &x) * g[i] as f64 * r[i] as f64)
        .sum();
    assert!(y.abs() < 1e-3, "residual write along r: {y}");
    let rt = report
        .tensors
        .iter()
        .find(|t| t.name == "blk.1.ffn_down.weight")
        .unwrap();
    assert_eq!(rt.post_norm.as_deref(), Some("blk.1.post_ffw_norm.weight"));
}

#[test]
fn skip_embeddings_and_partial_scale() {
    let r = unit(&noise(N_EMBD, 8));
    let model = SynthModel::new("llama", N_EMBD, GgmlType::F32, &r);
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("m.gguf"), dir.path().join("m-abl.gguf"));
    model.write(&inp);
    let opts = ApplyOptions {
        progress: false,
        skip_embeddings: true,
        scale: 0.5,
        ..Default::default()
    };
    let report = apply(&inp, &out, &r, &opts).unwrap();
    assert!(report.tensors.iter().all(|t| t.name != "token_embd.weight"));
    let (input, output) = (GgufFile::open(&inp).unwrap(), GgufFile::open(&out).unwrap());
    let name = "token_embd.weight";
    assert_eq!(
        input.tensor_data(input.tensor(name).unwrap()),
        output.tensor_data(output.tensor(name).unwrap())
    );
    for t in &report.tensors {
        assert!(
            (t.max_after - 0.5 * t.max_before).abs() < 1e-3 * t.max_before,
            "{}: {t:?}",
            t.name
        );
    }
    assert_eq!(
        output.get("abliterate.scale"),
        Some(&gguf_abliterate::gguf::Value::F32(0.5))
    );
}

#[test]
fn re_abliterating_replaces_provenance_instead_of_duplicating_keys() {
    let r = unit(&noise(N_EMBD, 3));
    let model = SynthModel::new("llama", N_EMBD, GgmlType::Q8_0, &r);
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("m{i}.gguf")))
        .collect();
    model.write(&paths[0]);
    apply_quietly(&paths[0], &paths[1], &r);
    apply_quietly(&paths[1], &paths[2], &r);
    let (once, twice) = (
        GgufFile::open(&paths[1]).unwrap(),
        GgufFile::open(&paths[2]).unwrap(),
    );
    assert_eq!(once.kvs.len(), twice.kvs.len());
}

#[test]
fn split_ggufs_are_patched_shard_by_shard() {
    let r = unit(&noise(N_EMBD, 4));
    let model = SynthModel::new("llama", N_EMBD, GgmlType::Q8_0, &r);
    let dir = tempfile::tempdir().unwrap();
    // Write shard 1 (metadata, embeddings, layer 0) and shard 2 (the rest).
    let whole = dir.path().join("whole.gguf");
    model.write(&whole);
    let split_at = model
        .tensors
        .iter()
        .position(|t| t.name.starts_with("blk.1."))
        .unwrap();
    for (i, range) in [(0..split_at), (split_at..model.tensors.len())]
        .into_iter()
        .enumerate()
    {
        let part = SynthModel {
            arch: model.arch.clone(),
            n_embd: N_EMBD,
            tensors: model.tensors[range]
                .iter()
                .map(|t| SynthTensor {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ty,
                    source: t.source.clone(),
                })
                .collect(),
            extra_kv: vec![],
        };
        let path = dir.path().join(format!("m-{:05}-of-00002.gguf", i + 1));
        write_with_split_keys(&part, &path, i as u16, 2, model.tensors.len() as i32);
    }
    let first = dir.path().join("m-00001-of-00002.gguf");
    let out = dir.path().join("abl.gguf");
    let report = apply_quietly(&first, &out, &r);
    assert_eq!(report.tensors.len(), 6);
    let names: Vec<_> = report
        .outputs
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["abl-00001-of-00002.gguf", "abl-00002-of-00002.gguf"]
    );
    let second = GgufFile::open(&report.outputs[1]).unwrap();
    let t = second.tensor("blk.1.ffn_down.weight").unwrap();
    let w = quant::dequantize(t.ty, second.tensor_data(t), 2 * N_EMBD).unwrap();
    assert!(edit::max_component(EditKind::OutputProjection, &w, 2 * N_EMBD, &r) < 0.05);
    // Provenance goes into the first shard only.
    assert!(second
        .kvs
        .iter()
        .all(|kv| !kv.key.starts_with("abliterate.")));
}

fn write_with_split_keys(
    model: &SynthModel,
    path: &std::path::Path,
    no: u16,
    count: u16,
    total: i32,
) {
    let kv = vec![
        Kv::str("general.architecture", &model.arch),
        Kv::u32("llama.block_count", 2),
        Kv::u32("llama.embedding_length", model.n_embd as u32),
        // llama-gguf-split's keys and types.
        Kv::u16("split.no", no),
        Kv::u16("split.count", count),
        Kv {
            key: "split.tensors.count".into(),
            ty: 5,
            value: total.to_le_bytes().to_vec(),
        },
    ];
    write_gguf(path, &kv, &model.tensors);
}

#[test]
fn per_layer_directions_edit_each_layer_along_its_own() {
    let r = unit(&noise(N_EMBD, 21));
    let layers: Vec<Vec<f32>> = (0..2).map(|l| unit(&noise(N_EMBD, 30 + l))).collect();
    // Each layer's writers carry a strong component along their own direction.
    let mut model = SynthModel::new("llama", N_EMBD, GgmlType::Q8_0, &r);
    for (l, d) in layers.iter().enumerate() {
        let planted = SynthModel::new("llama", N_EMBD, GgmlType::Q8_0, d);
        let prefix = format!("blk.{l}.");
        for t in model
            .tensors
            .iter_mut()
            .filter(|t| t.name.starts_with(&prefix))
        {
            t.source = planted.tensor(&t.name).source.clone();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("m.gguf"), dir.path().join("m-abl.gguf"));
    model.write(&inp);
    let opts = ApplyOptions {
        progress: false,
        layer_directions: layers.clone(),
        ..Default::default()
    };
    apply(&inp, &out, &r, &opts).unwrap();
    // token_embd loses r; layer l's writers lose their own direction.
    let u_for = |name: &str| match name.strip_prefix("blk.") {
        Some(rest) => layers[rest[..1].parse::<usize>().unwrap()].clone(),
        None => r.clone(),
    };
    let (input, output) = (GgufFile::open(&inp).unwrap(), GgufFile::open(&out).unwrap());
    check_output(&model, &input, &output, u_for);
    // The file records what it used, layer after layer.
    assert_eq!(
        output.get("abliterate.per_layer"),
        Some(&gguf_abliterate::gguf::Value::Bool(true))
    );
    // (Read back as the raw little-endian f32 array it is.)
    match output.get("abliterate.layer_directions") {
        Some(gguf_abliterate::gguf::Value::ScalarArray(ty, bytes)) => {
            assert_eq!(*ty, gguf_abliterate::gguf::value_type::F32);
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(values, layers.concat());
        }
        other => panic!("abliterate.layer_directions: {other:?}"),
    }

    // One direction per layer, each n_embd long: anything else is refused.
    for (bad, needle) in [
        (
            vec![layers[0].clone()],
            "1 per-layer directions but the model has 2 layers",
        ),
        (
            vec![layers[0].clone(), vec![0.5; N_EMBD - 1]],
            "the direction of layer 1 has 255 values",
        ),
        (
            vec![layers[0].clone(), vec![0.0; N_EMBD]],
            "the direction of layer 1 is zero",
        ),
    ] {
        let opts = ApplyOptions {
            progress: false,
            layer_directions: bad,
            ..Default::default()
        };
        let bad_out = dir.path().join("bad.gguf");
        let err = apply(&inp, &bad_out, &r, &opts).unwrap_err();
        assert!(format!("{err:#}").contains(needle), "{err:#}");
        assert!(!bad_out.exists());
    }
    // Further directions of a subspace: n_embd long, finite, not zero.
    for (bad, needle) in [
        (vec![0.5; N_EMBD - 1], "further direction 1 has 255 values"),
        (vec![0.0; N_EMBD], "further direction 1 is zero"),
        (
            [vec![f32::NAN], vec![0.5; N_EMBD - 1]].concat(),
            "further direction 1 contains NaN",
        ),
    ] {
        let opts = ApplyOptions {
            progress: false,
            further_directions: vec![bad],
            ..Default::default()
        };
        let bad_out = dir.path().join("bad.gguf");
        let err = apply(&inp, &bad_out, &r, &opts).unwrap_err();
        assert!(format!("{err:#}").contains(needle), "{err:#}");
        assert!(!bad_out.exists());
    }
}
