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
    /// Unit direction on the tensor's residual axis.
    pub u: &'a [f32],
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
    /// Largest component along `u` the tensor can write, before and after.
    pub max_before: f64,
    pub max_after: f64,
    /// `‖uᵀV‖ / ‖uᵀW‖`, with `V` as ggml dequantizes the written bytes:
    /// `1 − scale` when the edit survived quantization exactly.
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
    /// `‖uᵀW‖²`, `‖uᵀV‖²`.
    before2: f64,
    after2: f64,
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
        self.before2 += o.before2;
        self.after2 += o.after2;
        self.error2 += o.error2;
        self.plain_error2 += o.plain_error2;
        self.passes = self.passes.max(o.passes);
        self.moves += o.moves;
        self
    }
}

/// Rewrites one tensor's data. `row_len` is its contiguous axis; `req.u`
/// the unit direction on its residual axis.
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
            let slab = row_bytes * req.u.len();
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
    Ok(Rewritten {
        bytes: out,
        max_before: stats.max_before,
        max_after: stats.max_after,
        kept: ratio(stats.after2, stats.before2),
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
    fn rows(&self, src: &[u8], dst: &mut [u8], imp: Option<&[f32]>) -> Result<Stats> {
        let u = self.req.u;
        let s = self.req.scale as f64;
        let n = self.row_len;
        dst.par_chunks_mut(self.task)
            .zip(src.par_chunks(self.task))
            .map(|(dst, src)| -> Result<Stats> {
                let w = self.dequantize(src)?;
                let n_rows = w.len() / n;
                let mut ideal = w.clone();
                edit::orthogonalize_rows_seq(&mut ideal, u, s as f32);
                let before: Vec<f64> = w.chunks_exact(n).map(|r| edit::dot(r, u)).collect();
                let mut target: Vec<f64> = before.iter().map(|b| (1.0 - s) * b).collect();
                if self.req.preserve_norms {
                    for ((x, w), (t, &b)) in ideal
                        .chunks_exact_mut(n)
                        .zip(w.chunks_exact(n))
                        .zip(target.iter_mut().zip(&before))
                    {
                        let norm = edit::norm_restoring_factor(edit::dot(w, w), b, s);
                        x.iter_mut().for_each(|x| *x *= norm as f32);
                        *t *= norm;
                    }
                }
                let mut values = vec![0f32; w.len()];
                self.quantize(&ideal, dst, &mut values, imp)?;
                let mut after: Vec<f64> = values.chunks_exact(n).map(|r| edit::dot(r, u)).collect();
                let plain: Vec<f64> = values
                    .chunks_exact(n)
                    .zip(ideal.chunks_exact(n))
                    .map(|(v, x)| sq_dist(v, x))
                    .collect();
                // Each row's error as written: only settled rows change.
                let mut errors = plain.clone();
                let before2: f64 = before.iter().map(|b| b * b).sum();
                // A row whose own component is tiny need not be matched more
                // closely than a typical row.
                let typical2 = before2 / n_rows.max(1) as f64;
                let mut passes = 1;
                let mut moves = 0;
                if self.iterate && self.codes {
                    let miss2 = |after: &[f64]| -> f64 {
                        after
                            .iter()
                            .zip(&target)
                            .map(|(a, t)| (a - t).powi(2))
                            .sum()
                    };
                    let bound2 = FLIP_TOLERANCE.powi(2) * before2;
                    let mut scratch = flips::RowScratch::default();
                    let mut order: Vec<usize> = (0..n_rows).collect();
                    order.sort_by(|&a, &b| {
                        (after[b] - target[b])
                            .abs()
                            .total_cmp(&(after[a] - target[a]).abs())
                    });
                    for r in order {
                        if miss2(&after) <= bound2 {
                            break;
                        }
                        // Within its share of the bound: these squared sum
                        // to FLIP_TOLERANCE² ‖Wu‖² over the chunk.
                        let share = ((before[r].powi(2) + typical2) / 2.0).sqrt();
                        let span = r * n..(r + 1) * n;
                        let row = &mut dst[r * self.row_bytes..(r + 1) * self.row_bytes];
                        let moved = flips::settle_row(
                            self.ty,
                            row,
                            &values[span.clone()],
                            &ideal[span.clone()],
                            u,
                            (after[r], target[r]),
                            FLIP_TOLERANCE * share,
                            imp,
                            &mut scratch,
                        );
                        if moved == 0 {
                            // Unchanged bytes: values, after and errors hold.
                            continue;
                        }
                        moves += moved;
                        ffi::dequantize_rows(self.ty, row, &mut values[span.clone()])?;
                        self.count_non_finite(&values[span.clone()]);
                        after[r] = edit::dot(&values[span.clone()], u);
                        errors[r] = sq_dist(&values[span.clone()], &ideal[span]);
                    }
                } else if self.iterate {
                    // Requantize each row with what it kept pushed back in.
                    let mut x = vec![0f32; n];
                    for r in 0..n_rows {
                        let span = r * n..(r + 1) * n;
                        let row = &mut dst[r * self.row_bytes..(r + 1) * self.row_bytes];
                        let tolerance = GRID_TOLERANCE * before[r].abs().max(typical2.sqrt());
                        x.copy_from_slice(&ideal[span.clone()]);
                        let mut row_passes = 1;
                        while row_passes < MAX_PASSES && (after[r] - target[r]).abs() > tolerance {
                            let miss = after[r] - target[r];
                            for (xi, &ui) in x.iter_mut().zip(u) {
                                *xi -= (miss * ui as f64) as f32;
                            }
                            self.quantize(&x, row, &mut values[span.clone()], imp)?;
                            row_passes += 1;
                            let next = edit::dot(&values[span.clone()], u);
                            let stalled = (next - target[r]).abs() > 0.9 * miss.abs();
                            after[r] = next;
                            if stalled {
                                break;
                            }
                        }
                        passes = passes.max(row_passes);
                    }
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
                let max_abs = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
                Ok(Stats {
                    max_before: max_abs(&before),
                    max_after: max_abs(&after),
                    before2,
                    after2: after.iter().map(|a| a * a).sum(),
                    error2,
                    plain_error2,
                    passes,
                    moves,
                })
            })
            .try_reduce(Stats::default, |a, b| Ok(a.merge(b)))
    }

    /// Output-side edit of one `[u.len() rows × row_len]` slab.
    fn output_slab(&self, src: &[u8], dst: &mut [u8], imp: Option<&[f32]>) -> Result<Stats> {
        let rows = self.task / self.row_bytes;
        let n = self.row_len;
        let u = self.req.u;
        let s = self.req.scale;
        let max_abs = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
        let norm2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        // Pass 1: v = uᵀW, and each column's squared norm when norms are
        // preserved (the second half of the sums).
        let preserve = self.req.preserve_norms;
        let width = if preserve { 2 * n } else { n };
        // The slab in f32, dequantized once for every pass below (within
        // the memory target: the largest edited tensor in f32).
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
                    edit::accumulate_projection(w, n, &u[task * rows..], &mut acc[..n]);
                    if preserve {
                        for row in w.chunks_exact(n) {
                            for (a, &x) in acc[n..].iter_mut().zip(row) {
                                *a += x as f64 * x as f64;
                            }
                        }
                    }
                    Ok(acc)
                })
                .collect::<Result<Vec<_>>>()?,
        );
        let v = sums[..n].to_vec();
        // `norm` gives each column its norm back.
        let norm: Vec<f32> = (0..n)
            .map(|j| match preserve {
                true => edit::norm_restoring_factor(sums[n + j], v[j], s as f64) as f32,
                false => 1.0,
            })
            .collect();
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let target: Vec<f64> = v
            .iter()
            .zip(&norm)
            .map(|(x, &f)| (1.0 - s as f64) * x * f as f64)
            .collect();
        // Pass 2: the plain edit, X = (W − s u vᵀ) diag(norm), requantized.
        let mut row_error = vec![0f64; u.len()];
        let no_correction = vec![0f32; n];
        let mut after = self.output_pass(
            &weights_f32,
            dst,
            (&v32, &norm),
            &no_correction,
            u,
            &mut row_error,
            None,
            imp,
        )?;
        let plain_error2: f64 = row_error.iter().sum();
        let mut passes = 1;
        // Further passes push what the grid kept, e = uᵀV − (1 − s) uᵀW,
        // back into the rows: X ← X − u eᵀ (accumulated in `correction`).
        let miss = |after: &[f64]| {
            norm2(
                &after
                    .iter()
                    .zip(&target)
                    .map(|(a, t)| a - t)
                    .collect::<Vec<_>>(),
            )
            .sqrt()
        };
        let tolerance = GRID_TOLERANCE * norm2(&v).sqrt();
        let mut moves = 0;
        let mut error2: f64 = row_error.iter().sum();
        if self.iterate && self.codes && miss(&after) > FLIP_TOLERANCE * norm2(&v).sqrt() {
            // Every column within its share of the bound, so that the
            // whole miss is within it too; no closer, as each further move
            // adds quantization error.
            let per_column = FLIP_TOLERANCE * norm2(&v).sqrt() / (n as f64).sqrt();
            let settled = flips::settle_columns(
                self.ty,
                &weights_f32,
                dst,
                n,
                u,
                s,
                &v32,
                &norm,
                &target,
                per_column,
            )?;
            self.add_non_finite(settled.non_finite);
            (after, moves, error2) = (settled.after, settled.moves, settled.error2);
        }
        // Only the rows with the largest |u_i| are requantized again: they
        // move uᵀV the most per flipped rounding, and the others would
        // mostly round back. Their share of the correction is scaled up so
        // that Σ u_i w_i = 1.
        let weights = correction_weights(u, SUBSET_MASS);
        let mut correction = vec![0f64; n];
        let mut missed = miss(&after);
        while self.iterate && !self.codes && passes < MAX_PASSES && missed > tolerance {
            let current: Vec<f64> = after.iter().zip(&target).map(|(a, t)| a - t).collect();
            correction
                .iter_mut()
                .zip(&current)
                .for_each(|(c, e)| *c += e);
            let c32: Vec<f32> = correction.iter().map(|&x| x as f32).collect();
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
            after.iter_mut().zip(&delta).for_each(|(a, d)| *a += d);
            error2 = row_error.iter().sum();
            passes += 1;
            let next = miss(&after);
            let stalled = next > 0.9 * missed;
            missed = next;
            if stalled {
                break;
            }
        }
        Ok(Stats {
            max_before: max_abs(&v),
            max_after: max_abs(&after),
            before2: norm2(&v),
            after2: norm2(&after),
            error2,
            plain_error2,
            passes,
            moves,
        })
    }

    /// Requantizes the rows as `W_i − s u_i v − w_i c` and returns `uᵀV`
    /// (`miss` is None: the plain pass, every row) or its change since the
    /// last pass (only rows with `w_i ≠ 0`). A later pass keeps a row's new
    /// quantization only if it brings `uᵀV` closer to the target, given the
    /// current `miss`: on grids whose quantizer re-chooses its scales (the
    /// K-quants), many rows come back with fresh rounding noise instead of
    /// the requested shift. `row_error` receives each row's squared
    /// distance to the ideal edit `W_i − s u_i v`.
    #[allow(clippy::too_many_arguments)]
    fn output_pass(
        &self,
        weights_f32: &[f32],
        dst: &mut [u8],
        (v, norm): (&[f32], &[f32]),
        correction: &[f32],
        weights: &[f32],
        row_error: &mut [f64],
        miss: Option<&[f64]>,
        imp: Option<&[f32]>,
    ) -> Result<Vec<f64>> {
        let rows = self.task / self.row_bytes;
        let n = self.row_len;
        let s = self.req.scale;
        let first = miss.is_none();
        let parts = dst
            .par_chunks_mut(self.task)
            .zip(weights_f32.par_chunks(rows * n))
            .zip(row_error.par_chunks_mut(rows))
            .enumerate()
            .map(|(task, ((dst, w), row_error))| -> Result<Vec<f64>> {
                let u_rows = &self.req.u[task * rows..];
                let w_rows = &weights[task * rows..];
                let n_rows = w.len() / n;
                if !first && w_rows[..n_rows].iter().all(|&w| w == 0.0) {
                    return Ok(vec![0f64; n]);
                }
                let old = if first {
                    None
                } else {
                    Some(self.dequantize(dst)?)
                };
                let mut ideal = vec![0f32; n];
                let mut x = vec![0f32; n];
                let mut back = vec![0f32; n];
                let mut change = vec![0f64; n];
                let mut old_bytes = vec![0u8; self.row_bytes];
                let mut acc = vec![0f64; n];
                for (k, (w, dst)) in w
                    .chunks_exact(n)
                    .zip(dst.chunks_exact_mut(self.row_bytes))
                    .enumerate()
                {
                    let (ui, wi) = (u_rows[k], w_rows[k]);
                    if !first && wi == 0.0 {
                        continue;
                    }
                    for ((((id, xi), &wj), (&vj, &cj)), &fj) in ideal
                        .iter_mut()
                        .zip(&mut x)
                        .zip(w)
                        .zip(v.iter().zip(correction))
                        .zip(norm)
                    {
                        *id = (wj - s * ui * vj) * fj;
                        *xi = *id - wi * cj;
                    }
                    let ui64 = ui as f64;
                    let Some(old) = old.as_ref().map(|o| &o[k * n..(k + 1) * n]) else {
                        // The plain pass: every row is kept as quantized, so
                        // nothing needs a copy to restore.
                        self.quantize(&x, dst, &mut back, imp)?;
                        row_error[k] = sq_dist(&back, &ideal);
                        acc.iter_mut()
                            .zip(&back)
                            .for_each(|(a, &b)| *a += ui64 * b as f64);
                        continue;
                    };
                    old_bytes.copy_from_slice(dst);
                    self.quantize(&x, dst, &mut back, imp)?;
                    for ((c, &b), &o) in change.iter_mut().zip(&back).zip(old) {
                        *c = ui64 * (b as f64 - o as f64);
                    }
                    if let Some(miss) = miss {
                        // ‖e + d‖² < ‖e‖²  ⇔  2⟨e, d⟩ + ‖d‖² < 0.
                        let growth: f64 = change
                            .iter()
                            .zip(miss)
                            .map(|(d, e)| 2.0 * e * d + d * d)
                            .sum();
                        // …and only if mostly along −e: a row that comes back
                        // with fresh rounding noise would add it to every column.
                        let dd: f64 = change.iter().map(|d| d * d).sum();
                        let ee: f64 = miss.iter().map(|e| e * e).sum();
                        let ed: f64 = change.iter().zip(miss).map(|(d, e)| -d * e).sum();
                        if growth >= 0.0 || ed < MIN_ALIGNMENT * (dd * ee).sqrt() {
                            dst.copy_from_slice(&old_bytes);
                            continue;
                        }
                    }
                    row_error[k] = sq_dist(&back, &ideal);
                    acc.iter_mut().zip(&change).for_each(|(a, c)| *a += c);
                }
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()?;
        // Summed in order, so the result never depends on thread timing.
        Ok(sum_vectors(n, parts))
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

    fn request(kind: EditKind, u: &[f32], scale: f32, exact_grid: bool) -> Request<'_> {
        Request {
            kind,
            u,
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
            let req = request(EditKind::OutputProjection, &u, 1.0, false);
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
            let req = request(EditKind::OutputProjection, &u, 1.0, exact_grid);
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
            let mut req = request(EditKind::OutputProjection, &u, 1.0, true);
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
                &request(EditKind::OutputProjection, &u, 1.0, true),
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
            let mut req = request(EditKind::EmbeddingRows, &u_row, 1.0, true);
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
}
