//! Importing llama.cpp GGUF files (v2 / v3): metadata, tensors (dequantised to f32 one at a time), the
//! equivalent Hugging Face `config.json`, a `tokenizer.json` rebuilt from the tokenizer metadata, and the chat
//! template.
//!
//! - [`GgufFile::open`] parses the header and tensor directory and checks that every tensor's bytes are in the
//!   file (a truncated download fails here, naming the first tensor that is cut off).
//! - [`load_gguf`] builds a [`Decoder`] straight from the file; [`convert_gguf`] writes an HF-layout directory.
//! - Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K. Anything else is an
//!   error naming the tensor and the type.
//! - llama.cpp's converter permutes the rows of `attn_q` / `attn_k` for the `llama` architecture (interleaved
//!   RoPE); we undo it so the weights match the HF rotate-half convention. Qwen2 / Qwen3 are stored unpermuted.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde_json::{Value, json};

use crate::decoder::{ArchSpec, Decoder};
use crate::load::{WeightSource, build};
use crate::lora::AdapterSpec;
use crate::st::{PendingTensor, write_f32};
use crate::{HfConfig, ModelError};

const MAGIC: &[u8; 4] = b"GGUF";
/// Refuse absurd counts before allocating for them (a corrupt header must not exhaust memory).
const MAX_COUNT: u64 = 1 << 28;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer type as u64 (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any float (or integer) type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types (the numbering of ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const BF16: Self = Self(30);

    /// The ggml name (`Q4_1`, `IQ2_XS`, ...), or `type N` for numbers ggml does not define.
    pub fn name(self) -> String {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        NAMES
            .get(self.0 as usize)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("type {}", self.0))
    }

    /// `(values per block, bytes per block)` for the types we dequantise.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            _ => return None,
        })
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions as GGUF lists them, fastest-varying first (the HF / row-major shape is the reverse).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensor {
    /// Row-major (PyTorch) shape.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: metadata and tensor directory parsed, tensor data read on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
    data_start: u64,
}

struct Cursor<'a> {
    r: BufReader<File>,
    path: &'a Path,
    pos: u64,
    len: u64,
}

impl Cursor<'_> {
    fn err(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, ModelError> {
        if self.pos + n > self.len {
            return Err(self.err(format!(
                "truncated file: it ends inside {what} (at byte {}, {n} more bytes needed, file has {}); \
                 the download is incomplete, fetch the file again",
                self.pos, self.len
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| ModelError::io(self.path, e))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let b = self.bytes(N as u64, what)?;
        Ok(b.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.u64(what)?;
        if n > self.len {
            return Err(self.err(format!("{what}: string length {n} exceeds the file size")));
        }
        let b = self.bytes(n, what)?;
        // Token strings of some vocabularies are not valid UTF-8 on their own; keep them lossily.
        Ok(String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::Str(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(self.err(format!("{what}: arrays nested too deeply")));
                }
                let inner = self.u32(what)?;
                let n = self.u64(what)?;
                if n > MAX_COUNT || n > self.len {
                    return Err(self.err(format!("{what}: array length {n} is implausible")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(inner, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(self.err(format!("{what}: unknown metadata value type {other}")));
            }
        })
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor directory; checks every tensor's byte range against the file size.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut c = Cursor {
            r: BufReader::with_capacity(1 << 20, file),
            path,
            pos: 0,
            len,
        };
        let magic = c.array::<4>("the magic number")?;
        if &magic != MAGIC {
            return Err(c.err(format!(
                "not a GGUF file: the first bytes are {magic:?}, expected \"GGUF\"; pass a llama.cpp .gguf file \
                 or a Hugging Face model directory"
            )));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            )));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        if n_tensors > MAX_COUNT || n_kv > MAX_COUNT {
            return Err(c.err(format!(
                "implausible header: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("the type of metadata `{key}`"))?;
            let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("the name of tensor #{i}"))?;
            let what = format!("the directory entry of tensor `{name}`");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(format!(
                    "tensor `{name}`: {n_dims} dimensions (1 to 4 allowed)"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&what))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = GgmlType(c.u32(&what)?);
            let offset = c.u64(&what)?;
            tensors.push(GgufTensor {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let gguf = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
        };
        for t in &gguf.tensors {
            let Some(nbytes) = gguf.nbytes(t) else {
                continue; // unsupported types are reported when (and only if) the tensor is needed
            };
            let end = data_start.saturating_add(t.offset).saturating_add(nbytes);
            if end > len {
                return Err(gguf.err(format!(
                    "truncated file: tensor `{}` ({}, {nbytes} bytes at offset {}) ends at byte {end} but the \
                     file has {len} bytes; the download is incomplete, fetch the file again",
                    t.name,
                    t.ty.name(),
                    t.offset
                )));
            }
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            message,
        }
    }

    /// Byte size of a tensor of a supported type.
    fn nbytes(&self, t: &GgufTensor) -> Option<u64> {
        let (bs, bb) = t.ty.block()?;
        Some(t.num_elements().div_ceil(bs as u64) * bb as u64)
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, ModelError> {
        self.get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| self.err("metadata `general.architecture` is missing".into()))
    }

    /// Reads one tensor and dequantises it to f32 (row-major, GGUF order).
    pub fn read_f32(&self, t: &GgufTensor) -> Result<Vec<f32>, ModelError> {
        let (bs, _) = t.ty.block().ok_or_else(|| {
            self.err(format!(
                "tensor `{}` has type {}, which ytrainer cannot dequantise; supported: F32, F16, BF16, Q8_0, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (re-quantise the model to one of these with llama.cpp's \
                 llama-quantize, or convert from the original checkpoint)",
                t.name,
                t.ty.name()
            ))
        })?;
        let n = t.num_elements() as usize;
        if !n.is_multiple_of(bs) {
            return Err(self.err(format!(
                "tensor `{}` ({}): {n} values are not a whole number of {bs}-value blocks",
                t.name,
                t.ty.name()
            )));
        }
        let nbytes = self.nbytes(t).expect("supported type") as usize;
        let mut bytes = vec![0u8; nbytes];
        let mut f = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(self.data_start + t.offset))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(dequantize(t.ty, &bytes, n))
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantises `n` values of type `ty` (the caller checked `bytes` has the right length and `ty` is supported).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(f16)),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16(&b[0..2]);
                out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16(&b[0..2]);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let with_min = ty == GgmlType::Q5_1;
            let bb = if with_min { 24 } else { 22 };
            for b in bytes.chunks_exact(bb) {
                let d = f16(&b[0..2]);
                let (m, rest) = if with_min {
                    (f16(&b[2..4]), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                let offset = if with_min { 0 } else { 16 };
                let mut hi = [0f32; 16];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((qs[j] as u32 & 0xF) | xh0) as i32 - offset;
                    let x1 = ((qs[j] as u32 >> 4) | xh1) as i32 - offset;
                    out.push(d * x0 as f32 + m);
                    hi[j] = d * x1 as f32 + m;
                }
                out.extend(hi);
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = ty == GgmlType::Q5_K;
            let bb = if five { 176 } else { 144 };
            for b in bytes.chunks_exact(bb) {
                let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                for (k, chunk) in qs.chunks_exact(32).enumerate() {
                    let is = 2 * k;
                    let (sc1, m1) = scale_min_k4(is, scales);
                    let (sc2, m2) = scale_min_k4(is + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    for (l, &q) in chunk.iter().enumerate() {
                        let h = if five && qh[l] & u1 != 0 { 16 } else { 0 };
                        out.push(d1 * ((q & 0xF) + h) as f32 - m1);
                    }
                    for (l, &q) in chunk.iter().enumerate() {
                        let h = if five && qh[l] & u2 != 0 { 16 } else { 0 };
                        out.push(d2 * ((q >> 4) + h) as f32 - m2);
                    }
                    u1 = u1.wrapping_shl(2);
                    u2 = u2.wrapping_shl(2);
                }
            }
        }
        GgmlType::Q6_K => {
            for b in bytes.chunks_exact(210) {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16(&b[208..210]);
                let mut y = [0f32; 256];
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let y = &mut y[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
                out.extend(y);
            }
        }
        _ => unreachable!("dequantize called with an unsupported type"),
    }
    out.truncate(n);
    out
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K / Q5_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

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
}

impl<'a> GgufSource<'a> {
    pub(crate) fn new(gguf: &'a GgufFile, config: &HfConfig) -> Result<Self, ModelError> {
        let permuted = (gguf.architecture()? == "llama")
            .then(|| (config.num_attention_heads, config.num_kv_heads()));
        Ok(Self { gguf, permuted })
    }
}

impl WeightSource for GgufSource<'_> {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.gguf.tensor(&g).is_some())
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
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
    let gguf = GgufFile::open(path)?;
    let config = hf_config(&gguf)?;
    let spec = ArchSpec::from_config(&config)?;
    let mut source = GgufSource::new(&gguf, &config)?;
    let mut model = build(spec, config.clone(), &mut source, device)?;
    model.base_model_name_or_path = path.display().to_string();
    Ok((model.with_adapter(adapter)?, config))
}

/// `(HF name, HF shape)` of every tensor the architecture reads, in the order `build` reads them.
fn expected_tensors(spec: &ArchSpec) -> Vec<(String, Vec<usize>)> {
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

/// Byte-level BPE regexes of llama.cpp's `tokenizer.ggml.pre` values (llama-vocab.cpp), as HF pre-tokenizers.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    let seq = |items: Vec<Value>| json!({"type": "Sequence", "pretokenizers": items});
    const LLAMA3: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    const QWEN2: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    Some(match pre {
        // GPT-2's own regex, which ByteLevel(use_regex) applies.
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" | "poro-chat" | "viking" | "bloom" => {
            byte_level(true)
        }
        // StarCoder family (incl. SmolLM). llama.cpp splits off every digit before GPT-2's regex; transformers'
        // GGUF loader does not, and we follow transformers so the rebuilt tokenizer.json equals the one it makes
        // (they differ only on whitespace right before a digit, e.g. "\n\n00": "Ċ","Ċ" vs "ĊĊ").
        "starcoder" | "smollm" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "command-r" => {
            byte_level(true)
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "smaug-bpe" | "dbrx" => {
            seq(vec![split(LLAMA3), byte_level(false)])
        }
        "qwen2" | "deepseek-r1-qwen" | "qwen35" => seq(vec![split(QWEN2), byte_level(false)]),
        _ => return None,
    })
}

/// What the GGUF tokenizer metadata gives: `tokenizer.json`, the special-token strings and the chat template.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The text of an HF `tokenizer.json`.
    pub tokenizer_json: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// The `tokenizer_config.json` transformers would write next to it (with the chat template).
    pub fn tokenizer_config_json(&self) -> String {
        let mut o = serde_json::Map::new();
        o.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
            ("chat_template", &self.chat_template),
        ] {
            if let Some(v) = v {
                o.insert(k.into(), json!(v));
            }
        }
        o.insert("clean_up_tokenization_spaces".into(), json!(false));
        serde_json::to_string_pretty(&o).expect("serializes")
    }
}

/// The BPE merges of a SentencePiece vocabulary, as transformers' `SentencePieceExtractor` derives them from
/// the pieces and their scores: every split of a piece into two pieces of the vocabulary is a merge, ranked by
/// the piece's score (higher first), then the longer left half first; remaining ties keep id order.
/// SentencePiece BPE scores a piece by the order it was learnt in, so this replays its merge order.
fn spm_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let chars = |id: usize| tokens[id].chars().count();
    // (score, left length, right length, left id, right id)
    let mut merges: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (id, &piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        let score = scores.get(id).copied().unwrap_or(0.0);
        merges.extend(
            local
                .into_iter()
                .map(|(l, r)| (score, chars(l), chars(r), l, r)),
        );
    }
    // Stable, so equal keys keep the order the loop produced.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// Rebuilds the HF tokenizer from `tokenizer.ggml.*`: byte-level BPE (`tokenizer.ggml.model = gpt2`) with its
/// merges, or SentencePiece BPE (`llama`: Llama 1/2, Mistral 7B, TinyLlama, Phi-3) with merges derived from the
/// piece scores, byte fallback and the `▁` space marker, as transformers' GGUF loader builds it.
pub fn gguf_tokenizer(gguf: &GgufFile) -> Result<GgufTokenizer, ModelError> {
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| gguf.err("no tokenizer in the metadata (`tokenizer.ggml.model` is missing); put a tokenizer.json from the original model next to the converted checkpoint".into()))?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        _ => {
            return Err(gguf.err(format!(
                "metadata `tokenizer.ggml.model`: `{model}` tokenizers are not rebuilt (only byte-level BPE, \
                 `gpt2`, and SentencePiece BPE, `llama`); copy tokenizer.json from the original Hugging Face \
                 model into the converted directory"
            )));
        }
    };
    let strings = |k: &str| -> Result<Vec<&str>, ModelError> {
        gguf.get(k)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| gguf.err(format!("metadata `{k}` is missing or not an array")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| gguf.err(format!("metadata `{k}`: entries must be strings")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = if spm {
        let scores: Vec<f32> = gguf
            .get("tokenizer.ggml.scores")
            .and_then(GgufValue::as_array)
            .ok_or_else(|| {
                gguf.err(
                    "metadata `tokenizer.ggml.scores` is missing or not an array (a SentencePiece vocabulary \
                     needs its piece scores to rebuild the merges)"
                        .into(),
                )
            })?
            .iter()
            .map(|v| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    gguf.err("metadata `tokenizer.ggml.scores`: entries must be numbers".into())
                })
            })
            .collect::<Result<_, _>>()?;
        if scores.len() != tokens.len() {
            return Err(gguf.err(format!(
                "metadata `tokenizer.ggml.scores` has {} entries but `tokenizer.ggml.tokens` has {}",
                scores.len(),
                tokens.len()
            )));
        }
        spm_merges(&tokens, &scores)
    } else {
        strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(gguf.err(format!(
                    "metadata `tokenizer.ggml.merges`: entry `{m}` is not `A B`"
                ))),
            })
            .collect::<Result<_, _>>()?
    };
    let types: Vec<i64> = match gguf
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let pre_name = gguf
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let pre = if spm {
        Value::Null
    } else {
        pre_tokenizer(pre_name).ok_or_else(|| {
            gguf.err(format!(
                "metadata `tokenizer.ggml.pre`: pre-tokenizer `{pre_name}` is not known to ytrainer; supported: \
                 default, gpt2, smollm, starcoder, llama-bpe, llama3, qwen2, ... (copy tokenizer.json from the \
                 original model instead)"
            ))
        })?
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, &t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
        // 2 = unknown, 3 = control, 4 = user-defined (llama.cpp's token types).
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 || (spm && ty == 2) {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != 4,
            }));
        }
    }
    let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    let token = |k: &str| {
        gguf.get(&format!("tokenizer.ggml.{k}"))
            .and_then(GgufValue::as_u64)
            .and_then(|id| tokens.get(id as usize))
            .map(|s| s.to_string())
    };
    let bos = token("bos_token_id");
    // llama.cpp adds BOS by default for SentencePiece vocabularies, not for byte-level BPE.
    let add_bos = gguf
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(spm);
    let (single, pair, specials) = match (&bos, add_bos) {
        (Some(b), true) => {
            let id = gguf
                .get("tokenizer.ggml.bos_token_id")
                .and_then(GgufValue::as_u64);
            (
                json!([{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]),
                json!([{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]),
                json!({ b.clone(): {"id": b, "ids": [id], "tokens": [b]} }),
            )
        }
        _ => (
            json!([{"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]),
            json!({}),
        ),
    };
    let (normalizer, decoder, unk) = if spm {
        // SentencePiece marks spaces with `▁` and (by default) prefixes the text with one; bytes missing from
        // the vocabulary become `<0xNN>` pieces.
        let prefix = gguf
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(GgufValue::as_bool)
            .unwrap_or(true);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
        } else {
            replace
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            normalizer,
            json!({"type": "Sequence", "decoders": decoders}),
            json!(token("unknown_token_id")),
        )
    } else {
        (
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            Value::Null,
        )
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": if spm { Value::Null } else { json!("") },
            "end_of_word_suffix": if spm { Value::Null } else { json!("") }, "fuse_unk": spm, "byte_fallback": spm,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(GgufTokenizer {
        tokenizer_json: serde_json::to_string(&tj).expect("serializes"),
        bos_token: bos,
        eos_token: token("eos_token_id"),
        pad_token: token("padding_token_id"),
        unk_token: token("unknown_token_id"),
        chat_template: gguf
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_string),
    })
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

    let source = RefCell::new(GgufSource::new(&gguf, &config)?);
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

    match gguf_tokenizer(&gguf) {
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
    Ok(report)
}

/// True when `path` is a file that starts with the GGUF magic (or, if unreadable, is named `*.gguf`).
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic == MAGIC)
        .unwrap_or(false)
        || path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
