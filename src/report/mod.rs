//! What a run tells its user: the typed report written as JSON, and the
//! reporters that each stage's result goes to (the terminal's tables, or
//! nothing). Library code returns data; only reporters print.

mod svg;
mod terminal;

pub use svg::front_svg;
pub use terminal::Terminal;

use crate::apply::{ApplyReport, TensorSink};
use crate::cache::Cache;
use crate::cost::StageCost;
use crate::direction::{DirectionFile, SearchResult};
use crate::imatrix::Imatrix;
use crate::verify::Verification;
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Everything a main run measured (`--report REPORT.json`).
#[derive(Serialize)]
pub struct Report<'a> {
    pub tool: String,
    pub input: &'a Path,
    pub output: &'a [PathBuf],
    pub scale: f32,
    /// Where the requantization importances came from.
    pub imatrix: &'a str,
    /// The direction file without the search's tables: `--direction
    /// REPORT.json [--pick N]` reads it back.
    pub direction: serde_json::Value,
    pub search: Option<&'a SearchResult>,
    pub apply: &'a ApplyReport,
    pub verification: Option<&'a Verification>,
    pub cost: &'a [StageCost],
    pub seconds: f64,
}

impl Report<'_> {
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }
}

/// The direction file as the report holds it: without the search's
/// tables, which the report has whole.
pub fn direction_provenance(file: &DirectionFile) -> serde_json::Value {
    let mut provenance = file.to_value();
    if let Some(map) = provenance.as_object_mut() {
        map.remove("search");
    }
    provenance
}

/// A direction found by search, as the reporter sees it.
pub struct Searched<'a> {
    pub result: &'a SearchResult,
    pub imatrix: Option<&'a Imatrix>,
}

/// Receives each stage's result as the run goes.
pub trait Reporter: TensorSink {
    fn searched(&mut self, _found: &Searched) {}
    /// `--pick N` took this point of the saved front.
    fn picked(&mut self, _n: usize, _file: &DirectionFile) {}
    /// The main command's output, with the scale and `token_embd`'s fate.
    fn applied(&mut self, _applied: &ApplyReport, _scale: f32, _skip_embeddings: bool) {}
    /// `apply`'s outputs.
    fn applied_direction(&mut self, _applied: &ApplyReport) {}
    fn verified(&mut self, _input: &Path, _v: &Verification, _cache: &Cache) {}
    fn cost(&mut self, _stages: &[StageCost]) {}
    /// A file written besides the model (`what` says what it holds).
    fn wrote(&mut self, _path: &Path, _what: &str) {}
    /// An Ollama Modelfile, to be created under `tag`.
    fn modelfile(&mut self, _path: &Path, _tag: &str) {}
    fn done(&mut self, _seconds: f64) {}
}

/// Reports nothing.
pub struct Silent;

impl TensorSink for Silent {}
impl Reporter for Silent {}
