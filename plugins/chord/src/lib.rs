//! CHORD's token weighting of the SFT term (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts: Harmonizing
//! Supervised Fine-Tuning and Reinforcement Learning via Dynamic Weighting", the `phi` variant): each token's
//! cross-entropy is scaled by `phi(p) = p (1 - p)` of its own detached probability `p = exp(-ce)`. Tokens the model
//! already predicts (p near 1) and tokens far from its distribution (p near 0) are both down-weighted; the
//! largest weight, 1/4, is at p = 1/2. Only CHORD's SFT term is a token plugin: its RL term needs rollouts.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, Params, PluginError, PluginKind, TokenReweighter, TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "chord";

/// The weight of one token with loss `l` (nats): `p (1 - p)`, `p = exp(-l)`; 0 for non-finite losses.
pub fn weight(l: f64) -> f64 {
    if !l.is_finite() {
        return 0.0;
    }
    let p = (-l.max(0.0)).exp();
    p * (1.0 - p)
}

struct Chord;

impl TokenReweighter for Chord {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let l = stats.loss.clone();
        let bad = l.clone().is_nan();
        let p = l.clamp_min(0.0).neg().exp();
        // p (1 - p); +inf loss gives p = 0 and weight 0.
        p.clone()
            .mul(p.neg().add_scalar(1.0))
            .clamp_min(0.0)
            .mask_fill(bad, 0.0)
    }
}

fn build(_: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Token(Box::new(Chord)))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "CHORD-phi: scale each token's loss by p(1-p) of its detached probability (peaks at p = 1/2)",
        kind: PluginKind::Token,
        params: &[],
        formula: "w = sg(p (1 - p)),  p = exp(-ce)",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ytrainer_core::loss::{Registry, tensor_from_slice, tensor_to_vec};

    #[test]
    fn hand_computed() {
        // p = 1 -> 0; p = 1/2 (ce = ln 2) -> 1/4; p = e^-1 = 0.367879441 -> 0.367879441 * 0.632120559 = 0.232544158;
        // p = e^-3 = 0.049787068 -> 0.049787068 * 0.950212932 = 0.047308316; inf -> 0
        let l = [0.0, std::f64::consts::LN_2, 1.0, 3.0, f64::INFINITY];
        let want = [0.0, 0.25, 0.232_544_16, 0.047_308_32, 0.0];
        for (l, w) in l.iter().zip(want) {
            assert!((weight(*l) - w).abs() < 1e-7, "w({l}) = {}", weight(*l));
        }
        let (f, _) = Registry::discover()
            .build(NAME, &Default::default())
            .unwrap();
        let LossFn::Token(p) = f else { unreachable!() };
        assert_eq!(p.default_normalize(), Normalize::Tokens);
        let d = Device::flex();
        let stats = TokenStats::from_loss(tensor_from_slice(
            &[
                0.0,
                std::f32::consts::LN_2,
                1.0,
                3.0,
                f32::INFINITY,
                f32::NAN,
            ],
            &d,
        ));
        let got = tensor_to_vec(p.weights(&stats));
        let want = [0.0, 0.25, 0.232_544_16, 0.047_308_32, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?}");
        }
    }
}
