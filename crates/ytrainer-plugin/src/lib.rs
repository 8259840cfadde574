//! SDK for **external** ytrainer loss plugins: shared libraries (`cdylib`) that `ytrainer` loads at startup.
//!
//! A plugin author depends on this crate only (no Burn, no engine), implements [`Plugin`] for a struct and
//! calls [`export_plugin!`]:
//!
//! ```
//! use ytrainer_plugin::{Batch, Param, Params, Plugin, export_plugin};
//!
//! struct Halve { factor: f32 }
//!
//! impl Plugin for Halve {
//!     const NAME: &'static str = "halve";
//!     const DESCRIPTION: &'static str = "every token weighted `factor`";
//!     const PARAMS: &'static [Param] = &[Param::new("factor", 0.5, "the weight")];
//!     fn new(p: &Params) -> Result<Self, String> {
//!         Ok(Halve { factor: p.get("factor") as f32 })
//!     }
//!     fn weights(&self, batch: &Batch<'_>, out: &mut [f32]) {
//!         out.fill(self.factor);
//!     }
//! }
//!
//! export_plugin!(Halve);
//! ```
//!
//! A **pairwise** (preference) objective implements [`PairPlugin`] instead and is exported with
//! [`export_pair_plugin!`]: it receives, per preference pair, the policy's (and when declared the reference's)
//! summed log-probabilities of the chosen and rejected completions, and returns each pair's loss together with its
//! derivatives with respect to the two policy log-probabilities; the host turns those into gradients.
//!
//! # The ABI (version [`ABI_VERSION`])
//!
//! The library exports one symbol, [`ENTRY_SYMBOL`] (`ytrainer_plugin_entry`), an
//! `extern "C" fn() -> *const RawVTable`. The vtable's **first field is the ABI version**, so a host can read it
//! before trusting any other field, and then reads only the layout of that version; a host refuses a version it
//! does not speak. Everything
//! crossing the boundary is `#[repr(C)]`: strings are (pointer, length) UTF-8, arrays are (pointer, length),
//! parameters reach the constructor as a flat JSON object of numbers (`{"a":1.0,"b":2.5}`), and the weight
//! function reads host slices and fills a host slice. Errors come back as a status code plus a message written
//! into a host buffer. A panic inside the plugin is caught at the boundary (in the code this SDK generates) and
//! reported as an error with its message, so it never unwinds into the host. Build plugins with the default
//! `panic = "unwind"`; with `panic = "abort"` a panic ends the process.
//!
//! The vtable and its strings must stay valid while the library is loaded (they are `'static` here).
//!
//! Version 3 only appends: [`RawVTable::top_k_entropy`] (the `k` of [`needs_bits::TOP_K_ENTROPY`]) after the
//! version-2 fields, and [`RawBatch::top_k_entropy`] after the version-2 batch fields. The version-2 layouts are
//! kept in [`v2`] and are checked at compile time to be exact prefixes of the version-3 ones, so a host reads a
//! version-2 vtable through [`v2::RawVTable`] and may hand a version-2 plugin a version-3 batch (it reads the
//! prefix it knows).
//!
//! # One vocabulary
//!
//! [`Normalize`], [`Needs`], [`ParamSpec`] (alias [`Param`]) and [`Params`] are the plain types of the loss
//! contract, defined here once: the engine (`ytrainer_core::loss`) re-exports them for its built-in plugins. The
//! optional `serde` feature (off by default, so a plugin still builds with no dependencies) derives the
//! serialisation the engine needs for its config and reports.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Version of the binary interface described by [`RawVTable`], [`RawBatch`] and [`RawPairBatch`]. Bumped on any
/// layout change (2: pairwise plugins, the `kind` and `pair_loss` fields; 3: top-k entropy, the vtable's
/// `top_k_entropy` and the batch's `top_k_entropy` fields, appended after the version-2 fields).
pub const ABI_VERSION: u32 = 3;

/// The oldest ABI version a host of this SDK still loads ([`v2`]: its plugins keep working unchanged).
pub const MIN_ABI_VERSION: u32 = 2;

/// Values of [`RawVTable::kind`].
pub mod kind {
    /// Token reweighting: [`super::RawVTable::weights`] is the entry point.
    pub const TOKEN: u32 = 0;
    /// Pairwise objective: [`super::RawVTable::pair_loss`] is the entry point.
    pub const PAIRWISE: u32 = 1;
}

/// Name of the exported entry function.
pub const ENTRY_SYMBOL: &str = "ytrainer_plugin_entry";

/// Signature of the exported entry function.
pub type EntryFn = unsafe extern "C" fn() -> *const RawVTable;

/// Status codes of [`RawVTable::create`] and [`RawVTable::weights`].
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// The plugin reported an error (message in the error buffer).
    pub const ERROR: i32 = 1;
    /// The plugin panicked (message in the error buffer).
    pub const PANIC: i32 = 2;
}

/// Bits of [`RawVTable::needs`]: which optional per-token statistics the weight function reads.
pub mod needs_bits {
    /// Predictive entropy of the distribution that predicts each target (nats).
    pub const ENTROPY: u32 = 1;
    /// Position of each target in its row (the model's position id).
    pub const POSITION: u32 = 2;
    /// Index of the training example each target belongs to.
    pub const SAMPLE: u32 = 4;
    /// Cross-entropy of each target under the reference model (LoRA runs: the base with adapters off).
    pub const REFERENCE_LOSS: u32 = 8;
    /// ABI version 3: entropy of the renormalised top-`k` distribution divided by `ln k` (in [0, 1]); `k` is
    /// [`super::RawVTable::top_k_entropy`] (at least 2).
    pub const TOP_K_ENTROPY: u32 = 16;

    /// Every bit ABI version `version` can express (0 for a version without a `needs` field).
    pub const fn known(version: u32) -> u32 {
        match version {
            2 => ENTROPY | POSITION | SAMPLE | REFERENCE_LOSS,
            3 => ENTROPY | POSITION | SAMPLE | REFERENCE_LOSS | TOP_K_ENTROPY,
            _ => 0,
        }
    }

    /// The names of the bits in `bits`, for messages (`"entropy, top-k entropy"`; unknown bits as hex).
    pub fn names(bits: u32) -> String {
        let mut v = Vec::new();
        for (b, name) in [
            (ENTROPY, "entropy"),
            (POSITION, "position"),
            (SAMPLE, "sample"),
            (REFERENCE_LOSS, "reference loss"),
            (TOP_K_ENTROPY, "top-k entropy"),
        ] {
            if bits & b != 0 {
                v.push(name.to_string());
            }
        }
        let unknown = bits & !known(super::ABI_VERSION);
        if unknown != 0 {
            v.push(format!("unknown bits {unknown:#x}"));
        }
        v.join(", ")
    }
}

/// A borrowed UTF-8 string across the boundary.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawStr {
    /// First byte.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl RawStr {
    /// Borrows a `'static` string.
    pub const fn from_static(s: &'static str) -> Self {
        RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Borrows any string (valid as long as `s`).
    pub fn borrowed(s: &str) -> Self {
        RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Reads the string back; `None` for a null pointer or invalid UTF-8.
    ///
    /// # Safety
    /// `ptr` must be null or point to `len` readable bytes that outlive `'a`.
    pub unsafe fn as_str<'a>(&self) -> Option<&'a str> {
        if self.ptr.is_null() {
            return if self.len == 0 { Some("") } else { None };
        }
        // SAFETY: the caller guarantees `len` readable bytes at `ptr`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes).ok()
    }
}

/// One declared parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawParam {
    /// Config key under `[loss.params]`.
    pub name: RawStr,
    /// Default value.
    pub default: f64,
    /// One line of help.
    pub help: RawStr,
}

/// Host-owned buffer the plugin writes an error message into (truncated to `cap` bytes).
#[repr(C)]
#[derive(Debug)]
pub struct RawError {
    /// Buffer start.
    pub buf: *mut u8,
    /// Capacity in bytes.
    pub cap: usize,
    /// Bytes written.
    pub len: usize,
}

impl RawError {
    /// Writes `msg`, truncated at a character boundary to the capacity.
    ///
    /// # Safety
    /// `buf` must be valid for `cap` writable bytes.
    pub unsafe fn write(&mut self, msg: &str) {
        if self.buf.is_null() {
            return;
        }
        let mut n = msg.len().min(self.cap);
        while n > 0 && !msg.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: `n <= cap` and the caller guarantees the buffer.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), self.buf, n) };
        self.len = n;
    }
}

/// The per-token statistics of one micro-batch, `n` supervised tokens in target order. Optional arrays are null
/// unless the plugin declared the matching [`needs_bits`]. The fields up to `progress` are [`v2::RawBatch`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawBatch {
    /// Number of tokens.
    pub n: usize,
    /// Cross-entropy of each token (nats), `n` values, never null.
    pub loss: *const f32,
    /// Predictive entropy, or null.
    pub entropy: *const f32,
    /// Reference-model cross-entropy, or null.
    pub reference_loss: *const f32,
    /// Position id of each target, or null.
    pub position: *const u32,
    /// Example index of each target, or null.
    pub sample: *const u32,
    /// Optimizer step (0-based).
    pub step: u64,
    /// Training progress in `[0, 1]`.
    pub progress: f64,
    /// ABI version 3: normalised top-k entropy of each target, or null.
    pub top_k_entropy: *const f32,
}

/// One micro-batch of preference pairs, `n` pairs. Log-probabilities are sums over each completion's tokens (or
/// means, when the run sets `average_log_prob`); the reference arrays are null unless the plugin declared
/// [`needs_bits::REFERENCE_LOSS`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawPairBatch {
    /// Number of pairs.
    pub n: usize,
    /// Policy log-probability of each chosen completion.
    pub policy_chosen: *const f32,
    /// Policy log-probability of each rejected completion.
    pub policy_rejected: *const f32,
    /// Reference log-probability of each chosen completion, or null.
    pub reference_chosen: *const f32,
    /// Reference log-probability of each rejected completion, or null.
    pub reference_rejected: *const f32,
    /// Chosen completion lengths in tokens.
    pub chosen_len: *const f32,
    /// Rejected completion lengths in tokens.
    pub rejected_len: *const f32,
    /// Optimizer step (0-based).
    pub step: u64,
    /// Training progress in `[0, 1]`.
    pub progress: f64,
}

/// What the entry function returns (ABI version 3). Field order is part of the ABI; `abi_version` comes first,
/// and the fields up to `destroy` are [`v2::RawVTable`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawVTable {
    /// [`ABI_VERSION`] of the SDK the plugin was built with; the host reads the rest only if it speaks it.
    pub abi_version: u32,
    /// [`kind`]: which entry point the plugin implements.
    pub kind: u32,
    /// [`needs_bits`] of the weight function.
    pub needs: u32,
    /// Default normalisation: 0 = nonzero, 1 = tokens, 2 = weights.
    pub normalize: u32,
    /// Plugin name (`--loss NAME`).
    pub name: RawStr,
    /// One line for `ytrainer plugins list`.
    pub description: RawStr,
    /// The formula, for `ytrainer plugins describe` (may be empty).
    pub formula: RawStr,
    /// Declared parameters.
    pub params: *const RawParam,
    /// Number of declared parameters.
    pub n_params: usize,
    /// Builds an instance from a flat JSON object holding every declared parameter; writes the instance
    /// pointer to `out`.
    pub create:
        unsafe extern "C" fn(params_json: RawStr, out: *mut *mut c_void, err: *mut RawError) -> i32,
    /// Fills `out[0..n]` with the weights of `batch`.
    pub weights: unsafe extern "C" fn(
        instance: *mut c_void,
        batch: *const RawBatch,
        out: *mut f32,
        err: *mut RawError,
    ) -> i32,
    /// Pairwise plugins: fills `loss[0..n]`, `d_chosen[0..n]` and `d_rejected[0..n]` (the derivatives of each
    /// pair's loss with respect to its policy chosen / rejected log-probability).
    pub pair_loss: unsafe extern "C" fn(
        instance: *mut c_void,
        batch: *const RawPairBatch,
        loss: *mut f32,
        d_chosen: *mut f32,
        d_rejected: *mut f32,
        err: *mut RawError,
    ) -> i32,
    /// Frees an instance made by `create`.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
    /// ABI version 3: the `k` of [`needs_bits::TOP_K_ENTROPY`] (at least 2 when that bit is set, else 0).
    pub top_k_entropy: u32,
}

/// The layouts of ABI version 2, which a host still loads. Each is an exact prefix of its version-3 successor
/// (checked at compile time below), so version 3 changed nothing a version-2 plugin reads.
pub mod v2 {
    use super::{RawPairBatch, RawParam, RawStr, c_void};

    /// The version-2 vtable: [`super::RawVTable`] without `top_k_entropy`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct RawVTable {
        /// 2.
        pub abi_version: u32,
        /// See [`super::RawVTable::kind`].
        pub kind: u32,
        /// [`super::needs_bits`] up to `REFERENCE_LOSS`.
        pub needs: u32,
        /// See [`super::RawVTable::normalize`].
        pub normalize: u32,
        /// See [`super::RawVTable::name`].
        pub name: RawStr,
        /// See [`super::RawVTable::description`].
        pub description: RawStr,
        /// See [`super::RawVTable::formula`].
        pub formula: RawStr,
        /// See [`super::RawVTable::params`].
        pub params: *const RawParam,
        /// See [`super::RawVTable::n_params`].
        pub n_params: usize,
        /// See [`super::RawVTable::create`].
        pub create: unsafe extern "C" fn(
            params_json: RawStr,
            out: *mut *mut c_void,
            err: *mut super::RawError,
        ) -> i32,
        /// Reads a [`RawBatch`] (a version-3 batch starts with one).
        pub weights: unsafe extern "C" fn(
            instance: *mut c_void,
            batch: *const RawBatch,
            out: *mut f32,
            err: *mut super::RawError,
        ) -> i32,
        /// See [`super::RawVTable::pair_loss`].
        pub pair_loss: unsafe extern "C" fn(
            instance: *mut c_void,
            batch: *const RawPairBatch,
            loss: *mut f32,
            d_chosen: *mut f32,
            d_rejected: *mut f32,
            err: *mut super::RawError,
        ) -> i32,
        /// See [`super::RawVTable::destroy`].
        pub destroy: unsafe extern "C" fn(instance: *mut c_void),
    }

    /// The version-2 batch: [`super::RawBatch`] without `top_k_entropy`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct RawBatch {
        /// Number of tokens.
        pub n: usize,
        /// Cross-entropy of each token.
        pub loss: *const f32,
        /// Predictive entropy, or null.
        pub entropy: *const f32,
        /// Reference-model cross-entropy, or null.
        pub reference_loss: *const f32,
        /// Position id of each target, or null.
        pub position: *const u32,
        /// Example index of each target, or null.
        pub sample: *const u32,
        /// Optimizer step (0-based).
        pub step: u64,
        /// Training progress in `[0, 1]`.
        pub progress: f64,
    }

    impl RawVTable {
        /// The version-3 vtable with the same entries and no top-k entropy. The function pointers are taken as
        /// they are: a version-2 `weights` reads only the version-2 prefix of the batch it is given.
        pub fn upgrade(&self) -> super::RawVTable {
            super::RawVTable {
                abi_version: self.abi_version,
                kind: self.kind,
                needs: self.needs,
                normalize: self.normalize,
                name: self.name,
                description: self.description,
                formula: self.formula,
                params: self.params,
                n_params: self.n_params,
                create: self.create,
                // SAFETY: the two signatures differ only in the batch pointer's type, and a version-3 batch
                // starts with the version-2 batch (checked below), so the callee reads what it expects.
                weights: unsafe {
                    std::mem::transmute::<
                        unsafe extern "C" fn(
                            *mut c_void,
                            *const RawBatch,
                            *mut f32,
                            *mut super::RawError,
                        ) -> i32,
                        unsafe extern "C" fn(
                            *mut c_void,
                            *const super::RawBatch,
                            *mut f32,
                            *mut super::RawError,
                        ) -> i32,
                    >(self.weights)
                },
                pair_loss: self.pair_loss,
                destroy: self.destroy,
                top_k_entropy: 0,
            }
        }
    }

    // Version 3 only appends: every version-2 field sits at the same offset in the version-3 layout.
    macro_rules! same_offsets {
        ($old:ty, $new:ty: $($f:ident),*) => {
            $(const _: () = assert!(
                std::mem::offset_of!($old, $f) == std::mem::offset_of!($new, $f)
            );)*
            const _: () = assert!(std::mem::size_of::<$old>() <= std::mem::size_of::<$new>());
        };
    }
    same_offsets!(RawVTable, super::RawVTable: abi_version, kind, needs, normalize, name, description,
        formula, params, n_params, create, weights, pair_loss, destroy);
    same_offsets!(RawBatch, super::RawBatch: n, loss, entropy, reference_loss, position, sample, step,
        progress);
    const _: () = assert!(
        std::mem::offset_of!(super::RawVTable, top_k_entropy) >= std::mem::size_of::<RawVTable>()
    );
    const _: () = assert!(
        std::mem::offset_of!(super::RawBatch, top_k_entropy) >= std::mem::size_of::<RawBatch>()
    );
}

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

/// One micro-batch's statistics as safe slices; all slices have [`Batch::len`] elements.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Cross-entropy of each supervised token (nats).
    pub loss: &'a [f32],
    /// Predictive entropy, when declared in [`Plugin::NEEDS`].
    pub entropy: Option<&'a [f32]>,
    /// Normalised top-k entropy (in [0, 1]), when [`Needs::top_k_entropy`] is declared.
    pub top_k_entropy: Option<&'a [f32]>,
    /// Reference-model cross-entropy, when declared.
    pub reference_loss: Option<&'a [f32]>,
    /// Position id of each target, when declared.
    pub position: Option<&'a [u32]>,
    /// Example index of each target, when declared.
    pub sample: Option<&'a [u32]>,
    /// Optimizer step (0-based).
    pub step: u64,
    /// Training progress in `[0, 1]`.
    pub progress: f64,
}

impl Batch<'_> {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.loss.len()
    }

    /// Whether the batch has no tokens.
    pub fn is_empty(&self) -> bool {
        self.loss.is_empty()
    }
}

/// A token reweighting strategy. Implement it for a struct and call [`export_plugin!`].
pub trait Plugin: Sized + Send + Sync + 'static {
    /// Unique name (`--loss NAME`); must not clash with a built-in or another loaded plugin.
    const NAME: &'static str;
    /// One line for `ytrainer plugins list`.
    const DESCRIPTION: &'static str;
    /// The formula, shown by `ytrainer plugins describe`.
    const FORMULA: &'static str = "";
    /// Declared parameters with defaults; the host rejects any other key.
    const PARAMS: &'static [Param] = &[];
    /// Optional statistics the weight function reads.
    const NEEDS: Needs = Needs::NONE;
    /// Normalisation used unless the user chooses one.
    const NORMALIZE: Normalize = Normalize::Tokens;

    /// Builds the plugin from its parameters (every declared one present); `Err` explains what to change.
    fn new(params: &Params) -> Result<Self, String>;

    /// Writes one weight per token into `out` (same length as `batch.loss`, pre-filled with 1). Weights must be
    /// finite and >= 0; the host checks and stops the run with an error naming this plugin otherwise.
    fn weights(&self, batch: &Batch<'_>, out: &mut [f32]);
}

/// One micro-batch of preference pairs as a pairwise plugin sees it (see [`RawPairBatch`]).
#[derive(Debug, Clone, Copy)]
pub struct PairBatch<'a> {
    /// Policy log-probabilities of the chosen completions.
    pub policy_chosen: &'a [f32],
    /// Policy log-probabilities of the rejected completions.
    pub policy_rejected: &'a [f32],
    /// Reference log-probabilities (when declared with `NEEDS_REFERENCE`).
    pub reference_chosen: Option<&'a [f32]>,
    /// See `reference_chosen`.
    pub reference_rejected: Option<&'a [f32]>,
    /// Completion lengths in tokens.
    pub chosen_len: &'a [f32],
    /// See `chosen_len`.
    pub rejected_len: &'a [f32],
    /// Optimizer step (0-based).
    pub step: u64,
    /// Training progress in `[0, 1]`.
    pub progress: f64,
}

impl PairBatch<'_> {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.policy_chosen.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.policy_chosen.is_empty()
    }
}

/// Where a pairwise plugin writes its results, one value per pair each.
#[derive(Debug)]
pub struct PairOut<'a> {
    /// Loss of each pair.
    pub loss: &'a mut [f32],
    /// `d loss / d policy_chosen` of each pair.
    pub d_chosen: &'a mut [f32],
    /// `d loss / d policy_rejected` of each pair.
    pub d_rejected: &'a mut [f32],
}

/// A pairwise (preference) objective, e.g. a DPO variant. Implement it for a struct and call
/// [`export_pair_plugin!`].
pub trait PairPlugin: Sized + Send + Sync + 'static {
    /// Unique name (`--loss NAME`).
    const NAME: &'static str;
    /// One line for `ytrainer plugins list`.
    const DESCRIPTION: &'static str;
    /// The formula, shown by `ytrainer plugins describe`.
    const FORMULA: &'static str = "";
    /// Declared parameters with defaults.
    const PARAMS: &'static [Param] = &[];
    /// Whether the objective reads the reference model's log-probabilities.
    const NEEDS_REFERENCE: bool = true;

    /// Builds the plugin from its parameters (every declared one present); `Err` explains what to change.
    fn new(params: &Params) -> Result<Self, String>;

    /// Fills each pair's loss and its derivatives with respect to the two policy log-probabilities (all three
    /// must be finite; the host stops the run with an error naming this plugin otherwise).
    fn loss(&self, batch: &PairBatch<'_>, out: PairOut<'_>);
}

/// Exports `$t` (a type implementing [`PairPlugin`]) as the library's plugin. Use once per `cdylib`.
#[macro_export]
macro_rules! export_pair_plugin {
    ($t:ty) => {
        /// The ytrainer plugin entry point (generated by `ytrainer_plugin::export_pair_plugin!`).
        #[unsafe(no_mangle)]
        pub extern "C" fn ytrainer_plugin_entry() -> *const $crate::RawVTable {
            static VTABLE: ::std::sync::OnceLock<$crate::__private::VTable> =
                ::std::sync::OnceLock::new();
            VTABLE
                .get_or_init($crate::__private::pair_vtable::<$t>)
                .as_ptr()
        }
    };
}

/// Exports `$t` (a type implementing [`Plugin`]) as the library's plugin. Use once per `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    ($t:ty) => {
        /// The ytrainer plugin entry point (generated by `ytrainer_plugin::export_plugin!`).
        #[unsafe(no_mangle)]
        pub extern "C" fn ytrainer_plugin_entry() -> *const $crate::RawVTable {
            static VTABLE: ::std::sync::OnceLock<$crate::__private::VTable> =
                ::std::sync::OnceLock::new();
            VTABLE.get_or_init($crate::__private::vtable::<$t>).as_ptr()
        }
    };
}

/// Implementation details of [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// A vtable with its parameter array, safe to keep in a `static`.
    pub struct VTable {
        raw: RawVTable,
        _params: Vec<RawParam>,
    }

    // SAFETY: every pointer in it refers to `'static` data or to `_params`, which is never mutated.
    unsafe impl Send for VTable {}
    // SAFETY: as above; the vtable is read-only after construction.
    unsafe impl Sync for VTable {}

    impl VTable {
        /// Pointer handed to the host.
        pub fn as_ptr(&self) -> *const RawVTable {
            &self.raw
        }
    }

    /// Builds the vtable of `P` and installs the panic hook that records panic messages.
    pub fn vtable<P: Plugin>() -> VTable {
        install_panic_hook();
        let params = raw_params(P::PARAMS);
        VTable {
            raw: RawVTable {
                abi_version: ABI_VERSION,
                kind: kind::TOKEN,
                needs: P::NEEDS.bits(),
                normalize: P::NORMALIZE.to_raw(),
                name: RawStr::from_static(P::NAME),
                description: RawStr::from_static(P::DESCRIPTION),
                formula: RawStr::from_static(P::FORMULA),
                params: params.as_ptr(),
                n_params: params.len(),
                create: create::<P>,
                weights: weights::<P>,
                pair_loss: no_pair_loss,
                destroy: destroy::<P>,
                top_k_entropy: u32::try_from(P::NEEDS.top_k_entropy).unwrap_or(u32::MAX),
            },
            _params: params,
        }
    }

    fn raw_params(params: &'static [Param]) -> Vec<RawParam> {
        params
            .iter()
            .map(|p| RawParam {
                name: RawStr::from_static(p.name),
                default: p.default,
                help: RawStr::from_static(p.help),
            })
            .collect()
    }

    /// Builds the vtable of the pairwise plugin `P`.
    pub fn pair_vtable<P: PairPlugin>() -> VTable {
        install_panic_hook();
        let params = raw_params(P::PARAMS);
        VTable {
            raw: RawVTable {
                abi_version: ABI_VERSION,
                kind: kind::PAIRWISE,
                needs: if P::NEEDS_REFERENCE {
                    needs_bits::REFERENCE_LOSS
                } else {
                    0
                },
                normalize: 1,
                name: RawStr::from_static(P::NAME),
                description: RawStr::from_static(P::DESCRIPTION),
                formula: RawStr::from_static(P::FORMULA),
                params: params.as_ptr(),
                n_params: params.len(),
                create: create_pair::<P>,
                weights: no_weights,
                pair_loss: pair_loss::<P>,
                destroy: destroy::<P>,
                top_k_entropy: 0,
            },
            _params: params,
        }
    }

    unsafe extern "C" fn no_weights(
        _: *mut c_void,
        _: *const RawBatch,
        _: *mut f32,
        err: *mut RawError,
    ) -> i32 {
        unsafe { report(err, "a pairwise plugin has no token weight function") };
        status::ERROR
    }

    unsafe extern "C" fn no_pair_loss(
        _: *mut c_void,
        _: *const RawPairBatch,
        _: *mut f32,
        _: *mut f32,
        _: *mut f32,
        err: *mut RawError,
    ) -> i32 {
        unsafe { report(err, "a token plugin has no pairwise loss function") };
        status::ERROR
    }

    /// # Safety
    /// As [`create`].
    pub unsafe extern "C" fn create_pair<P: PairPlugin>(
        params_json: RawStr,
        out: *mut *mut c_void,
        err: *mut RawError,
    ) -> i32 {
        unsafe { construct(params_json, out, err, P::new) }
    }

    /// # Safety
    /// `instance` comes from `create_pair::<P>`; `batch` and its arrays hold `n` values; the outputs have room
    /// for `n` values each.
    pub unsafe extern "C" fn pair_loss<P: PairPlugin>(
        instance: *mut c_void,
        batch: *const RawPairBatch,
        loss: *mut f32,
        d_chosen: *mut f32,
        d_rejected: *mut f32,
        err: *mut RawError,
    ) -> i32 {
        let body = || {
            // SAFETY: guaranteed by the host (see above).
            let (p, b) = unsafe { (&*(instance as *const P), &*batch) };
            let n = b.n;
            // SAFETY: non-null arrays hold `n` values.
            let slice = |ptr| unsafe { host_array(ptr, n) };
            let batch = PairBatch {
                policy_chosen: slice(b.policy_chosen).unwrap_or(&[]),
                policy_rejected: slice(b.policy_rejected).unwrap_or(&[]),
                reference_chosen: slice(b.reference_chosen),
                reference_rejected: slice(b.reference_rejected),
                chosen_len: slice(b.chosen_len).unwrap_or(&[]),
                rejected_len: slice(b.rejected_len).unwrap_or(&[]),
                step: b.step,
                progress: b.progress,
            };
            // SAFETY: each output has room for `n` values.
            let out = unsafe {
                PairOut {
                    loss: std::slice::from_raw_parts_mut(loss, n),
                    d_chosen: std::slice::from_raw_parts_mut(d_chosen, n),
                    d_rejected: std::slice::from_raw_parts_mut(d_rejected, n),
                }
            };
            out.loss.fill(0.0);
            out.d_chosen.fill(0.0);
            out.d_rejected.fill(0.0);
            p.loss(&batch, out);
        };
        // SAFETY: the host passes a valid error buffer.
        unsafe { guard(err, body) }
    }

    thread_local! {
        static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Records panic messages (with location) instead of printing them: the host reports them with the
    /// plugin's name. This library has its own copy of std, so the hook does not affect the host.
    fn install_panic_hook() {
        std::panic::set_hook(Box::new(|info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
        }));
    }

    fn panic_message() -> String {
        LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "unknown panic".to_string())
    }

    /// Runs `f`, catching a panic: `OK`, or `PANIC` with the panic's message in `err`.
    ///
    /// # Safety
    /// `err` is null or a valid host error buffer.
    unsafe fn guard(err: *mut RawError, f: impl FnOnce()) -> i32 {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => status::OK,
            Err(_) => {
                unsafe { report(err, &panic_message()) };
                status::PANIC
            }
        }
    }

    /// The host's optional array of `n` values: `None` for a null pointer.
    ///
    /// # Safety
    /// A non-null `ptr` points to `n` values that outlive the call.
    unsafe fn host_array<'a, T>(ptr: *const T, n: usize) -> Option<&'a [T]> {
        (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr, n) })
    }

    unsafe fn report(err: *mut RawError, msg: &str) {
        if let Some(e) = unsafe { err.as_mut() } {
            // SAFETY: the host passes a valid buffer.
            unsafe { e.write(msg) };
        }
    }

    /// # Safety
    /// Called by the host with a valid string, output pointer and error buffer.
    pub unsafe extern "C" fn create<P: Plugin>(
        params_json: RawStr,
        out: *mut *mut c_void,
        err: *mut RawError,
    ) -> i32 {
        unsafe { construct(params_json, out, err, P::new) }
    }

    /// The body of both constructors: parse the parameters, build, box, catch panics.
    unsafe fn construct<T>(
        params_json: RawStr,
        out: *mut *mut c_void,
        err: *mut RawError,
        new: fn(&Params) -> Result<T, String>,
    ) -> i32 {
        // SAFETY: the host passes a valid string.
        let Some(json) = (unsafe { params_json.as_str() }) else {
            unsafe { report(err, "parameters are not valid UTF-8") };
            return status::ERROR;
        };
        let r = catch_unwind(|| Params::from_json(json).and_then(|p| new(&p)));
        match r {
            Ok(Ok(p)) => {
                // SAFETY: the host passes a valid out pointer.
                unsafe { *out = Box::into_raw(Box::new(p)).cast() };
                status::OK
            }
            Ok(Err(e)) => {
                unsafe { report(err, &e) };
                status::ERROR
            }
            Err(_) => {
                unsafe { report(err, &panic_message()) };
                status::PANIC
            }
        }
    }

    /// # Safety
    /// `instance` comes from `create::<P>`; `batch` and its arrays hold `n` values; `out` has room for `n`.
    pub unsafe extern "C" fn weights<P: Plugin>(
        instance: *mut c_void,
        batch: *const RawBatch,
        out: *mut f32,
        err: *mut RawError,
    ) -> i32 {
        let body = || {
            // SAFETY: guaranteed by the host (see above).
            let (p, b) = unsafe { (&*(instance as *const P), &*batch) };
            let n = b.n;
            // SAFETY (every array): non-null arrays hold `n` values.
            let batch = Batch {
                loss: unsafe { host_array(b.loss, n) }.unwrap_or(&[]),
                entropy: unsafe { host_array(b.entropy, n) },
                top_k_entropy: unsafe { host_array(b.top_k_entropy, n) },
                reference_loss: unsafe { host_array(b.reference_loss, n) },
                position: unsafe { host_array(b.position, n) },
                sample: unsafe { host_array(b.sample, n) },
                step: b.step,
                progress: b.progress,
            };
            // SAFETY: `out` has room for `n` values.
            let out = unsafe { std::slice::from_raw_parts_mut(out, n) };
            out.fill(1.0);
            p.weights(&batch, out);
        };
        // SAFETY: the host passes a valid error buffer.
        unsafe { guard(err, body) }
    }

    /// # Safety
    /// `instance` comes from `create::<P>` and is not used afterwards.
    pub unsafe extern "C" fn destroy<P: Send + Sync + 'static>(instance: *mut c_void) {
        if !instance.is_null() {
            // SAFETY: made by `Box::into_raw` in `create::<P>`.
            let _ = catch_unwind(|| drop(unsafe { Box::from_raw(instance as *mut P) }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_json_round_trip() {
        let p = Params::from_pairs(&[("a", 1.0), ("b", -2.5e-8), ("c", 3.0)]);
        let j = p.to_json();
        assert_eq!(Params::from_json(&j).unwrap(), p);
        assert_eq!(Params::from_json("{}").unwrap(), Params::default());
        assert_eq!(Params::from_json(" { \"x\" : 2 } ").unwrap().get("x"), 2.0);
        assert!(Params::from_json("[1]").is_err());
        assert!(Params::from_json("{\"x\":\"y\"}").is_err());
    }

    #[test]
    fn needs_bits_round_trip() {
        let n = Needs {
            entropy: true,
            top_k_entropy: 20,
            reference_loss: true,
            position: false,
            sample: true,
        };
        assert_eq!(Needs::from_raw(n.bits(), 20), n);
        assert_eq!(n.bits() & !needs_bits::known(ABI_VERSION), 0);
        assert_eq!(Needs::from_raw(Needs::NONE.bits(), 7), Needs::NONE);
        assert_eq!(Needs::NONE, Needs::default());
    }

    #[test]
    fn normalize_raw_round_trip() {
        for n in [Normalize::Nonzero, Normalize::Tokens, Normalize::Weights] {
            assert_eq!(Normalize::from_raw(n.to_raw()), n);
        }
        assert_eq!(Normalize::from_raw(99), Normalize::Tokens);
    }

    #[test]
    fn error_buffer_truncates_on_char_boundary() {
        let mut buf = [0u8; 4];
        let mut e = RawError {
            buf: buf.as_mut_ptr(),
            cap: 4,
            len: 0,
        };
        unsafe { e.write("abcé") }; // 'é' is 2 bytes: only "abc" fits
        assert_eq!(&buf[..e.len], b"abc");
    }
}
