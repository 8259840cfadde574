//! An external **pairwise** ytrainer plugin: DPO with a target margin `gamma` (as in SimPO's margin term, here on
//! the reference-relative DPO margin). With `gamma = 0` it is exactly DPO (Rafailov et al. 2023), which the
//! integration tests use to check it against the built-in `dpo`.
//!
//! For each pair, with `m = (pc - rc) - (pr - rr)` (policy and reference log-probabilities of the chosen and
//! rejected completions) and `z = beta * (m - gamma)`:
//!
//! ```text
//! loss       = -log sigmoid(z) = softplus(-z)
//! d/d pc     = -beta * sigmoid(-z)
//! d/d pr     = +beta * sigmoid(-z)
//! ```
//!
//! The host turns the derivatives into gradients through the policy; the plugin never sees a tensor.

use ytrainer_plugin::{PairBatch, PairOut, PairPlugin, Param, Params, export_pair_plugin};

struct MarginDpo {
    beta: f64,
    gamma: f64,
}

/// `log(1 + e^x)` without overflow.
fn softplus(x: f64) -> f64 {
    if x > 30.0 { x } else { x.exp().ln_1p() }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl PairPlugin for MarginDpo {
    const NAME: &'static str = "margin-dpo";
    const DESCRIPTION: &'static str = "DPO with a target margin: -log sigmoid(beta * (m - gamma))";
    const FORMULA: &'static str = "loss = -log sigmoid(beta * (((pc - rc) - (pr - rr)) - gamma))";
    const PARAMS: &'static [Param] = &[
        Param::new("beta", 0.1, "inverse temperature (DPO's beta)"),
        Param::new("gamma", 0.0, "target margin in nats; 0 = plain DPO"),
    ];
    const NEEDS_REFERENCE: bool = true;

    fn new(p: &Params) -> Result<Self, String> {
        let beta = p.get("beta");
        if beta <= 0.0 || !beta.is_finite() {
            return Err(format!("`beta` = {beta}: must be a positive number"));
        }
        Ok(MarginDpo {
            beta,
            gamma: p.get("gamma"),
        })
    }

    fn loss(&self, b: &PairBatch<'_>, out: PairOut<'_>) {
        let (rc, rr) = (b.reference_chosen, b.reference_rejected);
        for i in 0..b.len() {
            let (ref_c, ref_r) = match (rc, rr) {
                (Some(c), Some(r)) => (c[i] as f64, r[i] as f64),
                _ => (0.0, 0.0),
            };
            let m = (b.policy_chosen[i] as f64 - ref_c) - (b.policy_rejected[i] as f64 - ref_r);
            let z = self.beta * (m - self.gamma);
            let s = sigmoid(-z);
            out.loss[i] = softplus(-z) as f32;
            out.d_chosen[i] = (-self.beta * s) as f32;
            out.d_rejected[i] = (self.beta * s) as f32;
        }
    }
}

export_pair_plugin!(MarginDpo);
