//! DFT (Dynamic Fine-Tuning; Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective
//! with Reward Rectification"): each token's cross-entropy is scaled by its own detached probability,
//! `w = p(target) = exp(-ce)`, which turns the SFT gradient into a reward-weighted one.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, Params, PluginError, PluginKind, TokenReweighter, TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "dft";

/// The weight of one token with loss `l` (nats): `exp(-l)`; 0 for non-finite losses.
pub fn weight(l: f64) -> f64 {
    if l.is_finite() {
        (-l.max(0.0)).exp()
    } else {
        0.0
    }
}

struct Dft;

impl TokenReweighter for Dft {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let l = stats.loss.clone();
        let bad = l.clone().is_nan();
        // Losses are >= 0; clamping keeps exp in (0, 1] and maps +inf to 0.
        l.clamp_min(0.0).neg().exp().mask_fill(bad, 0.0)
    }
}

fn build(_: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Token(Box::new(Dft)))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "DFT: scale each token's loss by its detached probability, w = exp(-loss)",
        kind: PluginKind::Token,
        params: &[],
        formula: "w = exp(-ce) = p(target)   (detached)",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ytrainer_core::loss::{Registry, tensor_from_slice, tensor_to_vec};

    #[test]
    fn hand_computed() {
        // exp(0) = 1, exp(-ln 2) = 0.5, exp(-2) = 0.135335283, exp(-10) = 4.539993e-5
        let want = [1.0, 0.5, 0.135_335_28, 4.539_993e-5, 0.0];
        let l = [0.0, std::f64::consts::LN_2, 2.0, 10.0, f64::INFINITY];
        for (l, w) in l.iter().zip(want) {
            assert!((weight(*l) - w).abs() < 1e-7, "w({l})");
        }
        let (f, _) = Registry::discover()
            .build(NAME, &Default::default())
            .unwrap();
        let LossFn::Token(p) = f else { unreachable!() };
        let d = Device::flex();
        let stats = TokenStats::from_loss(tensor_from_slice(
            &[
                0.0,
                std::f32::consts::LN_2,
                2.0,
                10.0,
                f32::INFINITY,
                f32::NAN,
            ],
            &d,
        ));
        let got = tensor_to_vec(p.weights(&stats));
        let want = [1.0, 0.5, 0.135_335_28, 4.539_993e-5, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?}");
        }
    }
}
