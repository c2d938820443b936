//! Prompt formatting with the model's own chat template, and the
//! post-instruction tokens the template appends after the user's message.

use crate::ffi::{self, Model};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Stands in for the instruction when locating the template's suffix.
const SENTINEL: &str = "\u{1}INSTRUCTION\u{1}";

pub struct ChatFormat {
    /// A llama.cpp built-in name or a template's source.
    template: String,
    /// Where the template came from, for reports.
    pub origin: String,
    /// Text the template appends after the user's message.
    pub suffix: String,
    /// `suffix` as tokens: the post-instruction positions.
    pub suffix_tokens: Vec<i32>,
}

impl ChatFormat {
    /// Uses `choice` (a built-in name such as `chatml`, or a file holding a
    /// template) or else the model's own `tokenizer.chat_template`.
    pub fn resolve(model: &Model, choice: Option<&str>) -> Result<ChatFormat> {
        let builtins = ffi::builtin_chat_templates();
        let hint = || {
            format!(
                "pass --chat-template NAME|FILE (built-in names: {})",
                builtins.join(", ")
            )
        };
        let (template, origin) = match choice {
            Some(c) if Path::new(c).is_file() => {
                let text =
                    std::fs::read_to_string(c).with_context(|| format!("cannot read {c}"))?;
                (text, format!("file {c}"))
            }
            Some(c) if builtins.iter().any(|b| b == c) => (c.to_string(), format!("built-in {c}")),
            Some(c) => bail!(
                "--chat-template {c:?} is neither a file nor a built-in template ({})",
                builtins.join(", ")
            ),
            None => match model.chat_template() {
                Some(t) => (t, "the model's tokenizer.chat_template".to_string()),
                None => bail!("the model has no chat template; {}", hint()),
            },
        };
        let probe = ffi::apply_chat_template(&template, &[("user", SENTINEL)], true).with_context(
            || {
                format!(
                    "llama.cpp cannot use the chat template from {origin}; {}",
                    hint()
                )
            },
        )?;
        let Some((_, suffix)) = probe.split_once(SENTINEL) else {
            bail!(
                "the chat template from {origin} drops the user's message; {}",
                hint()
            );
        };
        if suffix.is_empty() {
            bail!(
                "the chat template from {origin} adds nothing after the user's message; {}",
                hint()
            );
        }
        let suffix_tokens = model.tokenize(suffix, false, true)?;
        Ok(ChatFormat {
            template,
            origin,
            suffix: suffix.to_string(),
            suffix_tokens,
        })
    }

    /// Number of post-instruction positions.
    pub fn n_post(&self) -> usize {
        self.suffix_tokens.len()
    }

    /// The formatted prompt for one instruction, ready for generation.
    pub fn format(&self, instruction: &str) -> Result<String> {
        ffi::apply_chat_template(&self.template, &[("user", instruction)], true)
    }

    /// Tokens of the formatted prompt. Its last `n_post()` tokens are the
    /// template's suffix (checked, since BPE merges could blur the seam).
    pub fn tokenize(&self, model: &Model, instruction: &str) -> Result<Vec<i32>> {
        let text = self.format(instruction)?;
        let mut tokens = model.tokenize(&text, true, true)?;
        // Templates that write the BOS text themselves would get it twice.
        if let Some(bos) = model.bos() {
            if tokens.len() >= 2 && tokens[0] == bos && tokens[1] == bos {
                tokens.remove(0);
            }
        }
        if !tokens.ends_with(&self.suffix_tokens) {
            bail!("the formatted prompt does not end with the template's suffix tokens: {instruction:?}");
        }
        Ok(tokens)
    }
}
