//! Grid-aware projection by editing codes. After the plain pass, the
//! component the quantized tensor still writes along `u` is pushed to the
//! requested one by moving single element codes by ±1 (see
//! `quant::codes`): each move shifts `uᵀV` by a known amount and nothing
//! else, so the result is exact up to the grid's resolution, in one pass,
//! without re-running the quantizer. Moves are taken cheapest first: the
//! price of a move is how much farther it takes the element from the ideal
//! f32 edit per unit of component it removes, so elements whose rounding
//! sat near a boundary, in rows that weigh most along `u`, go first.

use crate::ffi::{self, GgmlType};
use crate::quant::codes;
use anyhow::Result;
use rayon::prelude::*;

/// The fewest moves ordered at once: one scan finds them.
const FIRST_BATCH: usize = 8;

/// One line to settle: a column of an output projection (elements are
/// rows) or one embedding row (elements are its entries).
struct Line<'a> {
    /// The component written minus the component wanted.
    miss: f64,
    tolerance: f64,
    /// Per element: value as ggml reads it, value in the ideal f32 edit,
    /// weight along `u`, value change per code step, error weight.
    values: &'a [f32],
    ideals: &'a [f32],
    along: &'a [f32],
    steps: &'a [f32],
    importance: Option<&'a [f32]>,
}

/// The moves, cheapest first, that bring the line's miss within its
/// tolerance; `try_move(element, delta)` applies one if the code allows.
fn settle(line: &Line, moves: &mut Vec<u64>, mut try_move: impl FnMut(usize, i32) -> bool) -> u64 {
    let mut miss = line.miss;
    if miss.abs() <= line.tolerance {
        return 0;
    }
    // Reused from line to line: every key is rewritten below, so it is
    // zeroed only when it grows.
    moves.resize(line.values.len(), 0);
    // Price: added squared error per unit of |effect|. With d = ±1 the
    // direction that lowers |miss|, e = value − ideal and s the step:
    // ((e + d s)² − e²) / |a s| = (2 d e s + s²) / |a s|.
    let lowers = miss < 0.0;
    let (total_effect, movable) = match line.importance {
        Some(imp) => price_moves(line, lowers, |k| imp[k], moves),
        None => price_moves(line, lowers, |_| 1.0, moves),
    };
    // Order only as many of the cheapest as the miss should need (an
    // average move's effect), then more if those did not suffice. Moves are
    // still taken in price order, ties to the lower index, so the batch
    // sizes change the time, never the result.
    let by_price = |a: &u64, b: &u64| a.cmp(b);
    let mean_effect = total_effect / movable.max(1) as f64;
    let needed = ((miss.abs() - line.tolerance) / mean_effect).ceil();
    let first = if needed.is_finite() {
        (needed as usize).clamp(FIRST_BATCH, movable.max(FIRST_BATCH))
    } else {
        FIRST_BATCH
    };
    let mut taken = 0;
    let (mut start, mut batch) = (0, first);
    while start < movable && miss.abs() > line.tolerance {
        let end = (start + batch).min(movable);
        let rest = &mut moves[start..];
        if start == 0 && end <= FIRST_BATCH {
            // One scan for the first few (a selection costs several).
            cheapest_first(rest, end, by_price);
        } else {
            if end - start < rest.len() {
                rest.select_nth_unstable_by(end - start - 1, by_price);
            }
            rest[..end - start].sort_unstable_by(by_price);
        }
        for &key in &moves[start..end] {
            if miss.abs() <= line.tolerance {
                break;
            }
            let k = key as u32 as usize;
            let per_unit = (line.along[k] * line.steps[k]) as f64;
            // The direction priced above: toward the initial miss's zero.
            let delta = if (per_unit > 0.0) == lowers { 1 } else { -1 };
            let effect = delta as f64 * per_unit;
            // Only moves that leave |miss| smaller, and codes in range.
            if (miss + effect).abs() < miss.abs() && try_move(k, delta) {
                miss += effect;
                taken += 1;
            }
        }
        (start, batch) = (end, batch * 4);
    }
    taken
}

/// A move as one integer that sorts by price (in `f32::total_cmp`'s order),
/// then by element: comparing integers is what makes the selection cheap.
fn move_key(price: f32, element: usize) -> u64 {
    let bits = price.to_bits();
    // Negative: all bits flipped; positive: the sign bit set.
    let ordered = bits ^ (((bits as i32) >> 31) as u32 | 0x8000_0000);
    (u64::from(ordered) << 32) | element as u64
}

/// Prices every element's move into `moves` (see `settle`), branch-free so
/// that it vectorizes; an element that cannot move (no effect along u)
/// gets the largest key and is never reached. Returns the moves' total
/// |effect| and how many can move.
#[inline(always)]
fn price_moves(
    line: &Line,
    lowers: bool,
    weight: impl Fn(usize) -> f32,
    moves: &mut [u64],
) -> (f64, usize) {
    let mut effects = [0f32; 8];
    let mut movable = 0;
    for (chunk, keys) in moves.chunks_mut(8).enumerate() {
        for (lane, key) in keys.iter_mut().enumerate() {
            let k = chunk * 8 + lane;
            let per_unit = line.along[k] * line.steps[k];
            let delta = if (per_unit > 0.0) == lowers {
                1.0
            } else {
                -1.0
            };
            let e = line.values[k] - line.ideals[k];
            let s = line.steps[k];
            let price = weight(k) * (2.0 * delta * e * s + s * s) / per_unit.abs();
            effects[lane] += per_unit.abs();
            movable += usize::from(per_unit != 0.0);
            *key = if per_unit != 0.0 {
                move_key(price, k)
            } else {
                u64::MAX
            };
        }
    }
    (effects.iter().map(|&x| f64::from(x)).sum(), movable)
}

/// Puts the `k` smallest of `items` first, in order, in one scan.
fn cheapest_first<T: Copy>(items: &mut [T], k: usize, cmp: impl Fn(&T, &T) -> std::cmp::Ordering) {
    let k = k.min(items.len());
    if k == 0 {
        return;
    }
    items[..k].sort_unstable_by(&cmp);
    for i in k..items.len() {
        if cmp(&items[i], &items[k - 1]).is_lt() {
            // Insert into the sorted prefix; the displaced largest goes to i.
            let item = items[i];
            let at = items[..k].partition_point(|x| cmp(x, &item).is_lt());
            items[i] = items[k - 1];
            items.copy_within(at..k - 1, at + 1);
            items[at] = item;
        }
    }
}

/// Moves element `k`'s code by `delta` if it stays in range.
fn move_code(ty: GgmlType, block: &mut [u8], k: usize, delta: i32) -> bool {
    let code = codes::get(ty, block, k);
    let q = code.q + delta;
    let ok = (code.lo..=code.hi).contains(&q);
    if ok {
        codes::set(ty, block, k, q);
    }
    ok
}

/// Each element's step in one block (steps are shared by groups of
/// elements with one scale).
fn block_steps(ty: GgmlType, block: &[u8], steps: &mut [f32]) {
    let group = codes::scale_group(ty);
    for (g, chunk) in steps.chunks_mut(group).enumerate() {
        chunk.fill(codes::get(ty, block, g * group).step);
    }
}

/// What settling an output projection's columns left, read back through
/// ggml's dequantizer.
pub(super) struct Settled {
    /// `uᵀV` per column.
    pub after: Vec<f64>,
    /// `‖V − X‖²`, with `X` the ideal edit.
    pub error2: f64,
    pub moves: u64,
    pub non_finite: u64,
}

/// Output projection: every stored row is an output feature `i`, so column
/// `j` of the slab gets `Σ_i u_i V_ij` to `target_j`; the ideal edit is
/// `(W_ij − s u_i v_j) norm_j`, with `original` W as ggml reads it (row
/// major). Columns are independent; tasks take one block-column each,
/// which owns disjoint bytes of every row.
#[allow(clippy::too_many_arguments)]
pub(super) fn settle_columns(
    ty: GgmlType,
    original: &[f32],
    dst: &mut [u8],
    row_len: usize,
    u: &[f32],
    scale: f32,
    v: &[f32],
    norm: &[f32],
    target: &[f64],
    tolerance: f64,
) -> Result<Settled> {
    let n_rows = u.len();
    let row_bytes = dst.len() / n_rows;
    let block_bytes = ty.type_size() as usize;
    let per_block = ty.block_size() as usize;
    let n_cols = row_len / per_block;
    let mut columns: Vec<Vec<&mut [u8]>> =
        (0..n_cols).map(|_| Vec::with_capacity(n_rows)).collect();
    for row in dst.chunks_exact_mut(row_bytes) {
        for (col, block) in columns.iter_mut().zip(row.chunks_exact_mut(block_bytes)) {
            col.push(block);
        }
    }
    let parts = columns
        .into_par_iter()
        .enumerate()
        .map(|(b, mut blocks)| -> Result<(Vec<f64>, f64, u64, u64)> {
            // Element-major: [row][element in block].
            let mut w = vec![0f32; per_block * n_rows];
            let mut q = vec![0f32; per_block * n_rows];
            let mut steps = vec![0f32; per_block * n_rows];
            for (i, block) in blocks.iter().enumerate() {
                let span = i * per_block..(i + 1) * per_block;
                w[span.clone()]
                    .copy_from_slice(&original[i * row_len + b * per_block..][..per_block]);
                ffi::dequantize_rows(ty, block, &mut q[span.clone()])?;
                block_steps(ty, block, &mut steps[span]);
            }
            // What each column writes now, row by row (cache order); only
            // the columns beyond their tolerance are gathered and settled.
            let mut written = vec![0f64; per_block];
            for (i, row) in q.chunks_exact(per_block).enumerate() {
                for (a, &x) in written.iter_mut().zip(row) {
                    *a += u[i] as f64 * x as f64;
                }
            }
            // Column-major copies, transposed a strip of rows at a time:
            // gathering each column with a whole block's stride missed the
            // cache on every element.
            let [wt, qt, st] = [&w, &q, &steps].map(|m| transposed(m, n_rows, per_block));
            let mut ideals = vec![0f32; n_rows];
            let mut keys = Vec::new();
            let mut moved = 0;
            for (c, &written) in written.iter().enumerate() {
                let j = b * per_block + c;
                if (written - target[j]).abs() <= tolerance {
                    continue;
                }
                let column = c * n_rows..(c + 1) * n_rows;
                let (vj, fj) = (v[j], norm[j]);
                for ((ideal, &w), &ui) in ideals.iter_mut().zip(&wt[column.clone()]).zip(u) {
                    *ideal = (w - scale * ui * vj) * fj;
                }
                let line = Line {
                    miss: written - target[j],
                    tolerance,
                    values: &qt[column.clone()],
                    ideals: &ideals,
                    along: u,
                    steps: &st[column],
                    // One column, one importance: it cannot change the order.
                    importance: None,
                };
                moved += settle(&line, &mut keys, |i, delta| {
                    move_code(ty, blocks[i], c, delta)
                });
            }
            // What ggml reads back from the final bytes.
            // Per-column sums (vectorized across the block), added up at the end.
            let mut after = vec![0f64; per_block];
            let mut error2 = vec![0f64; per_block];
            let (v, norm) = (
                &v[b * per_block..][..per_block],
                &norm[b * per_block..][..per_block],
            );
            for (i, block) in blocks.iter().enumerate() {
                let span = i * per_block..(i + 1) * per_block;
                ffi::dequantize_rows(ty, block, &mut q[span.clone()])?;
                let (su, ui) = (scale * u[i], u[i] as f64);
                for ((((a, e), &x), &w), (&vj, &fj)) in after
                    .iter_mut()
                    .zip(&mut error2)
                    .zip(&q[span.clone()])
                    .zip(&w[span])
                    .zip(v.iter().zip(norm))
                {
                    *a += ui * x as f64;
                    let d = x as f64 - ((w - su * vj) * fj) as f64;
                    *e += d * d;
                }
            }
            let non_finite = q.iter().filter(|x| !x.is_finite()).count() as u64;
            Ok((after, error2.iter().sum(), moved, non_finite))
        })
        .collect::<Result<Vec<_>>>()?;
    // Gathered in order, so the sums never depend on thread timing.
    let mut settled = Settled {
        after: Vec::with_capacity(row_len),
        error2: 0.0,
        moves: 0,
        non_finite: 0,
    };
    for (after, error2, moves, non_finite) in parts {
        settled.after.extend(after);
        settled.error2 += error2;
        settled.moves += moves;
        settled.non_finite += non_finite;
    }
    Ok(settled)
}

/// `m` (`rows × cols`, row major) as `cols × rows`, a strip of rows at a
/// time so that reads and writes both stay in the cache.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const STRIP: usize = 8;
    let mut t = vec![0f32; m.len()];
    for i0 in (0..rows).step_by(STRIP) {
        let strip = &m[i0 * cols..(i0 + STRIP).min(rows) * cols];
        let h = strip.len() / cols;
        for j in 0..cols {
            let out = &mut t[j * rows + i0..][..h];
            for (r, x) in out.iter_mut().enumerate() {
                *x = strip[r * cols + j];
            }
        }
    }
    t
}

/// Buffers `settle_row` reuses from row to row.
#[derive(Default)]
pub(super) struct RowScratch {
    steps: Vec<f32>,
    keys: Vec<u64>,
}

/// A row that is itself a residual vector (embedding rows): its dot with
/// `u`, `written` now, goes to `target`. `values` is the row as ggml reads
/// `dst` back and `ideal` the f32 edit; `importance` weighs each element's
/// error.
#[allow(clippy::too_many_arguments)]
pub(super) fn settle_row(
    ty: GgmlType,
    dst: &mut [u8],
    values: &[f32],
    ideal: &[f32],
    u: &[f32],
    (written, target): (f64, f64),
    tolerance: f64,
    importance: Option<&[f32]>,
    scratch: &mut RowScratch,
) -> u64 {
    let block_bytes = ty.type_size() as usize;
    let per_block = ty.block_size() as usize;
    let miss = written - target;
    if miss.abs() <= tolerance {
        return 0;
    }
    // Every step is rewritten below.
    scratch.steps.resize(values.len(), 0.0);
    for (block, steps) in dst
        .chunks_exact(block_bytes)
        .zip(scratch.steps.chunks_mut(per_block))
    {
        block_steps(ty, block, steps);
    }
    let line = Line {
        miss,
        tolerance,
        values,
        ideals: ideal,
        along: u,
        steps: &scratch.steps,
        importance,
    };
    settle(&line, &mut scratch.keys, |k, delta| {
        let block = &mut dst[k / per_block * block_bytes..][..block_bytes];
        move_code(ty, block, k % per_block, delta)
    })
}

#[cfg(test)]
mod tests {
    use super::move_key;

    #[test]
    fn transposed_swaps_rows_and_columns() {
        // 11 rows: a whole strip of 8 and a partial one.
        let (rows, cols) = (11, 5);
        let m: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let t = super::transposed(&m, rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(t[j * rows + i], m[i * cols + j]);
            }
        }
    }

    #[test]
    fn move_keys_sort_as_price_then_element() {
        let prices = [
            f32::NEG_INFINITY,
            -3.5,
            -0.0,
            0.0,
            1e-30,
            0.25,
            0.25,
            7.0,
            f32::INFINITY,
        ];
        let mut moves: Vec<(f32, usize)> = prices
            .iter()
            .enumerate()
            .rev()
            .map(|(i, &p)| (p, 10 - i))
            .collect();
        let mut keys: Vec<u64> = moves.iter().map(|&(p, k)| move_key(p, k)).collect();
        moves.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        keys.sort_unstable();
        let elements: Vec<usize> = keys.iter().map(|&k| k as u32 as usize).collect();
        assert_eq!(elements, moves.iter().map(|m| m.1).collect::<Vec<_>>());
    }
}
