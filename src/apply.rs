//! `apply`: rewrite a GGUF so that no residual-stream writer can write
//! along the refusal direction. Tensors are streamed one at a time:
//! dequantize → orthogonalize → requantize to the same type.

use crate::edit::{self, EditKind, EditPlan, EditWeights, PlannedEdit};
use crate::gguf::{self, shards, GgufFile, TensorInfo, Value};
use crate::imatrix::Imatrix;
use crate::output::PendingFile;
use crate::rewrite;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Metadata keys we write; any already in the input are replaced.
pub const PROVENANCE_PREFIX: &str = "abliterate.";

#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Share of the component to remove: 1.0 removes it entirely.
    pub scale: f32,
    pub skip_embeddings: bool,
    /// Per-component, per-layer weights (times `scale`).
    pub weights: EditWeights,
    pub force: bool,
    /// Extra provenance (layer, model, …) stored as `abliterate.*` keys.
    pub provenance: Vec<(String, Value)>,
    pub progress: bool,
    /// Column importances for requantizing (`--imatrix` or collected during
    /// capture); required for IQ2_XXS, IQ2_XS and IQ1_S.
    pub imatrix: Option<std::sync::Arc<Imatrix>>,
    /// Grid-aware projection: iterate until the quantized tensor itself has
    /// lost the requested share of its component (`--exact-grid off`: one pass).
    pub exact_grid: bool,
    /// Give every write vector its norm back after the projection
    /// (`--preserve-norms`).
    pub preserve_norms: bool,
    /// Per-layer scope: one direction per layer for its writers (empty:
    /// every tensor loses the one direction).
    pub layer_directions: Vec<Vec<f32>>,
    /// Further directions every writer loses with its refusal direction:
    /// the edit removes the subspace they span (empty: one direction).
    pub further_directions: Vec<Vec<f32>>,
}

impl ApplyOptions {
    /// The weights with `skip_embeddings` folded in.
    pub fn effective_weights(&self) -> EditWeights {
        let mut w = self.weights;
        if self.skip_embeddings {
            w.embeddings = 0.0;
        }
        w
    }
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            scale: 1.0,
            skip_embeddings: false,
            weights: EditWeights::default(),
            force: false,
            provenance: Vec::new(),
            progress: true,
            imatrix: None,
            exact_grid: true,
            preserve_norms: false,
            layer_directions: Vec::new(),
            further_directions: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub ggml_type: String,
    /// Largest component along a removed direction it could write, before
    /// and after.
    pub max_before: f64,
    pub max_after: f64,
    pub post_norm: Option<String>,
    /// Share of the component removed (`scale` × the tensor's weight).
    pub removed: f32,
    /// `‖uᵀV‖ / ‖uᵀW‖` as ggml reads the written tensor back, for the
    /// removed direction that kept most; the request was `1 − removed`.
    pub kept: f64,
    /// Quantization error against the ideal f32 edit, relative to plain
    /// requantization's.
    pub error_ratio: f64,
    /// Quantization passes (1 = plain requantization).
    pub passes: u32,
    /// Element codes moved by one step after the quantization passes.
    pub moves: u64,
    /// Directions removed from it (2 or more: a subspace).
    pub directions: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    pub outputs: Vec<PathBuf>,
    pub tensors: Vec<TensorReport>,
    pub tied_embeddings: bool,
    pub embeddings_edited: bool,
    /// Where the requantization importances came from (`abliterate.imatrix`).
    pub imatrix: String,
    /// Directions in the subspace removed (1: the refusal direction alone).
    pub subspace_dim: usize,
}

/// Receives each tensor's report as it is written.
pub trait TensorSink {
    /// Tensor `done` of `total` (of shape `shape`) is written.
    fn tensor(&mut self, _done: usize, _total: usize, _shape: &str, _report: &TensorReport) {}
}

/// Hears nothing.
impl TensorSink for () {}

/// Rewrites `input` (and its other shards) to `output`.
pub fn apply(
    input: &Path,
    output: &Path,
    direction: &[f32],
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    apply_with(input, output, direction, opts, &mut ())
}

/// `apply`, telling `sink` of each tensor as it is written.
pub fn apply_with(
    input: &Path,
    output: &Path,
    direction: &[f32],
    opts: &ApplyOptions,
    sink: &mut dyn TensorSink,
) -> Result<ApplyReport> {
    if !(opts.scale > 0.0 && opts.scale <= 1.0) {
        bail!("--scale must be in (0, 1], got {}", opts.scale);
    }
    let shards = gguf::open_model(input)?;
    let plan = edit::plan_subspace_edits(
        &shards,
        direction,
        &opts.layer_directions,
        &opts.further_directions,
        &opts.effective_weights(),
    )
    .with_context(|| format!("planning the edit of {}", input.display()))?;
    check_rewritable(&shards, &plan, opts.imatrix.as_deref())?;

    let out_paths = if shards.len() == 1 {
        vec![output.to_path_buf()]
    } else {
        shards::output_paths(output, shards.len() as u32)
    };
    let inputs: Vec<&Path> = shards.iter().map(|s| s.path.as_path()).collect();
    let mut pending = Vec::new();
    for path in &out_paths {
        pending.push(PendingFile::create(path, &inputs, opts.force)?);
    }

    let total_bytes: u64 = plan.edits.iter().map(|e| tensor_of(&shards, e).size).sum();
    let bar = progress_bar(total_bytes, opts.progress);
    let mut reports = Vec::with_capacity(plan.edits.len());
    let provenance = provenance_kvs(&plan, direction, opts);
    let n_edits = plan.edits.len();

    for (index, (shard, (_, file))) in shards.iter().zip(pending.iter_mut()).enumerate() {
        let edits: Vec<&PlannedEdit> = plan.edits.iter().filter(|e| e.shard == index).collect();
        let infos: Vec<&TensorInfo> = edits.iter().map(|e| tensor_of(&shards, e)).collect();
        let kvs: &[(String, Value)] = if index == 0 { &provenance } else { &[] };
        gguf::write_patched(shard, PROVENANCE_PREFIX, kvs, &infos, file, |t| {
            let e = edits
                .iter()
                .find(|e| e.name == t.name)
                .expect("edited tensor is planned");
            let (bytes, report) = edit_tensor(shard, t, e, opts.scale * e.weight, opts)?;
            let shape = t.shape_string();
            bar.suspend(|| sink.tensor(reports.len() + 1, n_edits, &shape, &report));
            bar.inc(t.size);
            reports.push(report);
            shard.release(t);
            Ok(bytes)
        })
        .with_context(|| format!("writing {}", out_paths[index].display()))?;
    }
    bar.finish_and_clear();
    for (pending, file) in pending {
        pending.commit(file)?;
    }
    Ok(ApplyReport {
        outputs: out_paths,
        tensors: reports,
        tied_embeddings: plan.tied_embeddings,
        embeddings_edited: opts.effective_weights().embeddings > 0.0,
        imatrix: imatrix_source(opts),
        subspace_dim: 1 + opts.further_directions.len(),
    })
}

/// "file:NAME", "collected: …" or "none".
fn imatrix_source(opts: &ApplyOptions) -> String {
    opts.imatrix
        .as_ref()
        .map_or_else(|| "none".to_string(), |m| m.source.clone())
}

fn tensor_of<'a>(shards: &'a [GgufFile], e: &PlannedEdit) -> &'a TensorInfo {
    shards[e.shard]
        .tensor(&e.name)
        .expect("planned tensor exists")
}

/// Fails before writing anything if a planned tensor cannot be requantized.
fn check_rewritable(shards: &[GgufFile], plan: &EditPlan, imatrix: Option<&Imatrix>) -> Result<()> {
    // An importance matrix for another model would silently do nothing.
    // (Biases are never quantized with importances.)
    if let Some(m) = imatrix {
        let matrices: Vec<&PlannedEdit> = plan
            .edits
            .iter()
            .filter(|e| e.kind != EditKind::Bias)
            .collect();
        if !matrices.is_empty() && !matrices.iter().any(|e| m.get(&e.name).is_some()) {
            bail!(
                "importance matrix {} holds none of the {} tensors to edit (e.g. {}); was it made for this model?",
                m.source,
                matrices.len(),
                matrices[0].name
            );
        }
    }
    for e in &plan.edits {
        let t = tensor_of(shards, e);
        let importance = importance_for(t, imatrix)?;
        if t.ty.requires_imatrix() && importance.is_none() {
            bail!(
                "{} is {}, which ggml cannot requantize without an importance matrix: pass one with --imatrix FILE{}",
                t.name,
                t.ty,
                imatrix.map(|m| format!(" ({} has no entry for it)", m.source)).unwrap_or_default()
            );
        }
        if !t.ty.is_rewritable() {
            bail!("{} is {}, which ggml cannot requantize", t.name, t.ty);
        }
    }
    Ok(())
}

/// The importances to requantize `t` with, checked against its shape.
fn importance_for<'a>(t: &TensorInfo, imatrix: Option<&'a Imatrix>) -> Result<Option<&'a [f32]>> {
    let Some(m) = imatrix else { return Ok(None) };
    let row_len = t.row_len() as usize;
    // Experts (a third dimension) each have their own row of importances.
    let n_mat = t.dims.get(2..).map_or(1, |d| d.iter().product::<u64>()) as usize;
    m.for_tensor(&t.name, row_len, n_mat)
}

/// Dequantizes, edits and requantizes one tensor.
fn edit_tensor(
    shard: &GgufFile,
    t: &TensorInfo,
    e: &PlannedEdit,
    scale: f32,
    opts: &ApplyOptions,
) -> Result<(Vec<u8>, TensorReport)> {
    let request = rewrite::Request {
        kind: e.kind,
        basis: &e.basis,
        scale,
        importance: importance_for(t, opts.imatrix.as_deref())?,
        exact_grid: opts.exact_grid,
        preserve_norms: opts.preserve_norms,
    };
    let out = rewrite::rewrite(t.ty, shard.tensor_data(t), t.row_len() as usize, &request)
        .with_context(|| format!("rewriting {}", t.name))?;
    if out.non_finite > 0 {
        bail!(
            "{}: the edited tensor holds {} non-finite values (NaN/Inf); is the input tensor finite? Nothing was written",
            t.name,
            out.non_finite
        );
    }
    let report = TensorReport {
        name: t.name.clone(),
        ggml_type: t.ty.name(),
        max_before: out.max_before,
        max_after: out.max_after,
        post_norm: e.post_norm.clone(),
        removed: scale,
        kept: out.kept,
        error_ratio: out.error_ratio,
        passes: out.passes,
        moves: out.moves,
        directions: e.basis.len(),
    };
    Ok((out.bytes, report))
}

fn provenance_kvs(plan: &EditPlan, direction: &[f32], opts: &ApplyOptions) -> Vec<(String, Value)> {
    let key = |k: &str| format!("{PROVENANCE_PREFIX}{k}");
    let mut kvs = vec![
        (
            key("tool"),
            Value::String(format!("gguf-abliterate {}", env!("CARGO_PKG_VERSION"))),
        ),
        (key("scale"), Value::F32(opts.scale)),
        (
            key("embeddings_edited"),
            Value::Bool(opts.effective_weights().embeddings > 0.0),
        ),
        (
            key("weights"),
            Value::String(serde_json::to_string(&opts.effective_weights()).expect("serializable")),
        ),
        (
            key("edited_tensors"),
            Value::Array(
                gguf::value_type::STRING,
                plan.edits
                    .iter()
                    .map(|e| Value::String(e.name.clone()))
                    .collect(),
            ),
        ),
        (key("imatrix"), Value::String(imatrix_source(opts))),
        (key("preserve_norms"), Value::Bool(opts.preserve_norms)),
        (
            key("direction"),
            Value::Array(
                gguf::value_type::F32,
                direction.iter().map(|&x| Value::F32(x)).collect(),
            ),
        ),
        (
            key("per_layer"),
            Value::Bool(!opts.layer_directions.is_empty()),
        ),
    ];
    if !opts.layer_directions.is_empty() {
        // Layer after layer, n_embd values each: what `apply` used.
        kvs.push((key("layer_directions"), f32_array(&opts.layer_directions)));
    }
    if !opts.further_directions.is_empty() {
        // One after the other, n_embd values each; with `direction` they
        // span the subspace removed.
        kvs.push((
            key("subspace_dim"),
            Value::U32(1 + opts.further_directions.len() as u32),
        ));
        kvs.push((
            key("further_directions"),
            f32_array(&opts.further_directions),
        ));
    }
    for (k, v) in &opts.provenance {
        let k = key(k);
        if !kvs.iter().any(|(existing, _)| *existing == k) {
            kvs.push((k, v.clone()));
        }
    }
    kvs
}

/// Vectors one after the other, as one GGUF array of f32.
fn f32_array(vectors: &[Vec<f32>]) -> Value {
    Value::Array(
        gguf::value_type::F32,
        vectors.iter().flatten().map(|&x| Value::F32(x)).collect(),
    )
}

fn progress_bar(total: u64, show: bool) -> ProgressBar {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} rewriting [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}
