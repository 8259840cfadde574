//! External loss plugins: shared libraries built with the `ytrainer-plugin` SDK, loaded through `libloading`.
//!
//! Loading checks, in order: the file is a loadable shared library, it exports `ytrainer_plugin_entry`, the
//! entry returns a vtable whose ABI version we speak (2 or 3: the version is the vtable's first field, read before
//! anything else, and only that version's layout is read after it), its needs are ones that version can express,
//! and its strings and parameter table are well formed.
//! Each failure is a [`PluginError::Load`] naming the file and what to do. Libraries stay loaded for the life
//! of the process (instances keep them alive), so the `'static` metadata taken from them stays valid.
//!
//! External plugins run on the host: the trainer copies the per-token statistics of each micro-batch to host
//! memory, calls the library, checks the weights and copies them back (see docs/performance.md for the cost).

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use ytrainer_plugin::{
    ABI_VERSION, ENTRY_SYMBOL, EntryFn, MIN_ABI_VERSION, RawBatch, RawError, RawPairBatch, RawStr,
    RawVTable, needs_bits, status,
};

use crate::loss::{
    LossFn, LossPluginInfo, Needs, Normalize, PairStats, PairwiseObjective, ParamSpec, Params,
    PluginError, PluginKind, TokenReweighter, TokenStats, tensor_from_slice, tensor_to_vec,
};

/// A loaded plugin library.
pub struct ExternalLib {
    /// The library's vtable in the current layout: a copy of a version-3 vtable, or a version-2 one upgraded
    /// (no top-k entropy). Its pointers point into the library.
    vtable: RawVTable,
    path: PathBuf,
    name: &'static str,
    // Declared last: dropped after everything that points into it.
    _lib: libloading::Library,
}

// SAFETY: the vtable is immutable static data of the library, and the SDK's functions are thread-safe
// (`Plugin: Send + Sync`).
unsafe impl Send for ExternalLib {}
// SAFETY: as above.
unsafe impl Sync for ExternalLib {}

impl ExternalLib {
    fn vt(&self) -> &RawVTable {
        &self.vtable
    }
}

/// File extensions of shared libraries picked up from a plugin directory.
pub const LIBRARY_EXTENSIONS: &[&str] = &["so", "dylib", "dll"];

/// Expands plugin paths: directories to their shared libraries (sorted), files as given; duplicates (after
/// canonicalisation) removed. A path that does not exist is an error.
pub fn library_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PluginError> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        let c = p.canonicalize().unwrap_or(p);
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| PluginError::Load {
                path: p.display().to_string(),
                reason: format!("cannot read the plugin directory: {e}"),
            })?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| LIBRARY_EXTENSIONS.contains(&e))
                })
                .collect();
            files.sort();
            files.into_iter().for_each(&mut push);
        } else if p.is_file() {
            push(p.clone());
        } else {
            return Err(PluginError::Load {
                path: p.display().to_string(),
                reason: "no such file or directory (plugin paths come from --plugin-dir, YTRAINER_PLUGIN_PATH and [loss] plugins)".into(),
            });
        }
    }
    Ok(out)
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// Loads one library and reads its metadata.
pub fn load(path: &Path) -> Result<(LossPluginInfo, Arc<ExternalLib>), PluginError> {
    let err = |reason: String| PluginError::Load {
        path: path.display().to_string(),
        reason,
    };
    // SAFETY: loading a library runs its initialisers; the user asked for this file to be loaded as a plugin.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        err(format!(
            "not a loadable shared library ({e}); a plugin is a `cdylib` built with the ytrainer-plugin SDK \
             (see docs/writing-a-plugin.md)"
        ))
    })?;
    // SAFETY: the symbol's type is fixed by the SDK's ABI; it is checked by the version field below.
    let entry: EntryFn = unsafe {
        *lib.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()).map_err(|_| {
            err(format!(
                "is a shared library but exports no `{ENTRY_SYMBOL}` symbol; build the plugin with \
                     `ytrainer_plugin::export_plugin!(YourType);` (see docs/writing-a-plugin.md)"
            ))
        })?
    };
    // SAFETY: calling the SDK-generated entry function; it only builds a static vtable.
    let vt_ptr = unsafe { entry() };
    if vt_ptr.is_null() {
        return Err(err(format!("`{ENTRY_SYMBOL}` returned a null vtable")));
    }
    // SAFETY: every ABI version starts with the `u32` version field, so reading it is valid for any version.
    let version = unsafe { std::ptr::read(vt_ptr as *const u32) };
    let vt: RawVTable = match version {
        // SAFETY: the version says which layout the library built; read exactly that one.
        2 => unsafe { &*(vt_ptr as *const ytrainer_plugin::v2::RawVTable) }.upgrade(),
        // SAFETY: as above; version 3 is the current layout.
        3 => unsafe { *vt_ptr },
        _ => return Err(err(unsupported_version(version))),
    };
    check_needs(&vt).map_err(err)?;
    // SAFETY: the strings point into the library, which stays loaded.
    let text = |s: RawStr, what: &str| {
        unsafe { s.as_str() }
            .map(leak)
            .ok_or_else(|| err(format!("the plugin's {what} is not valid UTF-8")))
    };
    let name = text(vt.name, "name")?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
        return Err(err(format!(
            "invalid plugin name `{name}`: must be non-empty without spaces"
        )));
    }
    let description = text(vt.description, "description")?;
    let formula = text(vt.formula, "formula")?;
    let raw_params = if vt.n_params == 0 {
        &[][..]
    } else if vt.params.is_null() {
        return Err(err("declares parameters but the table is null".into()));
    } else {
        // SAFETY: the SDK guarantees `n_params` entries.
        unsafe { std::slice::from_raw_parts(vt.params, vt.n_params) }
    };
    let mut params = Vec::new();
    for p in raw_params {
        let pname = text(p.name, "parameter name")?;
        if !p.default.is_finite() {
            return Err(err(format!("parameter `{pname}` has a non-finite default")));
        }
        params.push(ParamSpec {
            name: pname,
            default: p.default,
            help: text(p.help, "parameter help")?,
        });
    }
    let kind = match vt.kind {
        ytrainer_plugin::kind::TOKEN => PluginKind::Token,
        ytrainer_plugin::kind::PAIRWISE => PluginKind::Pairwise,
        other => {
            return Err(err(format!(
                "unknown plugin kind {other} (expected 0 = token or 1 = pairwise)"
            )));
        }
    };
    let info = LossPluginInfo {
        name,
        description,
        kind,
        params: Box::leak(params.into_boxed_slice()),
        formula,
        build: |_| unreachable_build(),
    };
    let ext = ExternalLib {
        vtable: vt,
        path: path.to_path_buf(),
        name,
        _lib: lib,
    };
    Ok((info, Arc::new(ext)))
}

/// The reason a library with ABI version `version` (not one we speak) is refused.
pub fn unsupported_version(version: u32) -> String {
    let rebuild = format!(
        "rebuild the plugin against the ytrainer-plugin crate of this ytrainer ({})",
        env!("CARGO_PKG_VERSION")
    );
    if version > ABI_VERSION {
        format!(
            "plugin ABI version {version} is newer than this ytrainer, which speaks versions \
             {MIN_ABI_VERSION} to {ABI_VERSION}; update ytrainer, or {rebuild}"
        )
    } else {
        format!(
            "plugin ABI version {version}, but this ytrainer speaks versions {MIN_ABI_VERSION} to \
             {ABI_VERSION}; {rebuild}"
        )
    }
}

/// Checks that the vtable asks only for statistics its ABI version can express, with a usable top-k `k`.
fn check_needs(vt: &RawVTable) -> Result<(), String> {
    let (version, needs, k) = (vt.abi_version, vt.needs, vt.top_k_entropy);
    let beyond = needs & !needs_bits::known(version);
    if beyond != 0 {
        let newer = needs_bits::known(ABI_VERSION) & beyond;
        let what = needs_bits::names(beyond);
        return Err(if newer == beyond {
            format!(
                "the plugin asks for {what} (needs bits {beyond:#x}), which ABI version {version} cannot express \
                 (it is new in version {ABI_VERSION}); rebuild the plugin against the ytrainer-plugin crate of \
                 this ytrainer ({})",
                env!("CARGO_PKG_VERSION")
            )
        } else {
            format!(
                "the plugin asks for {what} (needs bits {beyond:#x}), which this ytrainer does not provide \
                 (ABI version {version} knows {:#x}: {}); build the plugin against the ytrainer-plugin crate of \
                 this ytrainer ({})",
                needs_bits::known(version),
                needs_bits::names(needs_bits::known(version)),
                env!("CARGO_PKG_VERSION")
            )
        });
    }
    let wants_top_k = needs & needs_bits::TOP_K_ENTROPY != 0;
    if wants_top_k && k < 2 {
        return Err(format!(
            "the plugin asks for top-k entropy with k = {k}; k must be at least 2 (`Needs {{ top_k_entropy: K, \
             ..Needs::NONE }}` with K >= 2)"
        ));
    }
    if !wants_top_k && k != 0 {
        return Err(format!(
            "the plugin sets top_k_entropy = {k} without the top-k entropy needs bit ({:#x}); build it with \
             `export_plugin!` so the two agree",
            needs_bits::TOP_K_ENTROPY
        ));
    }
    Ok(())
}

// External entries are built through `instantiate`; the registry never calls their `build`.
fn unreachable_build() -> Result<LossFn, PluginError> {
    Err(PluginError::Rejected {
        plugin: "external".into(),
        reason: "external plugins are built through the registry".into(),
    })
}

const ERR_CAP: usize = 4096;

fn call_with_err(f: impl FnOnce(*mut RawError) -> i32) -> (i32, String) {
    let mut buf = vec![0u8; ERR_CAP];
    let mut e = RawError {
        buf: buf.as_mut_ptr(),
        cap: ERR_CAP,
        len: 0,
    };
    let code = f(&mut e);
    let msg = String::from_utf8_lossy(&buf[..e.len.min(ERR_CAP)]).into_owned();
    (code, msg)
}

/// Builds an instance of an external plugin from validated parameters.
pub fn instantiate(lib: &Arc<ExternalLib>, params: &Params) -> Result<LossFn, PluginError> {
    let json = serde_json::to_string(params.values()).unwrap_or_else(|_| "{}".into());
    let mut inst: *mut c_void = std::ptr::null_mut();
    let vt = lib.vt();
    // SAFETY: SDK-generated constructor with a valid string, out pointer and error buffer.
    let (code, msg) =
        call_with_err(|e| unsafe { (vt.create)(RawStr::borrowed(&json), &mut inst, e) });
    match code {
        status::OK if !inst.is_null() => {}
        status::PANIC => {
            return Err(PluginError::Rejected {
                plugin: lib.name.to_string(),
                reason: format!(
                    "its constructor panicked: {msg} (in {})",
                    lib.path.display()
                ),
            });
        }
        _ => {
            return Err(PluginError::Rejected {
                plugin: lib.name.to_string(),
                reason: if msg.is_empty() {
                    format!("error code {code}")
                } else {
                    msg
                },
            });
        }
    }
    if vt.kind == ytrainer_plugin::kind::PAIRWISE {
        return Ok(LossFn::Pairwise(Box::new(ExternalPairwise {
            inst: Instance {
                lib: lib.clone(),
                ptr: inst,
            },
            needs_reference: vt.needs & needs_bits::REFERENCE_LOSS != 0,
        })));
    }
    let n = Needs::from_raw(vt.needs, vt.top_k_entropy);
    let normalize = Normalize::from_raw(vt.normalize);
    Ok(LossFn::Token(Box::new(ExternalReweighter {
        inst: Instance {
            lib: lib.clone(),
            ptr: inst,
        },
        needs: n,
        normalize,
    })))
}

/// A plugin instance made by its library's `create`, destroyed with it.
struct Instance {
    lib: Arc<ExternalLib>,
    ptr: *mut c_void,
}

// SAFETY: the SDK requires `Plugin` / `PairPlugin: Send + Sync`, and an instance is only read by the library.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: made by this library's `create`, destroyed once.
        unsafe { (self.lib.vt().destroy)(self.ptr) };
    }
}

impl Instance {
    /// Names the plugin in messages.
    fn who(&self) -> String {
        format!(
            "external loss plugin `{}` ({})",
            self.lib.name,
            self.lib.path.display()
        )
    }

    /// Calls `f(vtable, instance, error buffer)` and turns its status into `Err` with the plugin's name.
    fn call(
        &self,
        f: impl FnOnce(&RawVTable, *mut c_void, *mut RawError) -> i32,
    ) -> Result<(), String> {
        let vt = self.lib.vt();
        let (code, msg) = call_with_err(|e| f(vt, self.ptr, e));
        match code {
            status::OK => Ok(()),
            status::PANIC => Err(format!("{} panicked: {msg}", self.who())),
            _ => Err(format!("{} failed: {msg}", self.who())),
        }
    }
}

/// An instance of an external plugin, as a [`TokenReweighter`].
pub struct ExternalReweighter {
    inst: Instance,
    needs: Needs,
    normalize: Normalize,
}

impl ExternalReweighter {
    /// Calls the library on host slices; checks the result. Public for benchmarks and tests.
    pub fn weights_host(
        &self,
        loss: &[f32],
        extra: HostExtras<'_>,
        step: u64,
        progress: f64,
    ) -> Result<Vec<f32>, String> {
        let n = loss.len();
        let ptr_f = |v: Option<&[f32]>| {
            v.filter(|v| v.len() == n)
                .map_or(std::ptr::null(), |v| v.as_ptr())
        };
        let ptr_u = |v: Option<&[u32]>| {
            v.filter(|v| v.len() == n)
                .map_or(std::ptr::null(), |v| v.as_ptr())
        };
        let batch = RawBatch {
            n,
            loss: loss.as_ptr(),
            entropy: ptr_f(extra.entropy),
            reference_loss: ptr_f(extra.reference_loss),
            position: ptr_u(extra.position),
            sample: ptr_u(extra.sample),
            step,
            progress,
            // A version-2 library reads only the fields before this one (see `ytrainer_plugin::v2`).
            top_k_entropy: ptr_f(extra.top_k_entropy),
        };
        let mut out = vec![0f32; n];
        // SAFETY: arrays hold `n` values (or are null), `out` has room for `n`, the instance is ours.
        self.inst
            .call(|vt, inst, e| unsafe { (vt.weights)(inst, &batch, out.as_mut_ptr(), e) })?;
        let who = self.inst.who();
        check_weights(&out, loss).map_err(|e| format!("{who} {e}"))?;
        Ok(out)
    }
}

/// Optional per-token arrays handed to an external plugin.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostExtras<'a> {
    /// Predictive entropy.
    pub entropy: Option<&'a [f32]>,
    /// Normalised top-k entropy.
    pub top_k_entropy: Option<&'a [f32]>,
    /// Reference-model loss.
    pub reference_loss: Option<&'a [f32]>,
    /// Position ids.
    pub position: Option<&'a [u32]>,
    /// Example indices.
    pub sample: Option<&'a [u32]>,
}

/// `Err("returned NaN for token 3 (loss 1.2)...")` on the first weight that is not finite and >= 0.
pub fn check_weights(w: &[f32], loss: &[f32]) -> Result<(), String> {
    for (i, &x) in w.iter().enumerate() {
        if !x.is_finite() || x < 0.0 {
            let what = if x.is_nan() {
                "NaN".to_string()
            } else {
                format!("weight {x}")
            };
            let l = loss.get(i).copied().unwrap_or(f32::NAN);
            return Err(format!(
                "returned {what} for token {i} (loss {l}); weights must be finite and >= 0 — fix the plugin's \
                 weight function"
            ));
        }
    }
    Ok(())
}

impl TokenReweighter for ExternalReweighter {
    fn needs(&self) -> Needs {
        self.needs
    }

    fn default_normalize(&self) -> Normalize {
        self.normalize
    }

    fn weights(&self, stats: &TokenStats) -> Tensor<1> {
        // `try_weights` is what the trainer calls; here a failure becomes NaN, which the trainer rejects.
        self.try_weights(stats).unwrap_or_else(|_| {
            let n = stats.loss.dims()[0];
            tensor_from_slice(&vec![f32::NAN; n], &stats.loss.device())
        })
    }

    fn try_weights(&self, stats: &TokenStats) -> Result<Tensor<1>, String> {
        let loss = tensor_to_vec(stats.loss.clone());
        let entropy = stats.entropy.clone().map(tensor_to_vec);
        // Only what the plugin's needs ask for: a version-2 library never asks for (nor reads) top-k entropy.
        let top_k_entropy = (self.needs.top_k_entropy > 0)
            .then(|| stats.top_k_entropy.clone().map(tensor_to_vec))
            .flatten();
        let reference = stats.reference_loss.clone().map(tensor_to_vec);
        let extra = HostExtras {
            entropy: entropy.as_deref(),
            top_k_entropy: top_k_entropy.as_deref(),
            reference_loss: reference.as_deref(),
            position: stats.position.as_deref(),
            sample: stats.sample.as_deref(),
        };
        let w = self.weights_host(&loss, extra, stats.step as u64, stats.progress)?;
        Ok(tensor_from_slice(&w, &stats.loss.device()))
    }
}

/// An instance of an external pairwise plugin, as a [`PairwiseObjective`].
///
/// The plugin returns each pair's loss `l` and its derivatives `d_c`, `d_r` with respect to the policy's chosen and
/// rejected log-probabilities; the objective handed to autodiff is `l + d_c (pc - sg(pc)) + d_r (pr - sg(pr))`
/// (`sg` = stop-gradient), whose value is `l` and whose gradient is the plugin's.
pub struct ExternalPairwise {
    inst: Instance,
    needs_reference: bool,
}

/// Host copies of one batch of pair statistics for [`ExternalPairwise::loss_host`].
#[derive(Debug, Clone, Copy)]
pub struct HostPairs<'a> {
    /// Policy log-probabilities of the chosen completions.
    pub policy_chosen: &'a [f32],
    /// Policy log-probabilities of the rejected completions.
    pub policy_rejected: &'a [f32],
    /// Reference log-probabilities, when the plugin needs them.
    pub reference: Option<(&'a [f32], &'a [f32])>,
    /// Completion lengths in tokens (chosen, rejected).
    pub lens: (&'a [f32], &'a [f32]),
}

/// `(loss, d_chosen, d_rejected)` per pair.
pub type PairResult = (Vec<f32>, Vec<f32>, Vec<f32>);

impl ExternalPairwise {
    /// Calls the library on host slices and checks that every output is finite. Public for tests.
    pub fn loss_host(
        &self,
        b: HostPairs<'_>,
        step: u64,
        progress: f64,
    ) -> Result<PairResult, String> {
        let n = b.policy_chosen.len();
        let ptr = |v: Option<&[f32]>| {
            v.filter(|v| v.len() == n)
                .map_or(std::ptr::null(), |v| v.as_ptr())
        };
        let batch = RawPairBatch {
            n,
            policy_chosen: b.policy_chosen.as_ptr(),
            policy_rejected: ptr(Some(b.policy_rejected)),
            reference_chosen: ptr(b.reference.map(|r| r.0)),
            reference_rejected: ptr(b.reference.map(|r| r.1)),
            chosen_len: ptr(Some(b.lens.0)),
            rejected_len: ptr(Some(b.lens.1)),
            step,
            progress,
        };
        let (mut loss, mut dc, mut dr) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        // SAFETY: input arrays hold `n` values (or are null), each output has room for `n`, the instance is ours.
        self.inst.call(|vt, inst, e| unsafe {
            (vt.pair_loss)(
                inst,
                &batch,
                loss.as_mut_ptr(),
                dc.as_mut_ptr(),
                dr.as_mut_ptr(),
                e,
            )
        })?;
        let who = self.inst.who();
        for (what, v) in [("loss", &loss), ("d_chosen", &dc), ("d_rejected", &dr)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!(
                    "{who} returned {what} {} for pair {i}; losses and derivatives must be finite — fix the \
                     plugin's loss function",
                    v[i]
                ));
            }
        }
        Ok((loss, dc, dr))
    }
}

impl PairwiseObjective for ExternalPairwise {
    fn needs_reference(&self) -> bool {
        self.needs_reference
    }

    fn loss(&self, stats: &PairStats) -> (Tensor<1>, Option<Tensor<1>>) {
        // `try_loss` is what the trainer calls; here a failure becomes NaN, which the trainer rejects.
        self.try_loss(stats).unwrap_or_else(|_| {
            let n = stats.policy_chosen.dims()[0];
            (
                tensor_from_slice(&vec![f32::NAN; n], &stats.policy_chosen.device()),
                None,
            )
        })
    }

    fn try_loss(&self, stats: &PairStats) -> Result<(Tensor<1>, Option<Tensor<1>>), String> {
        let host = |t: &Tensor<1>| tensor_to_vec(t.clone().detach().inner());
        let (pc, pr) = (host(&stats.policy_chosen), host(&stats.policy_rejected));
        let reference = match (&stats.reference_chosen, &stats.reference_rejected) {
            (Some(c), Some(r)) if self.needs_reference => Some((host(c), host(r))),
            _ => None,
        };
        let (lc, lr) = (host(&stats.chosen_len), host(&stats.rejected_len));
        let b = HostPairs {
            policy_chosen: &pc,
            policy_rejected: &pr,
            reference: reference
                .as_ref()
                .map(|(c, r)| (c.as_slice(), r.as_slice())),
            lens: (&lc, &lr),
        };
        let (loss, dc, dr) = self.loss_host(b, stats.step as u64, stats.progress)?;
        let device = stats.policy_chosen.device();
        let t = |v: &[f32]| tensor_from_slice(v, &device);
        let chosen = stats.policy_chosen.clone();
        let rejected = stats.policy_rejected.clone();
        let surrogate = t(&loss)
            + t(&dc).mul(chosen.clone() - chosen.detach())
            + t(&dr).mul(rejected.clone() - rejected.detach());
        Ok((surrogate, None))
    }
}
