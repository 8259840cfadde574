//! The decoder shared by Llama, Mistral, Qwen2 and Qwen3.
//!
//! These architectures differ only in a few switches (biases, q/k norms, head size, RoPE details); the switches
//! live in [`ArchSpec`], built by one small file per architecture (`arch/llama.rs`, `arch/qwen2.rs`,
//! `arch/qwen3.rs`). The computation follows `transformers`' modeling code line by line so that logits match to
//! float rounding:
//!
//! ```text
//! h = embed(ids)
//! per block:  h = h + o_proj(attn(rope(q_norm?(q_proj(rms(h)))), rope(k_norm?(k_proj(rms(h)))), v_proj(rms(h))))
//!             h = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
//! out = rms(h);  logits = out · E^T (tied) or lm_head(out)
//! ```
//!
//! Module field names mirror Hugging Face's parameter names (`layers.N.self_attn.q_proj.weight`, ...), so a
//! Burn module path is the HF name without the leading `model.`; norm weights have `norm` in their path and
//! biases end with `bias`, which the optimizer uses to skip weight decay.
//!
//! This file is the network alone: the trainer's [`CausalLm`] contract is implemented in `causal_lm.rs`,
//! gradient checkpointing in `recompute.rs`, positions and masks of the tensor path in `positions.rs`, and
//! every file format (loading, saving, GGUF) under `formats/` and `gguf/`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use ytrainer_core::model::{CausalLm, ModelInput};

use crate::ModelError;
pub use crate::arch::{ArchSpec, Architecture};
use crate::config::HfConfig;
use crate::lora::{AdapterSpec, LoraLinear};
pub use crate::positions::{Rope, attention_bias};

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
    /// The base model's table, frozen, kept while `weight` is trained beside LoRA (`modules_to_save`): a
    /// forward pass with the adapters off ([`crate::lora::without_adapters`], the reference model of DPO / rho1)
    /// reads it instead, as PEFT's `disable_adapter` reads its `original_module`. Shares the buffer with `weight`
    /// until the first update (copy on write).
    pub original: Option<Param<Tensor<2>>>,
}

impl Embedding {
    /// The table in force: the trained one, or the base's with the adapters off.
    pub fn table(&self) -> Tensor<2> {
        match &self.original {
            Some(o) if crate::lora::adapters_off() => o.val(),
            _ => self.weight.val(),
        }
    }

    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = ids.dims();
        let hidden = self.weight.lazy_shape().as_slice()[1];
        self.table()
            .select(0, ids.reshape([b * t]))
            .reshape([b, t, hidden])
    }

    /// Makes the table trainable, keeping a frozen copy of the base's for forward passes with adapters off.
    pub(crate) fn trained_beside_adapters(self) -> Self {
        let w = self.weight.val().detach();
        Self {
            original: Some(Param::from_tensor(w.clone()).set_require_grad(false)),
            weight: Param::from_tensor(w).set_require_grad(true),
        }
    }

    /// Back to the base's table alone (frozen), dropping a copy trained beside the adapters.
    pub(crate) fn base_only(self) -> Self {
        match self.original {
            Some(original) => Self {
                weight: original,
                original: None,
            },
            None => self,
        }
    }
}

/// RMSNorm as in transformers: `w * x / sqrt(mean(x^2) + eps)` over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(y) = crate::fused::rms_norm(&x, &self.weight.val(), self.eps) {
            return y;
        }
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        x.div(rms) * self.weight.val().unsqueeze::<D>()
    }
}

/// Untied output projection `[hidden, vocab]` (Burn layout).
#[derive(Module, Debug)]
pub struct LmHead {
    pub weight: Param<Tensor<2>>,
    /// The base's head, frozen, while `weight` is trained beside LoRA (as [`Embedding::original`]).
    pub original: Option<Param<Tensor<2>>>,
}

impl LmHead {
    /// The head in force: the trained one, or the base's with the adapters off.
    pub fn param(&self) -> &Param<Tensor<2>> {
        match &self.original {
            Some(o) if crate::lora::adapters_off() => o,
            _ => &self.weight,
        }
    }

    pub(crate) fn trained_beside_adapters(self) -> Self {
        let w = self.weight.val().detach();
        Self {
            original: Some(Param::from_tensor(w.clone()).set_require_grad(false)),
            weight: Param::from_tensor(w).set_require_grad(true),
        }
    }

    /// Back to the base's head alone (frozen), dropping a copy trained beside the adapters.
    pub(crate) fn base_only(self) -> Self {
        match self.original {
            Some(original) => Self {
                weight: original,
                original: None,
            },
            None => self,
        }
    }
}

/// The module names `modules_to_save` accepts (PEFT's suffix rule: `model.embed_tokens` names the same).
pub const MODULES_TO_SAVE: [&str; 2] = ["embed_tokens", "lm_head"];

/// Which of the embeddings and the head `modules_to_save` names: `(embed_tokens, lm_head)`; an unknown name is
/// an error that lists the accepted ones.
pub fn modules_to_save_flags(names: &[String]) -> Result<(bool, bool), ModelError> {
    let (mut embed, mut head) = (false, false);
    for name in names {
        let last = name.rsplit('.').next().unwrap_or(name);
        match last {
            "embed_tokens" => embed = true,
            "lm_head" => head = true,
            _ => {
                return Err(ModelError::Invalid(format!(
                    "`modules_to_save` entry {name:?} is not supported: only {MODULES_TO_SAVE:?} can be trained \
                     fully beside LoRA (a projection is adapted through `target_modules` instead)"
                )));
            }
        }
    }
    Ok((embed, head))
}

/// Multi-head attention with grouped KV heads.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    /// Qwen3's per-head norms (weight `[head_dim]`).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn forward(&self, x: Tensor<3>, ctx: &AttnContext) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut q = self.q_proj.forward(x.clone()).reshape([b, t, h, d]);
        let mut k = self.k_proj.forward(x.clone()).reshape([b, t, kv, d]);
        let v = self.v_proj.forward(x).reshape([b, t, kv, d]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        if let Some(mask) = &ctx.fused
            && let Some(out) = crate::attention::attention(&q, &k, &v, mask)
        {
            return self.o_proj.forward(out);
        }
        let rope = ctx.rope();
        let q = rope.apply(q.swap_dims(1, 2));
        let k = repeat_kv(rope.apply(k.swap_dims(1, 2)), h / kv);
        let v = repeat_kv(v.swap_dims(1, 2), h / kv);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt())
            + ctx.bias().clone();
        let out = softmax(scores, 3).matmul(v); // [B, H, T, D]
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, h * d]))
    }
}

impl Attention {
    /// Attention output (after `o_proj`) at `rows` only, `[N, hidden]`, from the normalised input of every
    /// position `x` `[B, T, hidden]`: keys and values everywhere, queries at `rows`. CPU kernel only.
    pub fn forward_at(
        &self,
        x: Tensor<3>,
        ctx: &AttnContext,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Option<Tensor<2>> {
        let mask = ctx.fused.as_ref()?;
        // The kernel is f32-only: decide before any projection is computed (the caller then runs the full layer).
        if !crate::fused::all_f32(&[&x]) {
            return None;
        }
        let [b, t, hidden] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n = host_rows.len();
        let mut k = self.k_proj.forward(x.clone()).reshape([b, t, kv, d]);
        let v = self.v_proj.forward(x.clone()).reshape([b, t, kv, d]);
        let x_rows = x.reshape([b * t, hidden]).select(0, rows.clone());
        let mut q = self
            .q_proj
            .forward(x_rows.reshape([1, n, hidden]))
            .reshape([n, h, d]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let out = crate::attention::attention_at(&q, &k, &v, mask, host_rows)?;
        Some(
            self.o_proj
                .forward(out.reshape([1, n, h * d]))
                .reshape([n, hidden]),
        )
    }
}

/// What every layer's attention needs for one batch: the fused CPU kernel's host tables when it applies, else
/// the RoPE tables and mask as tensors (built on first use, so the fused path never pays for them).
pub struct AttnContext {
    position_ids: Tensor<2, Int>,
    segment_ids: Tensor<2, Int>,
    inv_freq: Vec<f32>,
    sliding_window: Option<usize>,
    fused: Option<std::sync::Arc<crate::attention::AttnMask>>,
    rope: std::cell::OnceCell<Rope>,
    bias: std::cell::OnceCell<Tensor<4>>,
}

impl AttnContext {
    /// `fused` asks for the CPU kernel; it is used when the batch lives on the CPU backend and its segments are
    /// contiguous runs (always the case for ytrainer's packed batches). `YTRAINER_FUSED=0` turns it and the other
    /// fused CPU ops off (for A/B measurements and parity checks).
    pub fn new(
        input: &ModelInput,
        inv_freq: &[f32],
        sliding_window: Option<usize>,
        fused: bool,
    ) -> Self {
        let on_cpu = ytrainer_kernels::on_host(&input.position_ids);
        let enabled =
            fused && on_cpu && std::env::var("YTRAINER_FUSED_ATTENTION").as_deref() != Ok("0");
        let fused = enabled
            .then(|| {
                let [b, t] = input.position_ids.dims();
                let host = |x: &Tensor<2, Int>| -> Vec<i64> {
                    x.clone()
                        .into_data()
                        .convert::<i64>()
                        .try_into_vec::<i64>()
                        .unwrap_or_default()
                };
                let (pos, seg) = (host(&input.position_ids), host(&input.segment_ids));
                if pos.len() != b * t || seg.len() != b * t {
                    return None;
                }
                crate::attention::AttnMask::new(&pos, &seg, b, t, inv_freq, sliding_window)
                    .map(std::sync::Arc::new)
            })
            .flatten();
        Self {
            position_ids: input.position_ids.clone(),
            segment_ids: input.segment_ids.clone(),
            inv_freq: inv_freq.to_vec(),
            sliding_window,
            fused,
            rope: std::cell::OnceCell::new(),
            bias: std::cell::OnceCell::new(),
        }
    }

    fn rope(&self) -> &Rope {
        self.rope
            .get_or_init(|| Rope::new(&self.position_ids, &self.inv_freq))
    }

    fn bias(&self) -> &Tensor<4> {
        self.bias
            .get_or_init(|| attention_bias(&self.segment_ids, self.sliding_window))
    }
}

/// `[B, KV, T, D] -> [B, KV * n_rep, T, D]`: query head `i` uses KV head `i / n_rep` (transformers' `repeat_kv`).
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n_rep, t, d])
        .reshape([b, kv * n_rep, t, d])
}

/// SwiGLU feed-forward block.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        let act = match crate::fused::swiglu(&gate, &up) {
            Some(act) => act,
            None => silu(gate) * up,
        };
        self.down_proj.forward(act)
    }
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub fn forward(&self, x: Tensor<3>, ctx: &AttnContext) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), ctx);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }

    /// The layer's output at `rows` only (flat `b * T + t`, ascending), `[N, hidden]`; `None` when the fused
    /// attention kernel does not apply (the caller then runs [`DecoderLayer::forward`] and selects).
    pub fn forward_at(
        &self,
        x: Tensor<3>,
        ctx: &AttnContext,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Option<Tensor<2>> {
        let [b, t, hidden] = x.dims();
        let n = host_rows.len();
        let attn = self.self_attn.forward_at(
            self.input_layernorm.forward(x.clone()),
            ctx,
            rows,
            host_rows,
        )?;
        let x = x.reshape([b * t, hidden]).select(0, rows.clone()) + attn;
        let x = x.reshape([1, n, hidden]);
        let y = x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x));
        Some(y.reshape([n, hidden]))
    }

    /// The seven projections with their HF names relative to the layer (`self_attn.q_proj`, ...).
    pub fn linears(&self) -> [(&'static str, &LoraLinear); 7] {
        [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    /// Rebuilds the layer with each projection passed through `f(name, linear)`.
    pub fn try_map_linears<E>(
        self,
        mut f: impl FnMut(&str, LoraLinear) -> Result<LoraLinear, E>,
    ) -> Result<Self, E> {
        let Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm,
            k_norm,
            num_heads,
            num_kv_heads,
            head_dim,
        } = self.self_attn;
        let Mlp {
            gate_proj,
            up_proj,
            down_proj,
        } = self.mlp;
        Ok(Self {
            self_attn: Attention {
                q_proj: f("self_attn.q_proj", q_proj)?,
                k_proj: f("self_attn.k_proj", k_proj)?,
                v_proj: f("self_attn.v_proj", v_proj)?,
                o_proj: f("self_attn.o_proj", o_proj)?,
                q_norm,
                k_norm,
                num_heads,
                num_kv_heads,
                head_dim,
            },
            mlp: Mlp {
                gate_proj: f("mlp.gate_proj", gate_proj)?,
                up_proj: f("mlp.up_proj", up_proj)?,
                down_proj: f("mlp.down_proj", down_proj)?,
            },
            input_layernorm: self.input_layernorm,
            post_attention_layernorm: self.post_attention_layernorm,
        })
    }
}

/// A decoder-only language model (Llama / Mistral / Qwen2 / Qwen3).
#[derive(Module, Debug)]
pub struct Decoder {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the embeddings are tied (the head is then `E^T`).
    pub lm_head: Option<LmHead>,
    #[module(skip)]
    pub spec: ArchSpec,
    /// The checkpoint's config, written back on export.
    #[module(skip)]
    pub config: HfConfig,
    /// How the model is being trained (decides what `export` writes).
    #[module(skip)]
    pub adapter: AdapterSpec,
    /// Recorded in a PEFT adapter's `base_model_name_or_path`.
    #[module(skip)]
    pub base_model_name_or_path: String,
    #[module(skip)]
    pub(crate) inv_freq: Vec<f32>,
    /// A separately loaded, frozen reference model for reference-based losses (`[loss] reference_model`); `None`:
    /// the reference is this model with its adapters disabled.
    #[module(skip)]
    pub(crate) reference: Option<std::sync::Arc<Decoder>>,
    /// Activation recomputation in training (`train.gradient_checkpointing`).
    #[module(skip)]
    pub(crate) recompute: bool,
    /// NEFTune (`train.neftune_noise_alpha`): uniform noise on the input embeddings in training; 0 = off.
    #[module(skip)]
    pub neftune_alpha: f64,
}

/// NEFTune (Jain et al. 2023, as TRL / transformers apply it): `x + U(-m, m)` with `m = alpha / sqrt(T * H)`
/// for embeddings `[B, T, H]`, only where a backward pass is possible (the training device) and the adapters
/// are on (a reference forward pass with adapters off gets none); `alpha <= 0` is off.
pub fn neftune(x: Tensor<3>, alpha: f64) -> Tensor<3> {
    if alpha <= 0.0 || !x.device().is_autodiff() || crate::lora::adapters_off() {
        return x;
    }
    let [_, t, h] = x.dims();
    let m = alpha / ((t * h) as f64).sqrt();
    let noise = x.random_like(burn::tensor::Distribution::Uniform(-m, m));
    x + noise
}

impl Decoder {
    pub(crate) fn from_parts(
        embed_tokens: Embedding,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
        lm_head: Option<LmHead>,
        spec: ArchSpec,
        config: HfConfig,
    ) -> Self {
        let inv_freq = spec.inv_freq();
        Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            spec,
            config,
            adapter: AdapterSpec::Full,
            base_model_name_or_path: String::new(),
            inv_freq,
            reference: None,
            recompute: false,
            neftune_alpha: 0.0,
        }
    }

    /// Trains with activation recomputation (`train.gradient_checkpointing`, HF's `gradient_checkpointing`): see
    /// [`CausalLm::hidden_states_at_recomputed`].
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }

    /// Uses `reference` (frozen here) as the reference model of reference-based losses instead of this model's
    /// own base.
    pub fn with_reference(mut self, reference: Decoder) -> Self {
        self.reference = Some(std::sync::Arc::new(reference.set_require_grad(false)));
        self
    }

    /// Logits for every position, `[B, T, vocab]` (convenience for evaluation and tests).
    pub fn forward(&self, input: &ModelInput) -> Tensor<3> {
        let hidden = self.hidden_states(input);
        let [b, t, h] = hidden.dims();
        CausalLm::lm_head(self, hidden.reshape([b * t, h])).reshape([b, t, self.spec.vocab_size])
    }

    /// The embedding matrix used by the head when tied, `[vocab, hidden]`; the untied head in Burn layout
    /// `[hidden, vocab]` otherwise.
    pub fn head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.param().val(),
            None => self.embed_tokens.table().transpose(),
        }
    }

    /// Whether the embeddings / the untied head are trained beside LoRA (`modules_to_save`): `(embed, head)`.
    /// With tied embeddings only the first can be true (the one matrix is both).
    pub fn trained_beside_adapters(&self) -> (bool, bool) {
        (
            self.embed_tokens.original.is_some(),
            self.lm_head.as_ref().is_some_and(|h| h.original.is_some()),
        )
    }

    /// Trains the embeddings and / or the head fully beside the adapters (`modules_to_save`), the rest staying
    /// as it is. With tied embeddings there is one matrix, and naming either module trains it: the model keeps its
    /// architecture (PEFT's `ensure_weight_tying`), and the saved adapter holds it under both names.
    pub fn with_modules_to_save(mut self, embed: bool, head: bool) -> Self {
        let tied = self.lm_head.is_none();
        if embed || (tied && head) {
            self.embed_tokens = self.embed_tokens.trained_beside_adapters();
        }
        if head && !tied {
            self.lm_head = self.lm_head.map(LmHead::trained_beside_adapters);
        }
        self
    }

    /// Every projection with its full HF module name (`model.layers.3.mlp.down_proj`).
    pub fn named_linears(&self) -> Vec<(String, &LoraLinear)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| {
                layer
                    .linears()
                    .into_iter()
                    .map(move |(name, lin)| (format!("model.layers.{i}.{name}"), lin))
            })
            .collect()
    }

    /// Rebuilds the model with each projection passed through `f(full_hf_module_name, linear)`.
    pub fn try_map_linears<E>(
        self,
        mut f: impl FnMut(&str, LoraLinear) -> Result<LoraLinear, E>,
    ) -> Result<Self, E> {
        let Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            spec,
            config,
            adapter,
            base_model_name_or_path,
            inv_freq,
            reference,
            recompute,
            neftune_alpha,
        } = self;
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                layer.try_map_linears(|name, lin| f(&format!("model.layers.{i}.{name}"), lin))
            })
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            spec,
            config,
            adapter,
            base_model_name_or_path,
            inv_freq,
            reference,
            recompute,
            neftune_alpha,
        })
    }

    /// Sets up training according to `adapter`: with [`AdapterSpec::Full`] every parameter is trainable; with
    /// LoRA every base parameter is frozen (`require_grad = false`, so backward computes no gradient for it) and
    /// a fresh LoRA branch is attached to each targeted projection.
    pub fn with_adapter(self, adapter: &AdapterSpec) -> Result<Self, ModelError> {
        let mut model = match adapter {
            AdapterSpec::Full => {
                if let Some((name, q)) = self
                    .named_linears()
                    .into_iter()
                    .find_map(|(n, l)| l.quant.as_ref().map(|q| (n, q.kind)))
                {
                    return Err(ModelError::Invalid(format!(
                        "full fine-tuning needs an f32 base, but `{name}` is kept quantised ({}); train a LoRA \
                         adapter on the quantised base, or pass --dequantize-base (config `model.dequantize_base \
                         = true`) to load it in f32",
                        q.name()
                    )));
                }
                self.set_require_grad(true)
            }
            AdapterSpec::Lora(cfg) => {
                check_lora_config(cfg)?;
                let (embed, head) = modules_to_save_flags(&cfg.modules_to_save)?;
                let mut matched = false;
                let model = self.set_require_grad(false).try_map_linears(|name, lin| {
                    Ok::<_, ModelError>(if cfg.targets(name) {
                        matched = true;
                        lin.with_new_lora(cfg, name)
                    } else {
                        lin
                    })
                })?;
                if !matched {
                    return Err(ModelError::Invalid(format!(
                        "LoRA target_modules {:?} match no projection; the adaptable modules are {:?}",
                        cfg.target_modules,
                        crate::lora::DEFAULT_LORA_TARGETS
                    )));
                }
                model.with_modules_to_save(embed, head)
            }
        };
        model.adapter = adapter.clone();
        Ok(model)
    }
}

pub(crate) fn check_lora_config(cfg: &crate::LoraConfig) -> Result<(), ModelError> {
    if cfg.r == 0 {
        return Err(ModelError::Invalid(
            "LoRA rank `r` must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        return Err(ModelError::Invalid(format!(
            "LoRA dropout must be in [0, 1), got {}",
            cfg.dropout
        )));
    }
    modules_to_save_flags(&cfg.modules_to_save)?;
    Ok(())
}

impl Decoder {
    /// The last layer and the final norm at `rows`. The last layer's output is read only at the targets: every
    /// position still gives the keys and values its attention reads, but queries, the output projection and the
    /// MLP run at the target rows alone (worth it once at least an eighth of the positions are not targets:
    /// prompts, windowed mode).
    pub(crate) fn top_rows(
        &self,
        last: &DecoderLayer,
        x: Tensor<3>,
        ctx: &AttnContext,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Tensor<2> {
        let [b, t, h] = x.dims();
        if !host_rows.is_empty()
            && host_rows.len() * 8 <= b * t * 7
            && let Some(y) = last.forward_at(x.clone(), ctx, rows, host_rows)
        {
            return self.norm.forward(y);
        }
        self.norm
            .forward(last.forward(x, ctx))
            .reshape([b * t, h])
            .select(0, rows.clone())
    }
}
