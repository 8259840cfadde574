//! `ytrainer run` with a pairwise loss (`dpo`, `cdpo`, `ipo`, `hinge`, `simpo`, `dpo-nlirg`): load preference
//! pairs, set up the reference, train with `ytrainer_core::preference`, export, summarise.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ytrainer_core::config::{AdapterKind, RunConfig};
use ytrainer_core::device::Precision;
use ytrainer_core::loss::{PairwiseObjective, Params};
use ytrainer_core::model::CausalLm;
use ytrainer_core::preference::{
    PrefSetup, Reference, base_reference, precompute_reference, train_pairs,
};
use ytrainer_data::{PairExample, PairRecord, load_pairs, tokenize_pair};
use ytrainer_models::{AdapterSpec, load_peft_adapter, load_pretrained};

use crate::cli::RunArgs;
use crate::progress::Bar;
use crate::run::{
    adapter_spec, copy_tokenizer_files, fingerprint, resolve_model_dir, tokenizer_and_template,
    write_resolved_config,
};

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

fn reference_cache(
    path: &Path,
    pairs: &[PairExample],
    compute: impl FnOnce() -> Vec<(f32, f32)>,
) -> Result<Vec<(f32, f32)>> {
    if let Ok(text) = fs::read_to_string(path)
        && let Ok(v) = serde_json::from_str::<Vec<(f32, f32)>>(&text)
        && v.len() == pairs.len()
    {
        return Ok(v);
    }
    let v = compute();
    fs::write(path, serde_json::to_string(&v)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(v)
}

/// Runs preference training for a resolved config whose loss is pairwise.
pub fn run(
    mut cfg: RunConfig,
    objective: Box<dyn PairwiseObjective>,
    params: &Params,
    args: &RunArgs,
) -> Result<()> {
    cfg.loss.normalize = None;
    if args.dry_run {
        println!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
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
    let out = cfg.output.dir.clone();
    fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output directory {}", out.display()))?;
    let train_file = cfg
        .data
        .train
        .clone()
        .ok_or_else(|| anyhow!("no training data"))?;
    let model_dir = resolve_model_dir(&cfg, &out, &train_file)?;
    let (tok, template) = tokenizer_and_template(&cfg, &model_dir)?;
    let template = template.ok_or_else(|| {
        anyhow!(
            "{}: preference training needs the model's chat template",
            model_dir.display()
        )
    })?;

    let loaded = load_pairs(&train_file)?;
    let mut warnings: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    let mut train_records = loaded.pairs;
    let mut eval_records = Vec::new();
    if let Some(e) = &cfg.data.eval {
        let l = load_pairs(e)?;
        warnings.extend(l.warnings.iter().map(|w| w.to_string()));
        eval_records = l.pairs;
    } else if cfg.data.eval_fraction > 0.0 {
        let k = (1.0 / cfg.data.eval_fraction).round().max(2.0) as usize;
        let all = std::mem::take(&mut train_records);
        for (i, r) in all.into_iter().enumerate() {
            if i % k == k - 1 {
                eval_records.push(r)
            } else {
                train_records.push(r)
            }
        }
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

    let device =
        ytrainer_core::device::select_with(&cfg.train.device, cfg.train.seed, cfg.train.precision)
            .map_err(|e| anyhow!(e))?;
    let adapter = adapter_spec(&cfg);
    let (mut model, _) = load_pretrained(&model_dir, &adapter, &device)?;
    if let Some(init) = &cfg.adapter.init_from {
        model = load_peft_adapter(model, init)?;
    }
    model = model.with_gradient_checkpointing(cfg.train.gradient_checkpointing);
    let pad_id = tok
        .token_to_id("<|endoftext|>")
        .or_else(|| tok.eos_id())
        .unwrap_or(0);
    let pc = &cfg.preference;
    let micro = pc.micro_pairs.max(1);

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
        let t = reference_cache(&out.join("reference_logps.json"), &pairs, || {
            precompute_reference(&ref_model, &pairs, micro, pad_id, &device)
        })?;
        let e = precompute_reference(&ref_model, &eval_pairs, micro, pad_id, &device);
        (Reference::Precomputed(t), Some(e))
    } else if pc.precompute_reference || cfg.adapter.kind == AdapterKind::Full {
        // For full fine-tuning the initial weights are the reference; computing their log-probs once avoids
        // keeping a second copy of the model.
        let t = reference_cache(&out.join("reference_logps.json"), &pairs, || {
            base_reference(&model, &pairs, micro, pad_id, &device)
        })?;
        let e = base_reference(&model, &eval_pairs, micro, pad_id, &device);
        (Reference::Precomputed(t), Some(e))
    } else {
        (Reference::AdaptersDisabled, None)
    };

    let resume = match &args.resume {
        Some(p) => Some(ytrainer_core::checkpoint::resolve_resume(p)?),
        None => None,
    };
    let beta = params.values().get("beta").copied().unwrap_or(1.0);
    let setup = PrefSetup {
        train: &cfg.train,
        pairs: &pairs,
        eval_pairs: &eval_pairs,
        eval_reference,
        objective: objective.as_ref(),
        beta,
        reference,
        pairs_per_step: pc.pairs_per_step,
        micro_pairs: micro,
        sft_weight: pc.sft_weight,
        average_log_prob: pc.average_log_prob,
        pad_id,
        output_dir: &out,
        save_every: cfg.output.save_every_steps,
        eval_every: cfg.eval.every_steps,
        resume,
        fingerprint: fingerprint(&cfg),
        device: &device,
    };
    write_resolved_config(&cfg, &out)?;
    eprintln!(
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
    );
    let mut bar = Bar::new();
    let (model, summary) = train_pairs(model, &setup, &mut bar)?;
    drop(bar);
    let final_dir = out.join("final");
    let files = model
        .export(&final_dir)
        .map_err(|e| anyhow!("exporting the trained model: {e}"))?;
    copy_tokenizer_files(
        &model_dir,
        &final_dir,
        cfg.adapter.kind == AdapterKind::Full,
    )?;
    fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "summary": summary,
            "data": { "pairs": pairs.len(), "eval_pairs": eval_pairs.len(), "truncated": truncated, "warnings": warnings },
            "exported": files,
        }))?,
    )?;
    println!(
        "done: {} optimizer steps on {} pairs in {:.1}s",
        summary.steps,
        pairs.len(),
        summary.seconds
    );
    if let (Some(b), Some(a)) = (&summary.eval_before, &summary.eval_after) {
        println!(
            "  eval: loss {:.4} -> {:.4}, reward accuracy {:.3} -> {:.3}, margin {:.4} -> {:.4}",
            b.eval_loss, a.eval_loss, b.accuracy, a.accuracy, b.margin, a.margin
        );
    }
    println!(
        "  pairs: {}; truncated {}, warnings {}",
        pairs.len(),
        truncated,
        warnings.len()
    );
    for w in warnings.iter().take(5) {
        println!("    warning: {w}");
    }
    println!("  metrics: {}", out.join("metrics.jsonl").display());
    println!("  exported model: {}", final_dir.display());
    Ok(())
}
