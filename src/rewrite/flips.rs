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
    /// Per element: value as ggml reads it minus value in the ideal f32
    /// edit, weight along `u`, value change per code step, error weight.
    errors: &'a [f32],
    along: &'a [f32],
    steps: &'a [f32],
    importance: Option<&'a [f32]>,
    /// The other directions of a subspace, each with its own miss: a move
    /// is taken only if it lowers the whole squared miss, so that settling
    /// one direction never undoes what settling another did.
    cross: &'a [(&'a [f32], f64)],
}

/// The moves, cheapest first, that bring the line's miss within its
/// tolerance; `try_move(element, delta)` applies one if the code allows.
fn settle(line: &Line, scratch: &mut Keys, mut try_move: impl FnMut(usize, i32) -> bool) -> u64 {
    let mut miss = line.miss;
    if miss.abs() <= line.tolerance {
        return 0;
    }
    // Reused from line to line: every key is rewritten below, so it is
    // zeroed only when it grows.
    let moves = &mut scratch.keys;
    moves.resize(line.errors.len(), 0);
    // Price: added squared error per unit of |effect|. With d = ±1 the
    // direction that lowers |miss|, e = value − ideal and s the step:
    // ((e + d s)² − e²) / |a s| = (2 d e s + s²) / |a s|.
    let lowers = miss < 0.0;
    let (total_effect, movable) = price_moves(line, lowers, moves);
    // About as many of the cheapest as the miss should need (an average
    // move's effect) are ordered first, then more if those did not suffice
    // (`Batches`). Moves are still taken in price order, ties to the lower
    // index, so the batch sizes change the time, never the result.
    let mean_effect = total_effect / movable.max(1) as f64;
    let needed = ((miss.abs() - line.tolerance) / mean_effect).ceil();
    let first = if needed.is_finite() {
        (needed as usize).clamp(FIRST_BATCH, movable.max(FIRST_BATCH))
    } else {
        FIRST_BATCH
    };
    let mut taken = 0;
    let mut cross: Vec<f64> = line.cross.iter().map(|(_, m)| *m).collect();
    let mut batches = Batches::new(scratch, movable, first);
    while miss.abs() > line.tolerance {
        let Some(batch) = batches.next() else { break };
        for &key in batch {
            if miss.abs() <= line.tolerance {
                break;
            }
            let k = key as u32 as usize;
            let per_unit = (line.along[k] * line.steps[k]) as f64;
            // The direction priced above: toward the initial miss's zero.
            let delta = if (per_unit > 0.0) == lowers { 1 } else { -1 };
            let effect = delta as f64 * per_unit;
            // Only moves that leave |miss| smaller (across the subspace),
            // and codes in range.
            let lowers_miss = if cross.is_empty() {
                (miss + effect).abs() < miss.abs()
            } else {
                let step = delta as f64 * line.steps[k] as f64;
                let growth: f64 = line
                    .cross
                    .iter()
                    .zip(&cross)
                    .map(|((along, _), m)| {
                        let e = step * along[k] as f64;
                        2.0 * m * e + e * e
                    })
                    .sum();
                2.0 * miss * effect + effect * effect + growth < 0.0
            };
            if lowers_miss && try_move(k, delta) {
                miss += effect;
                if !cross.is_empty() {
                    let step = delta as f64 * line.steps[k] as f64;
                    for ((along, _), m) in line.cross.iter().zip(&mut cross) {
                        *m += step * along[k] as f64;
                    }
                }
                taken += 1;
            }
        }
    }
    taken
}

/// Keys `settle` reuses from line to line.
#[derive(Default)]
pub(super) struct Keys {
    keys: Vec<u64>,
    spare: Vec<u64>,
}

/// Keys sampled from a line for the price thresholds of its batches.
const SAMPLES: usize = 64;

/// The priced moves of one line in ascending order, a batch at a time:
/// each batch is every key at or below a threshold read off a sorted
/// sample of the keys, found in one branch-free scan and sorted (a
/// selection took several scans). Thresholds double in rank from one
/// that should let through about half of `first`; past the sample, or on
/// lines too short to sample, batches are selected, growing fourfold.
struct Batches<'a> {
    keys: &'a mut Vec<u64>,
    spare: &'a mut Vec<u64>,
    /// Keys before `start` were handed out; `movable` are not `u64::MAX`.
    start: usize,
    movable: usize,
    sample: Option<[u64; SAMPLES]>,
    rank: usize,
    /// Size of the next selected batch.
    batch: usize,
}

impl<'a> Batches<'a> {
    fn new(scratch: &'a mut Keys, movable: usize, first: usize) -> Self {
        let n = scratch.keys.len();
        let sample = (first > FIRST_BATCH && n >= 4 * SAMPLES).then(|| {
            let stride = n / SAMPLES;
            let mut sample: [u64; SAMPLES] = std::array::from_fn(|i| scratch.keys[i * stride]);
            sample.sort_unstable();
            sample
        });
        Batches {
            keys: &mut scratch.keys,
            spare: &mut scratch.spare,
            start: 0,
            movable,
            sample,
            rank: (first * SAMPLES).div_ceil(2 * n.max(1)),
            batch: first,
        }
    }

    fn next(&mut self) -> Option<&[u64]> {
        let start = self.start;
        if start >= self.movable {
            return None;
        }
        while let Some(sample) = &self.sample {
            let Some(&threshold) = sample.get(self.rank).filter(|&&t| t != u64::MAX) else {
                self.sample = None;
                break;
            };
            self.rank = 2 * self.rank + 1;
            let below = self.partition(threshold);
            if below > start {
                self.keys[start..below].sort_unstable();
                self.start = below;
                return Some(&self.keys[start..below]);
            }
        }
        let end = (start + self.batch).min(self.movable);
        let rest = &mut self.keys[start..];
        if start == 0 && end <= FIRST_BATCH {
            // One scan for the first few.
            cheapest_first(rest, end, u64::cmp);
        } else {
            if end - start < rest.len() {
                rest.select_nth_unstable(end - start - 1);
            }
            rest[..end - start].sort_unstable();
        }
        self.batch *= 4;
        self.start = end;
        Some(&self.keys[start..end])
    }

    /// Moves the keys after `start` at or below `threshold` to its front
    /// and returns where they end. Branch-free: each key is written to
    /// both ends of `spare` and the end it belongs to advances.
    fn partition(&mut self, threshold: u64) -> usize {
        let n = self.keys.len();
        self.spare.resize(n, 0);
        let (mut below, mut above) = (self.start, n);
        for &key in &self.keys[self.start..] {
            let take = key <= threshold;
            self.spare[below] = key;
            self.spare[above - 1] = key;
            below += usize::from(take);
            above -= usize::from(!take);
        }
        if self.start == 0 {
            std::mem::swap(self.keys, self.spare);
        } else {
            self.keys[self.start..].copy_from_slice(&self.spare[self.start..]);
        }
        below
    }
}

/// A move as one integer that sorts by price (in `f32::total_cmp`'s order),
/// then by element: comparing integers is what makes the selection cheap.
fn move_key(price: f32, element: usize) -> u64 {
    let bits = price.to_bits();
    // Negative: all bits flipped; positive: the sign bit set.
    let ordered = bits ^ (((bits as i32) >> 31) as u32 | 0x8000_0000);
    (u64::from(ordered) << 32) | element as u64
}

/// Prices every element's move into `moves` (see `settle`); an element that
/// cannot move (no effect along u) gets the largest key and is never
/// reached. Returns the moves' total |effect| and how many can move.
fn price_moves(line: &Line, lowers: bool, moves: &mut [u64]) -> (f64, usize) {
    let n = moves.len();
    let whole = n / LANES * LANES;
    let mut sums = Sums::default();
    let ones = [1f32; LANES];
    // Whole chunks as fixed-size arrays, branch-free: this vectorizes
    // (indexing the slices with branches cost ~10 ns per element).
    let lanes = |x: &[f32], start: usize| -> [f32; LANES] {
        x[start..start + LANES].try_into().expect("whole chunk")
    };
    for start in (0..whole).step_by(LANES) {
        let weights = line.importance.map_or(ones, |w| lanes(w, start));
        let keys = price_lanes(
            &lanes(line.errors, start),
            &lanes(line.along, start),
            &lanes(line.steps, start),
            &weights,
            lowers,
            start,
            &mut sums,
        );
        moves[start..start + LANES].copy_from_slice(&keys);
    }
    if whole < n {
        // The last partial chunk, padded with elements that cannot move.
        let padded = |x: &[f32]| {
            let mut a = [0f32; LANES];
            a[..n - whole].copy_from_slice(&x[whole..n]);
            a
        };
        let weights = line.importance.map_or(ones, padded);
        let keys = price_lanes(
            &padded(line.errors),
            &padded(line.along),
            &padded(line.steps),
            &weights,
            lowers,
            whole,
            &mut sums,
        );
        moves[whole..].copy_from_slice(&keys[..n - whole]);
    }
    (
        sums.effects.iter().map(|&x| f64::from(x)).sum(),
        sums.movable,
    )
}

#[derive(Default)]
struct Sums {
    effects: [f32; LANES],
    movable: usize,
}

/// `price_moves` on one chunk of elements `start..start + LANES`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn price_lanes(
    errors: &[f32; LANES],
    along: &[f32; LANES],
    steps: &[f32; LANES],
    weights: &[f32; LANES],
    lowers: bool,
    start: usize,
    sums: &mut Sums,
) -> [u64; LANES] {
    let mut prices = [0f32; LANES];
    let mut effects = [0f32; LANES];
    for lane in 0..LANES {
        (prices[lane], effects[lane]) = price_one(
            errors[lane],
            along[lane],
            steps[lane],
            weights[lane],
            lowers,
        );
    }
    let mut keys = [0u64; LANES];
    for lane in 0..LANES {
        sums.effects[lane] += effects[lane];
        let valid = effects[lane] != 0.0;
        sums.movable += usize::from(valid);
        // All ones (never reached) where the move has no effect.
        keys[lane] = move_key(prices[lane], start + lane) | u64::from(valid).wrapping_sub(1);
    }
    keys
}

/// Lanes of `price_moves`' partial sums.
const LANES: usize = 8;

/// One move's price and |effect| per unit (0: it cannot move `uᵀV`).
#[inline(always)]
fn price_one(e: f32, along: f32, step: f32, weight: f32, lowers: bool) -> (f32, f32) {
    let per_unit = along * step;
    let delta = if (per_unit > 0.0) == lowers {
        1.0
    } else {
        -1.0
    };
    let price = weight * (2.0 * delta * e * step + step * step) / per_unit.abs();
    (price, per_unit.abs())
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
    /// `u_aᵀV` per basis direction, per column.
    pub after: Vec<Vec<f64>>,
    /// `‖V − X‖²`, with `X` the ideal edit.
    pub error2: f64,
    pub moves: u64,
    pub non_finite: u64,
}

/// Output projection: every stored row is an output feature `i`, so column
/// `j` of the slab gets `Σ_i u_ai V_ij` to `target[a][j]` for each basis
/// direction `a`; the ideal edit is `(W_ij − s Σ_a u_ai v_aj) norm_j`, with
/// `original` W as ggml reads it (row major). Columns are independent;
/// tasks take one block-column each, which owns disjoint bytes of every
/// row. Several directions are settled in turn (`super::rounds`).
#[allow(clippy::too_many_arguments)]
pub(super) fn settle_columns(
    ty: GgmlType,
    original: &[f32],
    dst: &mut [u8],
    row_len: usize,
    basis: &[Vec<f32>],
    scale: f32,
    v: &[Vec<f32>],
    norm: &[f32],
    target: &[Vec<f64>],
    tolerance: &[f64],
) -> Result<Settled> {
    let n_rows = basis[0].len();
    let k = basis.len();
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
    // The ideal edit of one element.
    let ideal = |i: usize, j: usize, w: f32| -> f32 {
        let mut x = w - scale * basis[0][i] * v[0][j];
        for a in 1..k {
            x -= scale * basis[a][i] * v[a][j];
        }
        x * norm[j]
    };
    let parts = columns
        .into_par_iter()
        .enumerate()
        .map(|(b, mut blocks)| -> Result<(Vec<f64>, f64, u64, u64)> {
            let group = codes::scale_group(ty);
            let mut q = vec![0f32; per_block];
            let mut errors = vec![0f32; per_block * n_rows];
            // Steps are shared by a group's elements, so by its columns:
            // [group][row].
            let mut group_steps = vec![0f32; per_block / group * n_rows];
            let mut keys = Keys::default();
            let mut moved = 0;
            for a in super::rounds(k) {
                // Element-major ([row][element in block]): each element's
                // value as written minus its ideal, and what each column
                // writes now along each direction ([direction][column]).
                let mut written = vec![vec![0f64; per_block]; k];
                for (i, (block, e)) in blocks
                    .iter()
                    .zip(errors.chunks_exact_mut(per_block))
                    .enumerate()
                {
                    ffi::dequantize_rows(ty, block, &mut q)?;
                    let w = &original[i * row_len + b * per_block..][..per_block];
                    let ui64 = basis[a][i] as f64;
                    for (c, ((acc, e), (&x, &w))) in written[a]
                        .iter_mut()
                        .zip(e)
                        .zip(q.iter().zip(w))
                        .enumerate()
                    {
                        *acc += ui64 * x as f64;
                        *e = x - ideal(i, b * per_block + c, w);
                    }
                    for (other, written) in written.iter_mut().enumerate() {
                        if other != a {
                            let ui64 = basis[other][i] as f64;
                            for (acc, &x) in written.iter_mut().zip(&q) {
                                *acc += ui64 * x as f64;
                            }
                        }
                    }
                    for (g, steps) in group_steps.chunks_exact_mut(n_rows).enumerate() {
                        steps[i] = codes::get(ty, block, g * group).step;
                    }
                }
                // Column-major, transposed a strip of rows at a time:
                // gathering each column with a whole block's stride missed
                // the cache on every element.
                let errors = transposed(&errors, n_rows, per_block);
                for c in 0..per_block {
                    let j = b * per_block + c;
                    let miss = written[a][c] - target[a][j];
                    if miss.abs() <= tolerance[a] {
                        continue;
                    }
                    let cross: Vec<(&[f32], f64)> = (0..k)
                        .filter(|&o| o != a)
                        .map(|o| (basis[o].as_slice(), written[o][c] - target[o][j]))
                        .collect();
                    let line = Line {
                        miss,
                        tolerance: tolerance[a],
                        errors: &errors[c * n_rows..(c + 1) * n_rows],
                        along: &basis[a],
                        steps: &group_steps[c / group * n_rows..][..n_rows],
                        // One column, one importance: it cannot change the order.
                        importance: None,
                        cross: &cross,
                    };
                    moved += settle(&line, &mut keys, |i, delta| {
                        move_code(ty, blocks[i], c, delta)
                    });
                }
            }
            // What ggml reads back from the final bytes. Per-column sums
            // (vectorized across the block), added up at the end.
            let mut after = vec![0f64; k * per_block];
            let mut error2 = vec![0f64; per_block];
            let mut non_finite = 0;
            for (i, block) in blocks.iter().enumerate() {
                ffi::dequantize_rows(ty, block, &mut q)?;
                let w = &original[i * row_len + b * per_block..][..per_block];
                for (u, after) in basis.iter().zip(after.chunks_exact_mut(per_block)) {
                    let ui = u[i] as f64;
                    for (a, &x) in after.iter_mut().zip(&q) {
                        *a += ui * x as f64;
                    }
                }
                for (c, (e, (&x, &w))) in error2.iter_mut().zip(q.iter().zip(w)).enumerate() {
                    let d = x as f64 - ideal(i, b * per_block + c, w) as f64;
                    *e += d * d;
                }
                non_finite += q.iter().filter(|x| !x.is_finite()).count() as u64;
            }
            Ok((after, error2.iter().sum(), moved, non_finite))
        })
        .collect::<Result<Vec<_>>>()?;
    // Gathered in order, so the sums never depend on thread timing.
    let mut settled = Settled {
        after: vec![Vec::with_capacity(row_len); k],
        error2: 0.0,
        moves: 0,
        non_finite: 0,
    };
    for (after, error2, moves, non_finite) in parts {
        for (all, part) in settled.after.iter_mut().zip(after.chunks_exact(per_block)) {
            all.extend_from_slice(part);
        }
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
    errors: Vec<f32>,
    keys: Keys,
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
    cross: &[(&[f32], f64)],
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
    scratch.errors.clear();
    scratch
        .errors
        .extend(values.iter().zip(ideal).map(|(v, x)| v - x));
    let line = Line {
        miss,
        tolerance,
        errors: &scratch.errors,
        along: u,
        steps: &scratch.steps,
        importance,
        cross,
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

    /// However large the first batch, the batches hand out every movable
    /// key once, in ascending order: the batch sizes change the time only.
    #[test]
    fn batches_hand_out_the_movable_keys_in_order() {
        use super::{Batches, Keys};
        let n = 896;
        let mut state = 12345u64;
        let keys: Vec<u64> = (0..n)
            .map(|k| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if state >> 60 == 0 {
                    u64::MAX // cannot move
                } else {
                    move_key((state >> 40) as f32 / 1e3 - 100.0, k)
                }
            })
            .collect();
        let movable = keys.iter().filter(|&&k| k != u64::MAX).count();
        let mut expected: Vec<u64> = keys.iter().copied().filter(|&k| k != u64::MAX).collect();
        expected.sort_unstable();
        for first in [1, 8, 9, 40, 75, 300, movable] {
            let mut scratch = Keys {
                keys: keys.clone(),
                spare: Vec::new(),
            };
            let mut batches = Batches::new(&mut scratch, movable, first);
            let mut got = Vec::new();
            while let Some(batch) = batches.next() {
                assert!(!batch.is_empty());
                got.extend_from_slice(batch);
            }
            assert_eq!(got, expected, "first batch {first}");
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
