//! Collecting an importance matrix during a decode, as `llama-imatrix`
//! does: for every `mul_mat` by a weight we edit, the sum of squares of
//! each column of its input and the number of input rows (tokens);
//! importance = sum / count.
//!
//! Limits, both from keeping one output per prompt and plain `mul_mat`s:
//! the tied output head (`token_embd.weight` as unembedding) and the last
//! layer's MLP see only each prompt's last token; MoE experts
//! (`ffn_down_exps`, a `mul_mat_id`) are not collected, so they are
//! requantized without importances (or refused, for the types that need one).

use super::Imatrix;
use crate::edit::{classify, EditKind};
use crate::gguf::GgufFile;
use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};

/// The matrices `apply` may edit in these shards: `token_embd.weight`
/// and each layer's output projections (biases have no importances).
pub fn edit_targets(shards: &[GgufFile]) -> HashSet<String> {
    let arch = shards[0].architecture().unwrap_or("");
    shards
        .iter()
        .flat_map(|s| &s.tensors)
        .filter(|t| matches!(classify(arch, &t.name), Some((k, _)) if k != EditKind::Bias))
        .map(|t| t.name.clone())
        .collect()
}

#[derive(Default)]
struct Sums {
    squares: Vec<f64>,
    rows: u64,
}

/// Running sums of squared inputs per weight, fed by a decode hook
/// (`wants`/`add` from `ResidualHook::wants_input`/`visit_input`).
pub struct InputSums {
    weights: HashSet<String>,
    sums: HashMap<String, Sums>,
    prompts: usize,
    tokens: usize,
}

impl InputSums {
    pub fn new(weights: HashSet<String>) -> InputSums {
        InputSums {
            weights,
            sums: HashMap::new(),
            prompts: 0,
            tokens: 0,
        }
    }

    pub fn wants(&self, weight: &str) -> bool {
        self.weights.contains(weight)
    }

    pub fn add(&mut self, weight: &str, rows: &[f32], row_len: usize) {
        if row_len == 0 || rows.len() % row_len != 0 {
            return;
        }
        let s = self.sums.entry(weight.to_string()).or_default();
        if s.squares.is_empty() {
            s.squares = vec![0.0; row_len];
        }
        // A weight always has one row length; another shape is not its input.
        if s.squares.len() != row_len {
            return;
        }
        for row in rows.chunks_exact(row_len) {
            for (acc, &x) in s.squares.iter_mut().zip(row) {
                *acc += f64::from(x) * f64::from(x);
            }
        }
        s.rows += (rows.len() / row_len) as u64;
    }

    /// Counts decoded prompts for the source line.
    pub fn count_prompts(&mut self, prompts: &[Vec<i32>]) {
        self.prompts += prompts.len();
        self.tokens += prompts.iter().map(Vec::len).sum::<usize>();
    }

    /// Importance = mean squared input, per weight that saw any input;
    /// source "collected: N prompts, M tokens".
    pub fn finish(self) -> Result<Imatrix> {
        let mut m = Imatrix::new(format!(
            "collected: {} prompts, {} tokens",
            self.prompts, self.tokens
        ));
        for (name, s) in self.sums {
            if s.rows == 0 {
                continue;
            }
            let values: Vec<f32> = s
                .squares
                .iter()
                .map(|&q| (q / s.rows as f64) as f32)
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                bail!("the collected importances of {name} are not finite (NaN/Inf activations)");
            }
            m.insert(name, values);
        }
        Ok(m)
    }
}
