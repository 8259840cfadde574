//! Rho-1 selective language modelling (Lin et al. 2024, "Rho-1: Not All Tokens Are What You Need"): train only on
//! the tokens with the largest **excess loss** over a reference model, `excess = ce - ce_ref`. The top `ratio`
//! fraction of each micro-batch's tokens by excess get weight 1, the rest 0.
//!
//! The reference is the base model with its adapters disabled (LoRA runs): the trainer computes `ce_ref` with a
//! second, gradient-free forward pass because this plugin declares [`Needs::reference_loss`].

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Needs, Normalize, ParamSpec, Params, PluginError, PluginKind,
    TokenReweighter, TokenStats, tensor_from_slice, tensor_to_vec,
};

/// The registered plugin name.
pub const NAME: &str = "rho1";

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "ratio",
    default: 0.6,
    help: "fraction of each micro-batch's tokens kept, by excess loss (0 < ratio <= 1)",
}];

/// Keeps the `ceil(ratio * n)` tokens with the largest `loss - reference` (ties: earlier token first); 1 for
/// kept tokens, 0 otherwise. Non-finite excess is never kept.
pub fn select(loss: &[f32], reference: &[f32], ratio: f64) -> Vec<f32> {
    let n = loss.len();
    let excess: Vec<f32> = loss
        .iter()
        .zip(reference)
        .map(|(l, r)| l - r)
        .map(|e| if e.is_finite() { e } else { f32::NEG_INFINITY })
        .collect();
    let keep = ((ratio * n as f64).ceil() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| excess[b].total_cmp(&excess[a]).then(a.cmp(&b)));
    let mut w = vec![0f32; n];
    for &i in order.iter().take(keep) {
        if excess[i] > f32::NEG_INFINITY {
            w[i] = 1.0;
        }
    }
    w
}

struct Rho1 {
    ratio: f64,
}

impl TokenReweighter for Rho1 {
    fn needs(&self) -> Needs {
        Needs {
            reference_loss: true,
            ..Needs::default()
        }
    }

    fn default_normalize(&self) -> Normalize {
        // The mean over the selected tokens, as in the paper.
        Normalize::Nonzero
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let loss = tensor_to_vec(stats.loss.clone());
        let reference = match &stats.reference_loss {
            Some(r) => tensor_to_vec(r.clone()),
            // Without a reference every token has excess = loss: plain top-k by loss.
            None => vec![0.0; loss.len()],
        };
        tensor_from_slice(&select(&loss, &reference, self.ratio), &stats.loss.device())
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let ratio = p.get("ratio");
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(PluginError::InvalidParam {
            plugin: NAME.into(),
            param: "ratio".into(),
            value: ratio,
            reason: "must be in (0, 1]: the fraction of tokens kept (the paper keeps 0.6-0.7)"
                .into(),
        });
    }
    Ok(LossFn::Token(Box::new(Rho1 { ratio })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "Rho-1: train only the top `ratio` tokens by excess loss over the reference (base) model",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = 1 if (ce - ce_ref) is among the top ceil(ratio * N) of the micro-batch, else 0",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use ytrainer_core::loss::Registry;

    #[test]
    fn hand_computed() {
        // excess = [1.0, -0.5, 3.0, 0.5, 2.0]; ratio 0.4 -> keep ceil(2.0) = 2: tokens 2 and 4
        let loss = [2.0, 1.0, 4.0, 1.5, 2.5];
        let reference = [1.0, 1.5, 1.0, 1.0, 0.5];
        assert_eq!(
            select(&loss, &reference, 0.4),
            vec![0.0, 0.0, 1.0, 0.0, 1.0]
        );
        // ratio 0.5 -> ceil(2.5) = 3: adds token 0 (excess 1.0)
        assert_eq!(
            select(&loss, &reference, 0.5),
            vec![1.0, 0.0, 1.0, 0.0, 1.0]
        );
        assert_eq!(select(&loss, &reference, 1.0), vec![1.0; 5]);
        // NaN excess is never kept
        assert_eq!(select(&[f32::NAN, 1.0], &[0.0, 0.0], 1.0), vec![0.0, 1.0]);

        let mut p = BTreeMap::new();
        p.insert("ratio".to_string(), 0.4);
        let (f, _) = Registry::discover().build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert!(f.needs().reference_loss);
        let d = Device::flex();
        let mut stats = TokenStats::from_loss(tensor_from_slice(&loss, &d));
        stats.reference_loss = Some(tensor_from_slice(&reference, &d));
        assert_eq!(
            tensor_to_vec(f.weights(&stats)),
            vec![0.0, 0.0, 1.0, 0.0, 1.0]
        );
        p.insert("ratio".to_string(), 0.0);
        assert!(Registry::discover().build(NAME, &p).is_err());
    }
}
