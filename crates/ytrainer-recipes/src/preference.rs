//! Preference training (`dpo`, `cdpo`, `ipo`, `hinge`, `simpo`, `dpo-nlirg`, external pairwise plugins) as a
//! library call: load and tokenize pairs, set up the reference log-probabilities, train with the one loop and
//! the pairwise objective, export, summarise.

use std::fs;
use std::path::{Path, PathBuf};

use ytrainer_core::config::{AdapterKind, RunConfig};
use ytrainer_core::device::Precision;
use ytrainer_core::loss::{PairwiseObjective, Params};
use ytrainer_core::model::CausalLm;
use ytrainer_core::observe::Observer;
use ytrainer_core::preference::{
    PrefSetup, PrefSummary, Reference, base_reference, precompute_reference, train_pairs,
};
use ytrainer_data::{PairExample, PairRecord, load_kto, load_pairs, tokenize_pair};
use ytrainer_models::{AdapterSpec, load_pretrained};

use crate::bail;
use crate::common::{Ran, RunOptions};
use crate::error::{Context, Result};
use crate::source::{pad_id, resolve_model_dir, tokenizer_and_template, training_device};

/// What a preference run did.
#[derive(Debug)]
pub struct PrefReport {
    /// The loop's summary.
    pub summary: PrefSummary,
    /// Training pairs after tokenization.
    pub pairs: usize,
    /// Evaluation pairs.
    pub eval_pairs: usize,
    /// Pairs truncated to `max_seq_len`.
    pub truncated: usize,
    /// Data warnings.
    pub warnings: Vec<String>,
    /// The run directory.
    pub output_dir: PathBuf,
    /// The exported model.
    pub final_dir: PathBuf,
}

/// Tokenizes pairs, truncating both sides to `max_len` tokens; pairs left without a supervised completion token
/// on either side are dropped with a warning.
fn tokenize_all(
    pairs: &[PairRecord],
    tok: &ytrainer_data::TokenizerWrapper,
    template: &ytrainer_data::ChatTemplate,
    cfg: &RunConfig,
    warnings: &mut Vec<String>,
) -> Result<(Vec<PairExample>, usize)> {
    let vars = cfg
        .data
        .template_vars
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut out = Vec::with_capacity(pairs.len());
    let mut truncated = 0;
    for p in pairs {
        let mut ex = tokenize_pair(tok, template, p, &vars)?;
        let max = cfg.data.max_seq_len;
        let longest = ex.chosen.len().max(ex.rejected.len());
        if longest > max {
            truncated += 1;
            // Like TRL's `keep_end`: drop the oldest prompt tokens first (the same number on both sides, so the
            // two sides keep one shared prompt), then cut completions that are still too long.
            let prompt_len = ex
                .chosen
                .targets
                .iter()
                .position(|&t| t)
                .unwrap_or(ex.chosen.len());
            let k = (longest - max).min(prompt_len.saturating_sub(1));
            for side in [&mut ex.chosen, &mut ex.rejected] {
                if k > 0 {
                    let mut targets = side.targets[k..].to_vec();
                    targets[0] = false;
                    let origin = side.origin.clone();
                    *side = ytrainer_data::Example::single(
                        side.input_ids[k..].to_vec(),
                        targets,
                        origin,
                    );
                }
                side.truncate(max);
            }
        }
        if ex.chosen.num_targets() == 0 || ex.rejected.num_targets() == 0 {
            warnings.push(format!(
                "{}: the prompt fills all {max} tokens of [data] max_seq_len, so no completion token is left (pair dropped)",
                p.origin
            ));
            continue;
        }
        out.push(ex);
    }
    Ok((out, truncated))
}

/// Reference log-probabilities of the training pairs, cached in the run directory (a resumed run reuses them;
/// only the `writer`, rank 0 of a data-parallel run, writes the cache).
fn reference_cache(
    path: &Path,
    pairs: &[PairExample],
    writer: bool,
    compute: impl FnOnce() -> Vec<(f32, f32)>,
) -> Result<Vec<(f32, f32)>> {
    if let Ok(text) = fs::read_to_string(path)
        && let Ok(v) = serde_json::from_str::<Vec<(f32, f32)>>(&text)
        && v.len() == pairs.len()
    {
        return Ok(v);
    }
    let v = compute();
    if !writer {
        return Ok(v);
    }
    fs::write(path, serde_json::to_string(&v)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(v)
}

/// Runs preference training for a resolved config whose loss is pairwise.
pub fn run_preference(
    mut cfg: RunConfig,
    objective: Box<dyn PairwiseObjective>,
    params: &Params,
    opts: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<Ran<PrefReport>> {
    cfg.loss.normalize = None;
    // Examples per micro-batch and accumulation by count mean pairs here: `[train] batch_size` pairs per forward
    // pass, `grad_accum` of them per step.
    let t = &cfg.train;
    if t.batch_size > 0 {
        cfg.preference.micro_pairs = t.batch_size;
        cfg.preference.pairs_per_step = t.batch_size * t.grad_accum.max(1);
    } else if t.grad_accum > 0 {
        cfg.preference.pairs_per_step = cfg.preference.micro_pairs.max(1) * t.grad_accum;
    }
    let d = &cfg.data;
    if !d.columns.is_empty() || d.sources.iter().any(|s| !s.columns.is_empty()) {
        bail!(
            "[data] columns apply to SFT and continued pretraining; preference training (`--loss {}`) reads \
             pairs by their own field names (prompt / chosen / rejected, or conversations with chosen and \
             rejected answers; docs/preference.md): remove the column map",
            cfg.loss.name
        );
    }
    if opts.dry_run {
        return Ok(Ran::DryRun(Box::new(cfg)));
    }
    if cfg.train.precision != Precision::F32 {
        bail!(
            "[train] precision = \"{}\" is not supported for preference training (`--loss {}`): its objectives \
             compare sums of per-token log-probabilities over whole answers, which bf16 cannot hold (its spacing \
             is 2.0 at -400); use precision f32",
            cfg.train.precision,
            cfg.loss.name
        );
    }
    if cfg.model.path.is_none() {
        bail!(
            "preference training (`--loss {}`) needs a pretrained model: pass `--model DIR` (a Hugging Face model directory)",
            cfg.loss.name
        );
    }
    let (out, train_file) = crate::common::output_and_train_file(&cfg, opts)?;
    let model_dir = resolve_model_dir(&cfg, &out, &train_file, &mut |m| observer.notice(m))?;
    let (tok, template) = tokenizer_and_template(&cfg, &model_dir)?;
    let template = template.with_context(|| {
        format!(
            "{}: preference training needs the model's chat template",
            model_dir.display()
        )
    })?;

    // KTO reads unpaired, labelled completions; the DPO family reads pairs.
    let load = |path: &std::path::Path| {
        if objective.unpaired() {
            load_kto(path)
        } else {
            load_pairs(path)
        }
    };
    // Several files of pairs mix as SFT's do (`[[data.sources]]`: weights, per-file caps); an eval file
    // replaces the held-out fraction.
    let mut mix_cfg = cfg.clone();
    if cfg.data.eval.is_some() {
        mix_cfg.data.eval_fraction = 0.0;
    }
    let layout = if objective.unpaired() { "kto" } else { "pairs" };
    let mixed = crate::mix::mix_files(&mix_cfg, &train_file, |s| {
        let l = load(&s.path)?;
        Ok((
            l.pairs,
            l.warnings.iter().map(|w| w.to_string()).collect(),
            layout.to_string(),
        ))
    })?;
    if mixed.sources.len() > 1 || mixed.sources.iter().any(|u| u.train != u.records) {
        for u in &mixed.sources {
            observer.notice(&u.describe());
        }
    }
    let mut warnings = mixed.warnings;
    let (train_records, mut eval_records) = (mixed.train, mixed.eval);
    if let Some(e) = &cfg.data.eval {
        let l = load(e)?;
        warnings.extend(l.warnings.iter().map(|w| w.to_string()));
        eval_records = l.pairs;
    }
    let (pairs, truncated) = tokenize_all(&train_records, &tok, &template, &cfg, &mut warnings)?;
    let (mut eval_pairs, _) = tokenize_all(&eval_records, &tok, &template, &cfg, &mut warnings)?;
    if eval_pairs.is_empty() {
        eval_pairs = pairs.iter().take(32).cloned().collect();
    }
    if cfg.eval.max_samples > 0 {
        eval_pairs.truncate(cfg.eval.max_samples);
    }
    if pairs.is_empty() {
        bail!(
            "{}: no usable preference pair after tokenization",
            train_file.display()
        );
    }

    let device = training_device(&cfg)?;
    let model = crate::common::load_policy(&cfg, &model_dir, &device)?;
    let pad_id = pad_id(&tok);
    let pc = &cfg.preference;
    // The memory plan, as SFT's: a pair's two completions are padded alike, so a pair is one unsplittable row
    // of twice its longer side. The configured `micro_pairs` is only ever lowered (`[train] batch_size`
    // fixes it: then the plan only estimates).
    let longest_pair = pairs
        .iter()
        .map(|p| 2 * p.row_len())
        .max()
        .unwrap_or(2)
        .max(2);
    let mut plan_cfg = cfg.clone();
    plan_cfg.train.micro_batch_tokens = pc.micro_pairs.max(1) * longest_pair;
    plan_cfg.train.max_micro_batch_size = pc.micro_pairs.max(1);
    let mut memory = crate::memory::plan_rows(
        &plan_cfg,
        &crate::memory::ModelFootprint::of(&model),
        pairs.iter().map(|p| {
            (
                2 * p.row_len(),
                p.chosen.num_targets() + p.rejected.num_targets(),
            )
        }),
        if cfg.train.batch_size > 0 {
            None
        } else {
            crate::memory::budget(&cfg)?
        },
        "pair (both completions, padded alike)",
    )?;
    let micro = (memory.micro_batch_tokens / longest_pair).clamp(1, pc.micro_pairs.max(1));
    memory
        .changes
        .retain(|c| !c.starts_with("micro-batch lowered"));
    if micro < pc.micro_pairs.max(1) {
        memory.changes.push(format!(
            "micro-batch lowered from {} to {micro} pairs to fit the budget",
            pc.micro_pairs
        ));
    }
    observer.notice(&memory.describe_as(&format!("{micro} pairs per micro-batch")));
    let model = model.with_gradient_checkpointing(memory.gradient_checkpointing);
    let writer = opts.group.is_writer();

    // Reference log-probabilities.
    let (reference, eval_reference) = if !objective.needs_reference() {
        (Reference::None, None)
    } else if let Some(ref_dir) = &pc.reference {
        let (ref_model, _) = load_pretrained(ref_dir, &AdapterSpec::Full, &device)
            .with_context(|| format!("loading the reference model {}", ref_dir.display()))?;
        if ref_model.vocab_size() != model.vocab_size() {
            bail!(
                "[preference] reference {}: vocabulary of {} tokens, but the policy has {}; the reference must share the policy's tokenizer",
                ref_dir.display(),
                ref_model.vocab_size(),
                model.vocab_size()
            );
        }
        let t = reference_cache(&out.join("reference_logps.json"), &pairs, writer, || {
            precompute_reference(&ref_model, &pairs, micro, pad_id, &device)
        })?;
        let e = precompute_reference(&ref_model, &eval_pairs, micro, pad_id, &device);
        (Reference::Precomputed(t), Some(e))
    } else if pc.precompute_reference || cfg.adapter.kind == AdapterKind::Full {
        // For full fine-tuning the initial weights are the reference; computing their log-probs once avoids
        // keeping a second copy of the model.
        let t = reference_cache(&out.join("reference_logps.json"), &pairs, writer, || {
            base_reference(&model, &pairs, micro, pad_id, &device)
        })?;
        let e = base_reference(&model, &eval_pairs, micro, pad_id, &device);
        (Reference::Precomputed(t), Some(e))
    } else {
        (Reference::AdaptersDisabled, None)
    };

    let beta = params.values().get("beta").copied().unwrap_or(1.0);
    let setup = PrefSetup {
        run: crate::common::loop_setup(&cfg, &out, opts, &device)?,
        pairs: &pairs,
        eval_pairs: &eval_pairs,
        eval_reference,
        objective: objective.as_ref(),
        beta,
        reference,
        pairs_per_step: pc.pairs_per_step,
        micro_pairs: micro,
        sft_weight: pc.sft_weight + objective.sft_weight(),
        average_log_prob: pc.average_log_prob,
        pad_id,
    };
    if writer {
        crate::common::write_resolved_config(&cfg, &out)?;
    }
    observer.notice(&format!(
        "preference training {} with `{}` ({}) on {} pairs from {}, on {} in precision {}",
        model_dir.display(),
        cfg.loss.name,
        params
            .values()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        pairs.len(),
        train_file.display(),
        cfg.train.device,
        cfg.train.precision
    ));
    let (model, summary) = train_pairs(model, &setup, observer)?;
    let final_dir = out.join("final");
    if !writer {
        return Ok(Ran::Trained(Box::new(PrefReport {
            summary,
            pairs: pairs.len(),
            eval_pairs: eval_pairs.len(),
            truncated,
            warnings,
            output_dir: out,
            final_dir,
        })));
    }
    let (_, files) = crate::common::export_final(&model, &cfg, &model_dir, &out)?;
    fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "summary": summary,
            "data": { "pairs": pairs.len(), "eval_pairs": eval_pairs.len(), "truncated": truncated, "warnings": warnings },
            "exported": files,
            "peak_rss_mb": crate::bench::peak_rss_mb(),
            "ytrainer": crate::build_info(),
        }))?,
    )?;
    Ok(Ran::Trained(Box::new(PrefReport {
        summary,
        pairs: pairs.len(),
        eval_pairs: eval_pairs.len(),
        truncated,
        warnings,
        output_dir: out,
        final_dir,
    })))
}
