//! The GGUF container (v2 / v3): header, metadata and tensor directory, parsed once; a tensor's bytes read on
//! demand and handed to [`super::dequant`]. Opening checks every tensor's byte range against the file size, so a
//! truncated download fails here, naming the first tensor that is cut off, before anything is converted.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::dequant::{GgmlType, dequantize};
use crate::ModelError;

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
    pub(crate) path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
    data_start: u64,
    /// The whole file memory-mapped, made on the first [`GgufFile::mapped`] and shared by every tensor.
    map: std::sync::OnceLock<std::sync::Arc<memmap2::Mmap>>,
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
        // As llama.cpp: the alignment is a power of two (default 32).
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(c.err(format!(
                        "metadata `general.alignment` = {}: must be a power of two (GGUF's default is 32); the \
                         file is corrupt",
                        v.as_u64().map_or_else(|| format!("{v:?}"), |a| a.to_string())
                    )));
                }
            },
        };
        let data_start = c.pos.div_ceil(alignment).saturating_mul(alignment);
        let gguf = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            map: std::sync::OnceLock::new(),
        };
        gguf.check_directory(alignment)?;
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

    /// The tensor directory as llama.cpp validates it: unique names, offsets on the alignment, whole blocks per
    /// row, sizes that fit in 64 bits, and no two tensors' bytes overlapping. Each error names the tensor.
    fn check_directory(&self, alignment: u64) -> Result<(), ModelError> {
        let mut seen = std::collections::HashSet::new();
        let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
        for t in &self.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(self.err(format!(
                    "tensor `{}` appears twice in the directory; the file is corrupt",
                    t.name
                )));
            }
            if !t.offset.is_multiple_of(alignment) {
                return Err(self.err(format!(
                    "tensor `{}`: offset {} is not a multiple of the alignment {alignment}; the file is corrupt",
                    t.name, t.offset
                )));
            }
            let Some((bs, bb)) = t.ty.block() else {
                continue; // unsupported types are reported when (and only if) the tensor is needed
            };
            let what = || {
                format!(
                    "tensor `{}` ({}, shape {:?})",
                    t.name,
                    t.ty.name(),
                    t.shape()
                )
            };
            if !t.dims[0].is_multiple_of(bs as u64) {
                return Err(self.err(format!(
                    "{}: {} values per row is not a multiple of {}'s block of {bs} values; the file is corrupt",
                    what(),
                    t.dims[0],
                    t.ty.name()
                )));
            }
            let nbytes = t
                .dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .and_then(|n| (n / bs as u64).checked_mul(bb as u64))
                .and_then(|n| t.offset.checked_add(n).map(|end| (n, end)));
            let Some((nbytes, end)) = nbytes else {
                return Err(self.err(format!(
                    "{}: the size does not fit in 64 bits; the file is corrupt",
                    what()
                )));
            };
            if nbytes > 0 {
                ranges.push((t.offset, end, &t.name));
            }
        }
        ranges.sort();
        for w in ranges.windows(2) {
            let ((s0, e0, a), (s1, e1, b)) = (w[0], w[1]);
            if s1 < e0 {
                return Err(self.err(format!(
                    "tensors `{a}` (bytes {s0}..{e0} of the data section) and `{b}` (bytes {s1}..{e1}) overlap; \
                     the file is corrupt"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn err(&self, message: String) -> ModelError {
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

    /// A tensor's encoded bytes, read in place from the memory-mapped file (the range was checked against the
    /// file size by [`GgufFile::open`]). The mapping is read-only and private; the file must not be rewritten
    /// while a model built from it is alive, as with llama.cpp's own mmap loading.
    pub fn mapped(&self, t: &GgufTensor) -> Result<ytrainer_kernels::quant::Bytes, ModelError> {
        let nbytes = self.nbytes(t).ok_or_else(|| {
            self.err(format!(
                "tensor `{}` has type {}, which ytrainer cannot read",
                t.name,
                t.ty.name()
            ))
        })?;
        let map = match self.map.get() {
            Some(m) => m.clone(),
            None => {
                let f = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
                // SAFETY: the mapping is read-only; like every mmap-based model loader, we rely on the file not
                // being truncated or rewritten while it is in use.
                let m =
                    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(&self.path, e))?;
                self.map.get_or_init(|| std::sync::Arc::new(m)).clone()
            }
        };
        let start = self.data_start + t.offset;
        ytrainer_kernels::quant::Bytes::new(map, start as usize, nbytes as usize).ok_or_else(|| {
            self.err(format!(
                "tensor `{}` ({nbytes} bytes at offset {start}) lies outside the file",
                t.name
            ))
        })
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
