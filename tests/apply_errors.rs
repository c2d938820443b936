//! Bad input: a one-line error, a non-zero exit, no panic and no output.

use crate::common::*;
use gguf_abliterate::ffi::GgmlType;

const N: usize = 256;

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let r = unit(&noise(N, 1));
    let model = dir.path().join("in.gguf");
    SynthModel::new("llama", N, GgmlType::Q8_0, &r).write(&model);
    let direction = dir.path().join("dir.json");
    write_direction(&direction, &r);
    (dir, model, direction)
}

#[test]
fn not_a_gguf_truncated_or_corrupt() {
    let (dir, model, direction) = setup();
    let out = dir.path().join("out.gguf");
    let bytes = std::fs::read(&model).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text", b"hello, not a model at all".to_vec(), "bad magic"),
        ("empty", vec![], "too short"),
        (
            "truncated",
            bytes[..bytes.len() - 1000].to_vec(),
            "runs past the end",
        ),
        (
            "header-only",
            bytes[..200].to_vec(),
            "more than the file can hold",
        ),
        (
            "cut-in-metadata",
            {
                let mut b = bytes[..5000].to_vec();
                b[8..16].copy_from_slice(&0u64.to_le_bytes()); // no tensors
                b
            },
            "metadata key tokenizer.ggml.tokens",
        ),
        (
            "absurd-counts",
            {
                let mut b = bytes.clone();
                b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            "more than the file can hold",
        ),
        (
            "bad-version",
            {
                let mut b = bytes.clone();
                b[4..8].copy_from_slice(&7u32.to_le_bytes());
                b
            },
            "version 7",
        ),
        (
            "offset-out-of-range",
            {
                // Point the first tensor's offset far beyond the file.
                let mut b = bytes.clone();
                let name = b"token_embd.weight";
                let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len();
                let off = at + 4 + 2 * 8 + 4; // n_dims, 2 dims, type
                b[off..off + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "runs past the end",
        ),
    ];
    for (label, data, needle) in cases {
        let bad = dir.path().join(format!("{label}.gguf"));
        std::fs::write(&bad, data).unwrap();
        let o = run_apply(&direction, &bad, &out, &[]);
        assert_clean_failure(&o, needle);
        let o = bin().arg("inspect").arg(&bad).output().unwrap();
        assert_clean_failure(&o, needle);
    }
    assert_nothing_written(&out);
    assert_eq!(
        std::fs::read(&model).unwrap(),
        bytes,
        "input must never change"
    );
}

#[test]
fn bad_directions() {
    let (dir, model, _) = setup();
    let out = dir.path().join("out.gguf");
    let cases = [
        (
            serde_json::json!({ "direction": vec![1.0; N + 1] }).to_string(),
            "n_embd is 256",
        ),
        (
            serde_json::json!({ "direction": vec![0.0; N] }).to_string(),
            "all zeros",
        ),
        (
            format!("{{\"direction\": [1e999{}]}}", ", 1".repeat(N - 1)),
            "only numbers",
        ),
        ("{\"layer\": 3}".to_string(), "missing \"direction\""),
        ("not json".to_string(), "invalid JSON"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let d = dir.path().join(format!("d{i}.json"));
        std::fs::write(&d, text).unwrap();
        assert_clean_failure(&run_apply(&d, &model, &out, &[]), needle);
    }
    let missing = dir.path().join("missing.json");
    assert_clean_failure(&run_apply(&missing, &model, &out, &[]), "cannot read");
    assert_nothing_written(&out);
}

#[test]
fn output_path_problems() {
    let (dir, model, direction) = setup();
    // IN == OUT, also through another spelling of the path.
    let alias = dir.path().join(".").join("in.gguf");
    assert_clean_failure(
        &run_apply(&direction, &model, &alias, &["--force"]),
        "is the input",
    );
    // OUT exists without --force.
    let out = dir.path().join("out.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    assert_clean_failure(&run_apply(&direction, &model, &out, &[]), "already exists");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    assert_success(&run_apply(
        &direction,
        &model,
        &out,
        &["--force", "--quiet"],
    ));
    std::fs::remove_file(&out).unwrap();
    // Unreadable input, unwritable output directory.
    assert_clean_failure(
        &run_apply(&direction, &dir.path().join("nope.gguf"), &out, &[]),
        "cannot open",
    );
    let no_dir = dir.path().join("no/such/dir/out.gguf");
    assert_clean_failure(
        &run_apply(&direction, &model, &no_dir, &[]),
        "cannot create",
    );
    // Bad scale.
    assert_clean_failure(
        &run_apply(&direction, &model, &out, &["--scale", "1.5"]),
        "--scale",
    );
    assert_nothing_written(&out);
}

#[test]
fn imatrix_types_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let r = unit(&noise(N, 2));
    let mut model = SynthModel::new("llama", N, GgmlType::Q8_0, &r);
    let t = model
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.ffn_down.weight")
        .unwrap();
    t.ty = GgmlType::IQ2_XXS;
    let path = dir.path().join("in.gguf");
    model.write(&path);
    let d = dir.path().join("dir.json");
    write_direction(&d, &r);
    let out = dir.path().join("out.gguf");
    assert_fails_cleanly(
        &run_apply(&d, &path, &out, &[]),
        "blk.1.ffn_down.weight is IQ2_XXS",
        &out,
    );
}

#[test]
fn a_full_disk_fails_cleanly() {
    let (dir, model, direction) = setup();
    let out = dir.path().join("out.gguf");
    // RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk would.
    let mut cmd = apply_command(&direction, &model, &out, &[]);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    assert_fails_cleanly(&cmd.output().unwrap(), "File too large", &out);
}
