//! The loss contract's plain vocabulary, defined once here for external plugins and the engine alike (the
//! engine re-exports them from `ytrainer_core::loss`): parameter declarations and values, the normalisation of a
//! step, and which optional statistics a plugin reads.

use std::collections::BTreeMap;

use crate::needs_bits;

/// A parameter declaration: its config key, default and one line of help. The SDK's [`Param`] and the engine's
/// `ytrainer_core::loss::ParamSpec` are this one type.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ParamSpec {
    /// Config key under `[loss.params]`.
    pub name: &'static str,
    /// Value used when the config does not set it.
    pub default: f64,
    /// One line for `ytrainer plugins list`.
    pub help: &'static str,
}

/// The SDK's name for [`ParamSpec`].
pub type Param = ParamSpec;

impl ParamSpec {
    /// Declares a parameter.
    pub const fn new(name: &'static str, default: f64, help: &'static str) -> Self {
        ParamSpec {
            name,
            default,
            help,
        }
    }
}

/// How the weighted token losses of one optimizer step are normalised (docs/losses.md, "Normalisation"); a
/// plugin's default, used unless the user sets `[loss] normalize`.
///
/// The denominator is always computed over the whole accumulated step, never per micro-batch: HF Trainer's
/// per-micro-batch averaging made the loss depend on how a step was split, which is a bug, not a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
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

    /// The value of [`RawVTable::normalize`].
    pub const fn to_raw(self) -> u32 {
        match self {
            Normalize::Nonzero => 0,
            Normalize::Tokens => 1,
            Normalize::Weights => 2,
        }
    }

    /// From [`RawVTable::normalize`]; an unknown value means [`Normalize::Tokens`].
    pub const fn from_raw(v: u32) -> Normalize {
        match v {
            0 => Normalize::Nonzero,
            2 => Normalize::Weights,
            _ => Normalize::Tokens,
        }
    }
}

/// Statistics a token plugin may ask the host for besides the loss, step and progress. The host computes only
/// what the plugin asks for, because entropy costs a full pass over the vocabulary and reference losses a second
/// forward pass. Write it as `Needs { entropy: true, ..Needs::NONE }`, so that fields added later keep it
/// compiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Needs {
    /// Predictive entropy of the distribution that predicts each target ([`Batch::entropy`]).
    pub entropy: bool,
    /// Entropy of the renormalised top-K distribution divided by `ln K` (in [0, 1]); `0` = not needed, else
    /// at least 2 ([`Batch::top_k_entropy`]; external plugins: ABI version 3).
    pub top_k_entropy: usize,
    /// Cross-entropy of each target under the reference model (LoRA: the base model with adapters disabled;
    /// [`Batch::reference_loss`]).
    pub reference_loss: bool,
    /// Position id of each target in its row ([`Batch::position`]).
    pub position: bool,
    /// Index of the example each target belongs to ([`Batch::sample`]).
    pub sample: bool,
}

impl Needs {
    /// Nothing beyond the loss, step and progress.
    pub const NONE: Needs = Needs {
        entropy: false,
        top_k_entropy: 0,
        reference_loss: false,
        position: false,
        sample: false,
    };

    /// As [`needs_bits`] (`k` of the top-k entropy goes separately, in [`RawVTable::top_k_entropy`]).
    pub const fn bits(self) -> u32 {
        ((self.entropy as u32) * needs_bits::ENTROPY)
            | ((self.position as u32) * needs_bits::POSITION)
            | ((self.sample as u32) * needs_bits::SAMPLE)
            | ((self.reference_loss as u32) * needs_bits::REFERENCE_LOSS)
            | ((self.top_k_entropy > 0) as u32 * needs_bits::TOP_K_ENTROPY)
    }

    /// From [`needs_bits`] and the `k` of the top-k entropy (read only when its bit is set).
    pub const fn from_raw(b: u32, top_k_entropy: u32) -> Needs {
        Needs {
            entropy: b & needs_bits::ENTROPY != 0,
            top_k_entropy: if b & needs_bits::TOP_K_ENTROPY != 0 {
                top_k_entropy as usize
            } else {
                0
            },
            reference_loss: b & needs_bits::REFERENCE_LOSS != 0,
            position: b & needs_bits::POSITION != 0,
            sample: b & needs_bits::SAMPLE != 0,
        }
    }

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

/// Validated plugin parameters as a plugin's constructor receives them: every declared parameter present
/// (defaults filled in by the host), nothing undeclared, by name.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Params(BTreeMap<String, f64>);

impl Params {
    /// The value of a declared parameter.
    ///
    /// # Panics
    /// Only on a programming error: asking for a name the plugin did not declare (an external plugin's panic is
    /// caught at the boundary and reported).
    pub fn get(&self, name: &str) -> f64 {
        self.try_get(name)
            .unwrap_or_else(|| panic!("loss plugin asked for undeclared parameter `{name}`"))
    }

    /// The value, if present.
    pub fn try_get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    /// All values, by name.
    pub fn values(&self) -> &BTreeMap<String, f64> {
        &self.0
    }

    /// All values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Parameters from already validated values (the host's registry does the validating).
    pub fn from_map(values: BTreeMap<String, f64>) -> Params {
        Params(values)
    }

    /// Parses the flat JSON object of numbers the host sends (`{"a":1.0,"b":-2e-3}`).
    pub fn from_json(s: &str) -> Result<Params, String> {
        let bad = || format!("parameters are not a flat JSON object of numbers: {s}");
        let inner = s
            .trim()
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .ok_or_else(bad)?
            .trim();
        let mut out = BTreeMap::new();
        if inner.is_empty() {
            return Ok(Params(out));
        }
        for item in inner.split(',') {
            let (k, v) = item.split_once(':').ok_or_else(bad)?;
            let k = k
                .trim()
                .strip_prefix('"')
                .and_then(|k| k.strip_suffix('"'))
                .ok_or_else(bad)?;
            let v: f64 = v.trim().parse().map_err(|_| bad())?;
            out.insert(k.to_string(), v);
        }
        Ok(Params(out))
    }

    /// Builds parameters from pairs (tests).
    pub fn from_pairs(pairs: &[(&str, f64)]) -> Params {
        Params(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    /// The JSON form [`Params::from_json`] reads.
    pub fn to_json(&self) -> String {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("\"{k}\":{}", fmt_f64(*v)))
            .collect();
        format!("{{{}}}", items.join(","))
    }
}

/// Formats a finite f64 so that it parses back exactly (Rust's shortest round-trip form).
fn fmt_f64(v: f64) -> String {
    format!("{v:?}")
}
