//! KTO data: unpaired completions, each marked desirable or not (`"label": true|false`, or `"kto_tag"`), as in
//! LLaMA-Factory's `kto_en_demo.json`: a `messages` / `conversations` list whose last message is the assistant's
//! completion, plus the label (and an optional `weight`).
//!
//! Each record becomes a [`PairRecord`] whose `chosen` is its own completion and whose `rejected` is the completion
//! of the **next** record of the file (the last takes the first's): the mismatched prompt/completion pairs KTO's
//! KL estimate reads (TRL shifts completions by one within a batch; here the shift is fixed at load time, so the
//! plan stays a pure function of data and seed).

use std::path::Path;

use serde_json::Value;

use crate::error::DataError;
use crate::formats::{DataWarning, Origin, load_objects, messages_of};
use crate::pairs::{LoadedPairs, PairRecord};

fn err(origin: &Origin, message: impl Into<String>) -> DataError {
    DataError::Record {
        origin: origin.clone(),
        message: message.into(),
    }
}

/// Loads a KTO file (json array or jsonl): one [`PairRecord`] per usable record, with `label` set.
pub fn load_kto(path: &Path) -> Result<LoadedPairs, DataError> {
    let raw = load_objects(path)?;
    let mut kept: Vec<PairRecord> = Vec::new();
    let mut warnings = Vec::new();
    for (index, (line, obj)) in raw.into_iter().enumerate() {
        let origin = Origin {
            file: path.to_path_buf(),
            line,
            index,
        };
        let label = match obj.get("label").or_else(|| obj.get("kto_tag")) {
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(err(
                    &origin,
                    format!(
                        "field \"label\" = {other}: KTO records need \"label\": true (desirable) or false (undesirable)"
                    ),
                ));
            }
            None => {
                return Err(err(
                    &origin,
                    "field \"label\" is missing; every KTO record needs \"label\": true (desirable) or false \
                     (undesirable) next to its \"messages\" (`--loss kto` reads unpaired data; pairs with \
                     \"chosen\" / \"rejected\" are for dpo and its family)",
                ));
            }
        };
        let weight = match obj.get("weight") {
            None | Some(Value::Null) => 1.0,
            Some(v) => match v.as_f64() {
                Some(w) if w.is_finite() && w >= 0.0 => w,
                _ => {
                    return Err(err(
                        &origin,
                        format!("field \"weight\" = {v}: must be a finite number >= 0"),
                    ));
                }
            },
        };
        let messages = match messages_of(&origin, &obj)? {
            Ok(m) => m,
            Err(w) => {
                warnings.push(DataWarning { origin, message: w });
                continue;
            }
        };
        let Some((last, prompt)) = messages.split_last() else {
            warnings.push(DataWarning {
                origin,
                message: "no messages (record dropped)".into(),
            });
            continue;
        };
        if last.role != "assistant" {
            return Err(err(
                &origin,
                "the last message must be the assistant's completion (the one the label judges)",
            ));
        }
        if prompt.last().is_none_or(|m| m.role == "assistant") {
            return Err(err(
                &origin,
                "the completion must answer a user turn: the message before it must be the user's",
            ));
        }
        kept.push(PairRecord {
            origin,
            prompt: prompt.to_vec(),
            chosen: last.content.clone(),
            rejected: String::new(),
            weight,
            label: Some(label),
        });
    }
    let n = kept.len();
    let completions: Vec<String> = kept.iter().map(|p| p.chosen.clone()).collect();
    for (i, p) in kept.iter_mut().enumerate() {
        p.rejected = completions[(i + 1) % n.max(1)].clone();
    }
    Ok(LoadedPairs {
        pairs: kept,
        warnings,
    })
}
