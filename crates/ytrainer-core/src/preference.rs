//! Preference training (the DPO family): sequence log-probabilities of both sides of each pair from one forward
//! pass, the reference model's from the same base with adapters disabled (or precomputed), a pairwise plugin
//! turning them into per-pair losses, and the same optimizer, checkpoints and metrics channel as SFT.

use std::path::PathBuf;

use burn::prelude::*;
use serde::Serialize;
use ytrainer_data::{Example, MicroBatch, PairExample};

use crate::dist::{Shard, Tally};
use crate::loss::{PairStats, PairwiseObjective, tensor_to_vec};
use crate::model::CausalLm;
use crate::observe::{Observer, Progress};
use crate::optim::GradAccumulator;
use crate::step::{head_log_probs, target_log_probs, to_device, token_ce};
use crate::trainer::{
    Accumulated, EvalLine, LoopSetup, Objective, StepAt, StepLine, StepOutcome, TrainError,
};

/// Where reference log-probabilities come from.
#[derive(Debug, Clone)]
pub enum Reference {
    /// The policy itself with every LoRA `B` zeroed, i.e. the base model (no second copy of the weights).
    AdaptersDisabled,
    /// Computed once before training (`(chosen, rejected)` per pair, in pair order).
    Precomputed(Vec<(f32, f32)>),
    /// The objective needs no reference.
    None,
}

/// Everything a preference run needs besides the model: the loop's settings and the objective's own.
pub struct PrefSetup<'a> {
    /// Optimisation (epochs, max_steps, seed, shuffle too), run directory, checkpoints, resume and device.
    pub run: LoopSetup<'a>,
    /// Training pairs.
    pub pairs: &'a [PairExample],
    /// Evaluation pairs (may be empty).
    pub eval_pairs: &'a [PairExample],
    /// Reference log-probs of `eval_pairs` when `reference` is precomputed.
    pub eval_reference: Option<Vec<(f32, f32)>>,
    /// The objective.
    pub objective: &'a dyn PairwiseObjective,
    /// Beta used for the reported implicit rewards.
    pub beta: f64,
    /// Reference source.
    pub reference: Reference,
    /// Pairs per optimizer step.
    pub pairs_per_step: usize,
    /// Pairs per micro-batch (memory bound; each pair is two rows).
    pub micro_pairs: usize,
    /// Weight of the SFT (NLL) term on the chosen completions.
    pub sft_weight: f64,
    /// Use length-averaged log-probs instead of sums.
    pub average_log_prob: bool,
    /// Pad token.
    pub pad_id: u32,
}

/// One line of `metrics.jsonl` for preference training (TRL's metric names).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrefMetrics {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Weighted mean pair loss (+ SFT term).
    pub loss: f64,
    /// Mean `beta * (pc - rc)`.
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    /// Mean `beta * (pr - rr)`.
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    /// Fraction of pairs with chosen reward > rejected reward.
    #[serde(rename = "rewards/accuracy")]
    pub rewards_accuracy: f64,
    /// Mean reward margin.
    #[serde(rename = "rewards/margin")]
    pub rewards_margin: f64,
    /// Mean policy log-prob of the chosen completions.
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    /// Mean policy log-prob of the rejected completions.
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    /// Mean pair weight (data weight x plugin weight).
    pub pair_weight: f64,
    /// Learning rate.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Pairs in the step.
    pub pairs: usize,
    /// Completion tokens per second.
    pub tokens_per_s: f64,
    /// Whether the update was skipped (non-finite values).
    pub skipped: bool,
}

/// Preference evaluation.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PrefEval {
    /// Step.
    pub step: usize,
    /// Mean pair loss.
    pub eval_loss: f64,
    /// Reward accuracy.
    #[serde(rename = "eval_rewards/accuracy")]
    pub accuracy: f64,
    /// Mean reward margin.
    #[serde(rename = "eval_rewards/margin")]
    pub margin: f64,
    /// Pairs evaluated.
    pub eval_pairs: usize,
}

/// Summary of a preference run.
#[derive(Debug, Clone, Serialize)]
pub struct PrefSummary {
    /// Steps done.
    pub steps: usize,
    /// Steps skipped.
    pub skipped_steps: usize,
    /// Eval before (absent on resume).
    pub eval_before: Option<PrefEval>,
    /// Eval after.
    pub eval_after: Option<PrefEval>,
    /// Last checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Seconds.
    pub seconds: f64,
    /// The best evaluation during training (`[eval] metric_for_best_model`) and its checkpoint, if written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best: Option<crate::checkpoint::BestSoFar>,
    /// The step after which early stopping ended the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early_at: Option<usize>,
    /// Whether the model handed back (and exported) is the best checkpoint's (`load_best_model_at_end`).
    pub loaded_best: bool,
}

/// Rows `[chosen_0..chosen_P, rejected_0..rejected_P]`, right-padded.
pub fn pair_batch(pairs: &[&PairExample], pad_id: u32) -> MicroBatch {
    let rows: Vec<&Example> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let seq = rows
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let b = rows.len();
    let mut mb = MicroBatch {
        batch: b,
        seq,
        input_ids: vec![pad_id; b * seq],
        position_ids: vec![0; b * seq],
        segment_ids: vec![0; b * seq],
        target_mask: vec![false; b * seq],
        examples: (0..b).collect(),
        weights: Default::default(),
    };
    for (r, e) in rows.iter().enumerate() {
        let o = r * seq;
        let n = e.input_ids.len();
        mb.input_ids[o..o + n].copy_from_slice(&e.input_ids);
        mb.position_ids[o..o + n].copy_from_slice(&e.position_ids);
        mb.segment_ids[o..o + n].copy_from_slice(&e.segment_ids);
        mb.target_mask[o..o + n].copy_from_slice(&e.targets);
    }
    mb
}

/// Per-row sums of target log-probabilities `[rows]` (with gradient when the model has it), the per-row target
/// counts, and the per-target log-probs `[N]`.
pub fn sequence_log_probs<M: CausalLm>(
    model: &M,
    mb: &MicroBatch,
    device: &Device,
) -> (Tensor<1>, Vec<usize>, Tensor<1>) {
    let (sums, counts, lp, _) = sequence_log_probs_for_training(model, mb, device, false);
    (sums, counts, lp)
}

/// The policy's side of a training step: a model trained with gradient checkpointing runs its recomputing
/// forward pass, and the log-probs' graph then starts from its hidden rows as a leaf ([`Checkpointed`]).
fn sequence_log_probs_for_training<'m, M: CausalLm>(
    model: &'m M,
    mb: &MicroBatch,
    device: &Device,
    train: bool,
) -> (Tensor<1>, Vec<usize>, Tensor<1>, Option<Checkpointed<'m>>) {
    let batch = to_device(mb, device);
    let mut counts = vec![0usize; mb.batch];
    let mut onehot = vec![0f32; mb.batch * batch.n];
    let mut j = 0;
    for (p, &t) in mb.target_mask.iter().enumerate() {
        if t && p % mb.seq != 0 {
            let row = p / mb.seq;
            counts[row] += 1;
            onehot[row * batch.n + j] = 1.0;
            j += 1;
        }
    }
    let recomputed = train
        .then(|| model.hidden_states_at_recomputed(&batch.input, &batch.rows, &batch.row_ids))
        .flatten();
    let (log_probs, checkpointed) = match recomputed {
        Some((rows, recompute)) => {
            let leaf = rows.clone().detach().require_grad();
            let lp = head_log_probs(model, leaf.clone());
            (
                lp,
                Some(Checkpointed {
                    leaf,
                    rows,
                    recompute,
                }),
            )
        }
        None => (target_log_probs(model, &batch), None),
    };
    let lp = token_ce(log_probs, batch.targets.clone()).neg();
    let sel: Tensor<2> = Tensor::from_data(TensorData::new(onehot, [mb.batch, batch.n]), device);
    let sums = sel
        .matmul(lp.clone().reshape([batch.n, 1]))
        .reshape([mb.batch]);
    (sums, counts, lp, checkpointed)
}

/// A policy forward pass run with gradient checkpointing: the objective's graph reaches down to `leaf` (the
/// hidden rows, detached), and `recompute` carries the gradient at `rows` on through the model.
struct Checkpointed<'m> {
    leaf: Tensor<2>,
    rows: Tensor<2>,
    recompute: Box<dyn crate::model::Recompute + 'm>,
}

/// Reference log-probs of every pair from the model's base (its adapters switched off; the model itself when it
/// has none, i.e. the initial weights of a full fine-tune), computed once.
pub fn base_reference<M: CausalLm>(
    model: &M,
    pairs: &[PairExample],
    micro_pairs: usize,
    pad_id: u32,
    device: &Device,
) -> Vec<(f32, f32)> {
    // No graph: an autodiff forward keeps every micro-batch's graph alive until a backward that never comes, so
    // memory grew with the number of pairs (issue 21: 16 GB for 64 pairs of full fine-tuning on the tiny model).
    let model = model.valid();
    model
        .adapters_disabled(|base| precompute_reference(base, pairs, micro_pairs, pad_id, device))
        .unwrap_or_else(|| precompute_reference(&model, pairs, micro_pairs, pad_id, device))
}

/// Reference log-probs of every pair, computed once (no gradient).
pub fn precompute_reference<M: CausalLm>(
    model: &M,
    pairs: &[PairExample],
    micro_pairs: usize,
    pad_id: u32,
    device: &Device,
) -> Vec<(f32, f32)> {
    let model = model.valid();
    let device = device.clone().inner();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(micro_pairs.max(1)) {
        let refs: Vec<&PairExample> = chunk.iter().collect();
        let mb = pair_batch(&refs, pad_id);
        let (sums, _, _) = sequence_log_probs(&model, &mb, &device);
        let v = tensor_to_vec(sums.detach().inner());
        let p = chunk.len();
        for i in 0..p {
            out.push((v[i], v[p + i]));
        }
    }
    out
}

fn shuffled(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if !shuffle {
        return idx;
    }
    // SplitMix64 Fisher-Yates: a fixed algorithm, so a plan never changes with a dependency's RNG.
    let mut rng =
        crate::rng::SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut next = || rng.next_u64();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// The step plan: `(epoch, pair indices)` per optimizer step.
pub fn plan(n_pairs: usize, setup: &PrefSetup<'_>) -> Vec<(usize, Vec<usize>)> {
    let t = setup.run.train;
    let mut steps = Vec::new();
    for epoch in 0..t.epochs.max(1) {
        let order = shuffled(n_pairs, t.seed, epoch, t.shuffle);
        for chunk in order.chunks(setup.pairs_per_step.max(1)) {
            steps.push((epoch, chunk.to_vec()));
            if t.max_steps > 0 && steps.len() >= t.max_steps {
                return steps;
            }
        }
    }
    steps
}

/// One step's (or one evaluation's) tallies over its pairs.
#[derive(Default)]
pub struct Acc {
    pairs: usize,
    loss: f64,
    rc: f64,
    rr: f64,
    correct: usize,
    margin: f64,
    lpc: f64,
    lpr: f64,
    weight: f64,
    tokens: usize,
    nonfinite: bool,
    /// Summed NLL of the chosen completions (only when the run has an SFT term) and their token count.
    nll: f64,
    chosen_tokens: usize,
}

impl Tally for Acc {
    fn to_sums(&self) -> Vec<f64> {
        vec![
            self.pairs as f64,
            self.loss,
            self.rc,
            self.rr,
            self.correct as f64,
            self.margin,
            self.lpc,
            self.lpr,
            self.weight,
            self.tokens as f64,
            f64::from(u8::from(self.nonfinite)),
            self.nll,
            self.chosen_tokens as f64,
        ]
    }

    fn set_sums(&mut self, v: &[f64]) {
        *self = Acc {
            pairs: v[0] as usize,
            loss: v[1],
            rc: v[2],
            rr: v[3],
            correct: v[4] as usize,
            margin: v[5],
            lpc: v[6],
            lpr: v[7],
            weight: v[8],
            tokens: v[9] as usize,
            nonfinite: v[10] > 0.0,
            nll: v[11],
            chosen_tokens: v[12] as usize,
        };
    }
}

/// Forward (and, when `train`, backward) of one micro-batch of pairs. Returns the statistics; gradients of
/// `sum(weight * loss) / step_pairs + sft_weight * chosen_nll / step_chosen_tokens` go into `grads`.
#[allow(clippy::too_many_arguments)]
fn pair_micro_batch<M: CausalLm>(
    model: &M,
    setup: &PrefSetup<'_>,
    idx: &[usize],
    pairs: &[PairExample],
    reference: Option<&[(f32, f32)]>,
    step_pairs: usize,
    step_chosen_tokens: usize,
    grads: Option<&mut GradAccumulator>,
    acc: &mut Acc,
    (step, progress): (usize, f64),
    device: &Device,
) -> Result<(), String> {
    let chunk: Vec<&PairExample> = idx.iter().map(|&i| &pairs[i]).collect();
    let p = chunk.len();
    let mb = pair_batch(&chunk, setup.pad_id);
    let (sums, counts, token_lp, checkpointed) =
        sequence_log_probs_for_training(model, &mb, device, grads.is_some());
    let lens: Vec<f32> = counts.iter().map(|&c| c.max(1) as f32).collect();
    let len_t = |r: std::ops::Range<usize>| -> Tensor<1> {
        Tensor::from_data(TensorData::new(lens[r.clone()].to_vec(), [r.len()]), device)
    };
    let (mut pc, mut pr) = (sums.clone().slice(0..p), sums.clone().slice(p..2 * p));
    let (ref_c, ref_r): (Option<Tensor<1>>, Option<Tensor<1>>) = match (&setup.reference, reference)
    {
        (Reference::None, _) => (None, None),
        (_, Some(pre)) => {
            let c: Vec<f32> = idx.iter().map(|&i| pre[i].0).collect();
            let r: Vec<f32> = idx.iter().map(|&i| pre[i].1).collect();
            (
                Some(Tensor::from_data(TensorData::new(c, [p]), device)),
                Some(Tensor::from_data(TensorData::new(r, [p]), device)),
            )
        }
        (_, None) => {
            // The base model: the policy with its LoRA branches switched off (no second copy of the weights).
            let (s, _, _) = model
                .adapters_disabled(|base| sequence_log_probs(base, &mb, device))
                .unwrap_or_else(|| sequence_log_probs(model, &mb, device));
            let s = s.detach();
            (Some(s.clone().slice(0..p)), Some(s.slice(p..2 * p)))
        }
    };
    let (mut rc, mut rr) = (ref_c, ref_r);
    if setup.average_log_prob {
        pc = pc.div(len_t(0..p));
        pr = pr.div(len_t(p..2 * p));
        rc = rc.map(|t| t.div(len_t(0..p)));
        rr = rr.map(|t| t.div(len_t(p..2 * p)));
    }
    let stats = PairStats {
        policy_chosen: pc.clone(),
        policy_rejected: pr.clone(),
        reference_chosen: rc.clone(),
        reference_rejected: rr.clone(),
        chosen_len: len_t(0..p),
        rejected_len: len_t(p..2 * p),
        step,
        progress,
        desirable: chunk.iter().any(|e| e.label.is_some()).then(|| {
            let d: Vec<f32> = chunk
                .iter()
                .map(|e| f32::from(u8::from(e.label.unwrap_or(true))))
                .collect();
            Tensor::from_data(TensorData::new(d, [p]), device)
        }),
    };
    let (loss, plugin_w) = setup.objective.try_loss(&stats)?;
    let data_w: Vec<f32> = chunk.iter().map(|e| e.weight as f32).collect();
    let mut w = tensor_to_vec(
        plugin_w
            .map(|t| t.detach().inner())
            .unwrap_or_else(|| Tensor::<1>::ones([p], &device.clone().inner())),
    );
    for (a, b) in w.iter_mut().zip(&data_w) {
        *a *= b;
    }
    let loss_v = tensor_to_vec(loss.clone().detach().inner());
    let host = |t: &Tensor<1>| tensor_to_vec(t.clone().detach().inner());
    let (pcv, prv) = (host(&pc), host(&pr));
    let zero = vec![0f32; p];
    let (rcv, rrv) = (
        rc.as_ref().map(host).unwrap_or_else(|| zero.clone()),
        rr.as_ref().map(host).unwrap_or(zero),
    );
    for i in 0..p {
        let (cr, rj) = (
            setup.beta * (pcv[i] - rcv[i]) as f64,
            setup.beta * (prv[i] - rrv[i]) as f64,
        );
        acc.rc += cr;
        acc.rr += rj;
        acc.margin += cr - rj;
        if cr > rj {
            acc.correct += 1;
        }
        acc.lpc += pcv[i] as f64;
        acc.lpr += prv[i] as f64;
        acc.loss += (w[i] * loss_v[i]) as f64;
        acc.weight += w[i] as f64;
        if !loss_v[i].is_finite() || !w[i].is_finite() || w[i] < 0.0 {
            acc.nonfinite = true;
        }
    }
    acc.pairs += p;
    acc.tokens += counts.iter().sum::<usize>();
    let n_chosen: usize = counts[..p].iter().sum();
    acc.chosen_tokens += n_chosen;
    if setup.sft_weight > 0.0 && n_chosen > 0 {
        // The SFT term's value for the logged loss (its gradient is added below).
        let lp = tensor_to_vec(token_lp.clone().slice(0..n_chosen).detach().inner());
        acc.nll -= lp.iter().map(|&x| f64::from(x)).sum::<f64>();
    }
    let Some(grads) = grads else { return Ok(()) };
    if acc.nonfinite {
        return Ok(());
    }
    let wt: Tensor<1> = Tensor::from_data(TensorData::new(w, [p]), device);
    let mut objective = loss.mul(wt).sum().div_scalar(step_pairs.max(1) as f64);
    if setup.sft_weight > 0.0 {
        // NLL of the chosen completions: the targets of the first p rows come first in `token_lp`.
        let n_chosen: usize = counts[..p].iter().sum();
        let nll = token_lp.slice(0..n_chosen).sum().neg();
        objective =
            objective.add(nll.mul_scalar(setup.sft_weight / step_chosen_tokens.max(1) as f64));
    }
    let mut g = objective.backward();
    match checkpointed {
        Some(c) => {
            let dh = c.leaf.grad_remove(&mut g);
            grads.accumulate(model, &mut g);
            drop(g);
            if let Some(dh) = dh {
                c.recompute.backward(
                    c.rows,
                    Tensor::from_inner(dh),
                    &mut crate::step::AccumulatorSink { acc: grads, model },
                );
            }
        }
        None => grads.accumulate(model, &mut g),
    }
    Ok(())
}

/// Evaluates the objective on pairs (no update).
pub fn evaluate<M: CausalLm>(
    model: &M,
    setup: &PrefSetup<'_>,
    pairs: &[PairExample],
    reference: Option<&[(f32, f32)]>,
    step: usize,
) -> Result<Option<PrefEval>, TrainError> {
    Ok(eval_acc(model, setup, pairs, reference, step, Shard::ALL)?.map(|a| eval_line(&a, step)))
}

/// The eval line of tallies summed over all eval pairs.
pub fn eval_line(acc: &Acc, step: usize) -> PrefEval {
    let n = acc.pairs.max(1) as f64;
    PrefEval {
        step,
        eval_loss: acc.loss / acc.weight.max(1e-12),
        accuracy: acc.correct as f64 / n,
        margin: acc.margin / n,
        eval_pairs: acc.pairs,
    }
}

/// The tallies of `shard`'s micro-batches of eval pairs (no update); `None` when there are no pairs.
pub fn eval_acc<M: CausalLm>(
    model: &M,
    setup: &PrefSetup<'_>,
    pairs: &[PairExample],
    reference: Option<&[(f32, f32)]>,
    step: usize,
    shard: Shard,
) -> Result<Option<Acc>, TrainError> {
    if pairs.is_empty() {
        return Ok(None);
    }
    // Evaluation needs no graph: a plain-device copy of the model (dropout off), as SFT's evaluation does.
    let model = model.valid();
    let device = setup.run.device.clone().inner();
    let mut acc = Acc::default();
    let all: Vec<usize> = (0..pairs.len()).collect();
    for (i, chunk) in all.chunks(setup.micro_pairs.max(1)).enumerate() {
        if !shard.owns(i) {
            continue;
        }
        pair_micro_batch(
            &model,
            setup,
            chunk,
            pairs,
            reference,
            1,
            1,
            None,
            &mut acc,
            (step, 0.0),
            &device,
        )
        .map_err(|e| plugin_error(step, e))?;
    }
    Ok(Some(acc))
}

fn plugin_error(step: usize, message: String) -> TrainError {
    TrainError::Plugin {
        step,
        source: crate::step::StepError::Plugin(message),
    }
}

/// The pairwise objective: a plugin turning each pair's sequence log-probabilities into a loss, plus an optional
/// SFT term on the chosen completions.
pub struct PairObjective<'a> {
    setup: &'a PrefSetup<'a>,
    train_reference: Option<&'a [(f32, f32)]>,
}

impl<'a> PairObjective<'a> {
    /// The objective of a preference setup.
    pub fn new(setup: &'a PrefSetup<'a>) -> Self {
        let train_reference = match &setup.reference {
            Reference::Precomputed(v) => Some(v.as_slice()),
            _ => None,
        };
        PairObjective {
            setup,
            train_reference,
        }
    }
}

impl StepLine for PrefMetrics {
    fn progress(&self) -> Progress {
        Progress {
            step: self.step,
            loss: self.loss,
            lr: self.lr,
            tokens_per_s: self.tokens_per_s,
            skipped: self.skipped,
            detail: format!(
                "reward acc {:.3} margin {:.4}",
                self.rewards_accuracy, self.rewards_margin
            ),
        }
    }
}

impl EvalLine for PrefEval {
    fn step(&self) -> usize {
        self.step
    }
    fn summary(&self) -> String {
        format!(
            "loss {:.4}, reward accuracy {:.3}, margin {:.4} over {} pairs",
            self.eval_loss, self.accuracy, self.margin, self.eval_pairs
        )
    }
}

impl<M: CausalLm> Objective<M> for PairObjective<'_> {
    type Unit = Vec<usize>;
    type Tally = Acc;
    type EvalTally = Acc;
    type Metrics = PrefMetrics;
    type Eval = PrefEval;

    fn plan(&self) -> Result<Vec<(usize, Vec<usize>)>, TrainError> {
        Ok(plan(self.setup.pairs.len(), self.setup))
    }

    fn accumulate(
        &self,
        model: &M,
        idx: &Vec<usize>,
        at: StepAt,
        grads: &mut GradAccumulator,
    ) -> Result<Acc, TrainError> {
        let setup = self.setup;
        let chosen_tokens: usize = idx
            .iter()
            .map(|&i| setup.pairs[i].chosen.num_targets())
            .sum();
        let mut acc = Acc::default();
        for (i, chunk) in idx.chunks(setup.micro_pairs.max(1)).enumerate() {
            if !at.shard.owns(i) {
                continue;
            }
            at.seed_micro_batch(setup.run.device, i);
            pair_micro_batch(
                model,
                setup,
                chunk,
                setup.pairs,
                self.train_reference,
                idx.len(),
                chosen_tokens,
                Some(grads),
                &mut acc,
                (at.index, at.progress()),
                setup.run.device,
            )
            .map_err(|e| plugin_error(at.index, e))?;
            if acc.nonfinite {
                break;
            }
        }
        Ok(acc)
    }

    fn conclude(&self, acc: Acc) -> Accumulated<Acc> {
        // The objective is already a mean over the step's pairs and chosen tokens, counted over the whole step
        // (every rank sees the whole unit): nothing left to normalise.
        Accumulated {
            scale: 1.0,
            nonfinite: acc.nonfinite,
            tokens: acc.tokens,
            tally: acc,
        }
    }

    fn metrics(&self, a: &Accumulated<Acc>, o: &StepOutcome) -> PrefMetrics {
        let acc = &a.tally;
        let n = acc.pairs.max(1) as f64;
        PrefMetrics {
            step: o.at.index + 1,
            epoch: o.at.epoch,
            // The pair term plus the SFT term (ORPO's NLL, RPO's), as the gradient has it.
            loss: acc.loss / n + self.setup.sft_weight * acc.nll / acc.chosen_tokens.max(1) as f64,
            rewards_chosen: acc.rc / n,
            rewards_rejected: acc.rr / n,
            rewards_accuracy: acc.correct as f64 / n,
            rewards_margin: acc.margin / n,
            logps_chosen: acc.lpc / n,
            logps_rejected: acc.lpr / n,
            pair_weight: acc.weight / n,
            lr: o.lr,
            grad_norm: o.grad_norm,
            pairs: acc.pairs,
            tokens_per_s: acc.tokens as f64 / o.seconds.max(1e-9),
            skipped: o.skipped,
        }
    }

    fn evaluate(&self, model: &M, step: usize, shard: Shard) -> Result<Option<Acc>, TrainError> {
        let s = self.setup;
        eval_acc(
            model,
            s,
            s.eval_pairs,
            s.eval_reference.as_deref(),
            step,
            shard,
        )
    }

    fn eval_line(&self, acc: &Acc, step: usize) -> PrefEval {
        eval_line(acc, step)
    }
}

/// Trains on preference pairs.
pub fn train_pairs<M: CausalLm>(
    model: M,
    setup: &PrefSetup<'_>,
    observer: &mut dyn Observer,
) -> Result<(M, PrefSummary), TrainError> {
    let (model, r) =
        crate::trainer::train(model, &PairObjective::new(setup), &setup.run, observer)?;
    Ok((
        model,
        PrefSummary {
            steps: r.steps,
            skipped_steps: r.skipped_steps,
            eval_before: r.eval_before,
            eval_after: r.eval_after,
            last_checkpoint: r.last_checkpoint,
            best: r.best,
            stopped_early_at: r.stopped_early_at,
            loaded_best: r.loaded_best,
            seconds: r.seconds,
        },
    ))
}
