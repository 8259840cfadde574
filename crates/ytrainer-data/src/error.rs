//! One error type for everything that can go wrong between a data file and a batch.
//!
//! Messages are meant to be read by the person who owns the data file: they name the place
//! (`file:line`), the field, and what to do about it.

use std::path::PathBuf;

/// Every failure of this crate. User input never panics; it ends up here.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read at all.
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid UTF-8; `line` is where the first bad byte sits.
    #[error(
        "{}:{line}: the file is not valid UTF-8 (first bad byte at byte offset {offset}); re-encode it as UTF-8",
        file.display()
    )]
    NotUtf8 {
        file: PathBuf,
        line: usize,
        offset: usize,
    },
    /// A JSON value could not be parsed.
    #[error("{}:{line}: malformed JSON: {message}; {hint}", file.display())]
    Json {
        file: PathBuf,
        line: usize,
        message: String,
        hint: String,
    },
    /// A CSV file could not be parsed.
    #[error(
        "{}:{line}: malformed CSV: {message}; the file must be CSV with a header row naming the fields and the \
         same number of fields on every row (quote fields that hold commas)",
        file.display()
    )]
    Csv {
        file: PathBuf,
        line: usize,
        message: String,
    },
    /// The first record matches none of the known layouts.
    #[error("{}:{line}: unknown record format (keys: {keys}); {hint}", file.display())]
    UnknownFormat {
        file: PathBuf,
        line: usize,
        keys: String,
        hint: String,
    },
    /// The file holds no usable records.
    #[error("{}: {message}", file.display())]
    EmptyDataset { file: PathBuf, message: String },
    /// A record is structurally wrong (missing field, wrong type, unknown role...).
    #[error("{origin}: {message}")]
    Record { origin: Origin, message: String },
    /// A chat template failed to load, compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer failed to load or to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering a conversation's prefix did not give a prefix of the whole rendering, so the
    /// prompt/answer border cannot be located exactly.
    #[error(
        "{origin}: the chat template renders turn {turn} differently once later turns follow (rendered prompt is not a prefix of the rendered conversation); this template rewrites earlier turns (e.g. it drops reasoning) — use train_on = \"last_assistant\" or a training variant of the template"
    )]
    PrefixMismatch { origin: String, turn: usize },
    /// A configuration value is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

/// Where a record came from, so every message about it can point at the file. It lives with the errors that
/// carry it; `formats` re-exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The data file.
    pub file: PathBuf,
    /// 1-based line where the record starts.
    pub line: usize,
    /// 0-based position of the record in the file, counting dropped records too.
    pub index: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}
