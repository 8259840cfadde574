//! Loss truncation (Kang & Hashimoto 2020, "Improved Natural Language Generation via Loss Truncation"): drop the
//! highest-loss fraction `q` of each micro-batch, on the view that the worst-fitting data is mostly noise.
//! With `per_sample = 0` whole tokens are dropped (the `floor(q * N)` highest-loss tokens); with
//! `per_sample = 1` whole samples are dropped (the `floor(q * S)` samples with the highest mean token loss).

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Needs, Normalize, ParamSpec, Params, PluginError, PluginKind,
    TokenReweighter, TokenStats, tensor_from_slice, tensor_to_vec,
};

/// The registered plugin name.
pub const NAME: &str = "truncation";

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "q",
        default: 0.1,
        help: "fraction of the micro-batch dropped, highest loss first (0 <= q < 1)",
    },
    ParamSpec {
        name: "per_sample",
        default: 0.0,
        help: "0: drop tokens; 1: drop whole samples by mean loss",
    },
];

/// Token mode: weight 0 for the `floor(q * n)` highest losses (ties: later token dropped first; non-finite
/// losses count as highest), 1 otherwise.
pub fn drop_tokens(loss: &[f32], q: f64) -> Vec<f32> {
    let n = loss.len();
    let drop = ((q * n as f64).floor() as usize).min(n);
    let key = |i: usize| {
        let l = loss[i];
        if l.is_finite() { l } else { f32::INFINITY }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(b.cmp(&a)));
    let mut w = vec![1f32; n];
    for &i in order.iter().take(drop) {
        w[i] = 0.0;
    }
    w
}

/// Sample mode: weight 0 for every token of the `floor(q * S)` samples with the highest mean loss.
pub fn drop_samples(loss: &[f32], sample: &[u32], q: f64) -> Vec<f32> {
    let mut ids: Vec<u32> = sample.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let means: Vec<f32> = ids
        .iter()
        .map(|id| {
            let v: Vec<f32> = loss
                .iter()
                .zip(sample)
                .filter(|(_, s)| *s == id)
                .map(|(l, _)| *l)
                .collect();
            v.iter().sum::<f32>() / v.len() as f32
        })
        .collect();
    let keep = drop_tokens(&means, q);
    sample
        .iter()
        .map(|s| keep[ids.binary_search(s).unwrap_or(0)])
        .collect()
}

struct Truncation {
    q: f64,
    per_sample: bool,
}

impl TokenReweighter for Truncation {
    fn needs(&self) -> Needs {
        Needs {
            sample: self.per_sample,
            ..Needs::default()
        }
    }

    fn default_normalize(&self) -> Normalize {
        // The mean over the kept tokens.
        Normalize::Nonzero
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        let loss = tensor_to_vec(stats.loss.clone());
        let w = match (&stats.sample, self.per_sample) {
            (Some(s), true) => drop_samples(&loss, s, self.q),
            _ => drop_tokens(&loss, self.q),
        };
        tensor_from_slice(&w, &stats.loss.device())
    }
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    let (q, per_sample) = (p.get("q"), p.get("per_sample"));
    let bad = |param: &str, value: f64, reason: &str| PluginError::InvalidParam {
        plugin: NAME.into(),
        param: param.into(),
        value,
        reason: reason.into(),
    };
    if !(0.0..1.0).contains(&q) {
        return Err(bad(
            "q",
            q,
            "must be in [0, 1): the fraction dropped (e.g. 0.1)",
        ));
    }
    if per_sample != 0.0 && per_sample != 1.0 {
        return Err(bad(
            "per_sample",
            per_sample,
            "must be 0 (tokens) or 1 (samples)",
        ));
    }
    Ok(LossFn::Token(Box::new(Truncation {
        q,
        per_sample: per_sample == 1.0,
    })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "loss truncation: drop the highest-loss fraction q of each micro-batch (tokens or samples)",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "w = 0 for the floor(q * N) highest-loss tokens (or samples by mean loss) of the micro-batch, else 1",
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
        let loss = [0.5, 9.0, 2.0, 7.0, 1.0, 3.0, 0.1, 4.0, 5.0, 6.0];
        // q = 0.2 of 10 tokens: drop 2, the 9.0 and the 7.0
        assert_eq!(
            drop_tokens(&loss, 0.2),
            vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        );
        // floor(0.25 * 10) = 2 as well; q = 0 drops nothing; NaN counts as highest
        assert_eq!(drop_tokens(&loss, 0.25), drop_tokens(&loss, 0.2));
        assert_eq!(drop_tokens(&loss, 0.0), vec![1.0; 10]);
        assert_eq!(
            drop_tokens(&[1.0, f32::NAN, 2.0], 0.34),
            vec![1.0, 0.0, 1.0]
        );
        // samples: means 0 -> 1.5, 1 -> 6.0, 2 -> 0.5; q = 0.34 of 3 samples drops 1: sample 1
        let s = [0, 0, 1, 1, 2];
        assert_eq!(
            drop_samples(&[1.0, 2.0, 5.0, 7.0, 0.5], &s, 0.34),
            vec![1.0, 1.0, 0.0, 0.0, 1.0]
        );

        let d = Device::flex();
        let r = Registry::discover();
        let mut p = BTreeMap::new();
        p.insert("q".to_string(), 0.2);
        let (f, _) = r.build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        let w = tensor_to_vec(f.weights(&TokenStats::from_loss(tensor_from_slice(&loss, &d))));
        assert_eq!(w, drop_tokens(&loss, 0.2));
        p.insert("per_sample".to_string(), 1.0);
        let (f, _) = r.build(NAME, &p).unwrap();
        let LossFn::Token(f) = f else { unreachable!() };
        assert!(f.needs().sample);
        p.insert("q".to_string(), 1.0);
        assert!(r.build(NAME, &p).is_err());
    }
}
