//! The GGUF container: a strict, bounds-checked parser that keeps every
//! header byte, and a writer that patches tensor data while copying the rest.
//!
//! We parse the header ourselves because the output must reproduce the
//! input's metadata byte for byte; readers that decode into generic values
//! lose the types (and some skip long arrays).

mod parse;
pub mod shards;
mod value;
mod write;

pub use parse::{GgufFile, KvEntry, TensorInfo};
pub use value::Value;

/// GGUF metadata type ids, for building arrays.
pub mod value_type {
    pub use super::value::{T_F32 as F32, T_STRING as STRING};
}
pub use write::{encode_kv, encode_new, write_patched, NewTensor};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;

use anyhow::{bail, Result};
use std::path::Path;

/// Opens a GGUF, and every other shard of it when it is the first shard of
/// a split (`split.count` > 1).
pub fn open_model(path: &Path) -> Result<Vec<GgufFile>> {
    let first = GgufFile::open(path)?;
    let count = first.get_u64("split.count").unwrap_or(1);
    if count <= 1 {
        return Ok(vec![first]);
    }
    if first.get_u64("split.no").unwrap_or(0) != 0 {
        bail!(
            "{} is not the first shard of its split; pass the -00001-of-… file",
            path.display()
        );
    }
    let Some(paths) = shards::sibling_paths(path, count as u32) else {
        bail!(
            "{} is a split GGUF but its name does not follow PREFIX-00001-of-0000N.gguf",
            path.display()
        );
    };
    let mut files = vec![first];
    for p in &paths[1..] {
        files.push(GgufFile::open(p)?);
    }
    Ok(files)
}
