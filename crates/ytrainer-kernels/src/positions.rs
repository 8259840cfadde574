//! How positions reach attention in the tensor formulation: the rotary tables ([`Rope`]) and the additive mask
//! ([`attention_bias`]: same segment, causal, optional sliding window). The decoder's reference path and
//! KV-cache generation use them; the fused CPU kernel in `attention.rs` builds its own host tables and is
//! tested against these.

use burn::prelude::*;

/// Large finite negative added to masked attention scores: exp() underflows to 0 without risking inf - inf = NaN.
const MASK_VALUE: f32 = -1.0e9;

/// Rotary tables for one batch, `[B, 1, T, head_dim]`, shared by every layer.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// `cos/sin(position * inv_freq)` with the frequencies repeated for both halves (rotate-half convention).
    pub fn new(position_ids: &Tensor<2, Int>, inv_freq: &[f32]) -> Self {
        let device = position_ids.device();
        let half = inv_freq.len();
        let inv = Tensor::<1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device)
            .reshape([1, 1, half]);
        let freqs = position_ids.clone().float().unsqueeze_dim::<3>(2) * inv; // [B, T, half]
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
        Self {
            cos: emb.clone().cos(),
            sin: emb.sin(),
        }
    }

    /// `x·cos + rotate_half(x)·sin` for `x: [B, heads, T, head_dim]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Additive attention bias `[B, 1, T, T]`: 0 where query `q` may see key `k` (same segment, `k <= q`, within the
/// sliding window), a large negative elsewhere. The diagonal is always visible, so no row is fully masked and
/// padding rows (segment 0) stay finite.
pub fn attention_bias(segment_ids: &Tensor<2, Int>, sliding_window: Option<usize>) -> Tensor<4> {
    let [b, t] = segment_ids.dims();
    let device = segment_ids.device();
    let seg_q = segment_ids.clone().unsqueeze_dim::<3>(2).expand([b, t, t]);
    let seg_k = segment_ids.clone().unsqueeze_dim::<3>(1).expand([b, t, t]);
    let idx = Tensor::<1, Int>::arange(0..t as i64, &device);
    let q_idx = idx.clone().reshape([1, t, 1]).expand([b, t, t]);
    let k_idx = idx.reshape([1, 1, t]).expand([b, t, t]);
    let mut visible = seg_q
        .equal(seg_k)
        .bool_and(k_idx.clone().lower_equal(q_idx.clone()));
    if let Some(w) = sliding_window {
        visible = visible.bool_and((q_idx - k_idx).lower_elem(w as i64));
    }
    visible
        .bool_not()
        .float()
        .mul_scalar(MASK_VALUE)
        .unsqueeze_dim::<4>(1)
}
