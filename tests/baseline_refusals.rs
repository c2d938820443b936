//! The search measures the baseline from replies first: a model that
//! refuses nothing is told so before any search. (Qwen's refusal tokens are
//! checked in tests/qwen_e2e.rs, from its full run.)

mod common;

use common::*;

#[test]
fn a_model_that_does_not_refuse_is_told_so_and_nothing_is_written() {
    let model = real_model("gemma-3-270m-Q4_K_M.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.gguf");
    let out = bin()
        .arg(&model)
        .arg(&out_path)
        .args(["--chat-template", "gemma", "-q"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: the model refuses") && last.contains("no refusal to remove"),
        "{stderr}"
    );
    // Told before the search: no candidate was ranked.
    assert!(!stderr.contains("searched"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing is written"
    );
}
