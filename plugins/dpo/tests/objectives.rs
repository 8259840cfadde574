//! Each objective against hand-computed values for fixed log-probabilities (formulas written next to the values).

use std::collections::BTreeMap;

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{LossFn, PairStats, Registry, tensor_from_slice, tensor_to_vec};
use ytrainer_plugin_dpo as _;

fn stats(d: &Device) -> PairStats {
    // Two pairs. Pair 0: pc=-10, pr=-12, rc=-11, rr=-11  => margin m = (1) - (-1) = 2
    //            Pair 1: pc=-20, pr=-15, rc=-18, rr=-16  => margin m = (-2) - (1) = -3
    PairStats {
        policy_chosen: tensor_from_slice(&[-10.0, -20.0], d),
        policy_rejected: tensor_from_slice(&[-12.0, -15.0], d),
        reference_chosen: Some(tensor_from_slice(&[-11.0, -18.0], d)),
        reference_rejected: Some(tensor_from_slice(&[-11.0, -16.0], d)),
        chosen_len: tensor_from_slice(&[4.0, 5.0], d),
        rejected_len: tensor_from_slice(&[2.0, 5.0], d),
        step: 0,
        progress: 0.0,
        desirable: None,
    }
}

fn run(name: &str, params: &[(&str, f64)]) -> (Vec<f32>, Option<Vec<f32>>) {
    let d = Device::flex();
    let p: BTreeMap<String, f64> = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let (f, _) = Registry::discover().build(name, &p).unwrap();
    let LossFn::Pairwise(o) = f else {
        panic!("{name} is pairwise")
    };
    let (l, w) = o.loss(&stats(&d));
    (tensor_to_vec(l), w.map(tensor_to_vec))
}

fn softplus(x: f64) -> f64 {
    // -log sigmoid(-x)
    (1.0 + x.exp()).ln()
}

fn close(got: &[f32], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

#[test]
fn dpo_sigmoid() {
    // loss = -log s(beta m) = softplus(-beta m); beta = 0.1: m=2 -> softplus(-0.2), m=-3 -> softplus(0.3)
    close(&run("dpo", &[]).0, &[softplus(-0.2), softplus(0.3)]);
    close(
        &run("dpo", &[("beta", 0.5)]).0,
        &[softplus(-1.0), softplus(1.5)],
    );
}

#[test]
fn cdpo_label_smoothing() {
    // loss = (1-e) softplus(-beta m) + e softplus(beta m), e = 0.1
    let e = 0.1;
    close(
        &run("cdpo", &[]).0,
        &[
            (1.0 - e) * softplus(-0.2) + e * softplus(0.2),
            (1.0 - e) * softplus(0.3) + e * softplus(-0.3),
        ],
    );
}

#[test]
fn ipo_length_averaged() {
    // m_avg = (pc-rc)/|c| - (pr-rr)/|r|: pair 0: 1/4 - (-1)/2 = 0.75; pair 1: -2/5 - 1/5 = -0.6
    // loss = (m_avg - 1/(2 beta))^2, beta 0.1 -> target 5
    close(
        &run("ipo", &[]).0,
        &[(0.75f64 - 5.0).powi(2), (-0.6f64 - 5.0).powi(2)],
    );
}

#[test]
fn hinge() {
    // relu(1 - beta m): beta=0.1 -> 1-0.2 = 0.8, 1+0.3 = 1.3; beta=1 -> relu(-1) = 0, 4
    close(&run("hinge", &[]).0, &[0.8, 1.3]);
    close(&run("hinge", &[("beta", 1.0)]).0, &[0.0, 4.0]);
}

#[test]
fn simpo_no_reference() {
    // z = beta (pc/|c| - pr/|r|) - gamma; pair 0: 2*(-2.5 + 6) - 1 = 6; pair 1: 2*(-4 + 3) - 1 = -3
    close(&run("simpo", &[]).0, &[softplus(-6.0), softplus(3.0)]);
}

#[test]
fn orpo_odds_ratio_against_trl_formula() {
    // TRL's odds_ratio_loss on mean log-probs: log_odds = (c - r) - (log1p(-e^c) - log1p(-e^r)),
    // loss = -beta logsigmoid(log_odds) = beta softplus(-log_odds).
    // pair 0: c = -10/4 = -2.5, r = -12/2 = -6: (3.5) - (log(1 - e^-2.5) - log(1 - e^-6)) = 3.583168654
    // pair 1: c = -20/5 = -4, r = -15/5 = -3: (-1) - (log(1 - e^-4) - log(1 - e^-3)) = -1.032583734
    let lo = |c: f64, r: f64| (c - r) - ((-(c.exp())).ln_1p() - (-(r.exp())).ln_1p());
    assert!((lo(-2.5, -6.0) - 3.583_168_654).abs() < 1e-8);
    assert!((lo(-4.0, -3.0) + 1.032_583_734).abs() < 1e-8);
    close(
        &run("orpo", &[]).0,
        &[
            0.1 * softplus(-3.583_168_654),
            0.1 * softplus(1.032_583_734),
        ],
    );
    close(
        &run("orpo", &[("beta", 0.5)]).0,
        &[0.013_704_221, 0.668_593_076],
    );
    // Reference-free, and its NLL term (weight 1) is the trainer's SFT term on the chosen tokens.
    let (f, _) = Registry::discover()
        .build("orpo", &BTreeMap::new())
        .unwrap();
    let LossFn::Pairwise(o) = f else {
        panic!("orpo is pairwise")
    };
    assert!(!o.needs_reference());
    assert_eq!(o.sft_weight(), 1.0);
}

#[test]
fn kto_against_trl_formula() {
    // TRL's kto_loss: z = clamp(mean(pKL - rKL), min=0) detached; desirable: 1 - sigmoid(beta (logratio - z)),
    // undesirable: 1 - sigmoid(beta (z - logratio)); each times its class weight.
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let kto = |rr: [f32; 2], params: &[(&str, f64)]| {
        let d = Device::flex();
        let mut s = stats(&d);
        // pair 0 desirable, pair 1 undesirable; logratios pc - rc = [1, -2]
        s.desirable = Some(tensor_from_slice(&[1.0, 0.0], &d));
        s.reference_rejected = Some(tensor_from_slice(&rr, &d));
        let p: BTreeMap<String, f64> = params.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let (f, _) = Registry::discover().build("kto", &p).unwrap();
        let LossFn::Pairwise(o) = f else {
            panic!("kto is pairwise")
        };
        assert!(o.unpaired() && o.needs_reference());
        tensor_to_vec(o.loss(&s).0)
    };
    // rr = [-13, -17]: pKL - rKL = [-12 + 13, -15 + 17] = [1, 2], mean 1.5 = z
    close(
        &kto([-13.0, -17.0], &[]),
        &[1.0 - sig(0.1 * (1.0 - 1.5)), 1.0 - sig(0.1 * (1.5 + 2.0))],
    );
    // a negative mean is clamped to 0: rr = [-11, -16] gives [-1, 1], mean 0; rr = [-5, -16]: [-7, 1] -> 0
    close(
        &kto([-5.0, -16.0], &[("beta", 0.5)]),
        &[1.0 - sig(0.5), 1.0 - sig(1.0)],
    );
    // class weights
    close(
        &kto(
            [-13.0, -17.0],
            &[("desirable_weight", 2.0), ("undesirable_weight", 0.5)],
        ),
        &[
            2.0 * (1.0 - sig(0.1 * (1.0 - 1.5))),
            0.5 * (1.0 - sig(0.1 * (1.5 + 2.0))),
        ],
    );
}

#[test]
fn dpo_nlirg_weights_pairs_by_their_loss() {
    let (l, w) = run("dpo-nlirg", &[]);
    close(&l, &[softplus(-0.2), softplus(0.3)]);
    let c = ytrainer_plugin_nlirg::Curve::default();
    close(
        &w.unwrap(),
        &[c.weight(softplus(-0.2)), c.weight(softplus(0.3))],
    );
}

#[test]
fn bad_parameters() {
    let r = Registry::discover();
    let mut p = BTreeMap::new();
    p.insert("beta".to_string(), 0.0);
    assert_eq!(
        r.build("dpo", &p).unwrap_err().to_string(),
        "loss plugin `dpo`: parameter `beta` = 0: must be > 0"
    );
    let mut p = BTreeMap::new();
    p.insert("label_smoothing".to_string(), 0.7);
    assert!(
        r.build("cdpo", &p)
            .unwrap_err()
            .to_string()
            .contains("must be in [0, 0.5)")
    );
}
