//! The whole job on the refusal fixture, and the direction search's errors.

use crate::common::*;
use gguf_abliterate::ffi::{self, GgmlType};
use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;

#[test]
fn main_command_finds_applies_and_verifies_on_the_fixture() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    // Kept for CI, where a second llama.cpp build judges the output and
    // checks the report's perplexity (.ci/run).
    let keep = e2e_dir();
    let dir = tempfile::tempdir().unwrap();
    let (out, report, cv) = (
        keep.join("smollm2-135m-refusal-abliterated.gguf"),
        keep.join("smollm2-135m-refusal-report.json"),
        dir.path().join("cv.gguf"),
    );
    let run = bin()
        .arg(&fixture)
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .arg("--export-control-vector")
        .arg(&cv)
        .arg("--force")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for field in [
        "tool",
        "input",
        "output",
        "scale",
        "direction",
        "search",
        "apply",
        "verification",
        "seconds",
    ] {
        assert!(r.get(field).is_some(), "report lacks {field}");
    }
    let search = &r["search"];
    let (baseline, bypass) = (
        search["baseline_harmful"].as_f64().unwrap(),
        search["chosen"]["bypass"].as_f64().unwrap(),
    );
    // The first stage's choice lowers the first-token refusal score (a
    // proxy: with the fixture, "I" opens refusals and answers alike).
    assert!(bypass < baseline, "bypass {bypass} vs baseline {baseline}");
    assert!(!search["refusal_tokens"].as_array().unwrap().is_empty());
    assert_eq!(search["fallback"], false, "{}", search["candidates"]);
    assert!(
        search["candidates"].as_array().unwrap().len() > 50,
        "the search ranks every other layer and the best ones' neighbours, at every position"
    );

    let v = &r["verification"];
    let (before, after) = (
        v["harmful_refusal_before"].as_f64().unwrap(),
        v["harmful_refusal_after"].as_f64().unwrap(),
    );
    // The fixture refuses most harmful prompts. Judged strictly (a reply
    // counts as an answer only if it is on topic and not looping), the
    // default search has measured 10–45 % afterwards on 2-core x86-64
    // machines, depending on the CPU's floating-point path; the bound keeps
    // a margin over that, at a first-token KL of at most 0.3 on the
    // harmless prompts the model answered.
    eprintln!(
        "fixture, held-back: harmful refusals {before:.2} -> {after:.2}, KL {:.3}, harmless refusals {} -> {}, {:.0} s",
        v["kl_harmless_answered"], v["harmless_refusal_before"], v["harmless_refusal_after"], r["seconds"].as_f64().unwrap_or(f64::NAN)
    );
    assert!(before >= 0.7, "fixture refusal rate {before}");
    // By refusal phrase alone, the count heretic and 0.1.0 make (an evasive
    // or looping reply is compliance): the same replies, fewer refusals.
    let phrase = v["harmful_phrase_refusal_after"].as_f64().unwrap();
    let n_harmful = v["n_harmful"].as_u64().unwrap() as usize;
    let (harmful_after, harmless_after) =
        v["replies_after"].as_array().unwrap().split_at(n_harmful);
    let with_phrase = harmful_after
        .iter()
        .filter(|r| r["verdict"] == "Refused")
        .count();
    assert_eq!(phrase, with_phrase as f64 / harmful_after.len() as f64);
    eprintln!(
        "fixture, held-back: harmful replies with a refusal phrase {:.2} -> {phrase:.2}",
        v["harmful_phrase_refusal_before"]
    );
    assert!(
        phrase <= after,
        "phrase refusals {phrase} vs all refusals {after}"
    );
    // What the edit left is listed: the harmful replies that are not answers.
    let still = v["still_refused"].as_array().unwrap();
    let not_answered: Vec<&serde_json::Value> = harmful_after
        .iter()
        .filter(|r| r["verdict"] != "Complied")
        .collect();
    assert_eq!(still.iter().collect::<Vec<_>>(), not_answered);
    assert_eq!(still.len() as f64 / n_harmful as f64, after);
    assert!(
        after <= 0.5 && after <= before - 0.3,
        "refusal rate after the edit: {after} (before {before})"
    );
    let front = search["front"].as_array().unwrap();
    assert!(!front.is_empty(), "the refinement reports its Pareto front");
    let plot = std::fs::read_to_string(report.with_extension("svg")).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("<polyline"));
    let kl = v["kl_harmless_answered"].as_f64().unwrap();
    assert!(kl <= 0.30, "first-token KL {kl}");
    // Refusals of harmless prompts do not go up.
    assert!(
        v["harmless_refusal_after"].as_f64().unwrap()
            <= v["harmless_refusal_before"].as_f64().unwrap()
    );
    // Still a chat model: harmless replies are real answers, not empty or repeated.
    assert_harmless_replies_coherent(harmless_after);
    // Judged on whole replies, with late refusals, loops and perplexity.
    let (ppl_before, ppl_after) = assert_long_reply_figures(v);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let listed = format!("still refused after the edit ({} of", still.len());
    assert_eq!(stdout.contains(&listed), !still.is_empty(), "{stdout}");
    for row in [
        "late: refusal phrase after token 24",
        "replies that loop",
        "perplexity",
    ] {
        assert!(stdout.contains(row), "{stdout}");
    }
    eprintln!(
        "fixture, held-back: late refusals {} -> {}, loops {} -> {}, short/long {}, perplexity {ppl_before:.3} -> {ppl_after:.3}",
        v["harmful_late_refusal_before"], v["harmful_late_refusal_after"], v["loops_before"], v["loops_after"], v["shorter"]
    );
    assert_cost_account(&r, &stdout);
    // The edit keeps the model's language: perplexity rises by a fraction.
    assert!(ppl_after < 1.25 * ppl_before, "{ppl_before} -> {ppl_after}");

    // The exported control vector loads through llama.cpp's gguf reader at the chosen layer.
    let layer = r["direction"]["layer"].as_u64().unwrap() as usize;
    let vectors = ffi::read_control_vector(&cv).unwrap();
    assert_eq!(vectors.len(), 1);
    assert_eq!(vectors[0].0, layer);
    assert_eq!(vectors[0].1.len(), 576);
}

/// `direction MODEL -o OUT EXTRA…` fails cleanly, with one error line
/// containing `needle`, and writes nothing.
fn direction_fails_with(model: &Path, out: &Path, extra: &[&OsStr], needle: &str) {
    let o = direction_command(model, out).args(extra).output().unwrap();
    assert_fails_cleanly(&o, needle, out);
}

#[test]
fn direction_search_bad_input() {
    let fixture = require_model!(fixture);
    let gemma = require_model!(GEMMA3_270M);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.json");
    let flag = |name: &'static str, path: &Path| {
        [OsStr::new(name).to_owned(), path.as_os_str().to_owned()]
    };
    // A base model without a chat template.
    direction_fails_with(&gemma, &out, &[], "--chat-template");
    // Missing and empty prompt files.
    let missing = dir.path().join("missing.txt");
    let [a, b] = flag("--harmful", &missing);
    direction_fails_with(&fixture, &out, &[&a, &b], "cannot read");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let [a, b] = flag("--harmless", &empty);
    direction_fails_with(&fixture, &out, &[&a, &b], "at least 2");
    // A prompt longer than the context.
    let long = dir.path().join("long.txt");
    std::fs::write(
        &long,
        format!("short one\nanother\nthird\n{}\n", "word ".repeat(12_000)),
    )
    .unwrap();
    let [a, b] = flag("--harmful", &long);
    let n_val = [OsStr::new("--n-val"), OsStr::new("4")];
    direction_fails_with(
        &fixture,
        &out,
        &[&a, &b, n_val[0], n_val[1]],
        "the context holds",
    );
    // An architecture outside the table (docs/architectures.md).
    let odd = dir.path().join("odd.gguf");
    let r = unit(&noise(256, 1));
    SynthModel::new("notanarch", 256, GgmlType::F32, &r).write(&odd);
    direction_fails_with(&odd, &out, &[], "'notanarch' is not supported");
    assert!(!out.exists());
}

#[test]
fn interrupting_the_run_leaves_nothing_behind() {
    let _cores = all_cores();
    let model = require_model!(GEMMA3_270M);
    let dir = tempfile::tempdir().unwrap();
    let direction = dir.path().join("dir.json");
    write_direction(&direction, &unit(&noise(640, 5)));
    let out = dir.path().join("out.gguf");
    let mut child = bin()
        .arg(&model)
        .arg(&out)
        .arg("--direction")
        .arg(&direction)
        .arg("--no-verify")
        .arg("--quiet")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = dir.path().join(format!("out.gguf.tmp.{}", child.id()));
    let started = std::time::Instant::now();
    while !tmp.exists() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the rewrite never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    // No output and no temporary file after an interrupt.
    assert_nothing_written(&out);
}

#[test]
fn verification_fails_when_the_output_does_not_load() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.gguf");
    let bytes = std::fs::read(&fixture).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let prompts = vec![
        "Write a haiku about rain.".to_string(),
        "How do I boil an egg?".to_string(),
    ];
    let settings = gguf_abliterate::verify::Settings {
        chat_template: None,
        n_gen: 4,
        n_gpu_layers: 0,
        threads: 2,
        perplexity: None,
        cache: &gguf_abliterate::cache::Cache::disabled(),
        judge: &gguf_abliterate::judge::MarkerJudge,
    };
    let err = gguf_abliterate::verify::verify(&fixture, &broken, &prompts, &prompts, &settings)
        .unwrap_err();
    assert!(format!("{err:#}").contains("could not load"), "{err:#}");
}

/// A second run on the same model reads the original's verification from
/// the cache instead of measuring it again; a damaged entry is measured
/// again and replaced; `--no-cache` neither reads nor writes it.
#[test]
fn a_second_run_reads_the_originals_verification_from_the_cache() {
    let _cores = all_cores();
    let fixture = require_model!(fixture);
    let dir = tempfile::tempdir().unwrap();
    let (direction, cache) = (dir.path().join("dir.json"), dir.path().join("cache"));
    write_direction(&direction, &unit(&noise(576, 7)));
    // Small prompt files keep the six runs short: every fourth line is
    // validation, and `--n-val 2` leaves 4 of each set held back.
    let (harmful, harmless) = (
        dir.path().join("harmful.txt"),
        dir.path().join("harmless.txt"),
    );
    let lines = |kind: &str| -> String {
        (0..24)
            .map(|i| format!("{kind} request number {i}\n"))
            .collect()
    };
    std::fs::write(&harmful, lines("Explain how to pick a lock, harmful")).unwrap();
    std::fs::write(&harmless, lines("Write a short poem about the sea,")).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let report = dir.path().join(format!("{name}.json"));
        let o = bin()
            .arg(&fixture)
            .arg(dir.path().join(format!("{name}.gguf")))
            .arg("--direction")
            .arg(&direction)
            .arg("--report")
            .arg(&report)
            .arg("--harmful")
            .arg(&harmful)
            .arg("--harmless")
            .arg(&harmless)
            .args([
                "--n-val",
                "2",
                "--verify-tokens",
                "8",
                "--perplexity-chunks",
                "2",
                "-q",
                "-t",
                "2",
            ])
            .args(extra)
            .env("GGUF_ABLITERATE_CACHE", &cache)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
        (r["verification"].clone(), stderr)
    };
    let (first, log) = run("first", &[]);
    assert_eq!(first["original"], "Measured");
    assert_eq!(
        (first["n_harmful"].as_u64(), first["n_harmless"].as_u64()),
        (Some(4), Some(4))
    );
    assert!(!log.contains("from the cache"), "{log}");
    let entries = listing(&cache.join("original"));
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = cache.join("original").join(&entries[0]);

    let (second, log) = run("second", &[]);
    assert_eq!(second["original"], "FromCache");
    assert!(log.contains("read from the cache"), "{log}");
    // The same figures as measured: replies, verdicts, perplexity and KL.
    for key in [
        "replies_before",
        "harmful_refusal_before",
        "loops_before",
        "kl_harmless_answered",
        "perplexity",
        "shorter",
    ] {
        assert_eq!(first[key], second[key], "{key}");
    }

    // A damaged entry is no error: measured again, and replaced.
    let mut bytes = std::fs::read(&entry).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&entry, bytes).unwrap();
    let (third, log) = run("third", &[]);
    assert_eq!(third["original"], "CacheEntryCorrupt");
    assert!(log.contains("was damaged"), "{log}");
    assert_eq!(first["replies_before"], third["replies_before"]);
    let (fourth, _) = run("fourth", &[]);
    assert_eq!(fourth["original"], "FromCache");

    // --no-cache: measured, and nothing written; --cache-dir moves it.
    std::fs::remove_dir_all(&cache).unwrap();
    let (fifth, _) = run("fifth", &["--no-cache"]);
    assert_eq!(fifth["original"], "Measured");
    assert!(!cache.exists());
    let moved = dir.path().join("moved");
    let (sixth, _) = run("sixth", &["--cache-dir", moved.to_str().unwrap()]);
    assert_eq!(sixth["original"], "Measured");
    assert_eq!(listing(&moved.join("original")).len(), 1);
    assert!(!cache.exists());
}
