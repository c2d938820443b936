//! The integration tests, as one binary (ripgrep's layout): one module per
//! area, sharing the helpers in `common`. Run one area with
//! `cargo test --release --test main fixture_e2e::`.
//!
//! A test whose model is missing is skipped with a note when run by hand
//! and fails when `CI` is set (see `common::model_if_present`).

#[macro_use]
mod common;

mod apply_errors;
mod apply_real;
mod apply_synthetic;
mod architectures;
mod baseline_refusals;
mod fixture_e2e;
mod fuzz;
mod grid;
mod held_back;
mod hook;
mod hostile;
mod hostile_env;
mod imatrix;
mod layout;
mod modelfile;
mod pick;
mod qwen_e2e;
mod report;
