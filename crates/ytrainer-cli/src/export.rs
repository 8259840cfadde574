//! `ytrainer export`: a base model plus an optional PEFT LoRA adapter as a llama.cpp GGUF file (f32, f16, q8_0,
//! q4_0; LoRA merged), and / or the adapter alone as a llama.cpp LoRA GGUF.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use clap::Args;
use ytrainer_models::gguf::{GgufType, TokenizerSource, export_gguf, export_lora_gguf};
use ytrainer_models::is_gguf;
use ytrainer_recipes::source::{inference_device, load_for_inference_as};

/// `ytrainer export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Base model: Hugging Face directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory, merged into the exported model (and written by --lora-gguf).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The merged model as a GGUF file, for llama.cpp / ollama.
    #[arg(long, value_name = "FILE.gguf")]
    pub to: Option<PathBuf>,
    /// Tensor type of --to: f32, f16, q8_0 or q4_0 (norms and biases stay f32).
    #[arg(long = "type", default_value = "q8_0")]
    pub ty: String,
    /// The adapter alone as a llama.cpp LoRA GGUF (`llama-cli --lora FILE`).
    #[arg(long, value_name = "FILE.gguf")]
    pub lora_gguf: Option<PathBuf>,
}

/// `ytrainer export`
pub fn export(a: ExportArgs) -> Result<()> {
    let ty = GgufType::parse(&a.ty)
        .ok_or_else(|| anyhow!("--type `{}`: expected f32, f16, q8_0 or q4_0", a.ty))?;
    if a.to.is_none() && a.lora_gguf.is_none() {
        bail!(
            "nothing to write: give --to FILE.gguf (the merged model) and/or --lora-gguf FILE.gguf (the adapter)"
        );
    }
    if a.lora_gguf.is_some() && a.adapter.is_none() {
        bail!("--lora-gguf writes an adapter: give it with --adapter DIR (a PEFT LoRA directory)");
    }
    for out in a.to.iter().chain(&a.lora_gguf) {
        if out.canonicalize().ok().is_some()
            && out.canonicalize().ok() == a.model.canonicalize().ok()
        {
            bail!(
                "{}: the output must differ from --model (refusing to overwrite the base model)",
                out.display()
            );
        }
    }
    let device = inference_device("cpu")?;
    // The export re-quantises from f32 (and merges the adapter into it).
    let l = load_for_inference_as(
        &a.model,
        a.adapter.as_deref(),
        &device,
        ytrainer_models::BaseWeights::F32,
    )?;
    if let Some(out) = &a.lora_gguf {
        let e = export_lora_gguf(&l.model, out)?;
        println!(
            "wrote {} (LoRA adapter, {} tensors, {} bytes)",
            e.path.display(),
            e.tensors,
            e.bytes
        );
    }
    if let Some(out) = &a.to {
        let tok = if is_gguf(&a.model) {
            TokenizerSource::Gguf(&a.model)
        } else {
            TokenizerSource::HfDir(&a.model)
        };
        let e = export_gguf(&l.model, &tok, out, ty)?;
        println!(
            "wrote {} ({}, {} tensors, {} bytes)",
            e.path.display(),
            a.ty.to_ascii_lowercase(),
            e.tensors,
            e.bytes
        );
    }
    Ok(())
}
