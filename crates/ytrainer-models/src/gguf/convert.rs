//! From GGUF to the Hugging Face world: tensor names both ways, the `config.json` a file's metadata implies, the
//! [`WeightSource`] that feeds the shared model builder (undoing llama.cpp's q/k row permutation), a [`Decoder`]
//! straight from the file ([`load_gguf`]), and an HF-layout directory ([`convert_gguf`]).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde_json::json;

use super::file::{GgufFile, GgufTensor, GgufValue};
use super::tokenizer::gguf_tokenizer;
use crate::arch::ArchSpec;
use crate::decoder::Decoder;
use crate::formats::load::{BaseWeights, WeightSource, build_with};
use crate::formats::st::{PendingTensor, write_f32};
use crate::lora::AdapterSpec;
use crate::{HfConfig, ModelError};
use ytrainer_kernels::quant::{QuantKind, QuantWeight};

/// GGUF tensor name -> Hugging Face parameter name (`None` for names with no HF counterpart).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Hugging Face parameter name -> GGUF tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undoes llama.cpp's per-head row permutation of q/k: GGUF row `2j + c` of a head is HF row `c * d/2 + j`.
/// `values` is `[rows, cols]` row-major with `rows = n_head * head_dim` (`cols = 1` for a bias).
pub fn unpermute_rows(values: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols.max(1);
    let hd = rows / n_head.max(1);
    let half = hd / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_head {
        for j in 0..half {
            for c in 0..2 {
                let src = h * hd + 2 * j + c;
                let dst = h * hd + c * half + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The tensors of a GGUF file under their HF names, dequantised (and un-permuted) on request.
pub(crate) struct GgufSource<'a> {
    gguf: &'a GgufFile,
    /// `Some((n_head, n_kv_head))` when q/k rows must be un-permuted (the `llama` architecture).
    permuted: Option<(usize, usize)>,
    /// Hand quantised linear weights to the builder as they are stored (QLoRA) instead of dequantising them.
    keep_quantized: bool,
}

impl<'a> GgufSource<'a> {
    pub(crate) fn new(gguf: &'a GgufFile, config: &HfConfig) -> Result<Self, ModelError> {
        let permuted = (gguf.architecture()? == "llama")
            .then(|| (config.num_attention_heads, config.num_kv_heads()));
        Ok(Self {
            gguf,
            permuted,
            keep_quantized: false,
        })
    }

    /// The tensor behind an HF name, its shape checked.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<(String, &'a GgufTensor), ModelError> {
        let g = gguf_name(name).unwrap_or_else(|| name.to_string());
        let t = self
            .gguf
            .tensor(&g)
            .ok_or_else(|| ModelError::MissingTensor {
                name: format!("{g} (HF `{name}`)"),
                file: self.gguf.path.clone(),
            })?;
        let found = t.shape();
        if found != shape {
            return Err(ModelError::ShapeMismatch {
                name: format!("{g} (HF `{name}`)"),
                file: self.gguf.path.clone(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok((g, t))
    }
}

/// Where llama.cpp's per-head q/k permutation put each HF row: HF row `dst` is GGUF row `order[dst]`.
pub fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head.max(1);
    let half = hd / 2;
    let mut order = (0..rows).collect::<Vec<_>>();
    for h in 0..n_head {
        for j in 0..half {
            for c in 0..2 {
                order[h * hd + c * half + j] = h * hd + 2 * j + c;
            }
        }
    }
    order
}

impl WeightSource for GgufSource<'_> {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.gguf.tensor(&g).is_some())
    }

    fn quantized(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<QuantWeight>, ModelError> {
        if !self.keep_quantized || shape.len() != 2 {
            return Ok(None);
        }
        let (g, t) = self.tensor(name, shape)?;
        let Some(kind) = QuantKind::from_ggml(t.ty.0) else {
            // F32 stays f32; a type ytrainer cannot read is reported by `get`, naming it.
            return Ok(None);
        };
        let bytes = self.gguf.mapped(t)?;
        let q = QuantWeight::new(kind, shape[0], shape[1], bytes).map_err(|e| {
            self.gguf
                .err(format!("tensor `{g}` ({}): {e}", kind.name()))
        })?;
        Ok(Some(match self.permuted {
            Some((nh, _)) if g.contains(".attn_q.") => {
                q.with_row_order(&unpermute_order(shape[0], nh))
            }
            Some((_, nkv)) if g.contains(".attn_k.") => {
                q.with_row_order(&unpermute_order(shape[0], nkv))
            }
            _ => q,
        }))
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (g, t) = self.tensor(name, shape)?;
        let values = self.gguf.read_f32(t)?;
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        Ok(match self.permuted {
            Some((nh, _)) if g.contains(".attn_q.") => unpermute_rows(&values, nh, cols),
            Some((_, nkv)) if g.contains(".attn_k.") => unpermute_rows(&values, nkv, cols),
            _ => values,
        })
    }
}

/// The HF `model_type` for a GGUF `general.architecture`.
fn model_type(arch: &str) -> Option<(&'static str, &'static str)> {
    Some(match arch {
        "llama" => ("llama", "LlamaForCausalLM"),
        "mistral" => ("mistral", "MistralForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
        _ => return None,
    })
}

/// The `config.json` equivalent of a GGUF file's metadata (transformers-5 field names and style).
pub fn hf_config(gguf: &GgufFile) -> Result<HfConfig, ModelError> {
    let arch = gguf.architecture()?.to_string();
    let (mt, class) = model_type(&arch).ok_or_else(|| {
        gguf.err(format!(
            "metadata `general.architecture`: `{arch}` is not supported; supported: llama, mistral, qwen2, qwen3"
        ))
    })?;
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<u64, ModelError> {
        let full = key(k);
        match gguf.get(&full) {
            Some(v) => v.as_u64().ok_or_else(|| {
                gguf.err(format!(
                    "metadata `{full}`: expected one integer, found {v:?} (per-layer values are not supported)"
                ))
            }),
            None => Err(gguf.err(format!("metadata `{full}` is missing"))),
        }
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = match gguf.get(&key("attention.head_count_kv")) {
        Some(_) => need("attention.head_count_kv")?,
        None => heads,
    };
    let head_dim = match gguf.get(&key("attention.key_length")) {
        Some(_) => need("attention.key_length")?,
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    let vocab = match gguf.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
        Some(t) => t.len() as u64,
        None => match gguf.get(&key("vocab_size")) {
            Some(_) => need("vocab_size")?,
            None => gguf
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| gguf.err("cannot tell the vocabulary size: no tokenizer.ggml.tokens, no vocab_size, no token_embd.weight".into()))?,
        },
    };
    let eps = gguf
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(GgufValue::as_f64)
        .unwrap_or(1e-6);
    let theta = gguf
        .get(&key("rope.freq_base"))
        .and_then(GgufValue::as_f64)
        .unwrap_or(10_000.0);
    if let Some(t) = gguf
        .get(&key("rope.scaling.type"))
        .and_then(GgufValue::as_str)
        && t != "none"
    {
        return Err(gguf.err(format!(
            "metadata `{}`: RoPE scaling \"{t}\" is not supported for GGUF import",
            key("rope.scaling.type")
        )));
    }
    if gguf.tensor("rope_freqs.weight").is_some() {
        return Err(gguf.err(
            "tensor `rope_freqs.weight` (Llama-3.1 RoPE frequency factors) is not supported for GGUF import; \
             use the Hugging Face checkpoint of this model"
                .into(),
        ));
    }
    let tok_id = |k: &str| {
        gguf.get(&format!("tokenizer.ggml.{k}"))
            .and_then(GgufValue::as_u64)
    };
    let tied = gguf.tensor("output.weight").is_none();
    let bias = gguf.tensor("blk.0.attn_q.bias").is_some();
    let mut j = json!({
        "architectures": [class],
        "model_type": mt,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "dtype": "float32",
    });
    let o = j.as_object_mut().expect("object");
    if let Some(ctx) = gguf.get(&key("context_length")).and_then(GgufValue::as_u64) {
        o.insert("max_position_embeddings".into(), json!(ctx));
    }
    if mt == "llama" || mt == "mistral" {
        o.insert("attention_bias".into(), json!(bias));
        o.insert("mlp_bias".into(), json!(false));
    }
    for (field, k) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ] {
        if let Some(id) = tok_id(k) {
            o.insert(field.into(), json!(id));
        }
    }
    let mut config = HfConfig::from_json_str(&j.to_string()).map_err(|e| {
        gguf.err(format!(
            "the metadata does not make a valid config.json: {e}"
        ))
    })?;
    config.source = Some(gguf.path.clone());
    Ok(config)
}

/// Loads a GGUF file as a [`Decoder`] (weights dequantised to f32), prepared for training as `adapter` says.
pub fn load_gguf(
    path: &Path,
    adapter: &AdapterSpec,
    device: &Device,
) -> Result<(Decoder, HfConfig), ModelError> {
    load_gguf_with(path, adapter, device, BaseWeights::F32)
}

/// [`load_gguf`] with the linear weights held as `base` says: [`BaseWeights::Stored`] keeps every quantised
/// (or half-precision) projection in its GGUF blocks, memory-mapped (QLoRA; embeddings and norms are f32).
pub fn load_gguf_with(
    path: &Path,
    adapter: &AdapterSpec,
    device: &Device,
    base: BaseWeights,
) -> Result<(Decoder, HfConfig), ModelError> {
    let (model, config) = build_gguf(path, device, base)?;
    Ok((model.with_adapter(adapter)?, config))
}

/// A GGUF model for inference only: nothing trainable, so a quantised file's linear weights can stay in their
/// blocks (`base`: [`BaseWeights::Stored`]) without the full-fine-tuning refusal of [`load_gguf_with`]. A PEFT
/// adapter may still be attached on top (`load_peft_adapter`).
pub fn load_gguf_frozen(
    path: &Path,
    device: &Device,
    base: BaseWeights,
) -> Result<(Decoder, HfConfig), ModelError> {
    let (model, config) = build_gguf(path, device, base)?;
    Ok((model.set_require_grad(false), config))
}

/// The decoder of a GGUF file with its linear weights held as `base` says, before any adapter.
fn build_gguf(
    path: &Path,
    device: &Device,
    base: BaseWeights,
) -> Result<(Decoder, HfConfig), ModelError> {
    let gguf = GgufFile::open(path)?;
    let config = hf_config(&gguf)?;
    let spec = ArchSpec::from_config(&config)?;
    let mut source = GgufSource::new(&gguf, &config)?;
    source.keep_quantized = base == BaseWeights::Stored;
    let quantize = match base {
        BaseWeights::Quantize(kind) => Some(kind),
        _ => None,
    };
    let mut model = build_with(spec, config.clone(), &mut source, device, quantize)?;
    model.base_model_name_or_path = crate::load::absolute_display(path);
    Ok((model, config))
}

/// `(HF name, HF shape)` of every tensor the architecture reads, in the order `build` reads them.
pub(crate) fn expected_tensors(spec: &ArchSpec) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let (q, kv) = (spec.num_heads * hd, spec.num_kv_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![spec.vocab_size, h],
    )];
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        let mut push = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
        push("self_attn.q_proj.weight", vec![q, h]);
        push("self_attn.k_proj.weight", vec![kv, h]);
        push("self_attn.v_proj.weight", vec![kv, h]);
        push("self_attn.o_proj.weight", vec![h, q]);
        if spec.qkv_bias {
            push("self_attn.q_proj.bias", vec![q]);
            push("self_attn.k_proj.bias", vec![kv]);
            push("self_attn.v_proj.bias", vec![kv]);
        }
        if spec.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        if spec.qk_norm {
            push("self_attn.q_norm.weight", vec![hd]);
            push("self_attn.k_norm.weight", vec![hd]);
        }
        push("mlp.gate_proj.weight", vec![i, h]);
        push("mlp.up_proj.weight", vec![i, h]);
        push("mlp.down_proj.weight", vec![h, i]);
        if spec.mlp_bias {
            push("mlp.gate_proj.bias", vec![i]);
            push("mlp.up_proj.bias", vec![i]);
            push("mlp.down_proj.bias", vec![h]);
        }
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![spec.vocab_size, h]));
    }
    out
}

/// What [`convert_gguf`] wrote, and what it could not.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    pub files: Vec<PathBuf>,
    /// Non-fatal problems (e.g. a tokenizer that could not be rebuilt).
    pub warnings: Vec<String>,
}

/// Writes an HF-layout directory from a GGUF file: `config.json`, `model.safetensors` (f32), and when the
/// tokenizer can be rebuilt `tokenizer.json` + `tokenizer_config.json` (with the chat template) and
/// `chat_template.jinja`. Tensors are dequantised and written one at a time.
pub fn convert_gguf(path: &Path, out: &Path) -> Result<ConvertReport, ModelError> {
    convert_gguf_with(path, out, true)
}

/// [`convert_gguf`], writing the f32 `model.safetensors` only when `weights` (a run that trains LoRA over the
/// quantised GGUF needs only the config and the tokenizer files beside it).
pub fn convert_gguf_with(
    path: &Path,
    out: &Path,
    weights: bool,
) -> Result<ConvertReport, ModelError> {
    let gguf = GgufFile::open(path)?;
    let config = hf_config(&gguf)?;
    let spec = ArchSpec::from_config(&config)?;
    let expected = expected_tensors(&spec);
    // Check everything before writing anything: names, shapes, types.
    for (name, shape) in &expected {
        let g = gguf_name(name).expect("every expected name maps");
        let t = gguf.tensor(&g).ok_or_else(|| ModelError::MissingTensor {
            name: format!("{g} (HF `{name}`)"),
            file: path.to_path_buf(),
        })?;
        if &t.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: format!("{g} (HF `{name}`)"),
                file: path.to_path_buf(),
                expected: shape.clone(),
                found: t.shape(),
            });
        }
        if t.ty.block().is_none() {
            // read_f32 produces the error that names tensor and type.
            gguf.read_f32(t)?;
        }
    }
    let mut report = ConvertReport::default();
    for t in &gguf.tensors {
        if hf_name(&t.name).is_none() {
            report.warnings.push(format!(
                "tensor `{}` has no Hugging Face counterpart; skipped",
                t.name
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let config_path = out.join("config.json");
    std::fs::write(&config_path, config.to_json_string() + "\n")
        .map_err(|e| ModelError::io(&config_path, e))?;
    report.files.push(config_path);

    if weights {
        write_weights(&gguf, &config, expected, out, &mut report)?;
    }
    write_tokenizer_files(&gguf, &config, out, &mut report)?;
    Ok(report)
}

/// `model.safetensors` (f32), tensor by tensor.
fn write_weights(
    gguf: &GgufFile,
    config: &HfConfig,
    expected: Vec<(String, Vec<usize>)>,
    out: &Path,
    report: &mut ConvertReport,
) -> Result<(), ModelError> {
    let source = RefCell::new(GgufSource::new(gguf, config)?);
    let failure: RefCell<Option<ModelError>> = RefCell::new(None);
    let pending: Vec<PendingTensor<'_>> = expected
        .into_iter()
        .map(|(name, shape)| {
            let (source, failure) = (&source, &failure);
            let n = shape.iter().product::<usize>();
            let s = shape.clone();
            PendingTensor::new(name.clone(), shape, move || {
                match source.borrow_mut().get(&name, &s) {
                    Ok(v) => v,
                    Err(e) => {
                        failure.borrow_mut().get_or_insert(e);
                        vec![0.0; n]
                    }
                }
            })
        })
        .collect();
    let weights_path = out.join("model.safetensors");
    write_f32(&weights_path, pending)?;
    if let Some(e) = failure.into_inner() {
        let _ = std::fs::remove_file(&weights_path);
        return Err(e);
    }
    report.files.push(weights_path);
    Ok(())
}

/// Writes a GGUF's tokenizer files into `out` as [`convert_gguf`] does (`tokenizer.json`,
/// `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`): for `merge`, which writes the weights
/// itself. Returns the files written and the warnings (a tokenizer that could not be rebuilt).
pub fn write_gguf_tokenizer_files(path: &Path, out: &Path) -> Result<ConvertReport, ModelError> {
    let gguf = GgufFile::open(path)?;
    let config = hf_config(&gguf)?;
    let mut report = ConvertReport::default();
    write_tokenizer_files(&gguf, &config, out, &mut report)?;
    Ok(report)
}

/// `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`.
fn write_tokenizer_files(
    gguf: &GgufFile,
    config: &HfConfig,
    out: &Path,
    report: &mut ConvertReport,
) -> Result<(), ModelError> {
    match gguf_tokenizer(gguf) {
        Ok(tok) => {
            let p = out.join("tokenizer.json");
            std::fs::write(&p, &tok.tokenizer_json).map_err(|e| ModelError::io(&p, e))?;
            report.files.push(p);
            let p = out.join("tokenizer_config.json");
            std::fs::write(&p, tok.tokenizer_config_json()).map_err(|e| ModelError::io(&p, e))?;
            report.files.push(p);
            if let Some(t) = &tok.chat_template {
                let p = out.join("chat_template.jinja");
                std::fs::write(&p, t).map_err(|e| ModelError::io(&p, e))?;
                report.files.push(p);
            }
        }
        Err(e) => report.warnings.push(format!("no tokenizer written: {e}")),
    }
    let mut generation = serde_json::Map::new();
    for (k, v) in [
        ("bos_token_id", &config.bos_token_id),
        ("eos_token_id", &config.eos_token_id),
        ("pad_token_id", &config.pad_token_id),
    ] {
        if let Some(v) = v {
            generation.insert(k.into(), serde_json::to_value(v).expect("serializes"));
        }
    }
    let p = out.join("generation_config.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&generation).expect("serializes"),
    )
    .map_err(|e| ModelError::io(&p, e))?;
    report.files.push(p);
    Ok(())
}
