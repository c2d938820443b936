//! Hostile and faulty environments. In every case the input stays
//! byte-identical and OUT is either absent (or the old file) or the complete
//! new one, never a mix, and no temporary file is left behind.
//!
//! Scenarios needing a private mount (a read-only or full filesystem) run
//! the binary under `unshare -m` when the tests run as root; otherwise they
//! fall back to `chmod` and `ulimit -f`.

use crate::common::{
    self, all_cores, apply_command, assert_clean_failure, assert_success, bin, direction_command,
    hostile, listing, QUICK_SEARCH,
};
use gguf_abliterate::gguf::GgufFile;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The small valid model and its direction.
fn small_model() -> (PathBuf, PathBuf) {
    (hostile("00-valid-control.gguf"), hostile("direction.json"))
}

/// A direction for the fixture (n_embd 576), written once.
fn fixture_direction() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dir.json");
        common::write_direction(&path, &common::unit(&common::noise(576, 7)));
        (dir, path)
    });
    path
}

fn apply_cmd(direction: &Path, input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = apply_command(direction, input, out, &["-q", "-t", "1"]);
    cmd.args(extra).env("RAYON_NUM_THREADS", "2");
    cmd
}

/// The fixture applied at `scale`, computed once per scale.
fn reference(fixture: &Path, scale: &str) -> Vec<u8> {
    type Outputs = std::sync::Mutex<Vec<(String, Vec<u8>)>>;
    static REFS: OnceLock<Outputs> = OnceLock::new();
    let refs = REFS.get_or_init(Default::default);
    let mut refs = refs.lock().unwrap();
    if let Some((_, bytes)) = refs.iter().find(|(s, _)| s == scale) {
        return bytes.clone();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ref.gguf");
    let status = apply_cmd(fixture_direction(), fixture, &out, &["--scale", scale])
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    refs.push((scale.to_string(), bytes.clone()));
    bytes
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `script` under `sh` in a private mount namespace (root only), with
/// `$BIN` set to the binary. Returns None when namespaces are unavailable.
fn in_private_mount(script: &str) -> Option<Output> {
    if !is_root() {
        return None;
    }
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script])
        .env("BIN", env!("CARGO_BIN_EXE_gguf-abliterate"))
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("unshare failed")
        || stderr.contains("mount: ") && stderr.contains("permission denied")
    {
        return None;
    }
    Some(out)
}

/// What the mount-namespace script listed as left in its mount.
fn left_in(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("LEFT:"))
        .expect("listing");
    line["LEFT:".len()..].trim().to_string()
}

#[test]
fn concurrent_runs_to_one_out() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let (full, half) = (reference(&fixture, "1"), reference(&fixture, "0.5"));
    assert_ne!(full, half);
    // Without --force: one wins, the other fails cleanly and removes its
    // temporary file; OUT is entirely the winner's.
    let a = apply_cmd(fixture_direction(), &fixture, &out, &["--scale", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = apply_cmd(fixture_direction(), &fixture, &out, &["--scale", "0.5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let winners = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "{a:?} {b:?}");
    let (winner_bytes, loser) = if a.status.success() {
        (&full, &b)
    } else {
        (&half, &a)
    };
    let stderr = String::from_utf8_lossy(&loser.stderr);
    assert!(
        stderr.contains("already exists") || stderr.contains("appeared while this run"),
        "{stderr}"
    );
    assert_clean_failure(loser, "out.gguf");
    assert!(
        std::fs::read(&out).unwrap() == *winner_bytes,
        "OUT is not the winner's file"
    );
    assert_eq!(listing(dir.path()), ["out.gguf"]);

    // With --force both succeed; the renames are atomic, so OUT is one of
    // the two complete files, never a mix (and never the old one).
    std::fs::write(&out, b"old").unwrap();
    let runs: Vec<_> = ["1", "0.5"]
        .iter()
        .map(|s| {
            apply_cmd(
                fixture_direction(),
                &fixture,
                &out,
                &["--scale", s, "--force"],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    for mut run in runs {
        assert!(run.wait().unwrap().success());
    }
    let got = std::fs::read(&out).unwrap();
    assert!(got == full || got == half, "OUT is a mix");
    assert_eq!(listing(dir.path()), ["out.gguf"]);
}

/// Starts `apply` on a private copy of the fixture and calls `meddle` with
/// the copy's path once the first tensor has been rewritten.
fn apply_and_meddle(fixture: &Path, meddle: impl FnOnce(&Path)) -> (tempfile::TempDir, Output) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.gguf");
    std::fs::copy(fixture, &input).unwrap();
    let out = dir.path().join("out.gguf");
    let mut child = apply_cmd(fixture_direction(), &input, &out, &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        text.push_str(&line);
        let started = line.starts_with("[   1/");
        line.clear();
        if started {
            meddle(&input);
            break;
        }
    }
    stderr.read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    (
        dir,
        Output {
            status,
            stdout: Vec::new(),
            stderr: text.into_bytes(),
        },
    )
}

#[test]
fn input_truncated_while_mapped_is_a_clean_error() {
    // Cut the input in the middle of the last edited tensor: everything
    // before it still copies, then reading it through the map faults.
    let fixture = require_model!(fixture);
    let f = GgufFile::open(&fixture).unwrap();
    let last = f
        .tensors
        .iter()
        .filter(|t| t.name.contains("attn_output") || t.name.contains("ffn_down"))
        .max_by_key(|t| t.offset)
        .unwrap();
    let cut = f.data_start + last.offset + last.size / 2;
    drop(f);
    let (dir, out) = apply_and_meddle(&fixture, |input| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(input)
            .unwrap()
            .set_len(cut)
            .unwrap();
    });
    // The fault is caught by the SIGBUS handler, which removes the
    // temporary file and exits 1 with one line.
    assert_clean_failure(
        &out,
        "truncated or replaced while it was being read (SIGBUS)",
    );
    assert_eq!(listing(dir.path()), ["in.gguf"]);
}

#[test]
fn input_replaced_while_mapped_still_gives_the_original_result() {
    // A rename over the input swaps the name, not the mapped inode: the run
    // finishes from the file it opened.
    let fixture = require_model!(fixture);
    let (dir, out) = apply_and_meddle(&fixture, |input| {
        let other = input.with_file_name("other.gguf");
        std::fs::write(&other, b"not a model").unwrap();
        std::fs::rename(&other, input).unwrap();
    });
    assert_success(&out);
    assert!(std::fs::read(dir.path().join("out.gguf")).unwrap() == reference(&fixture, "1"));
    assert_eq!(listing(dir.path()), ["in.gguf", "out.gguf"]);
}

#[test]
fn read_only_output_directory() {
    let (model, direction) = small_model();
    let before = std::fs::read(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let script = format!(
        "mount -t tmpfs -o ro,size=1m tmpfs '{ro}' && \"$BIN\" apply -q --direction '{d}' '{m}' '{ro}/out.gguf'; rc=$?; echo \"LEFT:$(ls -A '{ro}')\"; exit $rc",
        ro = ro.display(),
        d = direction.display(),
        m = model.display()
    );
    let out = match in_private_mount(&script) {
        Some(out) => {
            assert_eq!(left_in(&out), "");
            out
        }
        None if is_root() => {
            // Root without mount rights: permissions would not stop it.
            eprintln!("root without a private mount: skipped");
            return;
        }
        None => {
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            let out = apply_cmd(&direction, &model, &ro.join("out.gguf"), &[])
                .output()
                .unwrap();
            assert!(listing(&ro).is_empty());
            out
        }
    };
    assert_clean_failure(&out, "cannot create");
    assert_eq!(std::fs::read(&model).unwrap(), before);
}

#[test]
fn out_on_another_filesystem() {
    // The input is on the project's disk, OUT on tmpfs: the temporary file
    // sits beside OUT, so the final rename never crosses filesystems, and
    // copy_file_range falls back to a plain copy where it must.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let (model, direction) = small_model();
    let out = base.path().join("out.gguf");
    assert_success(&apply_cmd(&direction, &model, &out, &[]).output().unwrap());
    let local = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let local_out = local.path().join("out.gguf");
    assert!(apply_cmd(&direction, &model, &local_out, &[])
        .status()
        .unwrap()
        .success());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&local_out).unwrap()
    );
    assert_eq!(listing(base.path()), ["out.gguf"]);
}

#[test]
fn out_is_a_symlink_or_a_directory() {
    let (model, direction) = small_model();
    let dir = tempfile::tempdir().unwrap();
    let run =
        |out: &Path, extra: &[&str]| apply_cmd(&direction, &model, out, extra).output().unwrap();

    let subdir = dir.path().join("sub");
    std::fs::create_dir(&subdir).unwrap();
    assert_clean_failure(&run(&subdir, &["--force"]), "is a directory");

    let dangling = dir.path().join("dangling.gguf");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert_clean_failure(&run(&dangling, &[]), "already exists");

    let target = dir.path().join("target.gguf");
    std::fs::write(&target, b"precious").unwrap();
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_clean_failure(&run(&link, &[]), "already exists");
    // --force replaces the link itself, as mv would; its target is kept.
    assert!(run(&link, &["--force"]).status.success());
    assert!(!std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(GgufFile::open(&link).is_ok());
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");

    let to_input = dir.path().join("to-input.gguf");
    std::os::unix::fs::symlink(&model, &to_input).unwrap();
    assert_clean_failure(&run(&to_input, &["--force"]), "is the input file");

    assert_eq!(
        listing(dir.path()),
        [
            "dangling.gguf",
            "link.gguf",
            "sub",
            "target.gguf",
            "to-input.gguf"
        ]
    );
}

#[test]
fn disk_full_during_the_rewrite() {
    let (model, direction) = small_model();
    let before = std::fs::read(&model).unwrap();
    // A file-size limit, which works without privileges: the write fails
    // with EFBIG (we ignore SIGXFSZ) at 2 KiB into a 5 KiB output.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let run = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 2; exec \"$BIN\" apply -q --direction '{}' '{}' '{}'",
            direction.display(),
            model.display(),
            out.display()
        ))
        .env("BIN", env!("CARGO_BIN_EXE_gguf-abliterate"))
        .output()
        .unwrap();
    assert_clean_failure(&run, "File too large");
    assert!(listing(dir.path()).is_empty());
    assert_eq!(std::fs::read(&model).unwrap(), before);

    // A real full filesystem: the fixture's 138 MiB output on a 16 MiB tmpfs.
    let fixture = require_model!(fixture);
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=16m tmpfs '{full}' && \"$BIN\" apply -q -t 1 --direction '{d}' '{m}' '{full}/out.gguf'; rc=$?; echo \"LEFT:$(ls -A '{full}')\"; exit $rc",
        full = full.display(),
        d = fixture_direction().display(),
        m = fixture.display()
    );
    if let Some(run) = in_private_mount(&script) {
        assert_clean_failure(&run, "No space left on device");
        assert_eq!(left_in(&run), "");
    } else {
        eprintln!("not root: the tmpfs part of this test was skipped");
    }
}

#[test]
fn disk_full_during_the_report_write() {
    // OUT on a roomy disk, the report on a tmpfs filled to the last byte:
    // OUT is complete (committed before the report), the report absent.
    let (model, direction) = small_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=64k tmpfs '{full}' && (cat /dev/zero > '{full}/filler' 2>/dev/null; true) && \
         \"$BIN\" '{m}' '{out}' --direction '{d}' --no-verify -q --report '{full}/report.json'; rc=$?; echo \"LEFT:$(ls -A '{full}')\"; exit $rc",
        full = full.display(),
        d = direction.display(),
        m = model.display(),
        out = out.display()
    );
    let Some(run) = in_private_mount(&script) else {
        eprintln!("not root: skipped (needs a private tmpfs)");
        return;
    };
    assert_clean_failure(&run, "No space left on device");
    assert_eq!(left_in(&run), "filler");
    assert!(GgufFile::open(&out)
        .unwrap()
        .get("abliterate.tool")
        .is_some());
    assert_eq!(listing(dir.path()), ["full", "out.gguf"]);
}

/// The whole job on the fixture, on a pty so that the progress bars (whose
/// labels name the phases) are drawn; SIGTERM once `marker` appears.
fn sigterm_when(fixture: &Path, marker: &str) -> (tempfile::TempDir, i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    // `exec`: without it /bin/sh (what `script` runs when $SHELL is unset,
    // as under CI) forks, and the SIGTERM would reach the shell, not us.
    let cmd = format!(
        "exec '{}' '{}' '{}' {} --verify-tokens 4 -t 1",
        env!("CARGO_BIN_EXE_gguf-abliterate"),
        fixture.display(),
        out.display(),
        QUICK_SEARCH.join(" ")
    );
    let mut script = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("SHELL", "/bin/sh")
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pty = script.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let n = pty.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "ended before {marker:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(marker) {
            break;
        }
        assert!(Instant::now() < deadline, "{marker:?} never appeared");
    }
    // Our binary is script's child.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", script.id())).unwrap();
    let pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    pty.read_to_end(&mut seen).unwrap();
    let code = script.wait().unwrap().code().unwrap_or(-1);
    (dir, code, String::from_utf8_lossy(&seen).into_owned())
}

#[test]
fn sigterm_in_every_phase() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let fixture_len = std::fs::metadata(&fixture).unwrap().len();
    // Bar labels mark capture, search and rewrite; verification starts
    // once OUT is written.
    let phases = [
        ("capture", "capture ["),
        ("search", "evaluate ["),
        ("rewrite", "rewriting ["),
        ("verify", "wrote "),
    ];
    let handles: Vec<_> = phases
        .iter()
        .map(|&(phase, marker)| {
            let fixture = fixture.clone();
            std::thread::spawn(move || (phase, sigterm_when(&fixture, marker)))
        })
        .collect();
    for h in handles {
        let (phase, (dir, code, log)) = h.join().unwrap();
        assert_eq!(code, 130, "{phase}: {log}");
        assert!(log.contains("interrupted"), "{phase}: {log}");
        assert!(!log.contains("panicked"), "{phase}: {log}");
        let left = listing(dir.path());
        if phase == "verify" {
            // OUT was complete before verification began.
            assert_eq!(left, ["out.gguf"], "{phase}");
            assert!(GgufFile::open(&dir.path().join("out.gguf")).is_ok());
        } else {
            assert!(left.is_empty(), "{phase}: left {left:?}");
        }
    }
    assert_eq!(std::fs::metadata(&fixture).unwrap().len(), fixture_len);
}

/// Peak RSS in MiB and the output of a child. The peak is the child's own
/// `VmHWM`, read while it runs: `wait4`'s `ru_maxrss` would also count the
/// test process's own peak, which a spawned child inherits until its exec.
#[allow(clippy::zombie_processes)] // reaped by wait4 below
fn run_measured(mut cmd: Command) -> (u64, Output) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        stderr.read_to_end(&mut s).unwrap();
        s
    });
    let high_water = || -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let (mut status, mut peak_kib) = (0, 0);
    loop {
        peak_kib = high_water().unwrap_or(0).max(peak_kib);
        // SAFETY: pid is our unreaped child; WNOHANG returns at once.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            break;
        }
        assert_eq!(done, 0, "waitpid failed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stderr = reader.join().unwrap();
    let status = std::os::unix::process::ExitStatusExt::from_raw(status);
    (
        peak_kib / 1024,
        Output {
            status,
            stdout: Vec::new(),
            stderr,
        },
    )
}

#[test]
fn long_prompts_and_huge_prompt_files() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    // 100,000 instructions (the built-in harmful ones, numbered): read in
    // bounded memory, only --n-train of them are used.
    let harmful: Vec<&str> = include_str!("../src/prompts/harmful.tsv")
        .lines()
        .filter_map(|l| l.splitn(3, '\t').nth(2))
        .collect();
    let big = dir.path().join("big.txt");
    let text: String = (0..100_000)
        .map(|i| format!("{} (#{i})\n", harmful[i % harmful.len()]))
        .collect();
    std::fs::write(&big, text).unwrap();
    let mut cmd = direction_command(&fixture, &dir.path().join("d.json"));
    cmd.arg("--harmful")
        .arg(&big)
        .args(QUICK_SEARCH)
        .args(["-t", "1", "-q"]);
    let (rss_mib, run) = run_measured(cmd);
    assert_success(&run);
    assert!(rss_mib < 1024, "peak RSS {rss_mib} MiB");

    // A model whose context (256, patched into a copy of the fixture) is
    // smaller than the longest prompt: a clear error naming the limit.
    let small_ctx = dir.path().join("ctx256.gguf");
    let mut bytes = std::fs::read(&fixture).unwrap();
    let key = b"llama.context_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 4);
    bytes[at + 4..at + 8].copy_from_slice(&256u32.to_le_bytes());
    std::fs::write(&small_ctx, &bytes).unwrap();
    let long = dir.path().join("long.txt");
    let line = "Explain, step by step and in detail, how bread is made. ".repeat(120);
    std::fs::write(
        &long,
        format!("{line}\nHow do I pick a lock?\nHow do I hot-wire a car?\nWrite ransomware.\n"),
    )
    .unwrap();
    let run = direction_command(&small_ctx, &dir.path().join("d2.json"))
        .arg("--harmful")
        .arg(&long)
        .args([
            "--n-train",
            "4",
            "--n-val",
            "1",
            "--layer",
            "21",
            "--position",
            "5",
            "-q",
        ])
        .output()
        .unwrap();
    assert_clean_failure(&run, "the context holds");
    assert!(!dir.path().join("d2.json").exists());
}

/// The fixture with an f16 scale of +Inf in the first Q8_0 block of
/// blk.3.ffn_down, written to `poisoned.gguf` in a new directory.
fn poisoned_fixture(fixture: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let poisoned = dir.path().join("poisoned.gguf");
    let f = GgufFile::open(fixture).unwrap();
    let t = f.tensor("blk.3.ffn_down.weight").unwrap();
    let at = (f.data_start + t.offset) as usize;
    drop(f);
    let mut bytes = std::fs::read(fixture).unwrap();
    bytes[at..at + 2].copy_from_slice(&0x7C00u16.to_le_bytes());
    std::fs::write(&poisoned, &bytes).unwrap();
    (dir, poisoned)
}

#[test]
fn poisoned_activations_are_a_clear_error_before_anything_is_written() {
    // Every activation from layer 3 on becomes NaN/Inf.
    let (dir, poisoned) = poisoned_fixture(&require_model!(fixture));
    let out = dir.path().join("d.json");
    let run = direction_command(&poisoned, &out)
        .args(QUICK_SEARCH)
        .args(["-t", "1", "-q"])
        .output()
        .unwrap();
    assert_clean_failure(&run, "hold NaN/Inf (first at layer 3)");
    assert_eq!(listing(dir.path()), ["poisoned.gguf"]);
}

#[test]
fn a_poisoned_tensor_is_a_clear_error_before_anything_is_written() {
    // The same poisoned tensor, now edited by `apply`: what ggml reads back from
    // the rewritten tensor is not finite, so nothing may be written.
    let (dir, poisoned) = poisoned_fixture(&require_model!(fixture));
    let out = dir.path().join("out.gguf");
    for grid in ["on", "off"] {
        let run = apply_cmd(
            fixture_direction(),
            &poisoned,
            &out,
            &["--exact-grid", grid],
        )
        .output()
        .unwrap();
        // ggml's own row validation or our read-back check, whichever sees
        // it first, names the tensor.
        assert_clean_failure(&run, "blk.3.ffn_down.weight");
        assert!(String::from_utf8_lossy(&run.stderr).contains("NaN"));
        assert_eq!(
            listing(dir.path()),
            ["poisoned.gguf"],
            "--exact-grid {grid}"
        );
    }
}

/// SIGTERM still ends the run when stderr is gone (the parent that read it
/// was killed first): the handler's message must not fail the handler.
#[test]
fn sigterm_with_stderr_closed() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let mut child = bin()
        .arg(&fixture)
        .arg(&out)
        .args(QUICK_SEARCH)
        .args(["--verify-tokens", "4", "-t", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take()); // the reading end is closed
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running 20 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        listing(dir.path()).is_empty(),
        "left {:?}",
        listing(dir.path())
    );
}
