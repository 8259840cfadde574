//! A plugin's weight as a function of the token loss (what `ytrainer curve` draws), with its parameters from
//! the page's sliders. All points go to the plugin as one batch, as the trainer hands it a micro-batch.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use ytrainer_core::loss::{LossFn, Registry, TokenStats, tensor_from_slice, tensor_to_vec};

use crate::tokens::parse_params;
use crate::{BoardError, Result};

/// Every plugin with its kind, description and parameters (name, default, help).
pub fn plugins(registry: &Registry) -> Value {
    Value::Array(
        registry
            .plugins()
            .map(|(p, _)| {
                json!({
                    "name": p.name,
                    "kind": p.kind,
                    "description": p.description,
                    "formula": p.formula,
                    "params": p.params.iter().map(|s| json!({"name": s.name, "default": s.default, "help": s.help})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn number(q: &BTreeMap<String, String>, k: &str, default: f64) -> Result<f64> {
    match q.get(k).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| BoardError::bad(format!("`{k}={v}`: not a finite number"))),
    }
}

/// `/api/curve?plugin=..&params=..&from=0&to=20&points=201&vs=loss|entropy&entropy=1&loss=2&reference_loss=0`
/// (the defaults of `ytrainer curve`).
pub fn curve(registry: &Registry, q: &BTreeMap<String, String>) -> Result<Value> {
    let name = q
        .get("plugin")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| BoardError::bad("/api/curve: the `plugin` parameter is missing"))?;
    let params = parse_params(q.get("params").map(String::as_str).unwrap_or(""))?;
    let (from, to) = (number(q, "from", 0.0)?, number(q, "to", 20.0)?);
    let points = number(q, "points", 201.0)?;
    if from >= to || !(2.0..=10_000.0).contains(&points) {
        return Err(BoardError::bad(format!(
            "need from < to and 2 <= points <= 10000 (got from={from}, to={to}, points={points})"
        )));
    }
    let (entropy, reference) = (
        number(q, "entropy", 1.0)?,
        number(q, "reference_loss", 0.0)?,
    );
    let loss_at = number(q, "loss", 2.0)?;
    let vs_entropy = match q.get("vs").map(String::as_str) {
        None | Some("") | Some("loss") => false,
        Some("entropy") => true,
        Some(v) => {
            return Err(BoardError::bad(format!(
                "`vs={v}`: the x axis is `loss` or `entropy`"
            )));
        }
    };
    let (f, resolved) = registry
        .build(name, &params)
        .map_err(|e| BoardError::bad(format!("plugin `{name}`: {e}")))?;
    let LossFn::Token(p) = f else {
        return Err(BoardError::bad(format!(
            "`{name}` is a pairwise objective; weight curves are drawn for token plugins"
        )));
    };
    let n = points as usize;
    let xs: Vec<f64> = (0..n)
        .map(|i| from + (to - from) * i as f64 / (n - 1) as f64)
        .collect();
    let device = ytrainer_core::device::select("cpu", 0).map_err(BoardError::unusable)?;
    let col = |v: f64| tensor_from_slice(&vec![v as f32; n], &device);
    let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let needs = p.needs();
    // The x values are the losses, or (`vs=entropy`) the entropies with the loss held at `loss`.
    let (loss, ent) = if vs_entropy {
        (col(loss_at), tensor_from_slice(&xs32, &device))
    } else {
        (tensor_from_slice(&xs32, &device), col(entropy))
    };
    let mut stats = TokenStats::from_loss(loss);
    stats.entropy = needs.entropy.then(|| ent.clone());
    stats.top_k_entropy = (needs.top_k_entropy > 0).then(|| ent.clone().clamp(0.0, 1.0));
    stats.reference_loss = needs.reference_loss.then(|| col(reference));
    stats.position = needs.position.then(|| vec![0; n]);
    stats.sample = needs.sample.then(|| (0..n as u32).collect());
    let w = p
        .try_weights(&stats)
        .map_err(|e| BoardError::unusable(format!("plugin `{name}`: {e}")))?;
    Ok(json!({
        "plugin": name,
        "params": resolved.values(),
        "x": xs,
        "weight": tensor_to_vec(w),
    }))
}
