//! The streaming tensor rewrite: dequantize → orthogonalize → requantize,
//! chunk by chunk of rows on rayon's pool. No f32 copy of the whole tensor
//! is ever held: output projections take two passes over the quantized
//! input (first `v = uᵀW`, then `row_i -= s u_i v`).

use crate::edit::{self, EditKind};
use crate::ffi::{self, GgmlType};
use anyhow::{Context, Result};
use rayon::prelude::*;

/// Rows per parallel task.
fn task_rows(row_len: usize) -> usize {
    (32_768 / row_len.max(1)).max(1)
}

pub struct Rewritten {
    pub bytes: Vec<u8>,
    /// Largest component along `u` the tensor can write, before and after.
    pub max_before: f64,
    pub max_after: f64,
}

/// Rewrites one tensor's data. `row_len` is its contiguous axis; `u` the
/// unit direction on its residual axis.
pub fn rewrite(
    ty: GgmlType,
    data: &[u8],
    row_len: usize,
    kind: EditKind,
    u: &[f32],
    scale: f32,
) -> Result<Rewritten> {
    let row_bytes = ty
        .row_bytes(row_len as u64)
        .context("row is not whole blocks")? as usize;
    let job = Job {
        ty,
        row_len,
        row_bytes,
        u,
        scale,
        task: task_rows(row_len) * row_bytes,
    };
    let mut out = vec![0u8; data.len()];
    let (max_before, max_after) = match kind {
        EditKind::EmbeddingRows | EditKind::Bias => job.rows(data, &mut out)?,
        EditKind::OutputProjection => {
            // One slab per expert (a single slab for dense tensors).
            let slab = row_bytes * u.len();
            let mut maxima = (0f64, 0f64);
            for (src, dst) in data.chunks(slab).zip(out.chunks_mut(slab)) {
                let (b, a) = job.output_slab(src, dst)?;
                maxima = (maxima.0.max(b), maxima.1.max(a));
            }
            maxima
        }
    };
    Ok(Rewritten {
        bytes: out,
        max_before,
        max_after,
    })
}

/// One tensor's rewrite parameters.
struct Job<'a> {
    ty: GgmlType,
    row_len: usize,
    row_bytes: usize,
    u: &'a [f32],
    scale: f32,
    /// Bytes of quantized rows per parallel task.
    task: usize,
}

impl Job<'_> {
    fn dequantize(&self, src: &[u8]) -> Result<Vec<f32>> {
        let mut values = vec![0f32; src.len() / self.row_bytes * self.row_len];
        ffi::dequantize_rows(self.ty, src, &mut values)?;
        Ok(values)
    }

    /// Requantizes `values` into `dst` and returns what ggml will read back.
    fn requantize(&self, values: &mut [f32], dst: &mut [u8]) -> Result<()> {
        ffi::quantize_rows(self.ty, values, dst, self.row_len)?;
        ffi::dequantize_rows(self.ty, dst, values)
    }

    /// Row-local edit: each row is a residual vector.
    fn rows(&self, src: &[u8], dst: &mut [u8]) -> Result<(f64, f64)> {
        let max_dot = |values: &[f32]| {
            values
                .chunks(self.row_len)
                .map(|r| edit::dot(r, self.u).abs())
                .fold(0.0, f64::max)
        };
        dst.par_chunks_mut(self.task)
            .zip(src.par_chunks(self.task))
            .map(|(dst, src)| -> Result<(f64, f64)> {
                let mut values = self.dequantize(src)?;
                let before = max_dot(&values);
                edit::orthogonalize_rows_seq(&mut values, self.u, self.scale);
                self.requantize(&mut values, dst)?;
                Ok((before, max_dot(&values)))
            })
            .try_reduce(|| (0.0, 0.0), |a, b| Ok((a.0.max(b.0), a.1.max(b.1))))
    }

    /// Output-side edit of one `[u.len() rows × row_len]` slab.
    fn output_slab(&self, src: &[u8], dst: &mut [u8]) -> Result<(f64, f64)> {
        let rows = self.task / self.row_bytes;
        let n = self.row_len;
        // Partial sums are collected in order and added sequentially, so the
        // result (and the requantized bytes) never depend on thread timing.
        let add = |mut a: Vec<f64>, b: Vec<f64>| {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            a
        };
        let max_abs = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
        // Pass 1: v = uᵀW.
        let v = src
            .par_chunks(self.task)
            .enumerate()
            .map(|(task, src)| -> Result<Vec<f64>> {
                let mut acc = vec![0f64; n];
                edit::accumulate_projection(
                    &self.dequantize(src)?,
                    n,
                    &self.u[task * rows..],
                    &mut acc,
                );
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .fold(vec![0f64; n], add);
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        // Pass 2: row_i -= s u_i v, requantize, and measure what is left.
        let v_after = dst
            .par_chunks_mut(self.task)
            .zip(src.par_chunks(self.task))
            .enumerate()
            .map(|(task, (dst, src))| -> Result<Vec<f64>> {
                let u_rows = &self.u[task * rows..];
                let mut values = self.dequantize(src)?;
                edit::subtract_projection(&mut values, n, u_rows, &v32, self.scale);
                self.requantize(&mut values, dst)?;
                let mut acc = vec![0f64; n];
                edit::accumulate_projection(&values, n, u_rows, &mut acc);
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .fold(vec![0f64; n], add);
        Ok((max_abs(&v), max_abs(&v_after)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

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
            let data = quant::quantize(ty, &values, n_in).unwrap();
            let mut ideal = quant::dequantize(ty, &data, n_in).unwrap();
            edit::orthogonalize_output(&mut ideal, n_in, &u, 1.0);
            let got = rewrite(ty, &data, n_in, EditKind::OutputProjection, &u, 1.0).unwrap();
            // Equal up to f64 summation order (a rounding flip at most).
            let back = quant::dequantize(ty, &got.bytes, n_in).unwrap();
            let expect =
                quant::dequantize(ty, &quant::quantize(ty, &ideal, n_in).unwrap(), n_in).unwrap();
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
}
