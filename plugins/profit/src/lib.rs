//! ProFit (Liu et al. 2026, "ProFit: Leveraging High-Value Signals in SFT via Probability-Guided Token
//! Selection"): a static, stop-gradient gate that trains only the tokens the model already gives a probability
//! above `tau`; low-probability tokens (mostly replaceable wording, in the paper's analysis) are masked out.
//! The kept tokens keep their plain cross-entropy, and the default normalisation averages over them.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, ParamSpec, Params, PluginError, PluginKind, TokenReweighter,
    TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "profit";

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "tau",
    default: 0.1,
    help: "keep a token only when its probability p = exp(-ce) is above tau (0 <= tau < 1)",
}];

/// The weight of one token with loss `l` (nats): 1 when `exp(-l) > tau`, else 0 (also for non-finite losses).
pub fn weight(l: f64, tau: f64) -> f64 {
    if l.is_finite() && (-l.max(0.0)).exp() > tau {
        1.0
    } else {
        0.0
    }
}

struct Profit {
    tau: f64,
}

impl TokenReweighter for Profit {
    fn default_normalize(&self) -> Normalize {
        // The mean over the kept tokens (masked tokens leave the denominator, as with `rho1`).
        Normalize::Nonzero
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let l = stats.loss.clone();
        // p > tau  <=>  ce < -ln tau (tau = 0: every finite loss).
        let limit = if self.tau > 0.0 {
            -self.tau.ln()
        } else {
            f64::INFINITY
        };
        let keep = l.clone().lower_elem(limit);
        l.zeros_like().mask_fill(keep, 1.0)
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let tau = p.get("tau");
    if !(0.0..1.0).contains(&tau) {
        return Err(PluginError::InvalidParam {
            plugin: NAME.into(),
            param: "tau".into(),
            value: tau,
            reason: "must be in [0, 1): the probability a token must exceed to be trained".into(),
        });
    }
    Ok(LossFn::Token(Box::new(Profit { tau })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "ProFit: train only tokens whose detached probability is above tau (mask low-probability wording)",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = 1 if p > tau else 0,  p = exp(-ce)  (stop-gradient gate)",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use ytrainer_core::loss::{Registry, tensor_from_slice, tensor_to_vec};

    #[test]
    fn hand_computed() {
        // tau = 0.3: -ln 0.3 = 1.203972804; ce 1.2 -> p = 0.301194 kept; ce 1.21 -> p = 0.298197 dropped
        assert_eq!(weight(1.2, 0.3), 1.0);
        assert_eq!(weight(1.21, 0.3), 0.0);
        assert_eq!(weight(0.0, 0.3), 1.0);
        assert_eq!(weight(50.0, 0.0), 1.0);
        assert_eq!(weight(f64::INFINITY, 0.0), 0.0);

        let mut p = BTreeMap::new();
        p.insert("tau".to_string(), 0.3);
        let (f, _) = Registry::discover().build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert_eq!(f.default_normalize(), Normalize::Nonzero);
        let d = Device::flex();
        let got = tensor_to_vec(f.weights(&TokenStats::from_loss(tensor_from_slice(
            &[1.2, 1.21, 0.0, 7.0, f32::INFINITY, f32::NAN],
            &d,
        ))));
        assert_eq!(got, vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        p.insert("tau".to_string(), -0.1);
        let Err(e) = Registry::discover().build(NAME, &p) else {
            panic!("accepted tau = -0.1")
        };
        assert_eq!(
            e.to_string(),
            "loss plugin `profit`: parameter `tau` = -0.1: must be in [0, 1): the probability a token must exceed to be trained"
        );
    }
}
