//! Streaming safetensors access: read the header, then one tensor at a time from its byte range, and write a
//! file tensor by tensor, so that neither loading nor saving ever holds a second copy of the whole model.
//! The `safetensors` crate supplies the header types and dtypes; its readers want the whole file in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

use crate::ModelError;

/// An open safetensors file whose header has been parsed.
#[derive(Debug)]
pub struct SafetensorsReader {
    path: PathBuf,
    file: File,
    data_start: u64,
    tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsReader {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("file is shorter than the 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > file_len {
            return Err(bad(format!(
                "header length {n} does not fit the file ({file_len} bytes)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| ModelError::io(path, e))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_len = file_len - 8 - n;
        let mut tensors = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| bad(format!("header entry `{name}`: {e}")))?;
            let (start, end) = info.data_offsets;
            if start > end || end as u64 > data_len {
                return Err(bad(format!(
                    "tensor `{name}`: data offsets {start}..{end} outside the data"
                )));
            }
            tensors.insert(name, info);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }

    /// Reads one tensor as f32 (F32, F16 and BF16 are converted), checking its shape.
    pub fn read_f32(
        &mut self,
        name: &str,
        expected_shape: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                file: self.path.clone(),
            })?;
        if info.shape != expected_shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                file: self.path.clone(),
                expected: expected_shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (dtype, (start, end)) = (info.dtype, info.data_offsets);
        let count: usize = info.shape.iter().product();
        let width = match dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    file: self.path.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        if end - start != count * width {
            return Err(ModelError::Safetensors {
                path: self.path.clone(),
                message: format!(
                    "tensor `{name}`: {} bytes for {count} {dtype:?} values",
                    end - start
                ),
            });
        }
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }
}

/// One tensor to write: its name, shape and a function producing its f32 values when the writer reaches it.
pub struct PendingTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Box<dyn FnOnce() -> Vec<f32> + 'a>,
}

impl<'a> PendingTensor<'a> {
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: impl FnOnce() -> Vec<f32> + 'a,
    ) -> Self {
        Self {
            name: name.into(),
            shape,
            values: Box::new(values),
        }
    }
}

/// Writes an F32 safetensors file (metadata `{"format": "pt"}`, tensors in name order), producing each tensor
/// only when it is written. Writes to a temporary sibling and renames, so a crash leaves no half file.
pub fn write_f32(path: &Path, mut tensors: Vec<PendingTensor<'_>>) -> Result<(), ModelError> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in &tensors {
        let len = t.shape.iter().product::<usize>() * 4;
        let info = TensorInfo {
            dtype: Dtype::F32,
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
    // The data section starts 8-byte aligned, as the reference implementation pads it.
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
        assert_eq!(
            values.len(),
            expected,
            "tensor `{}` produced the wrong number of values",
            t.name
        );
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write_all(&bytes).map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}
