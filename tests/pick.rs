//! `--pick N` and `apply --direction` reproduce a point of the saved Pareto
//! front byte for byte, without searching again; a search of two
//! directions measures subspace trials. Both read one small search.

use crate::common::*;
use gguf_abliterate::edit::EditWeights;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A small search: one position, few prompts, few trials, and a second
/// direction after the refinement.
const SMALL_SEARCH: &[&str] = &[
    "--position",
    "5",
    "--n-train",
    "32",
    "--n-val",
    "16",
    "--top-k",
    "1",
    "--trials",
    "6",
    "--directions",
    "2",
    "-q",
];

/// The small search on the fixture, run once for this module's tests:
/// its direction file and its stderr.
struct Searched {
    _dir: tempfile::TempDir,
    file: PathBuf,
    stderr: String,
}

fn small_search(fixture: &Path) -> &'static Searched {
    static SEARCHED: OnceLock<Searched> = OnceLock::new();
    SEARCHED.get_or_init(|| {
        let _cores = all_cores();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dir.json");
        let run = direction_command(fixture, &file)
            .args(SMALL_SEARCH)
            .output()
            .unwrap();
        assert_success(&run);
        Searched {
            _dir: dir,
            file,
            stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
        }
    })
}

fn run_ok(cmd: &mut std::process::Command) {
    assert_success(&cmd.output().unwrap());
}

/// The main command: `MODEL OUT --direction DIR --no-verify -q EXTRA…`.
fn main_with(model: &Path, dir: &Path, out: &Path, extra: &[&str]) {
    run_ok(
        bin()
            .arg(model)
            .arg(out)
            .arg("--direction")
            .arg(dir)
            .args(["--no-verify", "-q"])
            .args(extra),
    );
}

#[test]
fn pick_and_apply_reproduce_front_points_byte_for_byte() {
    let fixture = require_model!(fixture);
    let dir = &small_search(&fixture).file;
    let _cores = all_cores();
    let tmp = tempfile::tempdir().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir).unwrap()).unwrap();
    let front = json["front"]
        .as_array()
        .expect("the direction file saves the front");
    assert!(!front.is_empty());
    for p in front {
        assert_eq!(
            p["direction"].as_array().unwrap().len(),
            576,
            "each front point carries its direction"
        );
        // And, with per-layer scope, one direction per layer.
        let layers = p["layer_directions"].as_array().map_or(0, Vec::len);
        let per_layer = p["point"]["per_layer"].as_bool().unwrap();
        assert_eq!(layers, if per_layer { 30 } else { 0 });
    }

    // The chosen point, applied from the file, equals --pick of its front index.
    let chosen = tmp.path().join("chosen.gguf");
    main_with(&fixture, dir, &chosen, &[]);
    // Compared as the f32 they are: the file may spell one value in more
    // digits in one place than in another.
    let weights =
        |v: &serde_json::Value| -> EditWeights { serde_json::from_value(v.clone()).unwrap() };
    let index = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
    // A subspace trial may share its base point's weights: its further
    // directions and scale tell them apart.
    let further = |v: &serde_json::Value| v["further_directions"].as_array().map_or(0, Vec::len);
    let same_point = |p: &serde_json::Value| {
        weights(&p["point"]["weights"]) == weights(&json["weights"])
            && index(&p["point"]["direction_index"]) == index(&json["direction_index"])
            && p["point"]["per_layer"] == json["per_layer"]
            && index(&p["point"]["scale"]) == index(&json["scale"])
            && further(p) == further(&json)
    };
    let index = front.iter().position(same_point);
    let index = index.expect("the chosen point is on the front");
    let picked = tmp.path().join("picked.gguf");
    main_with(&fixture, dir, &picked, &["--pick", &index.to_string()]);
    assert!(
        std::fs::read(&chosen).unwrap() == std::fs::read(&picked).unwrap(),
        "--pick {index} differs from the chosen point"
    );

    // Another point: the main command and apply agree byte for byte.
    let last = front.len() - 1;
    let (by_main, by_apply) = (tmp.path().join("main.gguf"), tmp.path().join("apply.gguf"));
    let apply_last = |direction: &Path, out: &Path| {
        run_ok(&mut apply_command(
            direction,
            &fixture,
            out,
            &["--pick", &last.to_string(), "-q"],
        ))
    };
    main_with(&fixture, dir, &by_main, &["--pick", &last.to_string()]);
    apply_last(dir, &by_apply);
    assert!(std::fs::read(&by_main).unwrap() == std::fs::read(&by_apply).unwrap());
    // A report written by the main command serves as the direction file too.
    let (report, via_report) = (tmp.path().join("report.json"), tmp.path().join("r.gguf"));
    main_with(
        &fixture,
        dir,
        &tmp.path().join("with-report.gguf"),
        &["--report", report.to_str().unwrap()],
    );
    apply_last(&report, &via_report);
    assert!(std::fs::read(&via_report).unwrap() == std::fs::read(&by_apply).unwrap());
    if last != index {
        assert!(std::fs::read(&by_main).unwrap() != std::fs::read(&chosen).unwrap());
    }

    // Out of range: one clean error, nothing written.
    let bad = tmp.path().join("bad.gguf");
    let o = bin()
        .arg(&fixture)
        .arg(&bad)
        .arg("--direction")
        .arg(dir)
        .args(["--no-verify", "--pick", &front.len().to_string()])
        .output()
        .unwrap();
    assert_fails_cleanly(&o, "the front has", &bad);
}

/// `--directions 2`: after the refinement the search derives a further
/// direction from the training prompts its provisional pick still refuses
/// and measures the 2-dimensional subspace as trials; the cost account
/// names the stage. A front point of two directions carries its further
/// direction, and `--pick` of it writes the subspace into the GGUF.
#[test]
fn a_search_with_two_directions_measures_subspace_trials() {
    let fixture = require_model!(fixture);
    let searched = small_search(&fixture);
    let dir = &searched.file;
    let _cores = all_cores();
    let tmp = tempfile::tempdir().unwrap();
    // What the further direction cost and bought is printed, front or not.
    let stderr = &searched.stderr;
    assert!(stderr.contains("subspace trials: 2 directions"), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir).unwrap()).unwrap();
    let trials = json["search"]["trials"].as_array().unwrap();
    let subspace: Vec<&serde_json::Value> =
        trials.iter().filter(|t| t["directions"] == 2).collect();
    assert!(
        !subspace.is_empty()
            && trials
                .iter()
                .all(|t| t["directions"].as_u64().unwrap_or(1) <= 2),
        "{trials:?}"
    );
    let stages: Vec<&str> = json["search"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(stages.contains(&"subspace"), "{stages:?}");
    let front = json["front"].as_array().unwrap();
    for (n, p) in front.iter().enumerate() {
        let trial = &trials[json["search"]["front"][n]["trial"].as_u64().unwrap() as usize];
        let further = p["further_directions"].as_array().map_or(0, Vec::len);
        assert_eq!(
            1 + further,
            trial["directions"].as_u64().unwrap_or(1) as usize
        );
        if further == 1 {
            let out = tmp.path().join("picked.gguf");
            main_with(&fixture, dir, &out, &["--pick", &n.to_string()]);
            let edited = gguf_abliterate::gguf::GgufFile::open(&out).unwrap();
            assert_eq!(edited.get_u64("abliterate.subspace_dim"), Some(2));
        }
    }
}
