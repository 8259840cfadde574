//! What distinguishes one architecture from another, resolved from `config.json` into plain switches: the
//! [`ArchSpec`] every part of the network reads. The per-architecture files start from [`ArchSpec::common`] and
//! set what differs; the `model_type` table that picks one is in `arch/mod.rs`.

use crate::ModelError;
use crate::config::{HfConfig, RopeConfig};

/// Which architecture a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// Everything the forward pass needs to know about an architecture, resolved from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchSpec {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Bias on q/k/v projections (Qwen2 always; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Mistral: a query sees at most this many keys (itself included).
    pub sliding_window: Option<usize>,
}

impl ArchSpec {
    /// The fields every architecture reads the same way; the per-architecture files adjust the rest.
    pub(crate) fn common(
        config: &HfConfig,
        architecture: Architecture,
        head_dim: usize,
    ) -> Result<Self, ModelError> {
        config.validate_sizes(head_dim)?;
        Ok(Self {
            architecture,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_layers: config.num_hidden_layers,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_kv_heads(),
            head_dim,
            rms_norm_eps: config.rms_norm_eps,
            rope: config.rope()?,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            tie_word_embeddings: config.tie_word_embeddings(),
            sliding_window: None,
        })
    }

    /// RoPE inverse frequencies `1 / theta^(2i/d)`, with Llama-3 scaling when configured (as transformers'
    /// `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope.theta.powf((2 * i) as f64 / d as f64);
                let Some(s) = self.rope.llama3 else {
                    return f as f32;
                };
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor;
                let high_wavelen = old / s.high_freq_factor;
                let wavelen = std::f64::consts::TAU / f;
                let scaled = if wavelen > low_wavelen {
                    f / s.factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                };
                scaled as f32
            })
            .collect()
    }

    /// Parameter count implied by the spec (embedding counted once when tied), for checks and reports.
    pub fn param_count(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
            + if self.qk_norm { 2 * hd } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}
