//! `ytrainer run`'s flags as config overrides: each flag names the config key it sets, and the recipe applies
//! them to the TOML document before it is deserialised ([`ytrainer_recipes::config`]), so a flag and its key go
//! through exactly the same validation.

use anyhow::{Result, anyhow};
use toml::Value;
use ytrainer_core::config::RunConfig;
use ytrainer_recipes::config::{Override, parse_value, path_value};

use crate::cli::RunArgs;

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
