//! `ytrainer run`'s flags as config overrides: each flag names the config key it sets, and the recipe applies
//! them to the TOML document before it is deserialised ([`ytrainer_recipes::config`]), so a flag and its key go
//! through exactly the same validation.

use anyhow::{Result, anyhow};
use toml::Value;
use ytrainer_core::config::RunConfig;
use ytrainer_recipes::config::{Override, parse_value, path_value};

use crate::cli::RunArgs;

/// `--columns instruction=prompt_text,output=target` as the `[data] columns` table.
fn columns(spec: &str) -> Result<toml::Table> {
    let mut t = toml::Table::new();
    for kv in spec.split(',').filter(|s| !s.trim().is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            anyhow!(
                "`--columns {spec}`: `{kv}` is not FIELD=COLUMN; e.g. `--columns instruction=prompt_text,output=target`"
            )
        })?;
        t.insert(k.trim().to_string(), Value::String(v.trim().to_string()));
    }
    Ok(t)
}

/// `--source FILE[,weight=W][,max_samples=N]` as one `[[data.sources]]` table.
fn source(spec: &str) -> Result<toml::Table> {
    let mut parts = spec.split(',');
    let file = parts.next().unwrap_or_default().trim();
    if file.is_empty() {
        return Err(anyhow!(
            "`--source {spec}`: no file; expected FILE[,weight=W][,max_samples=N]"
        ));
    }
    let mut t = toml::Table::new();
    t.insert("path".into(), path_value(std::path::Path::new(file)));
    for kv in parts {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let (k, v) = (k.trim(), v.trim());
        let value = match k {
            "weight" => v.parse::<f64>().ok().map(Value::Float),
            "max_samples" => v.parse::<i64>().ok().map(Value::Integer),
            _ => {
                return Err(anyhow!(
                    "`--source {spec}`: unknown setting `{k}`; expected FILE[,weight=W][,max_samples=N]"
                ));
            }
        };
        let value =
            value.ok_or_else(|| anyhow!("`--source {spec}`: {k} = `{v}` is not a number"))?;
        t.insert(k.to_string(), value);
    }
    Ok(t)
}

/// The overrides `args` ask for, in the order they apply (`--set` last).
pub fn overrides(args: &RunArgs) -> Result<Vec<Override>> {
    let mut o = Vec::new();
    let mut set = |key: &str, v: Value| o.push(Override::new(key, v));
    if let Some(v) = &args.model {
        set("model.path", path_value(v));
    }
    if let Some(v) = &args.preset {
        set("model.preset", Value::String(v.clone()));
    }
    if let Some(v) = &args.data {
        set("data.train", path_value(v));
    }
    if let Some(v) = &args.eval_data {
        set("data.eval", path_value(v));
    }
    if let Some(v) = &args.columns {
        set("data.columns", Value::Table(columns(v)?));
    }
    if let Some(n) = args.max_samples {
        set("data.max_samples", Value::Integer(n as i64));
    }
    if !args.sources.is_empty() {
        let list = args
            .sources
            .iter()
            .map(|s| source(s).map(Value::Table))
            .collect::<Result<Vec<_>>>()?;
        set("data.sources", Value::Array(list));
    }
    if let Some(v) = &args.loss {
        set("loss.name", Value::String(v.clone()));
    }
    for kv in &args.loss_params {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("`--loss-param {kv}`: expected NAME=VALUE, e.g. `x0=1.0`"))?;
        let x: f64 = v.trim().parse().map_err(|_| {
            anyhow!("`--loss-param {kv}`: `{v}` is not a number; loss parameters are numeric")
        })?;
        set(&format!("loss.params.{}", k.trim()), Value::Float(x));
    }
    if let Some(v) = &args.normalize {
        set("loss.normalize", Value::String(v.clone()));
    }
    if let Some(v) = &args.output_dir {
        set("output.dir", path_value(v));
    }
    if let Some(v) = args.max_steps {
        set("train.max_steps", Value::Integer(v as i64));
    }
    if let Some(v) = args.epochs {
        set("train.epochs", Value::Integer(v as i64));
    }
    if let Some(v) = args.learning_rate {
        set("train.learning_rate", Value::Float(v));
    }
    if let Some(v) = &args.device {
        set("train.device", Value::String(v.clone()));
    }
    if let Some(v) = args.seed {
        set("train.seed", Value::Integer(v as i64));
    }
    if let Some(v) = &args.precision {
        set("train.precision", Value::String(v.clone()));
    }
    if args.gradient_checkpointing {
        set("train.gradient_checkpointing", Value::Boolean(true));
    }
    if let Some(v) = &args.memory_budget {
        set("train.memory_budget", Value::String(v.clone()));
    }
    if let Some(v) = args.tokens_per_step {
        set("train.tokens_per_step", Value::Integer(v as i64));
    }
    if let Some(v) = args.batch_size {
        set("train.batch_size", Value::Integer(v as i64));
    }
    if let Some(v) = args.grad_accum {
        set("train.grad_accum", Value::Integer(v as i64));
    }
    if let Some(v) = &args.mode {
        set("train.mode", Value::String(v.clone()));
    }
    if let Some(v) = args.token_batch {
        set("train.token_batch", Value::Integer(v as i64));
    }
    if let Some(v) = &args.adapter {
        set("adapter.type", Value::String(v.clone()));
    }
    if let Some(v) = args.lora_r {
        set("adapter.r", Value::Integer(v as i64));
    }
    if args.dequantize_base {
        set("model.dequantize_base", Value::Boolean(true));
    }
    if let Some(v) = &args.quantize_base {
        set("model.quantize_base", Value::String(v.clone()));
    }
    if let Some(v) = &args.base_model_id {
        set("model.base_model_id", Value::String(v.clone()));
    }
    if let Some(v) = args.lora_alpha {
        set("adapter.alpha", Value::Float(v));
    }
    if let Some(v) = args.max_seq_len {
        set("data.max_seq_len", Value::Integer(v as i64));
    }
    if let Some(v) = &args.train_on {
        set("data.train_on", Value::String(v.clone()));
    }
    if let Some(v) = args.eval_every {
        set("eval.every_steps", Value::Integer(v as i64));
    }
    if let Some(v) = args.save_every {
        set("output.save_every_steps", Value::Integer(v as i64));
    }
    for kv in &args.set {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            anyhow!("`--set {kv}`: expected SECTION.KEY=VALUE, e.g. `train.weight_decay=0.01`")
        })?;
        set(k.trim(), parse_value(v.trim()));
    }
    Ok(o)
}

/// Loads the config file (if any), applies the flags, validates, and returns the resolved config.
pub fn resolve(args: &RunArgs) -> Result<RunConfig> {
    Ok(ytrainer_recipes::config::resolve(
        args.config.as_deref(),
        &overrides(args)?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_overrides_with_set_last() {
        let a = RunArgs {
            learning_rate: Some(5e-4),
            loss: Some("ce".into()),
            loss_params: vec!["x0=1.5".into()],
            set: vec!["train.learning_rate=1e-3".into()],
            ..Default::default()
        };
        let o = overrides(&a).unwrap();
        assert_eq!(
            o,
            vec![
                Override::new("loss.name", Value::String("ce".into())),
                Override::new("loss.params.x0", Value::Float(1.5)),
                Override::new("train.learning_rate", Value::Float(5e-4)),
                Override::new("train.learning_rate", Value::Float(1e-3)),
            ]
        );
    }

    #[test]
    fn flags_override_config() {
        let a = RunArgs {
            model: Some("m".into()),
            data: Some("d.jsonl".into()),
            learning_rate: Some(5e-4),
            set: vec!["data.train_on=everything".into()],
            ..Default::default()
        };
        let c = resolve(&a).unwrap();
        assert_eq!(c.train.learning_rate, 5e-4);
        assert_eq!(c.data.train_on, ytrainer_core::config::TrainOn::Everything);
    }

    #[test]
    fn mixing_and_column_flags_become_data_keys() {
        let a = RunArgs {
            model: Some("m".into()),
            data: Some("d.jsonl".into()),
            columns: Some("instruction=q, output=a".into()),
            max_samples: Some(100),
            sources: vec!["x.csv,weight=0.5".into(), "y.json,max_samples=7".into()],
            ..Default::default()
        };
        let c = resolve(&a).unwrap();
        assert_eq!(
            c.data.columns.iter().collect::<Vec<_>>(),
            [
                (&"instruction".to_string(), &"q".to_string()),
                (&"output".to_string(), &"a".to_string())
            ]
        );
        assert_eq!(c.data.max_samples, 100);
        assert_eq!(c.data.sources.len(), 2);
        assert_eq!(
            (
                c.data.sources[0].path.to_str(),
                c.data.sources[0].weight,
                c.data.sources[0].max_samples
            ),
            (Some("x.csv"), 0.5, 0)
        );
        assert_eq!(
            (c.data.sources[1].weight, c.data.sources[1].max_samples),
            (1.0, 7)
        );
        let bad = RunArgs {
            sources: vec!["x.csv,weigth=2".into()],
            ..Default::default()
        };
        assert_eq!(
            overrides(&bad).unwrap_err().to_string(),
            "`--source x.csv,weigth=2`: unknown setting `weigth`; expected FILE[,weight=W][,max_samples=N]"
        );
    }

    #[test]
    fn malformed_loss_param_is_named() {
        let a = RunArgs {
            loss_params: vec!["x0".into()],
            ..Default::default()
        };
        assert_eq!(
            overrides(&a).unwrap_err().to_string(),
            "`--loss-param x0`: expected NAME=VALUE, e.g. `x0=1.0`"
        );
    }
}
