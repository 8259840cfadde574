//! Qwen3 (dense): Llama plus an RMSNorm over each head of q and k (weights `q_norm` / `k_norm`, `[head_dim]`),
//! applied before RoPE; no q/k/v bias unless `attention_bias`; an explicit `head_dim` (128 in transformers'
//! `Qwen3Config` when absent), so `num_heads * head_dim` may differ from `hidden_size`.

use super::spec::{ArchSpec, Architecture};
use crate::{HfConfig, ModelError};

/// transformers' `Qwen3Config.head_dim` default.
const DEFAULT_HEAD_DIM: usize = 128;

pub fn spec(config: &HfConfig) -> Result<ArchSpec, ModelError> {
    let head_dim = config.head_dim.unwrap_or(DEFAULT_HEAD_DIM);
    let mut spec = ArchSpec::common(config, Architecture::Qwen3, head_dim)?;
    let attention_bias = config.attention_bias.unwrap_or(false);
    spec.qkv_bias = attention_bias;
    spec.o_bias = attention_bias;
    spec.qk_norm = true;
    Ok(spec)
}
