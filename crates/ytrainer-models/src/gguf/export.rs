//! Writing llama.cpp GGUF files: a whole model (LoRA merged) in f32, f16, q8_0 or q4_0, and a LoRA adapter as
//! llama.cpp's LoRA GGUF (`general.type = "adapter"`), so a model trained here runs in llama.cpp and ollama.
//!
//! The layout follows llama.cpp's `convert_hf_to_gguf.py`: GGUF v3, 32-byte alignment, `{arch}.*` hyper-parameters,
//! the tokenizer as `tokenizer.ggml.*`, tensors under llama.cpp's names with the dimensions listed fastest first.
//! For the `llama` architecture the q/k rows are permuted per head back into llama.cpp's interleaved RoPE order
//! (the inverse of what import undoes). Norms and biases stay f32; a matrix whose rows do not divide into the
//! chosen type's blocks falls back to f16, as llama.cpp's quantizer does.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use ytrainer_kernels::quant::{QuantKind, encode};

use super::convert::gguf_name;
use super::file::{GgufFile, GgufValue};
use crate::decoder::Decoder;
use crate::formats::load::transpose;
use crate::formats::save::hf_tensors;
use crate::lora::LoraConfig;
use crate::{AdapterSpec, ModelError};

const ALIGNMENT: usize = 32;

/// Tensor type of an exported GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl GgufType {
    /// `f32`, `f16`, `q8_0`, `q4_0` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            _ => return None,
        })
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
        }
    }

    fn kind(self) -> Option<QuantKind> {
        match self {
            Self::F32 => None,
            Self::F16 => Some(QuantKind::F16),
            Self::Q8_0 => Some(QuantKind::Q8_0),
            Self::Q4_0 => Some(QuantKind::Q4_0),
        }
    }
}

/// A tensor ready to write: llama.cpp name, dims (fastest first), ggml type number and bytes.
struct Encoded {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    bytes: Vec<u8>,
}

/// `values` (row-major `[rows, cols]`, or 1-D) in `ty`, with the block fallback.
fn encode_tensor(name: String, shape: &[usize], values: &[f32], ty: GgufType) -> Encoded {
    let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
    let matrix = shape.len() == 2;
    let kind = match ty.kind() {
        Some(k) if matrix => {
            let (block, _) = k.block();
            if shape[1].is_multiple_of(block) {
                Some(k)
            } else {
                Some(QuantKind::F16)
            }
        }
        _ => None,
    };
    match kind.and_then(|k| encode(k, values).map(|b| (k, b))) {
        Some((k, bytes)) => Encoded {
            name,
            dims,
            ty: k.ggml().expect("exportable kinds have a ggml number"),
            bytes,
        },
        None => Encoded {
            name,
            dims,
            ty: 0,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    }
}

/// llama.cpp's interleaved order for the rows of a `llama` q/k projection: GGUF row `h*d + 2j + c` is HF row
/// `h*d + c*d/2 + j` (`d` the head dim); `cols` values per row.
fn permute_rows(values: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols.max(1);
    let d = rows / n_head.max(1);
    let mut out = vec![0f32; values.len()];
    for h in 0..n_head {
        for j in 0..d / 2 {
            for c in 0..2 {
                let dst = h * d + 2 * j + c;
                let src = h * d + c * (d / 2) + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The llama.cpp architecture name of a model.
fn arch(model: &Decoder) -> Result<&'static str, ModelError> {
    Ok(match model.config.model_type.as_str() {
        // llama.cpp loads Mistral (v0.1-style) checkpoints under the llama architecture.
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        other => {
            return Err(ModelError::Invalid(format!(
                "GGUF export: model_type `{other}` has no llama.cpp architecture here (llama, mistral, qwen2, qwen3)"
            )));
        }
    })
}

/// The `{arch}.*` and `general.*` metadata of `model`.
fn model_metadata(model: &Decoder, name: &str) -> Result<Vec<(String, GgufValue)>, ModelError> {
    let a = arch(model)?;
    let c = &model.config;
    let heads = c.num_attention_heads;
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads.max(1));
    let k = |s: &str| format!("{a}.{s}");
    let theta = c
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(c.rope_theta)
        .unwrap_or(10_000.0);
    let mut m = vec![
        ("general.architecture".into(), GgufValue::Str(a.into())),
        ("general.name".into(), GgufValue::Str(name.into())),
        (
            k("context_length"),
            GgufValue::U32(c.max_position_embeddings.unwrap_or(2048) as u32),
        ),
        (k("embedding_length"), GgufValue::U32(c.hidden_size as u32)),
        (k("block_count"), GgufValue::U32(c.num_hidden_layers as u32)),
        (
            k("feed_forward_length"),
            GgufValue::U32(c.intermediate_size as u32),
        ),
        (k("attention.head_count"), GgufValue::U32(heads as u32)),
        (
            k("attention.head_count_kv"),
            GgufValue::U32(c.num_key_value_heads.unwrap_or(heads) as u32),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), GgufValue::F32(theta as f32)),
        (k("vocab_size"), GgufValue::U32(c.vocab_size as u32)),
    ];
    if head_dim * heads != c.hidden_size || a == "qwen3" {
        m.push((k("attention.key_length"), GgufValue::U32(head_dim as u32)));
        m.push((k("attention.value_length"), GgufValue::U32(head_dim as u32)));
    }
    if a == "llama" {
        m.push((k("rope.dimension_count"), GgufValue::U32(head_dim as u32)));
    }
    Ok(m)
}

/// Where the tokenizer metadata comes from: the source GGUF's own `tokenizer.*` keys (copied verbatim), or a
/// Hugging Face directory's `tokenizer.json` / `tokenizer_config.json` (byte-level BPE).
pub enum TokenizerSource<'a> {
    Gguf(&'a Path),
    HfDir(&'a Path),
}

fn str_array(v: Vec<String>) -> GgufValue {
    GgufValue::Array(v.into_iter().map(GgufValue::Str).collect())
}

/// `tokenizer.ggml.*` from a Hugging Face byte-level BPE `tokenizer.json`, padded with `[PAD{i}]` tokens to the
/// model's vocabulary size as llama.cpp's converter does.
fn hf_tokenizer_metadata(
    dir: &Path,
    model: &Decoder,
) -> Result<Vec<(String, GgufValue)>, ModelError> {
    let tj_path = dir.join("tokenizer.json");
    let read = |p: &Path| -> Result<Value, ModelError> {
        let text = std::fs::read_to_string(p).map_err(|e| ModelError::io(p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| ModelError::Invalid(format!("{}: not valid JSON: {e}", p.display())))
    };
    let tj = read(&tj_path)?;
    let bad = |what: &str| {
        ModelError::Invalid(format!(
            "{}: {what}; GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style) only",
            tj_path.display()
        ))
    };
    let m = &tj["model"];
    if m["type"].as_str() != Some("BPE") || m["byte_fallback"].as_bool() == Some(true) {
        return Err(bad("the tokenizer is not a byte-level BPE"));
    }
    let vocab = m["vocab"]
        .as_object()
        .ok_or_else(|| bad("`model.vocab` is missing"))?;
    let n = model.config.vocab_size.max(vocab.len());
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        if let Some(i) = id.as_u64().map(|i| i as usize).filter(|&i| i < n) {
            tokens[i] = Some(t.clone());
        }
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(i), Some(t)) = (a["id"].as_u64().map(|i| i as usize), a["content"].as_str())
            && i < n
        {
            tokens[i] = Some(t.to_string());
            types[i] = if a["special"].as_bool() == Some(true) {
                3
            } else {
                4
            };
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = m["merges"]
        .as_array()
        .ok_or_else(|| bad("`model.merges` is missing"))?
        .iter()
        .map(|x| match x {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("`model.merges` has an entry that is neither \"a b\" nor [a, b]"))?;
    // `trim_offsets` only moves offsets, not the split: ignore it when matching the known pre-tokenizers.
    fn splitting(v: &Value) -> Value {
        match v {
            Value::Object(o) => Value::Object(
                o.iter()
                    .filter(|(k, _)| k.as_str() != "trim_offsets")
                    .map(|(k, v)| (k.clone(), splitting(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(splitting).collect()),
            other => other.clone(),
        }
    }
    let theirs = splitting(&tj["pre_tokenizer"]);
    let pre = ["smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| {
            super::tokenizer::pre_tokenizer(name).map(|p| splitting(&p)) == Some(theirs.clone())
        })
        .ok_or_else(|| {
            bad("its pre_tokenizer is none of GPT-2's byte-level split, Llama 3's or Qwen2's regex")
        })?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), GgufValue::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), str_array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), str_array(merges)),
    ];
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read(&tc_path)?
    } else {
        Value::Null
    };
    let c = &model.config;
    for (key, id) in [
        ("bos_token_id", c.bos_token_id.as_ref()),
        ("eos_token_id", c.eos_token_id.as_ref()),
        ("padding_token_id", c.pad_token_id.as_ref()),
    ] {
        if let Some(id) = id.and_then(|t| t.to_vec().first().copied()) {
            out.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
        }
    }
    if let Some(b) = tc["add_bos_token"].as_bool() {
        out.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(b)));
    }
    let template = match tc["chat_template"].as_str() {
        Some(t) => Some(t.to_string()),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), GgufValue::Str(t)));
    }
    Ok(out)
}

fn tokenizer_metadata(
    src: &TokenizerSource<'_>,
    model: &Decoder,
) -> Result<Vec<(String, GgufValue)>, ModelError> {
    match src {
        TokenizerSource::Gguf(p) => {
            let g = GgufFile::open(p)?;
            Ok(g.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        TokenizerSource::HfDir(d) => hf_tokenizer_metadata(d, model),
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes `model` (LoRA merged) as a GGUF model file in `ty`, with the tokenizer and chat template of `tokenizer`.
pub fn export_gguf(
    model: &Decoder,
    tokenizer: &TokenizerSource<'_>,
    out: &Path,
    ty: GgufType,
) -> Result<GgufExport, ModelError> {
    let a = arch(model)?;
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let mut meta = model_metadata(model, &name)?;
    meta.push(("general.file_type".into(), GgufValue::U32(ty.file_type())));
    meta.push(("general.quantization_version".into(), GgufValue::U32(2)));
    meta.extend(tokenizer_metadata(tokenizer, model)?);
    let heads = model.config.num_attention_heads;
    let kv_heads = model.config.num_key_value_heads.unwrap_or(heads);
    let mut tensors = Vec::new();
    for t in hf_tensors(model) {
        let gname = match t.name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            n => gguf_name(n).ok_or_else(|| {
                ModelError::Invalid(format!("GGUF export: no llama.cpp name for tensor `{n}`"))
            })?,
        };
        let shape = t.shape.clone();
        let mut values = (t.values)();
        if a == "llama" {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") {
                values = permute_rows(&values, heads, cols);
            } else if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") {
                values = permute_rows(&values, kv_heads, cols);
            }
        }
        tensors.push(encode_tensor(gname, &shape, &values, ty));
    }
    write_gguf(out, &meta, &tensors)
}

/// Writes a trained LoRA adapter as llama.cpp's LoRA GGUF: `blk.N.<proj>.weight.lora_a` `[r, in]` and `.lora_b`
/// `[out, r]` (f32), `adapter.lora.alpha`; q/k `lora_b` rows permuted for `llama` like the base weights.
pub fn export_lora_gguf(model: &Decoder, out: &Path) -> Result<GgufExport, ModelError> {
    let a = arch(model)?;
    let AdapterSpec::Lora(LoraConfig { alpha, r, .. }) = &model.adapter else {
        return Err(ModelError::Invalid(
            "--lora-gguf needs a LoRA adapter (--adapter DIR with a PEFT LoRA)".into(),
        ));
    };
    // llama.cpp's LoRA GGUF holds A and B per projection only: neither DoRA's magnitudes nor fully trained
    // embeddings / head have a place in it, and dropping them would give another model.
    if model
        .named_linears()
        .iter()
        .any(|(_, l)| l.lora_magnitude.is_some())
    {
        return Err(ModelError::Invalid(
            "--lora-gguf cannot hold a DoRA adapter (llama.cpp's LoRA GGUF has no magnitude vector); export the \
             merged model instead (`ytrainer export` without --lora-gguf, or `ytrainer merge`)"
                .into(),
        ));
    }
    if model.trained_beside_adapters() != (false, false) {
        return Err(ModelError::Invalid(
            "--lora-gguf cannot hold an adapter with `modules_to_save` (llama.cpp's LoRA GGUF holds LoRA matrices \
             only, not a trained embedding or head); export the merged model instead (`ytrainer export` without \
             --lora-gguf, or `ytrainer merge`)"
                .into(),
        ));
    }
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "adapter".into());
    let meta = vec![
        ("general.architecture".to_string(), GgufValue::Str(a.into())),
        ("general.type".into(), GgufValue::Str("adapter".into())),
        ("general.name".into(), GgufValue::Str(name)),
        ("adapter.type".into(), GgufValue::Str("lora".into())),
        ("adapter.lora.alpha".into(), GgufValue::F32(*alpha as f32)),
    ];
    let heads = model.config.num_attention_heads;
    let kv_heads = model.config.num_key_value_heads.unwrap_or(heads);
    let mut tensors = Vec::new();
    for (hf, lin) in model.named_linears() {
        let (Some(la), Some(lb)) = (&lin.lora_a, &lin.lora_b) else {
            continue;
        };
        let gname = gguf_name(&format!("{hf}.weight")).ok_or_else(|| {
            ModelError::Invalid(format!("GGUF export: no llama.cpp name for `{hf}`"))
        })?;
        // Burn keeps A as [in, r] and B as [r, out]; PEFT / llama.cpp want A [r, in] and B [out, r].
        let host = |t: burn::tensor::Tensor<2>| -> (Vec<f32>, [usize; 2]) {
            let dims = t.dims();
            let v = t
                .detach()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            (v, dims)
        };
        let (av, [d_in, rr]) = host(la.val());
        let (bv, [_, d_out]) = host(lb.val());
        let at = transpose(&av, d_in, rr);
        let mut bt = transpose(&bv, rr, d_out);
        if a == "llama" {
            if gname.ends_with("attn_q.weight") {
                bt = permute_rows(&bt, heads, rr);
            } else if gname.ends_with("attn_k.weight") {
                bt = permute_rows(&bt, kv_heads, rr);
            }
        }
        debug_assert_eq!(rr, *r);
        tensors.push(encode_tensor(
            format!("{gname}.lora_a"),
            &[rr, d_in],
            &at,
            GgufType::F32,
        ));
        tensors.push(encode_tensor(
            format!("{gname}.lora_b"),
            &[d_out, rr],
            &bt,
            GgufType::F32,
        ));
    }
    write_gguf(out, &meta, &tensors)
}

fn put_str(o: &mut Vec<u8>, s: &str) {
    o.extend((s.len() as u64).to_le_bytes());
    o.extend(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::Str(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(o: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => o.push(*x),
        GgufValue::I8(x) => o.extend(x.to_le_bytes()),
        GgufValue::U16(x) => o.extend(x.to_le_bytes()),
        GgufValue::I16(x) => o.extend(x.to_le_bytes()),
        GgufValue::U32(x) => o.extend(x.to_le_bytes()),
        GgufValue::I32(x) => o.extend(x.to_le_bytes()),
        GgufValue::F32(x) => o.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => o.push(*x as u8),
        GgufValue::Str(s) => put_str(o, s),
        GgufValue::Array(items) => {
            let ty = items.first().map(value_type).unwrap_or(4);
            o.extend(ty.to_le_bytes());
            o.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(o, it);
            }
        }
        GgufValue::U64(x) => o.extend(x.to_le_bytes()),
        GgufValue::I64(x) => o.extend(x.to_le_bytes()),
        GgufValue::F64(x) => o.extend(x.to_le_bytes()),
    }
}

/// The file: header, metadata, tensor directory, then the aligned data. Written to a temporary sibling and
/// renamed, so a crash never leaves a half file under the final name.
fn write_gguf(
    out: &Path,
    meta: &[(String, GgufValue)],
    tensors: &[Encoded],
) -> Result<GgufExport, ModelError> {
    let mut head = b"GGUF".to_vec();
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut head, k);
        head.extend(value_type(v).to_le_bytes());
        put_value(&mut head, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend(d.to_le_bytes());
        }
        head.extend(t.ty.to_le_bytes());
        head.extend(offset.to_le_bytes());
        offset += (t.bytes.len() as u64).div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
    }
    head.resize(head.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    let tmp = out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let mut w = BufWriter::new(file);
    let io = |e| ModelError::io(&tmp, e);
    w.write_all(&head).map_err(io)?;
    let pad = [0u8; ALIGNMENT];
    for t in tensors {
        w.write_all(&t.bytes).map_err(io)?;
        let rem = t.bytes.len() % ALIGNMENT;
        if rem != 0 {
            w.write_all(&pad[..ALIGNMENT - rem]).map_err(io)?;
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| ModelError::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(GgufExport {
        path: out.to_path_buf(),
        tensors: tensors.len(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The export's permutation is the inverse of the import's (`unpermute_order`).
    #[test]
    fn permute_inverts_import() {
        let (heads, d, cols) = (3, 8, 2);
        let rows = heads * d;
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_rows(&v, heads, cols);
        let back = super::super::convert::unpermute_rows(&p, heads, cols);
        assert_eq!(back, v);
        assert_ne!(p, v);
    }
}
