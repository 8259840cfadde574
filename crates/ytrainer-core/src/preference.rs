//! Preference training (the DPO family): sequence log-probabilities of both sides of each pair from one forward
//! pass, the reference model's from the same base with adapters disabled (or precomputed), a pairwise plugin
//! turning them into per-pair losses, and the same optimizer, checkpoints and metrics channel as SFT.

use std::path::PathBuf;

use burn::prelude::*;
use serde::Serialize;
use ytrainer_data::{Example, MicroBatch, PairExample};

use crate::dist::{Shard, Tally};
use crate::loss::TokenStats;
use crate::loss::{PairStats, PairwiseObjective, tensor_to_vec};
use crate::model::CausalLm;
use crate::observe::{Observer, Progress};
use crate::optim::GradAccumulator;
use crate::step::{StepContext, StepError, Weighing, to_device, train_micro_batch_with};
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

/// Per-row sums of target log-probabilities (host) and the per-row target counts, without a graph.
pub fn sequence_log_probs<M: CausalLm>(
    model: &M,
    mb: &MicroBatch,
    device: &Device,
) -> (Vec<f32>, Vec<usize>) {
    let counts = row_counts(mb);
    let lp = token_log_probs(model, mb, device);
    (row_sums(&lp, &counts), counts)
}

/// Targets per row, in row order (`to_device` lists targets row-major, so row `r`'s come after row `r - 1`'s).
fn row_counts(mb: &MicroBatch) -> Vec<usize> {
    let mut counts = vec![0usize; mb.batch];
    for (p, &t) in mb.target_mask.iter().enumerate() {
        if t && p % mb.seq != 0 {
            counts[p / mb.seq] += 1;
        }
    }
    counts
}

/// Sums of consecutive runs of `lp` of lengths `counts` (f64 accumulation).
fn row_sums(lp: &[f32], counts: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(counts.len());
    let mut j = 0;
    for &c in counts {
        out.push(lp[j..j + c].iter().map(|&x| f64::from(x)).sum::<f64>() as f32);
        j += c;
    }
    out
}

/// Every target's log-probability (host, target order) without a graph, through the training step's own head
/// path (chunked: no `[tokens, vocab]` buffer).
fn token_log_probs<M: CausalLm>(model: &M, mb: &MicroBatch, device: &Device) -> Vec<f32> {
    let batch = to_device(mb, device);
    crate::step::target_ce_no_graph(model, &batch)
        .iter()
        .map(|&c| -c)
        .collect()
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
        let (v, _) = sequence_log_probs(&model, &mb, &device);
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

/// One micro-batch of pairs: the policy's per-token log-probs from the fused, chunked LM head (SFT's path), the
/// pairwise objective on their row sums as a small graph whose leaves are those log-probs, and, when training,
/// its per-token gradient fed back through the head as signed token weights. The objective depends on the model
/// only through the log-probs, so `d obj / d theta = sum_i (d obj / d lp_i) (d lp_i / d theta)`, which is the
/// gradient of `sum_i w_i ce_i` with `w_i = -d obj / d lp_i`: no `[tokens, vocab]` buffer and no second copy of
/// the head backward.
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
    let counts = row_counts(&mb);
    let refs: Option<(Vec<f32>, Vec<f32>)> = match (&setup.reference, reference) {
        (Reference::None, _) => None,
        (_, Some(pre)) => Some((
            idx.iter().map(|&i| pre[i].0).collect(),
            idx.iter().map(|&i| pre[i].1).collect(),
        )),
        (_, None) => {
            // The base model: the policy with its LoRA branches switched off (no second copy of the weights).
            let lp = model
                .adapters_disabled(|base| token_log_probs(base, &mb, device))
                .unwrap_or_else(|| token_log_probs(model, &mb, device));
            let s = row_sums(&lp, &counts);
            Some((s[..p].to_vec(), s[p..].to_vec()))
        }
    };
    let objective = |lp: &[f32], grad: bool| {
        let at = PairAt {
            chunk: &chunk,
            counts: &counts,
            refs: refs.as_ref(),
            step_pairs,
            step_chosen_tokens,
            step,
            progress,
        };
        pair_objective(setup, &at, lp, grad, device)
    };
    let out = match grads {
        None => objective(&token_log_probs(model, &mb, device), false)?,
        Some(grads) => {
            let mut out = None;
            let mut weigh = |stats: &TokenStats| -> Result<Tensor<1>, StepError> {
                let lp: Vec<f32> = tensor_to_vec(stats.loss.clone())
                    .iter()
                    .map(|&c| -c)
                    .collect();
                let o = objective(&lp, true).map_err(StepError::Plugin)?;
                // A non-finite objective contributes nothing (the loop skips the step, as for SFT).
                let w = if o.nonfinite {
                    vec![0.0; lp.len()]
                } else {
                    o.token_weights.clone()
                };
                out = Some(o);
                let n = w.len();
                Ok(Tensor::from_data(TensorData::new(w, [n]), device))
            };
            let how = Weighing {
                needs: Default::default(),
                anchor: 0.0,
                signed: true,
            };
            let ctx = StepContext {
                step,
                progress,
                zone_borders: [0.0; 3],
            };
            let counters = train_micro_batch_with(model, &mb, how, &mut weigh, ctx, grads, device)
                .map_err(|e| e.to_string())?;
            match out {
                Some(o) => o,
                // Never weighed: no targets at all, or a non-finite token loss.
                None => {
                    let mut o = objective(&vec![0.0; counters.tokens], false)?;
                    o.nonfinite |= counters.nonfinite > 0;
                    o
                }
            }
        }
    };
    for i in 0..p {
        let (cr, rj) = (
            setup.beta * (out.pc[i] - out.rc[i]) as f64,
            setup.beta * (out.pr[i] - out.rr[i]) as f64,
        );
        acc.rc += cr;
        acc.rr += rj;
        acc.margin += cr - rj;
        if cr > rj {
            acc.correct += 1;
        }
        acc.lpc += out.pc[i] as f64;
        acc.lpr += out.pr[i] as f64;
        acc.loss += (out.weight[i] * out.loss[i]) as f64;
        acc.weight += out.weight[i] as f64;
    }
    acc.nonfinite |= out.nonfinite;
    acc.pairs += p;
    acc.tokens += counts.iter().sum::<usize>();
    acc.chosen_tokens += counts[..p].iter().sum::<usize>();
    acc.nll += out.nll;
    Ok(())
}

/// Where a micro-batch of pairs sits: its pairs, the row layout of its targets, the reference's sums and the
/// step's normalisers.
struct PairAt<'a> {
    chunk: &'a [&'a PairExample],
    counts: &'a [usize],
    refs: Option<&'a (Vec<f32>, Vec<f32>)>,
    step_pairs: usize,
    step_chosen_tokens: usize,
    step: usize,
    progress: f64,
}

/// The pairwise objective of one micro-batch, on the host values of its policy log-probs.
struct PairOut {
    /// Per-pair loss and weight (data weight x plugin weight).
    loss: Vec<f32>,
    weight: Vec<f32>,
    /// Policy and reference sequence log-probs (length-averaged when the objective asks), per pair.
    pc: Vec<f32>,
    pr: Vec<f32>,
    rc: Vec<f32>,
    rr: Vec<f32>,
    /// The SFT term's NLL of the chosen completions (for the logged loss).
    nll: f64,
    nonfinite: bool,
    /// `d obj / d ce_i` per target (empty unless asked for).
    token_weights: Vec<f32>,
}

fn pair_objective(
    setup: &PrefSetup<'_>,
    at: &PairAt<'_>,
    lp: &[f32],
    grad: bool,
    device: &Device,
) -> Result<PairOut, String> {
    let p = at.chunk.len();
    let n = lp.len();
    let vec1 = |v: Vec<f32>| -> Tensor<1> {
        let k = v.len();
        Tensor::from_data(TensorData::new(v, [k]), device)
    };
    // The objective depends on the tokens only through their rows' sums: those are the graph's leaves, and a
    // token's gradient is its row's. The sums are the host's (f64 accumulation), the same arithmetic as the
    // reference's, so policy = reference gives exactly equal values (DPO's step 0: ln 2).
    let leaf = vec1(row_sums(lp, at.counts));
    let sums = if grad {
        leaf.clone().require_grad()
    } else {
        leaf
    };
    let lens: Vec<f32> = at.counts.iter().map(|&c| c.max(1) as f32).collect();
    let len_t = |r: std::ops::Range<usize>| vec1(lens[r].to_vec());
    let (mut pc, mut pr) = (sums.clone().slice(0..p), sums.clone().slice(p..2 * p));
    let mut rc = at.refs.map(|r| vec1(r.0.clone()));
    let mut rr = at.refs.map(|r| vec1(r.1.clone()));
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
        step: at.step,
        progress: at.progress,
        desirable: at.chunk.iter().any(|e| e.label.is_some()).then(|| {
            vec1(
                at.chunk
                    .iter()
                    .map(|e| f32::from(u8::from(e.label.unwrap_or(true))))
                    .collect(),
            )
        }),
    };
    let (loss, plugin_w) = setup.objective.try_loss(&stats)?;
    let mut w = tensor_to_vec(
        plugin_w
            .map(|t| t.detach().inner())
            .unwrap_or_else(|| Tensor::<1>::ones([p], &device.clone().inner())),
    );
    for (a, e) in w.iter_mut().zip(at.chunk) {
        *a *= e.weight as f32;
    }
    let host = |t: &Tensor<1>| tensor_to_vec(t.clone().detach().inner());
    let loss_v = host(&loss);
    let zero = vec![0f32; p];
    let n_chosen: usize = at.counts[..p].iter().sum();
    let mut out = PairOut {
        nonfinite: loss_v
            .iter()
            .zip(&w)
            .any(|(l, w)| !l.is_finite() || !w.is_finite() || *w < 0.0),
        pc: host(&pc),
        pr: host(&pr),
        rc: rc.as_ref().map(host).unwrap_or_else(|| zero.clone()),
        rr: rr.as_ref().map(host).unwrap_or(zero),
        nll: if setup.sft_weight > 0.0 {
            // The SFT term's value for the logged loss: the chosen rows' targets come first.
            -lp[..n_chosen].iter().map(|&x| f64::from(x)).sum::<f64>()
        } else {
            0.0
        },
        loss: loss_v,
        weight: w.clone(),
        token_weights: Vec::new(),
    };
    if !grad || out.nonfinite || n == 0 {
        return Ok(out);
    }
    let g = loss
        .mul(vec1(w))
        .sum()
        .div_scalar(at.step_pairs.max(1) as f64)
        .backward();
    let per_row = sums
        .grad(&g)
        .map(tensor_to_vec)
        .unwrap_or_else(|| vec![0.0; 2 * p]);
    // The SFT term `-sft_weight * sum(lp of chosen tokens) / step_chosen_tokens` gives each chosen token the CE
    // weight `sft_weight / step_chosen_tokens`.
    let sft = (setup.sft_weight / at.step_chosen_tokens.max(1) as f64) as f32;
    for (row, (&c, &d)) in at.counts.iter().zip(&per_row).enumerate() {
        let w = -d
            + if row < p && setup.sft_weight > 0.0 {
                sft
            } else {
                0.0
            };
        out.token_weights.extend(std::iter::repeat_n(w, c));
    }
    Ok(out)
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
        // Padded tokens of each micro-batch: both sides of every pair padded to the longest row.
        let costs: Vec<usize> = idx
            .chunks(setup.micro_pairs.max(1))
            .map(|c| {
                let longest = c
                    .iter()
                    .map(|&i| setup.pairs[i].row_len())
                    .max()
                    .unwrap_or(0);
                2 * c.len() * longest
            })
            .collect();
        let mine = at.shard.deal(&costs);
        for (i, chunk) in idx.chunks(setup.micro_pairs.max(1)).enumerate() {
            if !mine[i] {
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
