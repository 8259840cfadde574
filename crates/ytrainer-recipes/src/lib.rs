//! Runs as library functions, the layer between the engine crates and every front end (the `ytrainer`
//! binary, sweeps, tests, a future board or Python binding): load a model from any source ([`source`]), make
//! the `tiny` preset ([`preset`]), resolve a config with overrides ([`config`]), train with any objective and
//! export ([`run`], [`sft`], [`preference`], sharing [`common`]), evaluate ([`eval`]), run sweep trials
//! ([`sweep`]), and the analysis commands: per-token scores ([`score`]), rendering ([`render`]), generation and
//! chat ([`generate`]), corpus ranking ([`sort`]), throughput benchmarks ([`bench`]).
//!
//! A front end parses its flags into a [`RunConfig`](ytrainer_core::config::RunConfig) or overrides, calls one
//! function here with an [`Observer`](ytrainer_core::observe::Observer) for progress, and prints the report.
//! Nothing here prints: messages go to the observer.

pub mod bench;
pub mod common;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod memory;
pub mod mix;
pub mod outdir;
pub mod packing;
pub mod plan;
pub mod preference;
pub mod preset;
pub mod render;
pub mod run;
pub mod score;
pub mod sft;
pub mod sort;
pub mod source;
pub mod sweep;

/// The commit this build was made from (`git rev-parse HEAD` at build time; `unknown` outside a checkout).
pub const COMMIT: &str = env!("YTRAINER_COMMIT");
/// `ytrainer --version`: the release and the commit.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("YTRAINER_COMMIT"),
    ")"
);

/// Which code wrote a run's files (`summary.json`'s `ytrainer`; for a resumed run, the code that finished it).
pub fn build_info() -> serde_json::Value {
    serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "commit": COMMIT })
}

pub use error::{Context, RecipeError, Result};
pub use run::{RunOptions, RunReport, run};
