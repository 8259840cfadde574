//! Flag parsing shared by the inference commands (`score`, `sort`, `render`, `generate`, `chat`); loading a model
//! for them lives in `ytrainer_recipes::source`.

use anyhow::{Result, anyhow, bail};

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
