//! Loading a model for inference (`score`, `generate`, `chat`, `render`, `merge`) from a Hugging Face directory
//! or a `.gguf` file, with an optional PEFT adapter; and the GGUF cache used by `run`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ytrainer_core::burn::prelude::*;
use ytrainer_data::{ChatTemplate, TokenizerWrapper};
use ytrainer_models::gguf::{GgufFile, gguf_tokenizer};
use ytrainer_models::{
    AdapterSpec, Decoder, HfConfig, is_gguf, load_gguf, load_peft_adapter, load_pretrained,
};

/// A model ready for inference with its tokenizer and chat template.
pub struct Loaded {
    pub model: Decoder,
    pub config: HfConfig,
    pub tok: TokenizerWrapper,
    pub template: Option<ChatTemplate>,
}

/// The device inference runs on: plain (no autodiff, so LoRA dropout is off) on the CPU.
pub fn inference_device(spec: &str) -> Result<Device> {
    if spec.trim() == "cpu" {
        return Ok(Device::flex());
    }
    ytrainer_core::device::select(spec, 0).map_err(|e| anyhow!(e))
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

/// Loads weights (HF directory or GGUF), the adapter if any, tokenizer and template.
pub fn load_for_inference(model: &Path, adapter: Option<&Path>, device: &Device) -> Result<Loaded> {
    let (tok, template) = load_tokenizer(model)?;
    let (mut decoder, config) = if is_gguf(model) {
        load_gguf(model, &AdapterSpec::Full, device)?
    } else {
        load_pretrained(model, &AdapterSpec::Full, device)?
    };
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

/// For `run`: a `.gguf` model is converted once into `<output dir>/base-model-gguf/` (reused while the GGUF's
/// size and modification time are unchanged); a directory is returned as is.
pub fn model_dir_for_run(model: PathBuf, out: &Path) -> Result<PathBuf> {
    if !model.is_file() || !is_gguf(&model) {
        return Ok(model);
    }
    let meta =
        std::fs::metadata(&model).with_context(|| format!("cannot read {}", model.display()))?;
    let stamp = format!(
        "{}\n{}\n{:?}\n",
        model.canonicalize().unwrap_or(model.clone()).display(),
        meta.len(),
        meta.modified().ok()
    );
    let dir = out.join("base-model-gguf");
    let marker = dir.join(".gguf-source");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str())
        && dir.join("model.safetensors").is_file()
    {
        return Ok(dir);
    }
    eprintln!("converting {} to {}", model.display(), dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    let report = ytrainer_models::convert_gguf(&model, &dir)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    std::fs::write(&marker, stamp).with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(dir)
}

/// Parses `NAME=VALUE` template variables: the value as JSON when it parses, else as a string.
pub fn parse_vars(vars: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    for v in vars {
        let (k, val) = v.split_once('=').ok_or_else(|| {
            anyhow!("--var `{v}`: expected NAME=VALUE, e.g. enable_thinking=false")
        })?;
        let k = k.trim();
        if k.is_empty() {
            bail!("--var `{v}`: the name is empty");
        }
        let parsed = serde_json::from_str(val)
            .unwrap_or_else(|_| serde_json::Value::String(val.to_string()));
        out.insert(k.to_string(), parsed);
    }
    Ok(out)
}
