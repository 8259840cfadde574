//! NLIRG curve against its golden values (the table in docs/losses.md, `nlirg`), on plain numbers and on device
//! tensors in f32, plus the plugin contract (registration, parameter validation, normalisation default).

use std::collections::BTreeMap;

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, Normalize, PluginError, Registry, TokenStats, tensor_from_slice, tensor_to_vec,
};
use ytrainer_plugin_nlirg::{Curve, curve::EPS};

const GOLDEN: &[(f64, f64)] = &[
    (0.0, 0.115067),
    (0.5, 0.233259),
    (1.0, 0.415810),
    (1.2, 0.500000),
    (2.0, 0.795760),
    (3.0, 0.955212),
    (5.0, 0.768525),
    (6.6, 0.401313),
    (8.0, 0.141851),
    (10.0, 0.0218814),
    (15.0, 0.0),
    (20.0, 0.0),
];

/// Equal to 6 significant digits (the precision the spec quotes).
fn assert_sig6(got: f64, want: f64, l: f64) {
    if want == 0.0 {
        assert_eq!(got, 0.0, "w({l})");
    } else {
        let rel = ((got - want) / want).abs();
        assert!(rel < 5e-6, "w({l}) = {got}, want {want} (rel {rel:e})");
    }
}

#[test]
fn golden_values_host() {
    let c = Curve::default();
    for &(l, w) in GOLDEN {
        assert_sig6(c.weight(l), w, l);
    }
    // 1.2 is exactly a/2 plus eps
    assert_eq!(c.weight(1.2), 0.5 + EPS);
}

#[test]
fn golden_values_f32_tensor() {
    let device = Device::flex();
    let c = Curve::default();
    let ls: Vec<f32> = GOLDEN.iter().map(|(l, _)| *l as f32).collect();
    let w = tensor_to_vec(c.weights(tensor_from_slice(&ls, &device)));
    for (i, &(l, want)) in GOLDEN.iter().enumerate() {
        assert_sig6(w[i] as f64, want, l);
    }
}

#[test]
fn discontinuity_at_split_and_bound() {
    let c = Curve::default();
    assert_sig6(c.weight(3.0), 0.955212, 3.0);
    assert_sig6(c.weight(3.0 + 1e-12), 0.960834, 3.0);
    for i in 0..2000 {
        let l = i as f64 * 0.01;
        let w = c.weight(l);
        assert!((0.0..=1.0 + 1e-6).contains(&w), "w({l}) = {w}");
    }
    // zone borders quoted in blog posts: where the curve crosses 0.6 and 0.4
    assert!((c.weight(1.4385) - 0.6).abs() < 1e-4);
    assert!((c.weight(6.6055) - 0.4).abs() < 1e-4);
}

#[test]
fn non_finite_and_extreme_losses_never_give_nan() {
    let device = Device::flex();
    let c = Curve::default();
    let ls = [
        f32::NAN,
        f32::INFINITY,
        -0.0,
        1e30,
        14.999,
        15.0,
        88.0,
        1e-30,
    ];
    let w = tensor_to_vec(c.weights(tensor_from_slice(&ls, &device)));
    assert_eq!(w[0], 0.0);
    assert_eq!(w[1], 0.0);
    assert!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "{w:?}");
    assert_eq!(w[5], 0.0);
    assert!(w[4] > 0.0);
    // extreme steepness must not overflow either
    let steep = Curve {
        k: 1e6,
        slope: 1e6,
        ..Curve::default()
    };
    let w = tensor_to_vec(steep.weights(tensor_from_slice(&[0.0, 1.2, 3.0, 10.0], &device)));
    assert!(w.iter().all(|x| x.is_finite()), "{w:?}");
    assert_eq!(c.weight(f64::NAN), 0.0);
}

#[test]
fn registered_with_defaults_and_validation() {
    let r = Registry::discover();
    let info = r.get("nlirg").unwrap();
    let names: Vec<&str> = info.params.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "a", "x0", "k", "split", "center", "slope", "cutoff", "floor"
        ]
    );
    let (f, params) = r.build("nlirg", &BTreeMap::new()).unwrap();
    assert_eq!(params.get("center"), 6.2);
    let LossFn::Token(p) = f else {
        panic!("nlirg is a token plugin")
    };
    assert_eq!(p.default_normalize(), Normalize::Nonzero);
    let device = Device::flex();
    let stats = TokenStats::from_loss(tensor_from_slice(&[2.0, 8.0, 16.0], &device));
    let w = tensor_to_vec(p.weights(&stats));
    assert!(
        (w[0] as f64 - 0.795760).abs() < 1e-5
            && (w[1] as f64 - 0.141851).abs() < 1e-5
            && w[2] == 0.0
    );

    let mut bad = BTreeMap::new();
    bad.insert("xo".to_string(), 1.0);
    assert_eq!(
        r.build("nlirg", &bad).unwrap_err().to_string(),
        "loss plugin `nlirg` has no parameter `xo` (did you mean `x0`?); its parameters are: a, x0, k, split, center, slope, cutoff, floor"
    );
    let mut neg = BTreeMap::new();
    neg.insert("floor".to_string(), -1.0);
    assert_eq!(
        r.build("nlirg", &neg).unwrap_err(),
        PluginError::InvalidParam {
            plugin: "nlirg".into(),
            param: "floor".into(),
            value: -1.0,
            reason: "must be >= 0 (weights must not be negative)".into()
        }
    );
    assert_eq!(
        r.build("nlrig", &BTreeMap::new()).unwrap_err().to_string(),
        "unknown loss plugin `nlrig` (did you mean `nlirg`?); available: nlirg. An external plugin is \
         loaded from `--plugin-dir DIR`, the YTRAINER_PLUGIN_PATH environment variable (paths separated by \
         `:`) or `[loss] plugins = [\"path\"]` of the run config; `ytrainer plugins list` shows what was found"
    );
}

#[test]
fn custom_parameters_change_the_curve() {
    let r = Registry::discover();
    let mut p = BTreeMap::new();
    p.insert("cutoff".to_string(), 5.0);
    p.insert("a".to_string(), 2.0);
    let (f, _) = r.build("nlirg", &p).unwrap();
    let LossFn::Token(f) = f else { unreachable!() };
    let device = Device::flex();
    let w = tensor_to_vec(f.weights(&TokenStats::from_loss(tensor_from_slice(
        &[1.2, 6.0],
        &device,
    ))));
    assert!((w[0] - 1.0).abs() < 1e-6);
    assert_eq!(w[1], 0.0);
}
