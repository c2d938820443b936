//! The refusal direction: its file format, and (in `search`) how it is
//! found from captured activations.

pub mod control_vector;
mod file;
pub mod refine;
mod search;

pub use file::DirectionFile;
pub use search::{
    default_threads, search, CandidateScores, RefusalToken, SearchOptions, SearchResult,
    JUDGE_TOKENS,
};
