//! ASFT, anchored supervised fine-tuning (Zhu et al. 2025, "Anchored Supervised Fine-Tuning"): DFT's token
//! weight plus a KL anchor to the reference model at every supervised position,
//!
//! ```text
//! loss_i = sg(p_i) * ce_i + alpha * KL(p_ref(.|i) || p(.|i))
//! ```
//!
//! The KL runs over the whole vocabulary (the authors' code: `kl_div(log_softmax(logits), softmax(ref_logits))`,
//! i.e. from the reference to the policy), so it is not a token weight: this plugin returns the DFT weights and
//! declares the anchor through [`TokenReweighter::kl_anchor`], and the trainer adds `alpha * KL` (value and
//! gradient `alpha (p - p_ref)` on the logits) from the reference's log-probabilities: the base model with
//! adapters disabled (LoRA) or `[loss] reference_model`. Normalised by the number of tokens, as the authors' mean.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, ParamSpec, Params, PluginError, PluginKind, TokenReweighter,
    TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "asft";

const PARAMS: &[ParamSpec] = &[ParamSpec {
    name: "alpha",
    default: 0.1,
    help: "weight of the KL(p_ref || p) anchor per supervised token (> 0; 0.1 as the authors' code)",
}];

struct Asft {
    alpha: f64,
}

impl TokenReweighter for Asft {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        // DFT: w = p = exp(-ce), detached; non-finite losses get 0.
        let l = stats.loss.clone();
        let bad = l.clone().is_nan();
        l.clamp_min(0.0).neg().exp().mask_fill(bad, 0.0)
    }

    fn kl_anchor(&self) -> f64 {
        self.alpha
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let alpha = p.get("alpha");
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(PluginError::InvalidParam {
            plugin: NAME.into(),
            param: "alpha".into(),
            value: alpha,
            reason: "must be a finite number > 0 (without the anchor ASFT is `dft`)".into(),
        });
    }
    Ok(LossFn::Token(Box::new(Asft { alpha })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "ASFT: DFT weights (w = p) plus alpha * KL(p_ref || p) over the vocabulary at every supervised token",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "loss_i = sg(p) * ce_i + alpha * KL(p_ref(.|i) || p(.|i)),  p = exp(-ce); the KL is added by the trainer",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use ytrainer_core::loss::{Registry, tensor_from_slice, tensor_to_vec};

    #[test]
    fn dft_weights_and_the_declared_anchor() {
        let mut p = BTreeMap::new();
        p.insert("alpha".to_string(), 0.25);
        let (f, _) = Registry::discover().build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert_eq!(f.kl_anchor(), 0.25);
        assert_eq!(f.default_normalize(), Normalize::Tokens);
        let d = Device::flex();
        let got = tensor_to_vec(f.weights(&TokenStats::from_loss(tensor_from_slice(
            &[0.0, std::f32::consts::LN_2, 2.0, f32::NAN],
            &d,
        ))));
        let want = [1.0, 0.5, 0.135_335_28, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // The default is the authors' 0.1; 0 is refused (that is `dft`).
        let (f, _) = Registry::discover().build(NAME, &BTreeMap::new()).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert_eq!(f.kl_anchor(), 0.1);
        p.insert("alpha".to_string(), 0.0);
        let Err(e) = Registry::discover().build(NAME, &p) else {
            panic!("alpha = 0 accepted")
        };
        assert!(
            e.to_string().contains("without the anchor ASFT is `dft`"),
            "{e}"
        );
    }
}
