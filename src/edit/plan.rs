//! Which tensors write into the residual stream, and along which direction
//! each must be edited.

use super::normalized;
use super::params::{Component, EditWeights};
use crate::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditKind {
    /// Rows are residual-stream vectors (`token_embd`): `e ← e − (e·u) u`.
    EmbeddingRows,
    /// Stored rows are output features (`attn_output`, `ffn_down*`).
    OutputProjection,
    /// Bias vectors added to the residual, one row of `n_embd` each.
    Bias,
}

/// Architectures whose `post_attention_norm` / `post_ffw_norm` scale the
/// projection's output just before it is added to the residual. Elsewhere
/// (qwen3next, gpt-oss, …) a tensor of that name is a pre-FFN norm.
pub const POST_NORM_ARCHS: &[&str] = &["gemma2", "gemma3", "olmo2", "exaone4", "glm4"];

/// Architecture families whose residual nodes, residual writers and
/// post-norms have been checked on a model llama.cpp loads
/// (docs/architectures.md, `tests/architectures.rs`). Any other family
/// could write into the residual stream through a tensor this tool does
/// not know, so it is refused rather than edited in part.
pub const SUPPORTED_ARCHS: &[&str] = &[
    "llama", "mistral3", "smollm3", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "phi3", "gemma",
    "gemma2", "gemma3", "olmo2", "glm4", "exaone4",
];

/// Fails with one line naming `arch` unless it is in [`SUPPORTED_ARCHS`].
pub fn check_supported(arch: &str) -> Result<()> {
    if !SUPPORTED_ARCHS.contains(&arch) {
        bail!(
            "architecture '{arch}' is not supported (supported: {}; see docs/architectures.md)",
            SUPPORTED_ARCHS.join(", ")
        );
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct PlannedEdit {
    /// Index of the shard holding the tensor.
    pub shard: usize,
    pub name: String,
    pub kind: EditKind,
    /// Orthonormal directions whose span is removed from this tensor's
    /// output: the refusal direction first, then any further ones.
    pub basis: Arc<Vec<Vec<f32>>>,
    /// The post-norm weight the direction was scaled by, if any.
    pub post_norm: Option<String>,
    /// This tensor's edit weight (times the global scale: the share removed).
    pub weight: f32,
}

pub struct EditPlan {
    pub edits: Vec<PlannedEdit>,
    pub n_embd: usize,
    /// No `output.weight`: the unembedding is `token_embd`.
    pub tied_embeddings: bool,
}

/// Classifies a tensor by name. Returns its edit kind and the post-norm
/// weight (if any) standing between it and the residual stream.
pub fn classify(arch: &str, name: &str) -> Option<(EditKind, Option<String>)> {
    if name == "token_embd.weight" {
        return Some((EditKind::EmbeddingRows, None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<u32>().ok()?;
    let (proj, suffix) = rest.rsplit_once('.')?;
    let kind = match suffix {
        "weight" => EditKind::OutputProjection,
        "bias" => EditKind::Bias,
        _ => return None,
    };
    let norm = match proj {
        "attn_output" => "post_attention_norm",
        "ffn_down" | "ffn_down_exps" | "ffn_down_shexp" => "post_ffw_norm",
        _ => return None,
    };
    let post_norm = POST_NORM_ARCHS
        .contains(&arch)
        .then(|| format!("blk.{layer}.{norm}.weight"));
    Some((kind, post_norm))
}

/// The unit direction to remove from a projection's output so that, after
/// a post-norm of weight `g`, its write has no component along `r`:
/// `g ⊙ r`, normalised.
pub fn post_norm_direction(g: &[f32], r: &[f32]) -> Option<Vec<f32>> {
    let scaled: Vec<f32> = g.iter().zip(r).map(|(g, r)| g * r).collect();
    normalized(&scaled)
}

/// Which projection a post-norm follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    /// `attn_output`, followed by `post_attention_norm`.
    Attention,
    /// `ffn_down`, followed by `post_ffw_norm`.
    Mlp,
}

/// The post-norm weights of a post-norm family ([`POST_NORM_ARCHS`]), per
/// layer: what the run-time ablation needs to act on each projection's
/// output before its post-norm, exactly as the edit does. Empty elsewhere.
#[derive(Clone, Debug, Default)]
pub struct PostNorms {
    pub weights: Vec<(usize, Projection, Vec<f32>)>,
}

impl PostNorms {
    pub fn read(shards: &[GgufFile]) -> Result<PostNorms> {
        let arch = shards[0].architecture().unwrap_or_default();
        let mut weights = Vec::new();
        if !POST_NORM_ARCHS.contains(&arch) {
            return Ok(PostNorms { weights });
        }
        for s in shards {
            for t in &s.tensors {
                let Some((layer, norm)) = t
                    .name
                    .strip_prefix("blk.")
                    .and_then(|rest| rest.split_once('.'))
                else {
                    continue;
                };
                let proj = match norm {
                    "post_attention_norm.weight" => Projection::Attention,
                    "post_ffw_norm.weight" => Projection::Mlp,
                    _ => continue,
                };
                let Ok(layer) = layer.parse() else { continue };
                weights.push((layer, proj, s.read_f32(t)?));
            }
        }
        Ok(PostNorms { weights })
    }
}

/// Plans the edit of every residual-writing tensor across `shards`
/// (the first shard carries the model metadata). Tensors whose weight is 0
/// are left out: they are copied unchanged. With `layer_directions` (one
/// per layer, or none) layer ℓ's writers lose `layer_directions[ℓ]` and
/// only `token_embd` loses `direction`.
pub fn plan_edits(
    shards: &[GgufFile],
    direction: &[f32],
    layer_directions: &[Vec<f32>],
    weights: &EditWeights,
) -> Result<EditPlan> {
    plan_subspace_edits(shards, direction, layer_directions, &[], weights)
}

/// `plan_edits` for a subspace: every writer also loses `further`
/// directions (the same for every layer), so that each tensor loses the
/// span of its own refusal direction and these.
pub fn plan_subspace_edits(
    shards: &[GgufFile],
    direction: &[f32],
    layer_directions: &[Vec<f32>],
    further: &[Vec<f32>],
    weights: &EditWeights,
) -> Result<EditPlan> {
    weights.validate()?;
    let meta = &shards[0];
    let arch = meta.architecture().context("no general.architecture key")?;
    check_supported(arch)?;
    let n_embd = meta
        .arch_u64("embedding_length")
        .with_context(|| format!("no {arch}.embedding_length key"))? as usize;
    let r = unit_direction(direction, n_embd, "direction")?;
    let per_layer = unit_layer_directions(meta, arch, n_embd, layer_directions)?;
    let further: Vec<Vec<f32>> = further
        .iter()
        .enumerate()
        .map(|(k, d)| unit_direction(d, n_embd, &format!("further direction {}", k + 1)))
        .map(|d| d.map(|d| d.to_vec()))
        .collect::<Result<_>>()?;
    let tied_embeddings = !shards.iter().any(|s| s.tensor("output.weight").is_some());

    let find = |name: &str| shards.iter().find_map(|s| s.tensor(name).map(|t| (s, t)));
    let mut edits = Vec::new();
    for (shard, file) in shards.iter().enumerate() {
        for t in &file.tensors {
            let Some((kind, post_norm)) = classify(arch, &t.name) else {
                continue;
            };
            let weight = Component::of(&t.name).map_or(1.0, |c| weights.weight(c));
            if weight == 0.0 {
                continue;
            }
            let out_axis = match kind {
                EditKind::OutputProjection => t.dims.get(1).copied(),
                _ => Some(t.dims[0]),
            };
            if out_axis != Some(n_embd as u64) {
                bail!(
                    "{} has shape {} but its residual axis should be n_embd = {n_embd}",
                    t.name,
                    t.shape_string()
                );
            }
            // A post-norm multiplies the projection's output by g before the
            // residual add, so the residual sees g ⊙ (W x): removing g ⊙ r
            // (normalised) from W's output is what zeroes rᵀ·(that write).
            // GGUF stores g as the effective multiplier (the Gemma converter
            // already folds in the +1).
            let r = match Component::of(&t.name) {
                Some(Component::Attention(l) | Component::Mlp(l)) if !per_layer.is_empty() => {
                    per_layer
                        .get(l)
                        .with_context(|| format!("{} is beyond the model's layers", t.name))?
                        .clone()
                }
                _ => r.clone(),
            };
            let norm = match post_norm.and_then(|n| find(&n).map(|(s, t)| (n, s, t))) {
                None => None,
                Some((norm_name, s, norm)) => {
                    let g = s.read_f32(norm)?;
                    if g.len() != n_embd {
                        bail!(
                            "{norm_name} has {} values, expected n_embd = {n_embd}",
                            g.len()
                        );
                    }
                    Some((norm_name, g))
                }
            };
            let g = norm.as_ref().map(|(_, g)| g.as_slice());
            let basis = writer_basis(&r, &further, g).with_context(|| match &norm {
                Some((name, _)) => format!("{name} ⊙ r is zero"),
                None => format!("the directions to remove from {} are degenerate", t.name),
            })?;
            let post_norm = norm.map(|(name, _)| name);
            edits.push(PlannedEdit {
                shard,
                name: t.name.clone(),
                kind,
                basis: Arc::new(basis),
                post_norm,
                weight,
            });
        }
    }
    if edits.is_empty() {
        bail!("no tensor that writes into the residual stream was found (architecture {arch})");
    }
    Ok(EditPlan {
        edits,
        n_embd,
        tied_embeddings,
    })
}

/// The orthonormal basis a writer loses: its refusal direction `r` (unit)
/// first, then each further direction with what the earlier ones span
/// taken out (Gram–Schmidt, twice for accuracy). A post-norm weight `g`
/// maps each direction `d` to `g ⊙ d` first: removing those from the
/// projection's output is what zeroes `dᵀ·` the write after the norm.
/// A further direction already in the span (within 1e-4 of its norm) adds
/// nothing and is left out. None if `g ⊙ r` is zero.
pub fn writer_basis(r: &[f32], further: &[Vec<f32>], g: Option<&[f32]>) -> Option<Vec<Vec<f32>>> {
    let first = match g {
        Some(g) => post_norm_direction(g, r)?,
        None => r.to_vec(),
    };
    let mut basis = vec![first];
    for d in further {
        let mut x: Vec<f64> = match g {
            Some(g) => d.iter().zip(g).map(|(d, g)| (d * g) as f64).collect(),
            None => d.iter().map(|&d| d as f64).collect(),
        };
        let norm0 = x.iter().map(|x| x * x).sum::<f64>().sqrt();
        for _ in 0..2 {
            for b in &basis {
                let c: f64 = x.iter().zip(b).map(|(x, &b)| x * b as f64).sum();
                x.iter_mut().zip(b).for_each(|(x, &b)| *x -= c * b as f64);
            }
        }
        let norm = x.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-4 * norm0 && norm.is_finite() {
            basis.push(x.iter().map(|x| (x / norm) as f32).collect());
        }
    }
    Some(basis)
}

/// Per-layer directions, checked against the model and normalized.
fn unit_layer_directions(
    meta: &GgufFile,
    arch: &str,
    n_embd: usize,
    layer_directions: &[Vec<f32>],
) -> Result<Vec<Arc<Vec<f32>>>> {
    if layer_directions.is_empty() {
        return Ok(Vec::new());
    }
    let n_layer = meta
        .arch_u64("block_count")
        .with_context(|| format!("no {arch}.block_count key"))? as usize;
    if layer_directions.len() != n_layer {
        bail!(
            "{} per-layer directions but the model has {n_layer} layers",
            layer_directions.len()
        );
    }
    layer_directions
        .iter()
        .enumerate()
        .map(|(l, d)| unit_direction(d, n_embd, &format!("the direction of layer {l}")))
        .collect()
}

/// `direction` normalized, provided it has `n_embd` finite values, not all
/// zero; errors name it as `what`.
fn unit_direction(direction: &[f32], n_embd: usize, what: &str) -> Result<Arc<Vec<f32>>> {
    if direction.len() != n_embd {
        bail!(
            "{what} has {} values but the model's n_embd is {n_embd}",
            direction.len()
        );
    }
    if direction.iter().any(|x| !x.is_finite()) {
        bail!("{what} contains NaN or infinite values");
    }
    let u = normalized(direction).with_context(|| format!("{what} is zero"))?;
    Ok(Arc::new(u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_edit_kinds() {
        use EditKind::*;
        assert_eq!(
            classify("llama", "token_embd.weight"),
            Some((EmbeddingRows, None))
        );
        assert_eq!(
            classify("llama", "blk.3.attn_output.weight"),
            Some((OutputProjection, None))
        );
        assert_eq!(classify("qwen2", "blk.0.ffn_down.bias"), Some((Bias, None)));
        assert_eq!(
            classify("qwen2moe", "blk.7.ffn_down_exps.weight"),
            Some((OutputProjection, None))
        );
        assert_eq!(
            classify("qwen2moe", "blk.7.ffn_down_shexp.weight"),
            Some((OutputProjection, None))
        );
        assert_eq!(
            classify("gemma3", "blk.2.attn_output.weight"),
            Some((
                OutputProjection,
                Some("blk.2.post_attention_norm.weight".into())
            ))
        );
        assert_eq!(
            classify("gemma2", "blk.2.ffn_down.weight"),
            Some((OutputProjection, Some("blk.2.post_ffw_norm.weight".into())))
        );
        // qwen3next's post_attention_norm is a pre-FFN norm, not a post-norm.
        assert_eq!(
            classify("qwen3next", "blk.2.attn_output.weight"),
            Some((OutputProjection, None))
        );
        for untouched in [
            "output.weight",
            "blk.1.attn_q.weight",
            "blk.1.ffn_up.weight",
            "blk.x.ffn_down.weight",
        ] {
            assert_eq!(classify("llama", untouched), None, "{untouched}");
        }
    }

    #[test]
    fn only_the_table_is_supported() {
        assert!(check_supported("qwen2").is_ok());
        let err = check_supported("mamba").unwrap_err().to_string();
        assert!(
            err.contains("'mamba' is not supported") && err.contains("docs/architectures.md"),
            "{err}"
        );
        for arch in POST_NORM_ARCHS {
            assert!(SUPPORTED_ARCHS.contains(arch), "{arch}");
        }
    }
}
