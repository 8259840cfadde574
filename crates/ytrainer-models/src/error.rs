//! Every way loading, building or saving a model can fail, with the file and the field or tensor named, so a
//! user can fix the checkpoint or the config without reading our source.

use std::path::PathBuf;

/// Errors of the models crate. Messages name the file and the field or tensor involved and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config.json, an index, adapter_config.json) is not valid JSON or has a field of the wrong type.
    #[error("{}: not a valid {what}: {source}", path.display())]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// A config field is missing or has a value we cannot use.
    #[error("{}: field `{field}`: {message}", path.display())]
    ConfigField {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// `model_type` names an architecture this crate does not implement.
    #[error(
        "{}: field `model_type`: unsupported architecture `{model_type}`; supported: {}",
        path.display(),
        crate::SUPPORTED_MODEL_TYPES.join(", ")
    )]
    UnsupportedArchitecture { path: PathBuf, model_type: String },

    /// The directory has no weights in a format we read.
    #[error(
        "{}: no `model.safetensors` and no `model.safetensors.index.json`; export the checkpoint with \
         `save_pretrained(..., safe_serialization=True)`",
        dir.display()
    )]
    NoWeights { dir: PathBuf },

    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor `{name}` not found in {}: the checkpoint does not match its config.json", file.display())]
    MissingTensor { name: String, file: PathBuf },

    /// A tensor has a different shape than the config implies.
    #[error("tensor `{name}` in {}: expected shape {expected:?}, found {found:?}", file.display())]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype we do not convert (only F32, F16 and BF16 are read).
    #[error("tensor `{name}` in {}: unsupported dtype {dtype}; only F32, F16 and BF16 are supported", file.display())]
    UnsupportedDtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },

    /// A safetensors file is malformed.
    #[error("{}: invalid safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },

    /// A GGUF file is malformed, truncated, or uses something we do not implement (the message names the tensor,
    /// type or metadata key).
    #[error("{}: {message}", path.display())]
    Gguf { path: PathBuf, message: String },

    /// A checkpoint's tensors do not match the model its `config.json` describes (the message lists the first
    /// tensors missing or left over).
    #[error("{}: the weights do not match config.json: {message}", path.display())]
    WeightsMismatch { path: PathBuf, message: String },

    /// A PEFT adapter cannot be used with this model.
    #[error("{}: {message}", path.display())]
    Adapter { path: PathBuf, message: String },

    /// The operation needs something the model does not have (for example a LoRA adapter).
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
