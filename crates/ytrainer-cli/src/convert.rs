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
    /// Replace a non-empty --to directory completely (without it such a directory is refused).
    #[arg(long)]
    pub overwrite: bool,
}

/// `ytrainer convert`
pub fn convert(a: ConvertArgs) -> Result<()> {
    if !a.from.is_file() {
        bail!(
            "--from {}: no such file; pass a llama.cpp .gguf file",
            a.from.display()
        );
    }
    ytrainer_recipes::outdir::check_replaceable(&a.to, a.overwrite, "--to")?;
    let start = Instant::now();
    // Written beside --to and moved into place whole: no file of an earlier checkpoint survives.
    let tmp = ytrainer_recipes::outdir::staging_dir(&a.to)?;
    let mut report = match ytrainer_models::convert_gguf(&a.from, &tmp) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
    };
    ytrainer_recipes::outdir::commit_dir(&tmp, &a.to)?;
    report.files = ytrainer_recipes::outdir::rebase_files(report.files, &tmp, &a.to);
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
