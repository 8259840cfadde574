//! Writing a full Hugging Face checkpoint in a chosen dtype (f32 / bf16 / f16), sharded with
//! `model.safetensors.index.json` above a size threshold, exactly as `save_pretrained` lays it out. LoRA
//! branches are merged (`W + s·A·B`); tensors are produced and written one at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorInfo;
use serde_json::json;

use super::save::hf_tensors;
use super::st::PendingTensor;
use crate::decoder::Decoder;
use crate::{HfConfig, ModelError};

/// Storage dtype of an exported checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    /// Parses `f32` / `float32`, `bf16` / `bfloat16`, `f16` / `float16`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Self::F32,
            "bf16" | "bfloat16" => Self::Bf16,
            "f16" | "float16" | "fp16" | "half" => Self::F16,
            _ => return None,
        })
    }

    /// The name config.json uses (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    fn st_dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            Self::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

/// transformers' default shard size (`max_shard_size="5GB"`, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Writes `config.json` and the weights of `model` (LoRA merged) in `dtype`: one `model.safetensors`, or
/// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when the weights exceed
/// `max_shard_bytes`. Returns the files written.
pub fn save_hf_checkpoint_as(
    model: &Decoder,
    config: &HfConfig,
    dir: &Path,
    dtype: ExportDtype,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>, ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut config = config.clone();
    config.tie_word_embeddings = Some(model.lm_head.is_none());
    config.torch_dtype = None;
    config.dtype = Some(dtype.torch_name().into());
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_json_string() + "\n")
        .map_err(|e| ModelError::io(&config_path, e))?;
    let mut files = vec![config_path];

    let mut tensors = hf_tensors(model);
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let size = |t: &PendingTensor<'_>| (t.shape.iter().product::<usize>() * dtype.width()) as u64;
    let total: u64 = tensors.iter().map(size).sum();
    // Greedy shards in name order, as save_pretrained does.
    let mut shards: Vec<Vec<PendingTensor<'_>>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let s = size(&t);
        if current > 0 && current + s > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += s;
        shards.last_mut().expect("one shard").push(t);
    }
    if shards.len() == 1 {
        let p = dir.join("model.safetensors");
        write_tensors(&p, shards.pop().expect("one shard"), dtype)?;
        files.push(p);
        return Ok(files);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for t in &shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
        let p = dir.join(&name);
        write_tensors(&p, shard, dtype)?;
        files.push(p);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let p = dir.join("model.safetensors.index.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&index).expect("serializes") + "\n",
    )
    .map_err(|e| ModelError::io(&p, e))?;
    files.push(p);
    Ok(files)
}

/// One safetensors file in `dtype`, written through a temporary sibling and renamed.
fn write_tensors(
    path: &Path,
    tensors: Vec<PendingTensor<'_>>,
    dtype: ExportDtype,
) -> Result<(), ModelError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in &tensors {
        let len = t.shape.iter().product::<usize>() * dtype.width();
        let info = TensorInfo {
            dtype: dtype.st_dtype(),
            shape: t.shape.clone(),
            data_offsets: (offset, offset + len),
        };
        header.insert(
            t.name.clone(),
            serde_json::to_value(info).expect("TensorInfo serializes"),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("header serializes");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let io = |e| ModelError::io(&tmp, e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for t in tensors {
        let expected = t.shape.iter().product::<usize>();
        let values = (t.values)();
        if values.len() != expected {
            return Err(ModelError::Invalid(format!(
                "tensor `{}` produced {} values for shape {:?}",
                t.name,
                values.len(),
                t.shape
            )));
        }
        out.write_all(&dtype.encode(&values)).map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}
