//! Importing llama.cpp GGUF files (v2 / v3): metadata, tensors (dequantised to f32 one at a time), the
//! equivalent Hugging Face `config.json`, a `tokenizer.json` rebuilt from the tokenizer metadata, and the chat
//! template.
//!
//! - [`GgufFile::open`] parses the header and tensor directory and checks that every tensor's bytes are in the
//!   file (a truncated download fails here, naming the first tensor that is cut off).
//! - [`load_gguf`] builds a [`Decoder`](crate::Decoder) straight from the file; [`convert_gguf`] writes an
//!   HF-layout directory.
//! - Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K. Anything else is an
//!   error naming the tensor and the type.
//! - llama.cpp's converter permutes the rows of `attn_q` / `attn_k` for the `llama` architecture (interleaved
//!   RoPE); we undo it so the weights match the HF rotate-half convention. Qwen2 / Qwen3 are stored unpermuted.
//!
//! One file per concern: `file.rs` (the container), `dequant.rs` (block formats), `convert.rs` (HF names,
//! config and conversion), `tokenizer.rs` (the tokenizer rebuild). The public names are re-exported here.

mod convert;
mod dequant;
mod export;
mod file;
mod tokenizer;

pub(crate) use convert::expected_tensors;
pub use convert::{
    ConvertReport, convert_gguf, convert_gguf_with, gguf_name, hf_config, hf_name, load_gguf,
    load_gguf_frozen, load_gguf_with, unpermute_order, unpermute_rows, write_gguf_tokenizer_files,
};
pub use dequant::{GgmlType, dequantize};
pub use export::{GgufExport, GgufType, TokenizerSource, export_gguf, export_lora_gguf};
pub use file::{GgufFile, GgufTensor, GgufValue, is_gguf};
pub use tokenizer::{GgufTokenizer, gguf_tokenizer};
