//! Data files -> records.
//!
//! The layout is detected once per file from its first record, and every later record must follow it:
//! a file that mixes layouts is almost always a mistake, and guessing per record would hide it.
//!
//! Containers: a `.csv` file (header row = field names), a `.txt`/`.md` file (plain text for
//! continued pretraining: **one document per blank-line-separated paragraph**), otherwise JSON —
//! a JSON array of objects if the first non-blank character is `[`, else JSON Lines (one object per
//! non-blank line).
//!
//! Hard errors (the file is broken; fixing it is the only sane way on): unreadable or non-UTF-8
//! file, malformed JSON, an unknown layout, a record missing a required field or holding a value of
//! the wrong type, an unknown role, a non-text content part, and a file with no usable record.
//! Counted warnings (the record is dropped, the run goes on): a required field that is present but
//! empty, a conversation with no assistant turn.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::DataError;
pub use crate::error::Origin;

/// One chat turn. `role` is normalised to `system`, `user`, `assistant` or `tool`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// A whole conversation, every turn kept.
    Chat { messages: Vec<Message> },
    /// Raw text for continued pretraining.
    Text { text: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub origin: Origin,
    pub kind: RecordKind,
    /// The record's `weight` and its messages' (all 1 when absent).
    pub weights: crate::weights::RecordWeights,
}

/// The record layout detected from a file's first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `messages` / `conversations` lists (OpenAI or ShareGPT spelling).
    Messages,
    /// `instruction` / `input` / `output` (+ `system`, `history`).
    Alpaca,
    /// `prompt` + `completion` or `response`.
    PromptCompletion,
    /// `question` + `answer`.
    QuestionAnswer,
    /// `text` only: continued pretraining.
    Text,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Messages => "messages",
            Format::Alpaca => "alpaca",
            Format::PromptCompletion => "prompt/completion",
            Format::QuestionAnswer => "question/answer",
            Format::Text => "text",
        })
    }
}

/// The file container, detected from the extension and the first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    JsonArray,
    JsonLines,
    Csv,
    Txt,
}

/// A record that was dropped, with the reason; counted in the statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataWarning {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for DataWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

#[derive(Debug, Clone)]
pub struct LoadedRecords {
    pub records: Vec<Record>,
    pub format: Format,
    pub container: Container,
    /// Records dropped while loading (empty answers, conversations without an assistant turn).
    pub warnings: Vec<DataWarning>,
}

/// Reads a JSON / JSON Lines / CSV file into raw objects with their start lines (shared with the preference-pair
/// loader, which has its own record layouts).
pub(crate) fn load_objects(path: &Path) -> Result<Vec<Raw>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let offset = e.valid_up_to();
        DataError::NotUtf8 {
            file: path.to_path_buf(),
            line: 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count(),
            offset,
        }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_csv {
        split_csv(path, text)
    } else if text.trim_start().starts_with('[') {
        split_json_array(path, text)
    } else {
        split_json_lines(path, text)
    }
}

/// Converts one messages/conversations object (for the preference loader's `*_messages` layouts).
pub(crate) fn messages_of(
    origin: &Origin,
    obj: &Map<String, Value>,
) -> Result<Result<Vec<Message>, String>, DataError> {
    Ok(convert_messages(origin, obj)?.map(|k| match k {
        RecordKind::Chat { messages } => messages,
        RecordKind::Text { text } => vec![Message::new("user", &text)],
    }))
}

/// Normalises a role name (`human` -> `user`, `gpt` -> `assistant`, ...).
pub(crate) fn role_of(role: &str) -> Option<&'static str> {
    normalise_role(role)
}

/// Reads a content value: a string or a list of typed text parts.
pub(crate) fn content_of(
    origin: &Origin,
    key: &str,
    v: &Value,
) -> Result<Option<String>, DataError> {
    Ok(match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(content_parts(origin, key, 0, parts)?),
        _ => None,
    })
}

/// Reads and parses one data file.
pub fn load_records(path: &Path) -> Result<LoadedRecords, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let offset = e.valid_up_to();
            let line = 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count();
            return Err(DataError::NotUtf8 {
                file: path.to_path_buf(),
                line,
                offset,
            });
        }
    };
    parse_records(path, text)
}

/// Parses file contents already in memory; `path` is used for the container guess and messages.
pub fn parse_records(path: &Path, text: &str) -> Result<LoadedRecords, DataError> {
    parse_records_with(path, text, &ColumnMap::new())
}

/// A column map: the field name ytrainer reads (`instruction`, `output`, `question`, ...) -> the name the
/// file uses for it (LLaMA-Factory's `columns`, axolotl's `field_*`).
pub type ColumnMap = std::collections::BTreeMap<String, String>;

/// Every record field a column map may name: the fields of the layouts [`detect`] knows.
pub const RECORD_FIELDS: &[&str] = &[
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "prompt",
    "completion",
    "response",
    "question",
    "answer",
    "text",
];

/// [`load_records`] with a column map applied to every record before its layout is detected: the file's field
/// `columns[name]` is read as `name`. Every mapped field must be in the first record (a misspelt map is an
/// error naming the file, the line, the map entry and the fields there are); a later record lacking a
/// required mapped field is an error naming both names.
pub fn load_records_with(path: &Path, columns: &ColumnMap) -> Result<LoadedRecords, DataError> {
    if columns.is_empty() {
        return load_records(path);
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let offset = e.valid_up_to();
        DataError::NotUtf8 {
            file: path.to_path_buf(),
            line: 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count(),
            offset,
        }
    })?;
    parse_records_with(path, text, columns)
}

/// Renames the mapped fields of one record (`columns`: ours -> the file's).
fn map_columns(
    path: &Path,
    columns: &ColumnMap,
    first: bool,
    (line, obj): &mut Raw,
) -> Result<(), DataError> {
    // The file's own names, for the message about a missing one.
    let keys = obj
        .keys()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    for (ours, theirs) in columns {
        if !RECORD_FIELDS.contains(&ours.as_str()) {
            return Err(DataError::Record {
                origin: Origin {
                    file: path.to_path_buf(),
                    line: *line,
                    index: 0,
                },
                message: format!(
                    "column map entry {ours} = \"{theirs}\": `{ours}` is not a record field ytrainer reads; \
                     map one of: {}",
                    RECORD_FIELDS.join(", ")
                ),
            });
        }
        match obj.remove(theirs) {
            Some(v) => {
                obj.insert(ours.clone(), v);
            }
            None if first => {
                return Err(DataError::Record {
                    origin: Origin {
                        file: path.to_path_buf(),
                        line: *line,
                        index: 0,
                    },
                    message: format!(
                        "column map entry {ours} = \"{theirs}\": the first record has no field \"{theirs}\" \
                         (its fields: {}); fix the map or the file",
                        if keys.is_empty() { "none" } else { &keys }
                    ),
                });
            }
            None => {}
        }
    }
    Ok(())
}

/// [`parse_records`] with a column map (see [`load_records_with`]).
pub fn parse_records_with(
    path: &Path,
    text: &str,
    columns: &ColumnMap,
) -> Result<LoadedRecords, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let (container, mut raw) = match ext.as_str() {
        "csv" => (Container::Csv, split_csv(path, text)?),
        "txt" | "md" | "text" => (Container::Txt, split_txt(text)),
        _ => {
            if text.trim_start().starts_with('[') {
                (Container::JsonArray, split_json_array(path, text)?)
            } else {
                (Container::JsonLines, split_json_lines(path, text)?)
            }
        }
    };
    if raw.is_empty() {
        return Err(DataError::EmptyDataset {
            file: path.to_path_buf(),
            message: "the file holds no records; add at least one record (or remove the file from the data list)".into(),
        });
    }
    for (i, r) in raw.iter_mut().enumerate() {
        map_columns(path, columns, i == 0, r)?;
    }
    let format = detect(path, &raw[0])?;
    let mut records = Vec::with_capacity(raw.len());
    let mut warnings = Vec::new();
    for (index, (line, obj)) in raw.into_iter().enumerate() {
        let origin = Origin {
            file: path.to_path_buf(),
            line,
            index,
        };
        let converted = convert(format, &origin, &obj).map_err(|e| match e {
            // A field the map renamed is named as the file spells it too.
            DataError::Record { origin, message } => {
                let note: Vec<String> = columns
                    .iter()
                    .filter(|(ours, _)| message.contains(&format!("\"{ours}\"")))
                    .map(|(ours, theirs)| format!("\"{ours}\" is the file's \"{theirs}\""))
                    .collect();
                let message = if note.is_empty() {
                    message
                } else {
                    format!("{message} (column map: {})", note.join(", "))
                };
                DataError::Record { origin, message }
            }
            e => e,
        })?;
        match converted {
            Ok(kind) => {
                let weights = crate::weights::read_weights(
                    &origin,
                    &obj,
                    matches!(kind, RecordKind::Chat { .. }),
                )?;
                records.push(Record {
                    origin,
                    kind,
                    weights,
                })
            }
            Err(message) => warnings.push(DataWarning { origin, message }),
        }
    }
    if records.is_empty() {
        return Err(DataError::EmptyDataset {
            file: path.to_path_buf(),
            message: format!(
                "all {} records were dropped ({} warnings, first: {}); fix the records or remove the file",
                warnings.len(),
                warnings.len(),
                warnings.first().map(|w| w.to_string()).unwrap_or_default()
            ),
        });
    }
    Ok(LoadedRecords {
        records,
        format,
        container,
        warnings,
    })
}

pub(crate) type Raw = (usize, Map<String, Value>);

fn line_of(text: &str, offset: usize) -> usize {
    1 + text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn json_error(path: &Path, base_line: usize, e: &serde_json::Error, hint: &str) -> DataError {
    // serde_json appends " at line L column C"; we report the absolute line ourselves.
    let msg = e.to_string();
    let message = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    DataError::Json {
        file: path.to_path_buf(),
        line: base_line + e.line().saturating_sub(1),
        message,
        hint: hint.to_string(),
    }
}

fn expect_object(path: &Path, line: usize, v: Value) -> Result<Map<String, Value>, DataError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(DataError::Json {
            file: path.to_path_buf(),
            line,
            message: format!("expected a JSON object, found {}", kind_name(&other)),
            hint: "every record must be an object such as {\"messages\": [...]}".into(),
        }),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn split_json_lines(path: &Path, text: &str) -> Result<Vec<Raw>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            json_error(
                path,
                i + 1,
                &e,
                "each line of a JSON Lines file must be one complete JSON object (fix or delete the line)",
            )
        })?;
        out.push((i + 1, expect_object(path, i + 1, v)?));
    }
    Ok(out)
}

/// Finds each top-level element of a JSON array by scanning brackets and strings, then parses the
/// elements one by one: this is what gives every record its own start line.
fn split_json_array(path: &Path, text: &str) -> Result<Vec<Raw>, DataError> {
    const HINT: &str = "the file must be a JSON array of objects";
    let b = text.as_bytes();
    let err = |offset: usize, message: &str| DataError::Json {
        file: path.to_path_buf(),
        line: line_of(text, offset.min(b.len())),
        message: message.to_string(),
        hint: HINT.to_string(),
    };
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut i = skip_ws(0);
    debug_assert_eq!(b.get(i), Some(&b'['));
    i += 1;
    let mut out = Vec::new();
    i = skip_ws(i);
    if b.get(i) == Some(&b']') {
        return trailing(path, text, i + 1).map(|_| out);
    }
    loop {
        i = skip_ws(i);
        let start = i;
        let (mut depth, mut in_str, mut esc) = (0i64, false, false);
        while i < b.len() {
            let c = b[i];
            if in_str {
                if esc {
                    esc = false;
                } else if c == b'\\' {
                    esc = true;
                } else if c == b'"' {
                    in_str = false;
                }
            } else {
                match c {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth == 0 => break,
                    b'}' | b']' => depth -= 1,
                    b',' if depth == 0 => break,
                    _ => {}
                }
            }
            i += 1;
        }
        let line = line_of(text, start);
        let slice = &text[start..i];
        let v: Value = serde_json::from_str(slice).map_err(|e| json_error(path, line, &e, HINT))?;
        out.push((line, expect_object(path, line, v)?));
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return trailing(path, text, i + 1).map(|_| out),
            _ => {
                return Err(err(
                    i,
                    "unexpected end of file inside the array (missing `]`)",
                ));
            }
        }
    }
}

fn trailing(path: &Path, text: &str, from: usize) -> Result<(), DataError> {
    let rest = &text[from..];
    match rest.find(|c: char| !c.is_whitespace()) {
        None => Ok(()),
        Some(j) => Err(DataError::Json {
            file: path.to_path_buf(),
            line: line_of(text, from + j),
            message: "trailing characters after the closing `]`".into(),
            hint: "the file must be a JSON array of objects".into(),
        }),
    }
}

fn split_csv(path: &Path, text: &str) -> Result<Vec<Raw>, DataError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| csv_error(path, &e))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect::<Vec<_>>();
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_error(path, &e))?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let mut m = Map::new();
        for (h, v) in headers.iter().zip(rec.iter()) {
            m.insert(h.clone(), Value::String(v.to_string()));
        }
        out.push((line, m));
    }
    Ok(out)
}

fn csv_error(path: &Path, e: &csv::Error) -> DataError {
    let line = e.position().map(|p| p.line() as usize).unwrap_or(1);
    DataError::Csv {
        file: path.to_path_buf(),
        line,
        message: e.to_string(),
    }
}

fn split_txt(text: &str) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    let mut start = 0;
    let mut flush = |cur: &mut Vec<&str>, start: usize| {
        if !cur.is_empty() {
            let mut m = Map::new();
            m.insert("text".into(), Value::String(cur.join("\n")));
            out.push((start, m));
            cur.clear();
        }
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            flush(&mut cur, start);
        } else {
            if cur.is_empty() {
                start = i + 1;
            }
            cur.push(line);
        }
    }
    flush(&mut cur, start);
    out
}

pub(crate) fn detect(path: &Path, (line, obj): &Raw) -> Result<Format, DataError> {
    let has = |k: &str| obj.contains_key(k);
    let format = if has("messages") || has("conversations") {
        Format::Messages
    } else if has("instruction") || (has("output") && has("input")) {
        Format::Alpaca
    } else if has("prompt") && (has("completion") || has("response")) {
        Format::PromptCompletion
    } else if has("question") && has("answer") {
        Format::QuestionAnswer
    } else if has("text") {
        Format::Text
    } else {
        let keys = obj
            .keys()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DataError::UnknownFormat {
            file: path.to_path_buf(),
            line: *line,
            keys: if keys.is_empty() { "none".into() } else { keys },
            hint: "expected \"messages\"/\"conversations\", alpaca \"instruction\"/\"input\"/\"output\", \"prompt\" + \"completion\"/\"response\", \"question\" + \"answer\", or \"text\"".into(),
        });
    };
    Ok(format)
}

/// Outer `Err`: hard error. Inner `Err`: the record is dropped with this warning message.
pub(crate) type Converted = Result<Result<RecordKind, String>, DataError>;

fn record_err(origin: &Origin, message: String) -> DataError {
    DataError::Record {
        origin: origin.clone(),
        message,
    }
}

/// A string field: absent -> `None`; null -> empty; numbers/bools are stringified (CSV-like data);
/// arrays/objects are a type error.
fn opt_str(
    origin: &Origin,
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<String>, DataError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(String::new())),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(record_err(
            origin,
            format!(
                "field \"{key}\" must be a string, found {}",
                kind_name(other)
            ),
        )),
    }
}

fn req_str(
    origin: &Origin,
    obj: &Map<String, Value>,
    key: &str,
    format: &str,
) -> Result<String, DataError> {
    opt_str(origin, obj, key)?.ok_or_else(|| {
        record_err(
            origin,
            format!(
                "field \"{key}\" is missing; every {format} record needs \"{key}\" (the file's first record was detected as {format})"
            ),
        )
    })
}

fn empty_warning(key: &str, format: &str) -> String {
    format!(
        "field \"{key}\" is empty; every {format} record needs a non-empty \"{key}\" (record dropped)"
    )
}

pub(crate) fn convert(format: Format, origin: &Origin, obj: &Map<String, Value>) -> Converted {
    // KTO-style data marks each completion desirable or not; trained as SFT, the undesirable ones would be
    // learned as good answers.
    for key in ["label", "kto_tag"] {
        if obj.get(key) == Some(&Value::Bool(false)) {
            return Err(record_err(
                origin,
                format!(
                    "field \"{key}\" = false marks an undesirable completion (KTO-style data), which SFT would \
                     train as a good answer: train these records with --loss kto, or drop the records labelled false \
                     (and the \"{key}\" field) to train SFT on the others, or pair answers as \"chosen\" / \
                     \"rejected\" for --loss dpo"
                ),
            ));
        }
    }
    match format {
        Format::Messages => convert_messages(origin, obj),
        Format::Alpaca => convert_alpaca(origin, obj),
        Format::PromptCompletion => {
            let prompt = req_str(origin, obj, "prompt", "prompt/completion")?;
            let key = if obj.contains_key("completion") {
                "completion"
            } else {
                "response"
            };
            let answer = req_str(origin, obj, key, "prompt/completion")?;
            let system = opt_str(origin, obj, "system")?.unwrap_or_default();
            pair(system, prompt, "prompt", answer, key, "prompt/completion")
        }
        Format::QuestionAnswer => {
            let q = req_str(origin, obj, "question", "question/answer")?;
            let a = req_str(origin, obj, "answer", "question/answer")?;
            let system = opt_str(origin, obj, "system")?.unwrap_or_default();
            pair(system, q, "question", a, "answer", "question/answer")
        }
        Format::Text => {
            let text = req_str(origin, obj, "text", "text")?;
            if text.trim().is_empty() {
                return Ok(Err(empty_warning("text", "text")));
            }
            Ok(Ok(RecordKind::Text { text }))
        }
    }
}

fn pair(system: String, q: String, qk: &str, a: String, ak: &str, format: &str) -> Converted {
    if q.trim().is_empty() {
        return Ok(Err(empty_warning(qk, format)));
    }
    if a.trim().is_empty() {
        return Ok(Err(empty_warning(ak, format)));
    }
    let mut messages = Vec::new();
    if !system.trim().is_empty() {
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: q,
    });
    messages.push(Message {
        role: "assistant".into(),
        content: a,
    });
    Ok(Ok(RecordKind::Chat { messages }))
}

fn convert_alpaca(origin: &Origin, obj: &Map<String, Value>) -> Converted {
    const F: &str = "alpaca";
    let instruction = opt_str(origin, obj, "instruction")?.unwrap_or_default();
    let input = opt_str(origin, obj, "input")?.unwrap_or_default();
    let output = req_str(origin, obj, "output", F)?;
    let system = opt_str(origin, obj, "system")?.unwrap_or_default();
    if !obj.contains_key("instruction") && !obj.contains_key("input") {
        return Err(record_err(
            origin,
            "field \"instruction\" is missing; every alpaca record needs \"instruction\" (the file's first record was detected as alpaca)".into(),
        ));
    }
    let user = match (instruction.trim().is_empty(), input.trim().is_empty()) {
        (true, true) => return Ok(Err(empty_warning("instruction", F))),
        (false, true) => instruction,
        (true, false) => input,
        // LLaMA-Factory joins them with one newline; keep that so data behaves the same.
        (false, false) => format!("{instruction}\n{input}"),
    };
    if output.trim().is_empty() {
        return Ok(Err(empty_warning("output", F)));
    }
    let mut messages = Vec::new();
    if !system.trim().is_empty() {
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    match obj.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(turns)) => {
            for (i, t) in turns.iter().enumerate() {
                let pair = match t {
                    Value::Array(p) if p.len() == 2 => p,
                    _ => {
                        return Err(record_err(
                            origin,
                            format!(
                                "field \"history\"[{i}] must be a [user, assistant] pair of strings"
                            ),
                        ));
                    }
                };
                let (Some(u), Some(a)) = (pair[0].as_str(), pair[1].as_str()) else {
                    return Err(record_err(
                        origin,
                        format!(
                            "field \"history\"[{i}] must be a [user, assistant] pair of strings"
                        ),
                    ));
                };
                messages.push(Message::new("user", u));
                messages.push(Message::new("assistant", a));
            }
        }
        Some(other) => {
            return Err(record_err(
                origin,
                format!(
                    "field \"history\" must be a list of [user, assistant] pairs, found {}",
                    kind_name(other)
                ),
            ));
        }
    }
    messages.push(Message {
        role: "user".into(),
        content: user,
    });
    messages.push(Message {
        role: "assistant".into(),
        content: output,
    });
    Ok(Ok(RecordKind::Chat { messages }))
}

/// Maps the many spellings of a role to the four a chat template understands. `function_call`
/// (ShareGPT tool datasets) is the assistant emitting a call, so it is trained like an answer.
fn normalise_role(role: &str) -> Option<&'static str> {
    Some(match role.to_ascii_lowercase().as_str() {
        "user" | "human" => "user",
        "assistant" | "gpt" | "bot" | "model" | "function_call" => "assistant",
        "system" => "system",
        "tool" | "function" | "observation" | "ipython" => "tool",
        _ => return None,
    })
}

fn convert_messages(origin: &Origin, obj: &Map<String, Value>) -> Converted {
    let key = if obj.contains_key("messages") {
        "messages"
    } else {
        "conversations"
    };
    let list = match obj.get(key) {
        Some(Value::Array(l)) => l,
        Some(other) => {
            return Err(record_err(
                origin,
                format!(
                    "field \"{key}\" must be a list of messages, found {}",
                    kind_name(other)
                ),
            ));
        }
        None => {
            return Err(record_err(
                origin,
                "field \"messages\" is missing; every messages record needs \"messages\" or \"conversations\" (the file's first record was detected as messages)".into(),
            ));
        }
    };
    let mut messages = Vec::with_capacity(list.len() + 1);
    if let Some(system) = opt_str(origin, obj, "system")?
        && !system.trim().is_empty()
    {
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(record_err(
                origin,
                format!(
                    "field \"{key}\"[{i}] must be an object with a role and a content, found {}",
                    kind_name(m)
                ),
            ));
        };
        let role_key = if m.contains_key("role") {
            "role"
        } else {
            "from"
        };
        let Some(raw_role) = m.get(role_key).and_then(Value::as_str) else {
            return Err(record_err(
                origin,
                format!("field \"{key}\"[{i}] has no \"role\" (or \"from\") string"),
            ));
        };
        let Some(role) = normalise_role(raw_role) else {
            return Err(record_err(
                origin,
                format!(
                    "field \"{key}\"[{i}] has unknown role \"{raw_role}\"; use user|human, assistant|gpt|bot, system, or tool|function|observation"
                ),
            ));
        };
        // The layout's own name for the text, also when a turn lacks it: "content" beside "role" (messages),
        // "value" beside "from" (ShareGPT).
        let content_key =
            if m.contains_key("content") || (role_key == "role" && !m.contains_key("value")) {
                "content"
            } else {
                "value"
            };
        let content = match m.get(content_key) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => content_parts(origin, key, i, parts)?,
            Some(other) => {
                return Err(record_err(
                    origin,
                    format!(
                        "field \"{key}\"[{i}].{content_key} must be a string or a list of text parts, found {}",
                        kind_name(other)
                    ),
                ));
            }
        };
        if (role == "assistant" || role == "user") && content.trim().is_empty() {
            let what = if m.contains_key(content_key) {
                "is empty"
            } else {
                "is missing"
            };
            return Ok(Err(format!(
                "field \"{key}\"[{i}].{content_key} {what}; every {role} turn needs non-empty content (record dropped)"
            )));
        }
        // A system turn may only open a conversation; later ones are kept as they are (templates decide).
        messages.push(Message {
            role: role.into(),
            content,
        });
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Ok(Err(format!(
            "field \"{key}\" has no assistant turn, so there is nothing to train on (record dropped)"
        )));
    }
    Ok(Ok(RecordKind::Chat { messages }))
}

fn content_parts(
    origin: &Origin,
    key: &str,
    i: usize,
    parts: &[Value],
) -> Result<String, DataError> {
    let mut out = String::new();
    for (j, p) in parts.iter().enumerate() {
        let ty = p.get("type").and_then(Value::as_str).unwrap_or("text");
        let text = p
            .get("text")
            .or_else(|| p.get("value"))
            .and_then(Value::as_str);
        match (ty, text) {
            ("text", Some(t)) => out.push_str(t),
            _ => {
                return Err(record_err(
                    origin,
                    format!(
                        "field \"{key}\"[{i}].content[{j}] is a \"{ty}\" part; only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported — drop non-text parts"
                    ),
                ));
            }
        }
    }
    Ok(out)
}
