//! The search measures the baseline from replies first: a model that
//! refuses nothing, or too little to score, is told so before any search. (Qwen's refusal tokens are
//! checked in tests/qwen_e2e.rs, from its full run.)

use crate::common::*;
use std::path::Path;

/// The main command on `model` stops with one error line holding
/// `needle`, before any candidate is ranked, and writes nothing; its stderr.
fn stops_before_the_search(model: &Path, extra: &[&str], needle: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = bin()
        .arg(model)
        .arg(tmp.path().join("out.gguf"))
        .args(extra)
        .arg("-q")
        .output()
        .unwrap();
    assert_clean_failure(&out, needle);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("searched"), "{stderr}");
    let left = listing(tmp.path());
    assert!(left.is_empty(), "nothing is written: {left:?}");
    stderr
}

#[test]
fn a_model_that_does_not_refuse_is_told_so_and_nothing_is_written() {
    let _cores = all_cores();
    let model = require_model!(GEMMA3_270M);
    let stderr = stops_before_the_search(
        &model,
        &["--chat-template", "gemma"],
        "no refusal to remove",
    );
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: the model refuses"), "{stderr}");
}

/// SmolLM2-135M-Instruct as published (Q4_1) refuses a few harmful prompts,
/// but its refusals open with "I" as its answers do: no first token scores
/// them, and the user is told why in one line, before any search.
#[test]
fn a_model_whose_refusals_no_token_tells_apart_is_told_why() {
    let _cores = all_cores();
    let model = require_model!(SMOLLM2_Q4_1);
    let stderr = stops_before_the_search(
        &model,
        &[],
        "no first token tells its refusals from its answers",
    );
    assert!(stderr.contains("they open with \"I\""), "{stderr}");
}
