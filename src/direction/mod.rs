//! The refusal direction: its file format, and (in `search`) how it is
//! found from captured activations.

mod file;

pub use file::DirectionFile;
