//! The cost account: what each stage of a run decoded through llama.cpp
//! and how long it took. A run's time is the rows llama.cpp decodes, so
//! rows per stage say where a run's time goes and what a change saves.

use crate::ffi::{decode_count, DecodeCount};
use serde::Serialize;
use std::time::Instant;

/// One stage's share of the run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StageCost {
    pub stage: String,
    pub seconds: f64,
    /// Batch rows decoded: every prompt token and every generated token.
    pub rows: u64,
    /// Of the rows, the generated tokens (decoded one per sequence).
    pub generated: u64,
    /// Sequences begun (prompts, text chunks), each a KV history of its own.
    pub sequences: u64,
    pub decodes: u64,
}

/// Splits a run into stages as they end.
pub struct Meter {
    since: Instant,
    at: DecodeCount,
    stages: Vec<StageCost>,
}

impl Meter {
    pub fn start() -> Meter {
        Meter {
            since: Instant::now(),
            at: decode_count(),
            stages: Vec::new(),
        }
    }

    /// Closes the stage running since the last one ended. A stage that
    /// ran before, in parts, adds this part to its first.
    pub fn done(&mut self, stage: &str) {
        let now = decode_count();
        let part = StageCost {
            stage: stage.into(),
            seconds: self.since.elapsed().as_secs_f64(),
            rows: now.rows - self.at.rows,
            generated: now.generated - self.at.generated,
            sequences: now.sequences - self.at.sequences,
            decodes: now.decodes - self.at.decodes,
        };
        match self.stages.iter_mut().find(|s| s.stage == stage) {
            Some(s) => {
                s.seconds += part.seconds;
                s.rows += part.rows;
                s.generated += part.generated;
                s.sequences += part.sequences;
                s.decodes += part.decodes;
            }
            None => self.stages.push(part),
        }
        self.since = Instant::now();
        self.at = now;
    }

    pub fn stages(self) -> Vec<StageCost> {
        self.stages
    }
}

/// The account as a short table, with a total row.
pub fn table(stages: &[StageCost]) -> String {
    let mut out = format!(
        "{:<10} {:>9} {:>10} {:>10} {:>10} {:>9}\n",
        "stage", "seconds", "rows", "generated", "sequences", "rows/s"
    );
    let total = StageCost {
        stage: "total".into(),
        seconds: stages.iter().map(|s| s.seconds).sum(),
        rows: stages.iter().map(|s| s.rows).sum(),
        generated: stages.iter().map(|s| s.generated).sum(),
        sequences: stages.iter().map(|s| s.sequences).sum(),
        decodes: stages.iter().map(|s| s.decodes).sum(),
    };
    for s in stages.iter().chain([&total]) {
        out += &format!(
            "{:<10} {:>9.1} {:>10} {:>10} {:>10} {:>9.0}\n",
            s.stage,
            s.seconds,
            s.rows,
            s.generated,
            s.sequences,
            s.rows as f64 / s.seconds.max(1e-9)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_run_in_parts_is_one_row() {
        let mut meter = Meter::start();
        for stage in ["baseline", "capture", "baseline"] {
            meter.done(stage);
        }
        let names: Vec<String> = meter.stages().into_iter().map(|s| s.stage).collect();
        assert_eq!(names, ["baseline", "capture"]);
    }

    #[test]
    fn the_table_adds_up_its_stages() {
        let stage = |name: &str, seconds, rows, sequences| StageCost {
            stage: name.into(),
            seconds,
            rows,
            generated: rows / 4,
            sequences,
            decodes: 1,
        };
        let t = table(&[
            stage("capture", 2.0, 1000, 10),
            stage("verify", 3.0, 500, 5),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(
            lines[1].starts_with("capture") && lines[1].ends_with(" 500"),
            "{t}"
        );
        let total: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(total, ["total", "5.0", "1500", "375", "15", "300"]);
    }
}
