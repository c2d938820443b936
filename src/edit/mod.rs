//! The math of the edit: remove a unit direction from everything a matrix
//! can write into the residual stream.
//!
//! ggml stores a weight `W` (PyTorch shape `[out, in]`) with `ne[0] = in`
//! contiguous, so each stored row is one *output* feature. Projecting `u`
//! out of the output side, `W' = W - s u (uᵀW)`, is therefore:
//! `v = Σ_i u_i row_i`, then `row_i -= s u_i v`.

mod params;
mod plan;
mod record;

pub use params::{Component, EditPoint, EditWeights, Kernel, MAX_WEIGHT};
pub use record::{EditRecord, RECORD_KEYS};

pub use plan::{
    check_supported, classify, plan_edits, plan_subspace_edits, post_norm_direction, writer_basis,
    EditKind, EditPlan, PlannedEdit, PostNorms, Projection, POST_NORM_ARCHS, SUPPORTED_ARCHS,
};

use rayon::prelude::*;

/// The vectors an edit removes: the refusal direction, per-layer
/// directions (empty: global scope, `direction` for every writer) and
/// further directions of a subspace (empty: the direction alone).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EditVectors {
    pub direction: Vec<f32>,
    pub layer_directions: Vec<Vec<f32>>,
    pub further_directions: Vec<Vec<f32>>,
}

impl EditVectors {
    /// Directions the edit removes from each writer.
    pub fn directions(&self) -> usize {
        1 + self.further_directions.len()
    }
}

/// Rows handled per rayon task.
const TASK_ROWS: usize = 64;

/// `e ← e − s (e·u) u` for each row (embedding rows, biases).
pub fn orthogonalize_rows(rows: &mut [f32], u: &[f32], scale: f32) {
    rows.par_chunks_mut(u.len() * TASK_ROWS)
        .for_each(|chunk| orthogonalize_rows_seq(chunk, u, scale));
}

/// `orthogonalize_rows` on the calling thread.
pub fn orthogonalize_rows_seq(rows: &mut [f32], u: &[f32], scale: f32) {
    for row in rows.chunks_exact_mut(u.len()) {
        let dot = dot(row, u) as f32 * scale;
        for (x, &ui) in row.iter_mut().zip(u) {
            *x -= dot * ui;
        }
    }
}

/// The factor that gives a vector its norm back after the projection
/// removed share `scale` of its component along a unit direction:
/// `‖w‖ / ‖w − s c u‖` with `‖w‖² = norm2` and `c = component`, so
/// `√(‖w‖² / (‖w‖² − (2s − s²) c²))`; 1 where that is undefined.
pub fn norm_restoring_factor(norm2: f64, component: f64, scale: f64) -> f64 {
    let after2 = norm2 - (2.0 * scale - scale * scale) * component * component;
    if after2 > 0.0 && norm2 > 0.0 {
        (norm2 / after2).sqrt()
    } else {
        1.0
    }
}

/// `acc += Σ_i u_i row_i` over consecutive rows of `n_in`, starting at `u[0]`.
pub fn accumulate_projection(rows: &[f32], n_in: usize, u: &[f32], acc: &mut [f64]) {
    for (row, &ui) in rows.chunks_exact(n_in).zip(u) {
        let ui = ui as f64;
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += ui * x as f64;
        }
    }
}

/// `row_i -= s u_i v` over consecutive rows of `v.len()`, starting at `u[0]`.
pub fn subtract_projection(rows: &mut [f32], n_in: usize, u: &[f32], v: &[f32], scale: f32) {
    for (row, &ui) in rows.chunks_exact_mut(n_in).zip(u) {
        let coef = scale * ui;
        for (x, &vj) in row.iter_mut().zip(v) {
            *x -= coef * vj;
        }
    }
}

/// `W ← W − s u (uᵀW)` on the output axis of each `[n_out rows × n_in]`
/// slab (one slab per expert for MoE tensors). `u.len()` is `n_out`.
pub fn orthogonalize_output(weights: &mut [f32], n_in: usize, u: &[f32], scale: f32) {
    let slab = n_in * u.len();
    for w in weights.chunks_exact_mut(slab) {
        let v = project_output(w, n_in, u);
        w.par_chunks_mut(n_in * TASK_ROWS)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (k, row) in chunk.chunks_exact_mut(n_in).enumerate() {
                    let coef = scale * u[task * TASK_ROWS + k];
                    for (x, &vj) in row.iter_mut().zip(&v) {
                        *x -= coef * vj as f32;
                    }
                }
            });
    }
}

/// `uᵀW` for one slab, accumulated in f64.
pub fn project_output(w: &[f32], n_in: usize, u: &[f32]) -> Vec<f64> {
    w.par_chunks(n_in * TASK_ROWS)
        .enumerate()
        .map(|(task, chunk)| {
            let mut acc = vec![0f64; n_in];
            for (k, row) in chunk.chunks_exact(n_in).enumerate() {
                let ui = u[task * TASK_ROWS + k] as f64;
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += ui * x as f64;
                }
            }
            acc
        })
        .reduce(
            || vec![0f64; n_in],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// The largest component along `u` that the tensor can write:
/// `max |uᵀW|` over inputs (output projections) or `max |e·u|` over rows.
pub fn max_component(kind: EditKind, values: &[f32], row_len: usize, u: &[f32]) -> f64 {
    match kind {
        EditKind::EmbeddingRows | EditKind::Bias => values
            .par_chunks(row_len)
            .map(|row| dot(row, u).abs())
            .reduce(|| 0.0, f64::max),
        EditKind::OutputProjection => values
            .chunks_exact(row_len * u.len())
            .flat_map(|w| project_output(w, row_len, u))
            .map(f64::abs)
            .fold(0.0, f64::max),
    }
}

/// f64-accumulated dot product.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    sum_pairs(a, b, |x, y| x * y)
}

/// `Σ f(a_i, b_i)` over paired elements, in f64. Eight independent partial
/// sums let the compiler vectorize what a single running sum would
/// serialize.
#[inline(always)]
pub fn sum_pairs(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += f(x[k] as f64, y[k] as f64);
        }
    }
    let tail: f64 = ra
        .iter()
        .zip(rb)
        .map(|(&x, &y)| f(x as f64, y as f64))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// `v / |v|`, or `None` for a zero or non-finite vector.
pub fn normalized(v: &[f32]) -> Option<Vec<f32>> {
    let norm = dot(v, v).sqrt();
    (norm.is_finite() && norm > 0.0).then(|| v.iter().map(|&x| (x as f64 / norm) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn output_projection_removes_the_direction_from_every_output() {
        let (n_out, n_in) = (200, 90); // n_out not a multiple of TASK_ROWS
        let mut w = pseudo_random(n_out * n_in, 1);
        let u = normalized(&pseudo_random(n_out, 2)).unwrap();
        let x = pseudo_random(n_in, 3);
        orthogonalize_output(&mut w, n_in, &u, 1.0);
        // y = W x, with rows as outputs; uᵀy must vanish for any x.
        let y: Vec<f32> = w.chunks(n_in).map(|row| dot(row, &x) as f32).collect();
        assert!(dot(&y, &u).abs() < 1e-4, "{}", dot(&y, &u));
        assert!(max_component(EditKind::OutputProjection, &w, n_in, &u) < 1e-5);
    }

    #[test]
    fn partial_scale_keeps_that_share_of_the_component() {
        let (n_out, n_in) = (64, 16);
        let w0 = pseudo_random(n_out * n_in, 4);
        let u = normalized(&pseudo_random(n_out, 5)).unwrap();
        let mut w = w0.clone();
        orthogonalize_output(&mut w, n_in, &u, 0.25);
        let before = project_output(&w0, n_in, &u);
        let after = project_output(&w, n_in, &u);
        for (b, a) in before.iter().zip(&after) {
            assert!((a - 0.75 * b).abs() < 1e-5);
        }
    }

    #[test]
    fn experts_are_edited_independently() {
        let (n_out, n_in, n_exp) = (32, 8, 3);
        let mut w = pseudo_random(n_out * n_in * n_exp, 6);
        let u = normalized(&pseudo_random(n_out, 7)).unwrap();
        orthogonalize_output(&mut w, n_in, &u, 1.0);
        for slab in w.chunks(n_out * n_in) {
            assert!(project_output(slab, n_in, &u)
                .iter()
                .all(|c| c.abs() < 1e-5));
        }
    }

    #[test]
    fn rows_lose_only_their_component_along_u() {
        let n = 48;
        let mut rows = pseudo_random(n * 10, 8);
        let orig = rows.clone();
        let u = normalized(&pseudo_random(n, 9)).unwrap();
        orthogonalize_rows(&mut rows, &u, 1.0);
        for (r, o) in rows.chunks(n).zip(orig.chunks(n)) {
            assert!(dot(r, &u).abs() < 1e-5);
            let removed: Vec<f32> = o.iter().zip(r).map(|(a, b)| a - b).collect();
            // What was removed is parallel to u.
            let along = dot(&removed, &u);
            assert!((dot(&removed, &removed) - along * along).abs() < 1e-6);
        }
    }

    #[test]
    fn normalizing_rejects_zero_and_nan() {
        assert!(normalized(&[0.0, 0.0]).is_none());
        assert!(normalized(&[f32::NAN, 1.0]).is_none());
        let u = normalized(&[3.0, 4.0]).unwrap();
        assert!((u[0] - 0.6).abs() < 1e-7 && (u[1] - 0.8).abs() < 1e-7);
    }
}
