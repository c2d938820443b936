//! All `unsafe` contact with llama.cpp and ggml lives here, behind a small
//! safe API: ggml's type table and quantizers, model loading, tokenizing,
//! chat templates, batched decoding and an eval-callback hook that can read
//! and rewrite the residual stream.

mod ggml;
mod llama;

pub use ggml::{dequantize_rows, quantize_rows, validate_rows, GgmlType};
pub use llama::{
    apply_chat_template, builtin_chat_templates, count_generated, decode_count, init_backend,
    read_control_vector, Batch, Context, ContextOptions, DecodeCount, Model, Node, ResidualHook,
};

pub(crate) use llama_cpp_sys_2 as sys;
