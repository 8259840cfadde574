//! Token-weighted supervised fine-tuning and continued pretraining as an [`Objective`] of the one loop: the
//! data crate plans steps of micro-batches, [`crate::step::train_micro_batch`] turns each into `sum(w * ce)`
//! gradients, and the step is normalised once over all its tokens (the plugin's [`Normalize`]).

use std::path::PathBuf;

use burn::prelude::*;
use serde::Serialize;
use ytrainer_data::{BatchOptions, Example, Step, plan_epoch};

use crate::config::TrainSection;
use crate::dist::{Shard, Tally};
use crate::loss::{Normalize, TokenReweighter};
use crate::model::CausalLm;
use crate::observe::{Observer, Progress};
use crate::optim::GradAccumulator;
use crate::step::{StepContext, StepCounters, eval_micro_batch, train_micro_batch};
use crate::trainer::{
    Accumulated, EvalLine, LoopSetup, Objective, StepAt, StepLine, StepOutcome, TrainError,
};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step (1-based: the number of updates done after this line).
    pub step: usize,
    /// Epoch of this step (0-based).
    pub epoch: usize,
    /// The optimised loss: `sum(w * ce) / normaliser`.
    pub loss: f64,
    /// Raw mean cross-entropy of the step's supervised tokens.
    pub ce: f64,
    /// Mean plugin weight.
    pub mean_weight: f64,
    /// Fractions of tokens in the zones `learned | learning | hard | noise`.
    pub zone_learned: f64,
    /// See `zone_learned`.
    pub zone_learning: f64,
    /// See `zone_learned`.
    pub zone_hard: f64,
    /// See `zone_learned`.
    pub zone_noise: f64,
    /// Mean predictive entropy (only when a plugin needs it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
    /// Argmax accuracy on the supervised tokens.
    pub token_accuracy: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Supervised tokens in the step.
    pub tokens: usize,
    /// Supervised tokens per second.
    pub tokens_per_s: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
}

impl StepLine for StepMetrics {
    fn progress(&self) -> Progress {
        Progress {
            step: self.step,
            loss: self.loss,
            lr: self.lr,
            tokens_per_s: self.tokens_per_s,
            skipped: self.skipped,
            detail: format!("ce {:.4} w {:.3}", self.ce, self.mean_weight),
        }
    }
}

/// Evaluation result.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct EvalMetrics {
    /// Step at which it was measured.
    pub step: usize,
    /// Mean CE over supervised tokens.
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub eval_perplexity: f64,
    /// Argmax accuracy.
    pub eval_token_accuracy: f64,
    /// Supervised tokens evaluated.
    pub eval_tokens: usize,
}

impl EvalLine for EvalMetrics {
    fn step(&self) -> usize {
        self.step
    }
    fn summary(&self) -> String {
        format!(
            "loss {:.4} (ppl {:.2}), token accuracy {:.3} over {} tokens",
            self.eval_loss, self.eval_perplexity, self.eval_token_accuracy, self.eval_tokens
        )
    }
}

/// Everything an SFT run needs besides the model: the loop's settings and the objective's own.
pub struct TrainSetup<'a> {
    /// Optimisation, run directory, checkpoints, resume and device (`run.seed` is the batch plan's seed).
    pub run: LoopSetup<'a>,
    /// Batch planning.
    pub batch: BatchOptions,
    /// Training examples.
    pub train_examples: &'a [Example],
    /// Evaluation examples (may be empty).
    pub eval_examples: &'a [Example],
    /// The token plugin.
    pub plugin: &'a dyn TokenReweighter,
    /// Normalisation in force.
    pub normalize: Normalize,
    /// Telemetry zone borders.
    pub zone_borders: [f64; 3],
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps done in total (including before a resume).
    pub steps: usize,
    /// Steps skipped for non-finite values.
    pub skipped_steps: usize,
    /// Supervised tokens trained (including before a resume).
    pub tokens_trained: u64,
    /// Eval before training (absent on resume).
    pub eval_before: Option<EvalMetrics>,
    /// Eval after training.
    pub eval_after: Option<EvalMetrics>,
    /// Last step's raw CE.
    pub final_train_ce: Option<f64>,
    /// Last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Wall-clock seconds of the loop.
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

/// The full step plan over all epochs, capped at `max_steps`. A pure function of the data and options, which is
/// what makes resume exact: the resumed run rebuilds the same plan and skips what was done.
pub fn plan(
    examples: &[Example],
    opts: &BatchOptions,
    train: &TrainSection,
) -> Result<Vec<(usize, Step)>, TrainError> {
    let mut steps = Vec::new();
    for epoch in 0..train.epochs.max(1) {
        for s in plan_epoch(examples, opts, epoch)? {
            steps.push((epoch, s));
            if train.max_steps > 0 && steps.len() >= train.max_steps {
                return Ok(steps);
            }
        }
    }
    Ok(steps)
}

/// Mean CE / accuracy over `examples` (no gradient).
pub fn evaluate<M: CausalLm>(
    model: &M,
    examples: &[Example],
    opts: &BatchOptions,
    zone_borders: [f64; 3],
    device: &Device,
    step: usize,
) -> Option<EvalMetrics> {
    eval_counters(model, examples, opts, zone_borders, device, Shard::ALL)
        .map(|c| eval_metrics(&c, step))
}

/// The eval line of counters summed over the whole eval set.
pub fn eval_metrics(total: &StepCounters, step: usize) -> EvalMetrics {
    let loss = total.mean_ce();
    EvalMetrics {
        step,
        eval_loss: loss,
        eval_perplexity: loss.exp(),
        eval_token_accuracy: total.correct as f64 / total.tokens.max(1) as f64,
        eval_tokens: total.tokens,
    }
}

/// The counters of `shard`'s micro-batches of the eval set (no gradient); `None` when `examples` is empty.
pub fn eval_counters<M: CausalLm>(
    model: &M,
    examples: &[Example],
    opts: &BatchOptions,
    zone_borders: [f64; 3],
    device: &Device,
    shard: Shard,
) -> Option<StepCounters> {
    if examples.is_empty() {
        return None;
    }
    let opts = BatchOptions {
        shuffle: false,
        tokens_per_step: usize::MAX / 4,
        micro_batches_per_step: 0,
        mode: ytrainer_data::Mode::OnePass,
        ..opts.clone()
    };
    // Evaluation needs no graph: a plain-device copy of the model (dropout off) on the plain device.
    let model = model.valid();
    let device = device.clone().inner();
    let mut total = StepCounters::default();
    let mut i = 0;
    for s in plan_epoch(examples, &opts, 0).unwrap_or_default() {
        for mb in &s.micro_batches {
            if shard.owns(i) {
                total.merge(&eval_micro_batch(&model, mb, zone_borders, &device));
            }
            i += 1;
        }
    }
    Some(total)
}

/// The token-weighted objective: one plugin weighting every supervised token's cross-entropy.
pub struct TokenObjective<'a> {
    setup: &'a TrainSetup<'a>,
}

/// One step's counters and the normaliser they imply.
pub struct TokenTally {
    counters: StepCounters,
    denominator: f64,
}

impl Tally for TokenTally {
    fn to_sums(&self) -> Vec<f64> {
        self.counters.to_sums()
    }
    fn set_sums(&mut self, sums: &[f64]) {
        self.counters.set_sums(sums);
    }
}

impl<'a> TokenObjective<'a> {
    /// The objective of an SFT setup.
    pub fn new(setup: &'a TrainSetup<'a>) -> Self {
        TokenObjective { setup }
    }
}

impl<M: CausalLm> Objective<M> for TokenObjective<'_> {
    type Unit = Step;
    type Tally = TokenTally;
    type EvalTally = StepCounters;
    type Metrics = StepMetrics;
    type Eval = EvalMetrics;

    fn plan(&self) -> Result<Vec<(usize, Step)>, TrainError> {
        plan(
            self.setup.train_examples,
            &self.setup.batch,
            self.setup.run.train,
        )
    }

    fn accumulate(
        &self,
        model: &M,
        step: &Step,
        at: StepAt,
        grads: &mut GradAccumulator,
    ) -> Result<TokenTally, TrainError> {
        let s = self.setup;
        let ctx = StepContext {
            step: at.index,
            progress: at.progress(),
            zone_borders: s.zone_borders,
        };
        let mut c = StepCounters::default();
        let costs: Vec<usize> = step
            .micro_batches
            .iter()
            .map(|mb| mb.batch * mb.seq)
            .collect();
        let mine = at.shard.deal(&costs);
        for (i, mb) in step.micro_batches.iter().enumerate() {
            if !mine[i] {
                continue;
            }
            at.seed_micro_batch(s.run.device, i);
            let mc = train_micro_batch(model, mb, s.plugin, ctx, grads, s.run.device).map_err(
                |source| TrainError::Plugin {
                    step: at.index,
                    source,
                },
            )?;
            c.merge(&mc);
            if mc.nonfinite > 0 {
                break;
            }
        }
        Ok(TokenTally {
            counters: c,
            denominator: f64::NAN,
        })
    }

    fn conclude(&self, tally: TokenTally) -> Accumulated<TokenTally> {
        // The normaliser of the whole step: counters summed over every rank, never a rank's own.
        let c = tally.counters;
        let denominator =
            self.setup
                .normalize
                .denominator(c.tokens as f64, c.nonzero, c.weight_sum);
        Accumulated {
            scale: 1.0 / denominator,
            nonfinite: c.nonfinite > 0 || !c.ce_sum.is_finite(),
            tokens: c.tokens,
            tally: TokenTally {
                counters: c,
                denominator,
            },
        }
    }

    fn metrics(&self, acc: &Accumulated<TokenTally>, o: &StepOutcome) -> StepMetrics {
        let c = &acc.tally.counters;
        let n = c.tokens.max(1) as f64;
        StepMetrics {
            step: o.at.index + 1,
            epoch: o.at.epoch,
            loss: c.weighted_sum / acc.tally.denominator,
            ce: c.mean_ce(),
            mean_weight: c.weight_sum / n,
            zone_learned: c.zones[0] as f64 / n,
            zone_learning: c.zones[1] as f64 / n,
            zone_hard: c.zones[2] as f64 / n,
            zone_noise: c.zones[3] as f64 / n,
            entropy: c.entropy_sum.map(|e| e / n),
            token_accuracy: c.correct as f64 / n,
            lr: o.lr,
            grad_norm: o.grad_norm,
            tokens: c.tokens,
            tokens_per_s: c.tokens as f64 / o.seconds.max(1e-9),
            skipped: o.skipped,
        }
    }

    fn evaluate(
        &self,
        model: &M,
        _step: usize,
        shard: Shard,
    ) -> Result<Option<StepCounters>, TrainError> {
        let s = self.setup;
        Ok(eval_counters(
            model,
            s.eval_examples,
            &s.batch,
            s.zone_borders,
            s.run.device,
            shard,
        ))
    }

    fn eval_line(&self, tally: &StepCounters, step: usize) -> EvalMetrics {
        eval_metrics(tally, step)
    }
}

/// Trains `model` with a token plugin and returns it with the summary. Checkpoints go to
/// `output_dir/checkpoint-N`.
pub fn train<M: CausalLm>(
    model: M,
    setup: &TrainSetup<'_>,
    observer: &mut dyn Observer,
) -> Result<(M, TrainSummary), TrainError> {
    let (model, r) =
        crate::trainer::train(model, &TokenObjective::new(setup), &setup.run, observer)?;
    Ok((
        model,
        TrainSummary {
            steps: r.steps,
            skipped_steps: r.skipped_steps,
            tokens_trained: r.tokens_trained,
            eval_before: r.eval_before,
            eval_after: r.eval_after,
            final_train_ce: r.last_applied.map(|m| m.ce),
            last_checkpoint: r.last_checkpoint,
            best: r.best,
            stopped_early_at: r.stopped_early_at,
            loaded_best: r.loaded_best,
            seconds: r.seconds,
        },
    ))
}
