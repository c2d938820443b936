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

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Opens a GGUF, and every other shard of it when it is the first shard of
/// a split (`split.count` > 1). Every shard's split keys must agree with its
/// place in the split, as `llama-gguf-split` writes them.
pub fn open_model(path: &Path) -> Result<Vec<GgufFile>> {
    let first = GgufFile::open(path)?;
    let (index, count) = split_keys(&first)?;
    if count <= 1 {
        return Ok(vec![first]);
    }
    if index != 0 {
        bail!(
            "{} is shard {} of a split; pass the first (-00001-of-…) file",
            path.display(),
            index + 1
        );
    }
    let named = shards::parse_shard_name(path);
    let Some(paths) = named
        .as_ref()
        .filter(|(_, no, of)| (*no, *of) == (1, count))
        .and_then(|_| shards::sibling_paths(path, count))
    else {
        bail!(
            "{} says it is the first of {count} shards but its name is not PREFIX-00001-of-{count:05}.gguf",
            path.display()
        );
    };
    let mut files = vec![first];
    for (i, p) in paths.iter().enumerate().skip(1) {
        let shard = GgufFile::open(p)?;
        if split_keys(&shard)? != (i as u32, count) {
            bail!(
                "{} does not say it is shard {} of {count} (split.no/split.count)",
                p.display(),
                i + 1
            );
        }
        files.push(shard);
    }
    Ok(files)
}

/// Largest split `llama-gguf-split` can name (five digits).
const MAX_SHARDS: u64 = 99_999;

/// `(split.no, split.count)`, 0-based index; `(0, 1)` for an unsplit file.
fn split_keys(file: &GgufFile) -> Result<(u32, u32)> {
    split_keys_unchecked(file)
        .with_context(|| format!("{} has bad split keys", file.path.display()))
}

fn split_keys_unchecked(file: &GgufFile) -> Result<(u32, u32)> {
    let int = |key: &str| -> Result<Option<u64>> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                anyhow::anyhow!("{key} must be a non-negative integer, found {v:?}")
            }),
        }
    };
    let count = int("split.count")?.unwrap_or(1);
    let no = int("split.no")?.unwrap_or(0);
    if count == 0 || count > MAX_SHARDS {
        bail!("split.count is {count} (expected 1 to {MAX_SHARDS})");
    }
    if no >= count {
        bail!("split.no is {no} but split.count is {count}");
    }
    Ok((no as u32, count as u32))
}
