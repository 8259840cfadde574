//! Per-kernel wall-clock accounting for `ytrainer bench --ops`.
//!
//! The phase timings of the training step say *that* the backward pass is slow, not *which* op makes it so; a
//! sampling profiler cannot tell either, because the work runs on rayon's worker threads where the call stack no
//! longer names the op. Each fused CPU kernel therefore opens a [`span`] around its forward and backward bodies.
//! Off by default: a span is then one relaxed atomic load, so the kernels pay nothing measurable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The kernels that are timed, in report order (the discriminant indexes the totals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Base + LoRA linear layer, forward.
    LinearForward,
    /// Base + LoRA linear layer, backward (dX, dA, dB, dW).
    LinearBackward,
    /// The LoRA bottleneck products inside the linear layer (both passes; also counted in the two above).
    LoraProducts,
    /// Fused causal attention, forward.
    AttentionForward,
    /// Fused causal attention, backward.
    AttentionBackward,
    /// RMSNorm, forward and backward.
    RmsNorm,
    /// SwiGLU, forward and backward.
    Swiglu,
    /// The LM head's row statistics (log-sum-exp, CE, argmax, entropy) over the logits.
    HeadStats,
    /// The LM head's logits gradient `(softmax - onehot) * w`, in place.
    HeadGrad,
}

const OPS: [Op; 9] = [
    Op::LinearForward,
    Op::LinearBackward,
    Op::LoraProducts,
    Op::AttentionForward,
    Op::AttentionBackward,
    Op::RmsNorm,
    Op::Swiglu,
    Op::HeadStats,
    Op::HeadGrad,
];

impl Op {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::LinearForward => "linear_forward",
            Op::LinearBackward => "linear_backward",
            Op::LoraProducts => "lora_products",
            Op::AttentionForward => "attention_forward",
            Op::AttentionBackward => "attention_backward",
            Op::RmsNorm => "rms_norm",
            Op::Swiglu => "swiglu",
            Op::HeadStats => "head_stats",
            Op::HeadGrad => "head_grad",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; OPS.len()] = [const { AtomicU64::new(0) }; OPS.len()];
static CALLS: [AtomicU64; OPS.len()] = [const { AtomicU64::new(0) }; OPS.len()];

/// Switches accounting on and clears the totals.
pub fn start() {
    for i in 0..OPS.len() {
        NANOS[i].store(0, Ordering::Relaxed);
        CALLS[i].store(0, Ordering::Relaxed);
    }
    ON.store(true, Ordering::Relaxed);
}

/// `(op name, seconds, calls)` per op since [`start`].
pub fn read() -> Vec<(&'static str, f64, u64)> {
    OPS.iter()
        .enumerate()
        .map(|(i, op)| {
            (
                op.name(),
                NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                CALLS[i].load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Times the enclosing scope under `op` (when accounting is on).
pub fn span(op: Op) -> Span {
    Span(ON.load(Ordering::Relaxed).then(|| (op, Instant::now())))
}

/// Adds its lifetime to its op's total when dropped.
pub struct Span(Option<(Op, Instant)>);

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((op, t0)) = self.0 {
            let i = op as usize;
            NANOS[i].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            CALLS[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_listed_in_discriminant_order() {
        for (i, op) in OPS.iter().enumerate() {
            assert_eq!(*op as usize, i, "{}", op.name());
        }
    }
}
