//! The one training loop, generic over an [`Objective`]: plan, start or resume, then per optimizer step run the
//! objective's micro-batches into one gradient accumulator, normalise, clip, update with AdamW (skipping the
//! update on NaN/inf), log through the sinks, evaluate, checkpoint. Token-weighted SFT ([`crate::sft`]) and
//! pairwise preference training ([`crate::preference`]) are objectives; a new one (KTO, ...) is another
//! implementation of the trait, not another loop.
//!
//! Data-parallel training ([`crate::dist`]) changes nothing here but the share of each step a rank runs and one
//! place where the ranks meet: after [`Objective::accumulate`] the objective's tally and the gradients are summed
//! over the ranks, and only then does the objective derive its normaliser ([`Objective::conclude`]) and the loop
//! take the global norm, clip and update. Evaluation is sharded and summed the same way. Rank 0 alone writes
//! metrics, event files and checkpoints.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use serde::Serialize;

use crate::checkpoint::{self, BestSoFar, TrainerState};
use crate::config::{RunConfig, TrainSection};
use crate::dist::{Collective, CommStats, Shard, Tally, reduce_tally};
use crate::model::CausalLm;
use crate::observe::{JsonlSink, Observer, Progress, Sink, Stream, TensorboardSink};
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, lr_at};

pub use crate::error::TrainError;

/// Where an optimizer step stands, handed to the objective.
#[derive(Debug, Clone, Copy)]
pub struct StepAt {
    /// Optimizer step (0-based).
    pub index: usize,
    /// Planned steps in total.
    pub total: usize,
    /// Epoch of this step (0-based).
    pub epoch: usize,
    /// The step's device seed ([`crate::rng::step_seed`]).
    pub seed: u64,
    /// The share of the step's micro-batches this rank runs.
    pub shard: Shard,
}

impl StepAt {
    /// Progress in `[0, 1)`: the fraction of planned steps done before this one.
    pub fn progress(&self) -> f64 {
        self.index as f64 / self.total.max(1) as f64
    }

    /// Seeds `device` for micro-batch `i` of the step (in plan order): LoRA dropout then draws the same on
    /// whichever rank runs it.
    pub fn seed_micro_batch(&self, device: &Device, i: usize) {
        device.seed(crate::rng::micro_batch_seed(self.seed, i));
    }
}

/// What one step's micro-batches left behind, besides the gradients in the accumulator.
#[derive(Debug, Clone)]
pub struct Accumulated<T> {
    /// The objective's own tallies (token counts, zones, rewards...), read back by [`Objective::metrics`].
    pub tally: T,
    /// Factor the accumulated gradient is multiplied by before clipping and the update (`1 / normaliser`).
    pub scale: f64,
    /// A non-finite loss or an unusable weight: the update is skipped and the gradient dropped.
    pub nonfinite: bool,
    /// Trained tokens (for `tokens_trained` and throughput).
    pub tokens: usize,
}

/// The loop-side figures of a finished step, for the objective's metrics line.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Where the step stands.
    pub at: StepAt,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm (after `scale`, before clipping).
    pub grad_norm: f64,
    /// Whether the update was skipped.
    pub skipped: bool,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
}

/// A line of `metrics.jsonl`.
pub trait StepLine: Serialize {
    /// What a person watching the run is shown.
    fn progress(&self) -> Progress;
}

/// A line of `eval.jsonl`.
pub trait EvalLine: Serialize {
    /// The step it was measured at.
    fn step(&self) -> usize;
    /// A one-line human summary (`loss 1.2345 (ppl 3.44), token accuracy 0.512 over 900 tokens`).
    fn summary(&self) -> String;
    /// The numeric field `key` of the line as written to `eval.jsonl` (`eval_loss`, ...).
    fn metric(&self, key: &str) -> Option<f64> {
        serde_json::to_value(self).ok()?.get(key)?.as_f64()
    }
    /// The numeric fields of the line (for the message naming a metric it lacks).
    fn metric_keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m
                .into_iter()
                .filter(|(k, v)| v.is_number() && k != "step")
                .map(|(k, _)| k)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Which evaluation is the best, what is kept of it and when to stop (transformers' `metric_for_best_model`,
/// `greater_is_better`, `load_best_model_at_end` and `EarlyStoppingCallback`). Only evaluations during
/// training count (every `eval_every` steps and after the last step), not the one before training.
#[derive(Debug, Clone, PartialEq)]
pub struct BestModel {
    /// The `eval.jsonl` key compared (`eval_loss`).
    pub metric: String,
    /// Whether larger is better.
    pub greater_is_better: bool,
    /// Stop after this many evaluations in a row without an improvement larger than `threshold` (0 = never).
    pub patience: usize,
    /// The improvement that resets the patience count.
    pub threshold: f64,
    /// Checkpoint every improving evaluation and hand back the best model, not the last one.
    pub load_best_at_end: bool,
}

impl Default for BestModel {
    fn default() -> Self {
        BestModel {
            metric: "eval_loss".to_string(),
            greater_is_better: false,
            patience: 0,
            threshold: 0.0,
            load_best_at_end: false,
        }
    }
}

impl BestModel {
    /// The settings of a run config (`[eval]`, `[train] early_stopping_*`, `[output] load_best_model_at_end`).
    pub fn of(cfg: &RunConfig) -> Self {
        BestModel {
            metric: cfg.eval.best_metric_key(),
            greater_is_better: cfg.eval.best_is_greater(),
            patience: cfg.train.early_stopping_patience,
            threshold: cfg.train.early_stopping_threshold,
            load_best_at_end: cfg.output.load_best_model_at_end,
        }
    }

    /// Records an evaluation's `value` measured after `step` steps in `state`: a strictly better value becomes
    /// the best (returns `true`); the patience count is reset only by an improvement larger than `threshold`.
    pub fn judge(&self, state: &mut TrainerState, step: usize, value: f64) -> bool {
        let prev = state.best.as_ref().map(|b| b.value);
        let better = match prev {
            None => !value.is_nan(),
            Some(p) if self.greater_is_better => value > p,
            Some(p) => value < p,
        };
        let significant = better && prev.is_none_or(|p| (value - p).abs() > self.threshold);
        if significant {
            state.evals_without_improvement = 0;
        } else {
            state.evals_without_improvement += 1;
        }
        if better {
            state.best = Some(BestSoFar {
                step,
                metric: self.metric.clone(),
                value,
                checkpoint: None,
            });
        }
        better
    }

    /// The compared metric of an evaluation; an error naming the fields there are when it has no such field.
    pub fn value_of<E: EvalLine>(&self, e: &E) -> Result<f64, TrainError> {
        e.metric(&self.metric).ok_or_else(|| {
            TrainError::Config(format!(
                "[eval] metric_for_best_model = {:?}: the evaluations of this run have no numeric field `{}`; \
                 choose one of: {}",
                self.metric,
                self.metric,
                e.metric_keys().join(", ")
            ))
        })
    }

    /// Whether `state` has run out of patience.
    pub fn exhausted(&self, state: &TrainerState) -> bool {
        self.patience > 0 && state.evals_without_improvement >= self.patience
    }
}

/// What is trained: how the data becomes steps, how one step's gradient is made, how the model is evaluated.
pub trait Objective<M: CausalLm> {
    /// One optimizer step's share of the data (a planned [`ytrainer_data::Step`], a list of pair indices...).
    type Unit;
    /// The tallies of one step's micro-batches; summed over the data-parallel ranks.
    type Tally: Tally;
    /// The tallies of an evaluation; summed over the data-parallel ranks.
    type EvalTally: Tally;
    /// One line of `metrics.jsonl`.
    type Metrics: StepLine;
    /// One line of `eval.jsonl`.
    type Eval: EvalLine;

    /// The full step plan `(epoch, unit)` over all epochs, capped at `max_steps`. Must be a pure function of the
    /// data and settings: a resumed run rebuilds it and skips the steps already done.
    fn plan(&self) -> Result<Vec<(usize, Self::Unit)>, TrainError>;

    /// Forward and backward of this rank's micro-batches of `unit` (those `at.shard` owns, each seeded with
    /// [`StepAt::seed_micro_batch`]); gradients go into `grads`, unnormalised. Stops early when a micro-batch
    /// produced a non-finite loss (the tally must say so): NaN must never reach the optimizer. Anything scaled
    /// by a count of the whole step must use the global count, which every rank can derive from `unit`.
    fn accumulate(
        &self,
        model: &M,
        unit: &Self::Unit,
        at: StepAt,
        grads: &mut GradAccumulator,
    ) -> Result<Self::Tally, TrainError>;

    /// The normaliser, trained tokens and the non-finite verdict from the step's tally summed over every rank.
    fn conclude(&self, tally: Self::Tally) -> Accumulated<Self::Tally>;

    /// The metrics line of a finished step.
    fn metrics(&self, acc: &Accumulated<Self::Tally>, outcome: &StepOutcome) -> Self::Metrics;

    /// Evaluation without gradient over this rank's share of the eval data; `None` when there is nothing to
    /// evaluate on (the same answer on every rank).
    fn evaluate(
        &self,
        model: &M,
        step: usize,
        shard: Shard,
    ) -> Result<Option<Self::EvalTally>, TrainError>;

    /// The `eval.jsonl` line of an evaluation tally summed over every rank.
    fn eval_line(&self, tally: &Self::EvalTally, step: usize) -> Self::Eval;
}

/// The objective-independent settings of a run.
pub struct LoopSetup<'a> {
    /// Optimisation settings (learning rate, schedule, AdamW, clipping, epochs, max_steps).
    pub train: &'a TrainSection,
    /// Seed of the per-step randomness (LoRA dropout) and of the checkpointed state.
    pub seed: u64,
    /// Run directory: metrics, event files, checkpoints.
    pub output_dir: &'a Path,
    /// Evaluate every N steps (0 = before and after only).
    pub eval_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Checkpoints to keep (0 = all).
    pub save_total_limit: usize,
    /// Checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Fingerprint of the training-relevant config (resume must match).
    pub fingerprint: String,
    /// Device.
    pub device: &'a Device,
    /// The data-parallel group ([`crate::dist::SINGLE`] for one process).
    pub dist: &'a dyn Collective,
    /// The best model: metric, early stopping, whether the best is handed back.
    pub best: BestModel,
}

/// What the loop reports of a finished run.
#[derive(Debug, Clone)]
pub struct LoopReport<S, E> {
    /// Optimizer steps done in total (including before a resume).
    pub steps: usize,
    /// Steps skipped for non-finite values.
    pub skipped_steps: usize,
    /// Tokens trained (including before a resume).
    pub tokens_trained: u64,
    /// Eval before training (absent on resume).
    pub eval_before: Option<E>,
    /// Eval after training.
    pub eval_after: Option<E>,
    /// The metrics of the last step whose update was applied.
    pub last_applied: Option<S>,
    /// Last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Wall-clock seconds of the loop.
    pub seconds: f64,
    /// Communication of a data-parallel run (`None` in one process).
    pub comm: Option<CommStats>,
    /// The best evaluation during training (with its checkpoint when one was written).
    pub best: Option<BestSoFar>,
    /// The step after which early stopping ended the run (`None`: it ran its planned steps).
    pub stopped_early_at: Option<usize>,
    /// Whether the model handed back is the best checkpoint's (`load_best_model_at_end`), not the last step's.
    pub loaded_best: bool,
}

/// The trained model with the loop's report.
pub type Trained<M, O> = (
    M,
    LoopReport<<O as Objective<M>>::Metrics, <O as Objective<M>>::Eval>,
);

/// Emits one record to every sink.
fn emit(
    sinks: &mut [Box<dyn Sink>],
    stream: Stream,
    step: usize,
    record: &impl Serialize,
) -> Result<(), TrainError> {
    let json = serde_json::to_string(record).unwrap_or_default();
    for s in sinks.iter_mut() {
        s.record(stream, step, &json)?;
    }
    Ok(())
}

/// Evaluates (this rank's share, summed over the ranks), records the result everywhere and returns it.
fn eval_and_emit<M: CausalLm, O: Objective<M>>(
    objective: &O,
    model: &M,
    step: usize,
    dist: &dyn Collective,
    sinks: &mut [Box<dyn Sink>],
    observer: &mut dyn Observer,
) -> Result<Option<O::Eval>, TrainError> {
    let Some(mut tally) = objective.evaluate(model, step, Shard::of(dist))? else {
        return Ok(None);
    };
    reduce_tally(dist, &mut tally)?;
    let e = objective.eval_line(&tally, step);
    emit(sinks, Stream::Eval, e.step(), &e)?;
    observer.eval(e.step(), &e.summary());
    Ok(Some(e))
}

/// Trains `model` on `objective` and returns it with the report. Checkpoints go to `output_dir/checkpoint-N`,
/// metrics to `metrics.jsonl`, `eval.jsonl` and TensorBoard event files in `output_dir`.
pub fn train<M: CausalLm, O: Objective<M>>(
    model: M,
    objective: &O,
    setup: &LoopSetup<'_>,
    observer: &mut dyn Observer,
) -> Result<Trained<M, O>, TrainError> {
    let t0 = Instant::now();
    let steps = objective.plan()?;
    if steps.is_empty() {
        return Err(TrainError::NoSteps);
    }
    let total = steps.len();
    let dist = setup.dist;
    crate::dist::check_same_plan(dist, total)?;
    let (shard, writer) = (Shard::of(dist), dist.rank() == 0);
    let mut comm = CommStats::default();
    let tr = setup.train;
    let Started {
        mut model,
        mut optim,
        mut state,
        warmup,
    } = start(model, setup, total, observer)?;
    fs::create_dir_all(setup.output_dir).map_err(|e| TrainError::Output {
        path: setup.output_dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let resumed = setup.resume.is_some();
    // Rank 0 alone writes records (every rank computes the same global figures).
    let mut sinks: Vec<Box<dyn Sink>> = if writer {
        let resume_at = resumed.then_some(state.step);
        vec![
            Box::new(JsonlSink::open(setup.output_dir, resume_at)?),
            Box::new(if resumed {
                TensorboardSink::resume(setup.output_dir)?
            } else {
                TensorboardSink::create(setup.output_dir)?
            }),
        ]
    } else {
        Vec::new()
    };

    let eval_before = if resumed {
        None
    } else {
        eval_and_emit(objective, &model, 0, dist, &mut sinks, observer)?
    };
    // A metric the evaluations lack is named before any step is trained.
    if let Some(e) = &eval_before {
        setup.best.value_of(e)?;
    }

    observer.start(total, state.step);
    let mut grads = GradAccumulator::default();
    let mut last_applied = None;
    let mut last_checkpoint: Option<PathBuf> = None;
    // First step of the current run of consecutive skipped steps.
    let mut skipping_since: Option<usize> = None;
    let best = &setup.best;
    // The evaluation after the last step, when the loop made it (it decides the best model too).
    let mut eval_after: Option<Option<O::Eval>> = None;
    let mut stopped_early_at = None;
    if best.exhausted(&state) {
        // Resuming a run that early stopping ended: nothing more to train.
        stopped_early_at = Some(state.step);
    }
    for (index, (epoch, unit)) in steps.iter().enumerate().skip(state.step) {
        if stopped_early_at.is_some() {
            break;
        }
        let ts = Instant::now();
        // Reseeding per step makes any randomness inside the step (LoRA dropout) a function of (seed, step), so a
        // resumed run draws exactly what the uninterrupted run drew.
        setup.device.seed(crate::rng::step_seed(setup.seed, index));
        let at = StepAt {
            index,
            total,
            epoch: *epoch,
            seed: crate::rng::step_seed(setup.seed, index),
            shard,
        };
        let tally = objective.accumulate(&model, unit, at, &mut grads)?;
        let (acc, reduced_sq) = reduce_step(objective, &model, tally, &mut grads, dist, &mut comm)?;
        let lr = lr_at(
            tr.lr_scheduler,
            tr.learning_rate,
            index,
            total,
            warmup,
            tr.min_lr_ratio,
        );
        let grad_norm = match reduced_sq {
            _ if grads.is_empty() => 0.0,
            Some(sq) => sq.sqrt() * acc.scale.abs(),
            None => grads.global_norm(acc.scale),
        };
        let skipped = acc.nonfinite || !grad_norm.is_finite();
        if skipped {
            grads.clear();
            state.skipped_steps += 1;
            observer.notice(&format!(
                "step {}: non-finite loss or gradient, update skipped ({} skipped so far)",
                index + 1,
                state.skipped_steps
            ));
        } else if !grads.is_empty() {
            let clip = if tr.max_grad_norm > 0.0 && grad_norm > tr.max_grad_norm {
                tr.max_grad_norm / grad_norm
            } else {
                1.0
            };
            model = optim.step(model, &mut grads, lr, acc.scale * clip);
        }
        state.step = index + 1;
        state.tokens_trained += acc.tokens as u64;
        let outcome = StepOutcome {
            at,
            lr,
            grad_norm,
            skipped,
            seconds: ts.elapsed().as_secs_f64(),
        };
        let m = objective.metrics(&acc, &outcome);
        emit(&mut sinks, Stream::Step, index + 1, &m)?;
        observer.step(&m.progress());
        if !skipped {
            last_applied = Some(m);
            skipping_since = None;
        } else {
            let first = *skipping_since.get_or_insert(index);
            let n = index + 1 - first;
            if tr.max_skipped_steps > 0 && n >= tr.max_skipped_steps {
                let steps = if n == 1 {
                    format!("step {} had", index + 1)
                } else {
                    format!("steps {} to {} ({n} in a row) had", first + 1, index + 1)
                };
                return Err(diverged(
                    &format!(
                        "{steps} a non-finite loss or gradient and their updates were skipped ([train] \
                         max_skipped_steps = {})",
                        tr.max_skipped_steps
                    ),
                    tr,
                    last_checkpoint.as_deref(),
                ));
            }
        }

        let last = index + 1 == total;
        let mut improved = false;
        if last || (setup.eval_every > 0 && (index + 1) % setup.eval_every == 0) {
            let e = eval_and_emit(objective, &model, index + 1, dist, &mut sinks, observer)?;
            if let Some(e) = &e {
                let value = best.value_of(e)?;
                improved = best.judge(&mut state, index + 1, value);
                if !last && best.exhausted(&state) {
                    stopped_early_at = Some(index + 1);
                    let b = state.best.as_ref();
                    observer.notice(&format!(
                        "early stopping after step {}: {} has not improved on {} (step {}) for {} evaluations \
                         ([train] early_stopping_patience = {})",
                        index + 1,
                        best.metric,
                        b.map(|b| format!("{:.4}", b.value)).unwrap_or_default(),
                        b.map(|b| b.step).unwrap_or_default(),
                        state.evals_without_improvement,
                        best.patience
                    ));
                }
            }
            if last || stopped_early_at.is_some() {
                eval_after = Some(e);
            }
        }
        let done = last || stopped_early_at.is_some();
        let keep_best = improved && best.load_best_at_end;
        // Every rank holds the same weights: rank 0's checkpoint is the run's, resumable with any number of ranks.
        let checkpointing =
            (setup.save_every > 0 && (index + 1) % setup.save_every == 0) || done || keep_best;
        let dir = setup.output_dir.join(format!("checkpoint-{}", index + 1));
        if checkpointing
            && improved
            && let Some(b) = state.best.as_mut()
        {
            b.checkpoint = Some(dir.clone());
        }
        if writer && checkpointing {
            let saved = checkpoint::save(&dir, &model, &optim.state, &state, |tmp| {
                model.export(&tmp.join("export")).map(|_| ())
            });
            if let Err(checkpoint::CheckpointError::NonFinite { param, .. }) = &saved {
                return Err(diverged(
                    &format!(
                        "the update of step {} left parameter `{param}` NaN or infinite",
                        index + 1
                    ),
                    tr,
                    last_checkpoint.as_deref(),
                ));
            }
            saved?;
            observer.notice(&format!("checkpoint written: {}", dir.display()));
            last_checkpoint = Some(dir);
            let best_dir = state.best.as_ref().and_then(|b| b.checkpoint.as_deref());
            checkpoint::prune_keeping(
                setup.output_dir,
                setup.save_total_limit,
                &setup.fingerprint,
                best_dir,
            );
        }
        if stopped_early_at.is_some() {
            break;
        }
    }
    let mut loaded_best = false;
    let best_ckpt = state
        .best
        .as_ref()
        .filter(|b| best.load_best_at_end && b.step != state.step)
        .and_then(|b| b.checkpoint.clone().map(|c| (b.step, c)));
    if let Some((step, dir)) = best_ckpt {
        // Every rank sees the run directory: all load the best weights, so the evaluation below agrees.
        let file = dir.join("trainable.safetensors");
        let params = checkpoint::read_safetensors(&file)?;
        model = checkpoint::load_trainable(model, &params, &file)?;
        loaded_best = true;
        observer.notice(&format!(
            "loaded the best model: {} of step {} ({}); it is what the run hands back and exports",
            best.metric,
            step,
            dir.display()
        ));
        // Measured again, not copied: the evaluation of the model handed back.
        eval_after = Some(match objective.evaluate(&model, step, Shard::of(dist))? {
            Some(mut tally) => {
                reduce_tally(dist, &mut tally)?;
                let e = objective.eval_line(&tally, step);
                observer.eval(step, &format!("best model: {}", e.summary()));
                Some(e)
            }
            None => None,
        });
    }
    let eval_after = match eval_after {
        Some(e) => e,
        None => eval_and_emit(objective, &model, state.step, dist, &mut sinks, observer)?,
    };
    let comm = (comm.steps > 0).then_some(comm);
    if let Some(c) = &comm {
        observer.notice(&format!(
            "data-parallel over {} ranks ({}): per step {:.3} MB summed in {:.1} ms (median; mean {:.1} ms), \
             {:.1} ms waiting for the slowest rank ({} steps)",
            dist.world_size(),
            dist.describe(),
            c.bytes as f64 / c.steps as f64 / 1e6,
            c.median_step_seconds() * 1e3,
            c.seconds / c.steps as f64 * 1e3,
            c.wait_seconds / c.steps as f64 * 1e3,
            c.steps
        ));
    }
    Ok((
        model,
        LoopReport {
            steps: state.step,
            skipped_steps: state.skipped_steps,
            tokens_trained: state.tokens_trained,
            eval_before,
            eval_after,
            last_applied,
            last_checkpoint,
            seconds: t0.elapsed().as_secs_f64(),
            comm,
            best: state.best.clone(),
            stopped_early_at,
            loaded_best,
        },
    ))
}

/// The one place where data-parallel ranks meet in a step: the objective's tally is summed over the ranks and
/// concluded (normaliser, non-finite verdict), then, unless the step is skipped anyway, the gradients are summed;
/// returns the concluded step and, in a group, the squared norm of the summed (unscaled) gradient. In one process
/// it only concludes.
fn reduce_step<M: CausalLm, O: Objective<M>>(
    objective: &O,
    model: &M,
    mut tally: O::Tally,
    grads: &mut GradAccumulator,
    dist: &dyn Collective,
    comm: &mut CommStats,
) -> Result<(Accumulated<O::Tally>, Option<f64>), TrainError> {
    if !dist.sums_needed() {
        return Ok((objective.conclude(tally), None));
    }
    // Waiting for the slowest rank is timed apart from the transfer.
    let t = Instant::now();
    dist.barrier()?;
    comm.wait_seconds += t.elapsed().as_secs_f64();
    let before = comm.seconds;
    let bytes = tally.to_sums().len() * 8;
    comm.time(bytes, || reduce_tally(dist, &mut tally))?;
    let acc = objective.conclude(tally);
    if acc.nonfinite {
        return Ok((acc, None));
    }
    let t = Instant::now();
    let (bytes, sq) = grads.all_reduce(model, dist)?;
    comm.seconds += t.elapsed().as_secs_f64();
    comm.bytes += bytes as u64;
    comm.steps += 1;
    comm.step_seconds.push(comm.seconds - before);
    Ok((acc, Some(sq)))
}

/// A loop's starting point: the model (restored on resume), optimizer, position and warmup length.
struct Started<M> {
    model: M,
    optim: AdamW,
    state: TrainerState,
    warmup: usize,
}

/// Builds the optimizer and trainer state for a run of `total` steps, restoring both (and the trainable
/// parameters) from `setup.resume` when given.
fn start<M: CausalLm>(
    mut model: M,
    setup: &LoopSetup<'_>,
    total: usize,
    observer: &mut dyn Observer,
) -> Result<Started<M>, TrainError> {
    let tr = setup.train;
    let warmup = if tr.warmup_steps > 0 {
        tr.warmup_steps
    } else {
        (tr.warmup_ratio * total as f64).ceil() as usize
    };
    let mut optim = AdamW::new(AdamWConfig {
        beta1: tr.adam_beta1,
        beta2: tr.adam_beta2,
        eps: tr.adam_epsilon,
        weight_decay: tr.weight_decay,
        lora_b_lr_ratio: tr.loraplus_lr_ratio.unwrap_or(1.0),
    });
    let mut state = TrainerState {
        step: 0,
        total_steps: total,
        skipped_steps: 0,
        tokens_trained: 0,
        seed: setup.seed,
        config_fingerprint: setup.fingerprint.clone(),
        ..TrainerState::default()
    };
    if let Some(dir) = setup.resume.as_deref() {
        let loaded = checkpoint::load(dir, setup.device)?;
        if loaded.state.config_fingerprint != setup.fingerprint {
            let differing = config_diff(&loaded.state.config_fingerprint, &setup.fingerprint);
            return Err(TrainError::Resume {
                path: dir.to_path_buf(),
                message: format!(
                    "the run's settings differ from the ones the checkpoint was written with ({}); resume with \
                     the same config and flags (see config.resolved.toml in the run directory)",
                    differing.join(", ")
                ),
            });
        }
        if loaded.state.step > total {
            return Err(TrainError::Resume {
                path: dir.to_path_buf(),
                message: format!(
                    "the checkpoint is at step {} but this run's plan has {total} steps; resume from a checkpoint \
                     of this run",
                    loaded.state.step
                ),
            });
        }
        model =
            checkpoint::load_trainable(model, &loaded.params, &dir.join("trainable.safetensors"))?;
        optim.state = loaded.optim;
        state = loaded.state;
        observer.notice(&format!(
            "resumed from {} at step {}",
            dir.display(),
            state.step
        ));
    }
    Ok(Started {
        model,
        optim,
        state,
        warmup,
    })
}

/// Keys whose values differ between two canonical-JSON configs, as `section.key: old -> new`.
pub fn config_diff(old: &str, new: &str) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{prefix}: {a} -> {b}")),
            _ => {}
        }
    }
    let (Ok(a), Ok(b)) = (
        serde_json::from_str::<serde_json::Value>(old),
        serde_json::from_str::<serde_json::Value>(new),
    ) else {
        return vec!["configuration".to_string()];
    };
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

/// The error of a diverged run: the cause, what was (not) written, and what to change.
fn diverged(cause: &str, tr: &TrainSection, last_checkpoint: Option<&Path>) -> TrainError {
    let written = match last_checkpoint {
        None => "no checkpoint or model was written".to_string(),
        Some(c) => format!(
            "nothing was written after {} (the last checkpoint, with finite weights)",
            c.display()
        ),
    };
    TrainError::Diverged(format!(
        "{cause}; {written}. Lower [train] learning_rate (now {}), keep [train] max_grad_norm > 0 (now {}), \
         check the loss plugin's parameters and the data's weights, or raise [train] max_skipped_steps \
         (0 = never stop)",
        crate::config::fmt_num(tr.learning_rate),
        crate::config::fmt_num(tr.max_grad_norm)
    ))
}

#[cfg(test)]
mod best_tests {
    use super::*;

    /// transformers' EarlyStoppingCallback: a strictly better value becomes the best; only an improvement larger
    /// than the threshold resets the patience count.
    #[test]
    fn judging_follows_direction_and_threshold() {
        let b = BestModel {
            patience: 3,
            threshold: 0.1,
            ..BestModel::default()
        };
        let mut s = TrainerState::default();
        let mut seen = Vec::new();
        for (step, v) in [
            (1, 2.0),
            (2, 1.95),
            (3, 1.8),
            (4, 1.9),
            (5, f64::NAN),
            (6, 1.79),
        ] {
            let better = b.judge(&mut s, step, v);
            seen.push((
                better,
                s.best.as_ref().unwrap().step,
                s.evals_without_improvement,
            ));
        }
        // 1.95 is better by 0.05 (< 0.1): best moves, count goes up; 1.8 improves 1.95 by 0.15: reset.
        assert_eq!(
            seen,
            [
                (true, 1, 0),
                (true, 2, 1),
                (true, 3, 0),
                (false, 3, 1),
                (false, 3, 2),
                (true, 6, 3)
            ]
        );
        assert!(b.exhausted(&s));
        let g = BestModel {
            greater_is_better: true,
            metric: "eval_token_accuracy".into(),
            ..BestModel::default()
        };
        let mut s = TrainerState::default();
        assert!(g.judge(&mut s, 1, 0.5));
        assert!(!g.judge(&mut s, 2, 0.4));
        assert!(g.judge(&mut s, 3, 0.6));
        assert_eq!(
            (s.best.as_ref().unwrap().step, s.evals_without_improvement),
            (3, 0)
        );
        assert!(!g.exhausted(&s), "patience 0 never stops");
    }
}
