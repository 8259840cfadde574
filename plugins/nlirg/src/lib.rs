//! NLIRG (non-linear learning-intensity regulation): each supervised token's cross-entropy is re-weighted by a
//! smooth curve of its own (detached) loss. The curve is in [`curve`]; this file registers it as a plugin.

pub mod curve;

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, ParamSpec, Params, PluginError, PluginKind, TokenReweighter,
    TokenStats,
};

pub use curve::Curve;

/// The registered plugin name.
pub const NAME: &str = "nlirg";

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "a",
        default: 1.0,
        help: "height of the curve (maximum weight)",
    },
    ParamSpec {
        name: "x0",
        default: 1.2,
        help: "loss where the rising branch is at a/2",
    },
    ParamSpec {
        name: "k",
        default: 1.7,
        help: "steepness of the rising branch",
    },
    ParamSpec {
        name: "split",
        default: 3.0,
        help: "loss where the rising branch hands over to the falling one",
    },
    ParamSpec {
        name: "center",
        default: 6.2,
        help: "loss where the falling branch is at a/2",
    },
    ParamSpec {
        name: "slope",
        default: 1.0,
        help: "steepness of the falling branch",
    },
    ParamSpec {
        name: "cutoff",
        default: 15.0,
        help: "losses at or above this are noise: weight 0",
    },
    ParamSpec {
        name: "floor",
        default: 5e-8,
        help: "constant added on the falling branch",
    },
];

struct Nlirg {
    curve: Curve,
}

impl TokenReweighter for Nlirg {
    fn default_normalize(&self) -> Normalize {
        Normalize::Nonzero
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        self.curve.weights(stats.loss.clone())
    }
}

/// Builds the curve from validated parameters, rejecting shapes that would make weights negative or
/// meaningless.
pub fn curve_from_params(p: &Params) -> Result<Curve, PluginError> {
    let c = Curve {
        a: p.get("a"),
        x0: p.get("x0"),
        k: p.get("k"),
        split: p.get("split"),
        center: p.get("center"),
        slope: p.get("slope"),
        cutoff: p.get("cutoff"),
        floor: p.get("floor"),
    };
    let bad = |param: &str, value: f64, reason: &str| PluginError::InvalidParam {
        plugin: NAME.to_string(),
        param: param.to_string(),
        value,
        reason: reason.to_string(),
    };
    if c.a <= 0.0 {
        return Err(bad("a", c.a, "must be > 0 (it is the maximum weight)"));
    }
    if c.floor < 0.0 {
        return Err(bad(
            "floor",
            c.floor,
            "must be >= 0 (weights must not be negative)",
        ));
    }
    if c.cutoff <= 0.0 {
        return Err(bad(
            "cutoff",
            c.cutoff,
            "must be > 0 (losses are non-negative)",
        ));
    }
    if c.split > c.cutoff {
        return Err(bad("split", c.split, "must not exceed `cutoff`"));
    }
    Ok(c)
}

fn build(p: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Token(Box::new(Nlirg {
        curve: curve_from_params(p)?,
    })))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "NLIRG: weight each token by a rise-then-fall curve of its own loss; drop noise (loss >= cutoff)",
        kind: PluginKind::Token,
        params: PARAMS,
        formula: "ce <= split: w = a*sigmoid(k*(ce - x0)) + eps;  split < ce < cutoff: w = a*sigmoid(slope*(center - ce)) + eps + floor;  ce >= cutoff: w = 0",
        build,
    }
}
