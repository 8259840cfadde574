//! The HF tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata, rebuilt as `tokenizer.json` (byte-level
//! or SentencePiece BPE) with the special tokens and chat template, the way transformers' GGUF loader does.

use serde_json::{Value, json};

use super::file::{GgufFile, GgufValue};
use crate::ModelError;

/// Byte-level BPE regexes of llama.cpp's `tokenizer.ggml.pre` values (llama-vocab.cpp), as HF pre-tokenizers.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    let seq = |items: Vec<Value>| json!({"type": "Sequence", "pretokenizers": items});
    const LLAMA3: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    const QWEN2: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    Some(match pre {
        // GPT-2's own regex, which ByteLevel(use_regex) applies.
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" | "poro-chat" | "viking" | "bloom" => {
            byte_level(true)
        }
        // StarCoder family (incl. SmolLM). llama.cpp splits off every digit before GPT-2's regex; transformers'
        // GGUF loader does not, and we follow transformers so the rebuilt tokenizer.json equals the one it makes
        // (they differ only on whitespace right before a digit, e.g. "\n\n00": "Ċ","Ċ" vs "ĊĊ").
        "starcoder" | "smollm" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "command-r" => {
            byte_level(true)
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "smaug-bpe" | "dbrx" => {
            seq(vec![split(LLAMA3), byte_level(false)])
        }
        "qwen2" | "deepseek-r1-qwen" | "qwen35" => seq(vec![split(QWEN2), byte_level(false)]),
        _ => return None,
    })
}

/// What the GGUF tokenizer metadata gives: `tokenizer.json`, the special-token strings and the chat template.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The text of an HF `tokenizer.json`.
    pub tokenizer_json: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// The `tokenizer_config.json` transformers would write next to it (with the chat template).
    pub fn tokenizer_config_json(&self) -> String {
        let mut o = serde_json::Map::new();
        o.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
            ("chat_template", &self.chat_template),
        ] {
            if let Some(v) = v {
                o.insert(k.into(), json!(v));
            }
        }
        o.insert("clean_up_tokenization_spaces".into(), json!(false));
        serde_json::to_string_pretty(&o).expect("serializes")
    }
}

/// The BPE merges of a SentencePiece vocabulary, as transformers' `SentencePieceExtractor` derives them from
/// the pieces and their scores: every split of a piece into two pieces of the vocabulary is a merge, ranked by
/// the piece's score (higher first), then the longer left half first; remaining ties keep id order.
/// SentencePiece BPE scores a piece by the order it was learnt in, so this replays its merge order.
fn spm_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let chars = |id: usize| tokens[id].chars().count();
    // (score, left length, right length, left id, right id)
    let mut merges: Vec<(f32, usize, usize, usize, usize)> = Vec::new();
    for (id, &piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        let score = scores.get(id).copied().unwrap_or(0.0);
        merges.extend(
            local
                .into_iter()
                .map(|(l, r)| (score, chars(l), chars(r), l, r)),
        );
    }
    // Stable, so equal keys keep the order the loop produced.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// Rebuilds the HF tokenizer from `tokenizer.ggml.*`: byte-level BPE (`tokenizer.ggml.model = gpt2`) with its
/// merges, or SentencePiece BPE (`llama`: Llama 1/2, Mistral 7B, TinyLlama, Phi-3) with merges derived from the
/// piece scores, byte fallback and the `▁` space marker, as transformers' GGUF loader builds it.
pub fn gguf_tokenizer(gguf: &GgufFile) -> Result<GgufTokenizer, ModelError> {
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| gguf.err("no tokenizer in the metadata (`tokenizer.ggml.model` is missing); put a tokenizer.json from the original model next to the converted checkpoint".into()))?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        _ => {
            return Err(gguf.err(format!(
                "metadata `tokenizer.ggml.model`: `{model}` tokenizers are not rebuilt (only byte-level BPE, \
                 `gpt2`, and SentencePiece BPE, `llama`); copy tokenizer.json from the original Hugging Face \
                 model into the converted directory"
            )));
        }
    };
    let strings = |k: &str| -> Result<Vec<&str>, ModelError> {
        gguf.get(k)
            .and_then(GgufValue::as_array)
            .ok_or_else(|| gguf.err(format!("metadata `{k}` is missing or not an array")))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| gguf.err(format!("metadata `{k}`: entries must be strings")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = if spm {
        let scores: Vec<f32> = gguf
            .get("tokenizer.ggml.scores")
            .and_then(GgufValue::as_array)
            .ok_or_else(|| {
                gguf.err(
                    "metadata `tokenizer.ggml.scores` is missing or not an array (a SentencePiece vocabulary \
                     needs its piece scores to rebuild the merges)"
                        .into(),
                )
            })?
            .iter()
            .map(|v| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    gguf.err("metadata `tokenizer.ggml.scores`: entries must be numbers".into())
                })
            })
            .collect::<Result<_, _>>()?;
        if scores.len() != tokens.len() {
            return Err(gguf.err(format!(
                "metadata `tokenizer.ggml.scores` has {} entries but `tokenizer.ggml.tokens` has {}",
                scores.len(),
                tokens.len()
            )));
        }
        spm_merges(&tokens, &scores)
    } else {
        strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(gguf.err(format!(
                    "metadata `tokenizer.ggml.merges`: entry `{m}` is not `A B`"
                ))),
            })
            .collect::<Result<_, _>>()?
    };
    let types: Vec<i64> = match gguf
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let pre_name = gguf
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let pre = if spm {
        Value::Null
    } else {
        pre_tokenizer(pre_name).ok_or_else(|| {
            gguf.err(format!(
                "metadata `tokenizer.ggml.pre`: pre-tokenizer `{pre_name}` is not known to ytrainer; supported: \
                 default, gpt2, smollm, starcoder, llama-bpe, llama3, qwen2, ... (copy tokenizer.json from the \
                 original model instead)"
            ))
        })?
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, &t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
        // 2 = unknown, 3 = control, 4 = user-defined (llama.cpp's token types).
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 || (spm && ty == 2) {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != 4,
            }));
        }
    }
    let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
    let token = |k: &str| {
        gguf.get(&format!("tokenizer.ggml.{k}"))
            .and_then(GgufValue::as_u64)
            .and_then(|id| tokens.get(id as usize))
            .map(|s| s.to_string())
    };
    let bos = token("bos_token_id");
    // llama.cpp adds BOS by default for SentencePiece vocabularies, not for byte-level BPE.
    let add_bos = gguf
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(spm);
    let (single, pair, specials) = match (&bos, add_bos) {
        (Some(b), true) => {
            let id = gguf
                .get("tokenizer.ggml.bos_token_id")
                .and_then(GgufValue::as_u64);
            (
                json!([{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]),
                json!([{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]),
                json!({ b.clone(): {"id": b, "ids": [id], "tokens": [b]} }),
            )
        }
        _ => (
            json!([{"Sequence": {"id": "A", "type_id": 0}}]),
            json!([{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]),
            json!({}),
        ),
    };
    let (normalizer, decoder, unk) = if spm {
        // SentencePiece marks spaces with `▁` and (by default) prefixes the text with one; bytes missing from
        // the vocabulary become `<0xNN>` pieces.
        let prefix = gguf
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(GgufValue::as_bool)
            .unwrap_or(true);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if prefix {
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
        } else {
            replace
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            normalizer,
            json!({"type": "Sequence", "decoders": decoders}),
            json!(token("unknown_token_id")),
        )
    } else {
        (
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            Value::Null,
        )
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": if spm { Value::Null } else { json!("") },
            "end_of_word_suffix": if spm { Value::Null } else { json!("") }, "fuse_unk": spm, "byte_fallback": spm,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(GgufTokenizer {
        tokenizer_json: serde_json::to_string(&tj).expect("serializes"),
        bos_token: bos,
        eos_token: token("eos_token_id"),
        pad_token: token("padding_token_id"),
        unk_token: token("unknown_token_id"),
        chat_template: gguf
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_string),
    })
}
