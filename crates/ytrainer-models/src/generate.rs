//! Inference with a KV cache: the same modules and operations as the training forward ([`Decoder`]'s
//! layers, RMSNorm, rotate-half RoPE, grouped-KV attention, SwiGLU), but keys and values of past positions
//! are kept per layer so each new token costs one position, not the whole prefix. The training forward is not
//! touched.
//!
//! [`Generator`] runs one sequence (batch 1): [`Generator::prefill`] / [`Generator::step`] return the logits
//! of the last position; [`Sampler`] picks the next token (greedy, temperature, top-k, top-p, repetition
//! penalty).

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};

use crate::decoder::Decoder;
use crate::positions::Rope;

/// Per-layer keys and values after RoPE, `[1, kv_heads, T, head_dim]` (not yet expanded for GQA), and the token
/// ids they were computed from.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor<4>, Tensor<4>)>,
    len: usize,
    tokens: Vec<u32>,
}

impl KvCache {
    /// The token ids whose keys and values are cached, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Keeps the first `len` positions (a prefix stays valid: later positions never influence earlier ones).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            *self = KvCache::default();
            return;
        }
        for (k, v) in &mut self.layers {
            *k = k.clone().narrow(2, 0, len);
            *v = v.clone().narrow(2, 0, len);
        }
        self.len = len;
        self.tokens.truncate(len);
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Incremental decoding of one sequence with a [`KvCache`].
pub struct Generator<'a> {
    model: &'a Decoder,
    inv_freq: Vec<f32>,
    device: Device,
    pub cache: KvCache,
}

fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, n_rep, t, d])
        .reshape([b, kv * n_rep, t, d])
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Decoder) -> Self {
        Self {
            model,
            inv_freq: model.spec.inv_freq(),
            device: model.embed_tokens.weight.lazy_device(),
            cache: KvCache::default(),
        }
    }

    /// Forgets the cached prefix.
    pub fn reset(&mut self) {
        self.cache = KvCache::default();
    }

    /// Runs `ids` after the cached prefix and returns the logits `[vocab]` of the last one.
    pub fn prefill(&mut self, ids: &[u32]) -> Vec<f32> {
        assert!(!ids.is_empty(), "prefill needs at least one token");
        let hidden = self.forward(ids);
        let [_, n, h] = hidden.dims();
        let last = hidden.narrow(1, n - 1, 1).reshape([1, h]);
        let logits = ytrainer_core::model::CausalLm::lm_head(self.model, last);
        logits
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("float logits")
    }

    /// One token after the cached prefix; returns the next-token logits.
    pub fn step(&mut self, id: u32) -> Vec<f32> {
        self.prefill(&[id])
    }

    /// The next-token logits after the whole of `ids`, reusing the cache for the longest prefix it shares with
    /// what is cached (a chat's next turn re-renders the conversation: only the new part is computed). Returns
    /// the logits and how many positions were reused.
    pub fn prefill_reusing(&mut self, ids: &[u32]) -> (Vec<f32>, usize) {
        assert!(!ids.is_empty(), "prefill needs at least one token");
        let common = self
            .cache
            .tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last token is recomputed: its logits are the result.
        let keep = common.min(ids.len() - 1);
        self.cache.truncate(keep);
        (self.prefill(&ids[keep..]), keep)
    }

    /// Final hidden states `[1, n, hidden]` of `ids` placed after the cache, extending the cache.
    fn forward(&mut self, ids: &[u32]) -> Tensor<3> {
        let m = self.model;
        let (past, n) = (self.cache.len, ids.len());
        let total = past + n;
        let dev = &self.device;
        let ids_t = Tensor::<2, Int>::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, n]),
            dev,
        );
        let pos = Tensor::<2, Int>::from_data(
            TensorData::new((past..total).map(|p| p as i64).collect(), [1, n]),
            dev,
        );
        let rope = Rope::new(&pos, &self.inv_freq);
        // Query i (absolute past + i) sees key j iff j <= past + i (and within the sliding window).
        let bias = (n > 1 || m.spec.sliding_window.is_some()).then(|| {
            let mut mask = Vec::with_capacity(n * total);
            for i in 0..n {
                let q = past + i;
                for k in 0..total {
                    let visible = k <= q && m.spec.sliding_window.is_none_or(|w| q - k < w);
                    mask.push(if visible { 0.0f32 } else { -1.0e9 });
                }
            }
            Tensor::<4>::from_data(TensorData::new(mask, [1, 1, n, total]), dev)
        });
        let mut x = m.embed_tokens.forward(ids_t);
        let first = self.cache.layers.is_empty();
        for (li, layer) in m.layers.iter().enumerate() {
            let a = &layer.self_attn;
            let (h, kv, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
            let hn = layer.input_layernorm.forward(x.clone());
            let mut q = a.q_proj.forward(hn.clone()).reshape([1, n, h, d]);
            let mut k = a.k_proj.forward(hn.clone()).reshape([1, n, kv, d]);
            let v = a.v_proj.forward(hn).reshape([1, n, kv, d]);
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                q = qn.forward(q);
                k = kn.forward(k);
            }
            let q = rope.apply(q.swap_dims(1, 2));
            let k = rope.apply(k.swap_dims(1, 2));
            let v = v.swap_dims(1, 2);
            let (k_all, v_all) = if first {
                (k, v)
            } else {
                let (pk, pv) = &self.cache.layers[li];
                (
                    Tensor::cat(vec![pk.clone(), k], 2),
                    Tensor::cat(vec![pv.clone(), v], 2),
                )
            };
            let kr = repeat_kv(k_all.clone(), h / kv);
            let vr = repeat_kv(v_all.clone(), h / kv);
            if first {
                self.cache.layers.push((k_all, v_all));
            } else {
                self.cache.layers[li] = (k_all, v_all);
            }
            let mut scores = q
                .matmul(kr.swap_dims(2, 3))
                .mul_scalar(1.0 / (d as f64).sqrt());
            if let Some(b) = &bias {
                scores = scores + b.clone();
            }
            let out = softmax(scores, 3).matmul(vr);
            let attn = a.o_proj.forward(out.swap_dims(1, 2).reshape([1, n, h * d]));
            x = x + attn;
            let hn = layer.post_attention_layernorm.forward(x.clone());
            let mlp = &layer.mlp;
            let gate = silu(mlp.gate_proj.forward(hn.clone()));
            x = x.clone() + mlp.down_proj.forward(gate * mlp.up_proj.forward(hn));
        }
        self.cache.len = total;
        self.cache.tokens.extend_from_slice(ids);
        m.norm.forward(x)
    }
}

/// How the next token is chosen. `temperature == 0` (or `top_k == 1`) is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0 = all).
    pub top_p: f64,
    /// CTRL-style penalty on tokens already in the context (1.0 = none): positive logits are divided by it,
    /// negative ones multiplied, as transformers' `RepetitionPenaltyLogitsProcessor`.
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits on the host.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub options: SamplingOptions,
    rng: ytrainer_core::rng::SplitMix64,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Self {
        let rng = ytrainer_core::rng::SplitMix64::new(options.seed ^ ytrainer_core::rng::GOLDEN);
        Self { options, rng }
    }

    fn next_f64(&mut self) -> f64 {
        self.rng.next_f64()
    }

    /// The next token given the logits and the ids of the context so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let o = self.options.clone();
        let mut l: Vec<f32> = logits.to_vec();
        if o.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &id in context {
                if seen.insert(id)
                    && let Some(x) = l.get_mut(id as usize)
                {
                    *x = if *x > 0.0 {
                        *x / o.repetition_penalty as f32
                    } else {
                        *x * o.repetition_penalty as f32
                    };
                }
            }
        }
        let argmax = || {
            l.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                    if x > best.1 { (i, x) } else { best }
                })
                .0 as u32
        };
        if o.temperature <= 0.0 || o.top_k == 1 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        if o.top_k > 0 {
            idx.truncate(o.top_k);
        }
        let max = l[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i] as f64 - max) / o.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= o.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let mut r = self.next_f64();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return idx[i] as u32;
            }
            r -= p;
        }
        idx[probs.len() - 1] as u32
    }
}

/// Generates up to `max_new_tokens` after `prompt`, stopping after any id in `stop` (which is included in the
/// output). `on_token` sees each new id as soon as it is chosen (streaming). Returns the new ids.
pub fn generate(
    model: &Decoder,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampler: &mut Sampler,
    on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut g = Generator::new(model);
    generate_with(&mut g, prompt, max_new_tokens, stop, sampler, on_token)
}

/// [`generate`] on an existing [`Generator`], reusing its cache for the prefix `prompt` shares with it (chat
/// sessions keep one generator across turns).
pub fn generate_with(
    g: &mut Generator<'_>,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut out = Vec::new();
    if prompt.is_empty() || max_new_tokens == 0 {
        return out;
    }
    let mut context = prompt.to_vec();
    let (mut logits, _) = g.prefill_reusing(prompt);
    loop {
        let next = sampler.sample(&logits, &context);
        out.push(next);
        context.push(next);
        on_token(next);
        if stop.contains(&next) || out.len() >= max_new_tokens {
            return out;
        }
        logits = g.step(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSpec, HfConfig, init_random};

    fn tiny() -> Decoder {
        let json = r#"{"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": true}"#;
        let config = HfConfig::from_json_str(json).unwrap();
        init_random(&config, 3, &AdapterSpec::Full, &Device::flex()).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// A later turn reuses the cache for the shared prefix and gives the logits of a fresh pass over the whole.
    #[test]
    fn reusing_the_cache_equals_a_fresh_prefill() {
        let m = tiny();
        let turn1: Vec<u32> = vec![1, 5, 9, 13, 2, 40];
        let mut turn2 = turn1.clone();
        turn2.extend([7, 8, 30, 31]);
        let fresh = |ids: &[u32]| Generator::new(&m).prefill(ids);

        let mut g = Generator::new(&m);
        g.prefill(&turn1);
        let (logits, reused) = g.prefill_reusing(&turn2);
        assert_eq!(reused, turn1.len());
        assert!(max_diff(&logits, &fresh(&turn2)) < 1e-5);
        assert_eq!(g.cache.tokens(), &turn2[..]);

        // A prompt that diverges after 3 tokens keeps only those 3.
        let other: Vec<u32> = vec![1, 5, 9, 60, 61];
        let (logits, reused) = g.prefill_reusing(&other);
        assert_eq!(reused, 3);
        assert!(max_diff(&logits, &fresh(&other)) < 1e-5);
        assert_eq!(g.cache.len(), other.len());

        // The same prompt again: everything but the last token is reused.
        let (logits, reused) = g.prefill_reusing(&other);
        assert_eq!(reused, other.len() - 1);
        assert!(max_diff(&logits, &fresh(&other)) < 1e-5);
    }
}
