//! Residual-stream capture: the mean activation at each layer's output and
//! each post-instruction position, over a prompt set, accumulated in f64 as
//! batches go by (no activation is stored).

use crate::eval::{log_softmax, BatchHook, Entry, Runner};
use crate::ffi::{Node, ResidualHook};
use crate::imatrix::InputSums;
use anyhow::Result;
use indicatif::ProgressBar;

/// Mean activations `[layer][position][n_embd]`.
#[derive(Clone, Debug)]
pub struct Means {
    pub n_layers: usize,
    pub n_pos: usize,
    pub n_embd: usize,
    pub values: Vec<f64>,
    pub count: usize,
}

impl Means {
    pub fn at(&self, layer: usize, pos: usize) -> &[f64] {
        let i = (layer * self.n_pos + pos) * self.n_embd;
        &self.values[i..i + self.n_embd]
    }

    /// `self − other` at one layer and position, in f32: the difference
    /// of means every candidate direction is made of.
    pub fn minus(&self, other: &Means, layer: usize, pos: usize) -> Vec<f32> {
        self.at(layer, pos)
            .iter()
            .zip(other.at(layer, pos))
            .map(|(a, b)| (a - b) as f32)
            .collect()
    }
}

struct CaptureHook<'a> {
    /// Importance sums gathered in the same decode, when asked for.
    inputs: Option<&'a mut InputSums>,
    /// An edit applied in the same decode, whose effect the capture sees.
    edit: Option<&'a mut dyn BatchHook>,
    n_layers: usize,
    n_pos: usize,
    n_embd: usize,
    /// Batch rows of post-instruction position p, for the current batch.
    rows: Vec<(usize, usize)>,
    n_tokens: usize,
    sums: Vec<f64>,
}

impl ResidualHook for CaptureHook<'_> {
    fn wants(&mut self, node: Node) -> bool {
        matches!(node, Node::LayerOut(l) if l < self.n_layers)
            || self.edit.as_mut().is_some_and(|e| e.wants(node))
    }
    fn visit(&mut self, node: Node, rows: &mut [f32], n_embd: usize) -> bool {
        // The edit first: the capture sees what the next layer will.
        let edited = match self.edit.as_mut() {
            Some(e) => e.wants(node) && e.visit(node, rows, n_embd),
            None => false,
        };
        let Node::LayerOut(layer) = node else {
            return edited;
        };
        // The last layer may hold only output rows; we never ask for it,
        // and a node without every token is not ours to map.
        if layer >= self.n_layers || n_embd != self.n_embd || rows.len() != self.n_tokens * n_embd {
            return edited;
        }
        for &(row, pos) in &self.rows {
            let src = &rows[row * n_embd..(row + 1) * n_embd];
            let at = (layer * self.n_pos + pos) * n_embd;
            self.sums[at..at + n_embd]
                .iter_mut()
                .zip(src)
                .for_each(|(s, &x)| *s += x as f64);
        }
        edited
    }
    fn wants_input(&mut self, weight: &str) -> bool {
        self.inputs.as_ref().is_some_and(|s| s.wants(weight))
    }
    fn visit_input(&mut self, weight: &str, rows: &[f32], row_len: usize) {
        if let Some(s) = self.inputs.as_mut() {
            s.add(weight, rows, row_len);
        }
    }
}

impl BatchHook for CaptureHook<'_> {
    fn begin(&mut self, entries: &[Entry]) {
        if let Some(e) = self.edit.as_mut() {
            e.begin(entries);
        }
        self.rows.clear();
        for e in entries {
            for p in 0..self.n_pos {
                self.rows.push((e.start + e.len - self.n_pos + p, p));
            }
        }
        self.n_tokens = entries.last().map_or(0, |e| e.start + e.len);
    }
}

/// Means over `prompts` at layers `0..n_layers` and the last `n_pos`
/// tokens of each prompt (the template's post-instruction tokens).
pub fn capture_means(
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    n_layers: usize,
    n_pos: usize,
    progress: &ProgressBar,
) -> Result<Means> {
    Ok(capture(runner, prompts, n_layers, n_pos, progress)?.0)
}

/// `capture_means`, plus each prompt's first-token log-probabilities from
/// the same decode.
pub fn capture(
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    n_layers: usize,
    n_pos: usize,
    progress: &ProgressBar,
) -> Result<(Means, Vec<Vec<f32>>)> {
    capture_collecting(runner, prompts, n_layers, n_pos, progress, None)
}

/// `capture_means` under an edit made by `edit` in the same decode: where
/// the refusal signal is left after it.
pub fn capture_edited(
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    n_layers: usize,
    n_pos: usize,
    progress: &ProgressBar,
    edit: &mut dyn BatchHook,
) -> Result<Means> {
    Ok(capture_with(runner, prompts, n_layers, n_pos, progress, None, Some(edit))?.0)
}

/// `capture`, also adding the inputs of the weights `inputs` wants to it
/// (an importance matrix from the same decode, at no extra pass).
pub fn capture_collecting(
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    n_layers: usize,
    n_pos: usize,
    progress: &ProgressBar,
    inputs: Option<&mut InputSums>,
) -> Result<(Means, Vec<Vec<f32>>)> {
    capture_with(runner, prompts, n_layers, n_pos, progress, inputs, None)
}

fn capture_with<'a>(
    runner: &mut Runner,
    prompts: &[Vec<i32>],
    n_layers: usize,
    n_pos: usize,
    progress: &ProgressBar,
    mut inputs: Option<&'a mut InputSums>,
    edit: Option<&'a mut dyn BatchHook>,
) -> Result<(Means, Vec<Vec<f32>>)> {
    let n_embd = runner.ctx.model().n_embd();
    if let Some(s) = inputs.as_mut() {
        s.count_prompts(prompts);
    }
    let mut hook = CaptureHook {
        inputs,
        edit,
        n_layers,
        n_pos,
        n_embd,
        rows: Vec::new(),
        n_tokens: 0,
        sums: vec![0.0; n_layers * n_pos * n_embd],
    };
    let mut log_probs = vec![Vec::new(); prompts.len()];
    runner.run(prompts, &mut hook, |ctx, entries| {
        for e in entries {
            log_probs[e.prompt] = log_softmax(ctx.logits(e.last())?);
        }
        progress.inc(entries.iter().map(|e| e.len as u64).sum());
        Ok(())
    })?;
    let count = prompts.len();
    let values = hook.sums.iter().map(|s| s / count as f64).collect();
    Ok((
        Means {
            n_layers,
            n_pos,
            n_embd,
            values,
            count,
        },
        log_probs,
    ))
}
