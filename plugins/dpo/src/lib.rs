//! The DPO family as pairwise loss plugins. Each objective maps per-pair sequence log-probabilities of the policy
//! (with gradient) and of the reference (detached) to a per-pair loss; formulas follow the papers and TRL.
//!
//! Notation: `pc`, `pr` policy log-probs of the chosen / rejected completion, `rc`, `rr` the reference's,
//! `|c|`, `|r|` completion lengths in tokens, `m = (pc - rc) - (pr - rr)` the implicit-reward margin.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::burn::tensor::activation::{log_sigmoid, sigmoid};
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, PairStats, PairwiseObjective, ParamSpec, Params, PluginError,
    PluginKind,
};
use ytrainer_plugin_nlirg::Curve;

/// Which formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Sigmoid DPO (Rafailov et al. 2023) with optional label smoothing (cDPO / robust): `-(1-e) log s(b m) - e log s(-b m)`.
    Sigmoid { beta: f64, label_smoothing: f64 },
    /// IPO (Azar et al. 2023), length-averaged log-probs as TRL: `(m_avg - 1/(2b))^2`.
    Ipo { beta: f64 },
    /// Hinge (SLiC, Zhao et al. 2023): `relu(1 - b m)`.
    Hinge { beta: f64 },
    /// SimPO (Meng et al. 2024), no reference: `-log s(b (pc/|c| - pr/|r|) - gamma)`.
    Simpo { beta: f64, gamma: f64 },
    /// ORPO's odds-ratio term (Hong et al. 2024), no reference, on per-token mean log-probs `c = pc/|c|`,
    /// `r = pr/|r|`: `-b log s((c - r) - (log(1 - e^c) - log(1 - e^r)))`; its NLL term comes from
    /// [`PairwiseObjective::sft_weight`].
    Orpo { beta: f64 },
    /// KTO (Ethayarajh et al. 2024) on unpaired completions, as TRL: with `z = max(0, mean(pr - rr))` (detached)
    /// the KL estimate from the mismatched completions of the micro-batch, a desirable completion costs
    /// `lambda_d (1 - s(b ((pc - rc) - z)))`, an undesirable one `lambda_u (1 - s(b (z - (pc - rc))))`.
    Kto {
        beta: f64,
        desirable_weight: f64,
        undesirable_weight: f64,
    },
}

impl Objective {
    /// Per-pair losses `[P]`.
    pub fn loss(&self, s: &PairStats) -> Tensor<1> {
        let refs = || {
            let zero = s.policy_chosen.clone().detach().mul_scalar(0.0);
            (
                s.reference_chosen.clone().unwrap_or_else(|| zero.clone()),
                s.reference_rejected.clone().unwrap_or(zero),
            )
        };
        match *self {
            Objective::Sigmoid {
                beta,
                label_smoothing,
            } => {
                let (rc, rr) = refs();
                let z = s
                    .policy_chosen
                    .clone()
                    .sub(rc)
                    .sub(s.policy_rejected.clone().sub(rr))
                    .mul_scalar(beta);
                let pos = log_sigmoid(z.clone()).mul_scalar(-(1.0 - label_smoothing));
                if label_smoothing == 0.0 {
                    pos
                } else {
                    pos.sub(log_sigmoid(z.neg()).mul_scalar(label_smoothing))
                }
            }
            Objective::Ipo { beta } => {
                let (rc, rr) = refs();
                let m = s
                    .policy_chosen
                    .clone()
                    .sub(rc)
                    .div(s.chosen_len.clone())
                    .sub(
                        s.policy_rejected
                            .clone()
                            .sub(rr)
                            .div(s.rejected_len.clone()),
                    );
                m.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
            }
            Objective::Hinge { beta } => {
                let (rc, rr) = refs();
                let m = s
                    .policy_chosen
                    .clone()
                    .sub(rc)
                    .sub(s.policy_rejected.clone().sub(rr));
                m.mul_scalar(-beta).add_scalar(1.0).clamp_min(0.0)
            }
            Objective::Simpo { beta, gamma } => {
                let z = s
                    .policy_chosen
                    .clone()
                    .div(s.chosen_len.clone())
                    .sub(s.policy_rejected.clone().div(s.rejected_len.clone()))
                    .mul_scalar(beta)
                    .sub_scalar(gamma);
                log_sigmoid(z).neg()
            }
            Objective::Orpo { beta } => {
                let c = s.policy_chosen.clone().div(s.chosen_len.clone());
                let r = s.policy_rejected.clone().div(s.rejected_len.clone());
                // log(1 - e^x) for x < 0; the clamp only guards x = 0 (a probability-1 completion), where the odds
                // are infinite.
                let log1m = |x: Tensor<1>| x.exp().neg().add_scalar(1.0).clamp_min(1e-30).log();
                let log_odds = c.clone().sub(r.clone()).sub(log1m(c).sub(log1m(r)));
                log_sigmoid(log_odds).mul_scalar(-beta)
            }
            Objective::Kto {
                beta,
                desirable_weight,
                undesirable_weight,
            } => {
                let (rc, rr) = refs();
                let p = s.policy_chosen.dims()[0];
                let kl = s
                    .policy_rejected
                    .clone()
                    .sub(rr)
                    .mean()
                    .clamp_min(0.0)
                    .detach()
                    .expand([p]);
                let logratio = s.policy_chosen.clone().sub(rc);
                let sig = |z: Tensor<1>| sigmoid(z.mul_scalar(beta)).neg().add_scalar(1.0);
                let good = sig(logratio.clone().sub(kl.clone())).mul_scalar(desirable_weight);
                let bad = sig(kl.sub(logratio)).mul_scalar(undesirable_weight);
                // Preference pairs carry no labels: every "chosen" counts as desirable.
                let d = s
                    .desirable
                    .clone()
                    .unwrap_or_else(|| s.policy_chosen.clone().detach().ones_like());
                good.mul(d.clone()).add(bad.mul(d.neg().add_scalar(1.0)))
            }
        }
    }
}

struct Plain(Objective);

impl PairwiseObjective for Plain {
    fn needs_reference(&self) -> bool {
        !matches!(self.0, Objective::Simpo { .. } | Objective::Orpo { .. })
    }
    fn loss(&self, s: &PairStats) -> (Tensor<1>, Option<Tensor<1>>) {
        (self.0.loss(s), None)
    }
    fn unpaired(&self) -> bool {
        matches!(self.0, Objective::Kto { .. })
    }
    fn sft_weight(&self) -> f64 {
        // ORPO = NLL(chosen) + beta * odds-ratio term.
        if matches!(self.0, Objective::Orpo { .. }) {
            1.0
        } else {
            0.0
        }
    }
}

/// Sigmoid DPO whose pairs are weighted by the NLIRG curve of their own (detached) DPO loss: pairs the policy
/// already orders confidently (loss near 0) barely move it, uncertain pairs drive learning, and pairs it
/// strongly contradicts (loss >= cutoff, likely mislabelled) are dropped — NLIRG's idea moved to pair level.
struct CurveWeighted {
    objective: Objective,
    curve: Curve,
}

impl PairwiseObjective for CurveWeighted {
    fn needs_reference(&self) -> bool {
        true
    }
    fn loss(&self, s: &PairStats) -> (Tensor<1>, Option<Tensor<1>>) {
        let l = self.objective.loss(s);
        let w = self.curve.weights(l.clone().detach());
        (l, Some(w))
    }
}

fn bad(plugin: &str, param: &str, value: f64, reason: &str) -> PluginError {
    PluginError::InvalidParam {
        plugin: plugin.into(),
        param: param.into(),
        value,
        reason: reason.into(),
    }
}

fn beta(plugin: &str, p: &Params) -> Result<f64, PluginError> {
    let b = p.get("beta");
    if b <= 0.0 {
        return Err(bad(plugin, "beta", b, "must be > 0"));
    }
    Ok(b)
}

const BETA: ParamSpec = ParamSpec {
    name: "beta",
    default: 0.1,
    help: "inverse temperature of the implicit reward",
};

fn build_dpo(p: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Sigmoid {
        beta: beta("dpo", p)?,
        label_smoothing: 0.0,
    }))))
}

fn build_cdpo(p: &Params) -> Result<LossFn, PluginError> {
    let e = p.get("label_smoothing");
    if !(0.0..0.5).contains(&e) {
        return Err(bad(
            "cdpo",
            "label_smoothing",
            e,
            "must be in [0, 0.5): the assumed probability that a pair's label is flipped",
        ));
    }
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Sigmoid {
        beta: beta("cdpo", p)?,
        label_smoothing: e,
    }))))
}

fn build_ipo(p: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Ipo {
        beta: beta("ipo", p)?,
    }))))
}

fn build_hinge(p: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Hinge {
        beta: beta("hinge", p)?,
    }))))
}

fn build_simpo(p: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Simpo {
        beta: beta("simpo", p)?,
        gamma: p.get("gamma"),
    }))))
}

fn build_orpo(p: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Orpo {
        beta: beta("orpo", p)?,
    }))))
}

fn build_kto(p: &Params) -> Result<LossFn, PluginError> {
    let (d, u) = (p.get("desirable_weight"), p.get("undesirable_weight"));
    for (name, v) in [("desirable_weight", d), ("undesirable_weight", u)] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(bad(
                "kto",
                name,
                v,
                "must be a finite number > 0 (TRL's default 1; raise the weight of the rarer class)",
            ));
        }
    }
    Ok(LossFn::Pairwise(Box::new(Plain(Objective::Kto {
        beta: beta("kto", p)?,
        desirable_weight: d,
        undesirable_weight: u,
    }))))
}

fn build_dpo_nlirg(p: &Params) -> Result<LossFn, PluginError> {
    let curve = Curve {
        x0: p.get("x0"),
        k: p.get("k"),
        split: p.get("split"),
        center: p.get("center"),
        cutoff: p.get("cutoff"),
        ..Curve::default()
    };
    if curve.split > curve.cutoff {
        return Err(bad(
            "dpo-nlirg",
            "split",
            curve.split,
            "must not exceed `cutoff`",
        ));
    }
    Ok(LossFn::Pairwise(Box::new(CurveWeighted {
        objective: Objective::Sigmoid {
            beta: beta("dpo-nlirg", p)?,
            label_smoothing: 0.0,
        },
        curve,
    })))
}

inventory::submit! {
    LossPluginInfo { name: "dpo", description: "sigmoid DPO: -log s(beta * margin of implicit rewards)", kind: PluginKind::Pairwise, formula: "loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))", params: &[BETA], build: build_dpo }
}
inventory::submit! {
    LossPluginInfo {
        name: "cdpo",
        description: "conservative / robust DPO: sigmoid DPO with label smoothing for noisy preferences",
        kind: PluginKind::Pairwise, formula: "loss = -(1 - e) log sigmoid(beta m) - e log sigmoid(-beta m), m = (pc - rc) - (pr - rr), e = label_smoothing",
        params: &[BETA, ParamSpec { name: "label_smoothing", default: 0.1, help: "assumed probability that a label is flipped" }],
        build: build_cdpo,
    }
}
inventory::submit! {
    LossPluginInfo { name: "ipo", description: "IPO: squared distance of the length-averaged margin to 1/(2 beta)", kind: PluginKind::Pairwise, formula: "loss = ((pc - rc)/|c| - (pr - rr)/|r| - 1/(2 beta))^2", params: &[BETA], build: build_ipo }
}
inventory::submit! {
    LossPluginInfo { name: "hinge", description: "hinge (SLiC): relu(1 - beta * margin)", kind: PluginKind::Pairwise, formula: "loss = max(0, 1 - beta * ((pc - rc) - (pr - rr)))", params: &[BETA], build: build_hinge }
}
inventory::submit! {
    LossPluginInfo {
        name: "simpo",
        description: "SimPO: length-normalised log-prob margin with a target gap, no reference model",
        kind: PluginKind::Pairwise, formula: "loss = -log sigmoid(beta * (pc/|c| - pr/|r|) - gamma)",
        params: &[
            ParamSpec { name: "beta", default: 2.0, help: "scale of the length-normalised reward" },
            ParamSpec { name: "gamma", default: 1.0, help: "target reward gap" },
        ],
        build: build_simpo,
    }
}
inventory::submit! {
    LossPluginInfo {
        name: "kto",
        description: "KTO: unpaired desirable / undesirable completions (\"label\"), prospect-theoretic loss against a KL baseline",
        kind: PluginKind::Pairwise,
        formula: "z = max(0, mean(pKL - rKL)) (detached); desirable: lambda_d (1 - sigmoid(beta ((pc - rc) - z))); undesirable: lambda_u (1 - sigmoid(beta (z - (pc - rc))))",
        params: &[
            BETA,
            ParamSpec { name: "desirable_weight", default: 1.0, help: "lambda_d: weight of desirable completions' losses" },
            ParamSpec { name: "undesirable_weight", default: 1.0, help: "lambda_u: weight of undesirable completions' losses" },
        ],
        build: build_kto,
    }
}
inventory::submit! {
    LossPluginInfo {
        name: "orpo",
        description: "ORPO: NLL of the chosen completion plus beta * odds-ratio loss on mean log-probs, no reference model",
        kind: PluginKind::Pairwise,
        formula: "loss = NLL(chosen tokens) - beta log sigmoid((c - r) - (log(1 - e^c) - log(1 - e^r))), c = pc/|c|, r = pr/|r|",
        params: &[ParamSpec { name: "beta", default: 0.1, help: "weight of the odds-ratio term (the paper's lambda; TRL's beta)" }],
        build: build_orpo,
    }
}
inventory::submit! {
    LossPluginInfo {
        name: "dpo-nlirg",
        description: "sigmoid DPO with pairs weighted by the NLIRG curve of their own DPO loss (noisy pairs dropped)",
        kind: PluginKind::Pairwise, formula: "loss = w * -log sigmoid(beta m), w = nlirg_curve(-log sigmoid(beta m)) (detached)",
        params: &[
            BETA,
            ParamSpec { name: "x0", default: 1.2, help: "pair loss where the rising branch is at 1/2" },
            ParamSpec { name: "k", default: 1.7, help: "steepness of the rising branch" },
            ParamSpec { name: "split", default: 3.0, help: "pair loss where the curve starts falling" },
            ParamSpec { name: "center", default: 6.2, help: "pair loss where the falling branch is at 1/2" },
            ParamSpec { name: "cutoff", default: 15.0, help: "pairs with loss >= cutoff get weight 0" },
        ],
        build: build_dpo_nlirg,
    }
}
