//! The streaming tensor rewrite: dequantize → orthogonalize → requantize,
//! chunk by chunk of rows on rayon's pool. No f32 copy of the whole tensor
//! is ever held: output projections take passes over the quantized input
//! (first `v = uᵀW`, then `row_i -= s u_i v`).
//!
//! On coarse grids (4–5 bits) most of the edit rounds back to the original
//! values, so the file would keep much of the component it should lose.
//! Grid-aware projection measures the component the *quantized* result
//! still has, `uᵀV` as ggml dequantizes it, and removes the rest:
//! - for the formats `quant::codes` can edit (Q4_0…Q8_0, Q4_K, Q5_K, Q6_K),
//!   by moving single element codes, cheapest first (`flips`);
//! - for the others, by pushing the remainder `e` back into the rows with
//!   the largest `|u_i|` and quantizing them again (`X ← X − w eᵀ`), keeping
//!   a row's new quantization only where it helps.

mod flips;

use crate::edit::{self, EditKind};
use crate::ffi::{self, GgmlType};
use crate::quant::codes;
use anyhow::{Context, Result};
use rayon::prelude::*;

/// Rows per parallel task.
fn task_rows(row_len: usize) -> usize {
    (32_768 / row_len.max(1)).max(1)
}

/// Residual component (as a share of the original) at which grid-aware
/// projection stops: well inside the 0.05 the tests allow.
pub const GRID_TOLERANCE: f64 = 0.02;
/// The bound on `‖uᵀV − (1 − s) uᵀW‖ / ‖uᵀW‖` that code moves settle to.
/// Just inside the 0.05 promised: every move past the bound costs
/// quantization error (docs/figures.md has what tighter bounds cost).
pub const FLIP_TOLERANCE: f64 = 0.045;
/// Quantization passes at most for formats without code edits, the plain
/// one included: bounds the cost.
pub const MAX_PASSES: u32 = 5;

/// One tensor's edit.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub kind: EditKind,
    /// Orthonormal directions on the tensor's residual axis (one or more):
    /// the edit removes the share `scale` of the subspace they span.
    pub basis: &'a [Vec<f32>],
    /// Share of the component to remove.
    pub scale: f32,
    /// Column importances for the quantizer, `row_len` per matrix (expert).
    pub importance: Option<&'a [f32]>,
    /// Iterate until the quantized result holds the requested component.
    pub exact_grid: bool,
    /// Give every write vector its norm back after the projection: each
    /// input column of an output projection, each embedding row.
    pub preserve_norms: bool,
}

pub struct Rewritten {
    pub bytes: Vec<u8>,
    /// Largest component along a basis direction the tensor can write,
    /// before and after.
    pub max_before: f64,
    pub max_after: f64,
    /// `‖uᵀV‖ / ‖uᵀW‖` for the basis direction that kept most, with `V` as
    /// ggml dequantizes the written bytes: `1 − scale` when the edit
    /// survived quantization exactly.
    pub kept: f64,
    /// Error against the ideal f32 edit, relative to plain requantization's
    /// (1 for plain requantization itself).
    pub error_ratio: f64,
    /// Quantization passes (1 = plain requantization).
    pub passes: u32,
    /// Element codes moved by one step after the plain pass.
    pub moves: u64,
    /// NaN or Inf values ggml reads back from the written bytes (a poisoned
    /// input tensor or post-norm weight, an overflow): must be 0.
    pub non_finite: u64,
}

/// Sums over a tensor, combined across matrices (experts).
#[derive(Default)]
struct Stats {
    max_before: f64,
    max_after: f64,
    /// `‖uᵀW‖²`, `‖uᵀV‖²`, per basis direction.
    before2: Vec<f64>,
    after2: Vec<f64>,
    /// `‖V − X‖²` now and after the plain pass.
    error2: f64,
    plain_error2: f64,
    passes: u32,
    moves: u64,
}

impl Stats {
    fn merge(mut self, o: Stats) -> Stats {
        self.max_before = self.max_before.max(o.max_before);
        self.max_after = self.max_after.max(o.max_after);
        add_into(&mut self.before2, &o.before2);
        add_into(&mut self.after2, &o.after2);
        self.error2 += o.error2;
        self.plain_error2 += o.plain_error2;
        self.passes = self.passes.max(o.passes);
        self.moves += o.moves;
        self
    }
}

/// Rewrites one tensor's data. `row_len` is its contiguous axis; `req.basis`
/// the directions on its residual axis.
pub fn rewrite(ty: GgmlType, data: &[u8], row_len: usize, req: &Request) -> Result<Rewritten> {
    let row_bytes = ty
        .row_bytes(row_len as u64)
        .context("row is not whole blocks")? as usize;
    let job = Job {
        ty,
        row_len,
        row_bytes,
        req,
        // F32 is exact already.
        iterate: req.exact_grid && ty != GgmlType::F32,
        codes: codes::supports(ty),
        task: task_rows(row_len) * row_bytes,
        non_finite: Default::default(),
    };
    let mut out = vec![0u8; data.len()];
    let stats = match req.kind {
        EditKind::EmbeddingRows | EditKind::Bias => job.rows(data, &mut out, req.importance)?,
        EditKind::OutputProjection => {
            // One slab per expert (a single slab for dense tensors), each
            // with its own row of importances.
            let slab = row_bytes * req.basis[0].len();
            let mut stats = Stats::default();
            for (k, (src, dst)) in data.chunks(slab).zip(out.chunks_mut(slab)).enumerate() {
                let importance = req
                    .importance
                    .map(|imp| &imp[k * row_len..(k + 1) * row_len]);
                stats = stats.merge(job.output_slab(src, dst, importance)?);
            }
            stats
        }
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { (a / b).sqrt() } else { 1.0 };
    let kept = stats
        .after2
        .iter()
        .zip(&stats.before2)
        .map(|(&a, &b)| ratio(a, b))
        .fold(0f64, f64::max);
    Ok(Rewritten {
        bytes: out,
        max_before: stats.max_before,
        max_after: stats.max_after,
        kept,
        error_ratio: ratio(stats.error2, stats.plain_error2),
        passes: stats.passes,
        moves: stats.moves,
        non_finite: job.non_finite.into_inner(),
    })
}

/// One tensor's rewrite parameters.
struct Job<'a> {
    ty: GgmlType,
    row_len: usize,
    row_bytes: usize,
    req: &'a Request<'a>,
    iterate: bool,
    /// Single element codes can be edited (`quant::codes`).
    codes: bool,
    /// Bytes of quantized rows per parallel task.
    task: usize,
    /// Non-finite values seen in anything written, as ggml reads it back.
    non_finite: std::sync::atomic::AtomicU64,
}

/// `‖a − b‖²` in f64.
fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    edit::sum_pairs(a, b, |x, y| (x - y) * (x - y))
}

impl Job<'_> {
    fn dequantize(&self, src: &[u8]) -> Result<Vec<f32>> {
        let mut values = vec![0f32; src.len() / self.row_bytes * self.row_len];
        ffi::dequantize_rows(self.ty, src, &mut values)?;
        Ok(values)
    }

    /// Quantizes `x` into `dst` and writes what ggml will read back into `v`.
    fn quantize(
        &self,
        x: &[f32],
        dst: &mut [u8],
        v: &mut [f32],
        imp: Option<&[f32]>,
    ) -> Result<()> {
        ffi::quantize_rows(self.ty, x, dst, self.row_len, imp)?;
        ffi::dequantize_rows(self.ty, dst, v)?;
        self.count_non_finite(v);
        Ok(())
    }

    /// Every value ggml reads back from written bytes passes through here
    /// (or is counted by `settle_columns` and added).
    fn count_non_finite(&self, values: &[f32]) {
        self.add_non_finite(values.iter().filter(|x| !x.is_finite()).count() as u64);
    }

    fn add_non_finite(&self, count: u64) {
        if count > 0 {
            self.non_finite
                .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Row-local edit: each row is a residual vector. The bound is on the
    /// whole tensor's component, so it is kept per chunk of rows: after the
    /// plain pass, the rows that miss most are settled until the chunk's
    /// miss is within its share (often none: 8-bit rows rarely need it).
    /// With several basis directions each is settled in turn, for a few
    /// rounds, as a move for one shifts the others a little.
    fn rows(&self, src: &[u8], dst: &mut [u8], imp: Option<&[f32]>) -> Result<Stats> {
        let basis = self.req.basis;
        let s = self.req.scale as f64;
        let n = self.row_len;
        dst.par_chunks_mut(self.task)
            .zip(src.par_chunks(self.task))
            .map(|(dst, src)| -> Result<Stats> {
                let w = self.dequantize(src)?;
                let n_rows = w.len() / n;
                let mut ideal = w.clone();
                for u in basis {
                    edit::orthogonalize_rows_seq(&mut ideal, u, s as f32);
                }
                // [direction][row]
                let components = |values: &[f32], u: &[f32]| -> Vec<f64> {
                    values.chunks_exact(n).map(|r| edit::dot(r, u)).collect()
                };
                let before: Vec<Vec<f64>> = basis.iter().map(|u| components(&w, u)).collect();
                let mut target: Vec<Vec<f64>> = before
                    .iter()
                    .map(|b| b.iter().map(|b| (1.0 - s) * b).collect())
                    .collect();
                if self.req.preserve_norms {
                    for (r, (x, w)) in ideal.chunks_exact_mut(n).zip(w.chunks_exact(n)).enumerate()
                    {
                        let c = magnitude(before.iter().map(|b| b[r]));
                        let norm = edit::norm_restoring_factor(edit::dot(w, w), c, s);
                        x.iter_mut().for_each(|x| *x *= norm as f32);
                        target.iter_mut().for_each(|t| t[r] *= norm);
                    }
                }
                let mut values = vec![0f32; w.len()];
                self.quantize(&ideal, dst, &mut values, imp)?;
                let mut after: Vec<Vec<f64>> =
                    basis.iter().map(|u| components(&values, u)).collect();
                let plain: Vec<f64> = values
                    .chunks_exact(n)
                    .zip(ideal.chunks_exact(n))
                    .map(|(v, x)| sq_dist(v, x))
                    .collect();
                // Each row's error as written: only settled rows change.
                let mut errors = plain.clone();
                let before2: Vec<f64> = before
                    .iter()
                    .map(|b| b.iter().map(|b| b * b).sum())
                    .collect();
                // A row whose own component is tiny need not be matched more
                // closely than a typical row.
                let typical2: Vec<f64> =
                    before2.iter().map(|b2| b2 / n_rows.max(1) as f64).collect();
                let mut passes = 1;
                let mut moves = 0;
                if self.iterate && self.codes {
                    moves = self.settle_rows(
                        dst,
                        &mut values,
                        &ideal,
                        (&before, &target, &mut after),
                        &mut errors,
                        (&before2, &typical2),
                        imp,
                    )?;
                } else if self.iterate {
                    passes = self.requantize_rows(
                        dst,
                        &mut values,
                        &ideal,
                        &before,
                        &target,
                        &mut after,
                        &typical2,
                        imp,
                    )?;
                }
                let plain_error2: f64 = plain.iter().sum();
                let error2: f64 = if passes == 1 {
                    errors.iter().sum()
                } else {
                    values
                        .chunks_exact(n)
                        .zip(ideal.chunks_exact(n))
                        .map(|(v, x)| sq_dist(v, x))
                        .sum()
                };
                let max_abs = |v: &[Vec<f64>]| v.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
                Ok(Stats {
                    max_before: max_abs(&before),
                    max_after: max_abs(&after),
                    before2,
                    after2: after
                        .iter()
                        .map(|a| a.iter().map(|a| a * a).sum())
                        .collect(),
                    error2,
                    plain_error2,
                    passes,
                    moves,
                })
            })
            .try_reduce(Stats::default, |a, b| Ok(a.merge(b)))
    }

    /// Settles a chunk of rows by code moves: for each basis direction in
    /// turn, the rows that miss most first, until the chunk's miss along it
    /// is within its share of the bound. Returns the codes moved.
    #[allow(clippy::too_many_arguments)]
    fn settle_rows(
        &self,
        dst: &mut [u8],
        values: &mut [f32],
        ideal: &[f32],
        (before, target, after): Components,
        errors: &mut [f64],
        (before2, typical2): (&[f64], &[f64]),
        imp: Option<&[f32]>,
    ) -> Result<u64> {
        let basis = self.req.basis;
        let k = basis.len();
        let n = self.row_len;
        let n_rows = values.len() / n;
        let mut moves = 0;
        let mut scratch = flips::RowScratch::default();
        for a in rounds(k) {
            let u = &basis[a];
            let miss2 = |after: &[f64]| -> f64 {
                after
                    .iter()
                    .zip(&target[a])
                    .map(|(a, t)| (a - t).powi(2))
                    .sum()
            };
            let bound2 = FLIP_TOLERANCE.powi(2) * before2[a];
            let mut order: Vec<usize> = (0..n_rows).collect();
            order.sort_by(|&x, &y| {
                (after[a][y] - target[a][y])
                    .abs()
                    .total_cmp(&(after[a][x] - target[a][x]).abs())
            });
            for r in order {
                if miss2(&after[a]) <= bound2 {
                    break;
                }
                // Within its share of the bound: these squared
                // sum to FLIP_TOLERANCE² ‖Wu‖² over the chunk.
                let share = ((before[a][r].powi(2) + typical2[a]) / 2.0).sqrt();
                let span = r * n..(r + 1) * n;
                let row = &mut dst[r * self.row_bytes..(r + 1) * self.row_bytes];
                let cross: Vec<(&[f32], f64)> = (0..k)
                    .filter(|&o| o != a)
                    .map(|o| (basis[o].as_slice(), after[o][r] - target[o][r]))
                    .collect();
                let moved = flips::settle_row(
                    self.ty,
                    row,
                    &values[span.clone()],
                    &ideal[span.clone()],
                    u,
                    (after[a][r], target[a][r]),
                    FLIP_TOLERANCE * share,
                    imp,
                    &cross,
                    &mut scratch,
                );
                if moved == 0 {
                    // Unchanged bytes: values, after and errors hold.
                    continue;
                }
                moves += moved;
                ffi::dequantize_rows(self.ty, row, &mut values[span.clone()])?;
                self.count_non_finite(&values[span.clone()]);
                for (after, u) in after.iter_mut().zip(basis) {
                    after[r] = edit::dot(&values[span.clone()], u);
                }
                errors[r] = sq_dist(&values[span.clone()], &ideal[span]);
            }
        }
        Ok(moves)
    }

    /// Requantizes each row of a chunk with what it kept along the basis
    /// pushed back in, while that helps. Returns the most passes a row took.
    #[allow(clippy::too_many_arguments)]
    fn requantize_rows(
        &self,
        dst: &mut [u8],
        values: &mut [f32],
        ideal: &[f32],
        before: &[Vec<f64>],
        target: &[Vec<f64>],
        after: &mut [Vec<f64>],
        typical2: &[f64],
        imp: Option<&[f32]>,
    ) -> Result<u32> {
        let basis = self.req.basis;
        let k = basis.len();
        let n = self.row_len;
        let n_rows = values.len() / n;
        let mut passes = 1;
        // Requantize each row with what it kept pushed back in.
        let mut x = vec![0f32; n];
        for r in 0..n_rows {
            let span = r * n..(r + 1) * n;
            let row = &mut dst[r * self.row_bytes..(r + 1) * self.row_bytes];
            let tolerance: Vec<f64> = (0..k)
                .map(|a| GRID_TOLERANCE * before[a][r].abs().max(typical2[a].sqrt()))
                .collect();
            let misses = |after: &[Vec<f64>]| -> Vec<f64> {
                (0..k).map(|a| after[a][r] - target[a][r]).collect()
            };
            let outside = |miss: &[f64]| miss.iter().zip(&tolerance).any(|(m, t)| m.abs() > *t);
            x.copy_from_slice(&ideal[span.clone()]);
            let mut row_passes = 1;
            while row_passes < MAX_PASSES && outside(&misses(after)) {
                let miss = misses(after);
                for (u, &m) in basis.iter().zip(&miss) {
                    for (xi, &ui) in x.iter_mut().zip(u) {
                        *xi -= (m * ui as f64) as f32;
                    }
                }
                self.quantize(&x, row, &mut values[span.clone()], imp)?;
                row_passes += 1;
                for (after, u) in after.iter_mut().zip(basis) {
                    after[r] = edit::dot(&values[span.clone()], u);
                }
                let stalled =
                    magnitude(misses(after).into_iter()) > 0.9 * magnitude(miss.into_iter());
                if stalled {
                    break;
                }
            }
            passes = passes.max(row_passes);
        }
        Ok(passes)
    }

    /// Pass 1 of `output_slab`: the slab in f32, dequantized once for
    /// every later pass (within the memory target: the largest edited
    /// tensor in f32), and the sums `v_a = u_aᵀW` for each direction, then
    /// each column's squared norm when norms are preserved (the last n).
    fn slab_projections(&self, src: &[u8]) -> Result<(Vec<f32>, Vec<f64>)> {
        let rows = self.task / self.row_bytes;
        let n = self.row_len;
        let basis = self.req.basis;
        let k = basis.len();
        let preserve = self.req.preserve_norms;
        let width = if preserve { (k + 1) * n } else { k * n };
        let mut weights_f32 = vec![0f32; src.len() / self.row_bytes * n];
        let sums = sum_vectors(
            width,
            src.par_chunks(self.task)
                .zip(weights_f32.par_chunks_mut(rows * n))
                .enumerate()
                .map(|(task, (src, w))| -> Result<Vec<f64>> {
                    ffi::dequantize_rows(self.ty, src, w)?;
                    let w = &*w;
                    let mut acc = vec![0f64; width];
                    for (u, acc) in basis.iter().zip(acc.chunks_exact_mut(n)) {
                        edit::accumulate_projection(w, n, &u[task * rows..], acc);
                    }
                    if preserve {
                        for row in w.chunks_exact(n) {
                            for (a, &x) in acc[k * n..].iter_mut().zip(row) {
                                *a += x as f64 * x as f64;
                            }
                        }
                    }
                    Ok(acc)
                })
                .collect::<Result<Vec<_>>>()?,
        );
        Ok((weights_f32, sums))
    }

    /// Output-side edit of one `[u.len() rows × row_len]` slab.
    fn output_slab(&self, src: &[u8], dst: &mut [u8], imp: Option<&[f32]>) -> Result<Stats> {
        let n = self.row_len;
        let basis = self.req.basis;
        let k = basis.len();
        let s = self.req.scale;
        let max_abs = |v: &[Vec<f64>]| v.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
        let norm2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        let (weights_f32, sums) = self.slab_projections(src)?;
        let v: Vec<Vec<f64>> = sums[..k * n].chunks_exact(n).map(<[f64]>::to_vec).collect();
        // `norm` gives each column its norm back.
        let norm: Vec<f32> = (0..n)
            .map(|j| match self.req.preserve_norms {
                true => {
                    let c = magnitude(v.iter().map(|v| v[j]));
                    edit::norm_restoring_factor(sums[k * n + j], c, s as f64) as f32
                }
                false => 1.0,
            })
            .collect();
        let v32: Vec<Vec<f32>> = v
            .iter()
            .map(|v| v.iter().map(|&x| x as f32).collect())
            .collect();
        let target: Vec<Vec<f64>> = v
            .iter()
            .map(|v| {
                v.iter()
                    .zip(&norm)
                    .map(|(x, &f)| (1.0 - s as f64) * x * f as f64)
                    .collect()
            })
            .collect();
        let v_norm: Vec<f64> = v.iter().map(|v| norm2(v).sqrt()).collect();
        // Pass 2: the plain edit, X = (W − s Σ u vᵀ) diag(norm), requantized.
        let mut row_error = vec![0f64; basis[0].len()];
        let no_correction = vec![vec![0f32; n]; k];
        let mut after = self.output_pass(
            &weights_f32,
            dst,
            (&v32, &norm),
            &no_correction,
            basis,
            &mut row_error,
            None,
            imp,
        )?;
        let plain_error2: f64 = row_error.iter().sum();
        let mut passes = 1;
        // Further passes push what the grid kept, e = uᵀV − (1 − s) uᵀW,
        // back into the rows: X ← X − u eᵀ (accumulated in `correction`).
        let misses = |after: &[Vec<f64>]| -> Vec<f64> {
            after
                .iter()
                .zip(&target)
                .map(|(a, t)| {
                    norm2(&a.iter().zip(t).map(|(a, t)| a - t).collect::<Vec<_>>()).sqrt()
                })
                .collect()
        };
        let outside = |after: &[Vec<f64>], tolerance: f64| {
            misses(after)
                .iter()
                .zip(&v_norm)
                .any(|(m, v)| *m > tolerance * v)
        };
        let mut moves = 0;
        let mut error2: f64 = row_error.iter().sum();
        if self.iterate && self.codes && outside(&after, FLIP_TOLERANCE) {
            // Every column within its share of the bound, so that the
            // whole miss is within it too; no closer, as each further move
            // adds quantization error.
            let per_column: Vec<f64> = v_norm
                .iter()
                .map(|v| FLIP_TOLERANCE * v / (n as f64).sqrt())
                .collect();
            let settled = flips::settle_columns(
                self.ty,
                &weights_f32,
                dst,
                n,
                basis,
                s,
                &v32,
                &norm,
                &target,
                &per_column,
            )?;
            self.add_non_finite(settled.non_finite);
            (after, moves, error2) = (settled.after, settled.moves, settled.error2);
        }
        // Only the rows with the largest |u_i| are requantized again: they
        // move uᵀV the most per flipped rounding, and the others would
        // mostly round back. Their share of the correction is scaled up so
        // that Σ u_i w_i = 1.
        let weights: Vec<Vec<f32>> = basis
            .iter()
            .map(|u| correction_weights(u, SUBSET_MASS))
            .collect();
        let mut correction = vec![vec![0f64; n]; k];
        let mut missed = magnitude(misses(&after).into_iter());
        while self.iterate && !self.codes && passes < MAX_PASSES && outside(&after, GRID_TOLERANCE)
        {
            let current: Vec<Vec<f64>> = after
                .iter()
                .zip(&target)
                .map(|(a, t)| a.iter().zip(t).map(|(a, t)| a - t).collect())
                .collect();
            for (c, e) in correction.iter_mut().zip(&current) {
                c.iter_mut().zip(e).for_each(|(c, e)| *c += e);
            }
            let c32: Vec<Vec<f32>> = correction
                .iter()
                .map(|c| c.iter().map(|&x| x as f32).collect())
                .collect();
            let delta = self.output_pass(
                &weights_f32,
                dst,
                (&v32, &norm),
                &c32,
                &weights,
                &mut row_error,
                Some(&current),
                imp,
            )?;
            for (a, d) in after.iter_mut().zip(&delta) {
                a.iter_mut().zip(d).for_each(|(a, d)| *a += d);
            }
            error2 = row_error.iter().sum();
            passes += 1;
            let next = magnitude(misses(&after).into_iter());
            let stalled = next > 0.9 * missed;
            missed = next;
            if stalled {
                break;
            }
        }
        Ok(Stats {
            max_before: max_abs(&v),
            max_after: max_abs(&after),
            before2: v.iter().map(|v| norm2(v)).collect(),
            after2: after.iter().map(|a| norm2(a)).collect(),
            error2,
            plain_error2,
            passes,
            moves,
        })
    }

    /// Requantizes the rows as `W_i − s Σ_a u_ai v_a − Σ_a w_ai c_a` and
    /// returns each direction's `u_aᵀV` (`miss` is None: the plain pass,
    /// every row, with `weights` unused) or its change since the last pass
    /// (only rows with some `w_ai ≠ 0`). A later pass keeps a row's new
    /// quantization only if it brings `uᵀV` closer to the target, given the
    /// current `miss`: on grids whose quantizer re-chooses its scales (the
    /// K-quants), many rows come back with fresh rounding noise instead of
    /// the requested shift. `row_error` receives each row's squared
    /// distance to the ideal edit `W_i − s Σ_a u_ai v_a`.
    #[allow(clippy::too_many_arguments)]
    fn output_pass(
        &self,
        weights_f32: &[f32],
        dst: &mut [u8],
        (v, norm): (&[Vec<f32>], &[f32]),
        correction: &[Vec<f32>],
        weights: &[Vec<f32>],
        row_error: &mut [f64],
        miss: Option<&[Vec<f64>]>,
        imp: Option<&[f32]>,
    ) -> Result<Vec<Vec<f64>>> {
        let rows = self.task / self.row_bytes;
        let n = self.row_len;
        let s = self.req.scale;
        let basis = self.req.basis;
        let k = basis.len();
        let first = miss.is_none();
        let parts = dst
            .par_chunks_mut(self.task)
            .zip(weights_f32.par_chunks(rows * n))
            .zip(row_error.par_chunks_mut(rows))
            .enumerate()
            .map(|(task, ((dst, w), row_error))| -> Result<Vec<f64>> {
                let start = task * rows;
                let n_rows = w.len() / n;
                let corrected = |i: usize| weights.iter().any(|w| w[start + i] != 0.0);
                if !first && !(0..n_rows).any(corrected) {
                    return Ok(vec![0f64; k * n]);
                }
                let old = if first {
                    None
                } else {
                    Some(self.dequantize(dst)?)
                };
                let mut ideal = vec![0f32; n];
                let mut x = vec![0f32; n];
                let mut back = vec![0f32; n];
                let mut change = vec![0f64; k * n];
                let mut old_bytes = vec![0u8; self.row_bytes];
                let mut acc = vec![0f64; k * n];
                for (r, (w, dst)) in w
                    .chunks_exact(n)
                    .zip(dst.chunks_exact_mut(self.row_bytes))
                    .enumerate()
                {
                    let i = start + r;
                    if !first && !corrected(r) {
                        continue;
                    }
                    for (j, (id, xi)) in ideal.iter_mut().zip(&mut x).enumerate() {
                        let mut e = w[j] - s * basis[0][i] * v[0][j];
                        for a in 1..k {
                            e -= s * basis[a][i] * v[a][j];
                        }
                        *id = e * norm[j];
                        let mut c = *id - weights[0][i] * correction[0][j];
                        for a in 1..k {
                            c -= weights[a][i] * correction[a][j];
                        }
                        *xi = c;
                    }
                    let Some(old) = old.as_ref().map(|o| &o[r * n..(r + 1) * n]) else {
                        // The plain pass: every row is kept as quantized, so
                        // nothing needs a copy to restore.
                        self.quantize(&x, dst, &mut back, imp)?;
                        row_error[r] = sq_dist(&back, &ideal);
                        for (u, acc) in basis.iter().zip(acc.chunks_exact_mut(n)) {
                            let ui64 = u[i] as f64;
                            acc.iter_mut()
                                .zip(&back)
                                .for_each(|(a, &b)| *a += ui64 * b as f64);
                        }
                        continue;
                    };
                    old_bytes.copy_from_slice(dst);
                    self.quantize(&x, dst, &mut back, imp)?;
                    for (u, change) in basis.iter().zip(change.chunks_exact_mut(n)) {
                        let ui64 = u[i] as f64;
                        for ((c, &b), &o) in change.iter_mut().zip(&back).zip(old) {
                            *c = ui64 * (b as f64 - o as f64);
                        }
                    }
                    if let Some(miss) = miss {
                        let miss = miss.iter().flatten();
                        // ‖e + d‖² < ‖e‖²  ⇔  2⟨e, d⟩ + ‖d‖² < 0.
                        let growth: f64 = change
                            .iter()
                            .zip(miss.clone())
                            .map(|(d, e)| 2.0 * e * d + d * d)
                            .sum();
                        // …and only if mostly along −e: a row that comes back
                        // with fresh rounding noise would add it to every column.
                        let dd: f64 = change.iter().map(|d| d * d).sum();
                        let ee: f64 = miss.clone().map(|e| e * e).sum();
                        let ed: f64 = change.iter().zip(miss).map(|(d, e)| -d * e).sum();
                        if growth >= 0.0 || ed < MIN_ALIGNMENT * (dd * ee).sqrt() {
                            dst.copy_from_slice(&old_bytes);
                            continue;
                        }
                    }
                    row_error[r] = sq_dist(&back, &ideal);
                    acc.iter_mut().zip(&change).for_each(|(a, c)| *a += c);
                }
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()?;
        // Summed in order, so the result never depends on thread timing.
        let sums = sum_vectors(k * n, parts);
        Ok(sums.chunks_exact(n).map(<[f64]>::to_vec).collect())
    }
}

/// Share of `‖u‖²` held by the rows requantized after the plain pass.
const SUBSET_MASS: f64 = 0.5;
/// Least cosine between a requantized row's change and `−e` for the row's
/// new quantization to be kept: accepting any change that merely does not
/// hurt lets the residual stall (docs/figures.md).
const MIN_ALIGNMENT: f64 = 0.3;

/// `w_i = u_i / ‖u_S‖²` on the fewest rows `S` holding `mass` of `‖u‖²`,
/// 0 elsewhere.
fn correction_weights(u: &[f32], mass: f64) -> Vec<f32> {
    let mut order: Vec<usize> = (0..u.len()).collect();
    order.sort_by(|&a, &b| u[b].abs().total_cmp(&u[a].abs()));
    let total: f64 = u.iter().map(|&x| x as f64 * x as f64).sum();
    let mut held = 0.0;
    let mut weights = vec![0f32; u.len()];
    let mut chosen = Vec::new();
    for i in order {
        chosen.push(i);
        held += u[i] as f64 * u[i] as f64;
        if held >= mass * total {
            break;
        }
    }
    for i in chosen {
        weights[i] = (u[i] as f64 / held) as f32;
    }
    weights
}

/// A chunk's components per direction and row: before the edit, wanted,
/// and as written.
type Components<'a> = (&'a [Vec<f64>], &'a [Vec<f64>], &'a mut [Vec<f64>]);

/// Rounds of settling a basis: the direction settled at each step. One
/// direction needs one; with more, a move for one shifts the others a
/// little, so they are taken in turn a few times.
fn rounds(k: usize) -> impl Iterator<Item = usize> {
    let n = if k == 1 { 1 } else { SUBSPACE_ROUNDS };
    (0..n * k).map(move |i| i % k)
}

/// Rounds of settling each direction of a basis of several.
const SUBSPACE_ROUNDS: usize = 3;

/// `‖x‖`; for one value exactly `|x|`, so that a single direction's
/// arithmetic is unchanged.
fn magnitude(x: impl Iterator<Item = f64>) -> f64 {
    let (mut count, mut first, mut sum2) = (0, 0.0, 0.0);
    for x in x {
        if count == 0 {
            first = x;
        }
        count += 1;
        sum2 += x * x;
    }
    match count {
        1 => first.abs(),
        _ => sum2.sqrt(),
    }
}

/// `a += b`, elementwise; an empty `a` takes `b`'s length.
fn add_into(a: &mut Vec<f64>, b: &[f64]) {
    if a.is_empty() {
        a.resize(b.len(), 0.0);
    }
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

fn sum_vectors(n: usize, parts: Vec<Vec<f64>>) -> Vec<f64> {
    parts.into_iter().fold(vec![0f64; n], |mut a, b| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        a
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

    fn request(kind: EditKind, basis: &[Vec<f32>], scale: f32, exact_grid: bool) -> Request<'_> {
        Request {
            kind,
            basis,
            scale,
            importance: None,
            exact_grid,
            preserve_norms: false,
        }
    }

    #[test]
    fn streaming_rewrite_matches_the_whole_tensor_edit() {
        let (n_out, n_in, n_exp) = (96, 512, 2);
        let values: Vec<f32> = (0..n_out * n_in * n_exp)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let u = edit::normalized(
            &(0..n_out)
                .map(|i| (i as f32 * 0.3).cos())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        for ty in [GgmlType::F32, GgmlType::Q8_0] {
            let data = quant::quantize(ty, &values, n_in, None).unwrap();
            let mut ideal = quant::dequantize(ty, &data, n_in).unwrap();
            edit::orthogonalize_output(&mut ideal, n_in, &u, 1.0);
            let req = request(
                EditKind::OutputProjection,
                std::slice::from_ref(&u),
                1.0,
                false,
            );
            let got = rewrite(ty, &data, n_in, &req).unwrap();
            assert_eq!(got.passes, 1);
            // Equal up to f64 summation order (a rounding flip at most).
            let back = quant::dequantize(ty, &got.bytes, n_in).unwrap();
            let expect =
                quant::dequantize(ty, &quant::quantize(ty, &ideal, n_in, None).unwrap(), n_in)
                    .unwrap();
            let diff = back
                .iter()
                .zip(&expect)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < if ty == GgmlType::F32 { 1e-6 } else { 0.01 },
                "{ty}: {diff}"
            );
            assert!(
                got.max_before > 0.1 && got.max_after < got.max_before * 0.05,
                "{ty}: {} -> {}",
                got.max_before,
                got.max_after
            );
        }
    }

    /// Types without code moves (here Q3_K) go through repeated row
    /// requantization; it must still remove most of what one pass keeps.
    #[test]
    fn requantizing_passes_reduce_what_a_single_pass_keeps() {
        let (n_out, n_in) = (128, 512);
        let values: Vec<f32> = (0..n_out * n_in)
            .map(|i| (((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let u = edit::normalized(
            &(0..n_out)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * (1.0 + (i % 5) as f32))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let ty = GgmlType::Q3_K;
        assert!(!codes::supports(ty));
        let data = quant::quantize(ty, &values, n_in, None).unwrap();
        let run = |exact_grid| {
            let req = request(
                EditKind::OutputProjection,
                std::slice::from_ref(&u),
                1.0,
                exact_grid,
            );
            rewrite(ty, &data, n_in, &req).unwrap()
        };
        let (single, exact) = (run(false), run(true));
        assert!(
            exact.passes > 1 && exact.moves == 0,
            "{} passes",
            exact.passes
        );
        assert!(
            exact.kept < 0.5 * single.kept,
            "kept {:.3} after {} passes, {:.3} after one",
            exact.kept,
            exact.passes,
            single.kept
        );
        assert!(exact.error_ratio < 1.5, "error x{:.2}", exact.error_ratio);
    }

    /// `--preserve-norms`: read back through ggml, every input column of an
    /// output projection and every embedding row keeps its norm, and the
    /// component along `u` is still gone.
    #[test]
    fn preserved_norms_survive_quantization() {
        let (n_out, n_in) = (96, 256);
        let u = edit::normalized(
            &(0..n_out)
                .map(|i| (i as f32 * 0.3).cos() + 0.5)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        // Noise plus a strong component along u, so that the projection
        // shrinks the columns visibly.
        let values: Vec<f32> = (0..n_out * n_in)
            .map(|k| {
                let (i, j) = (k / n_in, k % n_in);
                ((k * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5
                    + 3.0 * u[i] * (j as f32 * 0.7).sin()
            })
            .collect();
        let column_norms = |w: &[f32]| -> Vec<f64> {
            (0..n_in)
                .map(|j| {
                    (0..n_out)
                        .map(|i| (w[i * n_in + j] as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .collect()
        };
        for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_K] {
            let data = quant::quantize(ty, &values, n_in, None).unwrap();
            let w = quant::dequantize(ty, &data, n_in).unwrap();
            let mut req = request(
                EditKind::OutputProjection,
                std::slice::from_ref(&u),
                1.0,
                true,
            );
            req.preserve_norms = true;
            let got = rewrite(ty, &data, n_in, &req).unwrap();
            let v = quant::dequantize(ty, &got.bytes, n_in).unwrap();
            let (before, after) = (column_norms(&w), column_norms(&v));
            let worst = before
                .iter()
                .zip(&after)
                .map(|(b, a)| (a / b - 1.0).abs())
                .fold(0f64, f64::max);
            // A plain projection shrinks columns by up to ~10 % here.
            let plain = rewrite(
                ty,
                &data,
                n_in,
                &request(
                    EditKind::OutputProjection,
                    std::slice::from_ref(&u),
                    1.0,
                    true,
                ),
            )
            .unwrap();
            let shrunk = column_norms(&quant::dequantize(ty, &plain.bytes, n_in).unwrap())
                .iter()
                .zip(&before)
                .map(|(a, b)| 1.0 - a / b)
                .fold(0f64, f64::max);
            let tolerance = if ty == GgmlType::Q4_K { 0.05 } else { 0.01 };
            assert!(
                worst < tolerance && shrunk > 4.0 * tolerance,
                "{ty}: column norms off by {worst:.4} (plain projection shrinks by {shrunk:.4})"
            );
            assert!(got.kept < 0.05, "{ty}: kept {:.3}", got.kept);

            let rows = quant::quantize(ty, &values[..n_out * n_in], n_in, None).unwrap();
            let u_row = edit::normalized(
                &(0..n_in)
                    .map(|j| (j as f32 * 0.1).sin())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            let mut req = request(
                EditKind::EmbeddingRows,
                std::slice::from_ref(&u_row),
                1.0,
                true,
            );
            req.preserve_norms = true;
            let got = rewrite(ty, &rows, n_in, &req).unwrap();
            let (w, v) = (
                quant::dequantize(ty, &rows, n_in).unwrap(),
                quant::dequantize(ty, &got.bytes, n_in).unwrap(),
            );
            for (a, b) in v.chunks(n_in).zip(w.chunks(n_in)) {
                let ratio = (edit::dot(a, a) / edit::dot(b, b)).sqrt();
                assert!(
                    (ratio - 1.0).abs() < tolerance,
                    "{ty}: row norm x{ratio:.4}"
                );
            }
            assert!(got.kept < 0.05, "{ty}: rows kept {:.3}", got.kept);
        }
    }

    /// A 2-dimensional subspace, on a grid with code moves (Q4_K) and one
    /// without (Q3_K): both directions lose their component, and settling
    /// the second does not give back what the first lost.
    #[test]
    fn both_directions_of_a_subspace_lose_their_component() {
        let (n_out, n_in) = (128, 512);
        let values: Vec<f32> = (0..n_out * n_in)
            .map(|i| (((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let u1 = edit::normalized(
            &(0..n_out)
                .map(|i| (i as f32 * 0.3).cos())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let raw: Vec<f32> = (0..n_out).map(|i| (i * 7 % 13) as f32 - 6.0).collect();
        let basis = edit::writer_basis(&u1, &[raw], None).unwrap();
        assert_eq!(basis.len(), 2);
        assert!(edit::dot(&basis[0], &basis[1]).abs() < 1e-6);
        for ty in [GgmlType::Q4_K, GgmlType::Q3_K] {
            let bound: f64 = 0.05;
            let data = quant::quantize(ty, &values, n_in, None).unwrap();
            let w = quant::dequantize(ty, &data, n_in).unwrap();
            let run = |exact_grid| {
                let req = request(EditKind::OutputProjection, &basis, 1.0, exact_grid);
                rewrite(ty, &data, n_in, &req).unwrap()
            };
            let (single, exact) = (run(false), run(true));
            // Without code moves, the grid bounds what one direction can lose.
            let one = rewrite(
                ty,
                &data,
                n_in,
                &request(EditKind::OutputProjection, &basis[..1], 1.0, true),
            )
            .unwrap();
            let bound = bound.max(1.1 * one.kept);
            let v = quant::dequantize(ty, &exact.bytes, n_in).unwrap();
            let norm = |c: Vec<f64>| c.iter().map(|x| x * x).sum::<f64>().sqrt();
            for u in &basis {
                let kept = norm(edit::project_output(&v, n_in, u))
                    / norm(edit::project_output(&w, n_in, u));
                assert!(
                    kept <= bound && kept <= exact.kept + 1e-9,
                    "{ty}: kept {kept:.3} (single pass {:.3}, one direction {:.3})",
                    single.kept,
                    one.kept
                );
            }
            assert!(
                exact.kept < 0.5 * single.kept,
                "{ty}: {:.3} vs {:.3}",
                exact.kept,
                single.kept
            );
        }
    }
}
