//! Stage 3: mean activations of harmful and harmless training prompts at
//! every layer output and post-instruction position, with each prompt's
//! first-token distribution from the same decode.

use super::prompts::Prompts;
use super::{bar, Setup};
use crate::activations::{capture_collecting, Means};
use crate::eval::Runner;
use crate::imatrix::InputSums;
use anyhow::{bail, Result};

pub struct Captured {
    pub harmful: Means,
    pub harmless: Means,
    /// First-token log-probabilities of each training prompt.
    pub harmful_first: Vec<Vec<f32>>,
    pub harmless_first: Vec<Vec<f32>>,
}

/// All layers but the last, whose output may hold only output rows.
/// `imatrix` observes the same decode, collecting importances at no
/// extra pass.
pub fn capture(
    s: &Setup,
    runner: &mut Runner,
    p: &Prompts,
    mut imatrix: Option<&mut InputSums>,
) -> Result<Captured> {
    let tokens: u64 = p
        .harm_train
        .iter()
        .chain(&p.safe_train)
        .map(|t| t.len() as u64)
        .sum();
    let pb = bar(s.opts.progress, tokens, "capture");
    let layers = s.capture_layers();
    let (harmful, harmful_first) = capture_collecting(
        runner,
        &p.harm_train,
        layers,
        s.n_post,
        &pb,
        imatrix.as_deref_mut(),
    )?;
    let (harmless, harmless_first) =
        capture_collecting(runner, &p.safe_train, layers, s.n_post, &pb, imatrix)?;
    pb.finish_and_clear();
    // A corrupted tensor (NaN/Inf weights, an F16 overflow) poisons every
    // later activation: say so here, before it becomes a NaN direction.
    for (set, means) in [("harmful", &harmful), ("harmless", &harmless)] {
        if let Some(i) = means.values.iter().position(|x| !x.is_finite()) {
            bail!(
                "the model's activations on {set} prompts hold NaN/Inf (first at layer {}); is a tensor corrupted?",
                i / (means.n_pos * means.n_embd).max(1)
            );
        }
    }
    Ok(Captured {
        harmful,
        harmless,
        harmful_first,
        harmless_first,
    })
}
