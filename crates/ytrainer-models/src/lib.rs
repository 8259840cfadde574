//! Llama / Mistral / Qwen2 / Qwen3 decoders for ytrainer, with a LoRA linear, Hugging Face checkpoint loading
//! and saving, and the PEFT adapter format.
//!
//! - [`load_pretrained`] / [`init_random`] build a [`Decoder`] (the [`ytrainer_core::model::CausalLm`] the trainer
//!   drives), set up for full fine-tuning or LoRA by an [`AdapterSpec`].
//! - [`save_hf_checkpoint`] / [`save_peft_adapter`] / [`load_peft_adapter`] move results in and out of the
//!   Python ecosystem.
//!
//! One file per concern:
//! - the network: `decoder.rs` (the shared decoder), `lora.rs`, `config.rs` (config.json);
//! - `arch/`: the `model_type` table (`mod.rs`), the switches it resolves to (`spec.rs`) and how each
//!   architecture differs (`llama.rs`, `qwen2.rs`, `qwen3.rs`);
//! - the trainer's contract: `causal_lm.rs` (`CausalLm` for the decoder), `recompute.rs` (gradient
//!   checkpointing);
//! - the CPU kernels it calls (attention, RMSNorm, SwiGLU, linear) and the RoPE / mask tables of the tensor path
//!   live in `ytrainer-kernels` (re-exported as `attention`, `fused`, `positions`);
//! - `formats/`: `st.rs` (streaming safetensors), `load.rs`, `save.rs` (HF + PEFT), `export.rs` (dtype, shards);
//! - `gguf/`: llama.cpp GGUF import; `generate.rs`: KV-cache generation.
//!
//! The modules moved into `arch/` and `formats/` stay reachable under their old paths (`ytrainer_models::llama`,
//! `ytrainer_models::st`, ...).

mod arch;
mod causal_lm;
pub mod config;
pub mod decoder;
mod error;
mod formats;
pub mod generate;
pub mod gguf;
pub mod lora;
mod recompute;
mod rng;

pub use arch::{llama, qwen2, qwen3};
// The CPU kernels the network calls live in `ytrainer-kernels`; these keep their old paths.
pub use formats::{export, load, save, st};
pub use ytrainer_kernels::{attention, fused, positions};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

pub use arch::{ArchSpec, Architecture};
pub use config::{HfConfig, RopeParameters, TokenIds};
pub use decoder::Decoder;
pub use error::ModelError;
pub use export::{ExportDtype, save_hf_checkpoint_as};
pub use gguf::{convert_gguf, is_gguf, load_gguf, load_gguf_frozen, load_gguf_with};
pub use load::{BaseWeights, init_random, init_random_with, load_pretrained, load_pretrained_with};
pub use lora::{AdapterSpec, DEFAULT_LORA_TARGETS, LoraConfig, LoraLinear};
pub use save::{load_peft_adapter, save_hf_checkpoint, save_peft_adapter};
pub use ytrainer_core::model::{CausalLm, ModelInput};

/// The `model_type` values of `config.json` this crate implements.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// Number of scalars in all float parameters (a tied embedding counted once).
pub fn total_param_count<M: Module>(model: &M) -> usize {
    model.num_params()
}

/// Number of scalars in parameters that require gradients (what the optimizer updates). Meaningful on an
/// autodiff device only: on a plain device no tensor requires gradients and this returns 0.
pub fn trainable_param_count<M: Module>(model: &M) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.val().is_require_grad() {
                self.0 += param.lazy_shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// `(module path, shape, requires grad)` of every float parameter, in visiting order; paths look like
/// `layers.0.self_attn.q_proj.lora_a` (the HF name without `model.` for base weights).
pub fn named_params<M: Module>(model: &M) -> Vec<(String, Vec<usize>, bool)> {
    struct Names {
        path: Vec<String>,
        out: Vec<(String, Vec<usize>, bool)>,
    }
    impl ModuleVisitor for Names {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push((
                self.path.join("."),
                param.lazy_shape().to_vec(),
                param.val().is_require_grad(),
            ));
        }
    }
    let mut names = Names {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut names);
    names.out
}
