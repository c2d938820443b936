//! The hand-made hostile GGUFs in tests/hostile/: each must get its own
//! clean error from `apply` (exit 1, one `error:` line naming the problem),
//! leave no output and no temporary file, and stay byte-identical.

mod common;

use common::bin;
use std::path::{Path, PathBuf};

fn hostile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

/// `(file, expected error substring)` from the README's table.
fn cases() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(hostile_dir().join("README.md")).unwrap();
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
    let direction = hostile_dir().join("direction.json");
    let mut failures = Vec::new();
    for (name, expected) in &cases {
        let input = hostile_dir().join(name);
        let before = std::fs::read(&input).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out.gguf");
        let out = bin()
            .args(["apply", "-q", "--direction"])
            .arg(&direction)
            .arg(&input)
            .arg(&out_path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            std::fs::read(&input).unwrap(),
            before,
            "{name} was modified"
        );
        if expected == "OK" {
            if !out.status.success() || left != ["out.gguf"] {
                failures.push(format!("{name}: control should succeed: {stderr} {left:?}"));
            }
            continue;
        }
        let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        let last = stderr.trim_end().lines().last().unwrap_or("");
        if out.status.code() != Some(1)
            || errors.len() != 1
            || !last.starts_with("error: ")
            || !last.contains(expected.as_str())
            || stderr.contains("panicked")
            || !left.is_empty()
        {
            failures.push(format!(
                "{name}: expected one error with {expected:?}, got exit {:?}, files {left:?}:\n{stderr}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
