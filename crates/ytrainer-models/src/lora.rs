//! LoRA (Hu et al. 2021) as PEFT implements it, inside a linear layer usable for every projection.
//!
//! The adapted weight `W + s·A·B` is never formed: the forward pass computes `x·W + b + s·((x·A)·B)`, so the
//! frozen base weight gets no gradient and only the two thin matrices are trained. (Burn 0.22's built-in
//! `Module::apply_lora` materialises the dense `W + s·A·B` on every forward, with full-size weight gradients,
//! and by default also adapts the embeddings and `lm_head`.)
//!
//! Layout: Burn stores linear weights `[in, out]` (the transpose of PyTorch), so `A` is `[in, r]` and `B` is
//! `[r, out]`; PEFT's files hold `A` as `[r, in]` and `B` as `[out, r]` (see `formats/save.rs`).

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::module::linear;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use ytrainer_kernels::quant::QuantWeight;

use crate::rng::InitRng;

std::thread_local! {
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every LoRA branch switched off on this thread: forward passes inside compute the frozen base
/// model (the reference model of `rho1`). Burn builds the graph on the calling thread, so a thread-local flag
/// read in [`LoraLinear::forward`] is enough; the flag is restored even if `f` panics.
pub fn without_adapters<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ADAPTERS_OFF.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ADAPTERS_OFF.with(|c| c.replace(true)));
    f()
}

/// Whether [`without_adapters`] is in force on this thread.
pub fn adapters_off() -> bool {
    ADAPTERS_OFF.with(|c| c.get())
}

/// The projections LoRA adapts by default: all seven linear layers of a decoder block, as most recipes do.
pub const DEFAULT_LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA hyper-parameters (PEFT's `LoraConfig` subset that matters for training and export).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the LoRA branch's input, active in training only.
    pub dropout: f64,
    /// Module names to adapt; a module matches when its full name equals an entry or ends with `.entry`.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Seed of the `A` initialisation.
    pub init_seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: DEFAULT_LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            init_seed: 42,
        }
    }
}

impl LoraConfig {
    /// The factor applied to the LoRA branch.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// PEFT's list rule: `name` matches an entry exactly or ends with `"." + entry`.
    pub fn targets(&self, module_name: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module_name == t || module_name.ends_with(&format!(".{t}")))
    }
}

/// What is trained.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AdapterSpec {
    /// Every weight is trainable.
    #[default]
    Full,
    /// Only the LoRA matrices are trainable; every base parameter has `require_grad = false`.
    Lora(LoraConfig),
}

/// A linear layer `y = x·W + b`, optionally with a LoRA branch `+ s·(dropout(x)·A)·B`.
///
/// Field names are part of the contract with the optimizer, which selects parameters by module path: the bias
/// path ends with `bias` (no weight decay), LoRA matrices are `lora_a` / `lora_b`.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// `[in, out]`; frozen when a LoRA branch is attached. Empty (`[0, 0]`) when the base is `quant`.
    pub weight: Param<Tensor<2>>,
    /// The frozen base weight kept quantised (QLoRA): then `weight` is empty and every product with the base
    /// dequantises it tile by tile (`ytrainer-kernels`' `quant.rs`). Not a module parameter: it is never trained
    /// and never saved in a checkpoint.
    #[module(skip)]
    pub quant: Option<Arc<QuantWeight>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// `[in, r]`, initialised U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt(5)).
    pub lora_a: Option<Param<Tensor<2>>>,
    /// `[r, out]`, initialised to zeros so that training starts from the base model.
    pub lora_b: Option<Param<Tensor<2>>>,
    pub lora_dropout: Option<Dropout>,
    /// `alpha / r` (or `alpha / sqrt(r)`); 0 without LoRA.
    pub scaling: f64,
}

impl LoraLinear {
    /// A plain (trainable) linear layer from a weight in Burn layout `[in, out]`.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            quant: None,
            bias: bias.map(Param::from_tensor),
            lora_a: None,
            lora_b: None,
            lora_dropout: None,
            scaling: 0.0,
        }
    }

    /// A frozen linear layer whose weight stays quantised (`[out, in]` rows of blocks).
    pub fn quantized(weight: QuantWeight, bias: Option<Tensor<1>>, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([0, 0], device)).set_require_grad(false),
            quant: Some(Arc::new(weight)),
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            lora_a: None,
            lora_b: None,
            lora_dropout: None,
            scaling: 0.0,
        }
    }

    pub fn d_in(&self) -> usize {
        match &self.quant {
            Some(q) => q.cols,
            None => self.weight.lazy_shape().as_slice()[0],
        }
    }

    pub fn d_out(&self) -> usize {
        match &self.quant {
            Some(q) => q.rows,
            None => self.weight.lazy_shape().as_slice()[1],
        }
    }

    /// The base weight in Burn layout `[in, out]`, dequantised when it is kept quantised (detached then).
    pub fn base_weight(&self) -> Tensor<2> {
        match &self.quant {
            Some(q) => {
                let device = self.weight.lazy_device();
                Tensor::<2>::from_data(TensorData::new(q.dequantize(), [q.rows, q.cols]), &device)
                    .transpose()
            }
            None => self.weight.val(),
        }
    }

    pub fn has_lora(&self) -> bool {
        self.lora_a.is_some()
    }

    /// Attaches a freshly initialised LoRA branch (PEFT init: `A` uniform from a seeded generator keyed by
    /// `module_name`, `B` zeros) and freezes the base weight and bias.
    pub fn with_new_lora(self, config: &LoraConfig, module_name: &str) -> Self {
        let device = self.weight.lazy_device();
        let (d_in, d_out, r) = (self.d_in(), self.d_out(), config.r);
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = InitRng::for_tensor(config.init_seed, module_name).uniform(d_in * r, -bound, bound);
        let a = Tensor::from_data(TensorData::new(a, [d_in, r]), &device);
        let b = Tensor::zeros([r, d_out], &device);
        self.with_lora(a, b, config.scaling(), config.dropout)
    }

    /// Attaches a LoRA branch with the given `A [in, r]` and `B [r, out]` (trainable) and freezes the base.
    pub fn with_lora(self, a: Tensor<2>, b: Tensor<2>, scaling: f64, dropout: f64) -> Self {
        Self {
            weight: self.weight.set_require_grad(false),
            quant: self.quant,
            bias: self.bias.map(|b| b.set_require_grad(false)),
            lora_a: Some(Param::from_tensor(a)),
            lora_b: Some(Param::from_tensor(b)),
            lora_dropout: (dropout > 0.0).then(|| DropoutConfig::new(dropout).init()),
            scaling,
        }
    }

    /// `x·W + b + s·(dropout(x)·A)·B` over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let adapters_on = !ADAPTERS_OFF.with(|c| c.get());
        if let Some(q) = &self.quant {
            return self.forward_quantized(q, x, adapters_on);
        }
        if self.lora_dropout.is_none() || !adapters_on {
            let (weight, bias) = (self.weight.val(), self.bias.as_ref().map(|b| b.val()));
            let (a, b) = (
                self.lora_a.as_ref().map(|p| p.val()),
                self.lora_b.as_ref().map(|p| p.val()),
            );
            let lora = match (&a, &b) {
                (Some(a), Some(b)) if adapters_on => Some((a, b, self.scaling as f32)),
                _ => None,
            };
            let parts = crate::fused::LinearParts {
                bias: bias.as_ref(),
                lora,
            };
            if let Some(y) = crate::fused::linear(&x, &weight, parts) {
                return y;
            }
        }
        let base = |x: Tensor<D>| linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()));
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) if !ADAPTERS_OFF.with(|c| c.get()) => {
                let update = self.lora_update(a, b, x.clone());
                base(x) + update
            }
            _ => base(x),
        }
    }

    /// `s·(dropout(x)·A)·B` as tensor operations.
    fn lora_update<const D: usize>(
        &self,
        a: &Param<Tensor<2>>,
        b: &Param<Tensor<2>>,
        x: Tensor<D>,
    ) -> Tensor<D> {
        let h = match &self.lora_dropout {
            Some(dropout) => dropout.forward(x),
            None => x,
        };
        // The scale goes on the thin `B` (`[r, out]`), not on the `[N, out]` update: same result, one
        // full-size pass less forward and backward.
        linear(
            linear(h, a.val(), None),
            b.val().mul_scalar(self.scaling),
            None,
        )
    }

    /// The forward pass over a quantised base: one fused CPU operation (base tiles + LoRA without dropout), or,
    /// on other backends, the base dequantised for this layer and the tensor formula.
    fn forward_quantized<const D: usize>(
        &self,
        q: &Arc<QuantWeight>,
        x: Tensor<D>,
        adapters_on: bool,
    ) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        let lora = match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) if adapters_on => Some((a, b)),
            _ => None,
        };
        let fused_lora = lora.filter(|_| self.lora_dropout.is_none());
        let (a_val, b_val) = (
            fused_lora.map(|(a, _)| a.val()),
            fused_lora.map(|(_, b)| b.val()),
        );
        let parts = match (&a_val, &b_val) {
            (Some(a), Some(b)) => Some((a, b, self.scaling as f32)),
            _ => None,
        };
        let y = ytrainer_kernels::quant_linear::quant_linear(&x, q, bias.as_ref(), parts);
        let (y, lora_done) = match y {
            Some(y) => (y, fused_lora.is_some()),
            None => (linear(x.clone(), self.base_weight(), bias), false),
        };
        match lora {
            Some((a, b)) if !lora_done => y + self.lora_update(a, b, x),
            _ => y,
        }
    }

    /// `W + s·A·B` in Burn layout `[in, out]`, detached (for export; never used in training).
    pub fn merged_weight(&self) -> Tensor<2> {
        let w = self.base_weight().detach();
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => {
                w + a
                    .val()
                    .detach()
                    .matmul(b.val().detach())
                    .mul_scalar(self.scaling)
            }
            _ => w,
        }
    }
}
