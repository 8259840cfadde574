//! `ytrainer merge`: a base model plus a PEFT LoRA adapter as one full Hugging Face checkpoint (f32, bf16 or
//! f16; sharded with an index above `--max-shard-size`), with the tokenizer files copied alongside.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ytrainer_models::{ExportDtype, is_gguf, save_hf_checkpoint_as};

use ytrainer_recipes::source::{inference_device, load_for_inference};

/// `ytrainer merge`
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: Hugging Face directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory (omit to re-export the base, e.g. to change dtype or convert a GGUF).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Largest shard, e.g. `5GB`, `500MB` (decimal units, as transformers); larger checkpoints are sharded.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace a non-empty --out directory completely (without it such a directory is refused).
    #[arg(long)]
    pub overwrite: bool,
}

pub use ytrainer_recipes::memory::parse_size;

/// `ytrainer merge`
pub fn merge(a: MergeArgs) -> Result<()> {
    let dtype = ExportDtype::parse(&a.dtype)
        .ok_or_else(|| anyhow!("--dtype `{}`: expected f32, bf16 or f16", a.dtype))?;
    let max = parse_size(&a.max_shard_size).ok_or_else(|| {
        anyhow!(
            "--max-shard-size `{}`: expected a size such as 5GB or 500MB",
            a.max_shard_size
        )
    })?;
    if a.out.exists() && a.out.canonicalize().ok() == a.model.canonicalize().ok() {
        bail!("--out must differ from --model (refusing to overwrite the base model)");
    }
    ytrainer_recipes::outdir::check_replaceable(&a.out, a.overwrite, "--out")?;
    let device = inference_device("cpu")?;
    let l = load_for_inference(&a.model, a.adapter.as_deref(), &device)?;
    // Written beside --out and moved into place whole, so no file of an earlier checkpoint survives (a stale
    // `model.safetensors` next to new shards would be loaded instead of them).
    let target = a.out.clone();
    let tmp = ytrainer_recipes::outdir::staging_dir(&target)?;
    let a = MergeArgs {
        out: tmp.clone(),
        ..a
    };
    let mut files = save_hf_checkpoint_as(&l.model, &l.config, &a.out, dtype, max)?;
    // Tokenizer files: rebuilt from the GGUF metadata (as `convert` writes them), or copied from the directory.
    if is_gguf(&a.model) {
        let report = ytrainer_models::gguf::write_gguf_tokenizer_files(&a.model, &a.out)?;
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        files.extend(report.files);
    } else {
        for n in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
            "special_tokens_map.json",
        ] {
            let src = a.model.join(n);
            if src.is_file() {
                let dst = a.out.join(n);
                std::fs::copy(&src, &dst)
                    .with_context(|| format!("cannot copy {}", src.display()))?;
                files.push(dst);
            }
        }
    }
    ytrainer_recipes::outdir::commit_dir(&tmp, &target)?;
    println!("wrote {} ({}):", target.display(), dtype.torch_name());
    for f in ytrainer_recipes::outdir::rebase_files(files, &tmp, &target) {
        println!("  {}", f.display());
    }
    Ok(())
}
