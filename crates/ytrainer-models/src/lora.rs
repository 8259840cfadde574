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
    /// DoRA (Liu et al. 2024, PEFT's `use_dora`): a trainable magnitude per output feature on top of LoRA, see
    /// [`LoraLinear::lora_magnitude`].
    #[serde(default)]
    pub use_dora: bool,
    /// Modules trained fully beside the adapters (PEFT's `modules_to_save`): `embed_tokens` and / or `lm_head`.
    /// On a model with tied embeddings either name trains the one shared matrix (see `Decoder::with_adapter`).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
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
            use_dora: false,
            modules_to_save: Vec::new(),
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
    /// DoRA's magnitude `m` `[out]`: the layer computes `W' = m * (W + s·A·B) / ||W + s·A·B||`, the norm taken
    /// per output feature (a column in Burn's `[in, out]` layout, a row of PyTorch's `[out, in]`: PEFT's
    /// `dim=1`) and treated as a constant in the backward pass, as the paper (section 4.3) and PEFT do, so the
    /// norm costs no activation memory. Initialised to that norm, so a fresh DoRA layer is the base layer.
    pub lora_magnitude: Option<Param<Tensor<1>>>,
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
            lora_magnitude: None,
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
            lora_magnitude: None,
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
        let lin = self.with_lora(a, b, config.scaling(), config.dropout);
        if config.use_dora {
            // PEFT's init: m = ||W + s·A·B|| with B = 0, so m / norm is exactly 1 and the layer starts as the base.
            let m = lin.dora_norm();
            lin.with_dora(m)
        } else {
            lin
        }
    }

    /// Attaches DoRA's magnitude vector `m` `[out]` (trainable) to a layer that has a LoRA branch.
    pub fn with_dora(self, magnitude: Tensor<1>) -> Self {
        Self {
            lora_magnitude: Some(Param::from_tensor(magnitude.detach())),
            ..self
        }
    }

    /// `||W + s·A·B||` per output feature, `[out]`, detached (DoRA's denominator). The dense sum is formed here,
    /// dequantising a quantised base (as PEFT does for its quantised layers): it costs one `[in, out]` pass per
    /// forward, `r / tokens` of the layer's own matmul. A zero norm (an all-zero weight column) is clamped to the
    /// smallest normal float so that `m / norm` stays finite (PEFT would give NaN there).
    pub fn dora_norm(&self) -> Tensor<1> {
        let w = self.merged_lora_weight();
        let d_out = w.dims()[1];
        w.square()
            .sum_dim(0)
            .sqrt()
            .clamp_min(f32::MIN_POSITIVE)
            .reshape([d_out])
    }

    /// `W + s·A·B` in Burn layout `[in, out]`, detached, without DoRA's rescaling.
    fn merged_lora_weight(&self) -> Tensor<2> {
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

    /// Drops the LoRA branch (and DoRA's magnitude): the base layer alone, frozen.
    pub fn without_lora(self) -> Self {
        Self {
            weight: self.weight.set_require_grad(false),
            quant: self.quant,
            bias: self.bias.map(|b| b.set_require_grad(false)),
            lora_a: None,
            lora_b: None,
            lora_dropout: None,
            lora_magnitude: None,
            scaling: 0.0,
        }
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
            lora_magnitude: None,
            scaling,
        }
    }

    /// `x·W + b + s·(dropout(x)·A)·B` over the last dimension (with DoRA's rescaling when it is on).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let adapters_on = !ADAPTERS_OFF.with(|c| c.get());
        match &self.lora_magnitude {
            Some(m) if adapters_on && self.has_lora() => self.forward_dora(m, x),
            _ => self.forward_lora(x, adapters_on),
        }
    }

    /// DoRA as PEFT computes it, with `g = m / ||W + s·A·B||` (norm detached) per output feature:
    /// `y = x·W + b + (g - 1)·(d·W) + g·s·(d·A)·B` where `d = dropout(x)`. Without dropout (`d = x`) this is
    /// `y + (g - 1)·(y - b)` for the plain LoRA output `y`, one fused LoRA product plus elementwise work; and at
    /// initialisation `g - 1` is exactly 0, so the output is the base layer's to the last bit.
    fn forward_dora<const D: usize>(&self, m: &Param<Tensor<1>>, x: Tensor<D>) -> Tensor<D> {
        let d_out = self.d_out();
        let mut shape = [1usize; D];
        shape[D - 1] = d_out;
        let g = m.val().div(self.dora_norm()).reshape(shape);
        let g_minus_1 = g.clone().sub_scalar(1.0);
        let bias = self.bias.as_ref().map(|b| b.val().reshape(shape));
        match (&self.lora_dropout, &self.lora_a, &self.lora_b) {
            (Some(dropout), Some(a), Some(b)) => {
                let d = dropout.forward(x.clone());
                let y = self.forward_lora(x, false);
                let base_d = self.base_product(d.clone());
                let lora = linear(
                    linear(d, a.val(), None),
                    b.val().mul_scalar(self.scaling),
                    None,
                );
                y + g_minus_1 * base_d + g * lora
            }
            _ => {
                let y = self.forward_lora(x, true);
                let without_bias = match bias {
                    Some(b) => y.clone() - b,
                    None => y.clone(),
                };
                y + g_minus_1 * without_bias
            }
        }
    }

    /// `x·W` without bias or adapter (fused or quantised kernel where one applies).
    fn base_product<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(q) = &self.quant {
            if let Some(y) = ytrainer_kernels::quant_linear::quant_linear(&x, q, None, None) {
                return y;
            }
            return linear(x, self.base_weight(), None);
        }
        let weight = self.weight.val();
        let parts = crate::fused::LinearParts {
            bias: None,
            lora: None,
        };
        crate::fused::linear(&x, &weight, parts).unwrap_or_else(|| linear(x, weight, None))
    }

    /// The LoRA layer without DoRA: `x·W + b + s·(dropout(x)·A)·B`, or `x·W + b` when `adapters_on` is false.
    fn forward_lora<const D: usize>(&self, x: Tensor<D>, adapters_on: bool) -> Tensor<D> {
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
            (Some(a), Some(b)) if adapters_on => {
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

    /// `W + s·A·B` in Burn layout `[in, out]`, detached (for export; never used in training); with DoRA
    /// `m * (W + s·A·B) / ||W + s·A·B||` per output feature, PEFT's merge.
    pub fn merged_weight(&self) -> Tensor<2> {
        let w = self.merged_lora_weight();
        match &self.lora_magnitude {
            Some(m) if self.has_lora() => {
                let d_out = w.dims()[1];
                let g = m.val().detach().div(self.dora_norm()).reshape([1, d_out]);
                w * g
            }
            _ => w,
        }
    }
}
