//! Where a model comes from: a Hugging Face directory, a llama.cpp `.gguf` file (its config and tokenizer converted
//! once into the cache for training, its weights read in place) or the self-made `tiny` preset; with its tokenizer
//! (EOS taken from the chat template's end-of-turn token) and chat template.

use std::path::{Path, PathBuf};

use ytrainer_core::burn::prelude::*;
use ytrainer_core::config::{RunConfig, TrainingType};
use ytrainer_core::device::Precision;
use ytrainer_data::{ChatTemplate, TokenizerWrapper};
use ytrainer_models::gguf::{GgufFile, gguf_tokenizer};
use ytrainer_models::{
    AdapterSpec, BaseWeights, Decoder, HfConfig, is_gguf, load_peft_adapter, load_pretrained,
};

use crate::error::{Context, Result};
use crate::{bail, invalid};

/// A model ready for inference with its tokenizer and chat template.
pub struct Loaded {
    /// The network (with its adapter merged in as LoRA branches when one was given).
    pub model: Decoder,
    /// Its `config.json`.
    pub config: HfConfig,
    /// Its tokenizer.
    pub tok: TokenizerWrapper,
    /// Its chat template, when it has one.
    pub template: Option<ChatTemplate>,
}

/// The device inference runs on: plain (no autodiff, so LoRA dropout is off), on every backend.
pub fn inference_device(spec: &str) -> Result<Device> {
    if spec.trim() == "cpu" {
        return Ok(Device::flex());
    }
    ytrainer_core::device::select(spec, 0)
        .map(Device::without_autodiff)
        .map_err(|e| invalid!("{e}"))
}

/// The training device of a run, in the run's precision.
pub fn training_device(cfg: &RunConfig) -> Result<Device> {
    ytrainer_core::device::select_with(&cfg.train.device, cfg.train.seed, cfg.train.precision)
        .map_err(|e| invalid!("{e}"))
}

/// Tokenizer and chat template of a model directory or GGUF file (no weights loaded).
pub fn load_tokenizer(model: &Path) -> Result<(TokenizerWrapper, Option<ChatTemplate>)> {
    if is_gguf(model) {
        let gguf = GgufFile::open(model)?;
        let t = gguf_tokenizer(&gguf)?;
        let mut tok = TokenizerWrapper::from_json_str(&t.tokenizer_json)?;
        if let Some(eos) = &t.eos_token {
            tok.set_eos_token(eos)?;
        }
        let template = match &t.chat_template {
            Some(src) => Some(ChatTemplate::new(
                src,
                t.bos_token.clone(),
                t.eos_token.clone(),
            )?),
            None => None,
        };
        return Ok((tok, template));
    }
    if !model.join("config.json").is_file() && !model.join("tokenizer.json").is_file() {
        bail!(
            "{}: neither a .gguf file nor a Hugging Face model directory (no config.json / tokenizer.json)",
            model.display()
        );
    }
    let tok_path = model.join("tokenizer.json");
    if !tok_path.is_file() {
        bail!(
            "{}: missing tokenizer.json; copy it from the original model into this directory",
            model.display()
        );
    }
    let mut tok = TokenizerWrapper::from_file(&tok_path)?;
    let template = ChatTemplate::from_model_dir(model).ok();
    if let Some(eos) = template.as_ref().and_then(|t| t.eos_token()) {
        let eos = eos.to_string();
        // A template naming an EOS the vocabulary lacks is left to the template; the wrapper keeps its guess.
        let _ = tok.set_eos_token(&eos);
    }
    Ok((tok, template))
}

/// How inference holds a quantised GGUF's linear weights: in their blocks, as QLoRA training does (the quantised
/// matrix product gives the dequantised copy's numbers byte for byte at a fraction of the memory), unless
/// `YTRAINER_DEQUANTIZE=1` asks for the f32 copy.
pub fn inference_base() -> BaseWeights {
    if std::env::var_os("YTRAINER_DEQUANTIZE").is_some_and(|v| v == "1") {
        BaseWeights::F32
    } else {
        BaseWeights::Stored
    }
}

/// The model of a Hugging Face directory or a GGUF file, for inference (nothing trainable).
pub fn inference_model(
    model: &Path,
    device: &Device,
    base: BaseWeights,
) -> Result<(Decoder, HfConfig)> {
    Ok(if is_gguf(model) {
        ytrainer_models::load_gguf_frozen(model, device, base)?
    } else {
        load_pretrained(model, &AdapterSpec::Full, device)?
    })
}

/// Loads weights (HF directory or GGUF), the adapter if any, tokenizer and template.
pub fn load_for_inference(model: &Path, adapter: Option<&Path>, device: &Device) -> Result<Loaded> {
    load_for_inference_as(model, adapter, device, inference_base())
}

/// [`load_for_inference`] with the GGUF's weights held as `base` says (an export needs them in f32).
pub fn load_for_inference_as(
    model: &Path,
    adapter: Option<&Path>,
    device: &Device,
    base: BaseWeights,
) -> Result<Loaded> {
    let (tok, template) = load_tokenizer(model)?;
    let (mut decoder, config) = inference_model(model, device, base)?;
    if let Some(a) = adapter {
        decoder = load_peft_adapter(decoder, a).with_context(|| {
            format!(
                "loading the adapter {} onto {}",
                a.display(),
                model.display()
            )
        })?;
    }
    if decoder.spec.vocab_size < tok.vocab_size() {
        bail!(
            "the tokenizer has {} tokens but the model's vocabulary has only {}; use the tokenizer that belongs \
             to this model",
            tok.vocab_size(),
            decoder.spec.vocab_size
        );
    }
    Ok(Loaded {
        model: decoder,
        config,
        tok,
        template,
    })
}

/// The folder converted GGUF files are cached in: `$YTRAINER_CACHE`, else `$XDG_CACHE_HOME/ytrainer`, else
/// `~/.cache/ytrainer` (the current directory's `.ytrainer-cache` when there is no home).
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("YTRAINER_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ytrainer")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("ytrainer")))
        .unwrap_or_else(|| PathBuf::from(".ytrainer-cache"))
}

/// A 64-bit digest of a file's bytes (word-wise multiply-xor mixing over the memory-mapped file: gigabytes per
/// second), remembered per (path, size, mtime) so an unchanged file is read only once.
fn content_key(file: &Path, cache: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    let canonical = file.canonicalize().unwrap_or(file.to_path_buf());
    let stamp = format!(
        "{}\n{}\n{:?}\n",
        canonical.display(),
        meta.len(),
        meta.modified().ok()
    );
    let stamp_file = cache.join("stamps").join(format!(
        "{:016x}",
        ytrainer_core::checkpoint::content_hash(stamp.as_bytes())
    ));
    if let Some(key) = std::fs::read_to_string(&stamp_file)
        .ok()
        .and_then(|s| s.strip_prefix(&stamp).map(str::to_string))
    {
        return Ok(key);
    }
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    // SAFETY: read-only mapping of a model file for hashing; a file rewritten meanwhile gives a wrong key, which
    // the stamp (size, mtime) then no longer matches.
    let map = unsafe { memmap2::Mmap::map(&f) }
        .with_context(|| format!("cannot read {}", file.display()))?;
    let key = format!(
        "{:016x}{:016x}",
        ytrainer_core::checkpoint::content_hash(&map),
        map.len()
    );
    let _ = std::fs::create_dir_all(stamp_file.parent().expect("has a parent"));
    let _ = std::fs::write(&stamp_file, format!("{stamp}{key}"));
    Ok(key)
}

/// For training: a `.gguf` model's config and tokenizer files (and, when `with_weights`, its weights as f32
/// safetensors) are converted once per file content into the cache ([`cache_dir`]) and reused by every run; a
/// directory is returned as is. LoRA over the quantised GGUF reads the weights from the GGUF itself, so its runs
/// never write an f32 copy. `notice` hears what is being done.
pub fn model_dir_for_run(
    model: PathBuf,
    with_weights: bool,
    notice: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    if !model.is_file() || !is_gguf(&model) {
        return Ok(model);
    }
    let cache = cache_dir();
    let key = content_key(&model, &cache)?;
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let dir = cache.join("gguf").join(format!("{stem}-{}", &key[..16]));
    let marker = |weights: bool| {
        dir.join(if weights {
            ".complete-weights"
        } else {
            ".complete"
        })
    };
    if marker(with_weights).is_file() || marker(true).is_file() {
        return Ok(dir);
    }
    notice(&format!(
        "converting {} ({}) into the cache {}",
        model.display(),
        if with_weights {
            "config, tokenizer and f32 weights"
        } else {
            "config and tokenizer; the weights stay in the GGUF"
        },
        dir.display()
    ));
    // Written beside and renamed into place, so a run killed mid-conversion (or a second run converting the same
    // file) never sees a half-written folder.
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let report = ytrainer_models::gguf::convert_gguf_with(&model, &tmp, with_weights)?;
    for w in &report.warnings {
        notice(&format!("warning: {w}"));
    }
    for m in [false, with_weights] {
        let p = tmp.join(if m { ".complete-weights" } else { ".complete" });
        std::fs::write(&p, format!("{}\n", model.display()))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}

/// The model directory of a run: given, or self-made from the preset (reused when it already exists, e.g. on
/// resume); a GGUF file is converted once into the run directory.
pub fn resolve_model_dir(
    cfg: &RunConfig,
    out: &Path,
    train_file: &Path,
    notice: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let model_dir = match (&cfg.model.path, &cfg.model.preset) {
        (Some(p), _) => p.clone(),
        (None, Some(preset)) => {
            let d = out.join("base-model");
            if !d.join("model.safetensors").exists() {
                notice(&format!(
                    "creating the `{preset}` model in {} (tokenizer trained on {})",
                    d.display(),
                    train_file.display()
                ));
                // Made on the CPU, in the run's precision when the run trains there too.
                let precision = if cfg.train.device == "cpu" {
                    cfg.train.precision
                } else {
                    Precision::F32
                };
                crate::preset::create_preset_with(
                    preset,
                    train_file,
                    &cfg.data.columns,
                    cfg.model.seed,
                    &d,
                    precision,
                )?;
            }
            d
        }
        (None, None) => bail!("no model given"),
    };
    let with_weights = crate::common::base_weights(cfg)? != BaseWeights::Stored;
    let model_dir = model_dir_for_run(model_dir, with_weights, notice)?;
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
pub fn tokenizer_and_template(
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

/// The padding id of a tokenizer: `<|endoftext|>` when it has one, else EOS, else 0.
pub fn pad_id(tok: &TokenizerWrapper) -> u32 {
    tok.token_to_id("<|endoftext|>")
        .or_else(|| tok.eos_id())
        .unwrap_or(0)
}
