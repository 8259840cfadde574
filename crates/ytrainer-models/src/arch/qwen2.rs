//! Qwen2 / Qwen2.5: Llama plus a bias on the q, k and v projections (always; there is no config switch).
//! `o_proj` and the MLP have no bias. The sliding window is off in every released checkpoint
//! (`use_sliding_window: false`) and is not implemented.

use super::spec::{ArchSpec, Architecture};
use crate::{HfConfig, ModelError};

pub fn spec(config: &HfConfig) -> Result<ArchSpec, ModelError> {
    if config.extra.get("use_sliding_window") == Some(&serde_json::Value::Bool(true)) {
        return Err(config.field_error(
            "use_sliding_window",
            "Qwen2 sliding-window attention is not supported; set it to false",
        ));
    }
    let head_dim = config
        .head_dim
        .unwrap_or(config.hidden_size / config.num_attention_heads.max(1));
    let mut spec = ArchSpec::common(config, Architecture::Qwen2, head_dim)?;
    spec.qkv_bias = true;
    Ok(spec)
}
