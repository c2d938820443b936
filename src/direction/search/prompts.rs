//! Stage 1: the training and validation prompts, tokenized with the chat
//! template.

use super::{SearchOptions, Setup};
use crate::chat::ChatFormat;
use crate::ffi::Model;
use crate::prompts::{Prompt, PromptSet};
use anyhow::{bail, Result};

/// The search's prompts, as tokens.
pub struct Prompts {
    pub harm_train: Vec<Vec<i32>>,
    pub safe_train: Vec<Vec<i32>>,
    pub harm_val: Vec<Vec<i32>>,
    pub safe_val: Vec<Vec<i32>>,
    /// The harmful validation requests' text, for judging replies to them.
    pub harm_texts: Vec<String>,
}

impl Prompts {
    /// The longest prompt's tokens.
    pub fn longest(&self) -> usize {
        [
            &self.harm_train,
            &self.safe_train,
            &self.harm_val,
            &self.safe_val,
        ]
        .iter()
        .flat_map(|s| s.iter())
        .map(Vec::len)
        .max()
        .unwrap_or(0)
    }
}

pub fn tokenize(s: &Setup, opts: &SearchOptions) -> Result<Prompts> {
    let take = |v: &[Prompt], n: usize| v[..n.min(v.len())].to_vec();
    let (harm_train, safe_train) = (
        take(&s.harmful.train, opts.n_train),
        take(&s.harmless.train, opts.n_train),
    );
    let (harm_val, safe_val) = (
        take(&s.harmful.val, opts.n_val),
        take(&s.harmless.val, opts.n_val),
    );
    if harm_train.is_empty() || safe_train.is_empty() || harm_val.is_empty() || safe_val.is_empty()
    {
        bail!("the prompt sets need training and validation instructions");
    }
    Ok(Prompts {
        harm_train: tokenize_all(s.model, s.fmt, &harm_train)?,
        safe_train: tokenize_all(s.model, s.fmt, &safe_train)?,
        harm_texts: harm_val.iter().map(|p| p.text.clone()).collect(),
        harm_val: tokenize_all(s.model, s.fmt, &harm_val)?,
        safe_val: tokenize_all(s.model, s.fmt, &safe_val)?,
    })
}

pub fn tokenize_all(model: &Model, fmt: &ChatFormat, prompts: &[Prompt]) -> Result<Vec<Vec<i32>>> {
    prompts
        .iter()
        .map(|p| fmt.tokenize(model, &p.text))
        .collect()
}

/// `take` training prompts of `set` after the first `skip`.
pub fn train_after(set: &PromptSet, skip: usize, take: usize) -> Vec<Prompt> {
    set.train.iter().skip(skip).take(take).cloned().collect()
}
