//! Preference pairs (DPO family): loading the common layouts and tokenizing each side with its prompt masked.
//!
//! Layouts, detected per record:
//! - `prompt` / `chosen` / `rejected` strings (or `prompt` as a message list, `chosen` / `rejected` as message
//!   lists: TRL's conversational layout);
//! - `chosen_messages` / `rejected_messages`: two whole conversations sharing every turn but the last assistant
//!   turn (LLaMA-Factory v1);
//! - ShareGPT pairs: `conversations` (the multi-turn history) + `chosen` / `rejected` objects `{from, value}`.
//!
//! An optional numeric `weight` scales the pair's loss. A record missing a side is an error; a pair whose sides
//! are identical, or with an empty completion, is dropped with a counted warning (it carries no preference).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::DataError;
use crate::formats::{
    DataWarning, Message, Origin, content_of, load_objects, messages_of, role_of,
};
use crate::template::ChatTemplate;
use crate::tokenize::{Example, TokenizerWrapper, TrainOn, tokenize_chat};

/// One preference pair: a shared prompt (conversation history) and two alternative assistant completions.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    /// Where it came from.
    pub origin: Origin,
    /// Conversation up to (not including) the completion; ends with a user turn.
    pub prompt: Vec<Message>,
    /// Preferred completion.
    pub chosen: String,
    /// Dispreferred completion.
    pub rejected: String,
    /// Loss weight of the pair (default 1).
    pub weight: f64,
    /// KTO data ([`crate::kto::load_kto`]): whether `chosen` is a desirable completion; `rejected` is then the
    /// mismatched completion KTO's KL estimate reads. `None` for preference pairs.
    pub label: Option<bool>,
}

/// A loaded pair file.
#[derive(Debug, Clone)]
pub struct LoadedPairs {
    /// Usable pairs.
    pub pairs: Vec<PairRecord>,
    /// Dropped records, with the reason.
    pub warnings: Vec<DataWarning>,
}

fn err(origin: &Origin, message: impl Into<String>) -> DataError {
    DataError::Record {
        origin: origin.clone(),
        message: message.into(),
    }
}

/// Text of a completion field: a string, an object `{from|role, value|content}`, or a list of messages whose
/// last one is the assistant's answer.
fn completion(origin: &Origin, key: &str, v: &Value) -> Result<String, DataError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(o) => {
            let c = o.get("value").or_else(|| o.get("content")).ok_or_else(|| {
                err(
                    origin,
                    format!("field \"{key}\" must hold \"value\" or \"content\""),
                )
            })?;
            content_of(origin, key, c)?
                .ok_or_else(|| err(origin, format!("field \"{key}\".value must be a string")))
        }
        Value::Array(list) => match list.last() {
            Some(last) => completion(origin, key, last),
            None => Ok(String::new()),
        },
        _ => Err(err(
            origin,
            format!("field \"{key}\" must be a string, a message object or a list of messages"),
        )),
    }
}

fn prompt_messages(origin: &Origin, key: &str, v: &Value) -> Result<Vec<Message>, DataError> {
    match v {
        Value::String(s) => Ok(vec![Message::new("user", s)]),
        Value::Array(list) => {
            let mut out = Vec::new();
            for (i, m) in list.iter().enumerate() {
                let role = m
                    .get("role")
                    .or_else(|| m.get("from"))
                    .and_then(Value::as_str)
                    .and_then(role_of)
                    .ok_or_else(|| {
                        err(
                            origin,
                            format!("field \"{key}\"[{i}] needs a known \"role\" (or \"from\")"),
                        )
                    })?;
                let c = m
                    .get("content")
                    .or_else(|| m.get("value"))
                    .unwrap_or(&Value::Null);
                let content = content_of(origin, key, c)?.unwrap_or_default();
                out.push(Message::new(role, &content));
            }
            Ok(out)
        }
        _ => Err(err(
            origin,
            format!("field \"{key}\" must be a string or a list of messages"),
        )),
    }
}

fn convert(
    origin: &Origin,
    obj: &Map<String, Value>,
) -> Result<Result<PairRecord, String>, DataError> {
    let weight = match obj.get("weight") {
        None | Some(Value::Null) => 1.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(1.0),
        Some(_) => return Err(err(origin, "field \"weight\" must be a number")),
    };
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(err(
            origin,
            format!("field \"weight\" = {weight}: must be a finite number >= 0"),
        ));
    }
    let (prompt, chosen, rejected) = if obj.contains_key("chosen_messages")
        || obj.contains_key("rejected_messages")
    {
        let side = |key: &str| -> Result<Result<Vec<Message>, String>, DataError> {
            let v = obj.get(key).ok_or_else(|| {
                err(origin, format!("field \"{key}\" is missing; a messages pair needs both \"chosen_messages\" and \"rejected_messages\""))
            })?;
            let mut o = Map::new();
            o.insert("messages".into(), v.clone());
            messages_of(origin, &o)
        };
        let c = match side("chosen_messages")? {
            Ok(m) => m,
            Err(w) => return Ok(Err(format!("chosen side: {w}"))),
        };
        let r = match side("rejected_messages")? {
            Ok(m) => m,
            Err(w) => return Ok(Err(format!("rejected side: {w}"))),
        };
        let (Some((cl, cp)), Some((rl, rp))) = (c.split_last(), r.split_last()) else {
            return Ok(Err("a side has no messages (record dropped)".into()));
        };
        if cl.role != "assistant" || rl.role != "assistant" {
            return Err(err(
                origin,
                "the last message of \"chosen_messages\" and \"rejected_messages\" must be the assistant's answer",
            ));
        }
        if cp != rp {
            return Err(err(
                origin,
                "\"chosen_messages\" and \"rejected_messages\" must share every turn before the final answer",
            ));
        }
        (cp.to_vec(), cl.content.clone(), rl.content.clone())
    } else {
        let get = |key: &str| {
            obj.get(key).ok_or_else(|| {
                err(origin, format!("field \"{key}\" is missing; every preference pair needs \"chosen\" and \"rejected\" (and \"prompt\" or \"conversations\")"))
            })
        };
        let chosen = completion(origin, "chosen", get("chosen")?)?;
        let rejected = completion(origin, "rejected", get("rejected")?)?;
        let prompt = if let Some(c) = obj.get("conversations") {
            prompt_messages(origin, "conversations", c)?
        } else {
            let mut p = prompt_messages(origin, "prompt", get("prompt")?)?;
            // TRL's conversational layout repeats the prompt inside chosen/rejected lists: keep only the prompt.
            if let Some(Value::Array(l)) = obj.get("chosen")
                && l.len() > 1
                && p.is_empty()
            {
                p = prompt_messages(origin, "chosen", &Value::Array(l[..l.len() - 1].to_vec()))?;
            }
            p
        };
        if let Some(Value::String(system)) = obj.get("system")
            && !system.trim().is_empty()
        {
            let mut with = vec![Message::new("system", system)];
            with.extend(prompt);
            (with, chosen, rejected)
        } else {
            (prompt, chosen, rejected)
        }
    };
    if prompt.is_empty() || prompt.last().is_some_and(|m| m.role == "assistant") {
        return Err(err(
            origin,
            "the prompt must end with a user turn (the completions answer it)",
        ));
    }
    if chosen.trim().is_empty() || rejected.trim().is_empty() {
        let side = if chosen.trim().is_empty() {
            "chosen"
        } else {
            "rejected"
        };
        return Ok(Err(format!(
            "the {side} completion is empty (record dropped)"
        )));
    }
    if chosen == rejected {
        return Ok(Err("chosen and rejected are identical, so the pair expresses no preference (record dropped)".into()));
    }
    Ok(Ok(PairRecord {
        origin: origin.clone(),
        prompt,
        chosen,
        rejected,
        weight,
        label: None,
    }))
}

/// Loads a preference-pair file (json array, jsonl or csv).
pub fn load_pairs(path: &Path) -> Result<LoadedPairs, DataError> {
    let raw = load_objects(path)?;
    let mut pairs = Vec::new();
    let mut warnings = Vec::new();
    for (index, (line, obj)) in raw.into_iter().enumerate() {
        let origin = Origin {
            file: path.to_path_buf(),
            line,
            index,
        };
        match convert(&origin, &obj)? {
            Ok(p) => pairs.push(p),
            Err(message) => warnings.push(DataWarning { origin, message }),
        }
    }
    if pairs.is_empty() {
        return Err(DataError::EmptyDataset {
            file: path.to_path_buf(),
            message: format!(
                "the file holds no usable preference pair ({} dropped{}); every record needs a prompt and two different, non-empty completions",
                warnings.len(),
                warnings
                    .first()
                    .map(|w| format!(", first: {w}"))
                    .unwrap_or_default()
            ),
        });
    }
    Ok(LoadedPairs { pairs, warnings })
}

/// Both sides of a pair tokenized as prompt + completion, only the completion (and its end-of-turn token)
/// supervised. The two sides share the prompt tokens exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct PairExample {
    /// Prompt + chosen completion.
    pub chosen: Example,
    /// Prompt + rejected completion.
    pub rejected: Example,
    /// Loss weight.
    pub weight: f64,
    /// KTO: whether `chosen` is desirable (see [`PairRecord::label`]).
    pub label: Option<bool>,
}

impl PairExample {
    /// Tokens of the longer side: a pair micro-batch pads both rows of every pair to its longest, so this is
    /// what one pair costs per row (memory plan, dealing micro-batches to ranks).
    pub fn row_len(&self) -> usize {
        self.chosen
            .input_ids
            .len()
            .max(self.rejected.input_ids.len())
    }
}

/// Tokenizes a pair with the chat template.
pub fn tokenize_pair(
    tok: &TokenizerWrapper,
    template: &ChatTemplate,
    pair: &PairRecord,
    vars: &Map<String, Value>,
) -> Result<PairExample, DataError> {
    let side = |text: &str| -> Result<Example, DataError> {
        let mut m = pair.prompt.clone();
        m.push(Message::new("assistant", text));
        let mut ex = tokenize_chat(tok, template, &m, TrainOn::LastAssistant, vars).map_err(
            |e| match e {
                DataError::Template(msg) => DataError::Template(format!("{}: {msg}", pair.origin)),
                other => other,
            },
        )?;
        ex.origin = Some(pair.origin.clone());
        Ok(ex)
    };
    Ok(PairExample {
        chosen: side(&pair.chosen)?,
        rejected: side(&pair.rejected)?,
        weight: pair.weight,
        label: pair.label,
    })
}
