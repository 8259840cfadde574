//! The `tiny` preset: a Qwen2-shaped decoder small enough to train in a minute on two cores, with a byte-level
//! BPE trained on the run's own data and a ChatML template, so the quick start needs no download.

use std::fs;
use std::path::Path;

use ytrainer_core::device::Precision;
use ytrainer_data::{ChatTemplate, ColumnMap, Record, TokenizerWrapper, load_records_with};
use ytrainer_models::{AdapterSpec, HfConfig, init_random};

use crate::error::{Context, Result};
use crate::{bail, invalid};

/// Vocabulary of the self-made tokenizer of the `tiny` preset.
const TINY_VOCAB: usize = 2048;

/// The `tiny` preset's `config.json`.
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
    HfConfig::from_json_str(&json.to_string()).map_err(|e| invalid!("tiny preset config: {e}"))
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
    create_preset_with(preset, data, &ColumnMap::new(), seed, out, precision)
}

/// [`create_preset`] reading `data` with a column map (`[data] columns`).
pub fn create_preset_with(
    preset: &str,
    data: &Path,
    columns: &ColumnMap,
    seed: u64,
    out: &Path,
    precision: Precision,
) -> Result<()> {
    if preset != "tiny" {
        bail!("unknown preset `{preset}`; the only preset is `tiny`");
    }
    let tokenizer_json = tiny_tokenizer_json(data, columns)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    fs::write(out.join("tokenizer.json"), &tokenizer_json)
        .with_context(|| format!("cannot write {}", out.join("tokenizer.json").display()))?;
    let tok = TokenizerWrapper::from_file(&out.join("tokenizer.json"))?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| invalid!("self-made tokenizer lacks `{t}`"))
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
        ytrainer_core::device::select_with("cpu", seed, precision).map_err(|e| invalid!("{e}"))?;
    let model = init_random(&config, seed, &AdapterSpec::Full, &device)?;
    ytrainer_models::save_hf_checkpoint(&model, &config, out)?;
    Ok(())
}

/// The `tiny` preset's tokenizer (`tokenizer.json` text): a byte-level BPE trained on `data`.
fn tiny_tokenizer_json(data: &Path, columns: &ColumnMap) -> Result<String> {
    let loaded = load_records_with(data, columns)?;
    let texts: Vec<String> = loaded.records.iter().map(record_text).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let specials = ytrainer_data::CHATML_SPECIAL_TOKENS;
    Ok(ytrainer_data::train_byte_level_bpe(
        &refs, TINY_VOCAB, &specials,
    )?)
}

/// The tokenizer and chat template the `tiny` preset would get from `data`, made in memory (nothing written):
/// what `--dry-run` plans with before the preset exists.
pub fn tiny_tokenizer(data: &Path) -> Result<(TokenizerWrapper, ChatTemplate)> {
    tiny_tokenizer_with(data, &ColumnMap::new())
}

/// [`tiny_tokenizer`] reading `data` with a column map (`[data] columns`).
pub fn tiny_tokenizer_with(
    data: &Path,
    columns: &ColumnMap,
) -> Result<(TokenizerWrapper, ChatTemplate)> {
    let mut tok = TokenizerWrapper::from_json_str(&tiny_tokenizer_json(data, columns)?)?;
    tok.set_eos_token("<|im_end|>")?;
    let template = ChatTemplate::new(
        ytrainer_data::CHATML_TEMPLATE,
        None,
        Some("<|im_end|>".to_string()),
    )?;
    Ok((tok, template))
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
