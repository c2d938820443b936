//! Importance matrices: per-column weights for ggml's quantizers, the mean
//! squared input activation of each column of a weight, as `llama-imatrix`
//! collects them. Requantizing an edited tensor with the importances its
//! original was quantized with keeps its quality; IQ2_XXS, IQ2_XS and IQ1_S
//! cannot be quantized without one.
//!
//! [`Imatrix::read`] takes both files `llama-imatrix` writes (`read`);
//! [`InputSums`] gathers one during the search's capture when none is given
//! (`collect`).

mod collect;
mod read;

pub use collect::{edit_targets, InputSums};

use std::collections::HashMap;

/// Importances by tensor name. Each entry has `row_len × n_mat` values:
/// one row of column weights per expert (one for dense tensors).
#[derive(Clone, Debug, Default)]
pub struct Imatrix {
    /// Where the importances came from, for the report and `abliterate.imatrix`.
    pub source: String,
    entries: HashMap<String, Vec<f32>>,
}

impl Imatrix {
    pub fn new(source: impl Into<String>) -> Imatrix {
        Imatrix {
            source: source.into(),
            entries: HashMap::new(),
        }
    }

    pub fn insert(&mut self, tensor: impl Into<String>, importances: Vec<f32>) {
        self.entries.insert(tensor.into(), importances);
    }

    /// The importances for `tensor`, if any.
    pub fn get(&self, tensor: &str) -> Option<&[f32]> {
        self.entries.get(tensor).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

impl Imatrix {
    /// The importances for a tensor with rows of `row_len` and `n_mat`
    /// matrices (experts), or `None` if the matrix has no entry for it.
    /// An entry of the wrong size is an error naming the tensor.
    pub fn for_tensor(
        &self,
        tensor: &str,
        row_len: usize,
        n_mat: usize,
    ) -> anyhow::Result<Option<&[f32]>> {
        let Some(values) = self.get(tensor) else {
            return Ok(None);
        };
        if values.len() != row_len * n_mat {
            anyhow::bail!(
                "importance matrix {}: {tensor} has {} values, the model's tensor needs {} ({row_len} columns x {n_mat})",
                self.source,
                values.len(),
                row_len * n_mat
            );
        }
        Ok(Some(values))
    }
}
