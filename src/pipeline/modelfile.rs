//! An Ollama Modelfile beside the output.

use crate::output;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// An Ollama Modelfile: FROM the output, plus the chat template and stop
/// tokens Ollama cannot always infer from a GGUF it did not convert.
/// Returns its path and the tag to create it under.
pub fn write_modelfile(input: &Path, out: &Path, force: bool) -> Result<(PathBuf, String)> {
    let shards = crate::gguf::open_model(input)?;
    let meta = &shards[0];
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.gguf");
    let mut text = format!("FROM ./{name}\n");
    let template = meta.get_str("tokenizer.chat_template").unwrap_or("");
    if template.contains("<|im_start|>") {
        text.push_str(concat!(
            "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}",
            "<|im_start|>assistant\n\"\"\"\n",
            "PARAMETER stop \"<|im_start|>\"\nPARAMETER stop \"<|im_end|>\"\n"
        ));
    } else if template.contains("<start_of_turn>") {
        text.push_str(concat!(
            "TEMPLATE \"\"\"{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n",
            "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n\"\"\"\n",
            "PARAMETER stop \"<end_of_turn>\"\n"
        ));
    } else if template.contains("<|start_header_id|>") {
        text.push_str(concat!(
            "TEMPLATE \"\"\"{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}",
            "<|start_header_id|>assistant<|end_header_id|>\n\n\"\"\"\n",
            "PARAMETER stop \"<|eot_id|>\"\n"
        ));
    }
    text.push_str("PARAMETER temperature 0.7\n");
    let path = out.with_file_name("Modelfile");
    output::write_atomic(&path, text.as_bytes(), force)?;
    let tag = name.trim_end_matches(".gguf").to_lowercase();
    Ok((path, tag))
}
