//! Files in and out of the Python ecosystem, apart from the network they fill or read: streaming safetensors
//! (`st.rs`), building a [`Decoder`](crate::Decoder) from an HF checkpoint or a seeded init (`load.rs`), HF
//! checkpoints and PEFT adapters out and PEFT adapters back in (`save.rs`), and HF checkpoints in a chosen dtype,
//! sharded (`export.rs`). GGUF import is its own module (`gguf/`), which builds through `load.rs`.

pub mod export;
pub mod load;
pub mod save;
pub mod st;
