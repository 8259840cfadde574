//! `ytrainer score`: flags in, [`ytrainer_recipes::score::Scorer`] (per-token loss, entropy, rank and
//! probability of every supervised token), one JSON line per sample and a summary out.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ytrainer_recipes::score::{ScoreInput, ScoreSettings, Scorer};

use crate::interop::{parse_train_on, parse_vars};

/// `ytrainer score`
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Hugging Face model directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Data file (json, jsonl, csv, txt), prepared exactly as `run` prepares it.
    #[arg(
        long,
        conflicts_with = "ids_json",
        required_unless_present = "ids_json"
    )]
    pub data: Option<PathBuf>,
    /// JSON list of token-id lists; every position after the first of each list is a target.
    #[arg(long)]
    pub ids_json: Option<PathBuf>,
    /// Output file, one JSON object per sample (`-` for stdout).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
    /// What is supervised in chat data: all_assistant, last_assistant, everything.
    #[arg(long, default_value = "all_assistant")]
    pub train_on: String,
    /// Longest sample in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 4096)]
    pub max_seq_len: usize,
    /// Also list the K most likely tokens at each position (`top`: [[id, logprob], ...]).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Template variable, repeatable: `--var enable_thinking=false`.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `ytrainer score`
pub fn score(a: ScoreArgs) -> Result<()> {
    let input = match (&a.ids_json, &a.data) {
        (Some(p), _) => ScoreInput::Ids(p.clone()),
        (None, Some(data)) => ScoreInput::Data {
            path: data.clone(),
            train_on: parse_train_on(&a.train_on)?,
            max_seq_len: a.max_seq_len,
            template_vars: parse_vars(&a.vars)?,
        },
        (None, None) => unreachable!("clap requires --data or --ids-json"),
    };
    let scorer = Scorer::load(&ScoreSettings {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        input,
        top_k: a.top_k,
        device: a.device.clone(),
    })?;
    // Opened only once the inputs are known to be good, so a mistake does not truncate an earlier output.
    let mut out: Box<dyn Write> = if a.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.out)
                .with_context(|| format!("cannot create {}", a.out.display()))?,
        ))
    };
    let summary = scorer.score_all(&mut |s| Ok(writeln!(out, "{}", s.to_json())?))?;
    out.flush()?;
    if let Some(mean) = summary.mean_loss() {
        eprintln!(
            "scored {} samples, {} tokens: mean loss {:.5}, perplexity {:.3}",
            summary.samples,
            summary.tokens,
            mean,
            mean.exp()
        );
    }
    Ok(())
}
