//! The verify step's prompts are never ones the search used.

use crate::common::{all_cores, assert_clean_failure, bin, listing};

#[test]
fn verification_refuses_to_reuse_the_searchs_validation_prompts() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let run = |extra: &[&str]| {
        bin()
            .arg(&fixture)
            .arg(&out)
            .args(extra)
            .args(["-q", "-t", "2"])
            .output()
            .unwrap()
    };
    // The built-in validation split holds 72 prompts per set; the search takes --n-val of them.
    let failed = run(&["--n-val", "70"]);
    assert_clean_failure(
        &failed,
        "--n-val 70 leaves 2 of the 72 harmful validation prompts",
    );
    // It fails before the minutes-long search, and writes nothing.
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!stderr.contains("direction:"), "{stderr}");
    assert!(!out.exists());
    let left = listing(dir.path());
    assert!(left.is_empty(), "{left:?}");

    // A user prompt file: every fourth line is validation.
    let harmful = dir.path().join("harmful.txt");
    let lines: Vec<String> = (0..8)
        .map(|i| format!("harmful request number {i}"))
        .collect();
    std::fs::write(&harmful, lines.join("\n")).unwrap();
    let failed = run(&["--harmful", harmful.to_str().unwrap()]);
    assert_clean_failure(&failed, "leaves 0 of the 2 harmful validation prompts");
    assert_clean_failure(&failed, "--no-verify");
}
