//! The `model_type` table: which per-architecture file turns a `config.json` into an [`ArchSpec`]. Supporting
//! another architecture that the shared decoder can express means one small file beside `llama.rs`,
//! `qwen2.rs` and `qwen3.rs` (its switches, and why), one line here, and its name in `SUPPORTED_MODEL_TYPES`
//! (lib.rs), which error messages list.

pub mod llama;
pub mod qwen2;
pub mod qwen3;
mod spec;

pub use spec::{ArchSpec, Architecture};

use crate::{HfConfig, ModelError};

impl ArchSpec {
    /// Picks the architecture from `model_type`.
    pub fn from_config(config: &HfConfig) -> Result<Self, ModelError> {
        match config.model_type.as_str() {
            "llama" => llama::spec(config),
            "mistral" => llama::mistral_spec(config),
            "qwen2" => qwen2::spec(config),
            "qwen3" => qwen3::spec(config),
            other => Err(ModelError::UnsupportedArchitecture {
                path: config.source_path(),
                model_type: other.to_string(),
            }),
        }
    }
}
