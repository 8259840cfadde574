//! Plain cross-entropy: every supervised token has weight 1. The baseline every ablation compares against.

use ytrainer_core::burn::prelude::*;
use ytrainer_core::loss::{
    LossFn, LossPluginInfo, Normalize, Params, PluginError, PluginKind, TokenReweighter, TokenStats,
};

/// The registered plugin name.
pub const NAME: &str = "ce";

struct CrossEntropy;

impl TokenReweighter for CrossEntropy {
    fn default_normalize(&self) -> Normalize {
        Normalize::Tokens
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        // Non-finite losses are excluded by the trainer; here every token counts the same.
        stats.loss.ones_like()
    }
}

fn build(_: &Params) -> Result<LossFn, PluginError> {
    Ok(LossFn::Token(Box::new(CrossEntropy)))
}

inventory::submit! {
    LossPluginInfo {
        name: NAME,
        description: "plain token cross-entropy (every supervised token weighted 1)",
        kind: PluginKind::Token,
        params: &[],
        formula: "w = 1",
        build,
    }
}
