//! Instruction sets: the built-in harmful/harmless sets (written for this
//! project, see docs/prompts.md) and user-supplied files.

use anyhow::{bail, Context, Result};
use std::path::Path;

const HARMFUL: &str = include_str!("harmful.tsv");
const HARMLESS: &str = include_str!("harmless.tsv");

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub text: String,
    pub category: String,
}

/// A prompt set with its fixed train/validation split.
#[derive(Clone, Debug)]
pub struct PromptSet {
    /// Where it came from: "built-in" or a path.
    pub source: String,
    pub train: Vec<Prompt>,
    pub val: Vec<Prompt>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Harmful,
    Harmless,
}

impl PromptSet {
    pub fn builtin(kind: Kind) -> PromptSet {
        let text = match kind {
            Kind::Harmful => HARMFUL,
            Kind::Harmless => HARMLESS,
        };
        let mut set = PromptSet {
            source: "built-in".into(),
            train: Vec::new(),
            val: Vec::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut cols = line.splitn(3, '\t');
            let (split, category, text) = (cols.next(), cols.next(), cols.next());
            let (Some(split), Some(category), Some(text)) = (split, category, text) else {
                panic!("malformed built-in prompt line: {line}");
            };
            let p = Prompt {
                text: text.to_string(),
                category: category.to_string(),
            };
            match split {
                "val" => set.val.push(p),
                _ => set.train.push(p),
            }
        }
        set
    }

    /// Reads plain text (one instruction per line), JSONL or CSV (with the
    /// column `column`, or the first of instruction/prompt/goal/text).
    /// Every fourth instruction goes to validation, the rest to training.
    pub fn from_file(path: &Path, column: Option<&str>) -> Result<PromptSet> {
        // Bounded memory: a prompt file is read whole, so cap its size.
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if size > MAX_PROMPT_FILE_BYTES {
            bail!(
                "{} is {} MiB; prompt files are limited to {} MiB",
                path.display(),
                size >> 20,
                MAX_PROMPT_FILE_BYTES >> 20
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let items = match ext.as_str() {
            "jsonl" | "ndjson" => parse_jsonl(&text, column),
            "csv" => parse_csv(&text, column),
            _ => Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()),
        }
        .with_context(|| format!("reading prompts from {}", path.display()))?;
        if items.len() < 2 {
            bail!(
                "{} holds {} instructions; at least 2 are needed",
                path.display(),
                items.len()
            );
        }
        let mut set = PromptSet {
            source: path.display().to_string(),
            train: Vec::new(),
            val: Vec::new(),
        };
        for (i, text) in items.into_iter().enumerate() {
            let p = Prompt {
                text,
                category: "file".into(),
            };
            if i % 4 == 3 {
                set.val.push(p);
            } else {
                set.train.push(p);
            }
        }
        Ok(set)
    }
}

/// Far more than any instruction set needs (100,000 lines are ~6 MiB).
pub const MAX_PROMPT_FILE_BYTES: u64 = 256 << 20;

const COLUMN_GUESSES: &[&str] = &["instruction", "prompt", "goal", "text", "question"];

fn parse_jsonl(text: &str, column: Option<&str>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: invalid JSON", n + 1))?;
        let field = match column {
            Some(c) => v.get(c),
            None => COLUMN_GUESSES.iter().find_map(|c| v.get(*c)),
        };
        let Some(s) = field.and_then(|f| f.as_str()) else {
            bail!(
                "line {}: no string field {}",
                n + 1,
                column.map_or(COLUMN_GUESSES.join("/"), String::from)
            );
        };
        out.push(s.trim().to_string());
    }
    Ok(out)
}

fn parse_csv(text: &str, column: Option<&str>) -> Result<Vec<String>> {
    let mut rows = csv_rows(text);
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let header = rows.remove(0);
    let index = match column {
        Some(c) => header.iter().position(|h| h == c),
        None => COLUMN_GUESSES
            .iter()
            .find_map(|c| header.iter().position(|h| h == c)),
    }
    .with_context(|| {
        format!(
            "no column {} in header {header:?}",
            column.map_or(COLUMN_GUESSES.join("/"), String::from)
        )
    })?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.get(index).map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .collect())
}

/// RFC 4180 rows: quoted fields may hold commas, quotes ("") and newlines.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field) = (Vec::new(), Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_have_the_documented_split() {
        for kind in [Kind::Harmful, Kind::Harmless] {
            let set = PromptSet::builtin(kind);
            assert_eq!((set.train.len(), set.val.len()), (200, 72), "{kind:?}");
            let categories: std::collections::HashSet<_> =
                set.train.iter().map(|p| &p.category).collect();
            assert!(categories.len() >= 12);
        }
    }

    #[test]
    fn reads_text_jsonl_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("p.txt");
        std::fs::write(&txt, "one\n\ntwo\nthree\nfour\n").unwrap();
        let set = PromptSet::from_file(&txt, None).unwrap();
        assert_eq!(set.train.len() + set.val.len(), 4);
        assert_eq!(set.val[0].text, "four");

        let jsonl = dir.path().join("p.jsonl");
        std::fs::write(&jsonl, "{\"goal\":\"a\"}\n{\"goal\":\"b\"}\n").unwrap();
        assert_eq!(
            PromptSet::from_file(&jsonl, None).unwrap().train[1].text,
            "b"
        );
        assert!(PromptSet::from_file(&jsonl, Some("prompt")).is_err());

        let csv = dir.path().join("p.csv");
        std::fs::write(
            &csv,
            "id,prompt\n1,\"Say \"\"hi\"\", please\"\n2,\"two\nlines\"\n",
        )
        .unwrap();
        let set = PromptSet::from_file(&csv, None).unwrap();
        assert_eq!(set.train[0].text, "Say \"hi\", please");
        assert_eq!(set.train[1].text, "two\nlines");

        let empty = dir.path().join("e.txt");
        std::fs::write(&empty, "\n").unwrap();
        assert!(PromptSet::from_file(&empty, None)
            .unwrap_err()
            .to_string()
            .contains("at least 2"));
    }
}
