//! Why a run stops. Defined apart from the loop so that everything the loop uses (sinks, objectives) can name
//! it without importing the loop.

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::step::StepError;

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Plugin misbehaved.
    #[error("step {step}: {source}")]
    Plugin {
        /// Optimizer step.
        step: usize,
        /// Cause.
        source: StepError,
    },
    /// Output could not be written.
    #[error("{path}: {message}")]
    Output {
        /// File.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// Resume does not match this run.
    #[error("cannot resume from {path}: {message}")]
    Resume {
        /// Checkpoint.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// The data could not be planned into steps.
    #[error(transparent)]
    Data(#[from] ytrainer_data::DataError),
    /// Non-finite losses, gradients or weights: the run stopped before writing them anywhere.
    #[error("training diverged: {0}")]
    Diverged(String),

    /// Data-parallel communication failed or the ranks disagree.
    #[error(transparent)]
    Distributed(#[from] crate::dist::DistError),
    /// A setting the run found unusable once running (e.g. a best-model metric evaluations lack).
    #[error("{0}")]
    Config(String),
    /// Nothing to train on.
    #[error(
        "the training data yields no optimizer step (no supervised tokens); check `[data] train_on` and the data file"
    )]
    NoSteps,
}
