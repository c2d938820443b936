//! The verify step's prompts are never ones the search used.

mod common;
use common::{bin, fixture, require_model};

#[test]
fn verification_refuses_to_reuse_the_searchs_validation_prompts() {
    require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    // The built-in validation split holds 72 prompts per set; the search takes --n-val of them.
    let run = bin()
        .arg(fixture())
        .arg(&out)
        .args(["--n-val", "70", "-q", "-t", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--n-val 70 leaves 2 of the 72 harmful validation prompts"),
        "{stderr}"
    );
    // It fails before the minutes-long search, and writes nothing.
    assert!(!stderr.contains("direction:"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A user prompt file: every fourth line is validation.
    let harmful = dir.path().join("harmful.txt");
    let lines: Vec<String> = (0..8)
        .map(|i| format!("harmful request number {i}"))
        .collect();
    std::fs::write(&harmful, lines.join("\n")).unwrap();
    let run = bin()
        .arg(fixture())
        .arg(&out)
        .arg("--harmful")
        .arg(&harmful)
        .args(["-q", "-t", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("leaves 0 of the 2 harmful validation prompts"),
        "{stderr}"
    );
    assert!(stderr.contains("--no-verify"), "{stderr}");
}
