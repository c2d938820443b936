//! Direct access to the integer code of one element inside a quantized
//! block, for the formats whose value is `step · q + offset` with `step` and
//! `offset` fixed by the block's scales. Moving `q` by ±1 moves exactly that
//! element by ±`step` and leaves every other element and scale untouched,
//! which a re-run of ggml's quantizer does not promise (the K-quants
//! re-choose their scales). Layouts follow ggml's `dequantize_row_*`; the
//! tests check every format against ggml's own dequantizer.

use crate::ffi::GgmlType;
use half::f16;

/// One element's code: its value moves by `step` per unit of `q`, and `q`
/// must stay within `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Code {
    pub q: i32,
    pub lo: i32,
    pub hi: i32,
    pub step: f32,
}

/// The formats with per-element codes this module can edit.
pub const SUPPORTED: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether this module can edit the codes of `ty`.
pub fn supports(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

/// Elements that share one scale, hence one step: 16 in Q6_K, 32 in the
/// other supported formats (a whole block, or a K-quant sub-block).
pub fn scale_group(ty: GgmlType) -> usize {
    if ty == GgmlType::Q6_K {
        16
    } else {
        32
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Where a 4-bit nibble and an optional high part live. Stored codes run
/// from 0 to the largest value their bits hold.
struct Place {
    /// Byte and shift of the low 4 bits.
    nibble: (usize, u32),
    /// Byte, shift and width of the high bits, if any.
    high: Option<(usize, u32, u32)>,
    step: f32,
}

impl Place {
    fn max_code(&self) -> i32 {
        self.high.map_or(15, |(_, _, width)| (16 << width) - 1)
    }
}

fn place(ty: GgmlType, b: &[u8], k: usize) -> Place {
    match ty {
        t if [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ]
        .contains(&t) =>
        {
            // d (f16), then m (f16) in the _1 types, then the 5-bit types'
            // 32 high bits, then 16 bytes: elements 0..16 in the low
            // nibbles, 16..32 in the high ones.
            let with_min = t == GgmlType::Q4_1 || t == GgmlType::Q5_1;
            let five_bit = t == GgmlType::Q5_0 || t == GgmlType::Q5_1;
            let qh = if with_min { 4 } else { 2 };
            let qs = qh + if five_bit { 4 } else { 0 };
            Place {
                nibble: (qs + k % 16, if k < 16 { 0 } else { 4 }),
                high: five_bit.then(|| (qh + k / 8, (k % 8) as u32, 1)),
                step: f16_at(b, 0),
            }
        }
        t if t == GgmlType::Q4_K || t == GgmlType::Q5_K => {
            // 64-element chunks: 32 low nibbles then 32 high nibbles.
            let (chunk, l) = (k / 64, k % 64);
            let (sc, _) = scale_min_k4(k / 32, &b[4..16]);
            let qs = if t == GgmlType::Q4_K { 16 } else { 48 };
            Place {
                nibble: (qs + chunk * 32 + l % 32, if l < 32 { 0 } else { 4 }),
                high: (t == GgmlType::Q5_K)
                    .then(|| (16 + l % 32, (2 * chunk + usize::from(l >= 32)) as u32, 1)),
                step: f16_at(b, 0) * sc as f32,
            }
        }
        t if t == GgmlType::Q6_K => {
            // 128-element halves; within one, quarters of 32 share `l`.
            let (half, r) = (k / 128, k % 128);
            let (quarter, l) = (r / 32, r % 32);
            let ql = half * 64 + l + if quarter % 2 == 1 { 32 } else { 0 };
            let qh = 128 + half * 32 + l;
            let sc = b[192 + half * 8 + l / 16 + 2 * quarter] as i8;
            Place {
                nibble: (ql, if quarter >= 2 { 4 } else { 0 }),
                high: Some((qh, 2 * quarter as u32, 2)),
                step: f16_at(b, 208) * sc as f32,
            }
        }
        _ => unreachable!("checked by supports()"),
    }
}

/// Element `k` of the block `b` (of type `ty`, which [`supports`] accepts).
pub fn get(ty: GgmlType, b: &[u8], k: usize) -> Code {
    if ty == GgmlType::Q8_0 {
        return Code {
            q: b[2 + k] as i8 as i32,
            lo: -127,
            hi: 127,
            step: f16_at(b, 0),
        };
    }
    let p = place(ty, b, k);
    let mut q = ((b[p.nibble.0] >> p.nibble.1) & 0xF) as i32;
    if let Some((at, shift, width)) = p.high {
        q |= (((b[at] >> shift) & ((1 << width) - 1)) as i32) << 4;
    }
    Code {
        q,
        lo: 0,
        hi: p.max_code(),
        step: p.step,
    }
}

/// Stores code `q` (within the element's `lo..=hi`) for element `k`.
pub fn set(ty: GgmlType, b: &mut [u8], k: usize, q: i32) {
    if ty == GgmlType::Q8_0 {
        b[2 + k] = q as i8 as u8;
        return;
    }
    let p = place(ty, b, k);
    let (at, shift) = p.nibble;
    b[at] = (b[at] & !(0xF << shift)) | (((q & 0xF) as u8) << shift);
    if let Some((at, shift, width)) = p.high {
        let mask = ((1u8 << width) - 1) << shift;
        b[at] = (b[at] & !mask) | ((((q >> 4) as u8) << shift) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

    /// For every format: moving one element's code by ±1 moves exactly
    /// that element, by exactly `step`, as ggml's dequantizer reads it.
    #[test]
    fn one_code_step_moves_one_element_by_step_in_ggml() {
        let n = 512;
        let values: Vec<f32> = (0..n)
            .map(|i| (((i * 7919) % 997) as f32 / 997.0 - 0.45) * (1.0 + (i % 7) as f32))
            .collect();
        for ty in SUPPORTED {
            assert!(supports(ty));
            let bytes = quant::quantize(ty, &values, n, None).unwrap();
            let before = quant::dequantize(ty, &bytes, n).unwrap();
            let block = ty.type_size() as usize;
            let per_block = ty.block_size() as usize;
            let mut moved = 0;
            for k in 0..n {
                let (bi, kk) = (k / per_block, k % per_block);
                let mut edited = bytes.clone();
                let b = &mut edited[bi * block..(bi + 1) * block];
                let c = get(ty, b, kk);
                assert!((c.lo..=c.hi).contains(&c.q), "{ty} {k}: {c:?}");
                let q = if c.q < c.hi { c.q + 1 } else { c.q - 1 };
                set(ty, b, kk, q);
                assert_eq!(get(ty, b, kk).q, q, "{ty} {k}");
                let after = quant::dequantize(ty, &edited, n).unwrap();
                for (j, (a, o)) in after.iter().zip(&before).enumerate() {
                    if j == k {
                        let want = o + (q - c.q) as f32 * c.step;
                        assert!(
                            (a - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{ty} {k}: {a} vs {want}"
                        );
                    } else {
                        assert_eq!(a, o, "{ty}: element {j} moved when {k} was edited");
                    }
                }
                moved += usize::from(c.step != 0.0);
                let group = k / scale_group(ty) * scale_group(ty) % per_block;
                assert_eq!(
                    c.step,
                    get(ty, &bytes[bi * block..], group).step,
                    "{ty} {k}: one step per scale group"
                );
            }
            assert!(moved > n / 2, "{ty}: only {moved} elements have a step");
        }
    }
}
