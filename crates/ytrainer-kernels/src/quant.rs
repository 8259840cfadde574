//! Frozen base weights kept in ggml's quantised blocks (or half precision) and multiplied tile by tile.
//!
//! QLoRA's point is that the base model is never materialised in f32: a 4-bit base costs a seventh of the f32
//! one. A [`QuantWeight`] holds the rows of a linear weight (PyTorch layout `[out, in]`, the layout of a GGUF
//! tensor) as their encoded bytes, memory-mapped from the file where possible. The products a frozen weight
//! takes part in (`x·Wᵀ` forward, `dY·W` for the input gradient) dequantise a tile of rows into a small f32 buffer
//! and run the GEMM on it, so each dequantised value is reused across every row of the micro-batch and the f32
//! copy never exceeds one tile. The block decoders here are the only ones in the workspace: the GGUF importer
//! (`ytrainer-models`' `gguf/dequant.rs`) calls them too, so the tiled path and the dequantised-f32 path see
//! bit-identical weights.

use std::fmt;
use std::sync::Arc;

use rayon::prelude::*;

use crate::cpu::matmul;

/// The encodings a frozen weight can stay in. The first ten are ggml's (with ggml's numbering in
/// [`QuantKind::from_ggml`]); `Nf4` is bitsandbytes' 4-bit NormalFloat, QLoRA's own format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// Blocks of 64 values: the block's absolute maximum as f32 (bitsandbytes' `absmax`, not double-quantised),
    /// then 32 bytes of 4-bit indices into [`NF4_CODE`], the first value of each pair in the high nibble (as
    /// bitsandbytes packs them).
    Nf4,
}

/// bitsandbytes' NF4 code book (`create_normal_map` with `offset=0.9677083`, as printed by bitsandbytes'
/// `functional.py`): the 16 quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

impl QuantKind {
    /// The kind of a ggml tensor type number (`ggml.h`), or `None` for F32 and the types not supported here.
    pub fn from_ggml(ty: u32) -> Option<Self> {
        Some(match ty {
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// ggml's type number (`None` for NF4, which GGUF does not define).
    pub fn ggml(self) -> Option<u32> {
        Some(match self {
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Bf16 => 30,
            Self::Nf4 => return None,
        })
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Nf4 => (64, 36),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Nf4 => "NF4",
        }
    }

    /// Bytes needed for `n` values (`n` a whole number of blocks).
    pub fn bytes_for(self, n: usize) -> usize {
        let (bs, bb) = self.block();
        n / bs * bb
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Decodes whole blocks: `bytes` holds `out.len() / values_per_block` blocks of `kind`.
pub fn decode(kind: QuantKind, bytes: &[u8], out: &mut [f32]) {
    let (bs, bb) = kind.block();
    debug_assert_eq!(bytes.len() / bb * bs, out.len());
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs));
    match kind {
        QuantKind::F16 => {
            for (b, o) in blocks {
                o[0] = f16(b);
            }
        }
        QuantKind::Bf16 => {
            for (b, o) in blocks {
                o[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        QuantKind::Q8_0 => {
            for (b, o) in blocks {
                let d = f16(&b[0..2]);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        QuantKind::Q4_0 | QuantKind::Q4_1 => {
            let with_min = kind == QuantKind::Q4_1;
            for (b, o) in blocks {
                let d = f16(&b[0..2]);
                let (m, qs) = if with_min {
                    (f16(&b[2..4]), &b[4..20])
                } else {
                    (0.0, &b[2..18])
                };
                let offset = if with_min { 0 } else { 8 };
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                    *l = d * ((q & 0xF) as i32 - offset) as f32 + m;
                    *h = d * ((q >> 4) as i32 - offset) as f32 + m;
                }
            }
        }
        QuantKind::Q5_0 | QuantKind::Q5_1 => {
            let with_min = kind == QuantKind::Q5_1;
            for (b, o) in blocks {
                let d = f16(&b[0..2]);
                let (m, rest) = if with_min {
                    (f16(&b[2..4]), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                let offset = if with_min { 0 } else { 16 };
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    let x0 = ((qs[j] as u32 & 0xF) | xh0) as i32 - offset;
                    let x1 = ((qs[j] as u32 >> 4) | xh1) as i32 - offset;
                    o[j] = d * x0 as f32 + m;
                    o[j + 16] = d * x1 as f32 + m;
                }
            }
        }
        QuantKind::Q4K | QuantKind::Q5K => {
            let five = kind == QuantKind::Q5K;
            for (b, o) in blocks {
                let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
                let scales = &b[4..16];
                let (qh, qs) = if five {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                for (k, (chunk, o)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
                    let is = 2 * k;
                    let (sc1, m1) = scale_min_k4(is, scales);
                    let (sc2, m2) = scale_min_k4(is + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let (lo, hi) = o.split_at_mut(32);
                    for (l, &q) in chunk.iter().enumerate() {
                        let h1 = if five && qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if five && qh[l] & u2 != 0 { 16 } else { 0 };
                        lo[l] = d1 * ((q & 0xF) + h1) as f32 - m1;
                        hi[l] = d2 * ((q >> 4) + h2) as f32 - m2;
                    }
                    u1 = u1.wrapping_shl(2);
                    u2 = u2.wrapping_shl(2);
                }
            }
        }
        QuantKind::Q6K => {
            for (b, y) in blocks {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16(&b[208..210]);
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
            }
        }
        QuantKind::Nf4 => {
            for (b, o) in blocks {
                let absmax = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for (pair, &q) in o.chunks_exact_mut(2).zip(&b[4..36]) {
                    pair[0] = NF4_CODE[(q >> 4) as usize] * absmax;
                    pair[1] = NF4_CODE[(q & 0xF) as usize] * absmax;
                }
            }
        }
    }
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

/// Encodes `values` (a whole number of blocks) as `kind`; the encoders are the reference ones of llama.cpp
/// (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) and bitsandbytes (`quantize_4bit`, NF4, blocksize 64:
/// each value goes to the nearest code of `value / absmax`). `None` for kinds without an encoder here.
pub fn encode(kind: QuantKind, values: &[f32]) -> Option<Vec<u8>> {
    let (bs, bb) = kind.block();
    if !values.len().is_multiple_of(bs) {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / bs * bb);
    match kind {
        QuantKind::F16 => {
            for &v in values {
                out.extend(half::f16::from_f32(v).to_le_bytes());
            }
        }
        QuantKind::Bf16 => {
            for &v in values {
                out.extend(half::bf16::from_f32(v).to_le_bytes());
            }
        }
        QuantKind::Q8_0 => {
            for x in values.chunks_exact(32) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        QuantKind::Q4_0 => {
            for x in values.chunks_exact(32) {
                // The value of largest magnitude, with its sign: it maps to -8.
                let max = x
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
                for j in 0..16 {
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
        }
        QuantKind::Nf4 => {
            for x in values.chunks_exact(64) {
                let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                out.extend(absmax.to_le_bytes());
                let scaled = |v: f32| if absmax > 0.0 { v / absmax } else { 0.0 };
                for pair in x.chunks_exact(2) {
                    out.push((nf4_index(scaled(pair[0])) << 4) | nf4_index(scaled(pair[1])));
                }
            }
        }
        _ => return None,
    }
    Some(out)
}

/// The index of the NF4 code nearest to `v` (a value exactly between two codes takes the lower one, as
/// bitsandbytes' `x > midpoint` decision tree does).
fn nf4_index(v: f32) -> u8 {
    let mut i = 0;
    while i < 15 && v > (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0 {
        i += 1;
    }
    i as u8
}

/// Encoded bytes shared between weights, owned or memory-mapped.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// `len` bytes of `owner` from `start` (checked by the caller: a GGUF reader validates offsets first).
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Option<Self> {
        let total = (*owner).as_ref().len();
        (start.checked_add(len)? <= total).then_some(Self { owner, start, len })
    }

    pub fn owned(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            owner: Arc::new(v),
            start: 0,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

/// A frozen linear weight `[rows, cols]` (PyTorch layout: `rows` outputs, each a row of `cols` inputs) in encoded
/// blocks. Blocks never straddle rows: `cols` is a multiple of the block size.
#[derive(Clone)]
pub struct QuantWeight {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    bytes: Bytes,
}

impl fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantWeight({} [{}, {}])",
            self.kind.name(),
            self.rows,
            self.cols
        )
    }
}

/// Why bytes cannot be a weight of the stated shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantShapeError {
    /// A row is not a whole number of blocks.
    PartialBlock { cols: usize, block: usize },
    /// The bytes are not the size the shape needs.
    Size { expected: usize, found: usize },
}

impl fmt::Display for QuantShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PartialBlock { cols, block } => write!(
                f,
                "a row of {cols} values is not a whole number of {block}-value blocks"
            ),
            Self::Size { expected, found } => {
                write!(f, "{found} bytes where the shape needs {expected}")
            }
        }
    }
}

impl QuantWeight {
    pub fn new(
        kind: QuantKind,
        rows: usize,
        cols: usize,
        bytes: Bytes,
    ) -> Result<Self, QuantShapeError> {
        let (bs, bb) = kind.block();
        if !cols.is_multiple_of(bs) {
            return Err(QuantShapeError::PartialBlock { cols, block: bs });
        }
        let expected = rows * (cols / bs) * bb;
        if bytes.len != expected {
            return Err(QuantShapeError::Size {
                expected,
                found: bytes.len,
            });
        }
        Ok(Self {
            kind,
            rows,
            cols,
            bytes,
        })
    }

    /// Quantises an f32 matrix `[rows, cols]` (row-major, PyTorch layout) as `kind`.
    pub fn encode(kind: QuantKind, values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if values.len() != rows * cols || !cols.is_multiple_of(kind.block().0) {
            return None;
        }
        let bytes = values
            .par_chunks(cols)
            .map(|row| encode(kind, row))
            .collect::<Option<Vec<_>>>()?
            .concat();
        Self::new(kind, rows, cols, Bytes::owned(bytes)).ok()
    }

    fn row_bytes(&self) -> usize {
        self.kind.bytes_for(self.cols)
    }

    /// The encoded bytes of rows `r0..r1`.
    pub fn raw_rows(&self, r0: usize, r1: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes.as_slice()[r0 * rb..r1 * rb]
    }

    /// Bytes held (shared with the file mapping when memory-mapped).
    pub fn encoded_len(&self) -> usize {
        self.bytes.len
    }

    /// A copy with the rows reordered: row `i` of the result is row `order[i]` of `self` (llama.cpp stores q/k
    /// rows permuted per head; the permutation moves whole rows, so it applies to encoded rows exactly).
    pub fn with_row_order(&self, order: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut out = Vec::with_capacity(self.bytes.len);
        for &r in order {
            out.extend_from_slice(self.raw_rows(r, r + 1));
        }
        debug_assert_eq!(out.len(), rb * self.rows);
        Self {
            bytes: Bytes::owned(out),
            ..self.clone()
        }
    }

    /// Dequantises rows `r0..r1` into `out` (`(r1 - r0) * cols` values), rows in parallel.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (rb, cols, kind) = (self.row_bytes(), self.cols, self.kind);
        out[..(r1 - r0) * cols]
            .par_chunks_mut(cols)
            .zip(self.raw_rows(r0, r1).par_chunks(rb))
            .for_each(|(o, b)| decode(kind, b, o));
    }

    /// The whole weight as f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    /// Rows per tile: the f32 tile stays around 4 MiB (about a core's L2 plus some), at least 16 rows so each
    /// GEMM has a real width.
    fn tile_rows(&self) -> usize {
        let by_size = (1 << 20) / self.cols.max(1);
        by_size.clamp(16, self.rows.max(16)).next_multiple_of(16)
    }

    /// `x·Wᵀ`: `x` is `[n, cols]`, the result `[n, rows]` (the forward pass of a linear layer).
    pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let mut y = vec![0.0f32; n * rows];
        let t = self.tile_rows().min(rows);
        let mut tile = vec![0.0f32; t * cols];
        let mut part = vec![0.0f32; n * t];
        for r0 in (0..rows).step_by(t) {
            let r1 = (r0 + t).min(rows);
            let w = r1 - r0;
            self.dequantize_rows(r0, r1, &mut tile);
            if w == rows {
                matmul(&mut y, x, &tile, (n, w, cols), false, true, false, 1.0);
                break;
            }
            matmul(&mut part, x, &tile, (n, w, cols), false, true, false, 1.0);
            y.par_chunks_mut(rows)
                .zip(part.par_chunks(w))
                .for_each(|(dst, src)| dst[r0..r1].copy_from_slice(src));
        }
        y
    }

    /// `dy·W`: `dy` is `[n, rows]`, the result `[n, cols]` (the input gradient of a linear layer), accumulated
    /// tile by tile.
    pub fn matmul(&self, dy: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        let t = self.tile_rows().min(rows);
        let mut dx = vec![0.0f32; n * cols];
        let mut tile = vec![0.0f32; t * cols];
        let mut part = Vec::new();
        for r0 in (0..rows).step_by(t) {
            let r1 = (r0 + t).min(rows);
            let w = r1 - r0;
            self.dequantize_rows(r0, r1, &mut tile);
            let dy_tile: &[f32] = if w == rows {
                dy
            } else {
                part.resize(n * w, 0.0);
                part.par_chunks_mut(w)
                    .zip(dy.par_chunks(rows))
                    .for_each(|(dst, src)| dst.copy_from_slice(&src[r0..r1]));
                &part
            };
            matmul(
                &mut dx,
                dy_tile,
                &tile,
                (n, cols, w),
                false,
                false,
                r0 > 0,
                1.0,
            );
        }
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn q8_0_and_q4_0_follow_llama_cpp_reference_rounding() {
        let mut x = vec![0.0f32; 32];
        x[0] = -2.0;
        x[1] = 1.0;
        x[2] = 0.5;
        x[3] = 0.25;
        x[4] = 0.9;
        let q8 = encode(QuantKind::Q8_0, &x).unwrap();
        let d = half::f16::from_le_bytes([q8[0], q8[1]]).to_f32();
        assert_eq!(d, half::f16::from_f32(2.0 / 127.0).to_f32());
        assert_eq!(q8[2] as i8, -127);
        assert_eq!(q8[6] as i8, 57); // 0.9 / (2 / 127) = 57.15
        let q4 = encode(QuantKind::Q4_0, &x).unwrap();
        // max is -2.0 (largest magnitude, negative): d = 0.25, value = d * (q - 8).
        assert_eq!(half::f16::from_le_bytes([q4[0], q4[1]]).to_f32(), 0.25);
        let mut back = vec![0.0; 32];
        decode(QuantKind::Q4_0, &q4, &mut back);
        assert_eq!(&back[..5], &[-2.0, 1.0, 0.5, 0.25, 1.0]); // 0.9 -> 3.6 + 8.5 truncates to 12
        assert!(back[5..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn nf4_round_trips_codes_exactly() {
        let absmax = 3.5f32;
        let x: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16] * absmax).collect();
        let enc = encode(QuantKind::Nf4, &x).unwrap();
        assert_eq!(enc.len(), 36);
        let mut back = vec![0.0; 64];
        decode(QuantKind::Nf4, &enc, &mut back);
        assert_eq!(back, x);
    }

    #[test]
    fn tiled_products_equal_the_dequantised_products() {
        for kind in [QuantKind::Q4_0, QuantKind::Q8_0, QuantKind::Nf4] {
            let (rows, cols, n) = (300, 128, 7);
            let w = QuantWeight::encode(kind, &values(rows * cols, 1), rows, cols).unwrap();
            let dense = w.dequantize();
            let x = values(n * cols, 2);
            let dy = values(n * rows, 3);
            let y = w.matmul_t(&x, n);
            let dx = w.matmul(&dy, n);
            for i in 0..n {
                for o in 0..rows {
                    let want: f32 = (0..cols)
                        .map(|k| x[i * cols + k] * dense[o * cols + k])
                        .sum();
                    assert!((y[i * rows + o] - want).abs() < 1e-4, "{kind:?} y");
                }
                for k in 0..cols {
                    let want: f32 = (0..rows)
                        .map(|o| dy[i * rows + o] * dense[o * cols + k])
                        .sum();
                    assert!((dx[i * cols + k] - want).abs() < 1e-4, "{kind:?} dx");
                }
            }
        }
    }

    #[test]
    fn shape_errors_are_reported() {
        assert_eq!(
            QuantWeight::new(QuantKind::Q4_0, 2, 48, Bytes::owned(vec![0; 36])).unwrap_err(),
            QuantShapeError::PartialBlock {
                cols: 48,
                block: 32
            }
        );
        assert_eq!(
            QuantWeight::new(QuantKind::Q4_0, 2, 32, Bytes::owned(vec![0; 35])).unwrap_err(),
            QuantShapeError::Size {
                expected: 36,
                found: 35
            }
        );
    }
}
