//! Grid-aware projection by editing codes. After the plain pass, the
//! component the quantized tensor still writes along `u` is pushed to the
//! requested one by moving single element codes by ±1 (see
//! `quant::codes`): each move shifts `uᵀV` by a known amount and nothing
//! else, so the result is exact up to the grid's resolution, in one pass,
//! without re-running the quantizer. Moves are taken cheapest first: the
//! cost of a move is how much farther it takes the element from the ideal
//! f32 edit, per unit of component it removes, so elements whose rounding
//! sat near a boundary go first, and many moves bring an element closer to
//! the ideal edit than plain requantization left it.

use crate::ffi::{self, GgmlType};
use crate::quant::codes;
use anyhow::Result;
use rayon::prelude::*;

/// One possible move of one element's code.
struct Move {
    /// Row (output projections) or element (rows) index.
    at: usize,
    delta: i32,
    /// Change of the component along `u`.
    effect: f64,
    /// Added squared error against the ideal edit, per unit of |effect|.
    price: f64,
}

/// An element that could move.
struct Candidate {
    at: usize,
    code: codes::Code,
    /// Its value as ggml reads it now, and in the ideal f32 edit.
    value: f32,
    ideal: f32,
    /// Its weight along `u`.
    along: f64,
    /// How much its error counts (the importance matrix).
    importance: f64,
}

/// Applies the cheapest moves that bring `miss` (the component written
/// minus the component wanted) within `tolerance` of zero; returns the
/// moves taken.
fn settle(
    miss: f64,
    tolerance: f64,
    candidates: impl Iterator<Item = Candidate>,
) -> Vec<(usize, i32)> {
    if miss.abs() <= tolerance {
        return Vec::new();
    }
    let mut moves: Vec<Move> = candidates
        .filter_map(
            |Candidate {
                 at,
                 code,
                 value,
                 ideal,
                 along,
                 importance,
             }| {
                let per_unit = along * code.step as f64;
                if per_unit == 0.0 {
                    return None;
                }
                // The direction of the code that lowers |miss|.
                let delta = if (per_unit > 0.0) == (miss < 0.0) {
                    1
                } else {
                    -1
                };
                if !(code.lo..=code.hi).contains(&(code.q + delta)) {
                    return None;
                }
                let moved = value as f64 + delta as f64 * code.step as f64;
                let cost = importance
                    * ((moved - ideal as f64).powi(2) - (value as f64 - ideal as f64).powi(2));
                Some(Move {
                    at,
                    delta,
                    effect: delta as f64 * per_unit,
                    price: cost / per_unit.abs(),
                })
            },
        )
        .collect();
    // Few moves are needed as a rule: sort only the cheapest few, then
    // more if those did not suffice.
    let by_price = |a: &Move, b: &Move| a.price.total_cmp(&b.price);
    let mut miss = miss;
    let mut taken = Vec::new();
    let (mut start, mut batch) = (0, 32);
    while start < moves.len() && miss.abs() > tolerance {
        let end = (start + batch).min(moves.len());
        let rest = &mut moves[start..];
        if end - start < rest.len() {
            rest.select_nth_unstable_by(end - start - 1, by_price);
        }
        rest[..end - start].sort_unstable_by(by_price);
        for m in &moves[start..end] {
            if miss.abs() <= tolerance {
                break;
            }
            // Only moves that leave |miss| smaller.
            if (miss + m.effect).abs() < miss.abs() {
                miss += m.effect;
                taken.push((m.at, m.delta));
            }
        }
        (start, batch) = (end, batch * 4);
    }
    taken
}

/// Output projection: every stored row is an output feature `i`, so column
/// `j` of the slab gets `Σ_i u_i V_ij` to `target_j`. Columns are
/// independent; tasks take one block-column each, which owns disjoint bytes
/// of every row. Returns the number of moves.
#[allow(clippy::too_many_arguments)]
pub(super) fn settle_columns(
    ty: GgmlType,
    src: &[u8],
    dst: &mut [u8],
    row_len: usize,
    u: &[f32],
    scale: f32,
    v: &[f32],
    target: &[f64],
    tolerance: f64,
) -> Result<u64> {
    let row_bytes = dst.len() / u.len();
    let block_bytes = ty.type_size() as usize;
    let per_block = ty.block_size() as usize;
    let n_cols = row_len / per_block;
    let mut columns: Vec<Vec<&mut [u8]>> =
        (0..n_cols).map(|_| Vec::with_capacity(u.len())).collect();
    for row in dst.chunks_exact_mut(row_bytes) {
        for (col, block) in columns.iter_mut().zip(row.chunks_exact_mut(block_bytes)) {
            col.push(block);
        }
    }
    columns
        .into_par_iter()
        .enumerate()
        .map(|(b, mut blocks)| -> Result<u64> {
            let mut w = vec![0f32; per_block * u.len()];
            let mut q = vec![0f32; per_block * u.len()];
            for (i, block) in blocks.iter().enumerate() {
                let at = i * row_bytes + b * block_bytes;
                let (w, q) = (
                    &mut w[i * per_block..(i + 1) * per_block],
                    &mut q[i * per_block..(i + 1) * per_block],
                );
                ffi::dequantize_rows(ty, &src[at..at + block_bytes], w)?;
                ffi::dequantize_rows(ty, block, q)?;
            }
            let mut moved = 0;
            for c in 0..per_block {
                let j = b * per_block + c;
                let written: f64 = (0..u.len())
                    .map(|i| u[i] as f64 * q[i * per_block + c] as f64)
                    .sum();
                let candidates = (0..u.len()).map(|i| {
                    let k = i * per_block + c;
                    let ideal = w[k] - scale * u[i] * v[j];
                    Candidate {
                        at: i,
                        code: codes::get(ty, blocks[i], c),
                        value: q[k],
                        ideal,
                        along: u[i] as f64,
                        // One column, one importance: it cannot change the order.
                        importance: 1.0,
                    }
                });
                for (i, delta) in settle(written - target[j], tolerance, candidates) {
                    let code = codes::get(ty, blocks[i], c);
                    codes::set(ty, blocks[i], c, code.q + delta);
                    moved += 1;
                }
            }
            Ok(moved)
        })
        .try_reduce(|| 0, |a, b| Ok(a + b))
}

/// A row that is itself a residual vector (embedding rows): its dot with
/// `u` goes to `target`. `values` is the row as ggml reads `dst` back and
/// `ideal` the f32 edit; `importance` weighs each element's error.
#[allow(clippy::too_many_arguments)]
pub(super) fn settle_row(
    ty: GgmlType,
    dst: &mut [u8],
    values: &[f32],
    ideal: &[f32],
    u: &[f32],
    target: f64,
    tolerance: f64,
    importance: Option<&[f32]>,
) -> u64 {
    let block_bytes = ty.type_size() as usize;
    let per_block = ty.block_size() as usize;
    let written = crate::edit::dot(values, u);
    let candidates = (0..values.len()).map(|k| {
        let block = &dst[k / per_block * block_bytes..][..block_bytes];
        Candidate {
            at: k,
            code: codes::get(ty, block, k % per_block),
            value: values[k],
            ideal: ideal[k],
            along: u[k] as f64,
            importance: importance.map_or(1.0, |imp| imp[k] as f64),
        }
    });
    let taken = settle(written - target, tolerance, candidates);
    for &(k, delta) in &taken {
        let block = &mut dst[k / per_block * block_bytes..][..block_bytes];
        let code = codes::get(ty, block, k % per_block);
        codes::set(ty, block, k % per_block, code.q + delta);
    }
    taken.len() as u64
}
