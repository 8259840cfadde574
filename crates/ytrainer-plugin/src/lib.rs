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
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Version of the binary interface described by [`RawVTable`], [`RawBatch`] and [`RawPairBatch`]. Bumped on any
/// layout change (2: pairwise plugins, the `kind` and `pair_loss` fields; 3: top-k entropy, the vtable's
/// `top_k_entropy` and the batch's `top_k_entropy` fields, appended after the version-2 fields).
pub const ABI_VERSION: u32 = 3;

/// The oldest ABI version a host of this SDK still loads ([`v2`]: its plugins keep working unchanged).
pub const MIN_ABI_VERSION: u32 = 2;

/// `major` of a `major.minor.patch` version string, at compile time.
const fn major_version(v: &str) -> u32 {
    let b = v.as_bytes();
    let (mut i, mut n) = (0, 0u32);
    while i < b.len() && b[i] != b'.' {
        assert!(
            b[i].is_ascii_digit(),
            "the crate version must start with its major number"
        );
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}

// The version policy (README.md): this crate's major version is the ABI version its plugins export, so that
// `ytrainer-plugin = "3"` in a plugin's Cargo.toml says which ytrainer releases load it. Bumping the ABI without
// the major version (or the other way round) fails to compile here.
const _: () = assert!(
    major_version(env!("CARGO_PKG_VERSION")) == ABI_VERSION,
    "the major version of ytrainer-plugin (Cargo.toml) must equal ABI_VERSION"
);

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

pub mod v2;
mod vocab;

pub use vocab::{Needs, Normalize, Param, ParamSpec, Params};

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

    /// The crate stays publishable on its own (`cargo package -p ytrainer-plugin`): no path dependency (a
    /// registry rejects them), nothing inherited that says `publish = false`, and the README and licence the
    /// package carries are there.
    #[test]
    fn the_sdk_stays_publishable_on_its_own() {
        let manifest = include_str!("../Cargo.toml");
        for line in manifest.lines().map(str::trim) {
            assert!(!line.contains("path ="), "a path dependency: {line}");
            assert!(!line.starts_with("publish"), "publish setting: {line}");
            assert!(
                !line.starts_with("version.workspace"),
                "the version follows the ABI, not the workspace"
            );
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["README.md", "LICENSE"] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        assert_eq!(env!("CARGO_PKG_VERSION_MAJOR"), ABI_VERSION.to_string());
    }
}
