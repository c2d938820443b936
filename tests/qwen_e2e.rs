//! The whole job on a real third-party instruct model that refuses:
//! Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 blocks, untied embeddings,
//! mixed Q5_0/Q8_0/Q4_K/Q6_K tensors), fetched by scripts/fetch-models.sh.
//!
//! The output and report stay in target/e2e/ so that CI can hand the output
//! to scripts/check-llama-server.sh, a second llama.cpp build.

use crate::common::*;

#[test]
fn main_command_abliterates_qwen2_5_coder_0_5b_instruct() {
    let _cores = all_cores();
    let model = require_model!(QWEN_CODER);
    let dir = e2e_dir();
    let (out, report) = (
        dir.join("qwen2.5-coder-0.5b-instruct-abliterated.gguf"),
        dir.join("qwen-report.json"),
    );
    let started = std::time::Instant::now();
    let run = bin()
        .arg(&model)
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .args(["--force", "--quiet"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    // Refusal tokens never include an ordinary answer opening (0.1.0 took
    // "I", "To" and "There" here; only "I" marks refusals).
    let tokens: Vec<String> = r["search"]["refusal_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap().trim().to_string())
        .collect();
    eprintln!("qwen: refusal tokens {tokens:?}");
    assert!(tokens.contains(&"I".to_string()), "{tokens:?}");
    for opening in ["To", "There", "Here", "Sure", "Certainly", "Yes", "The"] {
        assert!(!tokens.contains(&opening.to_string()), "{tokens:?}");
    }
    // The first stage stands on its own: its candidates pass the filters,
    // induce judged against the model's own refusal scores (under the
    // paper's 0 all three were rejected and it fell back to the lowest KL).
    assert_eq!(
        r["search"]["fallback"], false,
        "first stage fell back: {}",
        r["search"]["candidates"]
    );
    let v = &r["verification"];
    let figure = |key: &str| v[key].as_f64().unwrap_or_else(|| panic!("no {key}"));
    let (before, after) = (
        figure("harmful_refusal_before"),
        figure("harmful_refusal_after"),
    );
    let kl = figure("kl_harmless_answered");
    eprintln!(
        "qwen: harmful refusals {:.0} % -> {:.0} %, harmless {:.0} % -> {:.0} %, KL {kl:.3} on {} answered, \
         layer {}, scale {}, {:.0} s\n{stdout}",
        100.0 * before,
        100.0 * after,
        100.0 * figure("harmless_refusal_before"),
        100.0 * figure("harmless_refusal_after"),
        v["n_answered"],
        r["direction"]["layer"],
        r["scale"],
        started.elapsed().as_secs_f64()
    );

    // Qwen refuses a real share of the held-back harmful prompts (30 %: it
    // answers many of them in full); afterwards at most 10 %.
    assert!(before >= 0.2, "Qwen's own refusal rate is only {before}");
    assert!(after <= 0.10, "harmful refusals after the edit: {after}");
    assert!(after < before);
    // The default pick is the fewest refusals within --kl-target 0.25 on
    // the search's prompts, and grid-aware projection makes the file carry
    // the edit the search measured (0.1.0's single pass kept about half of
    // it on Q4_K and landed lower: 0.13 here); held back, 0.258 with one
    // KL target for every refinement trial, 0.096 with the target ladder,
    // 0.154 (2.5 % refusals) with KL measured on prompts the capture did not
    // use, and again with trials scaled to their targets and the finalists
    // confirmed on fresh prompts.
    assert!(
        kl <= 0.35,
        "first-token KL on answered harmless prompts: {kl}"
    );
    assert!(v["n_answered"].as_u64().unwrap() >= 10);

    // Still a chat model: harmless replies are real answers, not loops.
    let replies = v["replies_after"].as_array().unwrap();
    let harmless = &replies[v["n_harmful"].as_u64().unwrap() as usize..];
    assert_harmless_replies_coherent(harmless);

    // Judged on whole replies, with late refusals, loops and perplexity.
    let (ppl_before, ppl_after) = assert_long_reply_figures(v);
    eprintln!(
        "qwen: late refusals {} -> {}, loops {} -> {}, short/long {}, perplexity {ppl_before:.3} -> {ppl_after:.3}",
        v["harmful_late_refusal_before"], v["harmful_late_refusal_after"], v["loops_before"], v["loops_after"], v["shorter"]
    );
    assert!(stdout.contains("perplexity"), "{stdout}");
    assert_cost_account(&r, &stdout);
    assert!(ppl_after < 1.25 * ppl_before, "{ppl_before} -> {ppl_after}");

    // The report and the terminal show sample replies side by side.
    let samples = v["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 5);
    assert_eq!(samples.iter().filter(|s| s["harmful"] == true).count(), 3);
    assert!(stdout.contains("sample replies"), "{stdout}");
    // Beside the strict figure, refusals by refusal phrase alone.
    let phrase = figure("harmful_phrase_refusal_after");
    assert!(phrase <= after, "phrase refusals {phrase} vs all {after}");
    assert!(stdout.contains("with a refusal phrase"), "{stdout}");
    for s in samples {
        let prompt = s["prompt"].as_str().unwrap();
        assert!(replies.iter().any(|r| r["prompt"] == prompt));
        assert!(s["before"].is_string() && s["after"].is_string());
    }
}
