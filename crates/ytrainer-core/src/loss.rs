//! The loss-plugin contract: what a plugin is given, what it returns, and how it is described.
//!
//! A plugin never sees the model: the trainer hands it detached per-token statistics and gets back detached
//! per-token weights, then forms `sum(w * ce) / normaliser` itself. Keeping the gradient path in the trainer is
//! what lets an external plugin (host slices through a C ABI) and a built-in (device tensors) share one contract.
//!
//! The plain types of the contract ([`Normalize`], [`Needs`], [`ParamSpec`], [`Params`]) are defined once, in the
//! dependency-free SDK crate `ytrainer-plugin`, and re-exported here, so built-in and external plugins speak one
//! vocabulary. The registry lives in [`crate::registry`] (re-exported here too); the loader of external plugins
//! in [`crate::external`].

use std::fmt;

use burn::prelude::*;
use serde::Serialize;

pub use crate::registry::{PluginSource, Registry, did_you_mean, nearest, resolve_params};
pub use ytrainer_plugin::{Needs, Normalize, ParamSpec, Params};

/// Whether a plugin weights individual tokens or scores preference pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Per-token weights over supervised tokens (SFT / continued pretraining).
    Token,
    /// Per-pair losses over sequence log-probabilities (DPO family).
    Pairwise,
}

/// Detached per-token statistics of the supervised tokens of one micro-batch, in target order.
#[derive(Debug, Clone)]
pub struct TokenStats {
    /// Cross-entropy of each target token, in nats, `[N]`.
    pub loss: Tensor<1>,
    /// Predictive entropy, `[N]`, present when the plugin declared [`Needs::entropy`].
    pub entropy: Option<Tensor<1>>,
    /// Normalised top-K entropy in [0, 1], `[N]`, present when [`Needs::top_k_entropy`] > 0.
    pub top_k_entropy: Option<Tensor<1>>,
    /// Reference-model cross-entropy, `[N]`, present when [`Needs::reference_loss`].
    pub reference_loss: Option<Tensor<1>>,
    /// Position id of each target, present when [`Needs::position`].
    pub position: Option<Vec<u32>>,
    /// Example index of each target, present when [`Needs::sample`].
    pub sample: Option<Vec<u32>>,
    /// Optimizer step being computed (0-based).
    pub step: usize,
    /// Training progress in `[0, 1]`.
    pub progress: f64,
}

impl TokenStats {
    /// Statistics with only the loss (step 0, progress 0): for tests and `ytrainer curve`.
    pub fn from_loss(loss: Tensor<1>) -> Self {
        TokenStats {
            loss,
            entropy: None,
            top_k_entropy: None,
            reference_loss: None,
            position: None,
            sample: None,
            step: 0,
            progress: 0.0,
        }
    }
}

/// A token-level reweighting strategy.
pub trait TokenReweighter: Send + Sync {
    /// What statistics [`TokenReweighter::weights`] reads besides the loss.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// The normalisation used when the config does not choose one.
    fn default_normalize(&self) -> Normalize;
    /// Per-token weights `[N]`, computed without gradient. Must be finite and non-negative.
    fn weights(&self, stats: &TokenStats) -> Tensor<1>;
    /// [`TokenReweighter::weights`] for plugins that can fail (external plugins: a panic or an error in the
    /// shared library). The message names the plugin. Built-ins need not override it.
    fn try_weights(&self, stats: &TokenStats) -> Result<Tensor<1>, String> {
        Ok(self.weights(stats))
    }
    /// The weight `beta` of a **KL anchor** the trainer adds at every supervised position:
    /// `sum_i w_i ce_i + beta * sum_i KL(p_ref(.|i) || p(.|i))`, the full-vocabulary KL from the reference model
    /// (the base with adapters disabled, or `[loss] reference_model`) to the policy, as ASFT does. A token weight
    /// cannot express it (its gradient with respect to the logits is `beta (p - p_ref)`, not a multiple of
    /// `p - onehot`), so the trainer computes it from the reference's log-probabilities; `0` (the default) adds
    /// nothing and costs nothing. Built-in plugins only (the C ABI has no field for it).
    fn kl_anchor(&self) -> f64 {
        0.0
    }
}

/// Sequence-level statistics of a batch of preference pairs (sums of target log-probabilities).
#[derive(Debug, Clone)]
pub struct PairStats {
    /// Policy log-probability of each chosen completion, `[P]` (with gradient).
    pub policy_chosen: Tensor<1>,
    /// Policy log-probability of each rejected completion, `[P]` (with gradient).
    pub policy_rejected: Tensor<1>,
    /// Reference-model log-probabilities (detached), when the objective uses a reference.
    pub reference_chosen: Option<Tensor<1>>,
    /// See `reference_chosen`.
    pub reference_rejected: Option<Tensor<1>>,
    /// Completion lengths in tokens, for length-normalised objectives.
    pub chosen_len: Tensor<1>,
    /// See `chosen_len`.
    pub rejected_len: Tensor<1>,
    /// Optimizer step (0-based).
    pub step: usize,
    /// Training progress in `[0, 1]`.
    pub progress: f64,
    /// KTO data: 1 where the "chosen" completion is desirable, 0 where it is undesirable (the "rejected" side is
    /// then the mismatched completion of KTO's KL estimate); `None` for preference pairs.
    pub desirable: Option<Tensor<1>>,
}

/// A pairwise (preference) objective.
pub trait PairwiseObjective: Send + Sync {
    /// Whether the trainer must provide reference log-probabilities.
    fn needs_reference(&self) -> bool;
    /// Per-pair losses `[P]` (with gradient) and optional detached pair weights.
    fn loss(&self, stats: &PairStats) -> (Tensor<1>, Option<Tensor<1>>);
    /// [`PairwiseObjective::loss`] for objectives that can fail (external plugins); the message names the plugin.
    fn try_loss(&self, stats: &PairStats) -> Result<(Tensor<1>, Option<Tensor<1>>), String> {
        Ok(self.loss(stats))
    }
    /// Weight of an NLL term on the chosen completions that is part of the objective itself (ORPO's `L_SFT`): the
    /// trainer adds it to `[preference] sft_weight`, and computes it as that term is, the mean NLL over the step's
    /// chosen tokens (TRL's `policy_nll_loss`). Default 0.
    fn sft_weight(&self) -> f64 {
        0.0
    }
    /// Whether the objective trains unpaired, labelled completions (KTO): the run then loads its data with
    /// `ytrainer_data::load_kto` and fills [`PairStats::desirable`].
    fn unpaired(&self) -> bool {
        false
    }
}

/// A constructed plugin instance.
pub enum LossFn {
    /// See [`TokenReweighter`].
    Token(Box<dyn TokenReweighter>),
    /// See [`PairwiseObjective`].
    Pairwise(Box<dyn PairwiseObjective>),
}

impl fmt::Debug for LossFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossFn::Token(_) => f.write_str("LossFn::Token"),
            LossFn::Pairwise(_) => f.write_str("LossFn::Pairwise"),
        }
    }
}

/// Errors from plugin lookup and construction.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PluginError {
    /// No plugin of that name.
    #[error(
        "unknown loss plugin `{name}`{hint}; available: {available}. An external plugin is loaded from \
         `--plugin-dir DIR`, the YTRAINER_PLUGIN_PATH environment variable (paths separated by `:`) or \
         `[loss] plugins = [\"path\"]` of the run config; `ytrainer plugins list` shows what was found"
    )]
    Unknown {
        /// Requested name.
        name: String,
        /// `; did you mean `x`?` or empty.
        hint: String,
        /// Comma-separated list of known plugins.
        available: String,
    },
    /// A parameter the plugin does not declare.
    #[error("loss plugin `{plugin}` has no parameter `{param}`{hint}; its parameters are: {known}")]
    UnknownParam {
        /// Plugin name.
        plugin: String,
        /// Offending key.
        param: String,
        /// Suggestion or empty.
        hint: String,
        /// Declared parameters.
        known: String,
    },
    /// A value the plugin rejects.
    #[error("loss plugin `{plugin}`: parameter `{param}` = {value}: {reason}")]
    InvalidParam {
        /// Plugin name.
        plugin: String,
        /// Parameter.
        param: String,
        /// Value given.
        value: f64,
        /// Why it is rejected and what is allowed.
        reason: String,
    },
    /// A plugin's constructor rejected its parameters (external plugins report free text).
    #[error("loss plugin `{plugin}` rejected its parameters: {reason}")]
    Rejected {
        /// Plugin name.
        plugin: String,
        /// The plugin's message.
        reason: String,
    },
    /// An external plugin library could not be loaded.
    #[error("loss plugin library {path}: {reason}")]
    Load {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Two plugins with one name.
    #[error(
        "two loss plugins are named `{name}`: {first} and {second}; plugin names must be unique (rename one, or remove the library from --plugin-dir / YTRAINER_PLUGIN_PATH / [loss] plugins)"
    )]
    Clash {
        /// The name.
        name: String,
        /// Where the first came from.
        first: String,
        /// Where the second came from.
        second: String,
    },
}

/// A plugin as the registry knows it: metadata plus a constructor.
#[derive(Debug, Clone, Copy)]
pub struct LossPluginInfo {
    /// Unique name, used by `--loss NAME`.
    pub name: &'static str,
    /// One line for `ytrainer plugins list`.
    pub description: &'static str,
    /// Token or pairwise.
    pub kind: PluginKind,
    /// Declared parameters with defaults.
    pub params: &'static [ParamSpec],
    /// The weighting formula for `ytrainer plugins describe` (may be empty).
    pub formula: &'static str,
    /// Builds an instance from validated parameters; may reject values with [`PluginError::InvalidParam`].
    pub build: fn(&Params) -> Result<LossFn, PluginError>,
}

/// Builds a `[N]` tensor from host values on `device` (for tests, `ytrainer curve` and external plugins).
pub fn tensor_from_slice(values: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// Reads a `[N]` tensor back to the host as f32.
pub fn tensor_to_vec(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}
