//! EAFT (entropy-aware fine-tuning): each token's loss is weighted by the model's normalised top-K predictive
//! entropy at that position, `w = (H_K / ln K)^alpha`. `H_K` is the entropy of the distribution over the K most
//! likely tokens (renormalised), so `H_K / ln K` is in [0, 1]. A confident prediction (low entropy) that
//! disagrees with the label — a "confident conflict", where forcing the label damages what the model already
//! knows — gets a small weight; uncertain positions, where the model is still learning, keep their full loss.
//!
//! The peers differ in how they scale `H_K` before the power, which `divisor` selects: `0` (the default) divides
//! by `ln K`, the entropy's maximum, so the weight is in [0, 1] for every K; `3` is LLaMA-Factory's
//! `use_eaft_loss` (it divides the top-20 entropy by the constant 3, which is `ln 20 = 2.9957` rounded, so for
//! K = 20 the two differ by a factor `(ln 20 / 3)^alpha = 0.9986^alpha`); `1` is axolotl's (no division: the
//! weight is the raw entropy, up to `(ln K)^alpha`).

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Needs, Normalize, ParamSpec, Params, PluginError, PluginKind,
    TokenReweighter, TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "eaft";

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "k",
        default: 20.0,
        help: "top-K tokens whose entropy is measured (integer >= 2)",
    },
    ParamSpec {
        name: "alpha",
        default: 1.0,
        help: "exponent on the normalised entropy (0 = plain CE)",
    },
    ParamSpec {
        name: "divisor",
        default: 0.0,
        help: "H_K is divided by this before the power: 0 = ln K (in [0, 1]), 3 = LLaMA-Factory, 1 = axolotl (raw)",
    },
];

/// Normalised entropy of a probability vector restricted to its `k` largest entries (host reference).
pub fn normalized_top_k_entropy(probs: &[f64], k: usize) -> f64 {
    let mut p: Vec<f64> = probs.to_vec();
    p.sort_by(|a, b| b.total_cmp(a));
    p.truncate(k);
    let z: f64 = p.iter().sum();
    let h: f64 = p
        .iter()
        .map(|x| x / z)
        .filter(|q| *q > 0.0)
        .map(|q| -q * q.ln())
        .sum();
    h / (k as f64).ln()
}

/// The weight from a normalised entropy `h` in [0, 1].
pub fn weight(h: f64, alpha: f64) -> f64 {
    if h.is_finite() {
        h.clamp(0.0, 1.0).powf(alpha)
    } else {
        0.0
    }
}

/// The weight from a normalised entropy `h = H_K / ln K` with `divisor` (0 = `ln K`): `(H_K / divisor)^alpha`.
pub fn weight_with(h: f64, alpha: f64, k: usize, divisor: f64) -> f64 {
    if divisor == 0.0 {
        return weight(h, alpha);
    }
    if h.is_finite() {
        (h.clamp(0.0, 1.0) * (k as f64).ln() / divisor).powf(alpha)
    } else {
        0.0
    }
}

struct Eaft {
    k: usize,
    alpha: f64,
    divisor: f64,
}

impl TokenReweighter for Eaft {
    fn needs(&self) -> Needs {
        Needs {
            top_k_entropy: self.k,
            ..Needs::default()
        }
    }

    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let Some(h) = stats.top_k_entropy.clone() else {
            // Only reachable if a caller ignores `needs`; weight 1 keeps plain CE rather than inventing values.
            return stats.loss.ones_like();
        };
        let bad = h.clone().is_nan();
        let mut h = h.clamp(0.0, 1.0);
        if self.divisor > 0.0 {
            // Back to H_K (the trainer hands H_K / ln K), then the peer's scaling.
            h = h.mul_scalar((self.k as f64).ln() / self.divisor);
        }
        let w = if self.alpha == 0.0 {
            h.ones_like()
        } else {
            h.powf_scalar(self.alpha)
        };
        w.mask_fill(bad, 0.0)
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let (k, alpha) = (p.get("k"), p.get("alpha"));
    let bad = |param: &str, value: f64, reason: &str| PluginError::InvalidParam {
        plugin: NAME.into(),
        param: param.into(),
        value,
        reason: reason.into(),
    };
    if k < 2.0 || k.fract() != 0.0 || k > 65536.0 {
        return Err(bad(
            "k",
            k,
            "must be an integer between 2 and 65536 (e.g. 20)",
        ));
    }
    if alpha < 0.0 {
        return Err(bad(
            "alpha",
            alpha,
            "must be >= 0 (0 is plain cross-entropy)",
        ));
    }
    let divisor = p.get("divisor");
    if !(divisor >= 0.0 && divisor.is_finite()) {
        return Err(bad(
            "divisor",
            divisor,
            "must be >= 0: 0 divides by ln K, 3 is LLaMA-Factory's constant, 1 is axolotl's raw entropy",
        ));
    }
    Ok(LossFn::Token(Box::new(Eaft {
        k: k as usize,
        alpha,
        divisor,
    })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "EAFT: weight by normalised top-K predictive entropy; suppresses confident-but-contradicted tokens",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = (H_K / d)^alpha,  H_K = entropy of the renormalised top-K next-token distribution; d = ln K (divisor = 0), else d = divisor (3: LLaMA-Factory, 1: axolotl)",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use ytrainer_core::burn::tensor::activation::log_softmax;
    use ytrainer_core::loss::{Registry, tensor_from_slice, tensor_to_vec};
    use ytrainer_core::step::top_k_entropy;

    #[test]
    fn hand_computed() {
        // uniform over the top 2: H = ln 2, normalised 1; [0.5, 0.25, 0.25] with K = 2: q = [2/3, 1/3],
        // H = -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.636514, / ln 2 = 0.918296
        assert!((normalized_top_k_entropy(&[0.5, 0.5, 0.0], 2) - 1.0).abs() < 1e-12);
        let h = normalized_top_k_entropy(&[0.5, 0.25, 0.25], 2);
        assert!((h - 0.918_295_83).abs() < 1e-7);
        assert!((weight(h, 2.0) - 0.843_267_23).abs() < 1e-7);
        assert_eq!(weight(0.0, 1.0), 0.0);

        // The trainer's tensor version of the statistic agrees with the host reference.
        let d = Device::flex();
        let logits = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln(), 1.0, 1.0, -30.0];
        let lp = log_softmax(
            Tensor::<2>::from_data(TensorData::new(logits.to_vec(), [2, 3]), &d),
            1,
        );
        let h_t = tensor_to_vec(top_k_entropy(lp, 2));
        assert!((h_t[0] as f64 - 0.918_295_83).abs() < 1e-5, "{h_t:?}");
        assert!((h_t[1] as f64 - 1.0).abs() < 1e-5, "{h_t:?}");

        let mut p = BTreeMap::new();
        p.insert("k".to_string(), 2.0);
        p.insert("alpha".to_string(), 2.0);
        let (f, _) = Registry::discover().build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert_eq!(f.needs().top_k_entropy, 2);
        let mut stats = TokenStats::from_loss(tensor_from_slice(&[1.0, 1.0, 1.0], &d));
        stats.top_k_entropy = Some(tensor_from_slice(&[0.918_295_8, 1.0, 0.0], &d));
        let w = tensor_to_vec(f.weights(&stats));
        assert!(
            (w[0] as f64 - 0.843_267_23).abs() < 1e-6 && w[1] == 1.0 && w[2] == 0.0,
            "{w:?}"
        );

        p.insert("k".to_string(), 2.5);
        assert!(Registry::discover().build(NAME, &p).is_err());
    }

    #[test]
    fn peer_divisors() {
        // K = 20, top-20 uniform over 10 tokens: H = ln 10 = 2.302585093, h = ln 10 / ln 20 = 0.768621786.
        // ln K (default): 0.768621786; LLaMA-Factory (/3): 0.767528364; axolotl (raw): 2.302585093; alpha = 2
        // squares each: 0.590779, 0.589099790, 5.301898110.
        let h = 10f64.ln() / 20f64.ln();
        assert!((weight_with(h, 1.0, 20, 0.0) - 0.768_621_786).abs() < 1e-9);
        assert!((weight_with(h, 1.0, 20, 3.0) - 0.767_528_364).abs() < 1e-9);
        assert!((weight_with(h, 1.0, 20, 1.0) - std::f64::consts::LN_10).abs() < 1e-9);
        assert!((weight_with(h, 2.0, 20, 3.0) - 0.589_099_790).abs() < 1e-8);
        assert!((weight_with(h, 2.0, 20, 1.0) - 5.301_898_110).abs() < 1e-8);

        let d = Device::flex();
        for (divisor, want) in [
            (0.0, 0.768_621_786),
            (3.0, 0.767_528_364),
            (1.0, std::f64::consts::LN_10),
        ] {
            let mut p = BTreeMap::new();
            p.insert("divisor".to_string(), divisor);
            let (f, _) = Registry::discover().build(NAME, &p).unwrap();
            let LossFn::Token(f) = f else { unreachable!() };
            let mut stats = TokenStats::from_loss(tensor_from_slice(&[1.0, 1.0], &d));
            stats.top_k_entropy = Some(tensor_from_slice(&[h as f32, f32::NAN], &d));
            let w = tensor_to_vec(f.weights(&stats));
            assert!(
                (w[0] as f64 - want).abs() < 1e-5 && w[1] == 0.0,
                "{divisor}: {w:?}"
            );
        }
        let mut p = BTreeMap::new();
        p.insert("divisor".to_string(), -1.0);
        assert!(Registry::discover().build(NAME, &p).is_err());
    }
}
