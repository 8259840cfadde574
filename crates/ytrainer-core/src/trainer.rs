//! The training loop: plan steps from the data, run micro-batches through [`crate::step`], normalise over the
//! accumulated step, clip by global norm, update with AdamW, log, evaluate, checkpoint, resume.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use serde::Serialize;
use ytrainer_data::{BatchOptions, Example, Step, plan_epoch};

use crate::checkpoint::{self, CheckpointError, TrainerState};
use crate::config::TrainSection;
use crate::loss::{Normalize, TokenReweighter};
use crate::model::CausalLm;
use crate::optim::{AdamW, AdamWConfig, GradAccumulator, lr_at};
use crate::step::{StepContext, StepCounters, StepError, eval_micro_batch, train_micro_batch};

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Plugin misbehaved.
    #[error("step {step}: {source}")]
    Plugin {
        /// Optimizer step.
        step: usize,
        /// Cause.
        source: StepError,
    },
    /// Output could not be written.
    #[error("{path}: {message}")]
    Output {
        /// File.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// Resume does not match this run.
    #[error("cannot resume from {path}: {message}")]
    Resume {
        /// Checkpoint.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// The data could not be planned into steps.
    #[error(transparent)]
    Data(#[from] ytrainer_data::DataError),
    /// Nothing to train on.
    #[error(
        "the training data yields no optimizer step (no supervised tokens); check `[data] train_on` and the data file"
    )]
    NoSteps,
}

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

/// Receives progress (the CLI draws bars; tests record).
pub trait Observer {
    /// Called once before the first step with the planned number of steps and the first step to run.
    fn start(&mut self, _total_steps: usize, _first_step: usize) {}
    /// After each optimizer step.
    fn step(&mut self, _m: &StepMetrics) {}
    /// After each evaluation.
    fn eval(&mut self, _m: &EvalMetrics) {}
    /// Free-form notice (checkpoint written, step skipped...).
    fn notice(&mut self, _msg: &str) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Everything the loop needs besides the model.
pub struct TrainSetup<'a> {
    /// Optimisation settings.
    pub train: &'a TrainSection,
    /// Batch planning.
    pub batch: BatchOptions,
    /// Training examples.
    pub train_examples: &'a [Example],
    /// Evaluation examples (may be empty).
    pub eval_examples: &'a [Example],
    /// Evaluate every N steps (0 = before and after only).
    pub eval_every: usize,
    /// The token plugin.
    pub plugin: &'a dyn TokenReweighter,
    /// Normalisation in force.
    pub normalize: Normalize,
    /// Telemetry zone borders.
    pub zone_borders: [f64; 3],
    /// Run directory.
    pub output_dir: &'a Path,
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
    if examples.is_empty() {
        return None;
    }
    let opts = BatchOptions {
        shuffle: false,
        tokens_per_step: usize::MAX / 4,
        mode: ytrainer_data::Mode::OnePass,
        ..opts.clone()
    };
    // Evaluation needs no graph: a plain-device copy of the model (dropout off) on the plain device.
    let model = model.valid();
    let device = device.clone().inner();
    let mut total = StepCounters::default();
    for s in plan_epoch(examples, &opts, 0).unwrap_or_default() {
        for mb in &s.micro_batches {
            total.merge(&eval_micro_batch(&model, mb, zone_borders, &device));
        }
    }
    let loss = total.mean_ce();
    Some(EvalMetrics {
        step,
        eval_loss: loss,
        eval_perplexity: loss.exp(),
        eval_token_accuracy: total.correct as f64 / total.tokens.max(1) as f64,
        eval_tokens: total.tokens,
    })
}

/// An append-only JSON-lines log (`metrics.jsonl`, `eval.jsonl`), truncated unless resuming.
pub(crate) struct Jsonl {
    file: fs::File,
    path: PathBuf,
}

impl Jsonl {
    pub(crate) fn open(path: PathBuf, append: bool) -> Result<Self, TrainError> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&path)
            .map_err(|e| TrainError::Output {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Jsonl { file, path })
    }
    pub(crate) fn write(&mut self, v: &impl Serialize) -> Result<(), TrainError> {
        let line = serde_json::to_string(v).unwrap_or_default();
        writeln!(self.file, "{line}").map_err(|e| TrainError::Output {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}

/// The TensorBoard sink beside the JSONL files: the same records, as scalars under the same names.
pub(crate) struct Tensorboard(crate::tensorboard::EventWriter);

impl Tensorboard {
    pub(crate) fn create(dir: &Path) -> Result<Self, TrainError> {
        crate::tensorboard::EventWriter::create(dir)
            .map(Tensorboard)
            .map_err(|e| TrainError::Output {
                path: dir.to_path_buf(),
                message: format!("cannot create the TensorBoard event file: {e}"),
            })
    }
    pub(crate) fn write(&mut self, step: usize, v: &impl Serialize) -> Result<(), TrainError> {
        self.0
            .record_fields(step, v)
            .map_err(|e| TrainError::Output {
                path: self.0.path().to_path_buf(),
                message: e.to_string(),
            })
    }
}

/// A loop's starting point: the model (restored on resume), optimizer, position and warmup length.
pub(crate) struct Started<M> {
    pub(crate) model: M,
    pub(crate) optim: AdamW,
    pub(crate) state: TrainerState,
    pub(crate) warmup: usize,
}

/// Builds the optimizer and trainer state for a run of `total` steps, restoring both (and the trainable
/// parameters) from `resume` when given. Shared by the SFT and preference loops.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start<M: CausalLm>(
    mut model: M,
    tr: &TrainSection,
    total: usize,
    seed: u64,
    fingerprint: &str,
    resume: Option<&Path>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<Started<M>, TrainError> {
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
    });
    let mut state = TrainerState {
        step: 0,
        total_steps: total,
        skipped_steps: 0,
        tokens_trained: 0,
        seed,
        config_fingerprint: fingerprint.to_string(),
    };
    if let Some(dir) = resume {
        let loaded = checkpoint::load(dir, device)?;
        if loaded.state.config_fingerprint != fingerprint {
            let differing = config_diff(&loaded.state.config_fingerprint, fingerprint);
            return Err(TrainError::Resume {
                path: dir.to_path_buf(),
                message: format!(
                    "the run's settings differ from the ones the checkpoint was written with ({}); resume with \
                     the same config and flags (see config.resolved.toml in the run directory)",
                    differing.join(", ")
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

/// Trains `model` and returns it with the summary. Checkpoints go to `output_dir/checkpoint-N`.
pub fn train<M: CausalLm>(
    mut model: M,
    setup: &TrainSetup<'_>,
    observer: &mut dyn Observer,
) -> Result<(M, TrainSummary), TrainError> {
    let t0 = Instant::now();
    let steps = plan(setup.train_examples, &setup.batch, setup.train)?;
    if steps.is_empty() {
        return Err(TrainError::NoSteps);
    }
    let total = steps.len();
    let tr = setup.train;
    let Started {
        model: resumed_model,
        mut optim,
        mut state,
        warmup,
    } = start(
        model,
        tr,
        total,
        setup.batch.seed,
        &setup.fingerprint,
        setup.resume.as_deref(),
        setup.device,
        observer,
    )?;
    model = resumed_model;
    fs::create_dir_all(setup.output_dir).map_err(|e| TrainError::Output {
        path: setup.output_dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let resumed = setup.resume.is_some();
    let mut metrics = Jsonl::open(setup.output_dir.join("metrics.jsonl"), resumed)?;
    let mut eval_log = Jsonl::open(setup.output_dir.join("eval.jsonl"), resumed)?;
    let mut tb = Tensorboard::create(setup.output_dir)?;

    let eval_before = if resumed {
        None
    } else {
        let e = evaluate(
            &model,
            setup.eval_examples,
            &setup.batch,
            setup.zone_borders,
            setup.device,
            0,
        );
        if let Some(e) = &e {
            eval_log.write(e)?;
            tb.write(e.step, e)?;
            observer.eval(e);
        }
        e
    };

    observer.start(total, state.step);
    let mut acc = GradAccumulator::default();
    let mut last_ce = None;
    let mut last_checkpoint = None;
    for (index, (epoch, step)) in steps.iter().enumerate().skip(state.step) {
        let ts = Instant::now();
        // Reseeding per step makes any randomness inside the step (LoRA dropout) a function of (seed, step), so a
        // resumed run draws exactly what the uninterrupted run drew.
        setup
            .device
            .seed(crate::rng::step_seed(setup.batch.seed, index));
        let ctx = StepContext {
            step: index,
            progress: index as f64 / total as f64,
            zone_borders: setup.zone_borders,
        };
        let mut c = StepCounters::default();
        for mb in &step.micro_batches {
            let mc = train_micro_batch(&model, mb, setup.plugin, ctx, &mut acc, setup.device)
                .map_err(|source| TrainError::Plugin {
                    step: index,
                    source,
                })?;
            c.merge(&mc);
            if mc.nonfinite > 0 {
                break;
            }
        }
        let lr = lr_at(
            tr.lr_scheduler,
            tr.learning_rate,
            index,
            total,
            warmup,
            tr.min_lr_ratio,
        );
        let denom = setup
            .normalize
            .denominator(c.tokens as f64, c.nonzero, c.weight_sum);
        let scale = 1.0 / denom;
        let grad_norm = if acc.is_empty() {
            0.0
        } else {
            acc.global_norm(scale)
        };
        let skipped = c.nonfinite > 0 || !grad_norm.is_finite() || !c.ce_sum.is_finite();
        if skipped {
            acc.clear();
            state.skipped_steps += 1;
            observer.notice(&format!(
                "step {}: non-finite loss or gradient, update skipped ({} skipped so far)",
                index + 1,
                state.skipped_steps
            ));
        } else if !acc.is_empty() {
            let clip = if tr.max_grad_norm > 0.0 && grad_norm > tr.max_grad_norm {
                tr.max_grad_norm / grad_norm
            } else {
                1.0
            };
            model = optim.step(model, &mut acc, lr, scale * clip);
        }
        state.step = index + 1;
        state.tokens_trained += c.tokens as u64;
        let n = c.tokens.max(1) as f64;
        let m = StepMetrics {
            step: index + 1,
            epoch: *epoch,
            loss: c.weighted_sum / denom,
            ce: c.mean_ce(),
            mean_weight: c.weight_sum / n,
            zone_learned: c.zones[0] as f64 / n,
            zone_learning: c.zones[1] as f64 / n,
            zone_hard: c.zones[2] as f64 / n,
            zone_noise: c.zones[3] as f64 / n,
            entropy: c.entropy_sum.map(|e| e / n),
            token_accuracy: c.correct as f64 / n,
            lr,
            grad_norm,
            tokens: c.tokens,
            tokens_per_s: c.tokens as f64 / ts.elapsed().as_secs_f64().max(1e-9),
            skipped,
        };
        if !skipped {
            last_ce = Some(m.ce);
        }
        metrics.write(&m)?;
        tb.write(m.step, &m)?;
        observer.step(&m);

        let done = index + 1 == total;
        if setup.eval_every > 0
            && (index + 1) % setup.eval_every == 0
            && !done
            && let Some(e) = evaluate(
                &model,
                setup.eval_examples,
                &setup.batch,
                setup.zone_borders,
                setup.device,
                index + 1,
            )
        {
            eval_log.write(&e)?;
            tb.write(e.step, &e)?;
            observer.eval(&e);
        }
        if (setup.save_every > 0 && (index + 1) % setup.save_every == 0) || done {
            let dir = setup.output_dir.join(format!("checkpoint-{}", index + 1));
            checkpoint::save(&dir, &model, &optim.state, &state, |tmp| {
                model.export(&tmp.join("export")).map(|_| ())
            })?;
            observer.notice(&format!("checkpoint written: {}", dir.display()));
            last_checkpoint = Some(dir);
            prune(setup.output_dir, setup.save_total_limit);
        }
    }
    let eval_after = evaluate(
        &model,
        setup.eval_examples,
        &setup.batch,
        setup.zone_borders,
        setup.device,
        state.step,
    );
    if let Some(e) = &eval_after {
        eval_log.write(e)?;
        tb.write(e.step, e)?;
        observer.eval(e);
    }
    Ok((
        model,
        TrainSummary {
            steps: state.step,
            skipped_steps: state.skipped_steps,
            tokens_trained: state.tokens_trained,
            eval_before,
            eval_after,
            final_train_ce: last_ce,
            last_checkpoint,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// Keys whose values differ between two canonical-JSON configs, as `section.key: old -> new`.
fn config_diff(old: &str, new: &str) -> Vec<String> {
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

fn prune(run_dir: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let all = checkpoint::list(run_dir);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            let _ = fs::remove_dir_all(p);
        }
    }
}
