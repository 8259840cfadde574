//! The probability-based objectives of Li et al. 2025, "Beyond Log Likelihood: Probability-Based Objectives for
//! Supervised Fine-Tuning across the Model Capability Continuum": instead of `-log p` each token contributes
//! `-p^k`, optionally only when its probability reaches a threshold. These are *prior-leaning* objectives: they
//! move the gradient towards tokens the model already finds plausible.
//!
//! As a token weight: the gradient of `-p^k` is `k p^k` times the gradient of `ce = -log p`
//! (`d(-p^k) = -k p^(k-1) dp = k p^k d(-log p)`), so `w = k p^k` (detached) reproduces `-p^k` exactly;
//! `k = 1` is `-p` (the same gradient as `dft`), `k = 0` is plain NLL (`w = 1`). With `tau > 0`, tokens with
//! `p < tau` get weight 0 (the thresholded variants: `k = 0, tau > 0` is NLL on the tokens with `p >= tau`).

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, ParamSpec, Params, PluginError, PluginKind, TokenReweighter,
    TokenStats, tensor_from_slice, tensor_to_vec,
};

/// The registered plugin name.
pub const NAME: &str = "bll";

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "k",
        default: 1.0,
        help: "objective -p^k (k = 1: -p; k = 10: -p^10; k = 0: -log p)",
    },
    ParamSpec {
        name: "tau",
        default: 0.0,
        help: "tokens with p < tau get weight 0 (0 = no threshold)",
    },
];

/// The weight of one token with loss `l` (nats): `k p^k` (`1` when `k = 0`), 0 when `p < tau` or `l` is not
/// finite; `p = exp(-l)`.
pub fn weight(l: f64, k: f64, tau: f64) -> f64 {
    if !l.is_finite() {
        return 0.0;
    }
    let p = (-l.max(0.0)).exp();
    if p < tau {
        return 0.0;
    }
    if k == 0.0 { 1.0 } else { k * p.powf(k) }
}

struct Bll {
    k: f64,
    tau: f64,
}

impl TokenReweighter for Bll {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let w: Vec<f32> = tensor_to_vec(stats.loss.clone())
            .into_iter()
            .map(|l| weight(l as f64, self.k, self.tau) as f32)
            .collect();
        tensor_from_slice(&w, &stats.loss.device())
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let (k, tau) = (p.get("k"), p.get("tau"));
    let bad = |param: &str, value: f64, reason: &str| PluginError::InvalidParam {
        plugin: NAME.into(),
        param: param.into(),
        value,
        reason: reason.into(),
    };
    if !(0.0..=100.0).contains(&k) {
        return Err(bad(
            "k",
            k,
            "must be in [0, 100] (1 is -p, 10 is -p^10, 0 is -log p)",
        ));
    }
    if !(0.0..1.0).contains(&tau) {
        return Err(bad(
            "tau",
            tau,
            "must be in [0, 1): the probability below which a token is dropped",
        ));
    }
    Ok(LossFn::Token(Box::new(Bll { k, tau })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "beyond log-likelihood: objective -p^k (k = 1: -p, k = 10: -p^10, k = 0: NLL), tokens with p < tau dropped",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = k p^k (k > 0) or 1 (k = 0) if p >= tau, else 0;  p = exp(-ce)  (gradient of -p^k)",
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
        let ln2 = std::f64::consts::LN_2;
        // -p at p = 1/2: w = 0.5; -p^10 at p = 1/2: 10 / 1024 = 0.009765625; at p = e^-0.1 = 0.904837418:
        // 10 e^-1 = 3.678794412; NLL: 1; threshold 0.6 drops p = 1/2, keeps p = e^-0.1
        assert!((weight(ln2, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((weight(ln2, 10.0, 0.0) - 0.009_765_625).abs() < 1e-12);
        assert!((weight(0.1, 10.0, 0.0) - 3.678_794_412).abs() < 1e-8);
        assert_eq!(weight(5.0, 0.0, 0.0), 1.0);
        assert_eq!(weight(ln2, 0.0, 0.6), 0.0);
        assert_eq!(weight(0.1, 0.0, 0.6), 1.0);
        assert_eq!(weight(f64::INFINITY, 0.0, 0.0), 0.0);

        // The weight is the gradient of -p^k: check against a central difference of f(ce) = -exp(-k ce).
        for &(k, l) in &[(1.0, 0.3), (10.0, 0.05), (2.5, 1.7)] {
            let f = |c: f64| -(-k * c).exp();
            let h = 1e-6;
            let num = (f(l + h) - f(l - h)) / (2.0 * h);
            assert!((num - weight(l, k, 0.0)).abs() < 1e-6, "k={k} l={l}");
        }

        let mut p = BTreeMap::new();
        p.insert("k".to_string(), 10.0);
        p.insert("tau".to_string(), 0.6);
        let (f, _) = Registry::discover().build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        let d = Device::flex();
        let got = tensor_to_vec(f.weights(&TokenStats::from_loss(tensor_from_slice(
            &[std::f32::consts::LN_2, 0.1, f32::NAN],
            &d,
        ))));
        assert_eq!(got[0], 0.0);
        assert!((got[1] as f64 - 3.678_794_4).abs() < 1e-5, "{got:?}");
        assert_eq!(got[2], 0.0);
        p.insert("tau".to_string(), 1.0);
        assert!(Registry::discover().build(NAME, &p).is_err());
    }
}
