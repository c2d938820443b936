//! gguf-abliterate: find a chat model's refusal direction by running the
//! quantized GGUF through llama.cpp, then project it out of every tensor
//! that writes into the residual stream, writing a GGUF of the same types.
//!
//! The data flows one way, and the modules follow it:
//! `ffi` (llama.cpp) → `prompts` → `activations` → `direction` →
//! `edit` (math) + `quant` → `gguf` (container) via `apply` → `verify` (with `perplexity`)
//! → `report`. `judge` decides refusals for both the search and `verify`;
//! `pipeline` runs the stages in order for the command line.

pub mod activations;
pub mod apply;
pub mod cache;
pub mod chat;
pub mod cost;
pub mod direction;
pub mod edit;
pub mod eval;
pub mod ffi;
pub mod gguf;
pub mod imatrix;
pub mod inspect;
pub mod judge;
pub mod output;
pub mod perplexity;
pub mod pipeline;
pub mod prompts;
pub mod quant;
pub mod report;
pub mod rewrite;
pub mod signals;
pub mod verify;
