//! ytrainer's hand-written CPU fast paths, in one crate the way Burn keeps its SIMD kernels in `burn-flex` and
//! candle its fused ops in `candle-nn`: SIMD dispatch, GEMM and row statistics ([`cpu`]), causal attention with
//! RoPE, GQA and masks ([`attention`], against the tensor formulation in [`positions`]), RMSNorm, SwiGLU and the
//! base + LoRA linear ([`fused`]), the LM head's host buffers ([`head`]), host passes over gradients and the
//! AdamW update ([`host`]), and the per-kernel profiler ([`prof`]).
//!
//! Everything here reaches below `Tensor` to the Flex (CPU) backend's buffers, and attention / fused ops register
//! their own backward steps with Burn's autodiff. Each entry point hands its inputs back (or returns `None`) on
//! any other backend or float type, so the callers in `ytrainer-core` and `ytrainer-models` keep the plain tensor
//! code as the reference and the path every other backend takes; tests check kernel against reference.
//! `YTRAINER_FUSED=0` switches every kernel off at once ([`enabled`]).

pub mod attention;
pub mod cpu;
pub mod fused;
pub mod head;
pub mod host;
pub mod positions;
pub mod prof;
pub mod quant;
pub mod quant_linear;

use burn::prelude::*;

/// Whether the fast paths may be used: `YTRAINER_FUSED=0` turns all of them off, so the tensor paths can be
/// measured and tested on the CPU.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("YTRAINER_FUSED").as_deref() != Ok("0"))
}

/// Whether `t` lives on the CPU backend (with or without autodiff), where the kernels apply.
pub fn on_host<const D: usize>(t: &Tensor<D, Int>) -> bool {
    use burn_autodiff::Autodiff;
    use burn_flex::Flex;
    t.clone().try_into_primitive::<Flex>().is_ok()
        || t.clone().try_into_primitive::<Autodiff<Flex>>().is_ok()
}
