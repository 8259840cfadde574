//! Causal self-attention on the CPU as one fused operation with its own backward pass.
//!
//! Written with tensor ops, attention is ~25 autodiff nodes per layer (RoPE's narrow/neg/cat/mul, the KV-head
//! expansion, transposes, the mask add, a softmax split into exp/sum/div, two batched matmuls), each a full pass over
//! memory and most of them single-threaded on Flex. Here one kernel applies RoPE, runs the scores, masked softmax and
//! weighted sum per (batch, KV head) on rayon's pool, with the query heads that share a KV head stacked into one
//! operand (no K/V expansion, and one taller product per group instead of one per head), skips the key blocks
//! that causality hides, and keeps only the log-sum-exp per query for the backward pass (the probabilities
//! are recomputed there, as FlashAttention does), so memory stays O(T·D) instead of O(T²) per head.
//!
//! The math is transformers' eager attention: `softmax(rope(q) rope(k)^T / sqrt(d) + mask) v`, with the mask of
//! [`crate::positions::attention_bias`] (same segment, causal, optional sliding window). The tensor implementation in
//! `ytrainer-models`' `decoder.rs` remains the reference and the path for other backends; `tests/attention.rs`-style parity is in this
//! file's tests (values and gradients against it).

use std::sync::Arc;

use burn::prelude::*;
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu::{self, zeros};
use crate::fused::host;

/// Query rows per block of the causal tiling: a block of queries only needs the keys up to its last row.
const BLOCK: usize = 64;

/// The per-batch facts the kernel needs besides q, k and v, in host memory: RoPE tables and the visible key range
/// of every query.
#[derive(Debug)]
pub struct AttnMask {
    batch: usize,
    seq: usize,
    half: usize,
    /// `cos(position * inv_freq[i])`, `[B * T, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// First visible key of each query, `[B * T]`; the last is the query itself.
    start: Vec<usize>,
}

impl AttnMask {
    /// Builds the tables, or `None` when a segment id appears in more than one run within a row (the kernel
    /// assumes packed, contiguous segments; the tensor path handles any layout).
    pub fn new(
        positions: &[i64],
        segments: &[i64],
        batch: usize,
        seq: usize,
        inv_freq: &[f32],
        window: Option<usize>,
    ) -> Option<Self> {
        let half = inv_freq.len();
        // One table row per distinct position (rows of a batch share positions), then gathered per token.
        let max_pos = positions.iter().copied().max().unwrap_or(0).max(0) as usize;
        let mut table_cos = Vec::with_capacity((max_pos + 1) * half);
        let mut table_sin = Vec::with_capacity((max_pos + 1) * half);
        for p in 0..=max_pos {
            for &f in inv_freq {
                // Same rounding as the tensor path: the angle in f32, then cos/sin in f32.
                let a = p as f32 * f;
                table_cos.push(a.cos());
                table_sin.push(a.sin());
            }
        }
        let mut cos = Vec::with_capacity(batch * seq * half);
        let mut sin = Vec::with_capacity(batch * seq * half);
        for &p in positions {
            let r = p.max(0) as usize * half;
            cos.extend_from_slice(&table_cos[r..r + half]);
            sin.extend_from_slice(&table_sin[r..r + half]);
        }
        let mut start = vec![0usize; batch * seq];
        for b in 0..batch {
            let row = &segments[b * seq..(b + 1) * seq];
            let mut seen = std::collections::HashSet::new();
            let mut run_start = 0;
            for i in 0..seq {
                if i > 0 && row[i] != row[i - 1] {
                    run_start = i;
                }
                if i == run_start && !seen.insert(row[i]) {
                    return None;
                }
                let w = window.map_or(0, |w| (i + 1).saturating_sub(w.max(1)));
                start[b * seq + i] = run_start.max(w);
            }
        }
        Some(Self {
            batch,
            seq,
            half,
            cos,
            sin,
            start,
        })
    }
}

/// Attention over `q` `[B, T, H, D]`, `k`, `v` `[B, T, KV, D]` (before RoPE), giving `[B, T, H * D]`; `None` when
/// the tensors are not on the CPU backend (the caller then uses the tensor implementation).
pub fn attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Arc<AttnMask>,
) -> Option<Tensor<3>> {
    let [b, t, h, d] = q.dims();
    let queries = Queries::all(b, t);
    let out = attention_of(q, k, v, mask, queries, [b, t, h, d])?;
    Some(out.reshape([b, t, h * d]))
}

/// Attention for the queries at `rows` only (flat `b * T + t` indices, ascending): `q` `[S, H, D]` holds those
/// queries, `k`, `v` `[B, T, KV, D]` every key and value; gives `[S, H * D]`. For a model's last layer, whose
/// output is read only where there are targets: every other position needs its key and value, not its query.
pub fn attention_at(
    q: &Tensor<3>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Arc<AttnMask>,
    rows: &[usize],
) -> Option<Tensor<2>> {
    let [s, h, d] = q.dims();
    let [b, t, _, _] = k.dims();
    if s != rows.len()
        || rows.windows(2).any(|w| w[0] >= w[1])
        || rows.last().is_some_and(|&r| r >= b * t)
    {
        return None;
    }
    let queries = Queries::at(rows, b, t);
    let out = attention_of(
        &q.clone().reshape([1, s, h, d]),
        k,
        v,
        mask,
        queries,
        [b, t, h, d],
    )?;
    Some(out.reshape([s, h * d]))
}

/// The shared body of [`attention`] and [`attention_at`]: `q` holds the queries of `queries` in order (any shape
/// whose last two dimensions are `[H, D]`); the result is `[rows, H * D]` flattened to 3 dimensions.
fn attention_of(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Arc<AttnMask>,
    queries: Queries,
    [b, t, h, d]: [usize; 4],
) -> Option<Tensor<3>> {
    let kv = k.dims()[2];
    if k.dims() != [b, t, kv, d] || v.dims() != [b, t, kv, d] {
        return None;
    }
    if b != mask.batch || t != mask.seq || d != 2 * mask.half || kv == 0 || h % kv != 0 {
        return None;
    }
    if !crate::fused::all_f32(&[q, k, v]) {
        return None;
    }
    let dims = Dims { b, t, h, kv, d };
    let queries = Arc::new(queries);
    if let (Ok(qa), Ok(ka), Ok(va)) = (
        q.clone().try_into_primitive::<Autodiff<Flex>>(),
        k.clone().try_into_primitive::<Autodiff<Flex>>(),
        v.clone().try_into_primitive::<Autodiff<Flex>>(),
    ) {
        return crate::fused::record(AttnBackward, [qa.node(), ka.node(), va.node()], |keep| {
            let (saved, out) = forward(
                dims,
                qa.primitive(),
                ka.primitive(),
                va.primitive(),
                mask,
                &queries,
            )?;
            Some((out, keep.then(|| Arc::new(saved))))
        });
    }
    let (qf, kf, vf) = (
        q.clone().try_into_primitive::<Flex>().ok()?,
        k.clone().try_into_primitive::<Flex>().ok()?,
        v.clone().try_into_primitive::<Flex>().ok()?,
    );
    let (_, out) = forward(dims, &qf, &kf, &vf, mask, &queries)?;
    Some(Tensor::from_primitive::<Flex>(out))
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
}

/// The query positions the kernel computes, grouped by batch row: `times[off[b]..off[b + 1]]` are row `b`'s, in
/// ascending order. Every position of every row for a plain layer; the targets' rows for [`attention_at`].
#[derive(Debug)]
struct Queries {
    times: Vec<usize>,
    off: Vec<usize>,
}

impl Queries {
    fn all(b: usize, t: usize) -> Self {
        Self {
            times: (0..b).flat_map(|_| 0..t).collect(),
            off: (0..=b).map(|i| i * t).collect(),
        }
    }

    fn at(rows: &[usize], b: usize, t: usize) -> Self {
        let mut off = vec![0usize; b + 1];
        for &r in rows {
            off[r / t + 1] += 1;
        }
        for i in 0..b {
            off[i + 1] += off[i];
        }
        Self {
            times: rows.iter().map(|&r| r % t).collect(),
            off,
        }
    }

    /// Row `b`'s query times.
    fn row(&self, b: usize) -> &[usize] {
        &self.times[self.off[b]..self.off[b + 1]]
    }

    /// Offset, in `D`-vectors, of the `(b, KV head)` block of a `[.., G, D]` group-major buffer.
    fn block(&self, b: usize, kvh: usize, kv: usize, group: usize) -> usize {
        (self.off[b] * kv + kvh * (self.off[b + 1] - self.off[b])) * group
    }
}

/// What the backward pass needs: rotated and scaled queries per `(b, KV head)` block `[S_b, G, D]` (see
/// [`to_group_major`]), rotated keys and values `[B, KV, T, D]`, the log-sum-exp of every query row (same blocks,
/// `[S_b, G]`) and the query set.
#[derive(Debug)]
struct Saved {
    qs: Vec<f32>,
    kr: Vec<f32>,
    vt: Vec<f32>,
    lse: Vec<f32>,
    scale: f32,
    mask: Arc<AttnMask>,
    queries: Arc<Queries>,
    q_shape: Vec<usize>,
}

/// `x * cos + rotate_half(x) * sin` of one head vector.
#[inline]
fn rope_row(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], scale: f32) {
    let half = cos.len();
    for i in 0..half {
        let (x1, x2) = (src[i], src[i + half]);
        dst[i] = (x1 * cos[i] - x2 * sin[i]) * scale;
        dst[i + half] = (x2 * cos[i] + x1 * sin[i]) * scale;
    }
}

/// The transpose of [`rope_row`]: the gradient with respect to the unrotated vector.
#[inline]
fn rope_row_backward(g: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], scale: f32) {
    let half = cos.len();
    for i in 0..half {
        let (g1, g2) = (g[i], g[i + half]);
        dst[i] = (g1 * cos[i] + g2 * sin[i]) * scale;
        dst[i + half] = (g2 * cos[i] - g1 * sin[i]) * scale;
    }
}

/// `[Q, KV * G, D]` (the queries of `queries`, in order) -> one `[S_b, G, D]` block per `(b, KV head)`, rotating
/// (and scaling) each vector on the way when `rotate`.
///
/// Query head `h` reads KV head `h / G` (transformers' `repeat_kv`), so in this layout the `G` query heads of one KV
/// head are adjacent rows at every position: one block of positions is one `(rows x G) x D` operand for all of
/// them, and the products against that KV head's keys and values run once per group instead of once per head
/// (taller, faster GEMMs; the gradients of K and V come out already summed over the group). Keys and values use
/// it with `G = 1` and every position.
#[allow(clippy::too_many_arguments)]
fn to_group_major(
    x: &[f32],
    kv: usize,
    group: usize,
    d: Dims,
    mask: &AttnMask,
    queries: &Queries,
    rotate: bool,
    scale: f32,
) -> Vec<f32> {
    let dd = d.d;
    let heads = kv * group;
    let mut out = zeros(queries.times.len() * heads * dd);
    // One task per (b, KV head) block; blocks are contiguous and in (b, kvh) order, so split the buffer by size.
    let mut blocks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(d.b * kv);
    let mut rest: &mut [f32] = &mut out;
    for b in 0..d.b {
        let len = queries.row(b).len() * group * dd;
        for kvh in 0..kv {
            let (head, tail) = rest.split_at_mut(len);
            blocks.push((b, kvh, head));
            rest = tail;
        }
    }
    blocks.into_par_iter().for_each(|(b, kvh, dst)| {
        for (j, &i) in queries.row(b).iter().enumerate() {
            let src = &x[((queries.off[b] + j) * heads + kvh * group) * dd..][..group * dd];
            let rows = &mut dst[j * group * dd..(j + 1) * group * dd];
            if rotate {
                let r = (b * d.t + i) * mask.half;
                let (cos, sin) = (&mask.cos[r..r + mask.half], &mask.sin[r..r + mask.half]);
                for (s, o) in src.chunks_exact(dd).zip(rows.chunks_exact_mut(dd)) {
                    rope_row(s, o, cos, sin, scale);
                }
            } else {
                rows.copy_from_slice(src);
            }
        }
    });
    out
}

/// `dst (m x n, row stride dst_rs) = [dst +] a (m x k) · b (k x n)`, strided operands, single-threaded (the
/// kernels parallelise over heads).
///
/// # Safety
/// Every index `i * rs + j * cs` of each operand within its `m/k/n` extent must lie inside the buffer the pointer
/// comes from; callers pass pointers into slices whose lengths cover those extents.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the caller guarantees the extents; gemm computes dst = 1·dst + 1·a·b (or a·b when not reading dst).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Scores of one block of queries at times `qt` (each `group` rows, see [`to_group_major`]; `q` starts at the
/// block's first row) against keys `[c0, c1)`, masked and turned into probabilities (the `lse` of each row is
/// written when `write_lse`, else read; `lse` starts at the block's first row too).
#[allow(clippy::too_many_arguments)]
fn block_probs(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    (dd, group): (usize, usize),
    qt: &[usize],
    (c0, c1): (usize, usize),
    starts: &[usize],
    lse: &mut [f32],
    write_lse: bool,
) {
    let nc = c1 - c0;
    let rows = qt.len() * group;
    // SAFETY: q holds rows x dd values from its start, k rows c0..c1 (each dd wide) lie inside the per-group
    // slice, and s holds rows x nc.
    unsafe {
        mm(
            rows,
            nc,
            dd,
            s.as_mut_ptr(),
            nc,
            false,
            q.as_ptr(),
            dd,
            1,
            k[c0 * dd..].as_ptr(),
            1,
            dd,
        );
    }
    for ri in 0..rows {
        let i = qt[ri / group];
        let row = &mut s[ri * nc..(ri + 1) * nc];
        let lo = starts[i].max(c0) - c0;
        let hi = i + 1 - c0;
        row[..lo].fill(f32::NEG_INFINITY);
        row[hi..].fill(f32::NEG_INFINITY);
        let l = &mut lse[ri];
        if write_lse {
            *l = cpu::softmax_inplace(row);
        } else {
            cpu::exp_shifted_inplace(row, *l);
        }
    }
}

/// The key range `[c0, c1)` a block of queries at times `qt` (ascending) can see.
fn key_range(qt: &[usize], starts: &[usize]) -> (usize, usize) {
    let c0 = qt.iter().map(|&i| starts[i]).min().unwrap_or(0);
    let c1 = qt.last().map_or(0, |&i| i + 1);
    (c0, c1)
}

fn forward(
    d: Dims,
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: &Arc<AttnMask>,
    queries: &Arc<Queries>,
) -> Option<(Saved, FlexTensor)> {
    let _span = crate::prof::span(crate::prof::Op::AttentionForward);
    let q_shape = q.layout().shape().as_slice().to_vec();
    let (q, k, v) = (host(q)?, host(k)?, host(v)?);
    let (t, dd, h, kv) = (d.t, d.d, d.h, d.kv);
    let nq = queries.times.len();
    if q.len() != nq * h * dd {
        return None;
    }
    let scale = 1.0 / (dd as f32).sqrt();
    let group = h / kv;
    let gd = group * dd;
    let every = Queries::all(d.b, t);
    let qs = to_group_major(&q, kv, group, d, mask, queries, true, scale);
    let kr = to_group_major(&k, kv, 1, d, mask, &every, true, 1.0);
    let vt = to_group_major(&v, kv, 1, d, mask, &every, false, 1.0);
    // Per (b, KV head): the output rows of its query group `[S_b, G, D]` (already the `[.., H, D]` order within a
    // query) and their log-sum-exp.
    let per_group: Vec<(Vec<f32>, Vec<f32>)> = (0..d.b * kv)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / kv, bk % kv);
            let times = queries.row(b);
            let base = queries.block(b, kvh, kv, group);
            let qg = &qs[base * dd..(base + times.len() * group) * dd];
            let kh = &kr[bk * t * dd..(bk + 1) * t * dd];
            let vh = &vt[bk * t * dd..(bk + 1) * t * dd];
            let starts = &mask.start[b * t..(b + 1) * t];
            let mut o = zeros(times.len() * gd);
            let mut lse = vec![0.0f32; times.len() * group];
            let mut s = vec![0.0f32; BLOCK * group * t];
            for j0 in (0..times.len()).step_by(BLOCK) {
                let j1 = (j0 + BLOCK).min(times.len());
                let qt = &times[j0..j1];
                let (c0, c1) = key_range(qt, starts);
                let r0 = j0 * group;
                block_probs(
                    &mut s,
                    &qg[r0 * dd..],
                    kh,
                    (dd, group),
                    qt,
                    (c0, c1),
                    starts,
                    &mut lse[r0..],
                    true,
                );
                // SAFETY: s holds (j1-j0)*group x (c1-c0) probabilities, v rows c0..c1 and o rows from r0 on are
                // in bounds.
                unsafe {
                    mm(
                        (j1 - j0) * group,
                        dd,
                        c1 - c0,
                        o[r0 * dd..].as_mut_ptr(),
                        dd,
                        false,
                        s.as_ptr(),
                        c1 - c0,
                        1,
                        vh[c0 * dd..].as_ptr(),
                        dd,
                        1,
                    );
                }
            }
            (o, lse)
        })
        .collect();
    let mut out = zeros(nq * h * dd);
    out.par_chunks_mut(h * dd)
        .enumerate()
        .for_each(|(qi, dst)| {
            let b = queries.off.partition_point(|&o| o <= qi) - 1;
            let j = qi - queries.off[b];
            for kvh in 0..kv {
                let src = &per_group[b * kv + kvh].0[j * gd..][..gd];
                dst[kvh * gd..(kvh + 1) * gd].copy_from_slice(src);
            }
        });
    let mut lse = vec![0.0f32; nq * h];
    for (bk, (_, l)) in per_group.iter().enumerate() {
        let base = queries.block(bk / kv, bk % kv, kv, group);
        lse[base..base + l.len()].copy_from_slice(l);
    }
    let out = FlexTensor::from_data(TensorData::new(out, [1, nq, h * dd]));
    Some((
        Saved {
            qs,
            kr,
            vt,
            lse,
            scale,
            mask: mask.clone(),
            queries: queries.clone(),
            q_shape,
        },
        out,
    ))
}

/// Gradients with respect to q (in the queries' order), k and v (`[B, T, KV, D]`), all before RoPE, from the
/// output's gradient.
fn backward(d: Dims, s: &Saved, grad: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let _span = crate::prof::span(crate::prof::Op::AttentionBackward);
    let (t, dd, h, kv) = (d.t, d.d, d.h, d.kv);
    let group = h / kv;
    let gd = group * dd;
    let mask = &s.mask;
    let queries = &s.queries;
    // Per (b, KV head): dQs of its query group `[S_b, G, D]`, and dK, dV `[T, D]` (summed over the group by the
    // products themselves, whose inner dimension runs over the group's rows).
    let per_group: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..d.b * kv)
        .into_par_iter()
        .map(|bk| {
            let (b, kvh) = (bk / kv, bk % kv);
            let times = queries.row(b);
            let base = queries.block(b, kvh, kv, group);
            let qg = &s.qs[base * dd..(base + times.len() * group) * dd];
            let kh = &s.kr[bk * t * dd..(bk + 1) * t * dd];
            let vh = &s.vt[bk * t * dd..(bk + 1) * t * dd];
            let starts = &mask.start[b * t..(b + 1) * t];
            let mut lse = s.lse[base..base + times.len() * group].to_vec();
            // dO of this group, gathered to [S_b, G, D].
            let mut go = zeros(times.len() * gd);
            for j in 0..times.len() {
                go[j * gd..(j + 1) * gd]
                    .copy_from_slice(&grad[((queries.off[b] + j) * kv + kvh) * gd..][..gd]);
            }
            let mut dq = zeros(times.len() * gd);
            let mut dk = vec![0.0f32; t * dd];
            let mut dv = vec![0.0f32; t * dd];
            let mut p = vec![0.0f32; BLOCK * group * t];
            let mut dp = vec![0.0f32; BLOCK * group * t];
            for j0 in (0..times.len()).step_by(BLOCK) {
                let j1 = (j0 + BLOCK).min(times.len());
                let qt = &times[j0..j1];
                let rows = qt.len() * group;
                let q0 = j0 * group;
                let (c0, c1) = key_range(qt, starts);
                let nc = c1 - c0;
                block_probs(
                    &mut p,
                    &qg[q0 * dd..],
                    kh,
                    (dd, group),
                    qt,
                    (c0, c1),
                    starts,
                    &mut lse[q0..],
                    false,
                );
                // SAFETY (all four products): the blocks are rows x nc, operand rows q0..q0+rows of the [S_b*G, D]
                // slices and c0..c1 of the [T, D] ones.
                unsafe {
                    // dP = dO · V^T
                    mm(
                        rows,
                        nc,
                        dd,
                        dp.as_mut_ptr(),
                        nc,
                        false,
                        go[q0 * dd..].as_ptr(),
                        dd,
                        1,
                        vh[c0 * dd..].as_ptr(),
                        1,
                        dd,
                    );
                }
                for ri in 0..rows {
                    let pr = &p[ri * nc..(ri + 1) * nc];
                    let dpr = &mut dp[ri * nc..(ri + 1) * nc];
                    let di = cpu::dot(pr, dpr);
                    for (g, &pv) in dpr.iter_mut().zip(pr) {
                        *g = pv * (*g - di);
                    }
                }
                unsafe {
                    // dQs = dS · K
                    mm(
                        rows,
                        dd,
                        nc,
                        dq[q0 * dd..].as_mut_ptr(),
                        dd,
                        false,
                        dp.as_ptr(),
                        nc,
                        1,
                        kh[c0 * dd..].as_ptr(),
                        dd,
                        1,
                    );
                    // dK += dS^T · Qs
                    mm(
                        nc,
                        dd,
                        rows,
                        dk[c0 * dd..].as_mut_ptr(),
                        dd,
                        true,
                        dp.as_ptr(),
                        1,
                        nc,
                        qg[q0 * dd..].as_ptr(),
                        dd,
                        1,
                    );
                    // dV += P^T · dO
                    mm(
                        nc,
                        dd,
                        rows,
                        dv[c0 * dd..].as_mut_ptr(),
                        dd,
                        true,
                        p.as_ptr(),
                        1,
                        nc,
                        go[q0 * dd..].as_ptr(),
                        dd,
                        1,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();

    let half = mask.half;
    let nq = queries.times.len();
    let mut gq = zeros(nq * h * dd);
    gq.par_chunks_mut(h * dd).enumerate().for_each(|(qi, dst)| {
        let b = queries.off.partition_point(|&o| o <= qi) - 1;
        let j = qi - queries.off[b];
        let r = (b * t + queries.times[qi]) * half;
        let (cos, sin) = (&mask.cos[r..r + half], &mask.sin[r..r + half]);
        for kvh in 0..kv {
            let src = &per_group[b * kv + kvh].0[j * gd..(j + 1) * gd];
            let out = &mut dst[kvh * gd..(kvh + 1) * gd];
            for (g, o) in src.chunks_exact(dd).zip(out.chunks_exact_mut(dd)) {
                rope_row_backward(g, o, cos, sin, s.scale);
            }
        }
    });
    let mut gk = zeros(d.b * t * kv * dd);
    let mut gv = zeros(d.b * t * kv * dd);
    gk.par_chunks_mut(kv * dd)
        .zip(gv.par_chunks_mut(kv * dd))
        .enumerate()
        .for_each(|(bt, (dk, dv))| {
            let (b, i) = (bt / t, bt % t);
            let r = bt * half;
            let (cos, sin) = (&mask.cos[r..r + half], &mask.sin[r..r + half]);
            for kvh in 0..kv {
                let (_, hk, hv) = &per_group[b * kv + kvh];
                let row = i * dd..(i + 1) * dd;
                dv[kvh * dd..(kvh + 1) * dd].copy_from_slice(&hv[row.clone()]);
                rope_row_backward(&hk[row], &mut dk[kvh * dd..(kvh + 1) * dd], cos, sin, 1.0);
            }
        });
    (gq, gk, gv)
}

#[derive(Debug)]
struct AttnBackward;

impl Backward<Flex, 3> for AttnBackward {
    type State = Arc<Saved>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nq, nk, nv] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let b = s.mask.batch;
        let t = s.mask.seq;
        let dd = 2 * s.mask.half;
        let kv = s.kr.len() / (b * t * dd);
        let h = *s.q_shape.get(s.q_shape.len().wrapping_sub(2)).unwrap_or(&0);
        let d = Dims { b, t, h, kv, d: dd };
        let g = host(&grad).expect("attention gradient is f32");
        let (gq, gk, gv) = backward(d, &s, &g);
        if let Some(n) = nq {
            grads.register::<Flex>(
                n.id,
                FlexTensor::from_data(TensorData::new(gq, s.q_shape.clone())),
            );
        }
        let kv_tensor = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, [b, t, kv, dd]));
        if let Some(n) = nk {
            grads.register::<Flex>(n.id, kv_tensor(gk));
        }
        if let Some(n) = nv {
            grads.register::<Flex>(n.id, kv_tensor(gv));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::positions::{Rope, attention_bias};
    use burn::tensor::activation::softmax;

    fn rand(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
        crate::fused::tests::uniform(shape, seed, 1.0, device)
    }

    /// The tensor formulation `decoder.rs` uses on other backends (and used everywhere before the kernel).
    fn reference(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        pos: &Tensor<2, Int>,
        seg: &Tensor<2, Int>,
        inv: &[f32],
        window: Option<usize>,
    ) -> Tensor<3> {
        let [b, t, h, d] = q.dims();
        let kv = k.dims()[2];
        let rope = Rope::new(pos, inv);
        let rep = |x: Tensor<4>| {
            let [b, kv, t, d] = x.dims();
            x.unsqueeze_dim::<5>(2)
                .expand([b, kv, h / kv, t, d])
                .reshape([b, h, t, d])
        };
        let q = rope.apply(q.swap_dims(1, 2));
        let k = rep(rope.apply(k.swap_dims(1, 2)));
        let v = rep(v.swap_dims(1, 2));
        let _ = kv;
        let s = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt())
            + attention_bias(seg, window);
        softmax(s, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, h * d])
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        a.sub(b).abs().max().into_scalar::<f32>()
    }

    /// Values and gradients equal the tensor formulation: grouped KV heads, two packed segments plus padding, a
    /// sequence longer than one block, with and without a sliding window.
    #[test]
    fn matches_tensor_attention_values_and_gradients() {
        let plain = Device::flex();
        let ad = plain.clone().autodiff();
        // Groups of 2 (Qwen2-like), 3 (SmolLM2-like) and 1 (no GQA).
        for (h, kv) in [(4, 2), (3, 1), (2, 2)] {
            let (b, t, d) = (2, 70, 8);
            let inv: Vec<f32> = (0..d / 2)
                .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
                .collect();
            // Row 0: one sequence; row 1: segments 1 (40 tokens), 2 (20 tokens), padding 0 (10 tokens).
            let mut seg = vec![1i64; t];
            seg.extend((0..t).map(|i| {
                if i < 40 {
                    1
                } else if i < 60 {
                    2
                } else {
                    0
                }
            }));
            let mut pos: Vec<i64> = (0..t as i64).collect();
            pos.extend((0..t).map(|i| {
                if i < 40 {
                    i as i64
                } else if i < 60 {
                    i as i64 - 40
                } else {
                    0
                }
            }));
            let pos_t: Tensor<2, Int> =
                Tensor::from_data(TensorData::new(pos.clone(), [b, t]), &ad);
            let seg_t: Tensor<2, Int> =
                Tensor::from_data(TensorData::new(seg.clone(), [b, t]), &ad);
            let upstream =
                Tensor::<3>::from_inner(rand([1, b, t, h * d], 9, &plain).reshape([b, t, h * d]));
            for window in [None, Some(17)] {
                let mask = Arc::new(
                    AttnMask::new(&pos, &seg, b, t, &inv, window).expect("contiguous segments"),
                );
                let (q0, k0, v0) = (
                    rand([b, t, h, d], 1, &plain),
                    rand([b, t, kv, d], 2, &plain),
                    rand([b, t, kv, d], 3, &plain),
                );
                let leaf = |x: &Tensor<4>| Tensor::<4>::from_inner(x.clone()).require_grad();
                let (qa, ka, va) = (leaf(&q0), leaf(&k0), leaf(&v0));
                let fused =
                    attention(&qa, &ka, &va, &mask).expect("CPU tensors take the fused path");
                let ga = fused.clone().mul(upstream.clone()).sum().backward();
                let (qb, kb, vb) = (leaf(&q0), leaf(&k0), leaf(&v0));
                let want = reference(
                    qb.clone(),
                    kb.clone(),
                    vb.clone(),
                    &pos_t,
                    &seg_t,
                    &inv,
                    window,
                );
                let gb = want.clone().mul(upstream.clone()).sum().backward();
                let out_diff = fused.sub(want).abs().max().into_scalar::<f32>();
                assert!(
                    out_diff < 1e-5,
                    "heads {h}/{kv} window {window:?}: outputs differ by {out_diff}"
                );
                for (name, a, r) in [("q", &qa, &qb), ("k", &ka, &kb), ("v", &va, &vb)] {
                    let diff = max_diff(
                        Tensor::from_inner(a.grad(&ga).unwrap()),
                        Tensor::from_inner(r.grad(&gb).unwrap()),
                    );
                    assert!(
                        diff < 1e-5,
                        "heads {h}/{kv} window {window:?}: d{name} differs by {diff}"
                    );
                }
                // Inference on the plain device takes the same kernel.
                let plain_out =
                    attention(&q0, &k0, &v0, &mask).expect("plain CPU tensors take the fused path");
                let diff = plain_out
                    .sub(fused_inner(&qa, &ka, &va, &mask))
                    .abs()
                    .max()
                    .into_scalar::<f32>();
                assert_eq!(diff, 0.0);
            }
        }
    }

    /// Attention for a subset of query rows equals the full attention's rows there, in value and in the gradients
    /// of q (at those rows), k and v; the other rows' queries get no gradient at all.
    #[test]
    fn selected_queries_match_the_full_attention_at_those_rows() {
        let plain = Device::flex();
        let (b, t, h, kv, d) = (2, 70, 4, 2, 8);
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let seg: Vec<i64> = (0..b * t).map(|i| if i % t < 30 { 1 } else { 2 }).collect();
        let pos: Vec<i64> = (0..b * t)
            .map(|i| (if i % t < 30 { i % t } else { i % t - 30 }) as i64)
            .collect();
        let mask = Arc::new(AttnMask::new(&pos, &seg, b, t, &inv, Some(20)).expect("contiguous"));
        // Rows in both batch rows, both segments, first and last positions, several per 64-query block.
        let rows: Vec<usize> = vec![0, 5, 29, 30, 31, 64, 65, 69, t, t + 3, t + 40, 2 * t - 1];
        let (q0, k0, v0) = (
            rand([b, t, h, d], 1, &plain),
            rand([b, t, kv, d], 2, &plain),
            rand([b, t, kv, d], 3, &plain),
        );
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &plain.clone().autodiff(),
        );
        let upstream = Tensor::<2>::from_inner(
            rand([1, 1, rows.len(), h * d], 9, &plain).reshape([rows.len(), h * d]),
        );
        let leaf = |x: &Tensor<4>| Tensor::<4>::from_inner(x.clone()).require_grad();
        // The full attention, then its rows.
        let (qa, ka, va) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let full = attention(&qa, &ka, &va, &mask).expect("fused path");
        let want = full.reshape([b * t, h * d]).select(0, idx.clone());
        let ga = want.clone().mul(upstream.clone()).sum().backward();
        // Only those queries.
        let (qb, kb, vb) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let q_sel = qb.clone().reshape([b * t, h, d]).select(0, idx);
        let got = attention_at(&q_sel, &kb, &vb, &mask, &rows).expect("fused path");
        let gb = got.clone().mul(upstream).sum().backward();
        let diff = got.sub(want).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "outputs differ by {diff}");
        for (name, a, r) in [("q", &qa, &qb), ("k", &ka, &kb), ("v", &va, &vb)] {
            let diff = max_diff(
                Tensor::from_inner(a.grad(&ga).unwrap()),
                Tensor::from_inner(r.grad(&gb).unwrap()),
            );
            assert!(diff < 1e-5, "d{name} differs by {diff}");
        }
        // Unsorted or out-of-range rows are refused (the caller falls back to the full layer).
        let q2 = Tensor::<3>::from_inner(rand([1, 2, h, d], 4, &plain).reshape([2, h, d]));
        let (k2, v2) = (
            Tensor::from_inner(k0.clone()),
            Tensor::from_inner(v0.clone()),
        );
        assert!(attention_at(&q2, &k2, &v2, &mask, &[5, 3]).is_none());
        assert!(attention_at(&q2, &k2, &v2, &mask, &[3, 2 * t]).is_none());
    }

    fn fused_inner(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: &Arc<AttnMask>) -> Tensor<3> {
        attention(q, k, v, mask).unwrap().detach().inner()
    }

    #[test]
    fn non_contiguous_segments_fall_back() {
        // Segment 1 appears twice in the row: the kernel declines, the tensor path handles it.
        assert!(AttnMask::new(&[0, 1, 0, 1], &[1, 1, 2, 1], 1, 4, &[1.0], None).is_none());
        assert!(AttnMask::new(&[0, 1, 0, 1], &[1, 1, 2, 2], 1, 4, &[1.0], None).is_some());
    }
}
