//! Output files that appear only when complete: data goes to a temporary
//! file beside OUT (`OUT.tmp.<pid>`, created exclusively, so it is on OUT's
//! filesystem and no two runs share one), renamed over `OUT` at the end.
//! Without `--force` the rename refuses to replace a file that appeared in
//! the meantime (another run finishing first). A failed run, or one
//! stopped by a signal, removes its temporary files and never touches the
//! input.

use crate::signals::{self, TempRegistration};
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Makes SIGINT/SIGTERM/SIGHUP and SIGBUS delete pending temporary files
/// before exiting.
pub fn install_interrupt_cleanup() {
    signals::install();
}

/// Where a finished file should end up, and where it is written meanwhile.
pub struct PendingFile {
    pub path: PathBuf,
    pub tmp: PathBuf,
    force: bool,
    registration: TempRegistration,
    committed: bool,
}

impl PendingFile {
    /// Checks `path` may be written (`force` allows replacing it) and that it
    /// is not one of `inputs`, then creates `path.tmp.<pid>`.
    pub fn create(path: &Path, inputs: &[&Path], force: bool) -> Result<(PendingFile, File)> {
        check_output_path(path, inputs, force)?;
        let tmp = temp_path(path);
        // Registered before it exists, so a signal between the two still
        // removes it.
        let registration = signals::register_temp(&tmp);
        let mut pending = PendingFile {
            path: path.to_path_buf(),
            tmp,
            force,
            registration,
            committed: false,
        };
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&pending.tmp)
        {
            Ok(file) => Ok((pending, file)),
            Err(err) => {
                // Not ours (it existed already): leave it alone.
                pending.registration.unregister();
                pending.committed = true;
                Err(err).with_context(|| format!("cannot create {}", pending.tmp.display()))
            }
        }
    }

    /// Flushes to disk and renames the temporary file into place.
    pub fn commit(mut self, file: File) -> Result<()> {
        file.sync_all()
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        drop(file);
        rename_into_place(&self.tmp, &self.path, self.force)?;
        self.committed = true;
        self.registration.unregister();
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            self.registration.unregister();
        }
    }
}

/// `OUT.tmp.<pid>`, beside OUT.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    PathBuf::from(tmp)
}

/// Renames `tmp` to `path`; without `force`, fails rather than replace a
/// file that appeared since the run started.
fn rename_into_place(tmp: &Path, path: &Path, force: bool) -> Result<()> {
    let result = if force {
        std::fs::rename(tmp, path)
    } else {
        rename_noreplace(tmp, path)
    };
    result.map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} appeared while this run was writing it (another run?); not replaced (use --force to overwrite)",
                path.display()
            )
        } else {
            anyhow::Error::new(err).context(format!(
                "cannot rename {} to {}",
                tmp.display(),
                path.display()
            ))
        }
    })
}

/// `renameat2(RENAME_NOREPLACE)`; where the filesystem or kernel lacks it,
/// `link` + `unlink`, which also fails when the target exists.
fn rename_noreplace(tmp: &Path, path: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (from, to) = (c(tmp)?, c(path)?);
        // SAFETY: two valid NUL-terminated paths relative to the cwd.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(err);
        }
    }
    std::fs::hard_link(tmp, path)?;
    std::fs::remove_file(tmp)
}

/// Fails if `path` is one of `inputs`, exists without `force`, or is a directory.
pub fn check_output_path(path: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    if inputs.iter().any(|input| same_file(path, input)) {
        bail!(
            "output {} is the input file; choose another name",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{} is a directory", path.display());
    }
    // symlink_metadata: a dangling symlink is still in the way.
    if path.symlink_metadata().is_ok() && !force {
        bail!(
            "{} already exists (use --force to overwrite)",
            path.display()
        );
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
            assert!(temp_path(&out).exists());
        } // dropped uncommitted
        assert!(!temp_path(&out).exists());
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        write_atomic(&out, b"new", true).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
    }

    #[test]
    fn commit_without_force_never_replaces_a_file_that_appeared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.gguf");
        let (pending, file) = PendingFile::create(&out, &[], false).unwrap();
        std::fs::write(&out, b"winner").unwrap(); // another run finished first
        let err = pending.commit(file).unwrap_err().to_string();
        assert!(err.contains("appeared while this run"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"winner");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
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
