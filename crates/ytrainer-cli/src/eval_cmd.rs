//! `ytrainer eval`: flags in, [`ytrainer_recipes::eval::Evaluator`] (per data set loss, perplexity, accuracy),
//! a table or JSON out.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ytrainer_recipes::eval::{EvalSettings, Evaluator};
use ytrainer_sweep::DatasetEval;

use crate::cli::{EvalArgs, Format};

/// The table `ytrainer eval` prints.
pub fn table(evals: &[DatasetEval]) -> String {
    let mut s = format!(
        "{:<40} {:>11} {:>9} {:>11} {:>9} {:>9} {:>12}\n",
        "data", "kind", "loss", "perplexity", "accuracy", "tokens", "supervised"
    );
    for e in evals {
        let name = Path::new(&e.data)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| e.data.clone());
        s.push_str(&format!(
            "{:<40} {:>11} {:>9.4} {:>11.3} {:>9.4} {:>9} {:>12}\n",
            name,
            e.kind,
            e.loss,
            e.perplexity,
            e.token_accuracy,
            e.tokens,
            e.supervised_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    s
}

/// `ytrainer eval`
pub fn eval(a: EvalArgs) -> Result<()> {
    if a.data.is_empty() {
        bail!("give at least one data file with --data");
    }
    if a.window < 2 {
        bail!("--window must be at least 2");
    }
    let ev = Evaluator::load(
        &a.model,
        a.adapter.as_deref(),
        EvalSettings {
            window: a.window,
            max_samples: a.max_samples,
            device: a.device.clone(),
        },
    )?;
    let evals = ev.evaluate_files(&a.data)?;
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "model": a.model, "adapter": a.adapter, "window": a.window, "datasets": evals,
    }))?;
    if let Some(out) = &a.output {
        std::fs::write(out, &json).with_context(|| format!("cannot write {}", out.display()))?;
    }
    match a.format {
        Format::Json => println!("{json}"),
        Format::Text => print!("{}", table(&evals)),
    }
    Ok(())
}
