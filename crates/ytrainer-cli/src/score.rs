//! `ytrainer score`: flags in, [`ytrainer_recipes::score::Scorer`] (per-token loss, entropy, rank and
//! probability of every supervised token), one JSON line per sample and a summary out.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ytrainer_recipes::score::{ScoreInput, ScoreSettings, Scorer, StrategyWeights};

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
    /// Also give every token the weight this token strategy would give it in training (`weight` per token and
    /// the mean in the summary), e.g. to compare a strategy's weight on two data files.
    #[arg(long, value_name = "STRATEGY")]
    pub loss: Option<String>,
    /// Parameter of the `--loss` strategy, repeatable: `--loss-param x0=1.0`.
    #[arg(long = "loss-param", value_name = "NAME=VALUE", requires = "loss")]
    pub loss_params: Vec<String>,
    /// For an external `--loss` strategy.
    #[command(flatten)]
    pub plugins: crate::cli::PluginDirArgs,
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
    let mut settings = ScoreSettings {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        input,
        top_k: a.top_k,
        device: a.device.clone(),
    };
    let weights = match &a.loss {
        Some(name) => {
            let params = crate::curve_cmd::parse_params(&a.loss_params)?;
            let registry = crate::plugins_cmd::registry(&[])?;
            let (w, top_k) = StrategyWeights::load(&registry, name, &params, &settings)?;
            settings.top_k = settings.top_k.max(top_k);
            Some(w)
        }
        None => None,
    };
    let scorer = Scorer::load(&settings)?;
    // Opened only once the inputs are known to be good, so a mistake does not truncate an earlier output.
    let mut out: Box<dyn Write> = if a.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.out)
                .with_context(|| format!("cannot create {}", a.out.display()))?,
        ))
    };
    let summary = scorer.score_all_with(
        &mut |s| {
            if let Some(w) = &weights {
                w.weigh(s)?;
            }
            // The top-k the strategy needed, not asked for: not written.
            if a.top_k == 0 {
                for t in &mut s.tokens {
                    t.top = None;
                }
            }
            Ok(())
        },
        &mut |s| Ok(writeln!(out, "{}", s.to_json())?),
    )?;
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
    if let (Some(name), Some(w)) = (&a.loss, summary.mean_weight()) {
        eprintln!(
            "{name}: mean token weight {w:.5} over {} tokens",
            summary.weighed
        );
    }
    Ok(())
}
