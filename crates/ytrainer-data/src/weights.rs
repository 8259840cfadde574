//! Weights from the data: a record's `weight` (scales every supervised token of the record, as DPO's pair
//! `weight` does) and a message's `"weight"` in messages / ShareGPT records (scales that turn's supervised
//! tokens; `0` = the turn is not trained at all: its tokens leave the supervision mask, so no normaliser counts
//! them). The trainer multiplies each token's data weight into the plugin's weight (docs/data.md).

use serde_json::{Map, Value};

use crate::error::{DataError, Origin};

/// Per-token (or per-message) weights; empty = every weight 1. Compared by bits, so it can sit in `Eq` types.
#[derive(Debug, Clone, Default)]
pub struct Weights(pub Vec<f32>);

impl PartialEq for Weights {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for Weights {}

impl Weights {
    /// Weight `i` (1 when the list is empty or shorter).
    pub fn get(&self, i: usize) -> f32 {
        self.0.get(i).copied().unwrap_or(1.0)
    }

    /// Whether every weight is 1.
    pub fn is_uniform(&self) -> bool {
        self.0.iter().all(|&w| w == 1.0)
    }
}

/// The weights a record carries: its own `weight` and, for a chat record, one per message of
/// [`crate::RecordKind::Chat`] (in that list's order, the `system` field's turn included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWeights {
    /// The record's `weight` (1 when absent).
    pub record: Weights,
    /// Each message's `"weight"`; empty when none is given.
    pub messages: Weights,
}

impl Default for RecordWeights {
    fn default() -> Self {
        RecordWeights {
            record: Weights(vec![1.0]),
            messages: Weights::default(),
        }
    }
}

impl RecordWeights {
    /// The record's weight.
    pub fn record(&self) -> f32 {
        self.record.get(0)
    }

    /// Whether the record and all its messages have weight 1.
    pub fn is_uniform(&self) -> bool {
        self.record.is_uniform() && self.messages.is_uniform()
    }
}

fn weight_value(origin: &Origin, field: &str, v: &Value) -> Result<f32, DataError> {
    let bad = |what: String| DataError::Record {
        origin: origin.clone(),
        message: format!(
            "field \"{field}\" = {what}: a weight must be a finite number >= 0 (1 = normal, 0 = not trained); \
             fix or remove it"
        ),
    };
    match v.as_f64() {
        Some(w) if w.is_finite() && w >= 0.0 && w <= f32::MAX as f64 => Ok(w as f32),
        Some(w) => Err(bad(w.to_string())),
        None => Err(bad(v.to_string())),
    }
}

/// Reads a record's `weight` and, for messages / ShareGPT records, each message's `"weight"`. `chat` says whether
/// the record became a chat record; the message list is aligned with the one `formats` builds (a non-empty
/// `system` field opens it).
pub fn read_weights(
    origin: &Origin,
    obj: &Map<String, Value>,
    chat: bool,
) -> Result<RecordWeights, DataError> {
    let record = match obj.get("weight") {
        None | Some(Value::Null) => 1.0,
        Some(v) => weight_value(origin, "weight", v)?,
    };
    let mut messages = Vec::new();
    let list = obj
        .get("messages")
        .or_else(|| obj.get("conversations"))
        .and_then(Value::as_array);
    if chat && let Some(list) = list {
        let key = if obj.contains_key("messages") {
            "messages"
        } else {
            "conversations"
        };
        let weighted = list
            .iter()
            .any(|m| m.as_object().is_some_and(|m| m.contains_key("weight")));
        if weighted {
            if obj
                .get("system")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.trim().is_empty())
            {
                messages.push(1.0);
            }
            for (i, m) in list.iter().enumerate() {
                let w = match m.as_object().and_then(|m| m.get("weight")) {
                    None | Some(Value::Null) => 1.0,
                    Some(v) => weight_value(origin, &format!("{key}[{i}].weight"), v)?,
                };
                messages.push(w);
            }
        }
    }
    Ok(RecordWeights {
        record: Weights(vec![record]),
        messages: Weights(messages),
    })
}
