//! Flag parsing shared by the inference commands (`score`, `sort`, `render`, `generate`, `chat`); the work
//! behind them lives in `ytrainer_recipes` (`source`, `score`, `render`, `generate`).

use anyhow::{Result, anyhow, bail};
use ytrainer_data::TrainOn;

/// Parses `NAME=VALUE` template variables: the value as JSON when it parses, else as a string.
pub fn parse_vars(vars: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    for v in vars {
        let (k, val) = v.split_once('=').ok_or_else(|| {
            anyhow!("--var `{v}`: expected NAME=VALUE, e.g. enable_thinking=false")
        })?;
        let k = k.trim();
        if k.is_empty() {
            bail!("--var `{v}`: the name is empty");
        }
        let parsed = serde_json::from_str(val)
            .unwrap_or_else(|_| serde_json::Value::String(val.to_string()));
        out.insert(k.to_string(), parsed);
    }
    Ok(out)
}

/// Parses `--train-on`.
pub fn parse_train_on(s: &str) -> Result<TrainOn> {
    Ok(match s {
        "all_assistant" => TrainOn::AllAssistant,
        "last_assistant" => TrainOn::LastAssistant,
        "everything" => TrainOn::Everything,
        other => {
            bail!("--train-on `{other}`: expected all_assistant, last_assistant or everything")
        }
    })
}
