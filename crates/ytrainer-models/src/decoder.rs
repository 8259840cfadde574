//! The decoder shared by Llama, Mistral, Qwen2 and Qwen3.
//!
//! These architectures differ only in a few switches (biases, q/k norms, head size, RoPE details); the switches
//! live in [`ArchSpec`], built by one small file per architecture (`llama.rs`, `qwen2.rs`, `qwen3.rs`). The
//! computation follows `transformers`' modeling code line by line so that logits match to float rounding:
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

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use ytrainer_core::model::{CausalLm, GradSink, ModelInput, Recompute};

use crate::config::{HfConfig, RopeConfig};
use crate::lora::{AdapterSpec, LoraLinear};
use crate::{ModelError, llama, qwen2, qwen3};

/// Large finite negative added to masked attention scores: exp() underflows to 0 without risking inf - inf = NaN.
const MASK_VALUE: f32 = -1.0e9;

/// Which architecture a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// Everything the forward pass needs to know about an architecture, resolved from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchSpec {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Bias on q/k/v projections (Qwen2 always; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Mistral: a query sees at most this many keys (itself included).
    pub sliding_window: Option<usize>,
}

impl ArchSpec {
    /// Picks the architecture from `model_type`.
    pub fn from_config(config: &HfConfig) -> Result<Self, ModelError> {
        match config.model_type.as_str() {
            "llama" => llama::spec(config),
            "mistral" => llama::mistral_spec(config),
            "qwen2" => qwen2::spec(config),
            "qwen3" => qwen3::spec(config),
            other => Err(ModelError::UnsupportedArchitecture {
                path: config.source_path(),
                model_type: other.to_string(),
            }),
        }
    }

    /// The fields every architecture reads the same way; the per-architecture files adjust the rest.
    pub(crate) fn common(
        config: &HfConfig,
        architecture: Architecture,
        head_dim: usize,
    ) -> Result<Self, ModelError> {
        config.validate_sizes(head_dim)?;
        Ok(Self {
            architecture,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_layers: config.num_hidden_layers,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_kv_heads(),
            head_dim,
            rms_norm_eps: config.rms_norm_eps,
            rope: config.rope()?,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            tie_word_embeddings: config.tie_word_embeddings(),
            sliding_window: None,
        })
    }

    /// RoPE inverse frequencies `1 / theta^(2i/d)`, with Llama-3 scaling when configured (as transformers'
    /// `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope.theta.powf((2 * i) as f64 / d as f64);
                let Some(s) = self.rope.llama3 else {
                    return f as f32;
                };
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor;
                let high_wavelen = old / s.high_freq_factor;
                let wavelen = std::f64::consts::TAU / f;
                let scaled = if wavelen > low_wavelen {
                    f / s.factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                };
                scaled as f32
            })
            .collect()
    }

    /// Parameter count implied by the spec (embedding counted once when tied), for checks and reports.
    pub fn param_count(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
            + if self.qk_norm { 2 * hd } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = ids.dims();
        let hidden = self.weight.lazy_shape().as_slice()[1];
        self.weight
            .val()
            .select(0, ids.reshape([b * t]))
            .reshape([b, t, hidden])
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
}

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
        let on_cpu = {
            use burn_autodiff::Autodiff;
            use burn_flex::Flex;
            let p = &input.position_ids;
            p.clone().try_into_primitive::<Flex>().is_ok()
                || p.clone().try_into_primitive::<Autodiff<Flex>>().is_ok()
        };
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
    inv_freq: Vec<f32>,
    /// A separately loaded, frozen reference model for reference-based losses (`[loss] reference_model`); `None`:
    /// the reference is this model with its adapters disabled.
    #[module(skip)]
    reference: Option<std::sync::Arc<Decoder>>,
    /// Activation recomputation in training (`train.gradient_checkpointing`).
    #[module(skip)]
    recompute: bool,
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
        }
    }

    /// Trains with activation recomputation (`train.gradient_checkpointing`, HF's `gradient_checkpointing`): see
    /// [`CausalLm::hidden_states_at_recomputed`].
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.recompute = on;
        self
    }

    /// One device seed per layer when a LoRA branch draws dropout masks, so that recomputing a layer draws the
    /// same masks as its first forward pass did. The seeds come from the device's stream (seeded per optimizer
    /// step by the trainer), so a run stays reproducible and resumable.
    pub fn dropout_seeds(&self, device: &Device) -> Option<Vec<u64>> {
        let dropout = self.layers.iter().any(|l| {
            l.linears()
                .iter()
                .any(|(_, lin)| lin.lora_dropout.is_some())
        });
        if !dropout {
            return None;
        }
        let draws = Tensor::<1>::random(
            [self.layers.len()],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            device,
        )
        .into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .unwrap_or_default();
        Some(
            (0..self.layers.len())
                .map(|i| {
                    draws
                        .get(i)
                        .map_or(i as u64, |u| (u * 2f64.powi(53)) as u64)
                })
                .collect(),
        )
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
            Some(head) => head.weight.val(),
            None => self.embed_tokens.weight.val().transpose(),
        }
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
        })
    }

    /// Sets up training according to `adapter`: with [`AdapterSpec::Full`] every parameter is trainable; with
    /// LoRA every base parameter is frozen (`require_grad = false`, so backward computes no gradient for it) and
    /// a fresh LoRA branch is attached to each targeted projection.
    pub fn with_adapter(self, adapter: &AdapterSpec) -> Result<Self, ModelError> {
        let mut model = match adapter {
            AdapterSpec::Full => self.set_require_grad(true),
            AdapterSpec::Lora(cfg) => {
                check_lora_config(cfg)?;
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
                model
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
    Ok(())
}

impl Decoder {
    /// The last layer and the final norm at `rows`. The last layer's output is read only at the targets: every
    /// position still gives the keys and values its attention reads, but queries, the output projection and the
    /// MLP run at the target rows alone (worth it once at least an eighth of the positions are not targets:
    /// prompts, windowed mode).
    fn top_rows(
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

/// What [`Decoder`]'s recomputing forward pass keeps for its backward pass: every layer's input below the top
/// layer, and the top layer's input (the leaf its graph starts from).
struct Recomputed<'a> {
    model: &'a Decoder,
    ctx: AttnContext,
    input_ids: Tensor<2, Int>,
    inputs: Vec<Tensor<3>>,
    top: Tensor<3>,
    seeds: Option<Vec<u64>>,
}

impl Recompute for Recomputed<'_> {
    fn backward(self: Box<Self>, rows: Tensor<2>, grad: Tensor<2>, sink: &mut dyn GradSink) {
        let Recomputed {
            model,
            ctx,
            input_ids,
            inputs,
            top,
            seeds,
        } = *self;
        // d(sum(y * g))/dy = g: each piece's graph is entered with the gradient of its output.
        let mut grads = rows.mul(grad).sum().backward();
        let mut g = top.grad_remove(&mut grads);
        sink.graph(&mut grads);
        drop(grads);
        for (i, x) in inputs.into_iter().enumerate().rev() {
            let Some(gy) = g.take() else { return };
            if let Some(s) = &seeds {
                x.device().seed(s[i]);
            }
            let x = x.require_grad();
            let y = model.layers[i].forward(x.clone(), &ctx);
            let mut grads = y.mul(Tensor::from_inner(gy)).sum().backward();
            g = x.grad_remove(&mut grads);
            sink.graph(&mut grads);
        }
        // The embedding last (trainable only in full fine-tuning): the rows of its gradient the batch's tokens
        // select.
        let weight = &model.embed_tokens.weight;
        if let Some(gx) = g
            && weight.is_require_grad()
        {
            let [b, t, h] = gx.dims();
            let shape = [weight.val().dims()[0], h];
            // The untracked gradient as it came: a tracked tensor would push the accumulator off its host path.
            let rows = gx.reshape([b * t, h]);
            sink.rows(weight.id, input_ids.reshape([b * t]), rows, shape);
        }
    }
}

impl CausalLm for Decoder {
    fn hidden_states(&self, input: &ModelInput) -> Tensor<3> {
        let ctx = AttnContext::new(input, &self.inv_freq, self.spec.sliding_window, true);
        let mut x = self.embed_tokens.forward(input.input_ids.clone());
        for layer in &self.layers {
            x = layer.forward(x, &ctx);
        }
        self.norm.forward(x)
    }

    fn hidden_states_at(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Tensor<2> {
        let ctx = AttnContext::new(input, &self.inv_freq, self.spec.sliding_window, true);
        let mut x = self.embed_tokens.forward(input.input_ids.clone());
        let Some((last, body)) = self.layers.split_last() else {
            let [b, t, h] = x.dims();
            return self
                .norm
                .forward(x)
                .reshape([b * t, h])
                .select(0, rows.clone());
        };
        for layer in body {
            x = layer.forward(x, &ctx);
        }
        self.top_rows(last, x, &ctx, rows, host_rows)
    }

    fn hidden_states_at_recomputed(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Option<(Tensor<2>, Box<dyn Recompute + '_>)> {
        if !self.recompute || self.layers.len() < 2 {
            return None;
        }
        let device = input.input_ids.device();
        let seeds = self.dropout_seeds(&device);
        let reseed = |i: usize| {
            if let Some(s) = &seeds {
                device.seed(s[i]);
            }
        };
        let ctx = AttnContext::new(input, &self.inv_freq, self.spec.sliding_window, true);
        let (last, body) = self.layers.split_last()?;
        // Below the top layer: no graph at all (frozen copies of the layers on an untracked input), keeping only
        // each layer's input.
        let mut x = self
            .embed_tokens
            .clone()
            .no_grad()
            .forward(input.input_ids.clone());
        let mut inputs = Vec::with_capacity(body.len());
        for (i, layer) in body.iter().enumerate() {
            inputs.push(x.clone());
            reseed(i);
            x = layer.clone().no_grad().forward(x, &ctx).detach();
        }
        // The top layer and the final norm keep their graph, from the top layer's input as a leaf.
        let top = x.require_grad();
        reseed(body.len());
        let y = self.top_rows(last, top.clone(), &ctx, rows, host_rows);
        Some((
            y,
            Box::new(Recomputed {
                model: self,
                ctx,
                input_ids: input.input_ids.clone(),
                inputs,
                top,
                seeds,
            }),
        ))
    }

    fn lm_head(&self, hidden: Tensor<2>) -> Tensor<2> {
        hidden.matmul(self.head_weight())
    }

    fn vocab_size(&self) -> usize {
        self.spec.vocab_size
    }

    fn lm_head_weight(&self) -> Option<ytrainer_core::model::LmHeadWeight> {
        use ytrainer_core::lm_loss::HeadLayout;
        let (param, layout) = match &self.lm_head {
            Some(head) => (&head.weight, HeadLayout::HiddenMajor),
            None => (&self.embed_tokens.weight, HeadLayout::VocabMajor),
        };
        let weight = param.val();
        Some(ytrainer_core::model::LmHeadWeight {
            id: param.id,
            trainable: weight.is_require_grad(),
            weight,
            layout,
        })
    }

    fn adapters_disabled<R>(&self, f: impl FnOnce(&Self) -> R) -> Option<R> {
        if let Some(reference) = &self.reference {
            return Some(f(reference));
        }
        matches!(self.adapter, AdapterSpec::Lora(_))
            .then(|| crate::lora::without_adapters(|| f(self)))
    }

    fn export(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
        match &self.adapter {
            AdapterSpec::Lora(cfg) => {
                crate::save::save_peft_adapter(self, cfg, &self.base_model_name_or_path, dir)
            }
            AdapterSpec::Full => crate::save::save_hf_checkpoint(self, &self.config, dir),
        }
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSpec, HfConfig, init_random};

    /// The last layer computed at the target rows only gives the same hidden states and the same gradient for
    /// every parameter as the whole layer followed by a selection (Qwen2 and Qwen3, whose q/k norms it also
    /// covers; a packed batch with two segments).
    #[test]
    fn last_layer_at_target_rows_matches_the_full_layer() {
        let device = Device::flex().autodiff();
        for model_type in ["qwen2", "qwen3"] {
            let json = serde_json::json!({
                "model_type": model_type, "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": true,
            });
            let config = HfConfig::from_json_str(&json.to_string()).expect("config");
            let model = init_random(&config, 3, &AdapterSpec::Full, &device).expect("model");
            let (b, t) = (2, 20);
            let ids: Vec<i64> = (0..b * t).map(|i| (i * 7 % 61) as i64).collect();
            let pos: Vec<i64> = (0..b * t)
                .map(|i| (if i < 30 { i % t } else { i - 30 }) as i64)
                .collect();
            let seg: Vec<i64> = (0..b * t).map(|i| if i < 30 { 1 } else { 2 }).collect();
            let int =
                |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, t]), &device);
            let input = ModelInput {
                input_ids: int(ids),
                position_ids: int(pos),
                segment_ids: int(seg),
            };
            // Answer-like targets: the second half of each row, so the fast path applies.
            let host_rows: Vec<usize> = (0..b)
                .flat_map(|r| (11..t).map(move |i| r * t + i))
                .collect();
            let rows = Tensor::<1, Int>::from_data(
                TensorData::new(
                    host_rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                    [host_rows.len()],
                ),
                &device,
            );
            let up = Tensor::<2>::from_data(
                TensorData::new(
                    (0..host_rows.len() * 32)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                        .collect::<Vec<_>>(),
                    [host_rows.len(), 32],
                ),
                &device,
            );
            let got = model.hidden_states_at(&input, &rows, &host_rows);
            let want = model
                .hidden_states(&input)
                .reshape([b * t, 32])
                .select(0, rows.clone());
            let diff = got
                .clone()
                .sub(want.clone())
                .abs()
                .max()
                .into_scalar::<f32>();
            assert!(diff < 1e-5, "{model_type}: hidden states differ by {diff}");
            let g1 = got.mul(up.clone()).sum().backward();
            let g2 = want.mul(up).sum().backward();
            let mut checked = 0;
            for (name, p) in [
                ("embed", model.embed_tokens.weight.val()),
                ("l0.q", model.layers[0].self_attn.q_proj.weight.val()),
                ("l1.q", model.layers[1].self_attn.q_proj.weight.val()),
                ("l1.k", model.layers[1].self_attn.k_proj.weight.val()),
                ("l1.o", model.layers[1].self_attn.o_proj.weight.val()),
                ("l1.down", model.layers[1].mlp.down_proj.weight.val()),
            ] {
                let (a, r) = (p.grad(&g1).expect("grad"), p.grad(&g2).expect("grad"));
                let d = Tensor::<2>::from_inner(a)
                    .sub(Tensor::from_inner(r))
                    .abs()
                    .max()
                    .into_scalar::<f32>();
                assert!(d < 1e-4, "{model_type}: {name} gradient differs by {d}");
                checked += 1;
            }
            assert_eq!(checked, 6);
        }
    }
}
