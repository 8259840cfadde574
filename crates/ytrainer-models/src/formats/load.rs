//! Building a [`Decoder`] from a Hugging Face checkpoint directory or from a seeded random init.
//!
//! Both paths go through one builder that asks a [`WeightSource`] for each tensor by its HF name and shape
//! (PyTorch layout `[out, in]`) and transposes linear weights to Burn's `[in, out]` on the host, one tensor at a
//! time, so a load never holds more than the model plus one tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;

use super::st::SafetensorsReader;
use crate::arch::ArchSpec;
use crate::decoder::{Attention, Decoder, DecoderLayer, Embedding, LmHead, Mlp, RmsNorm};
use crate::lora::{AdapterSpec, LoraLinear};
use crate::rng::InitRng;
use crate::{HfConfig, ModelError};
use ytrainer_kernels::quant::{QuantKind, QuantWeight};

/// Where the builder gets tensors from. Values are in HF layout (`[out, in]` for linear weights).
pub(crate) trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;
    /// The tensor in its stored encoding, when the source keeps linear weights quantised (a GGUF read for
    /// QLoRA); `None` means: read it with [`WeightSource::get`].
    fn quantized(
        &mut self,
        _name: &str,
        _shape: &[usize],
    ) -> Result<Option<QuantWeight>, ModelError> {
        Ok(None)
    }
}

/// How the frozen base's linear weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseWeights {
    /// f32 tensors (trainable: full fine-tuning, or LoRA over an f32 base).
    #[default]
    F32,
    /// As stored in a quantised GGUF (memory-mapped blocks; F32 tensors stay f32).
    Stored,
    /// Quantised on load to this encoding (`q8_0`, `q4_0`, `nf4`): QLoRA over an f16/bf16/f32 checkpoint.
    Quantize(QuantKind),
}

impl BaseWeights {
    /// Parses `q8_0` / `q4_0` / `nf4` (the `--quantize-base` values).
    pub fn parse_quantize(s: &str) -> Option<Self> {
        Some(Self::Quantize(match s.to_ascii_lowercase().as_str() {
            "q8_0" => QuantKind::Q8_0,
            "q4_0" => QuantKind::Q4_0,
            "nf4" => QuantKind::Nf4,
            _ => return None,
        }))
    }
}

/// [`load_pretrained`] with the base's linear weights held as `base` says (only LoRA can train over a
/// quantised base).
pub fn load_pretrained_with(
    dir: &Path,
    adapter: &AdapterSpec,
    device: &Device,
    base: BaseWeights,
) -> Result<(Decoder, HfConfig), ModelError> {
    let mut config = HfConfig::from_file(&dir.join("config.json"))?;
    let mut spec = ArchSpec::from_config(&config)?;
    let mut source = CheckpointSource::open(dir)?;
    if !spec.tie_word_embeddings && !source.contains("lm_head.weight") {
        if config.tie_word_embeddings == Some(false) {
            return Err(ModelError::ConfigField {
                path: dir.join("config.json"),
                field: "tie_word_embeddings".into(),
                message: format!(
                    "false, but {} has no `lm_head.weight`; set it to true if the head shares the embeddings, or \
                     use the checkpoint that holds the head",
                    source.described_as.display()
                ),
            });
        }
        // No `tie_word_embeddings` key and no head: the head is the embeddings (what such checkpoints mean).
        spec.tie_word_embeddings = true;
        config.tie_word_embeddings = Some(true);
    }
    source.check_names(&spec)?;
    let quantize = match base {
        BaseWeights::Quantize(kind) => Some(kind),
        _ => None,
    };
    let mut model = build_with(spec, config.clone(), &mut source, device, quantize)?;
    model.base_model_name_or_path = absolute_display(dir);
    let model = model.with_adapter(adapter)?;
    Ok((model, config))
}

/// `path` as an absolute path (symlinks resolved where it exists), for `base_model_name_or_path`: a relative path
/// only resolves from the directory training ran in, so PEFT could not load the adapter from anywhere else.
pub fn absolute_display(path: &Path) -> String {
    path.canonicalize()
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Loads `config.json` and `model.safetensors` (or the shards listed in `model.safetensors.index.json`) from
/// `dir`, converting F16/BF16 to f32, and prepares it for training as `adapter` says.
///
/// When `lm_head.weight` is absent the head is tied to the embeddings (what every such real checkpoint means),
/// and the returned config says `tie_word_embeddings: true`.
pub fn load_pretrained(
    dir: &Path,
    adapter: &AdapterSpec,
    device: &Device,
) -> Result<(Decoder, HfConfig), ModelError> {
    load_pretrained_with(dir, adapter, device, BaseWeights::F32)
}

/// A randomly initialised model (normal(0, `initializer_range` = 0.02 by default) for linears and embeddings,
/// ones for norms, zeros for biases), deterministic in `seed` on every backend. Used for self-made presets.
pub fn init_random(
    config: &HfConfig,
    seed: u64,
    adapter: &AdapterSpec,
    device: &Device,
) -> Result<Decoder, ModelError> {
    init_random_with(config, seed, adapter, device, BaseWeights::F32)
}

/// [`init_random`] with the linear weights held as `base` says (`Quantize`: the same random weights quantised,
/// for benchmarks of LoRA over a quantised base; `Stored` is f32 here, there being no file).
pub fn init_random_with(
    config: &HfConfig,
    seed: u64,
    adapter: &AdapterSpec,
    device: &Device,
    base: BaseWeights,
) -> Result<Decoder, ModelError> {
    let spec = ArchSpec::from_config(config)?;
    let mut source = RandomSource {
        seed,
        std: config.initializer_range.unwrap_or(0.02),
    };
    let quantize = match base {
        BaseWeights::Quantize(kind) => Some(kind),
        _ => None,
    };
    build_with(spec, config.clone(), &mut source, device, quantize)?.with_adapter(adapter)
}

/// The tensors of a checkpoint directory: one file, or shards through the index.
pub(crate) struct CheckpointSource {
    /// Tensor name -> file, for error messages and shard lookup.
    location: HashMap<String, PathBuf>,
    readers: BTreeMap<PathBuf, SafetensorsReader>,
    /// What a missing tensor's error names: the single file or the index.
    described_as: PathBuf,
}

impl CheckpointSource {
    pub(crate) fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            let reader = SafetensorsReader::open(&single)?;
            let location = reader
                .names()
                .map(|n| (n.to_string(), single.clone()))
                .collect();
            let readers = BTreeMap::from([(single.clone(), reader)]);
            return Ok(Self {
                location,
                readers,
                described_as: single,
            });
        }
        if !index.is_file() {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            what: "safetensors index (needs a `weight_map` object)",
            source,
        })?;
        let location = parsed
            .weight_map
            .into_iter()
            .map(|(name, file)| (name, dir.join(file)))
            .collect();
        Ok(Self {
            location,
            readers: BTreeMap::new(),
            described_as: index,
        })
    }
}

impl CheckpointSource {
    /// Every tensor the model described by `spec` needs is present and every tensor present is used (besides
    /// RoPE's `inv_freq` buffers and a copy of a tied head), or an error listing the first few of each.
    fn check_names(&self, spec: &ArchSpec) -> Result<(), ModelError> {
        let expected: Vec<String> = crate::gguf::expected_tensors(spec)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let first = |names: &[&str]| {
            let mut v: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
            if names.len() > 5 {
                v.push(format!("and {} more", names.len() - 5));
            }
            v.join(", ")
        };
        let sizes = format!(
            "config.json describes {} layers, hidden size {}, intermediate size {}, {} heads / {} KV heads",
            spec.num_layers,
            spec.hidden_size,
            spec.intermediate_size,
            spec.num_heads,
            spec.num_kv_heads
        );
        let missing: Vec<&str> = expected
            .iter()
            .filter(|n| !self.location.contains_key(*n))
            .map(String::as_str)
            .collect();
        if let [name] = missing.as_slice() {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                file: self.described_as.clone(),
            });
        }
        if !missing.is_empty() {
            return Err(ModelError::WeightsMismatch {
                path: self.described_as.clone(),
                message: format!(
                    "{} expected tensors are missing: {} ({sizes}); use the config.json that belongs to these \
                     weights",
                    missing.len(),
                    first(&missing)
                ),
            });
        }
        let expected: std::collections::HashSet<&str> =
            expected.iter().map(String::as_str).collect();
        let mut unused: Vec<&str> = self
            .location
            .keys()
            .map(String::as_str)
            .filter(|n| {
                let allowed = n.ends_with(".rotary_emb.inv_freq")
                    || (spec.tie_word_embeddings && *n == "lm_head.weight");
                !(expected.contains(n) || allowed)
            })
            .collect();
        unused.sort();
        if !unused.is_empty() {
            return Err(ModelError::WeightsMismatch {
                path: self.described_as.clone(),
                message: format!(
                    "{} tensors are not used by the model it describes: {} ({sizes}); use the config.json that \
                     belongs to these weights",
                    unused.len(),
                    first(&unused)
                ),
            });
        }
        Ok(())
    }
}

impl WeightSource for CheckpointSource {
    fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let file = self
            .location
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                file: self.described_as.clone(),
            })?;
        if !self.readers.contains_key(file) {
            let reader = SafetensorsReader::open(file)?;
            self.readers.insert(file.clone(), reader);
        }
        self.readers
            .get_mut(file)
            .expect("reader was just opened")
            .read_f32(name, shape)
    }
}

struct RandomSource {
    seed: u64,
    std: f64,
}

impl WeightSource for RandomSource {
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let n = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            InitRng::for_tensor(self.seed, name).normal(n, 0.0, self.std)
        })
    }
}

/// `[rows, cols]` row-major -> `[cols, rows]` row-major.
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

struct Builder<'a> {
    source: &'a mut dyn WeightSource,
    device: &'a Device,
    /// Quantise linear weights on load to this encoding (rows that are not whole blocks stay f32).
    quantize: Option<QuantKind>,
}

impl Builder<'_> {
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor<1>, ModelError> {
        let values = self.source.get(name, &[len])?;
        Ok(Tensor::from_data(
            TensorData::new(values, [len]),
            self.device,
        ))
    }

    /// A matrix kept in HF layout (the embedding table).
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, ModelError> {
        let values = self.source.get(name, &[rows, cols])?;
        Ok(Tensor::from_data(
            TensorData::new(values, [rows, cols]),
            self.device,
        ))
    }

    /// A linear weight stored `[out, in]`, returned in Burn layout `[in, out]`.
    fn linear_weight(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Tensor<2>, ModelError> {
        let values = self.source.get(name, &[d_out, d_in])?;
        let values = transpose(&values, d_out, d_in);
        Ok(Tensor::from_data(
            TensorData::new(values, [d_in, d_out]),
            self.device,
        ))
    }

    fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<LoraLinear, ModelError> {
        let name = format!("{prefix}.weight");
        let bias = match bias {
            true => Some(self.vector(&format!("{prefix}.bias"), d_out)?),
            false => None,
        };
        if let Some(q) = self.source.quantized(&name, &[d_out, d_in])? {
            return Ok(LoraLinear::quantized(q, bias, self.device));
        }
        if let Some(kind) = self.quantize.filter(|k| d_in.is_multiple_of(k.block().0)) {
            let values = self.source.get(&name, &[d_out, d_in])?;
            let q = QuantWeight::encode(kind, &values, d_out, d_in)
                .expect("whole blocks checked above");
            return Ok(LoraLinear::quantized(q, bias, self.device));
        }
        let weight = self.linear_weight(&name, d_in, d_out)?;
        Ok(LoraLinear::new(weight, bias))
    }

    fn norm(&mut self, prefix: &str, len: usize, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm {
            weight: Param::from_tensor(self.vector(&format!("{prefix}.weight"), len)?),
            eps,
        })
    }
}

pub(crate) fn build_with(
    spec: ArchSpec,
    config: HfConfig,
    source: &mut dyn WeightSource,
    device: &Device,
    quantize: Option<QuantKind>,
) -> Result<Decoder, ModelError> {
    let mut b = Builder {
        source,
        device,
        quantize,
    };
    let (h, hd, eps) = (spec.hidden_size, spec.head_dim, spec.rms_norm_eps);
    let (q_dim, kv_dim) = (spec.num_heads * hd, spec.num_kv_heads * hd);
    let embed_tokens = Embedding {
        weight: Param::from_tensor(b.matrix("model.embed_tokens.weight", spec.vocab_size, h)?),
        original: None,
    };
    let mut layers = Vec::with_capacity(spec.num_layers);
    for i in 0..spec.num_layers {
        let p = format!("model.layers.{i}");
        let (q_norm, k_norm) = if spec.qk_norm {
            (
                Some(b.norm(&format!("{p}.self_attn.q_norm"), hd, eps)?),
                Some(b.norm(&format!("{p}.self_attn.k_norm"), hd, eps)?),
            )
        } else {
            (None, None)
        };
        let self_attn = Attention {
            q_proj: b.linear(&format!("{p}.self_attn.q_proj"), h, q_dim, spec.qkv_bias)?,
            k_proj: b.linear(&format!("{p}.self_attn.k_proj"), h, kv_dim, spec.qkv_bias)?,
            v_proj: b.linear(&format!("{p}.self_attn.v_proj"), h, kv_dim, spec.qkv_bias)?,
            o_proj: b.linear(&format!("{p}.self_attn.o_proj"), q_dim, h, spec.o_bias)?,
            q_norm,
            k_norm,
            num_heads: spec.num_heads,
            num_kv_heads: spec.num_kv_heads,
            head_dim: hd,
        };
        let i_dim = spec.intermediate_size;
        let mlp = Mlp {
            gate_proj: b.linear(&format!("{p}.mlp.gate_proj"), h, i_dim, spec.mlp_bias)?,
            up_proj: b.linear(&format!("{p}.mlp.up_proj"), h, i_dim, spec.mlp_bias)?,
            down_proj: b.linear(&format!("{p}.mlp.down_proj"), i_dim, h, spec.mlp_bias)?,
        };
        layers.push(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: b.norm(&format!("{p}.input_layernorm"), h, eps)?,
            post_attention_layernorm: b.norm(&format!("{p}.post_attention_layernorm"), h, eps)?,
        });
    }
    let norm = b.norm("model.norm", h, eps)?;
    let lm_head = match spec.tie_word_embeddings {
        true => None,
        false => Some(LmHead {
            weight: Param::from_tensor(b.linear_weight("lm_head.weight", h, spec.vocab_size)?),
            original: None,
        }),
    };
    Ok(Decoder::from_parts(
        embed_tokens,
        layers,
        norm,
        lm_head,
        spec,
        config,
    ))
}
