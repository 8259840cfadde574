//! The loss-plugin contract and the registry that discovers plugins at startup.
//!
//! A plugin never sees the model: the trainer hands it detached per-token statistics and gets back detached
//! per-token weights, then forms `sum(w * ce) / normaliser` itself. Keeping the gradient path in the trainer is
//! what lets an external plugin (host slices through a C ABI) and a built-in (device tensors) share one contract.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// How the weighted token losses of one optimizer step are normalised (see the NLIRG spec, §2).
///
/// The denominator is always computed over the whole accumulated step, never per micro-batch: HF Trainer's
/// per-micro-batch averaging made the loss depend on how a step was split, which is a bug, not a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Divide by the number of tokens with `w * l != 0` (the reference NLIRG SFT behaviour): a step of easy
    /// tokens yields a proportionally smaller gradient.
    Nonzero,
    /// Divide by all supervised tokens of the step (TRL / HF `num_items_in_batch`).
    Tokens,
    /// Divide by the sum of the weights (a weighted mean).
    Weights,
}

impl Normalize {
    /// The denominator for a step given its accumulated counters. Never zero: an empty step divides by one.
    pub fn denominator(self, tokens: f64, nonzero: f64, weight_sum: f64) -> f64 {
        let d = match self {
            Normalize::Nonzero => nonzero,
            Normalize::Tokens => tokens,
            Normalize::Weights => weight_sum,
        };
        if d > 0.0 && d.is_finite() { d } else { 1.0 }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Normalize::Nonzero => "nonzero",
            Normalize::Tokens => "tokens",
            Normalize::Weights => "weights",
        }
    }
}

/// Whether a plugin weights individual tokens or scores preference pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Per-token weights over supervised tokens (SFT / continued pretraining).
    Token,
    /// Per-pair losses over sequence log-probabilities (DPO family).
    Pairwise,
}

/// One numeric parameter a plugin accepts, with its default.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ParamSpec {
    /// Config key under `[loss.params]`.
    pub name: &'static str,
    /// Value used when the config does not set it.
    pub default: f64,
    /// One line for `ytrainer plugins list`.
    pub help: &'static str,
}

/// Statistics a token plugin may ask the trainer for; the trainer computes only what some plugin needs,
/// because entropy costs a full pass over the vocabulary and reference losses a second forward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// Predictive entropy of the distribution that predicts each target.
    pub entropy: bool,
    /// Entropy of the renormalised top-K distribution divided by `ln K` (in [0, 1]); `0` = not needed.
    pub top_k_entropy: usize,
    /// Cross-entropy of each target under the reference model (LoRA: the base model with adapters disabled).
    pub reference_loss: bool,
    /// Position id of each target in its row.
    pub position: bool,
    /// Index of the example each target belongs to.
    pub sample: bool,
}

impl Needs {
    /// Human-readable list for `ytrainer plugins describe` (`loss` is always provided).
    pub fn describe(&self) -> String {
        let mut v = vec!["loss".to_string()];
        if self.entropy {
            v.push("entropy".into());
        }
        if self.top_k_entropy > 0 {
            v.push(format!("top-{} entropy", self.top_k_entropy));
        }
        if self.reference_loss {
            v.push("reference-model loss".into());
        }
        if self.position {
            v.push("position".into());
        }
        if self.sample {
            v.push("sample id".into());
        }
        v.push("step".into());
        v.push("progress".into());
        v.join(", ")
    }
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

/// Validated plugin parameters: every declared parameter present, nothing undeclared.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Params(BTreeMap<String, f64>);

impl Params {
    /// The value of a declared parameter.
    ///
    /// # Panics
    /// Only on a programming error: asking for a name the plugin did not declare in its [`ParamSpec`]s.
    pub fn get(&self, name: &str) -> f64 {
        match self.0.get(name) {
            Some(v) => *v,
            None => panic!("loss plugin asked for undeclared parameter `{name}`"),
        }
    }

    /// All values, by name.
    pub fn values(&self) -> &BTreeMap<String, f64> {
        &self.0
    }
}

/// Errors from plugin lookup and construction.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PluginError {
    /// No plugin of that name.
    #[error("unknown loss plugin `{name}`{hint}; available: {available}")]
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

inventory::collect!(LossPluginInfo);

/// Where a registered plugin came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "lowercase")]
pub enum PluginSource {
    /// Compiled into the binary and registered through `inventory`.
    Builtin,
    /// Loaded from a shared library (the path it was loaded from).
    External(PathBuf),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Builtin => f.write_str("built-in"),
            PluginSource::External(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Clone)]
struct Entry {
    info: LossPluginInfo,
    source: PluginSource,
    external: Option<Arc<crate::external::ExternalLib>>,
}

/// The plugins discovered at startup: built-ins and external libraries in one namespace.
#[derive(Clone)]
pub struct Registry {
    plugins: Vec<Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.plugins.iter().map(|e| (e.info.name, &e.source)))
            .finish()
    }
}

impl Registry {
    /// Collects every built-in plugin linked into this binary.
    pub fn discover() -> Self {
        let mut plugins: Vec<_> = inventory::iter::<LossPluginInfo>
            .into_iter()
            .map(|p| Entry {
                info: *p,
                source: PluginSource::Builtin,
                external: None,
            })
            .collect();
        plugins.sort_by_key(|e| e.info.name);
        Registry { plugins }
    }

    /// The built-ins plus external plugins from `paths`: each a shared library, or a directory whose
    /// `*.so` / `*.dylib` / `*.dll` files are all loaded (in name order). A path given twice is loaded once;
    /// a name defined twice is a [`PluginError::Clash`] naming both sources.
    pub fn discover_with(paths: &[PathBuf]) -> Result<Self, PluginError> {
        let mut r = Registry::discover();
        for file in crate::external::library_files(paths)? {
            let (info, lib) = crate::external::load(&file)?;
            r.add(Entry {
                info,
                source: PluginSource::External(file),
                external: Some(lib),
            })?;
        }
        Ok(r)
    }

    fn add(&mut self, e: Entry) -> Result<(), PluginError> {
        if let Some(old) = self.plugins.iter().find(|o| o.info.name == e.info.name) {
            return Err(PluginError::Clash {
                name: e.info.name.to_string(),
                first: old.source.to_string(),
                second: e.source.to_string(),
            });
        }
        self.plugins.push(e);
        self.plugins.sort_by_key(|e| e.info.name);
        Ok(())
    }

    /// All plugins, sorted by name.
    pub fn plugins(&self) -> impl Iterator<Item = (&LossPluginInfo, &PluginSource)> {
        self.plugins.iter().map(|e| (&e.info, &e.source))
    }

    fn entry(&self, name: &str) -> Result<&Entry, PluginError> {
        self.plugins
            .iter()
            .find(|e| e.info.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.plugins.iter().map(|e| e.info.name).collect();
                PluginError::Unknown {
                    name: name.to_string(),
                    hint: did_you_mean(name, &names),
                    available: names.join(", "),
                }
            })
    }

    /// Looks a plugin up by name.
    pub fn get(&self, name: &str) -> Result<&LossPluginInfo, PluginError> {
        self.entry(name).map(|e| &e.info)
    }

    /// Where a plugin came from.
    pub fn source(&self, name: &str) -> Result<&PluginSource, PluginError> {
        self.entry(name).map(|e| &e.source)
    }

    /// Validates `given` against the plugin's declared parameters (filling defaults) and builds it.
    pub fn build(
        &self,
        name: &str,
        given: &BTreeMap<String, f64>,
    ) -> Result<(LossFn, Params), PluginError> {
        let e = self.entry(name)?;
        let params = resolve_params(&e.info, given)?;
        let f = match &e.external {
            Some(lib) => crate::external::instantiate(lib, &params)?,
            None => (e.info.build)(&params)?,
        };
        Ok((f, params))
    }
}

/// Fills defaults and rejects undeclared keys.
pub fn resolve_params(
    info: &LossPluginInfo,
    given: &BTreeMap<String, f64>,
) -> Result<Params, PluginError> {
    let names: Vec<&str> = info.params.iter().map(|p| p.name).collect();
    for (k, v) in given {
        if !names.contains(&k.as_str()) {
            return Err(PluginError::UnknownParam {
                plugin: info.name.to_string(),
                param: k.clone(),
                hint: did_you_mean(k, &names),
                known: if names.is_empty() {
                    "(none)".to_string()
                } else {
                    names.join(", ")
                },
            });
        }
        if !v.is_finite() {
            return Err(PluginError::InvalidParam {
                plugin: info.name.to_string(),
                param: k.clone(),
                value: *v,
                reason: "must be a finite number".to_string(),
            });
        }
    }
    let map = info
        .params
        .iter()
        .map(|p| {
            (
                p.name.to_string(),
                given.get(p.name).copied().unwrap_or(p.default),
            )
        })
        .collect();
    Ok(Params(map))
}

/// ` (did you mean `x`?)` for the closest candidate, else empty.
pub fn did_you_mean(given: &str, candidates: &[&str]) -> String {
    nearest(given, candidates)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// The closest candidate: smallest edit distance, accepted when it is at most a third of the name's length
/// (at least 1), or when the names are very similar by Jaro-Winkler (long names with a few typos).
pub fn nearest<'a>(given: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| {
            (
                strsim::levenshtein(given, c),
                strsim::jaro_winkler(given, c),
                *c,
            )
        })
        .filter(|(d, jw, c)| *d <= (c.len().max(given.len()) / 3).max(1) || *jw >= 0.9)
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
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
