//! `inspect`: what a GGUF holds and what an edit would do to it.

use crate::edit::{classify, EditKind};
use crate::gguf::{self, GgufFile};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

pub fn inspect(path: &Path) -> Result<String> {
    let shards = gguf::open_model(path)?;
    let meta = &shards[0];
    let arch = meta
        .architecture()
        .context("no general.architecture key")?
        .to_string();
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "file:          {}", path.display())?;
    if shards.len() > 1 {
        writeln!(w, "shards:        {}", shards.len())?;
    }
    writeln!(w, "GGUF version:  {}", meta.version)?;
    if let Some(name) = meta.get_str("general.name") {
        writeln!(w, "name:          {name}")?;
    }
    writeln!(w, "architecture:  {arch}")?;
    let num = |k: &str| meta.arch_u64(k).map_or("?".to_string(), |v| v.to_string());
    writeln!(w, "layers:        {}", num("block_count"))?;
    writeln!(w, "n_embd:        {}", num("embedding_length"))?;
    let tied = !shards.iter().any(|s| s.tensor("output.weight").is_some());
    writeln!(
        w,
        "embeddings:    {}",
        if tied {
            "tied (token_embd is also the unembedding)"
        } else {
            "untied"
        }
    )?;
    let template = meta.get_str("tokenizer.chat_template").is_some();
    writeln!(
        w,
        "chat template: {}",
        if template {
            "yes"
        } else {
            "none (use --chat-template)"
        }
    )?;
    writeln!(w, "metadata keys: {}", meta.kvs.len())?;
    let abliterated = meta
        .kvs
        .iter()
        .any(|kv| kv.key.starts_with(crate::apply::PROVENANCE_PREFIX));
    if abliterated {
        writeln!(w, "provenance:    already edited by gguf-abliterate")?;
    }

    writeln!(w, "\n{:<36} {:>8} {:>22}  edit", "tensor", "type", "shape")?;
    let mut types: BTreeMap<String, (usize, usize, bool)> = BTreeMap::new();
    let mut n_edit = 0;
    for shard in &shards {
        for t in &shard.tensors {
            let action = match classify(&arch, &t.name) {
                None => "-".to_string(),
                Some((kind, post_norm)) => {
                    n_edit += 1;
                    let what = match kind {
                        EditKind::EmbeddingRows if tied => "embedding rows (also unembedding)",
                        EditKind::EmbeddingRows => "embedding rows",
                        EditKind::OutputProjection => "output side",
                        EditKind::Bias => "bias",
                    };
                    let via = post_norm
                        .filter(|n| shard_has(&shards, n))
                        .map(|n| format!(", through {n}"))
                        .unwrap_or_default();
                    format!("{what}{via}{}", rewrite_note(t.ty))
                }
            };
            let entry = types.entry(t.ty.name()).or_insert((
                0,
                0,
                t.ty.is_rewritable() && !t.ty.requires_imatrix(),
            ));
            entry.0 += 1;
            if action != "-" {
                entry.1 += 1;
            }
            writeln!(
                w,
                "{:<36} {:>8} {:>22}  {action}",
                t.name,
                t.ty.name(),
                t.shape_string()
            )?;
        }
    }
    writeln!(w, "\n{n_edit} tensors would be edited.")?;
    writeln!(
        w,
        "\n{:<10} {:>8} {:>8}  rewritable",
        "type", "tensors", "edited"
    )?;
    for (name, (count, edited, ok)) in types {
        writeln!(
            w,
            "{name:<10} {count:>8} {edited:>8}  {}",
            if ok { "yes" } else { "no" }
        )?;
    }
    Ok(out)
}

fn shard_has(shards: &[GgufFile], name: &str) -> bool {
    shards.iter().any(|s| s.tensor(name).is_some())
}

fn rewrite_note(ty: crate::ffi::GgmlType) -> &'static str {
    if ty.requires_imatrix() {
        "  [needs an importance matrix: cannot rewrite]"
    } else if !ty.is_rewritable() {
        "  [type cannot be rewritten]"
    } else {
        ""
    }
}
