//! The code's shape, checked: the rules a newcomer relies on when changing it.

use std::path::{Path, PathBuf};

const LONGEST_FUNCTION: usize = 150;

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The source with string and char literals and comments blanked, so that
/// braces in them are not counted.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            let end = rest[body..]
                .find(&close)
                .map_or(rest.len(), |e| body + e + close.len());
            out.push_str(&"\n".repeat(rest[..end].matches('\n').count()));
            i += end;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            out.push_str(&"\n".repeat(rest[..j.min(rest.len())].matches('\n').count()));
            i += (j + 1).min(rest.len());
        } else if rest.starts_with("'{'") || rest.starts_with("'}'") {
            i += 3;
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, `br##"`…: the number of hashes.
fn raw_string_start(s: &str) -> Option<usize> {
    let s = s.strip_prefix('b').unwrap_or(s);
    let s = s.strip_prefix('r')?;
    let hashes = s.len() - s.trim_start_matches('#').len();
    s[hashes..].starts_with('"').then_some(hashes)
}

/// (name, first line, lines) of every function before the file's tests.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let lines: Vec<&str> = code.lines().collect();
    let end = lines
        .iter()
        .position(|l| l.trim() == "#[cfg(test)]")
        .unwrap_or(lines.len());
    let mut found = Vec::new();
    for (start, line) in lines[..end].iter().enumerate() {
        let Some(at) = line.find("fn ") else { continue };
        let before = line[..at].trim();
        let words_ok = before.split_whitespace().all(|w| {
            [
                "pub",
                "pub(crate)",
                "pub(super)",
                "const",
                "unsafe",
                "async",
                "extern",
                "\"C\"",
            ]
            .contains(&w)
        });
        if !words_ok || !line[at + 3..].starts_with(|c: char| c.is_alphabetic() || c == '_') {
            continue;
        }
        let name: String = line[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened) = (0i32, false);
        for (n, l) in lines[start..].iter().enumerate() {
            for c in l.chars() {
                match c {
                    '{' => (depth, opened) = (depth + 1, true),
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if (opened && depth == 0) || (!opened && l.trim_end().ends_with(';')) {
                found.push((name.clone(), start + 1, n + 1));
                break;
            }
        }
    }
    found
}

#[test]
fn no_function_in_src_is_longer_than_150_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    let mut counted = 0;
    for file in rust_files(&src) {
        for (name, line, len) in functions(&std::fs::read_to_string(&file).unwrap()) {
            counted += 1;
            if len > LONGEST_FUNCTION {
                long.push(format!("{}:{line} {name}: {len} lines", file.display()));
            }
        }
    }
    assert!(counted > 300, "the scanner found only {counted} functions");
    assert!(
        long.is_empty(),
        "functions over {LONGEST_FUNCTION} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_scanner_counts_a_functions_lines_past_braces_in_strings() {
    let text = "fn a() {\n    let s = \"}\";\n    let c = '{';\n    // }\n    let r = r#\"{\"#;\n}\nfn b();\n";
    assert_eq!(
        functions(text),
        vec![("a".to_string(), 1, 6), ("b".to_string(), 7, 1)]
    );
}

#[test]
fn the_search_never_reads_verification() {
    let direction = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/direction");
    for file in rust_files(&direction) {
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        let imports = code.contains("crate::verify")
            || code
                .lines()
                .any(|l| l.trim_start().starts_with("use ") && l.contains("verify"));
        assert!(
            !imports,
            "{} imports verify: judgment belongs to src/judge",
            file.display()
        );
    }
}
