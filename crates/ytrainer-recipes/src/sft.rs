//! Token-weighted training (SFT and continued pretraining) as a library call: data, model, reference model,
//! the one training loop with the plugin's objective, export and `summary.json`.

use std::fs;
use std::path::{Path, PathBuf};

use ytrainer_core::config::{RunConfig, TrainMode, TrainingType};
use ytrainer_core::loss::{Params, TokenReweighter};
use ytrainer_core::model::CausalLm;
use ytrainer_core::observe::Observer;
use ytrainer_core::sft::{self, TrainSetup, TrainSummary};
use ytrainer_data::{
    BatchOptions, DataOptions, DataStats, Example, Mode, Record, load_records_with, prepare,
};
use ytrainer_models::{AdapterSpec, load_pretrained};

use crate::bail;
use crate::common::{Ran, RunOptions};
use crate::error::{Context, Result};
use crate::plan::RunPlan;
use crate::source::{pad_id, resolve_model_dir, tokenizer_and_template, training_device};

/// What a token-weighted run did.
#[derive(Debug)]
pub struct SftReport {
    /// The loop's summary (steps, evals before / after, last checkpoint).
    pub summary: TrainSummary,
    /// What data preparation kept, truncated and skipped.
    pub data: DataStats,
    /// Data warnings (file:line and what was wrong).
    pub warnings: Vec<String>,
    /// The run directory.
    pub output_dir: PathBuf,
    /// The exported model (`<output dir>/final`).
    pub final_dir: PathBuf,
    /// The step plan the run followed (steps, tokens and micro-batches per step, what could not be honoured).
    pub plan: RunPlan,
}

/// The data crate's options from the config.
pub fn data_options(cfg: &RunConfig) -> DataOptions {
    DataOptions {
        max_seq_len: cfg.data.max_seq_len,
        overlong: cfg.data.overlong,
        train_on: cfg.data.train_on,
        cpt: cfg.data.training_type == TrainingType::Cpt,
        template_vars: cfg
            .data
            .template_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The batch planner's options from the config. `batch_size` (examples per micro-batch) replaces the padded-token
/// bound and makes steps of `grad_accum` (at least 1) micro-batches; `grad_accum` alone makes steps of that many
/// token-bounded micro-batches.
pub fn batch_options(cfg: &RunConfig, pad_id: u32) -> BatchOptions {
    let t = &cfg.train;
    let (micro_batch_tokens, max_micro_batch_size, micro_batches_per_step) = if t.batch_size > 0 {
        (usize::MAX, t.batch_size, t.grad_accum.max(1))
    } else {
        (t.micro_batch_tokens, t.max_micro_batch_size, t.grad_accum)
    };
    BatchOptions {
        seed: cfg.train.seed,
        shuffle: cfg.train.shuffle,
        micro_batch_tokens,
        max_micro_batch_size,
        tokens_per_step: cfg.train.tokens_per_step,
        micro_batches_per_step,
        mode: match cfg.train.mode {
            TrainMode::OnePass => Mode::OnePass,
            TrainMode::Windowed => Mode::Windowed {
                token_batch: cfg.train.token_batch,
            },
        },
        pad_id,
    }
}

/// Runs a config whose loss is a token plugin.
pub fn run_sft(
    mut cfg: RunConfig,
    plugin: Box<dyn TokenReweighter>,
    params: &Params,
    opts: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<Ran<SftReport>> {
    let normalize = cfg
        .loss
        .normalize
        .unwrap_or_else(|| plugin.default_normalize());
    cfg.loss.normalize = Some(normalize);
    if opts.dry_run {
        crate::memory::budget(&cfg)?;
        if let Some(plan) = dry_run_plan(&cfg, observer)? {
            for line in plan.lines() {
                observer.notice(&line);
            }
        }
        return Ok(Ran::DryRun(Box::new(cfg)));
    }
    // Read before anything loads: `auto` is a share of what is available to this run.
    let budget = crate::memory::budget(&cfg)?;
    let (out, train_file) = crate::common::output_and_train_file(&cfg, opts)?;
    let model_dir = resolve_model_dir(&cfg, &out, &train_file, &mut |m| observer.notice(m))?;

    // Data.
    let tok_path = model_dir.join("tokenizer.json");
    let (tok, template) = tokenizer_and_template(&cfg, &model_dir)?;
    let mixed = crate::mix::training_mix(&cfg, &train_file)?;
    for u in &mixed.sources {
        observer.notice(&u.describe());
    }
    let mut warnings: Vec<String> = mixed.warnings.clone();
    if cfg.data.eval.is_some() && cfg.data.eval_fraction > 0.0 {
        bail!(
            "[data] sets both `eval` and `eval_fraction`; choose one (an eval file, or a held-out fraction of the training data)"
        );
    }
    let (train_records, mut eval_records): (Vec<Record>, Vec<Record>) = (mixed.train, mixed.eval);
    if let Some(e) = &cfg.data.eval {
        let l = load_records_with(e, &cfg.data.columns)?;
        warnings.extend(l.warnings.iter().map(|w| w.to_string()));
        eval_records = l.records;
    }
    let dopts = data_options(&cfg);
    let mut prepared = prepare(&train_records, &tok, template.as_ref(), &dopts)?;
    let mut eval_examples: Vec<Example> = if eval_records.is_empty() {
        // Without eval data, "loss before/after" is measured on (up to 64) training examples.
        observer.notice(
            "no eval data ([data] eval or eval_fraction): eval loss is measured on the first training examples",
        );
        prepared.examples.iter().take(64).cloned().collect()
    } else {
        prepare(&eval_records, &tok, template.as_ref(), &dopts)?.examples
    };
    if cfg.eval.max_samples > 0 {
        eval_examples.truncate(cfg.eval.max_samples);
    }
    // After the eval examples are taken: without eval data they are the first training examples, unpacked.
    let packing = crate::packing::apply(
        &cfg,
        &mut prepared.examples,
        &batch_options(&cfg, pad_id(&tok)),
    )?;

    // Model.
    let device = training_device(&cfg)?;
    let mut model = crate::common::load_policy(&cfg, &model_dir, &device)?;
    let reference_model = match &cfg.loss.reference_model {
        Some(path) if !plugin.needs().reference_loss && plugin.kl_anchor() == 0.0 => {
            observer.notice(&format!(
                "[loss] reference_model {} is not loaded: loss `{}` does not use a reference model",
                path.display(),
                cfg.loss.name
            ));
            None
        }
        other => other.as_ref(),
    };
    if let Some(path) = reference_model {
        let dir =
            crate::source::model_dir_for_run(path.clone(), true, &mut |m| observer.notice(m))?;
        let (reference, _) = load_pretrained(&dir, &AdapterSpec::Full, &device)
            .with_context(|| format!("loading [loss] reference_model {}", path.display()))?;
        if reference.vocab_size() != model.vocab_size() {
            bail!(
                "[loss] reference_model {} has a vocabulary of {} tokens but the model has {}; the reference must \
                 share the policy's tokenizer",
                path.display(),
                reference.vocab_size(),
                model.vocab_size()
            );
        }
        model = model.with_reference(reference);
    }
    if model.vocab_size() < tok.vocab_size() {
        bail!(
            "the tokenizer ({}) has {} tokens but the model's vocabulary has only {}; use the tokenizer that \
             belongs to this model",
            tok_path.display(),
            tok.vocab_size(),
            model.vocab_size()
        );
    }

    // `--batch-size` fixes the micro-batch in examples: the plan then only estimates its peak.
    let mut plan_cfg = cfg.clone();
    if cfg.train.batch_size > 0 {
        plan_cfg.train.micro_batch_tokens = usize::MAX / 4;
        plan_cfg.train.max_micro_batch_size = cfg.train.batch_size;
    }
    let memory = crate::memory::plan(
        &plan_cfg,
        &crate::memory::ModelFootprint::of(&model),
        &prepared.examples,
        if cfg.train.batch_size > 0 {
            None
        } else {
            budget
        },
    )?;
    observer.notice(&memory.describe());
    let model = model.with_gradient_checkpointing(memory.gradient_checkpointing);
    let mut batch = batch_options(&cfg, pad_id(&tok));
    if cfg.train.batch_size == 0 {
        batch.micro_batch_tokens = memory.micro_batch_tokens;
    }

    let writer = opts.group.is_writer();
    if writer {
        crate::common::write_resolved_config(&cfg, &out)?;
    }

    let mut plan = RunPlan::new(&prepared.examples, &batch, &cfg)?;
    plan.packing = packing;
    let setup = TrainSetup {
        run: crate::common::loop_setup(&cfg, &out, opts, &device)?,
        batch,
        train_examples: &prepared.examples,
        eval_examples: &eval_examples,
        plugin: plugin.as_ref(),
        normalize,
        zone_borders: cfg.loss.zone_borders,
    };
    let s = &prepared.stats;
    let mut loss_desc: Vec<String> = params
        .values()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    loss_desc.push(format!("normalize={}", normalize.as_str()));
    observer.notice(&format!(
        "training {} with loss `{}` ({}) on {} examples ({} supervised tokens) from {}, on {} in precision {}",
        model_dir.display(),
        cfg.loss.name,
        loss_desc.join(", "),
        s.examples,
        s.supervised_tokens,
        train_file.display(),
        cfg.train.device,
        cfg.train.precision
    ));
    for line in plan.lines() {
        observer.notice(&line);
    }
    let (model, summary) = sft::train(model, &setup, observer)?;

    // Final export: what the user takes to the rest of the ecosystem (rank 0's: every rank holds the same).
    let final_dir = out.join("final");
    if writer {
        let (_, files) = crate::common::export_final(&model, &cfg, &model_dir, &out)?;
        write_summary(&out, &summary, s, &warnings, &files, &plan)?;
    }
    Ok(Ran::Trained(Box::new(SftReport {
        summary,
        data: s.clone(),
        warnings,
        output_dir: out,
        final_dir,
        plan,
    })))
}

/// `--dry-run`'s plan: the training data tokenized with the model's tokenizer (a directory's, a GGUF's metadata,
/// or the one the `tiny` preset would train) and planned as the loop would; nothing is written. `None` (with a
/// notice) when the config names no training data.
fn dry_run_plan(cfg: &RunConfig, observer: &mut dyn Observer) -> Result<Option<RunPlan>> {
    let Some(train_file) = &cfg.data.train else {
        observer.notice("plan: no training data given ([data] train / --data)");
        return Ok(None);
    };
    let (tok, template) = match (&cfg.model.path, &cfg.model.preset) {
        (Some(p), _) if p.is_file() => crate::source::load_tokenizer(p)?,
        (Some(p), _) => tokenizer_and_template(cfg, p)?,
        (None, Some(_)) => {
            let existing = cfg.output.dir.join("base-model");
            if existing.join("tokenizer.json").is_file() {
                tokenizer_and_template(cfg, &existing)?
            } else {
                let (tok, t) = crate::preset::tiny_tokenizer_with(train_file, &cfg.data.columns)?;
                (tok, Some(t))
            }
        }
        (None, None) => bail!("no model given"),
    };
    let mixed = crate::mix::training_mix(cfg, train_file)?;
    for u in &mixed.sources {
        observer.notice(&u.describe());
    }
    let train_records = mixed.train;
    let mut prepared = prepare(&train_records, &tok, template.as_ref(), &data_options(cfg))?;
    let batch = batch_options(cfg, pad_id(&tok));
    let packing = crate::packing::apply(cfg, &mut prepared.examples, &batch)?;
    let mut plan = RunPlan::new(&prepared.examples, &batch, cfg)?;
    plan.packing = packing;
    Ok(Some(plan))
}

fn write_summary(
    out: &Path,
    summary: &TrainSummary,
    s: &DataStats,
    warnings: &[String],
    files: &[PathBuf],
    plan: &RunPlan,
) -> Result<()> {
    let summary_json = serde_json::json!({
        "summary": summary,
        "plan": plan,
        "data": {
            "examples": s.examples, "supervised_tokens": s.supervised_tokens, "truncated": s.truncated,
            "skipped_overlong": s.skipped_overlong, "skipped_no_targets": s.skipped_no_targets,
            "warnings": warnings,
        },
        "exported": files,
        // The process's peak resident memory so far (Linux), to compare with the plan's estimate.
        "peak_rss_mb": crate::bench::peak_rss_mb(),
        "ytrainer": crate::build_info(),
    });
    fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary_json)?,
    )?;
    Ok(())
}
