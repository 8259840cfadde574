//! A small byte-level BPE trainer for the project's self-made tiny models.
//!
//! Written here rather than taken from `tokenizers`' trainer so the result is reproducible to the
//! byte: pair counts are recomputed per merge and ties are broken by the pair's strings, so the same
//! texts always give the same `tokenizer.json`, whatever hash order or thread count.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use crate::error::DataError;

/// Qwen2's pre-tokenizer split pattern (also used by the tiny-qwen2 test model).
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens of a ChatML model, in id order after the merges.
pub const CHATML_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A ChatML chat template (our own wording): optional system turn, user/assistant turns, each
/// closed by `<|im_end|>` and a newline, and `<|im_start|>assistant\n` as the generation prompt.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}";

fn pre_tokenizer_json() -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]
    })
}

/// GPT-2's byte -> printable character table, in its canonical order.
fn byte_chars() -> Vec<(u8, char)> {
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let c = if printable {
            char::from_u32(b as u32).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
        out.push((b, c));
    }
    out.sort_by_key(|&(_, c)| c);
    out
}

/// Trains a byte-level BPE tokenizer on `texts` and returns its `tokenizer.json`.
///
/// The vocabulary is the 256 byte symbols, then one token per merge, then `special_tokens` as
/// added special tokens, for `vocab_size` ids in all (fewer if the texts run out of pairs).
pub fn train_byte_level_bpe(
    texts: &[&str],
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<String, DataError> {
    let min = 256 + special_tokens.len();
    if vocab_size < min {
        return Err(DataError::InvalidOption(format!(
            "vocab_size = {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus {} special tokens ({min})",
            special_tokens.len()
        )));
    }
    let pre: PreTokenizerWrapper = serde_json::from_value(pre_tokenizer_json())
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let mut word_counts: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        let mut pts = PreTokenizedString::from(*text);
        pre.pre_tokenize(&mut pts)
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        for (w, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *word_counts.entry(w.to_string()).or_default() += 1;
        }
    }

    let mut vocab: Vec<String> = byte_chars()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut index: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect();
    let mut words: Vec<(Vec<u32>, u64)> = word_counts
        .iter()
        .map(|(w, &c)| (w.chars().map(|ch| index[&ch.to_string()]).collect(), c))
        .collect();
    let mut merges: Vec<(u32, u32)> = Vec::new();
    let target = vocab_size - special_tokens.len();
    while vocab.len() < target {
        let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0], p[1])).or_default() += c;
            }
        }
        let best = counts.into_iter().max_by(|(pa, ca), (pb, cb)| {
            ca.cmp(cb).then_with(|| {
                // Ties: the lexicographically smallest pair wins (hence reversed).
                (&vocab[pb.0 as usize], &vocab[pb.1 as usize])
                    .cmp(&(&vocab[pa.0 as usize], &vocab[pa.1 as usize]))
            })
        });
        let Some(((a, b), _)) = best else { break };
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let id = match index.get(&merged) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                index.insert(merged.clone(), id);
                vocab.push(merged);
                id
            }
        };
        merges.push((a, b));
        for (w, _) in words.iter_mut() {
            let mut i = 0;
            let mut out = Vec::with_capacity(w.len());
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }

    let mut vocab_json = serde_json::Map::new();
    for (i, s) in vocab.iter().enumerate() {
        vocab_json.insert(s.clone(), json!(i));
    }
    let added: Vec<Value> = special_tokens
        .iter()
        .enumerate()
        .map(|(k, t)| {
            json!({"id": vocab.len() + k, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges_json: Vec<Value> = merges
        .iter()
        .map(|&(a, b)| json!([vocab[a as usize], vocab[b as usize]]))
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_json, "merges": merges_json
        }
    });
    serde_json::to_string_pretty(&tok).map_err(|e| DataError::Tokenizer(e.to_string()))
}
