//! The search measures the baseline from replies first: refusal tokens come
//! from replies the judge marks as refusals, and a model that refuses
//! nothing is told so before any search.

mod common;

use common::*;

#[test]
fn qwen_refusal_tokens_are_refusal_openings_not_answer_openings() {
    let model = real_model("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dir.json");
    // A cheap search: the refusal tokens are chosen before candidates are scored.
    let out = bin()
        .arg("direction")
        .arg(&model)
        .arg("-o")
        .arg(&dir)
        .args([
            "--position",
            "0",
            "--n-train",
            "32",
            "--top-k",
            "1",
            "--trials",
            "0",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&dir).unwrap()).unwrap();
    let search = &json["search"];
    let tokens: Vec<String> = search["refusal_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap().trim().to_string())
        .collect();
    eprintln!(
        "Qwen2.5-Coder-0.5B: baseline refusals {:.2}, refusal tokens {tokens:?}",
        search["baseline_refusal_rate"]
    );
    // The 0.1.0 search picked "I", "To" and "There"; only "I" marks refusals.
    assert!(tokens.contains(&"I".to_string()), "{tokens:?}");
    for opening in ["To", "There", "Here", "Sure", "Certainly", "Yes", "The"] {
        assert!(!tokens.contains(&opening.to_string()), "{tokens:?}");
    }
    assert!(search["baseline_refusal_rate"].as_f64().unwrap() >= 0.05);
}

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
