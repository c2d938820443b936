//! ggml's type table and row (de)quantizers.

use super::sys;
use anyhow::{bail, Result};
use std::ffi::CStr;

/// A ggml tensor type, as stored in a GGUF tensor info.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// Types `ggml_quantize_chunk` can write. Anything else would hit its
/// `assert(false)` default branch, so it must never be passed there.
const REWRITABLE: &[u32] = &[
    sys::GGML_TYPE_F32,
    sys::GGML_TYPE_F16,
    sys::GGML_TYPE_BF16,
    sys::GGML_TYPE_Q4_0,
    sys::GGML_TYPE_Q4_1,
    sys::GGML_TYPE_Q5_0,
    sys::GGML_TYPE_Q5_1,
    sys::GGML_TYPE_Q8_0,
    sys::GGML_TYPE_Q2_K,
    sys::GGML_TYPE_Q3_K,
    sys::GGML_TYPE_Q4_K,
    sys::GGML_TYPE_Q5_K,
    sys::GGML_TYPE_Q6_K,
    sys::GGML_TYPE_IQ2_XXS,
    sys::GGML_TYPE_IQ2_XS,
    sys::GGML_TYPE_IQ2_S,
    sys::GGML_TYPE_IQ3_XXS,
    sys::GGML_TYPE_IQ3_S,
    sys::GGML_TYPE_IQ1_S,
    sys::GGML_TYPE_IQ1_M,
    sys::GGML_TYPE_IQ4_NL,
    sys::GGML_TYPE_IQ4_XS,
    sys::GGML_TYPE_TQ1_0,
    sys::GGML_TYPE_TQ2_0,
    sys::GGML_TYPE_MXFP4,
    sys::GGML_TYPE_NVFP4,
    sys::GGML_TYPE_Q1_0,
    sys::GGML_TYPE_Q2_0,
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(sys::GGML_TYPE_F32);
    pub const F16: GgmlType = GgmlType(sys::GGML_TYPE_F16);
    pub const BF16: GgmlType = GgmlType(sys::GGML_TYPE_BF16);
    pub const Q4_0: GgmlType = GgmlType(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: GgmlType = GgmlType(sys::GGML_TYPE_Q4_1);
    pub const Q5_0: GgmlType = GgmlType(sys::GGML_TYPE_Q5_0);
    pub const Q5_1: GgmlType = GgmlType(sys::GGML_TYPE_Q5_1);
    pub const Q8_0: GgmlType = GgmlType(sys::GGML_TYPE_Q8_0);
    pub const Q2_K: GgmlType = GgmlType(sys::GGML_TYPE_Q2_K);
    pub const Q3_K: GgmlType = GgmlType(sys::GGML_TYPE_Q3_K);
    pub const Q4_K: GgmlType = GgmlType(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: GgmlType = GgmlType(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: GgmlType = GgmlType(sys::GGML_TYPE_Q6_K);
    pub const IQ2_XXS: GgmlType = GgmlType(sys::GGML_TYPE_IQ2_XXS);
    pub const IQ4_NL: GgmlType = GgmlType(sys::GGML_TYPE_IQ4_NL);
    pub const IQ4_XS: GgmlType = GgmlType(sys::GGML_TYPE_IQ4_XS);

    fn traits(self) -> Option<&'static sys::ggml_type_traits> {
        if self.0 >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: in range; ggml returns a pointer into a static table.
        let traits = unsafe { sys::ggml_get_type_traits(self.0).as_ref()? };
        // Removed types (Q4_2, Q4_3, …) keep a zeroed slot.
        (traits.blck_size > 0 && traits.type_size > 0).then_some(traits)
    }

    /// True for ids ggml knows and can size.
    pub fn is_known(self) -> bool {
        self.traits().is_some()
    }

    pub fn name(self) -> String {
        match self.traits() {
            // SAFETY: type_name is a static NUL-terminated string.
            Some(t) if !t.type_name.is_null() => unsafe { CStr::from_ptr(t.type_name) }
                .to_string_lossy()
                .to_uppercase(),
            _ => format!("type#{}", self.0),
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.traits().map_or(0, |t| t.blck_size as u64)
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().map_or(0, |t| t.type_size as u64)
    }

    /// Bytes for one row of `n_per_row` elements, if that is a whole number of blocks.
    pub fn row_bytes(self, n_per_row: u64) -> Option<u64> {
        let bs = self.block_size();
        if bs == 0 || n_per_row % bs != 0 {
            return None;
        }
        (n_per_row / bs).checked_mul(self.type_size())
    }

    pub fn requires_imatrix(self) -> bool {
        // SAFETY: pure lookup.
        self.is_known() && unsafe { sys::ggml_quantize_requires_imatrix(self.0) }
    }

    /// Whether this type can be dequantized and written back by ggml.
    pub fn is_rewritable(self) -> bool {
        REWRITABLE.contains(&self.0)
            && (self == GgmlType::F32 || self.traits().is_some_and(|t| t.to_float.is_some()))
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Dequantizes whole rows of `ty` into `dst` (`dst.len()` elements).
pub fn dequantize_rows(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    if ty == GgmlType::F32 {
        // ggml has no to_float for F32: it is already floats.
        if src.len() != dst.len() * 4 {
            bail!(
                "F32: {} bytes cannot hold {} elements",
                src.len(),
                dst.len()
            );
        }
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes(s.try_into().expect("4 bytes"));
        }
        return Ok(());
    }
    let Some(to_float) = ty.traits().and_then(|t| t.to_float) else {
        bail!("ggml has no dequantizer for {ty}");
    };
    let need = ty.row_bytes(dst.len() as u64);
    if need != Some(src.len() as u64) {
        bail!(
            "{ty}: {} bytes cannot hold {} elements",
            src.len(),
            dst.len()
        );
    }
    // SAFETY: sizes checked above; to_float reads src.len() bytes and writes dst.len() floats.
    unsafe { to_float(src.as_ptr().cast(), dst.as_mut_ptr(), dst.len() as i64) };
    Ok(())
}

/// Quantizes `nrows` rows of `n_per_row` floats from `src` into `dst` and
/// validates the result the way llama.cpp does when loading. `importance`
/// (one weight per column, as `llama-imatrix` writes it) steers the
/// quantizers that accept one; the others ignore it.
pub fn quantize_rows(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
    n_per_row: usize,
    importance: Option<&[f32]>,
) -> Result<()> {
    if !ty.is_rewritable() {
        bail!("ggml cannot write {ty}");
    }
    if ty.requires_imatrix() && importance.is_none() {
        bail!("{ty} needs an importance matrix to be quantized");
    }
    if let Some(imp) = importance {
        if imp.len() != n_per_row {
            bail!(
                "{ty}: importance matrix has {} columns, rows have {n_per_row}",
                imp.len()
            );
        }
        if imp.iter().any(|x| !x.is_finite() || *x < 0.0) {
            bail!("{ty}: importance matrix holds negative or non-finite values");
        }
    }
    let row_bytes = ty
        .row_bytes(n_per_row as u64)
        .ok_or_else(|| anyhow::anyhow!("{ty}: row of {n_per_row} is not whole blocks"))?;
    if n_per_row == 0 || src.len() % n_per_row != 0 {
        bail!(
            "{ty}: {} floats are not whole rows of {n_per_row}",
            src.len()
        );
    }
    let nrows = src.len() / n_per_row;
    if dst.len() as u64 != nrows as u64 * row_bytes {
        bail!("{ty}: output buffer has the wrong size");
    }
    // SAFETY: type is one ggml_quantize_chunk handles, with an importance
    // matrix where it needs one (n_per_row floats); src holds
    // nrows*n_per_row floats and dst exactly nrows rows.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.0,
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            importance.map_or(std::ptr::null(), <[f32]>::as_ptr),
        )
    };
    if written != dst.len() {
        bail!("{ty}: ggml wrote {written} bytes, expected {}", dst.len());
    }
    if !validate_rows(ty, dst) {
        bail!("{ty}: requantized data failed ggml_validate_row_data (NaN or Inf)");
    }
    Ok(())
}

/// llama.cpp's own load-time check of quantized data.
pub fn validate_rows(ty: GgmlType, data: &[u8]) -> bool {
    // SAFETY: ggml reads data.len() bytes.
    unsafe { sys::ggml_validate_row_data(ty.0, data.as_ptr().cast(), data.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_table_matches_ggml_layouts() {
        assert_eq!(GgmlType::Q8_0.block_size(), 32);
        assert_eq!(GgmlType::Q8_0.type_size(), 34);
        assert_eq!(GgmlType::Q4_K.block_size(), 256);
        assert_eq!(GgmlType::Q4_K.name(), "Q4_K");
        assert_eq!(GgmlType::F16.row_bytes(10), Some(20));
        assert_eq!(GgmlType::Q4_0.row_bytes(31), None);
        assert!(!GgmlType(4).is_known(), "Q4_2 was removed from ggml");
        assert!(!GgmlType(9999).is_known());
        assert!(GgmlType::IQ2_XXS.requires_imatrix());
        assert!(!GgmlType(sys::GGML_TYPE_Q8_K).is_rewritable());
    }

    #[test]
    fn quantize_then_dequantize_round_trips_within_type_error() {
        let n = 256;
        let src: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut q = vec![0u8; GgmlType::Q8_0.row_bytes(n as u64).unwrap() as usize];
        quantize_rows(GgmlType::Q8_0, &src, &mut q, n, None).unwrap();
        let mut back = vec![0f32; n];
        dequantize_rows(GgmlType::Q8_0, &q, &mut back).unwrap();
        let err = src
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.01, "max error {err}");
    }

    #[test]
    fn imatrix_types_are_refused_without_one_and_written_with_one() {
        let src = vec![0.5f32; 256];
        let mut dst = vec![0u8; GgmlType::IQ2_XXS.row_bytes(256).unwrap() as usize];
        let err = quantize_rows(GgmlType::IQ2_XXS, &src, &mut dst, 256, None).unwrap_err();
        assert!(err.to_string().contains("importance matrix"));
        let src: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let importance = vec![1.0f32; 256];
        quantize_rows(GgmlType::IQ2_XXS, &src, &mut dst, 256, Some(&importance)).unwrap();
        let mut back = vec![0f32; 256];
        dequantize_rows(GgmlType::IQ2_XXS, &dst, &mut back).unwrap();
        let (err, norm) = src.iter().zip(&back).fold((0f32, 0f32), |(e, n), (a, b)| {
            (e + (a - b).powi(2), n + a * a)
        });
        assert!(err < 0.5 * norm, "IQ2_XXS error {err} of {norm}");
    }
}
