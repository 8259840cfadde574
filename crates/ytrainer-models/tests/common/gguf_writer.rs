//! A minimal GGUF writer for synthetic files (metadata of three types, tensors 32-byte aligned).

pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
}

pub struct Tensor_ {
    pub name: String,
    /// Row-major (HF) shape.
    pub shape: Vec<usize>,
    pub ty: u32,
    pub data: Vec<u8>,
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[Tensor_]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        write_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                write_str(&mut out, s);
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        write_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

pub fn f32_tensor(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor_ {
    Tensor_ {
        name: name.into(),
        shape,
        ty: 0,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}
