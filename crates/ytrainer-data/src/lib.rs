//! Data for ytrainer: record formats, chat templates, tokenization with exact supervision masks,
//! batching (length-bucketed, token-budget accumulation, windowed updates) and a tiny BPE trainer.
//!
//! The path: [`formats::load_records`] -> [`batch::prepare`] (uses [`template::ChatTemplate`] and
//! [`tokenize::TokenizerWrapper`]) -> [`batch::plan_epoch`].

pub mod batch;
pub mod bpe;
pub mod error;
pub mod formats;
pub mod kto;
pub mod packing;
pub mod pairs;
pub mod quality;
pub mod stream;
pub mod template;
pub mod tokenize;
pub mod weights;

pub use batch::{
    BatchOptions, DataOptions, DataStats, MicroBatch, Mode, Overlong, Prepared, Step,
    pack_documents, plan_epoch, prepare,
};
pub use bpe::{CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE, train_byte_level_bpe};
pub use error::DataError;
pub use formats::{
    ColumnMap, Container, DataWarning, Format, LoadedRecords, Message, Origin, RECORD_FIELDS,
    Record, RecordKind, load_records, load_records_with, parse_records, parse_records_with,
};
pub use kto::load_kto;
pub use packing::pack_examples;
pub use pairs::{LoadedPairs, PairExample, PairRecord, load_pairs, tokenize_pair};
pub use template::ChatTemplate;
pub use tokenize::{
    Example, RenderedChat, TokenizerWrapper, TrainOn, render_chat_spans, tokenize_chat,
    tokenize_chat_limited, tokenize_chat_weighted, tokenize_text,
};
pub use weights::{RecordWeights, Weights, read_weights};
