//! The recipes' one error type. Every message a user sees names the file, record or key and what to do; the
//! chain of causes is kept (`std::error::Error::source`), so the binary prints `context: cause: ...` as one
//! paragraph.

use std::fmt::Display;

/// Why a recipe stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The configuration or input asks for something that cannot be done; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Data files, tokenizers, chat templates.
    #[error(transparent)]
    Data(#[from] ytrainer_data::DataError),
    /// Model files and architectures.
    #[error(transparent)]
    Model(#[from] ytrainer_models::ModelError),
    /// The training loop.
    #[error(transparent)]
    Train(#[from] ytrainer_core::trainer::TrainError),
    /// One training step outside the loop (`bench`): the plugin's weights, a missing reference model.
    #[error(transparent)]
    Step(#[from] ytrainer_core::step::StepError),
    /// Checkpoints (`--resume`).
    #[error(transparent)]
    Checkpoint(#[from] ytrainer_core::checkpoint::CheckpointError),
    /// Loss plugins: unknown names, bad parameters, external libraries.
    #[error(transparent)]
    Plugin(#[from] ytrainer_core::loss::PluginError),
    /// JSON written or read by a recipe.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A config that could not be written back as TOML.
    #[error(transparent)]
    Toml(#[from] toml::ser::Error),
    /// What was being done when `source` happened.
    #[error("{context}")]
    Context {
        /// What was being done (`loading the reference model ...`).
        context: String,
        /// The cause.
        #[source]
        source: Box<RecipeError>,
    },
}

/// Result of a recipe.
pub type Result<T, E = RecipeError> = std::result::Result<T, E>;

/// Says what was being done when an error happened, like `anyhow::Context`, but into [`RecipeError`].
pub trait Context<T> {
    /// Wraps the error with a fixed context.
    fn context(self, context: impl Display) -> Result<T>;
    /// Wraps the error with a lazily built context.
    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<RecipeError>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| RecipeError::Context {
            context: context.to_string(),
            source: Box::new(e.into()),
        })
    }
    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| RecipeError::Context {
            context: f().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Display) -> Result<T> {
        self.ok_or_else(|| RecipeError::Invalid(context.to_string()))
    }
    fn with_context<D: Display>(self, f: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| RecipeError::Invalid(f().to_string()))
    }
}

/// Returns early with [`RecipeError::Invalid`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::RecipeError::Invalid(format!($($arg)*)))
    };
}

/// Builds a [`RecipeError::Invalid`] like `format!`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::RecipeError::Invalid(format!($($arg)*))
    };
}
