//! The search measures the baseline from replies first: a model that
//! refuses nothing, or too little to score, is told so before any search. (Qwen's refusal tokens are
//! checked in tests/qwen_e2e.rs, from its full run.)

use crate::common::*;

#[test]
fn a_model_that_does_not_refuse_is_told_so_and_nothing_is_written() {
    let _cores = all_cores();
    let model = require_model!(GEMMA3_270M);
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.gguf");
    let out = bin()
        .arg(&model)
        .arg(&out_path)
        .args(["--chat-template", "gemma", "-q"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "no refusal to remove");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: the model refuses"), "{stderr}");
    // Told before the search: no candidate was ranked.
    assert!(!stderr.contains("searched"), "{stderr}");
    let left = listing(tmp.path());
    assert!(left.is_empty(), "nothing is written: {left:?}");
}

/// SmolLM2-135M-Instruct as published (Q4_1) refuses a few harmful prompts,
/// but its refusals open with "I" as its answers do: no first token scores
/// them, and the user is told why in one line, before any search.
#[test]
fn a_model_whose_refusals_no_token_tells_apart_is_told_why() {
    let _cores = all_cores();
    let model = require_model!(SMOLLM2_Q4_1);
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.gguf");
    let out = bin().arg(&model).arg(&out_path).arg("-q").output().unwrap();
    assert_clean_failure(&out, "no first token tells its refusals from its answers");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("they open with \"I\""), "{stderr}");
    assert!(!stderr.contains("searched"), "{stderr}");
    let left = listing(tmp.path());
    assert!(left.is_empty(), "nothing is written: {left:?}");
}
