//! llama.cpp control vectors (`--control-vector-scaled CV.gguf:-1`).
//!
//! llama.cpp names tensors `direction.N` and adds `direction.N` to the
//! output of block N (`l_out-N`); there is no slot for N = 0. Our layer
//! numbers are `l_out` indices too, so the chosen layer maps directly.

use crate::ffi::GgmlType;
use crate::gguf::{encode_new, NewTensor, Value};
use anyhow::{bail, Result};

/// Encodes `vector` as a control vector for `layer` of an `arch` model.
pub fn encode(arch: &str, n_layer: usize, layer: usize, vector: &[f32]) -> Result<Vec<u8>> {
    if layer == 0 {
        bail!("llama.cpp control vectors cannot act on layer 0; choose --layer 1 or higher");
    }
    let data: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let kvs = vec![
        (
            "general.architecture".to_string(),
            Value::String("controlvector".into()),
        ),
        (
            "controlvector.model_hint".to_string(),
            Value::String(arch.to_string()),
        ),
        (
            "controlvector.layer_count".to_string(),
            Value::I32(n_layer as i32 - 1),
        ),
    ];
    let tensor = NewTensor {
        name: format!("direction.{layer}"),
        dims: vec![vector.len() as u64],
        ty: GgmlType::F32,
        data: &data,
    };
    Ok(encode_new(&kvs, &[tensor]))
}
