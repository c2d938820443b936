//! What happens to temporary output files when the process is stopped from
//! outside: SIGINT, SIGTERM or SIGHUP (through `ctrlc`), or SIGBUS, which the
//! kernel raises when a memory-mapped input is truncated or replaced while
//! we read it. Either way the temporary files are removed, one line is
//! printed, and the input is never touched.
//!
//! The SIGBUS handler runs in signal context, so the list of temporary files
//! it reads is a fixed array of atomic pointers to C strings: no lock, no
//! allocation, only `unlink`, `write` and `_exit`.

use std::ffi::{c_char, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Once;

/// More temporary files than any run holds at once (one per output shard
/// plus the report); further ones are still removed on error by their
/// owner, only not from a signal handler.
const SLOTS: usize = 256;

static TEMP_FILES: [AtomicPtr<c_char>; SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
/// Whether stderr is a terminal, so a progress bar may need clearing first.
static STDERR_IS_TTY: AtomicBool = AtomicBool::new(false);

/// A temporary file the handlers will delete; `unregister` it once renamed.
pub struct TempRegistration(Option<usize>);

/// Records `path` as a temporary file to delete if the process is stopped.
pub fn register_temp(path: &Path) -> TempRegistration {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return TempRegistration(None);
    };
    let raw = c_path.into_raw();
    for (i, slot) in TEMP_FILES.iter().enumerate() {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            return TempRegistration(Some(i));
        }
    }
    // SAFETY: `raw` came from `into_raw` above and was not stored.
    drop(unsafe { CString::from_raw(raw) });
    TempRegistration(None)
}

impl TempRegistration {
    /// Stops deleting the file (it was renamed into place or removed).
    pub fn unregister(&mut self) {
        if let Some(i) = self.0.take() {
            // The string is leaked, not freed: a handler running right now on
            // another thread may still be reading it. It is a few bytes per
            // output file.
            TEMP_FILES[i].store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

/// Removes every registered temporary file. Async-signal-safe.
fn remove_temp_files() {
    for slot in &TEMP_FILES {
        let p = slot.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` is a NUL-terminated string leaked by register_temp.
            unsafe { libc::unlink(p) };
        }
    }
}

/// Installs the handlers (once per process).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        STDERR_IS_TTY.store(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            Ordering::SeqCst,
        );
        // SIGINT, SIGTERM and SIGHUP ("termination" feature): handled on
        // ctrlc's own thread, where ordinary code is allowed.
        let _ = ctrlc::set_handler(|| {
            remove_temp_files();
            // Not eprintln!: with stderr gone (a killed parent's pipe) it
            // would panic, this thread would die, and the process would run
            // on, deaf to every further signal.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\ninterrupted: no output written\n",
            );
            // _exit, not exit: llama.cpp's worker threads are still running
            // and its static destructors must not race them.
            // SAFETY: ends the process; nothing is left to clean up.
            unsafe { libc::_exit(130) };
        });
        install_sigbus_handler();
        // A file-size limit (`ulimit -f`) would otherwise kill us with
        // SIGXFSZ, leaving the temporary file; ignored, the write fails with
        // EFBIG and the run cleans up like on a full disk.
        // SAFETY: setting a signal to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    });
}

extern "C" fn on_sigbus(_: libc::c_int) {
    remove_temp_files();
    let clear: &[u8] = if STDERR_IS_TTY.load(Ordering::SeqCst) {
        b"\r\x1b[K"
    } else {
        b""
    };
    let msg: &[u8] = b"error: an input file was truncated or replaced while it was being read (SIGBUS); no output written\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, clear.as_ptr().cast(), clear.len());
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(1);
    }
}

fn install_sigbus_handler() {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is
    // valid; the handler only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}
