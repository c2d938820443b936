//! Library callers get data, not print: `apply` tells its sink of every
//! tensor as it is written, and the pipeline runs with a silent reporter.

use crate::common::*;
use gguf_abliterate::apply::{apply_with, ApplyOptions, TensorReport, TensorSink};
use gguf_abliterate::pipeline::{self, ApplyConfig, EditConfig};
use gguf_abliterate::report::Silent;

/// What a sink was told: (tensor number, of how many, name).
struct Collected(Vec<(usize, usize, String)>);

impl TensorSink for Collected {
    fn tensor(&mut self, done: usize, total: usize, _shape: &str, report: &TensorReport) {
        self.0.push((done, total, report.name.clone()));
    }
}

#[test]
fn apply_tells_its_sink_of_every_tensor_and_the_pipeline_runs_silently() {
    let _cores = all_cores();
    let model = require_model!(SMOLLM2_Q4_1);
    let dir = tempfile::tempdir().unwrap();
    let direction: Vec<f32> = noise(576, 7);
    let opts = ApplyOptions {
        progress: false,
        ..Default::default()
    };
    let mut sink = Collected(Vec::new());
    let direct = dir.path().join("direct.gguf");
    let report = apply_with(&model, &direct, &direction, &opts, &mut sink).unwrap();
    assert!(report.tensors.len() > 60);
    let n = report.tensors.len();
    for (i, ((done, total, name), t)) in sink.0.iter().zip(&report.tensors).enumerate() {
        assert_eq!((*done, *total, name), (i + 1, n, &t.name));
    }
    assert_eq!(sink.0.len(), n);

    // The same edit through the `apply` command's pipeline, reporting
    // nothing: the same bytes.
    let file = dir.path().join("d.json");
    std::fs::write(
        &file,
        serde_json::json!({ "direction": direction }).to_string(),
    )
    .unwrap();
    let piped = dir.path().join("piped.gguf");
    let cfg = ApplyConfig {
        direction: file,
        input: model,
        output: piped.clone(),
        edit: EditConfig {
            quiet: true,
            ..Default::default()
        },
        threads: None,
    };
    pipeline::run_apply(&cfg, &mut Silent).unwrap();
    assert!(std::fs::read(&direct).unwrap() == std::fs::read(&piped).unwrap());
}
