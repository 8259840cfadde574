//! `ytrainer convert --from model.gguf --to DIR`: a GGUF file as a Hugging Face checkpoint directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;

/// `ytrainer convert`
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The llama.cpp `.gguf` file.
    #[arg(long)]
    pub from: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...).
    #[arg(long)]
    pub to: PathBuf,
}

/// `ytrainer convert`
pub fn convert(a: ConvertArgs) -> Result<()> {
    if !a.from.is_file() {
        bail!(
            "--from {}: no such file; pass a llama.cpp .gguf file",
            a.from.display()
        );
    }
    let start = Instant::now();
    let report = ytrainer_models::convert_gguf(&a.from, &a.to)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "converted {} to {} in {:.2}s:",
        a.from.display(),
        a.to.display(),
        start.elapsed().as_secs_f64()
    );
    for f in &report.files {
        println!("  {}", f.display());
    }
    Ok(())
}
