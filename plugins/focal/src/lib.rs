//! Focal loss for tokens (Lin et al. 2017, "Focal Loss for Dense Object Detection"): `w = (1 - p)^gamma` with
//! `p = exp(-ce)` the detached probability of the target, so confidently predicted tokens are down-weighted.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, ParamSpec, Params, PluginError, PluginKind, TokenReweighter,
    TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "focal";

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "gamma",
    default: 2.0,
    help: "focusing exponent (0 = plain CE)",
}];

/// The weight of one token with loss `l`: `(1 - exp(-l))^gamma`; 0 for non-finite losses.
pub fn weight(l: f64, gamma: f64) -> f64 {
    if !l.is_finite() {
        return 0.0;
    }
    (-(-l.max(0.0)).exp_m1()).powf(gamma)
}

struct Focal {
    gamma: f64,
}

impl TokenReweighter for Focal {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let l = stats.loss.clone();
        let bad = l.clone().is_nan().bool_or(l.clone().is_inf());
        if self.gamma == 0.0 {
            return l.ones_like().mask_fill(bad, 0.0);
        }
        let one_minus_p = l
            .clamp_min(0.0)
            .neg()
            .exp()
            .neg()
            .add_scalar(1.0)
            .clamp(0.0, 1.0);
        one_minus_p.powf_scalar(self.gamma).mask_fill(bad, 0.0)
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let gamma = p.get("gamma");
    if gamma < 0.0 {
        return Err(PluginError::InvalidParam {
            plugin: NAME.into(),
            param: "gamma".into(),
            value: gamma,
            reason: "must be >= 0 (0 is plain cross-entropy; the paper's default is 2)".into(),
        });
    }
    Ok(LossFn::Token(Box::new(Focal { gamma })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "focal: down-weight confident tokens, w = (1 - p)^gamma with p = exp(-loss)",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = (1 - exp(-ce))^gamma",
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
        // p = 0.5 at l = ln 2: (0.5)^2 = 0.25; l = 2: (1 - 0.135335283)^2 = 0.747645; l = 0: 0
        assert_eq!(weight(0.0, 2.0), 0.0);
        assert!((weight(std::f64::consts::LN_2, 2.0) - 0.25).abs() < 1e-12);
        assert!((weight(2.0, 2.0) - 0.747_645_13).abs() < 1e-7);
        assert!((weight(2.0, 1.0) - 0.864_664_72).abs() < 1e-7);
        assert_eq!(weight(f64::NAN, 2.0), 0.0);

        let r = Registry::discover();
        let d = Device::flex();
        let losses = [0.0, std::f32::consts::LN_2, 2.0, 30.0, f32::NAN];
        for (gamma, want) in [
            (2.0, [0.0, 0.25, 0.747_645_13, 1.0, 0.0]),
            (0.0, [1.0, 1.0, 1.0, 1.0, 0.0]),
        ] {
            let mut p = BTreeMap::new();
            p.insert("gamma".to_string(), gamma);
            let (f, _) = r.build(NAME, &p).unwrap();
            let LossFn::Token(f) = f else { unreachable!() };
            let got =
                tensor_to_vec(f.weights(&TokenStats::from_loss(tensor_from_slice(&losses, &d))));
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-6, "gamma {gamma}: {got:?}");
            }
        }
        let mut p = BTreeMap::new();
        p.insert("gamma".to_string(), -1.0);
        assert!(matches!(
            r.build(NAME, &p),
            Err(PluginError::InvalidParam { .. })
        ));
    }
}
