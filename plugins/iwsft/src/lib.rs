//! Importance-weighted SFT (iw-SFT; Qin & Springenberg 2025, "Supervised Fine Tuning on Curated Data is
//! Reinforcement Learning (and can be improved)"): every token of a sequence is weighted by the same importance
//! weight, the clipped ratio of the policy to the reference on that sequence,
//!
//! ```text
//! w = clip(exp(T * mean_t (log p(y_t) - log p_ref(y_t))), 0, C)      (one value per sequence, detached)
//! ```
//!
//! with `log p - log p_ref = ce_ref - ce` per token. The mean runs over the sequence's supervised tokens in the
//! micro-batch (all of them in one-pass mode; the window's in windowed mode). The reference is the contract's
//! reference loss: the base model with adapters disabled, or `[loss] reference_model`. Defaults follow the
//! authors' code: `T = 1`, `C = 16`.

use std::collections::HashMap;

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Needs, Normalize, ParamSpec, Params, PluginError, PluginKind,
    TokenReweighter, TokenStats, tensor_from_slice, tensor_to_vec,
};

/// The registered plugin name.
pub const NAME: &str = "iwsft";

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "temperature",
        default: 1.0,
        help: "T in exp(T * mean(log p - log p_ref)) (> 0)",
    },
    ParamSpec {
        name: "clip",
        default: 16.0,
        help: "C: the importance weight is clipped to [0, C] (> 0)",
    },
];

/// Per-token weights: the clipped importance weight of each token's sequence (`sample` ids; all tokens one
/// sequence when `None`). A sequence with a non-finite mean gets weight 0.
pub fn weights(
    loss: &[f32],
    reference: &[f32],
    sample: Option<&[u32]>,
    temperature: f64,
    clip: f64,
) -> Vec<f32> {
    let id = |i: usize| sample.map_or(0, |s| s[i]);
    let mut sums: HashMap<u32, (f64, usize)> = HashMap::new();
    for i in 0..loss.len() {
        let e = sums.entry(id(i)).or_default();
        e.0 += reference[i] as f64 - loss[i] as f64;
        e.1 += 1;
    }
    let w: HashMap<u32, f32> = sums
        .into_iter()
        .map(|(s, (sum, n))| {
            let x = (temperature * sum / n as f64).exp().clamp(0.0, clip);
            (s, if x.is_finite() { x as f32 } else { 0.0 })
        })
        .collect();
    (0..loss.len()).map(|i| w[&id(i)]).collect()
}

struct IwSft {
    temperature: f64,
    clip: f64,
}

impl TokenReweighter for IwSft {
    fn needs(&self) -> Needs {
        Needs {
            reference_loss: true,
            sample: true,
            ..Needs::NONE
        }
    }

    fn default_normalize(&self) -> Normalize {
        // The authors divide the weighted sum by the number of supervised tokens.
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let loss = tensor_to_vec(stats.loss.clone());
        // Without a reference (only when a caller ignores `needs`) the ratio is 1: plain CE.
        let reference = match &stats.reference_loss {
            Some(r) => tensor_to_vec(r.clone()),
            None => loss.clone(),
        };
        let w = weights(
            &loss,
            &reference,
            stats.sample.as_deref(),
            self.temperature,
            self.clip,
        );
        tensor_from_slice(&w, &stats.loss.device())
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let (temperature, clip) = (p.get("temperature"), p.get("clip"));
    let bad = |param: &str, value: f64, reason: &str| PluginError::InvalidParam {
        plugin: NAME.into(),
        param: param.into(),
        value,
        reason: reason.into(),
    };
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(bad(
            "temperature",
            temperature,
            "must be a finite number > 0 (the authors use 1)",
        ));
    }
    if !(clip > 0.0 && clip.is_finite()) {
        return Err(bad(
            "clip",
            clip,
            "must be a finite number > 0 (the authors use 16)",
        ));
    }
    Ok(LossFn::Token(Box::new(IwSft { temperature, clip })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "importance-weighted SFT: each sequence weighted by clip(exp(T * mean(log p - log p_ref)), 0, C)",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = clip(exp(T * mean_seq(ce_ref - ce)), 0, C)   (one detached weight per sequence)",
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
        // sample 0: ce_ref - ce = [0.5, -0.1] -> mean 0.2 -> exp(0.2) = 1.221402758
        // sample 1: [-1.0] -> exp(-1) = 0.367879441; T = 2: exp(0.4) = 1.491824698, exp(-2) = 0.135335283
        // sample 2: [3.0, 3.0] -> exp(3) = 20.0855 clipped to C = 16 (T = 1) / C = 4 (second call)
        let loss = [1.0, 2.0, 3.0, 0.5, 0.5];
        let reference = [1.5, 1.9, 2.0, 3.5, 3.5];
        let sample = [0, 0, 1, 2, 2];
        let w = weights(&loss, &reference, Some(&sample), 1.0, 16.0);
        let want = [1.221_402_8, 1.221_402_8, 0.367_879_44, 16.0, 16.0];
        for (g, e) in w.iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{w:?}");
        }
        let w = weights(&loss, &reference, Some(&sample), 2.0, 4.0);
        let want = [1.491_824_7, 1.491_824_7, 0.135_335_28, 4.0, 4.0];
        for (g, e) in w.iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{w:?}");
        }
        // Policy = reference (a fresh adapter): every weight is exactly 1.
        assert_eq!(
            weights(&loss, &loss, Some(&sample), 1.0, 16.0),
            vec![1.0; 5]
        );

        let mut p = BTreeMap::new();
        p.insert("clip".to_string(), 4.0);
        p.insert("temperature".to_string(), 2.0);
        let (f, _) = Registry::discover().build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert!(f.needs().reference_loss && f.needs().sample);
        let d = Device::flex();
        let mut stats = TokenStats::from_loss(tensor_from_slice(&loss, &d));
        stats.reference_loss = Some(tensor_from_slice(&reference, &d));
        stats.sample = Some(sample.to_vec());
        let got = tensor_to_vec(f.weights(&stats));
        for (g, e) in got.iter().zip(want) {
            assert!((g - e).abs() < 1e-5, "{got:?}");
        }
        p.insert("clip".to_string(), 0.0);
        assert!(Registry::discover().build(NAME, &p).is_err());
    }
}
