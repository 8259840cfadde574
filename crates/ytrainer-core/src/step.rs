//! The training step: one micro-batch in, per-token statistics and accumulated gradients out.
//!
//! Logits are computed only at positions that carry a target (the hidden state at `t - 1` predicts token `t`),
//! the plugin weights the detached per-token losses, and the micro-batch contributes `sum(w * ce)` to the
//! step's gradient. Normalisation happens once per optimizer step (in the trainer), over the whole accumulated
//! step, by scaling the summed gradients.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use ytrainer_data::MicroBatch;

use crate::lm_loss::HostLogits;
use crate::loss::{TokenReweighter, TokenStats, tensor_to_vec};
use crate::model::{CausalLm, ModelInput};
use crate::optim::GradAccumulator;

/// Counters of one micro-batch (or a whole step, once merged).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepCounters {
    /// Supervised tokens.
    pub tokens: usize,
    /// Tokens with `w * l != 0`.
    pub nonzero: f64,
    /// Sum of weights.
    pub weight_sum: f64,
    /// Sum of raw cross-entropy.
    pub ce_sum: f64,
    /// Sum of `w * ce`.
    pub weighted_sum: f64,
    /// Argmax predictions equal to the target.
    pub correct: usize,
    /// Tokens per zone `learned | learning | hard | noise`.
    pub zones: [usize; 4],
    /// Sum of predictive entropy (when computed).
    pub entropy_sum: Option<f64>,
    /// Tokens whose loss was NaN or infinite.
    pub nonfinite: usize,
}

impl StepCounters {
    /// Adds another micro-batch's counters.
    pub fn merge(&mut self, o: &StepCounters) {
        self.tokens += o.tokens;
        self.nonzero += o.nonzero;
        self.weight_sum += o.weight_sum;
        self.ce_sum += o.ce_sum;
        self.weighted_sum += o.weighted_sum;
        self.correct += o.correct;
        for (a, b) in self.zones.iter_mut().zip(o.zones) {
            *a += b;
        }
        self.entropy_sum = match (self.entropy_sum, o.entropy_sum) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.nonfinite += o.nonfinite;
    }

    /// Mean raw cross-entropy.
    pub fn mean_ce(&self) -> f64 {
        self.ce_sum / self.tokens.max(1) as f64
    }
}

impl crate::dist::Tally for StepCounters {
    fn to_sums(&self) -> Vec<f64> {
        let z = self.zones.map(|z| z as f64);
        vec![
            self.tokens as f64,
            self.nonzero,
            self.weight_sum,
            self.ce_sum,
            self.weighted_sum,
            self.correct as f64,
            z[0],
            z[1],
            z[2],
            z[3],
            f64::from(u8::from(self.entropy_sum.is_some())),
            self.entropy_sum.unwrap_or(0.0),
            self.nonfinite as f64,
        ]
    }

    fn set_sums(&mut self, v: &[f64]) {
        *self = StepCounters {
            tokens: v[0] as usize,
            nonzero: v[1],
            weight_sum: v[2],
            ce_sum: v[3],
            weighted_sum: v[4],
            correct: v[5] as usize,
            zones: [v[6] as usize, v[7] as usize, v[8] as usize, v[9] as usize],
            entropy_sum: (v[10] > 0.0).then_some(v[11]),
            nonfinite: v[12] as usize,
        };
    }
}

/// Zone of a loss value given the three borders (0 learned ... 3 noise; docs/losses.md, "Telemetry zones").
pub fn zone(l: f32, borders: &[f64; 3]) -> usize {
    let l = l as f64;
    if !l.is_finite() || l >= borders[2] {
        3
    } else if l <= borders[0] {
        0
    } else if l <= borders[1] {
        1
    } else {
        2
    }
}

/// Host-side batch converted to device tensors, plus the flat indices of the rows that predict targets.
pub struct DeviceBatch {
    /// Model input.
    pub input: ModelInput,
    /// Flat `[B*T]` index of the hidden state that predicts each target, in target order.
    pub rows: Tensor<1, Int>,
    /// The same indices on the host (ascending: targets are listed in row-major order).
    pub row_ids: Vec<usize>,
    /// Target ids, in the same order.
    pub targets: Tensor<1, Int>,
    /// Target ids on the host, in the same order.
    pub target_ids: Vec<usize>,
    /// Number of targets.
    pub n: usize,
    /// Position id of each target (host), in target order.
    pub positions: Vec<u32>,
    /// Example index of each target (host), in target order.
    pub samples: Vec<u32>,
    /// Data weight of each target (record and message `weight`s), in target order; `None` when all are 1.
    pub data_weights: Option<Vec<f32>>,
}

/// Moves a micro-batch to `device`, listing target positions in row-major order.
pub fn to_device(mb: &MicroBatch, device: &Device) -> DeviceBatch {
    let (b, t) = (mb.batch, mb.seq);
    let int2 = |v: &[u32]| -> Tensor<2, Int> {
        let data: Vec<i64> = v.iter().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(data, [b, t]), device)
    };
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut positions = Vec::new();
    let mut samples = Vec::new();
    let mut data_weights = Vec::new();
    for (p, &is_target) in mb.target_mask.iter().enumerate() {
        if is_target && p % t != 0 {
            data_weights.push(mb.weights.get(p));
            rows.push((p - 1) as i64);
            targets.push(mb.input_ids[p] as i64);
            positions.push(mb.position_ids.get(p).copied().unwrap_or(0));
            samples.push(mb.examples.get(p / t).copied().unwrap_or(0) as u32);
        }
    }
    let n = rows.len();
    let target_ids = targets.iter().map(|&t| t as usize).collect();
    let row_ids = rows.iter().map(|&r| r as usize).collect();
    DeviceBatch {
        input: ModelInput {
            input_ids: int2(&mb.input_ids),
            position_ids: int2(&mb.position_ids),
            segment_ids: int2(&mb.segment_ids),
        },
        rows: Tensor::from_data(TensorData::new(rows, [n]), device),
        row_ids,
        targets: Tensor::from_data(TensorData::new(targets, [n]), device),
        target_ids,
        n,
        positions,
        samples,
        data_weights: data_weights
            .iter()
            .any(|&w| w != 1.0)
            .then_some(data_weights),
    }
}

/// Per-target log-probabilities `[N, V]` of a batch (with gradient when the model has it).
pub fn target_log_probs<M: CausalLm>(model: &M, batch: &DeviceBatch) -> Tensor<2> {
    head_log_probs(model, target_hidden(model, batch))
}

/// Log-probabilities `[N, vocab]` of hidden rows `[N, hidden]` through the model's LM head, in f32 whatever the
/// model's precision (see `lm_loss::widen`).
pub fn head_log_probs<M: CausalLm>(model: &M, rows: Tensor<2>) -> Tensor<2> {
    log_softmax(crate::lm_loss::widen(model.lm_head(rows)), 1)
}

/// Final hidden states of the rows that predict the batch's targets, `[N, hidden]`, in target order (with the
/// model's graph: detach for inference).
pub fn target_hidden<M: CausalLm>(model: &M, batch: &DeviceBatch) -> Tensor<2> {
    model.hidden_states_at(&batch.input, &batch.rows, &batch.row_ids)
}

/// Forward-only CE (and entropy) and argmax per target through the model's head, at most ~16M logits live at a
/// time whatever the batch and vocabulary size; `None` when the head is not one weight matrix.
pub fn head_stats<M: CausalLm>(
    model: &M,
    batch: &DeviceBatch,
    need_entropy: bool,
) -> Option<crate::lm_loss::HeadStats> {
    let head = model.lm_head_weight()?;
    let rows = target_hidden(model, batch).detach().inner();
    let chunk = ((16usize << 20) / model.vocab_size().max(1)).max(1);
    Some(crate::lm_loss::head_forward(
        &rows,
        &head.weight.detach().inner(),
        head.layout,
        &batch.target_ids,
        need_entropy,
        chunk,
    ))
}

/// Per-target CE (host, target order) without a graph, through exactly the head path a training step takes
/// (fused and chunked on the CPU, `log_softmax` elsewhere), so that a reference computed with it equals the
/// step's own values bit for bit when the weights are equal (DPO's step 0: policy = reference, loss = ln 2).
pub fn target_ce_no_graph<M: CausalLm>(model: &M, batch: &DeviceBatch) -> Vec<f32> {
    if batch.n == 0 {
        return Vec::new();
    }
    let Some(head) = model.lm_head_weight() else {
        let lp = target_log_probs(model, batch).detach().inner();
        return tensor_to_vec(token_ce(lp, batch.targets.clone().inner()));
    };
    let rows = target_hidden(model, batch).detach().inner();
    let w = head.weight.detach().inner();
    match head_out_chunked(rows, &w, head.layout, &batch.target_ids, false, false, 0) {
        HeadOut::Host(host) => host.stats.iter().map(|s| s.ce).collect(),
        HeadOut::Chunked { stats, .. } => stats.iter().map(|s| s.ce).collect(),
        HeadOut::Tensor(lp) => tensor_to_vec(token_ce(lp, batch.targets.clone().inner())),
    }
}

/// Per-token cross-entropy `[N]` from log-probabilities.
pub fn token_ce(log_probs: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let n = targets.dims()[0];
    log_probs
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
        .neg()
}

/// What a step needs to know besides the batch.
#[derive(Debug, Clone, Copy)]
pub struct StepContext {
    /// Optimizer step (0-based).
    pub step: usize,
    /// Progress in `[0, 1]`.
    pub progress: f64,
    /// Zone borders for telemetry.
    pub zone_borders: [f64; 3],
}

/// Why a micro-batch could not contribute.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// The plugin returned something unusable.
    #[error("loss plugin returned {what} for token {index}: weights must be finite and >= 0")]
    BadWeight {
        /// `NaN`, `a negative weight`, ...
        what: String,
        /// Position among the micro-batch's targets.
        index: usize,
    },
    /// The plugin failed (an external plugin's error or panic; the message names the plugin).
    #[error("{0}")]
    Plugin(String),
    /// The plugin needs reference-model losses and the model cannot provide them.
    #[error(
        "the loss plugin needs reference-model losses, which come from the base model with its adapters disabled; \
         this model has no adapters: train with LoRA (`--adapter lora`), name a reference model with \
         `[loss] reference_model = \"path\"`, or choose another loss"
    )]
    NoReference,
}

/// Forward + weighted loss + backward for one micro-batch; gradients of `sum(w * ce)` go into `acc`.
/// Returns the counters. A micro-batch with a non-finite loss contributes no gradient (the caller skips the
/// whole step: NaN must never reach the optimizer).
pub fn train_micro_batch<M: CausalLm>(
    model: &M,
    mb: &MicroBatch,
    plugin: &dyn TokenReweighter,
    ctx: StepContext,
    acc: &mut GradAccumulator,
    device: &Device,
) -> Result<StepCounters, StepError> {
    let weigh = &mut |s: &TokenStats| plugin.try_weights(s).map_err(StepError::Plugin);
    let how = Weighing {
        needs: plugin.needs(),
        anchor: plugin.kl_anchor(),
        signed: false,
    };
    train_micro_batch_with(model, mb, how, weigh, ctx, acc, device)
}

/// How [`train_micro_batch_with`] asks for its token weights.
pub(crate) struct Weighing {
    /// The statistics the weights read besides the loss.
    pub needs: crate::loss::Needs,
    /// The KL anchor's weight (0 = none).
    pub anchor: f64,
    /// Whether weights may be negative: a sequence objective's per-token gradient (DPO pushes the rejected
    /// completion's tokens down) is a signed weight on the same fused head backward; a plugin's weight never is.
    pub signed: bool,
}

/// [`train_micro_batch`] with the weights from any function of the token statistics: the one fused, chunked
/// LM-head path serves token plugins and, through per-token gradients, the preference objectives.
pub(crate) fn train_micro_batch_with<M: CausalLm>(
    model: &M,
    mb: &MicroBatch,
    how: Weighing,
    weigh: &mut dyn FnMut(&TokenStats) -> Result<Tensor<1>, StepError>,
    ctx: StepContext,
    acc: &mut GradAccumulator,
    device: &Device,
) -> Result<StepCounters, StepError> {
    let batch = to_device(mb, device);
    if batch.n == 0 {
        return Ok(StepCounters::default());
    }
    // The LM head + CE run outside the autodiff graph when the model exposes its head weight (closed-form
    // gradient, see `lm_loss`); otherwise autodiff differentiates through `log_softmax`.
    let t_start = std::time::Instant::now();
    let mut t_head = t_start;
    let needs = how.needs;
    // ASFT's KL anchor: the reference's log-probabilities at the target rows (f32, no graph).
    let anchor = how.anchor;
    let ref_lp: Option<Tensor<2>> = if anchor > 0.0 {
        Some(
            model
                .adapters_disabled(|m| target_log_probs(m, &batch).detach().inner())
                .ok_or(StepError::NoReference)?,
        )
    } else {
        None
    };
    // The float type of the model's tensors (and of every tensor made from host values on this device).
    let model_dtype: burn::tensor::DType = device.settings().float_dtype.into();
    let (graph, head_out) = match model.lm_head_weight() {
        Some(head) => {
            let (rows, recompute) = match model.hidden_states_at_recomputed(
                &batch.input,
                &batch.rows,
                &batch.row_ids,
            ) {
                Some((rows, recompute)) => (rows, Some(recompute)),
                None => (target_hidden(model, &batch), None),
            };
            // Flex computes eagerly, so reading a scalar here is a real phase boundary for the profile.
            if profiling() {
                let _ = rows
                    .clone()
                    .inner()
                    .slice([0..1, 0..1])
                    .into_scalar::<f32>();
                record(0, t_start);
                t_head = std::time::Instant::now();
            }
            let w = head.weight.clone().detach().inner();
            // Only the top-k entropy reads the logits after their statistics; otherwise the buffer may hold the
            // softmax numerators the gradient is made from.
            let out = head_out_chunked(
                rows.clone().detach().inner(),
                &w,
                head.layout,
                &batch.target_ids,
                needs.entropy,
                needs.top_k_entropy > 0 || ref_lp.is_some(),
                needs.top_k_entropy,
            );
            (
                Graph::Fused {
                    rows,
                    head,
                    w,
                    recompute,
                },
                out,
            )
        }
        None => {
            let log_probs = target_log_probs(model, &batch);
            let lp = log_probs.clone().detach().inner();
            let anchor_lp = ref_lp.is_some().then(|| log_probs.clone());
            let ce = token_ce(log_probs, batch.targets.clone());
            (Graph::Autodiff { ce, anchor_lp }, HeadOut::Tensor(lp))
        }
    };
    // CE, entropy and argmax from the host statistics when the logits are on the CPU, else from log-probs.
    let from_stats = |stats: &[ytrainer_kernels::cpu::RowStats]| {
        let ce: Vec<f32> = stats.iter().map(|s| s.ce).collect();
        let entropy = needs.entropy.then(|| {
            let e: Vec<f32> = stats.iter().map(|s| s.entropy).collect();
            Tensor::<1>::from_data(TensorData::new(e, [batch.n]), &device.clone().inner())
        });
        let correct = stats
            .iter()
            .zip(&batch.target_ids)
            .filter(|(s, t)| s.argmax as usize == **t)
            .count();
        (ce, entropy, correct)
    };
    let (ce_host, entropy, correct) = match &head_out {
        HeadOut::Host(host) => from_stats(&host.stats),
        HeadOut::Chunked { stats, .. } => from_stats(stats),
        HeadOut::Tensor(lp) => {
            let ce = tensor_to_vec(token_ce(lp.clone(), batch.targets.clone().inner()));
            // Back in the model's float type: the plugin combines it with tensors made in that type.
            let entropy = needs
                .entropy
                .then(|| crate::lm_loss::narrow(entropy(lp.clone()), model_dtype));
            let pred = lp.clone().argmax(1).reshape([batch.n]);
            let correct = count_true(pred.equal(batch.targets.clone().inner()));
            (ce, entropy, correct)
        }
    };
    let top_k_entropy = (needs.top_k_entropy > 0).then(|| match &head_out {
        HeadOut::Host(host) => top_k_entropy(host.log_probs(), needs.top_k_entropy),
        HeadOut::Chunked { top_k_entropy, .. } => top_k_entropy
            .clone()
            .expect("asked for in head_out_chunked"),
        HeadOut::Tensor(lp) => {
            crate::lm_loss::narrow(top_k_entropy(lp.clone(), needs.top_k_entropy), model_dtype)
        }
    });
    let reference_loss = if needs.reference_loss {
        let r = model
            .adapters_disabled(|m| {
                let lp = target_log_probs(m, &batch).detach().inner();
                crate::lm_loss::narrow(token_ce(lp, batch.targets.clone().inner()), model_dtype)
            })
            .ok_or(StepError::NoReference)?;
        Some(r)
    } else {
        None
    };

    let mut counters = StepCounters {
        tokens: batch.n,
        correct,
        entropy_sum: entropy
            .clone()
            .map(|e| tensor_to_vec(e).iter().map(|&x| x as f64).sum()),
        ..Default::default()
    };
    for &l in &ce_host {
        counters.zones[zone(l, &ctx.zone_borders)] += 1;
        if !l.is_finite() {
            counters.nonfinite += 1;
        }
    }
    if counters.nonfinite > 0 {
        counters.ce_sum = f64::NAN;
        return Ok(counters);
    }
    counters.ce_sum = ce_host.iter().map(|&x| x as f64).sum();
    // The anchor's value, `beta * sum_i KL_i`, joins the weighted sum (the logged loss); a chunked head has no
    // log-probabilities yet: its chunks add theirs in the backward pass below.
    if let Some(r) = &ref_lp {
        let lp = match &head_out {
            HeadOut::Host(host) => Some(crate::lm_loss::widen(host.log_probs())),
            HeadOut::Tensor(lp) => Some(lp.clone()),
            HeadOut::Chunked { .. } => None,
        };
        if let Some(lp) = lp {
            counters.weighted_sum += anchor * kl_from_reference(r.clone(), lp);
        }
    }

    let stats = TokenStats {
        loss: Tensor::from_data(TensorData::new(ce_host.clone(), [batch.n]), device),
        entropy,
        top_k_entropy,
        reference_loss,
        position: needs.position.then(|| batch.positions.clone()),
        sample: needs.sample.then(|| batch.samples.clone()),
        step: ctx.step,
        progress: ctx.progress,
    };
    let w = weigh(&stats)?;
    let mut w_host = tensor_to_vec(w.clone());
    if w_host.len() != batch.n {
        return Err(StepError::BadWeight {
            what: format!("{} weights for {} tokens", w_host.len(), batch.n),
            index: 0,
        });
    }
    // The data's weights (record and message `weight`) multiply the plugin's; every counter below, and so every
    // normaliser, sees the product. A message of weight 0 never gets here: its tokens are not targets.
    let w = match &batch.data_weights {
        Some(d) => {
            for (a, b) in w_host.iter_mut().zip(d) {
                *a *= b;
            }
            let dev = w.device();
            w.mul(Tensor::from_data(
                TensorData::new(d.clone(), [batch.n]),
                &dev,
            ))
        }
        None => w,
    };
    for (i, (&wi, &li)) in w_host.iter().zip(&ce_host).enumerate() {
        if !wi.is_finite() || (wi < 0.0 && !how.signed) {
            let what = if wi.is_nan() {
                "NaN".to_string()
            } else {
                format!("weight {wi}")
            };
            return Err(StepError::BadWeight { what, index: i });
        }
        counters.weight_sum += wi as f64;
        counters.weighted_sum += (wi * li) as f64;
        if wi * li != 0.0 {
            counters.nonzero += 1.0;
        }
    }
    let w = w.detach().inner();
    // With the anchor, the logits' gradient is `(w + beta) (p - onehot) - beta (p_ref - onehot)`
    // `= w (p - onehot) + beta (p - p_ref)`.
    let w_grad: Vec<f32> = w_host.iter().map(|&x| x + anchor as f32).collect();
    let anchor_grad = |range: std::ops::Range<usize>| -> Option<Tensor<2>> {
        let r = ref_lp.as_ref()?.clone().slice(range.clone());
        let n = range.len();
        let t = batch.targets.clone().inner().slice(range);
        let b = Tensor::<1>::from_data(
            TensorData::new(vec![anchor as f32; n], [n]),
            (&r.device(), burn::tensor::DType::F32),
        );
        Some(crate::lm_loss::ce_grad_from_log_probs(r, t, b))
    };
    let minus_anchor = |g: Tensor<2>, range: std::ops::Range<usize>| match anchor_grad(range) {
        Some(a) => crate::lm_loss::narrow(crate::lm_loss::widen(g).sub(a), model_dtype),
        None => g,
    };
    if profiling() {
        record(1, t_head);
    }
    let t_back = std::time::Instant::now();
    match graph {
        Graph::Autodiff { ce, anchor_lp } => {
            let mut loss = ce.mul(Tensor::from_inner(crate::lm_loss::widen(w))).sum();
            if let (Some(lp), Some(r)) = (anchor_lp, &ref_lp) {
                // KL(p_ref || p) = sum_v p_ref (log p_ref - log p), differentiated through `log p`.
                let r = Tensor::from_inner(r.clone());
                let kl = r.clone().exp().mul(r.sub(lp)).sum();
                loss = loss.add(kl.mul_scalar(anchor));
            }
            let mut grads = loss.backward();
            acc.accumulate(model, &mut grads);
        }
        Graph::Fused {
            rows,
            head,
            w: head_w,
            recompute,
        } => {
            let plain_rows = rows.clone().detach().inner();
            // Back through the head from a logits gradient: `dh` for the body; the head's weight gradient first
            // (a tied embedding's input-side rows are then added into it in place).
            let mut head_back = |g: Tensor<2>, part: Tensor<2>| {
                let (dh, dw) =
                    crate::lm_loss::head_grads(g, part, &head_w, head.layout, head.trainable);
                if let Some(dw) = dw {
                    acc.add(head.id, dw);
                }
                dh
            };
            let dh = match head_out {
                HeadOut::Chunked { chunk, .. } => {
                    // Chunk by chunk: the logits again, their gradient in place, and back through the head.
                    let mut dhs = Vec::new();
                    let mut start = 0;
                    while start < batch.n {
                        let end = (start + chunk).min(batch.n);
                        let part = plain_rows.clone().slice(start..end);
                        let z = crate::lm_loss::logits(part.clone(), &head_w, head.layout);
                        let ids = &batch.target_ids[start..end];
                        let host = if ref_lp.is_some() {
                            HostLogits::try_new(z, ids, false)
                        } else {
                            HostLogits::try_new_for_grad(z, ids, false)
                        };
                        let Ok(host) = host else {
                            unreachable!("the forward pass ran these chunks on the CPU backend")
                        };
                        if let Some(r) = &ref_lp {
                            counters.weighted_sum += anchor
                                * kl_from_reference(
                                    r.clone().slice(start..end),
                                    crate::lm_loss::widen(host.log_probs()),
                                );
                        }
                        let g = minus_anchor(host.into_grad(&w_grad[start..end]), start..end);
                        dhs.push(head_back(g, part));
                        start = end;
                    }
                    Tensor::cat(dhs, 0)
                }
                HeadOut::Host(host) => head_back(
                    minus_anchor(host.into_grad(&w_grad), 0..batch.n),
                    plain_rows,
                ),
                HeadOut::Tensor(lp) => head_back(
                    minus_anchor(
                        crate::lm_loss::narrow(
                            crate::lm_loss::ce_grad_from_log_probs(
                                lp,
                                batch.targets.clone().inner(),
                                crate::lm_loss::widen(w).add_scalar(anchor),
                            ),
                            model_dtype,
                        ),
                        0..batch.n,
                    ),
                    plain_rows,
                ),
            };
            match recompute {
                Some(recompute) => recompute.backward(
                    rows,
                    Tensor::from_inner(dh),
                    &mut AccumulatorSink { acc, model },
                ),
                None => {
                    // d(sum(rows * dh))/d(rows) = dh: injects the head's gradient into the body's graph.
                    let mut grads = rows.mul(Tensor::from_inner(dh)).sum().backward();
                    acc.accumulate(model, &mut grads);
                }
            }
        }
    }
    if profiling() {
        record(2, t_back);
        record(3, t_start);
    }
    Ok(counters)
}

std::thread_local! {
    static PHASES: std::cell::RefCell<Option<[f64; 4]>> = const { std::cell::RefCell::new(None) };
}

fn profiling() -> bool {
    PHASES.with(|p| p.borrow().is_some())
}

fn record(phase: usize, since: std::time::Instant) {
    PHASES.with(|p| {
        if let Some(t) = p.borrow_mut().as_mut() {
            t[phase] += since.elapsed().as_secs_f64();
        }
    });
}

/// Starts (or resets) per-phase timing of [`train_micro_batch`] on this thread (`ytrainer bench --profile`).
pub fn profile_start() {
    PHASES.with(|p| *p.borrow_mut() = Some([0.0; 4]));
}

/// Seconds spent so far in `[body forward, LM head + CE + plugin, backward, whole micro-batch]`.
pub fn profile_read() -> [f64; 4] {
    PHASES.with(|p| p.borrow().unwrap_or([0.0; 4]))
}

/// The head's output at a batch's target rows: host statistics and logits where the fused CPU kernels run,
/// log-probabilities elsewhere (other backends, `YTRAINER_FUSED=0`, a model whose head autodiff differentiates).
pub enum HeadOut {
    /// Per-row CE / entropy / argmax and the logits (or the softmax numerators) in a host buffer.
    Host(HostLogits),
    /// Per-row statistics of a head run [`HEAD_CHUNK_FLOATS`] logits at a time (a micro-batch whose logits would
    /// be larger); the backward pass recomputes each chunk's logits, so no `[N, vocab]` buffer ever exists.
    Chunked {
        stats: Vec<ytrainer_kernels::cpu::RowStats>,
        /// The top-k entropy per row, when the plugin asks for it.
        top_k_entropy: Option<Tensor<1>>,
        /// Rows per chunk.
        chunk: usize,
    },
    /// Log-probabilities `[N, vocab]`, in f32.
    Tensor(Tensor<2>),
}

/// The one place that decides between the fast CPU head and the tensor path, for training and for `score`:
/// logits of `rows` (plain tensors, no graph) through the head weight `w`, then host statistics when the logits
/// live on the CPU, else `log_softmax` in f32. `keep_logits` keeps the logits readable after the statistics
/// (top-k entropy, ranks); without it the buffer may be overwritten with the gradient's softmax numerators.
pub fn head_out(
    rows: burn::tensor::Tensor<2>,
    w: &burn::tensor::Tensor<2>,
    layout: crate::model::HeadLayout,
    target_ids: &[usize],
    entropy: bool,
    keep_logits: bool,
) -> HeadOut {
    let z = crate::lm_loss::logits(rows, w, layout);
    let host = if keep_logits {
        HostLogits::try_new(z, target_ids, entropy)
    } else {
        HostLogits::try_new_for_grad(z, target_ids, entropy)
    };
    match host {
        Ok(host) => HeadOut::Host(host),
        Err(z) => HeadOut::Tensor(log_softmax(crate::lm_loss::widen(z), 1)),
    }
}

/// Logits (floats) the training head holds at once: above this, a micro-batch's head runs in row chunks (one more
/// head GEMM per chunk in the backward pass, about 5% of a SmolLM2 step, instead of `N x vocab x 4` bytes).
pub const HEAD_CHUNK_FLOATS: usize = 16 << 20;

std::thread_local! {
    static HEAD_CHUNK: std::cell::Cell<usize> = const { std::cell::Cell::new(HEAD_CHUNK_FLOATS) };
}

/// Runs `f` with the head chunked at `floats` logits on this thread (tests compare chunkings on a tiny
/// vocabulary; the default is [`HEAD_CHUNK_FLOATS`]).
pub fn with_head_chunk_floats<R>(floats: usize, f: impl FnOnce() -> R) -> R {
    let old = HEAD_CHUNK.with(|c| c.replace(floats.max(1)));
    let r = f();
    HEAD_CHUNK.with(|c| c.set(old));
    r
}

/// [`head_out`] for training: when the rows' logits exceed [`HEAD_CHUNK_FLOATS`] and live on the CPU, only
/// their statistics are kept ([`HeadOut::Chunked`]); `top_k` > 0 computes the top-k entropy per chunk.
pub fn head_out_chunked(
    rows: burn::tensor::Tensor<2>,
    w: &burn::tensor::Tensor<2>,
    layout: crate::model::HeadLayout,
    target_ids: &[usize],
    entropy: bool,
    keep_logits: bool,
    top_k: usize,
) -> HeadOut {
    let n = target_ids.len();
    let vocab = match layout {
        crate::model::HeadLayout::VocabMajor => w.dims()[0],
        crate::model::HeadLayout::HiddenMajor => w.dims()[1],
    };
    let chunk = (HEAD_CHUNK.with(|c| c.get()) / vocab.max(1)).max(1);
    if n > chunk {
        let mut stats = Vec::with_capacity(n);
        let mut top = Vec::new();
        let on_host =
            crate::lm_loss::host_chunks(&rows, w, layout, target_ids, entropy, chunk, |_, host| {
                if top_k > 0 {
                    top.push(top_k_entropy(host.log_probs(), top_k));
                }
                stats.extend_from_slice(&host.stats);
            });
        // Not the CPU backend: the tensor path below, whole.
        if on_host {
            return HeadOut::Chunked {
                stats,
                top_k_entropy: (top_k > 0).then(|| Tensor::cat(top, 0)),
                chunk,
            };
        }
    }
    head_out(rows, w, layout, target_ids, entropy, keep_logits)
}

/// Moves the gradients of a recomputing backward pass into the step's accumulator as they are made.
pub(crate) struct AccumulatorSink<'a, M> {
    pub(crate) acc: &'a mut GradAccumulator,
    pub(crate) model: &'a M,
}

impl<M: CausalLm> crate::model::GradSink for AccumulatorSink<'_, M> {
    fn graph(&mut self, grads: &mut burn::tensor::Gradients) {
        self.acc.accumulate(self.model, grads);
    }

    fn rows(
        &mut self,
        id: burn::module::ParamId,
        ids: Tensor<1, Int>,
        rows: Tensor<2>,
        shape: [usize; 2],
    ) {
        self.acc.add_rows(id, ids, rows, shape);
    }
}

/// How the loss's gradient reaches the model.
// One value per micro-batch: its size is irrelevant next to the tensors it points to.
#[allow(clippy::large_enum_variant)]
enum Graph<'m> {
    /// Autodiff through the head and `log_softmax`: per-token CE with gradient.
    Autodiff {
        ce: Tensor<1>,
        /// The log-probabilities with their graph, kept when the plugin asks for a KL anchor.
        anchor_lp: Option<Tensor<2>>,
    },
    /// Closed-form head gradient injected at the hidden rows.
    Fused {
        rows: Tensor<2>,
        head: crate::model::LmHeadWeight,
        w: Tensor<2>,
        /// The backward half of a forward pass with activation recomputation, when the model runs one.
        recompute: Option<Box<dyn crate::model::Recompute + 'm>>,
    },
}

/// `sum_i KL(p_ref(.|i) || p(.|i)) = sum_i sum_v p_ref (log p_ref - log p)` over the rows of two `[N, vocab]` f32
/// log-probability tensors (no graph).
pub fn kl_from_reference(ref_lp: Tensor<2>, lp: Tensor<2>) -> f64 {
    let kl = ref_lp.clone().exp().mul(ref_lp.sub(lp)).sum();
    f64::from(kl.into_scalar::<f32>())
}

/// Forward only: counters of one micro-batch under plain CE (evaluation).
pub fn eval_micro_batch<M: CausalLm>(
    model: &M,
    mb: &MicroBatch,
    zone_borders: [f64; 3],
    device: &Device,
) -> StepCounters {
    let batch = to_device(mb, device);
    if batch.n == 0 {
        return StepCounters::default();
    }
    let (ce, pred) = match head_stats(model, &batch, false) {
        Some(stats) => (stats.ce, stats.argmax),
        None => {
            let lp = target_log_probs(model, &batch).detach().inner();
            let ce = tensor_to_vec(token_ce(lp.clone(), batch.targets.clone().inner()));
            let pred = lp
                .argmax(1)
                .reshape([batch.n])
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .unwrap_or_default();
            (ce, pred)
        }
    };
    let correct = pred
        .iter()
        .zip(&batch.target_ids)
        .filter(|&(&a, &b)| a == b as i64)
        .count();
    let mut c = StepCounters {
        tokens: batch.n,
        correct,
        ce_sum: ce.iter().map(|&x| x as f64).sum(),
        weighted_sum: 0.0,
        ..Default::default()
    };
    for &l in &ce {
        c.zones[zone(l, &zone_borders)] += 1;
        if !l.is_finite() {
            c.nonfinite += 1;
        }
    }
    c
}

/// Predictive entropy `H = -sum_v p_v log p_v` per row of log-probabilities.
pub fn entropy(log_probs: Tensor<2>) -> Tensor<1> {
    let n = log_probs.dims()[0];
    let p = log_probs.clone().exp();
    p.mul(log_probs).sum_dim(1).reshape([n]).neg()
}

/// Entropy of the top-`k` distribution of each row, renormalised over those `k` tokens and divided by `ln k`,
/// so it lies in [0, 1]: 0 = all mass on one token, 1 = the top `k` equally likely. `k` is capped at the
/// vocabulary size; `k <= 1` gives zeros.
pub fn top_k_entropy(log_probs: Tensor<2>, k: usize) -> Tensor<1> {
    let [n, v] = log_probs.dims();
    let k = k.min(v);
    if k <= 1 {
        return Tensor::zeros([n], &log_probs.device());
    }
    let top = log_probs.topk(k, 1);
    // Renormalise in log space: log q = lp - logsumexp(lp).
    let lq = log_softmax(top, 1);
    let h = lq.clone().exp().mul(lq).sum_dim(1).reshape([n]).neg();
    h.div_scalar((k as f64).ln()).clamp(0.0, 1.0)
}

fn count_true(t: Tensor<1, Bool>) -> usize {
    let v: i64 = t.int().sum().into_scalar::<i64>();
    v as usize
}
