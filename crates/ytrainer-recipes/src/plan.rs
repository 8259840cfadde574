//! The step plan of a token-weighted run, summarised for people before training (and by `--dry-run`): steps per
//! epoch and in total, supervised tokens and micro-batches per step, the largest micro-batch, and a warning for
//! every requested size the data and batching cannot honour. Built from the same `plan_epoch` calls the loop
//! makes, one epoch at a time, so the figures are the loop's own.

use ytrainer_core::config::{RunConfig, TrainMode};
use ytrainer_data::{BatchOptions, Example, plan_epoch};

use crate::error::Result;

/// `min`, mean and `max` of a count over steps (or micro-batches).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Spread {
    pub min: usize,
    pub mean: f64,
    pub max: usize,
}

impl Spread {
    fn of(values: &[usize]) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        Spread {
            min: *values.iter().min().expect("not empty"),
            mean: values.iter().sum::<usize>() as f64 / values.len() as f64,
            max: *values.iter().max().expect("not empty"),
        }
    }

    fn show(&self) -> String {
        if self.min == self.max {
            format!("{}", self.min)
        } else {
            format!("{}-{} (mean {:.0})", self.min, self.max, self.mean)
        }
    }
}

/// What the loop will run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunPlan {
    /// Epochs the data is passed over (at least 1).
    pub epochs: usize,
    /// Steps each epoch's data makes, before `max_steps` cuts them.
    pub steps_per_epoch: Vec<usize>,
    /// Optimizer steps the run will take (`max_steps` applied).
    pub total_steps: usize,
    /// `[train] max_steps` (0 = no limit).
    pub max_steps: usize,
    /// Supervised tokens per step (the budget is `tokens_per_step`), over the steps the run takes.
    pub tokens_per_step: Spread,
    /// Micro-batches (forward/backward passes) per step.
    pub micro_batches_per_step: Spread,
    /// Rows per micro-batch.
    pub rows_per_micro_batch: Spread,
    /// Supervised tokens per micro-batch.
    pub tokens_per_micro_batch: Spread,
    /// Padded tokens (`rows x length`) of the largest micro-batch: what bounds activation memory.
    pub largest_micro_batch_tokens: usize,
    /// Requested sizes the plan cannot honour, each with what to change.
    pub warnings: Vec<String>,
    /// What sample packing does to the padded tokens (SFT in one-pass mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<crate::packing::PackingReport>,
}

impl RunPlan {
    /// Plans every epoch of `examples` as the loop will (`opts` from [`crate::sft::batch_options`]).
    pub fn new(examples: &[Example], opts: &BatchOptions, cfg: &RunConfig) -> Result<RunPlan> {
        let train = &cfg.train;
        let epochs = train.epochs.max(1);
        let cap = if train.max_steps > 0 {
            train.max_steps
        } else {
            usize::MAX
        };
        let (mut steps_per_epoch, mut tokens, mut mbs, mut rows, mut mb_tokens) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut largest = 0;
        for epoch in 0..epochs {
            let steps = plan_epoch(examples, opts, epoch)?;
            steps_per_epoch.push(steps.len());
            for s in steps {
                if tokens.len() == cap {
                    break;
                }
                tokens.push(s.num_targets());
                mbs.push(s.micro_batches.len());
                for mb in &s.micro_batches {
                    rows.push(mb.batch);
                    mb_tokens.push(mb.num_targets());
                    largest = largest.max(mb.batch * mb.seq);
                }
            }
        }
        let total_steps = tokens.len();
        let mut plan = RunPlan {
            epochs,
            steps_per_epoch,
            total_steps,
            max_steps: train.max_steps,
            tokens_per_step: Spread::of(&tokens),
            micro_batches_per_step: Spread::of(&mbs),
            rows_per_micro_batch: Spread::of(&rows),
            tokens_per_micro_batch: Spread::of(&mb_tokens),
            largest_micro_batch_tokens: largest,
            warnings: Vec::new(),
            packing: None,
        };
        plan.warnings = plan.check(cfg);
        Ok(plan)
    }

    fn check(&self, cfg: &RunConfig) -> Vec<String> {
        let train = &cfg.train;
        let mut w = Vec::new();
        if train.max_steps > 0 && self.total_steps < train.max_steps {
            w.push(format!(
                "max_steps = {} cannot be reached: the data makes only {} steps in {} epoch(s) ({} per epoch); \
                 the run stops after {}. Raise --epochs, or lower --tokens-per-step for more, smaller steps",
                train.max_steps,
                self.total_steps,
                self.epochs,
                self.steps_per_epoch.first().copied().unwrap_or(0),
                self.total_steps
            ));
        }
        if train.mode == TrainMode::OnePass && self.total_steps > 0 {
            // A step closes once it holds `tokens_per_step` supervised tokens; when one micro-batch alone holds
            // more than that, steps are single micro-batches far above the budget, whatever it says.
            let budget = train.tokens_per_step as f64;
            if self.tokens_per_micro_batch.mean >= budget
                && self.tokens_per_step.mean > 1.5 * budget
            {
                w.push(format!(
                    "tokens_per_step = {} cannot be honoured: one micro-batch (up to micro_batch_tokens = {} padded \
                     tokens, max_micro_batch_size = {} rows) already holds {} supervised tokens, so steps hold {} \
                     supervised tokens. Lower [train] micro_batch_tokens (--set train.micro_batch_tokens=N) or \
                     max_micro_batch_size for steps near the budget",
                    train.tokens_per_step,
                    train.micro_batch_tokens,
                    train.max_micro_batch_size,
                    self.tokens_per_micro_batch.show(),
                    self.tokens_per_step.show(),
                ));
            }
        }
        w
    }

    /// The plan as lines for a person.
    pub fn lines(&self) -> Vec<String> {
        let per_epoch = match self.steps_per_epoch.as_slice() {
            [] => "0".to_string(),
            [first, rest @ ..] if rest.iter().all(|s| s == first) => first.to_string(),
            all => all
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        };
        let limit = if self.max_steps > 0 {
            format!(" (max_steps {})", self.max_steps)
        } else {
            String::new()
        };
        let mut v = vec![
            format!(
                "plan: {} optimizer steps{limit}: {} epoch(s) of {per_epoch} steps",
                self.total_steps, self.epochs
            ),
            format!(
                "  per step: {} supervised tokens in {} micro-batch(es); {} rows per micro-batch, largest \
                 micro-batch {} padded tokens",
                self.tokens_per_step.show(),
                self.micro_batches_per_step.show(),
                self.rows_per_micro_batch.show(),
                self.largest_micro_batch_tokens
            ),
        ];
        v.extend(self.packing.iter().map(|p| p.line()));
        v.extend(self.warnings.iter().map(|w| format!("warning: {w}")));
        v
    }
}
