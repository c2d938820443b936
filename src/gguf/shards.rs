//! Split GGUFs, named as `llama-gguf-split` names them:
//! `PREFIX-00001-of-00003.gguf`.

use std::path::{Path, PathBuf};

/// `(prefix, index, count)` of a shard path, with 1-based index.
pub fn parse_shard_name(path: &Path) -> Option<(String, u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    let well_formed = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !well_formed(index) || !well_formed(count) {
        return None;
    }
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index >= 1 && index <= count).then(|| (prefix.to_string(), index, count))
}

/// The path of shard `index` (1-based) of `count`, in `dir`.
pub fn shard_path(dir: &Path, prefix: &str, index: u32, count: u32) -> PathBuf {
    dir.join(format!("{prefix}-{index:05}-of-{count:05}.gguf"))
}

/// All shard paths of the split that `first` belongs to.
pub fn sibling_paths(first: &Path, count: u32) -> Option<Vec<PathBuf>> {
    let (prefix, _, _) = parse_shard_name(first)?;
    let dir = first.parent().unwrap_or(Path::new(""));
    Some(
        (1..=count)
            .map(|i| shard_path(dir, &prefix, i, count))
            .collect(),
    )
}

/// Output shard paths: OUT may itself be a shard name (its prefix is used)
/// or a plain `NAME.gguf` (then `NAME-0000i-of-0000N.gguf`).
pub fn output_paths(out: &Path, count: u32) -> Vec<PathBuf> {
    let dir = out.parent().unwrap_or(Path::new(""));
    let prefix = match parse_shard_name(out) {
        Some((prefix, _, _)) => prefix,
        None => {
            let name = out
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("out.gguf");
            name.strip_suffix(".gguf").unwrap_or(name).to_string()
        }
    };
    (1..=count)
        .map(|i| shard_path(dir, &prefix, i, count))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_gguf_split_names() {
        assert_eq!(
            parse_shard_name(Path::new("/m/Qwen-7B-Q4_K_M-00002-of-00005.gguf")),
            Some(("Qwen-7B-Q4_K_M".into(), 2, 5))
        );
        assert_eq!(parse_shard_name(Path::new("model.gguf")), None);
        assert_eq!(parse_shard_name(Path::new("m-00006-of-00005.gguf")), None);
        assert_eq!(parse_shard_name(Path::new("m-1-of-2.gguf")), None);
    }

    #[test]
    fn output_names_follow_the_split_convention() {
        assert_eq!(
            output_paths(Path::new("out/abl.gguf"), 2),
            vec![
                PathBuf::from("out/abl-00001-of-00002.gguf"),
                PathBuf::from("out/abl-00002-of-00002.gguf")
            ]
        );
        assert_eq!(
            output_paths(Path::new("x-00001-of-00002.gguf"), 2)[1],
            PathBuf::from("x-00002-of-00002.gguf")
        );
    }
}
