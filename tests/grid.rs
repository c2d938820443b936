//! Grid-aware projection (issue 7): the file itself, read back through
//! ggml's dequantizer, has lost the requested share of the component along
//! each tensor's direction, at little more quantization error than plain
//! requantization, on 8-bit, 4-bit and K-quant models; and along every
//! direction of a 2-dimensional subspace (issue 26).

use crate::common::*;
use gguf_abliterate::apply::{apply, ApplyOptions};
use gguf_abliterate::edit::{self, EditKind, EditWeights};
use gguf_abliterate::gguf::{self, GgufFile};
use gguf_abliterate::quant;
use std::path::Path;

/// Per tensor: (name, type, kept ‖uᵀV‖/‖uᵀW‖ for the basis direction
/// that kept most, error ‖V − X‖ / ‖Q(X) − X‖) with X the ideal f32 edit
/// and Q plain requantization.
fn measure(
    input: &Path,
    output: &Path,
    r: &[f32],
    further: &[Vec<f32>],
    scale: f32,
) -> Vec<(String, String, f64, f64)> {
    let shards = gguf::open_model(input).unwrap();
    let plan =
        edit::plan_subspace_edits(&shards, r, &[], further, &EditWeights::default()).unwrap();
    let (inp, out) = (
        GgufFile::open(input).unwrap(),
        GgufFile::open(output).unwrap(),
    );
    plan.edits
        .iter()
        .map(|e| {
            let (ti, to) = (inp.tensor(&e.name).unwrap(), out.tensor(&e.name).unwrap());
            assert_eq!(ti.ty, to.ty, "{}: type kept", e.name);
            let n = ti.row_len() as usize;
            let w = quant::dequantize(ti.ty, inp.tensor_data(ti), n).unwrap();
            let v = quant::dequantize(to.ty, out.tensor_data(to), n).unwrap();
            assert_eq!(e.basis.len(), 1 + further.len(), "{}", e.name);
            let mut ideal = w.clone();
            // The component along u: per input column (output projections)
            // or per row (embedding rows).
            let component = |x: &[f32], u: &[f32]| -> Vec<f64> {
                match e.kind {
                    EditKind::OutputProjection => edit::project_output(x, n, u),
                    _ => x.chunks(n).map(|row| edit::dot(row, u)).collect(),
                }
            };
            // Over an orthonormal basis, one direction after the other is
            // the subspace's projection.
            for u in e.basis.iter() {
                match e.kind {
                    EditKind::OutputProjection => {
                        edit::orthogonalize_output(&mut ideal, n, u, scale)
                    }
                    _ => edit::orthogonalize_rows(&mut ideal, u, scale),
                }
            }
            let plain =
                quant::dequantize(ti.ty, &quant::quantize(ti.ty, &ideal, n, None).unwrap(), n)
                    .unwrap();
            let norm = |c: Vec<f64>| c.iter().map(|x| x * x).sum::<f64>().sqrt();
            let dist = |a: &[f32]| {
                a.iter()
                    .zip(&ideal)
                    .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            };
            let kept = e
                .basis
                .iter()
                .map(|u| norm(component(&v, u)) / norm(component(&w, u)))
                .fold(0f64, f64::max);
            (e.name.clone(), ti.ty.name(), kept, dist(&v) / dist(&plain))
        })
        .collect()
}

fn n_embd(model: &Path) -> usize {
    GgufFile::open(model)
        .unwrap()
        .tensor("token_embd.weight")
        .unwrap()
        .dims[0] as usize
}

fn run(model: &Path, scale: f32, exact_grid: bool) -> Vec<(String, String, f64, f64)> {
    run_subspace(model, &[], scale, exact_grid)
}

/// Applies a random direction and `further` ones, and measures the file.
fn run_subspace(
    model: &Path,
    further: &[Vec<f32>],
    scale: f32,
    exact_grid: bool,
) -> Vec<(String, String, f64, f64)> {
    let r = unit(&noise(n_embd(model), 11));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let opts = ApplyOptions {
        scale,
        exact_grid,
        progress: false,
        further_directions: further.to_vec(),
        ..Default::default()
    };
    apply(model, &out, &r, &opts).unwrap();
    measure(model, &out, &r, further, scale)
}

/// A random 2-dimensional subspace: every direction of every tensor's
/// basis keeps at most 0.05 of its component, at an error at most 1.3×
/// plain requantization's. The further direction is random, not
/// orthogonal to r: the plan orthonormalizes it.
fn check_subspace(model: &Path) {
    let name = model.file_name().unwrap().to_string_lossy().into_owned();
    let further = vec![noise(n_embd(model), 12)];
    let rows = run_subspace(model, &further, 1.0, true);
    for (name, ty, kept, error) in &rows {
        assert!(
            kept <= &0.05,
            "{name} ({ty}): kept {kept:.3} of a subspace direction's component"
        );
        assert!(
            error <= &1.3,
            "{name} ({ty}): error x{error:.2} of plain requantization"
        );
    }
    let worst = rows
        .iter()
        .fold((0f64, 0f64), |(k, e), r| (k.max(r.2), e.max(r.3)));
    eprintln!(
        "{name}, 2-dimensional subspace: kept at most {:.3} along any direction, error at most x{:.2}",
        worst.0, worst.1
    );
}

/// Checks every tensor and prints the extremes, against the single pass.
fn check(model: &Path) {
    let name = model.file_name().unwrap().to_string_lossy().into_owned();
    let worst = |rows: &[(String, String, f64, f64)]| {
        rows.iter()
            .fold((0f64, 0f64), |(k, e), r| (k.max(r.2), e.max(r.3)))
    };
    let single = run(model, 1.0, false);
    let exact = run(model, 1.0, true);
    for (name, ty, kept, error) in &exact {
        assert!(
            kept <= &0.05,
            "{name} ({ty}): kept {kept:.3} of the component"
        );
        assert!(
            error <= &1.25,
            "{name} ({ty}): error x{error:.2} of plain requantization"
        );
    }
    let half = run(model, 0.5, true);
    for (name, ty, kept, _) in &half {
        assert!(
            (kept - 0.5).abs() <= 0.05,
            "{name} ({ty}): kept {kept:.3} at scale 0.5"
        );
    }
    let (s, e, h) = (worst(&single), worst(&exact), worst(&half));
    eprintln!(
        "{name}: component kept at most {:.3} (single pass {:.3}), error at most x{:.2}; scale 0.5 keeps {:.3}..{:.3}",
        e.0,
        s.0,
        e.1,
        half.iter().map(|r| r.2).fold(1.0, f64::min),
        h.0
    );
}

#[test]
fn the_q8_0_fixture_loses_the_component_in_the_file() {
    let _cores = all_cores();
    check(&require_model!(fixture));
}

#[test]
fn smollm2_q4_1_loses_the_component_in_the_file() {
    let _cores = all_cores();
    check(&require_model!(SMOLLM2_Q4_1));
}

#[test]
fn gemma3_q4_k_m_loses_the_component_in_the_file() {
    let _cores = all_cores();
    check(&require_model!(GEMMA3_270M));
}

#[test]
fn smollm2_q4_1_loses_a_2_dimensional_subspace_in_the_file() {
    let _cores = all_cores();
    check_subspace(&require_model!(SMOLLM2_Q4_1));
}

#[test]
fn gemma3_q4_k_m_loses_a_2_dimensional_subspace_in_the_file() {
    let _cores = all_cores();
    check_subspace(&require_model!(GEMMA3_270M));
}
