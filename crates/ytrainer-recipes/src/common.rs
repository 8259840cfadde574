//! What every kind of run shares: the plugin registry, options, the adapter spec, the policy model, the loop
//! settings with the resume checkpoint and the config fingerprint, the resolved config and the final export. The run recipes (`sft`, `preference`) use it;
//! [`crate::run`] dispatches between them.

use std::fs;
use std::path::{Path, PathBuf};

use ytrainer_core::burn::prelude::Device;
use ytrainer_core::config::{AdapterKind, RunConfig};
use ytrainer_core::loss::Registry;
use ytrainer_core::trainer::LoopSetup;
use ytrainer_models::{
    AdapterSpec, BaseWeights, Decoder, LoraConfig, is_gguf, load_gguf_with, load_peft_adapter,
    load_pretrained_with,
};

use crate::error::{Context, Result};
use crate::{bail, invalid};

/// Environment variable with extra plugin paths (separated like `PATH`).
pub const PLUGIN_PATH_ENV: &str = "YTRAINER_PLUGIN_PATH";

/// Every external plugin path in force: `cli_dirs` (the `--plugin-dir` flags), then `YTRAINER_PLUGIN_PATH`,
/// then `config` (`[loss] plugins`).
pub fn plugin_paths(cli_dirs: &[PathBuf], config: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = cli_dirs.to_vec();
    if let Some(env) = std::env::var_os(PLUGIN_PATH_ENV) {
        v.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    v.extend(config.iter().cloned());
    v
}

/// The plugin registry of a run: built-ins plus external plugins from every plugin path.
pub fn registry(cli_dirs: &[PathBuf], config: &[PathBuf]) -> Result<Registry> {
    let paths = plugin_paths(cli_dirs, config);
    Registry::discover_with(&paths).context("loading external loss plugins")
}

/// How to run, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint (or run directory: its latest checkpoint).
    pub resume: Option<PathBuf>,
    /// Resolve and validate everything that needs no model, then stop.
    pub dry_run: bool,
    /// External plugin directories named outside the config (`--plugin-dir`).
    pub plugin_dirs: Vec<PathBuf>,
    /// Clear a non-empty output directory that is not this run's completely before training (`--overwrite`);
    /// without it such a directory is refused.
    pub overwrite: bool,
    /// Files the caller put in the output directory for this run (a sweep trial's `config.toml`): not
    /// foreign, never removed.
    pub own_files: Vec<PathBuf>,
    /// The data-parallel group this process belongs to (one process by default; `mpirun` through the CLI's
    /// `mpi` feature). Rank 0 alone writes files.
    pub group: ytrainer_core::dist::Group,
}

/// What a run recipe did: stopped after validation (`dry_run`) or trained and exported.
#[derive(Debug)]
pub enum Ran<R> {
    /// The config as it would run (defaults and the plugin's normalisation filled in).
    DryRun(Box<RunConfig>),
    /// The run's report.
    Trained(Box<R>),
}

/// Everything that determines the training trajectory, as canonical JSON: resume must match it, and on a
/// mismatch the trainer names the keys that differ. The device is left out on purpose (a run may continue on
/// other hardware), as are eval and output settings and `max_skipped_steps`.
pub fn fingerprint(cfg: &RunConfig) -> String {
    let mut train = serde_json::to_value(&cfg.train).unwrap_or_default();
    if let Some(t) = train.as_object_mut() {
        t.remove("device");
        // When to give up on a diverged run does not change the trajectory, nor does when to stop early.
        t.remove("max_skipped_steps");
        t.remove("early_stopping_patience");
        t.remove("early_stopping_threshold");
    }
    let mut model = serde_json::to_value(&cfg.model).unwrap_or_default();
    if let Some(m) = model.as_object_mut() {
        m.remove("base_model_id");
    }
    let mut v = serde_json::json!({
        "model": model, "adapter": cfg.adapter, "data": cfg.data, "loss": cfg.loss, "train": train,
    });
    // The same file named by another path (relative from elsewhere, through a link) is the same run; a training
    // file edited in place is not (issue 21 item 9: the plan silently changed from 40 to 79-101 steps).
    for key in ytrainer_sweep::spec::PATH_KEYS {
        let (section, k) = key.split_once('.').expect("section.key");
        if let Some(serde_json::Value::String(p)) = v.get_mut(section).and_then(|s| s.get_mut(k))
            && let Ok(c) = std::fs::canonicalize(&*p)
        {
            *p = c.to_string_lossy().to_string();
        }
    }
    let mut content = serde_json::Map::new();
    for (name, path) in [("train", &cfg.data.train), ("eval", &cfg.data.eval)] {
        if let Some(p) = path
            && let Some(h) = file_hash(p)
        {
            content.insert(name.to_string(), h.into());
        }
    }
    // The mix's other files likewise: by canonical path and by content, in their listed order.
    if let Some(serde_json::Value::Array(list)) = v["data"].get_mut("sources") {
        for (i, (item, src)) in list.iter_mut().zip(&cfg.data.sources).enumerate() {
            if let Ok(c) = std::fs::canonicalize(&src.path) {
                item["path"] = c.to_string_lossy().to_string().into();
            }
            if let Some(h) = file_hash(&src.path) {
                content.insert(format!("sources.{i}"), h.into());
            }
        }
    }
    v["data_content"] = content.into();
    v.to_string()
}

/// A content hash of a data file (`None` when it cannot be read: the loader reports that).
fn file_hash(path: &Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    // SAFETY: read-only mapping of a data file for hashing; a file rewritten meanwhile changes the hash,
    // which is what the fingerprint is for.
    let map = unsafe { memmap2::Mmap::map(&f) }.ok()?;
    Some(format!(
        "{:016x}{:016x}",
        ytrainer_core::checkpoint::content_hash(&map),
        map.len()
    ))
}

/// The adapter the config asks for.
pub fn adapter_spec(cfg: &RunConfig) -> AdapterSpec {
    match cfg.adapter.kind {
        AdapterKind::Full => AdapterSpec::Full,
        AdapterKind::Lora => AdapterSpec::Lora(LoraConfig {
            r: cfg.adapter.r,
            alpha: cfg.adapter.alpha,
            dropout: cfg.adapter.dropout,
            target_modules: cfg.adapter.target_modules.clone(),
            use_rslora: cfg.adapter.use_rslora,
            use_dora: cfg.adapter.use_dora,
            modules_to_save: cfg.adapter.modules_to_save.clone(),
            init_seed: cfg.train.seed,
        }),
    }
}

/// The policy to train: the model directory's weights with the config's adapter (and its `init_from`
/// weights), on `device`, with gradient checkpointing as configured.
pub(crate) fn load_policy(cfg: &RunConfig, model_dir: &Path, device: &Device) -> Result<Decoder> {
    let base = base_weights(cfg)?;
    let spec = adapter_spec(cfg);
    let (mut model, _) = match (base, &cfg.model.path) {
        (BaseWeights::Stored, Some(gguf)) => load_gguf_with(gguf, &spec, device, base)?,
        _ => load_pretrained_with(model_dir, &spec, device, base)?,
    };
    if let Some(init) = &cfg.adapter.init_from {
        model = load_peft_adapter(model, init)?;
    }
    if let Some(id) = &cfg.model.base_model_id {
        model.base_model_name_or_path = id.clone();
    }
    model.neftune_alpha = cfg.train.neftune_noise_alpha;
    Ok(model.with_gradient_checkpointing(cfg.train.gradient_checkpointing))
}

/// How a run holds its base's linear weights: LoRA over a quantised GGUF keeps its blocks (QLoRA) unless
/// `[model] dequantize_base`; `[model] quantize_base` quantises a Hugging Face base on load; everything else is f32.
pub fn base_weights(cfg: &RunConfig) -> Result<BaseWeights> {
    let gguf = cfg
        .model
        .path
        .as_deref()
        .filter(|p| p.is_file() && is_gguf(p));
    if let Some(q) = &cfg.model.quantize_base {
        let base = BaseWeights::parse_quantize(q).ok_or_else(|| {
            invalid!("[model] quantize_base = {q:?}: expected \"q8_0\", \"q4_0\" or \"nf4\"")
        })?;
        if cfg.adapter.kind == AdapterKind::Full {
            bail!(
                "[model] quantize_base = {q:?} needs a LoRA adapter: full fine-tuning trains the base weights, \
                 which must stay f32; remove quantize_base or set [adapter] type = \"lora\""
            );
        }
        if let Some(g) = gguf {
            bail!(
                "[model] quantize_base = {q:?} applies to a Hugging Face base, but {} is a GGUF file, which \
                 trains on its own quantisation; remove quantize_base",
                g.display()
            );
        }
        return Ok(base);
    }
    Ok(
        if gguf.is_some() && cfg.adapter.kind == AdapterKind::Lora && !cfg.model.dequantize_base {
            BaseWeights::Stored
        } else {
            BaseWeights::F32
        },
    )
}

/// The loop's settings of a run: optimisation, run directory, eval and checkpoint cadence, the fingerprint, and
/// the checkpoint `--resume` names (a run directory means its latest checkpoint).
pub(crate) fn loop_setup<'a>(
    cfg: &'a RunConfig,
    out: &'a Path,
    opts: &'a RunOptions,
    device: &'a Device,
) -> Result<LoopSetup<'a>> {
    let resume = match &opts.resume {
        Some(p) => Some(ytrainer_core::checkpoint::resolve_resume(p)?),
        None => None,
    };
    Ok(LoopSetup {
        train: &cfg.train,
        seed: cfg.train.seed,
        output_dir: out,
        eval_every: cfg.eval.every_steps,
        save_every: cfg.output.save_every_steps,
        save_total_limit: cfg.output.save_total_limit,
        resume,
        fingerprint: fingerprint(cfg),
        device,
        dist: opts.group.get(),
        best: ytrainer_core::trainer::BestModel::of(cfg),
    })
}

/// Writes the resolved config beside the metrics, with absolute paths so it can be fed back as `--config`.
pub fn write_resolved_config(cfg: &RunConfig, out: &Path) -> Result<()> {
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
    for s in &mut resolved.data.sources {
        if let Ok(abs) = std::path::absolute(&s.path) {
            s.path = abs;
        }
    }
    if let Ok(abs) = std::path::absolute(&resolved.output.dir) {
        resolved.output.dir = abs;
    }
    let path = out.join("config.resolved.toml");
    fs::write(&path, toml::to_string_pretty(&resolved)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Copies the tokenizer files a loader of the exported model needs (`generation_config.json` too for a full
/// model; an adapter takes it from its base).
pub fn copy_tokenizer_files(from: &Path, to: &Path, full: bool) -> Result<()> {
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

/// Claims the run directory (refusing one that is not this run's, see [`crate::outdir::claim_run_dir`]) and
/// returns it with the training file.
pub(crate) fn output_and_train_file(
    cfg: &RunConfig,
    opts: &RunOptions,
) -> Result<(PathBuf, PathBuf)> {
    let out = cfg.output.dir.clone();
    let train_file = cfg.data.train.clone().context("no training data")?;
    // Rank 0 alone writes, so it alone claims (another rank would find rank 0's files there).
    if opts.group.is_writer() {
        crate::outdir::claim_run_dir(&out, &fingerprint(cfg), opts)?;
    }
    Ok((out, train_file))
}

/// Exports the trained model to `<out>/final` with its tokenizer files; returns the directory and the files.
pub(crate) fn export_final<M: ytrainer_core::model::CausalLm>(
    model: &M,
    cfg: &RunConfig,
    model_dir: &Path,
    out: &Path,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    // Written beside `final` and moved into place whole: no file of an earlier export survives next to this one.
    let final_dir = out.join("final");
    let tmp = crate::outdir::staging_dir(&final_dir)?;
    let files = model
        .export(&tmp)
        .map_err(|e| crate::invalid!("exporting the trained model: {e}"))?;
    copy_tokenizer_files(model_dir, &tmp, cfg.adapter.kind == AdapterKind::Full)?;
    crate::outdir::commit_dir(&tmp, &final_dir)?;
    let files = crate::outdir::rebase_files(files, &tmp, &final_dir);
    Ok((final_dir, files))
}

/// Splits off a deterministic eval fraction: every k-th record, so the split does not depend on file order
/// (shuffled data stays shuffled, sorted data is sampled evenly).
pub fn split_eval<T>(records: Vec<T>, fraction: f64) -> (Vec<T>, Vec<T>) {
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
