//! The layouts of ABI version 2, which a host still loads. Each is an exact prefix of its version-3 successor
//! (checked at compile time below), so version 3 changed nothing a version-2 plugin reads.

use std::ffi::c_void;

use crate::{RawPairBatch, RawParam, RawStr};

/// The version-2 vtable: [`crate::RawVTable`] without `top_k_entropy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawVTable {
    /// 2.
    pub abi_version: u32,
    /// See [`crate::RawVTable::kind`].
    pub kind: u32,
    /// [`crate::needs_bits`] up to `REFERENCE_LOSS`.
    pub needs: u32,
    /// See [`crate::RawVTable::normalize`].
    pub normalize: u32,
    /// See [`crate::RawVTable::name`].
    pub name: RawStr,
    /// See [`crate::RawVTable::description`].
    pub description: RawStr,
    /// See [`crate::RawVTable::formula`].
    pub formula: RawStr,
    /// See [`crate::RawVTable::params`].
    pub params: *const RawParam,
    /// See [`crate::RawVTable::n_params`].
    pub n_params: usize,
    /// See [`crate::RawVTable::create`].
    pub create: unsafe extern "C" fn(
        params_json: RawStr,
        out: *mut *mut c_void,
        err: *mut crate::RawError,
    ) -> i32,
    /// Reads a [`RawBatch`] (a version-3 batch starts with one).
    pub weights: unsafe extern "C" fn(
        instance: *mut c_void,
        batch: *const RawBatch,
        out: *mut f32,
        err: *mut crate::RawError,
    ) -> i32,
    /// See [`crate::RawVTable::pair_loss`].
    pub pair_loss: unsafe extern "C" fn(
        instance: *mut c_void,
        batch: *const RawPairBatch,
        loss: *mut f32,
        d_chosen: *mut f32,
        d_rejected: *mut f32,
        err: *mut crate::RawError,
    ) -> i32,
    /// See [`crate::RawVTable::destroy`].
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}

/// The version-2 batch: [`crate::RawBatch`] without `top_k_entropy`.
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
    pub fn upgrade(&self) -> crate::RawVTable {
        crate::RawVTable {
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
                        *mut crate::RawError,
                    ) -> i32,
                    unsafe extern "C" fn(
                        *mut c_void,
                        *const crate::RawBatch,
                        *mut f32,
                        *mut crate::RawError,
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
same_offsets!(RawVTable, crate::RawVTable: abi_version, kind, needs, normalize, name, description,
    formula, params, n_params, create, weights, pair_loss, destroy);
same_offsets!(RawBatch, crate::RawBatch: n, loss, entropy, reference_loss, position, sample, step,
    progress);
const _: () = assert!(
    std::mem::offset_of!(crate::RawVTable, top_k_entropy) >= std::mem::size_of::<RawVTable>()
);
const _: () = assert!(
    std::mem::offset_of!(crate::RawBatch, top_k_entropy) >= std::mem::size_of::<RawBatch>()
);
