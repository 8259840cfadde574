//! Slow end-to-end runs (separate test target, still run by CI): training lowers eval loss, kill + resume is
//! exact, windowed mode trains every token once, LoRA on a real Hugging Face checkpoint exports a PEFT adapter.

mod common;
use common::*;
