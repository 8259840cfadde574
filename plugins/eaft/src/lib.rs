//! EAFT (entropy-aware fine-tuning): each token's loss is weighted by the model's normalised top-K predictive
//! entropy at that position, `w = (H_K / ln K)^alpha`. `H_K` is the entropy of the distribution over the K most
//! likely tokens (renormalised), so `H_K / ln K` is in [0, 1]. A confident prediction (low entropy) that
//! disagrees with the label — a "confident conflict", where forcing the label damages what the model already
//! knows — gets a small weight; uncertain positions, where the model is still learning, keep their full loss.

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

struct Eaft {
    k: usize,
    alpha: f64,
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
        let h = h.clamp(0.0, 1.0);
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
    Ok(LossFn::Token(Box::new(Eaft {
        k: k as usize,
        alpha,
    })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "EAFT: weight by normalised top-K predictive entropy; suppresses confident-but-contradicted tokens",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = (H_K / ln K)^alpha,  H_K = entropy of the renormalised top-K next-token distribution",
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
}
