//! `ytrainer run` and `ytrainer init`: resolve the config, load model, tokenizer, template and data, build the
//! loss plugin, hand everything to the trainer, export, and print a summary.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ytrainer_core::config::{AdapterKind, Overlong, RunConfig, TrainMode, TrainOn, TrainingType};
use ytrainer_core::device::Precision;
use ytrainer_core::loss::LossFn;
use ytrainer_core::model::CausalLm;
use ytrainer_core::trainer::{self, TrainSetup};
use ytrainer_data::{
    BatchOptions, ChatTemplate, DataOptions, Example, Mode, Record, TokenizerWrapper, load_records,
    prepare,
};
use ytrainer_models::{
    AdapterSpec, HfConfig, LoraConfig, init_random, load_peft_adapter, load_pretrained,
};

use crate::cli::{InitArgs, RunArgs};
use crate::config_file;
use crate::progress::Bar;

/// Vocabulary of the self-made tokenizer of the `tiny` preset.
const TINY_VOCAB: usize = 2048;

/// The `tiny` preset: a Qwen2-shaped decoder small enough to train in a minute on two cores.
fn tiny_config(vocab_size: usize, eos: u32, pad: u32) -> Result<HfConfig> {
    let json = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "initializer_range": 0.02,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    });
    HfConfig::from_json_str(&json.to_string()).map_err(|e| anyhow!("tiny preset config: {e}"))
}

/// Creates a self-made model directory: a byte-level BPE trained on `data`, our ChatML template, and a
/// randomly initialised decoder; deterministic in `seed` and the data.
/// `precision` must be the run's: the CPU device's float type is fixed by the first tensor made on it.
pub fn create_preset(
    preset: &str,
    data: &Path,
    seed: u64,
    out: &Path,
    precision: Precision,
) -> Result<()> {
    if preset != "tiny" {
        bail!("unknown preset `{preset}`; the only preset is `tiny`");
    }
    let loaded = load_records(data)?;
    let texts: Vec<String> = loaded.records.iter().map(record_text).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let specials = ytrainer_data::CHATML_SPECIAL_TOKENS;
    let tokenizer_json = ytrainer_data::train_byte_level_bpe(&refs, TINY_VOCAB, &specials)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    fs::write(out.join("tokenizer.json"), &tokenizer_json)
        .with_context(|| format!("cannot write {}", out.join("tokenizer.json").display()))?;
    let tok = TokenizerWrapper::from_file(&out.join("tokenizer.json"))?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| anyhow!("self-made tokenizer lacks `{t}`"))
    };
    let (eos, pad) = (id("<|im_end|>")?, id("<|endoftext|>")?);
    let tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 1024,
        "chat_template": ytrainer_data::CHATML_TEMPLATE,
    });
    fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )?;
    let config = tiny_config(tok.vocab_size(), eos, pad)?;
    let device =
        ytrainer_core::device::select_with("cpu", seed, precision).map_err(|e| anyhow!(e))?;
    let model = init_random(&config, seed, &AdapterSpec::Full, &device)?;
    ytrainer_models::save_hf_checkpoint(&model, &config, out)?;
    Ok(())
}

fn record_text(r: &Record) -> String {
    match &r.kind {
        ytrainer_data::RecordKind::Text { text } => text.clone(),
        ytrainer_data::RecordKind::Chat { messages } => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// `ytrainer init`
pub fn init_preset(a: InitArgs) -> Result<()> {
    create_preset(&a.preset, &a.data, a.seed, &a.out, Precision::F32)?;
    println!("wrote {} model to {}", a.preset, a.out.display());
    Ok(())
}

fn data_options(cfg: &RunConfig) -> DataOptions {
    DataOptions {
        max_seq_len: cfg.data.max_seq_len,
        overlong: match cfg.data.overlong {
            Overlong::Truncate => ytrainer_data::Overlong::Truncate,
            Overlong::Skip => ytrainer_data::Overlong::Skip,
        },
        train_on: match cfg.data.train_on {
            TrainOn::AllAssistant => ytrainer_data::TrainOn::AllAssistant,
            TrainOn::LastAssistant => ytrainer_data::TrainOn::LastAssistant,
            TrainOn::Everything => ytrainer_data::TrainOn::Everything,
        },
        cpt: cfg.data.training_type == TrainingType::Cpt,
        template_vars: cfg
            .data
            .template_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Everything that determines the training trajectory, as canonical JSON: resume must match it, and on a
/// mismatch the trainer names the keys that differ. The device is left out on purpose (a run may continue on
/// other hardware), as are eval and output settings.
pub(crate) fn fingerprint(cfg: &RunConfig) -> String {
    let mut train = serde_json::to_value(&cfg.train).unwrap_or_default();
    if let Some(t) = train.as_object_mut() {
        t.remove("device");
    }
    serde_json::json!({
        "model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "loss": cfg.loss, "train": train,
    })
    .to_string()
}

/// Splits off a deterministic eval fraction: every k-th record, so the split does not depend on file order
/// runs (shuffled data stays shuffled, sorted data is sampled evenly).
fn split_eval(records: Vec<Record>, fraction: f64) -> (Vec<Record>, Vec<Record>) {
    if fraction <= 0.0 || records.len() < 2 {
        return (records, Vec::new());
    }
    let k = (1.0 / fraction).round().max(2.0) as usize;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, r) in records.into_iter().enumerate() {
        if i % k == k - 1 {
            eval.push(r);
        } else {
            train.push(r);
        }
    }
    (train, eval)
}

/// The model directory: given, or self-made from the preset (reused when it already exists, e.g. on resume).
pub(crate) fn resolve_model_dir(cfg: &RunConfig, out: &Path, train_file: &Path) -> Result<PathBuf> {
    let model_dir = match (&cfg.model.path, &cfg.model.preset) {
        (Some(p), _) => p.clone(),
        (None, Some(preset)) => {
            let d = out.join("base-model");
            if !d.join("model.safetensors").exists() {
                eprintln!(
                    "creating the `{preset}` model in {} (tokenizer trained on {})",
                    d.display(),
                    train_file.display()
                );
                // Made on the CPU, in the run's precision when the run trains there too.
                let precision = if cfg.train.device == "cpu" {
                    cfg.train.precision
                } else {
                    Precision::F32
                };
                create_preset(preset, train_file, cfg.model.seed, &d, precision)?;
            }
            d
        }
        (None, None) => bail!("no model given"),
    };
    // A llama.cpp GGUF file is converted once into the run directory.
    let model_dir = crate::interop::model_dir_for_run(model_dir, out)?;
    if !model_dir.join("config.json").exists() {
        bail!(
            "{}: not a Hugging Face model directory (no config.json); pass the directory that holds config.json, \
             model.safetensors and tokenizer.json",
            model_dir.display()
        );
    }
    Ok(model_dir)
}

/// The model's tokenizer (with the template's end-of-turn token as EOS) and chat template (optional for CPT).
pub(crate) fn tokenizer_and_template(
    cfg: &RunConfig,
    model_dir: &Path,
) -> Result<(TokenizerWrapper, Option<ChatTemplate>)> {
    let mut tok = TokenizerWrapper::from_file(&model_dir.join("tokenizer.json"))?;
    let template = match ChatTemplate::from_model_dir(model_dir) {
        Ok(t) => Some(t),
        Err(e) if cfg.data.training_type == TrainingType::Cpt => {
            tracing::info!("no chat template ({e}); fine for continued pretraining");
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(eos) = template.as_ref().and_then(|t| t.eos_token()) {
        let eos = eos.to_string();
        tok.set_eos_token(&eos)?;
    }
    Ok((tok, template))
}

/// The adapter the config asks for.
pub(crate) fn adapter_spec(cfg: &RunConfig) -> AdapterSpec {
    match cfg.adapter.kind {
        AdapterKind::Full => AdapterSpec::Full,
        AdapterKind::Lora => AdapterSpec::Lora(LoraConfig {
            r: cfg.adapter.r,
            alpha: cfg.adapter.alpha,
            dropout: cfg.adapter.dropout,
            target_modules: cfg.adapter.target_modules.clone(),
            use_rslora: cfg.adapter.use_rslora,
            init_seed: cfg.train.seed,
        }),
    }
}

/// Writes the resolved config beside the metrics, with absolute paths so it can be fed back as `--config`.
pub(crate) fn write_resolved_config(cfg: &RunConfig, out: &Path) -> Result<()> {
    let mut resolved = cfg.clone();
    for p in [
        &mut resolved.model.path,
        &mut resolved.data.train,
        &mut resolved.data.eval,
        &mut resolved.adapter.init_from,
        &mut resolved.preference.reference,
        &mut resolved.loss.reference_model,
    ]
    .into_iter()
    .flatten()
    {
        if let Ok(abs) = std::path::absolute(&*p) {
            *p = abs;
        }
    }
    if let Ok(abs) = std::path::absolute(&resolved.output.dir) {
        resolved.output.dir = abs;
    }
    let path = out.join("config.resolved.toml");
    fs::write(&path, toml::to_string_pretty(&resolved)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `ytrainer run`
pub fn run(args: RunArgs) -> Result<()> {
    let mut cfg = config_file::resolve(&args)?;
    // The loss plugin is checked first: a typo in its name or parameters must not cost a model load.
    let registry = crate::plugins_cmd::registry(&cfg.loss.plugins)?;
    let (loss_fn, params) = registry.build(&cfg.loss.name, &cfg.loss.params)?;
    let plugin = match loss_fn {
        LossFn::Token(p) => p,
        LossFn::Pairwise(objective) => {
            return crate::preference::run(cfg, objective, &params, &args);
        }
    };
    let normalize = cfg
        .loss
        .normalize
        .unwrap_or_else(|| plugin.default_normalize());
    cfg.loss.normalize = Some(normalize);
    if args.dry_run {
        println!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
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

    // Data.
    let tok_path = model_dir.join("tokenizer.json");
    let (tok, template) = tokenizer_and_template(&cfg, &model_dir)?;
    let loaded = load_records(&train_file)?;
    let mut warnings: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    if cfg.data.eval.is_some() && cfg.data.eval_fraction > 0.0 {
        bail!(
            "[data] sets both `eval` and `eval_fraction`; choose one (an eval file, or a held-out fraction of the training data)"
        );
    }
    let (train_records, mut eval_records) = split_eval(loaded.records, cfg.data.eval_fraction);
    if let Some(e) = &cfg.data.eval {
        let l = load_records(e)?;
        warnings.extend(l.warnings.iter().map(|w| w.to_string()));
        eval_records = l.records;
    }
    let dopts = data_options(&cfg);
    let prepared = prepare(&train_records, &tok, template.as_ref(), &dopts)?;
    let mut eval_examples: Vec<Example> = if eval_records.is_empty() {
        // Without eval data, "loss before/after" is measured on (up to 64) training examples.
        eprintln!(
            "no eval data ([data] eval or eval_fraction): eval loss is measured on the first training examples"
        );
        prepared.examples.iter().take(64).cloned().collect()
    } else {
        prepare(&eval_records, &tok, template.as_ref(), &dopts)?.examples
    };
    if cfg.eval.max_samples > 0 {
        eval_examples.truncate(cfg.eval.max_samples);
    }

    // Model.
    let device =
        ytrainer_core::device::select_with(&cfg.train.device, cfg.train.seed, cfg.train.precision)
            .map_err(|e| anyhow!(e))?;
    let adapter = adapter_spec(&cfg);
    let (mut model, _hf) = load_pretrained(&model_dir, &adapter, &device)?;
    if let Some(init) = &cfg.adapter.init_from {
        model = load_peft_adapter(model, init)?;
    }
    model = model.with_gradient_checkpointing(cfg.train.gradient_checkpointing);
    if let Some(path) = &cfg.loss.reference_model {
        let dir = crate::interop::model_dir_for_run(path.clone(), &out.join("reference-model"))?;
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

    write_resolved_config(&cfg, &out)?;

    let pad_id = tok
        .token_to_id("<|endoftext|>")
        .or_else(|| tok.eos_id())
        .unwrap_or(0);
    let batch = BatchOptions {
        seed: cfg.train.seed,
        shuffle: cfg.train.shuffle,
        micro_batch_tokens: cfg.train.micro_batch_tokens,
        max_micro_batch_size: cfg.train.max_micro_batch_size,
        tokens_per_step: cfg.train.tokens_per_step,
        mode: match cfg.train.mode {
            TrainMode::OnePass => Mode::OnePass,
            TrainMode::Windowed => Mode::Windowed {
                token_batch: cfg.train.token_batch,
            },
        },
        pad_id,
    };
    let resume = match &args.resume {
        Some(p) => Some(ytrainer_core::checkpoint::resolve_resume(p)?),
        None => None,
    };
    let fp = fingerprint(&cfg);
    let setup = TrainSetup {
        train: &cfg.train,
        batch,
        train_examples: &prepared.examples,
        eval_examples: &eval_examples,
        eval_every: cfg.eval.every_steps,
        plugin: plugin.as_ref(),
        normalize,
        zone_borders: cfg.loss.zone_borders,
        output_dir: &out,
        save_every: cfg.output.save_every_steps,
        save_total_limit: cfg.output.save_total_limit,
        resume,
        fingerprint: fp,
        device: &device,
    };
    let s = &prepared.stats;
    let mut loss_desc: Vec<String> = params
        .values()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    loss_desc.push(format!("normalize={}", normalize.as_str()));
    eprintln!(
        "training {} with loss `{}` ({}) on {} examples ({} supervised tokens) from {}, on {} in precision {}",
        model_dir.display(),
        cfg.loss.name,
        loss_desc.join(", "),
        s.examples,
        s.supervised_tokens,
        train_file.display(),
        cfg.train.device,
        cfg.train.precision
    );
    let mut bar = Bar::new();
    let (model, summary) = trainer::train(model, &setup, &mut bar)?;
    drop(bar);

    // Final export: what the user takes to the rest of the ecosystem.
    let final_dir = out.join("final");
    let files = model
        .export(&final_dir)
        .map_err(|e| anyhow!("exporting the trained model: {e}"))?;
    copy_tokenizer_files(
        &model_dir,
        &final_dir,
        cfg.adapter.kind == AdapterKind::Full,
    )?;
    let summary_json = serde_json::json!({
        "summary": summary,
        "data": {
            "examples": s.examples, "supervised_tokens": s.supervised_tokens, "truncated": s.truncated,
            "skipped_overlong": s.skipped_overlong, "skipped_no_targets": s.skipped_no_targets,
            "warnings": warnings,
        },
        "exported": files,
    });
    fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary_json)?,
    )?;

    println!(
        "done: {} optimizer steps, {} supervised tokens trained in {:.1}s",
        summary.steps, summary.tokens_trained, summary.seconds
    );
    if summary.skipped_steps > 0 {
        println!(
            "  skipped updates (non-finite loss/gradient): {}",
            summary.skipped_steps
        );
    }
    match (&summary.eval_before, &summary.eval_after) {
        (Some(b), Some(a)) => println!(
            "  eval loss: {:.4} -> {:.4} (token accuracy {:.3} -> {:.3})",
            b.eval_loss, a.eval_loss, b.eval_token_accuracy, a.eval_token_accuracy
        ),
        (None, Some(a)) => println!("  eval loss after: {:.4}", a.eval_loss),
        _ => {}
    }
    println!(
        "  data: {} examples; truncated {}, skipped (overlong) {}, skipped (no targets) {}, warnings {}",
        s.examples,
        s.truncated,
        s.skipped_overlong,
        s.skipped_no_targets,
        warnings.len()
    );
    for w in warnings.iter().take(5) {
        println!("    warning: {w}");
    }
    println!("  metrics: {}", out.join("metrics.jsonl").display());
    if let Some(c) = &summary.last_checkpoint {
        println!("  checkpoint (resumable): {}", c.display());
    }
    println!("  exported model: {}", final_dir.display());
    Ok(())
}

pub(crate) fn copy_tokenizer_files(from: &Path, to: &Path, full: bool) -> Result<()> {
    let names: &[&str] = if full {
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
            "special_tokens_map.json",
        ]
    } else {
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ]
    };
    for n in names {
        let src: PathBuf = from.join(n);
        if src.exists() {
            fs::copy(&src, to.join(n)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(())
}
