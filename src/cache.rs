//! A cache of what is measured on the original model, so that a second run
//! on the same file does not measure it again. Entries are keyed by the
//! SHA-256 of everything the measurement depends on (the model file's
//! SHA-256, the prompts, the settings and the running binary), written to
//! a temporary file and renamed into place, so concurrent runs never see
//! half an entry, and carry their own SHA-256, so a damaged one is ignored.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Where entries live, or nowhere.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    dir: Option<PathBuf>,
}

/// Why an entry was not used.
#[derive(Debug, PartialEq)]
pub enum Miss {
    Absent,
    Corrupt,
}

impl Cache {
    /// No caching.
    pub fn disabled() -> Cache {
        Cache { dir: None }
    }

    /// The given folder, else `$GGUF_ABLITERATE_CACHE`, else the platform's:
    /// `$XDG_CACHE_HOME/gguf-abliterate`, `~/Library/Caches/gguf-abliterate`
    /// on macOS, `~/.cache/gguf-abliterate`.
    pub fn at(dir: Option<PathBuf>) -> Cache {
        let dir = dir.or_else(|| std::env::var_os("GGUF_ABLITERATE_CACHE").map(PathBuf::from));
        let home = || std::env::var_os("HOME").map(PathBuf::from);
        let platform = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                home().map(|h| {
                    if cfg!(target_os = "macos") {
                        h.join("Library/Caches")
                    } else {
                        h.join(".cache")
                    }
                })
            })
            .map(|p| p.join("gguf-abliterate"));
        Cache {
            dir: dir.or(platform),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn path(&self, kind: &str, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(kind).join(key))
    }

    /// The entry's payload, if present and intact.
    pub fn get(&self, kind: &str, key: &str) -> std::result::Result<Vec<u8>, Miss> {
        let path = self.path(kind, key).ok_or(Miss::Absent)?;
        let bytes = std::fs::read(path).map_err(|_| Miss::Absent)?;
        if bytes.len() < 32 {
            return Err(Miss::Corrupt);
        }
        let (sum, payload) = bytes.split_at(32);
        if Sha256::digest(payload).as_slice() != sum {
            return Err(Miss::Corrupt);
        }
        Ok(payload.to_vec())
    }

    /// Stores `payload` under `key`; a cache that cannot be written is no error
    /// worth failing a run for, so the caller only reports it.
    pub fn put(&self, kind: &str, key: &str, payload: &[u8]) -> Result<()> {
        let Some(path) = self.path(kind, key) else {
            return Ok(());
        };
        let dir = path.parent().expect("entries live in a folder");
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the cache folder {}", dir.display()))?;
        let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
        let mut bytes = Sha256::digest(payload).to_vec();
        bytes.extend_from_slice(payload);
        let written = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.with_context(|| format!("writing the cache entry {}", path.display()))
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Hex SHA-256 of the parts, each length-prefixed so that no two lists of
/// parts give the same key.
pub fn key(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for p in parts {
        hasher.update((p.len() as u64).to_le_bytes());
        hasher.update(p);
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(Some(dir.path().to_path_buf()));
        assert_eq!(cache.get("m", "k"), Err(Miss::Absent));
        cache.put("m", "k", b"payload").unwrap();
        assert_eq!(cache.get("m", "k").unwrap(), b"payload");
        // No temporary file is left beside the entry.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("m"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["k"]);
        let path = dir.path().join("m/k");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.get("m", "k"), Err(Miss::Corrupt));
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(cache.get("m", "k"), Err(Miss::Corrupt));
        // Disabled: nothing is read or written.
        let off = Cache::disabled();
        off.put("m", "k2", b"x").unwrap();
        assert_eq!(off.get("m", "k2"), Err(Miss::Absent));
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        assert_eq!(key(&[b"ab", b"c"]), key(&[b"ab", b"c"]));
        assert_eq!(key(&[]).len(), 64);
    }
}
