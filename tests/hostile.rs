//! The hand-made hostile GGUFs in tests/hostile/: each must get its own
//! clean error from `apply` (exit 1, one `error:` line naming the problem),
//! leave no output and no temporary file, and stay byte-identical.

use crate::common::{apply_hostile, clean_failure, hostile};

/// `(file, expected error substring)` from the README's table.
fn cases() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(hostile("README.md")).unwrap();
    readme
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cols: Vec<&str> = l.split(" | ").collect();
            let unquote = |s: &str| {
                s.trim()
                    .trim_matches('|')
                    .trim()
                    .trim_matches('`')
                    .to_string()
            };
            (unquote(cols[0]), unquote(cols[cols.len() - 1]))
        })
        .collect()
}

#[test]
fn every_hostile_gguf_gets_its_clean_error() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} hostile files", cases.len());
    let mut failures = Vec::new();
    for (name, expected) in &cases {
        let dir = tempfile::tempdir().unwrap();
        let (out, left) = apply_hostile(&hostile(name), dir.path(), name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if expected == "OK" {
            if !out.status.success() || left != ["out.gguf"] {
                failures.push(format!("{name}: control should succeed: {stderr} {left:?}"));
            }
            continue;
        }
        if let Err(why) = clean_failure(&out, expected) {
            failures.push(format!("{name}: {why}"));
        } else if !left.is_empty() {
            failures.push(format!("{name}: left {left:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
