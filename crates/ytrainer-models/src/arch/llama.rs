//! Llama (and Mistral): the reference layout the other architectures are described against.
//!
//! - no biases unless `attention_bias` (q/k/v/o) or `mlp_bias` (gate/up/down) say so;
//! - `head_dim` from the config or `hidden_size / num_attention_heads`;
//! - RoPE `default` or `llama3` frequency scaling (Llama 3.1+);
//! - Mistral is the same network with an optional sliding attention window.

use super::spec::{ArchSpec, Architecture};
use crate::{HfConfig, ModelError};

pub fn spec(config: &HfConfig) -> Result<ArchSpec, ModelError> {
    let head_dim = config
        .head_dim
        .unwrap_or(config.hidden_size / config.num_attention_heads.max(1));
    let mut spec = ArchSpec::common(config, Architecture::Llama, head_dim)?;
    let attention_bias = config.attention_bias.unwrap_or(false);
    spec.qkv_bias = attention_bias;
    spec.o_bias = attention_bias;
    spec.mlp_bias = config.mlp_bias.unwrap_or(false);
    Ok(spec)
}

pub fn mistral_spec(config: &HfConfig) -> Result<ArchSpec, ModelError> {
    let mut spec = spec(config)?;
    spec.architecture = Architecture::Mistral;
    spec.qkv_bias = false;
    spec.o_bias = false;
    spec.mlp_bias = false;
    spec.sliding_window = config.sliding_window;
    Ok(spec)
}
