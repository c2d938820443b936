//! Output files that appear only when complete: data goes to `OUT.tmp`,
//! renamed over `OUT` at the end. A failed run, or one interrupted by
//! Ctrl-C, removes its temporary files and never touches the input.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

/// Temporary files to delete if the process is interrupted.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes SIGINT/SIGTERM delete pending temporary files before exiting.
pub fn install_interrupt_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let pending = PENDING.lock().map(|p| p.clone()).unwrap_or_default();
            for path in pending {
                let _ = std::fs::remove_file(path);
            }
            eprintln!("\ninterrupted: no output written");
            std::process::exit(130);
        });
    });
}

/// Where a finished file should end up, and where it is written meanwhile.
pub struct PendingFile {
    pub path: PathBuf,
    pub tmp: PathBuf,
    committed: bool,
}

impl PendingFile {
    /// Checks `path` may be written (`force` allows replacing it) and that it
    /// is not one of `inputs`, then creates `path.tmp`.
    pub fn create(path: &Path, inputs: &[&Path], force: bool) -> Result<(PendingFile, File)> {
        check_output_path(path, inputs, force)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        PENDING.lock().expect("pending list").push(tmp.clone());
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()));
        let pending = PendingFile {
            path: path.to_path_buf(),
            tmp,
            committed: false,
        };
        Ok((pending, file?))
    }

    /// Flushes to disk and renames the temporary file into place.
    pub fn commit(mut self, file: File) -> Result<()> {
        file.sync_all()
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.path.display()
            )
        })?;
        self.committed = true;
        forget(&self.tmp);
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            forget(&self.tmp);
        }
    }
}

fn forget(tmp: &Path) {
    if let Ok(mut pending) = PENDING.lock() {
        pending.retain(|p| p != tmp);
    }
}

/// Fails if `path` is one of `inputs`, exists without `force`, or is a directory.
pub fn check_output_path(path: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    if inputs.iter().any(|input| same_file(path, input)) {
        bail!(
            "output {} is the input file; choose another name",
            path.display()
        );
    }
    if path.exists() && !force {
        bail!(
            "{} already exists (use --force to overwrite)",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{} is a directory", path.display());
    }
    Ok(())
}

/// True when both paths name the same existing file (hard links included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(ca), Ok(cb)) => ca == cb,
        _ => false,
    }
}

/// Writes a small file (JSON, Modelfile) atomically.
pub fn write_atomic(path: &Path, contents: &[u8], force: bool) -> Result<()> {
    use std::io::Write;
    let (pending, mut file) = PendingFile::create(path, &[], force)?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", pending.tmp.display()))?;
    pending.commit(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_overwrite_without_force_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.gguf");
        std::fs::write(&out, b"old").unwrap();
        assert!(PendingFile::create(&out, &[], false).is_err());
        {
            let (_pending, _file) = PendingFile::create(&out, &[], true).unwrap();
            assert!(dir.path().join("out.gguf.tmp").exists());
        } // dropped uncommitted
        assert!(!dir.path().join("out.gguf.tmp").exists());
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        write_atomic(&out, b"new", true).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
    }

    #[test]
    fn refuses_the_input_as_output() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.gguf");
        std::fs::write(&input, b"x").unwrap();
        let alias = dir.path().join(".").join("in.gguf");
        let err = PendingFile::create(&alias, &[&input], true).err().unwrap();
        assert!(err.to_string().contains("is the input"));
    }
}
