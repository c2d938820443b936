//! The refusal direction: how it is found (`search`), the edit space the
//! refinement explores (`space`), and the file that records it.

pub mod control_vector;
mod file;
mod search;
pub mod space;

pub use file::{put_vectors, DirectionFile};
pub use search::{
    default_threads, search, CandidateScores, FrontPoint, SearchOptions, SearchResult,
};
