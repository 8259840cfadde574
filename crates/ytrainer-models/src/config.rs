//! `config.json` of a Hugging Face checkpoint, with HF's field names.
//!
//! Only the fields the decoders need are typed; every other field is kept verbatim in [`HfConfig::extra`] so that
//! a checkpoint we save carries the user's config through unchanged. Defaults follow `transformers` (the config
//! classes of Llama / Qwen2 / Qwen3), because a field left out of `config.json` means "the class default" there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// `eos_token_id` is an int in most configs and a list in some (Llama 3 instruct).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE settings: transformers-5 `rope_parameters` and the older `rope_scaling` share this shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `rope_scaling` of older configs spells it `type`.
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Serde mirror of a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (plain multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads` (Qwen3: 128, as in transformers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers >= 5 style: `{ "rope_theta": .., "rope_type": "default" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// transformers < 5 style scaling (`{"rope_type": "llama3", "factor": 8.0, ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// Defaults to false for every supported architecture (as in their transformers config classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// Mistral's sliding-window attention (ignored by the other architectures, as in transformers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Standard deviation of [`crate::init_random`]'s normal init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
    /// transformers < 5 spelling of the checkpoint dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// transformers >= 5 spelling of the checkpoint dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Every other field, kept so that a saved config.json round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Where the config was read from, for error messages (not serialized).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// Llama-3 style frequency scaling of RoPE (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The resolved RoPE settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub llama3: Option<Llama3RopeScaling>,
}

impl HfConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let mut config = Self::from_json_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            what: "Hugging Face config.json",
            source,
        })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Serializes with 2-space indentation, as `save_pretrained` does, with RoPE in both spellings
    /// ([`HfConfig::with_both_rope_spellings`]).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.with_both_rope_spellings())
            .expect("HfConfig always serializes")
    }

    /// This config with its RoPE settings written the way both generations of readers expect: transformers 5's
    /// `rope_parameters` and, as transformers 4 saved them, a top-level `rope_theta` (plus `rope_scaling` for a
    /// scaled RoPE). A reader of only one spelling (transformers 4.x, llama.cpp's converter, some vLLM
    /// versions read the top-level `rope_theta`) would otherwise silently fall back to its default base. Both
    /// spellings carry the same values as [`HfConfig::rope`] resolves them; a config with neither stays so.
    pub fn with_both_rope_spellings(&self) -> HfConfig {
        let mut c = self.clone();
        let params = c.rope_parameters.clone().or_else(|| c.rope_scaling.clone());
        let theta = params.as_ref().and_then(|p| p.rope_theta).or(c.rope_theta);
        let Some(theta) = theta else {
            return c;
        };
        c.rope_theta = Some(theta);
        let mut p = params.unwrap_or_default();
        p.rope_theta = Some(theta);
        if p.rope_type.is_none() {
            p.rope_type = Some("default".into());
        }
        if p.rope_type.as_deref() != Some("default") && c.rope_scaling.is_none() {
            let mut scaling = p.clone();
            scaling.rope_theta = None;
            c.rope_scaling = Some(scaling);
        }
        c.rope_parameters = Some(p);
        c
    }

    /// The file this config came from, or `config.json` for one built in memory.
    pub fn source_path(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from("config.json"))
    }

    pub(crate) fn field_error(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::ConfigField {
            path: self.source_path(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Resolves `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older) into one setting.
    /// A RoPE type we do not implement is an error: silently using plain RoPE would give wrong logits.
    pub fn rope(&self) -> Result<RopeConfig, ModelError> {
        let (params, field) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(p)) => (Some(p), "rope_scaling"),
            (None, None) => (None, ""),
        };
        let theta = params
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(self.field_error(
                "rope_theta",
                format!("must be a positive number, got {theta}"),
            ));
        }
        let rope_type = params
            .and_then(|p| p.rope_type.as_deref())
            .unwrap_or("default");
        let llama3 = match rope_type {
            "default" => None,
            "llama3" => {
                let p = params.expect("a rope_type implies parameters");
                let need = |v: Option<f64>, name: &str| {
                    v.ok_or_else(|| {
                        self.field_error(
                            &format!("{field}.{name}"),
                            "required when rope_type is \"llama3\"",
                        )
                    })
                };
                Some(Llama3RopeScaling {
                    factor: need(p.factor, "factor")?,
                    low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            self.field_error(
                                &format!("{field}.original_max_position_embeddings"),
                                "required when rope_type is \"llama3\"",
                            )
                        })?,
                })
            }
            other => {
                return Err(self.field_error(
                    &format!("{field}.rope_type"),
                    format!(
                        "RoPE type \"{other}\" is not supported; supported: \"default\", \"llama3\""
                    ),
                ));
            }
        };
        Ok(RopeConfig { theta, llama3 })
    }

    /// Checks the sizes every architecture relies on, naming the offending field.
    pub(crate) fn validate_sizes(&self, head_dim: usize) -> Result<(), ModelError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", head_dim),
        ] {
            if value == 0 {
                return Err(self.field_error(field, "must be greater than 0"));
            }
        }
        // Upper bounds far above any real decoder (Llama 3.1 405B: 126 layers, hidden 16384, intermediate 53248,
        // 128 heads; the largest vocabularies ~260k), so that an absurd config is an error naming the field
        // before anything is allocated from it, not a multi-terabyte allocation that aborts (issue 21 item 5).
        for (field, value, limit) in [
            ("vocab_size", self.vocab_size, 1usize << 24),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 4096),
            ("num_key_value_heads", self.num_kv_heads(), 4096),
            ("head_dim", head_dim, 4096),
        ] {
            if value > limit {
                return Err(self.field_error(
                    field,
                    format!(
                        "{value} is beyond any supported model (at most {limit}); check that this config belongs to the weights"
                    ),
                ));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(self.field_error(
                "rms_norm_eps",
                format!("must be a positive number, got {}", self.rms_norm_eps),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(self.field_error(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(self.field_error(
                "head_dim",
                format!("RoPE needs an even head_dim, got {head_dim}"),
            ));
        }
        if let Some(act) = self.hidden_act.as_deref()
            && act != "silu"
            && act != "swish"
        {
            return Err(self.field_error(
                "hidden_act",
                format!("activation \"{act}\" is not supported; these decoders use \"silu\""),
            ));
        }
        Ok(())
    }
}
