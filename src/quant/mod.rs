//! Whole-tensor dequantization and requantization, split over rows with rayon,
//! and (`codes`) direct edits of single elements inside quantized blocks.
//! ggml's row quantizers are independent per row, so disjoint row ranges can
//! be processed on different threads with results identical to one call.

pub mod codes;

use crate::ffi::{self, GgmlType};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;

/// Rows per parallel task: large enough to amortise scheduling, small enough
/// to balance two cores as well as sixty-four.
fn rows_per_task(row_len: usize) -> usize {
    (65_536 / row_len.max(1)).max(1)
}

/// Dequantizes a tensor's bytes (whole rows of `row_len`) to f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], row_len: usize) -> Result<Vec<f32>> {
    let row_bytes = ty
        .row_bytes(row_len as u64)
        .context("row is not whole blocks")? as usize;
    if row_bytes == 0 || bytes.len() % row_bytes != 0 {
        bail!("{ty}: {} bytes are not whole rows", bytes.len());
    }
    let n_rows = bytes.len() / row_bytes;
    let mut out = vec![0f32; n_rows * row_len];
    let task = rows_per_task(row_len);
    out.par_chunks_mut(task * row_len)
        .zip(bytes.par_chunks(task * row_bytes))
        .try_for_each(|(dst, src)| ffi::dequantize_rows(ty, src, dst))?;
    Ok(out)
}

/// Quantizes f32 rows of `row_len` to `ty`, validating every row.
/// `importance`: see [`ffi::quantize_rows`].
pub fn quantize(
    ty: GgmlType,
    values: &[f32],
    row_len: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let row_bytes = ty
        .row_bytes(row_len as u64)
        .context("row is not whole blocks")? as usize;
    if values.len() % row_len != 0 {
        bail!(
            "{ty}: {} values are not whole rows of {row_len}",
            values.len()
        );
    }
    let n_rows = values.len() / row_len;
    let mut out = vec![0u8; n_rows * row_bytes];
    let task = rows_per_task(row_len);
    out.par_chunks_mut(task * row_bytes)
        .zip(values.par_chunks(task * row_len))
        .try_for_each(|(dst, src)| ffi::quantize_rows(ty, src, dst, row_len, importance))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_quantization_matches_a_single_call() {
        let row_len = 256;
        let n_rows = 700; // several tasks, last one partial
        let values: Vec<f32> = (0..row_len * n_rows)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for ty in [GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16] {
            let parallel = quantize(ty, &values, row_len, None).unwrap();
            let mut single = vec![0u8; parallel.len()];
            ffi::quantize_rows(ty, &values, &mut single, row_len, None).unwrap();
            assert_eq!(parallel, single, "{ty}");
            let back = dequantize(ty, &parallel, row_len).unwrap();
            let mut back_single = vec![0f32; values.len()];
            ffi::dequantize_rows(ty, &single, &mut back_single).unwrap();
            assert_eq!(back, back_single, "{ty}");
        }
    }
}
