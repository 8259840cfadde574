//! Sums over NCCL for ranks that train on CUDA GPUs (the Horovod design: the launcher's group, MPI, is the control
//! plane that hands every rank rank 0's NCCL unique id; NCCL moves the gradients over NVLink / InfiniBand with
//! GPU-direct transfers). Behind the cargo feature `nccl`; the library is loaded at run time (cudarc's dynamic
//! loading), so building needs no CUDA toolkit.
//!
//! The sums are host-staged: the training loop hands the collective one flat host buffer of gradients (the same
//! seam as MPI), which is copied to the rank's GPU, summed in place by `ncclAllReduce` and copied back. Burn 0.22
//! exposes no raw device pointer of a tensor, so summing the gradients where they live would need cubecl's
//! handles; the copies cost two PCIe transfers of the gradient bytes per step, small next to a step for LoRA.
//! NCCL's ring all-reduce hands every rank the same bits (each chunk is reduced once, then gathered), which the
//! replicas need to stay identical.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use ytrainer_core::dist::{Collective, DistError, Group};

use crate::JoinError;
use crate::watchdog::{Watch, spawn_watchdog};

/// Elements per NCCL call and per staging buffer (1 GiB of f32).
const CHUNK: usize = 1 << 28;

/// A NCCL communicator over the ranks of a control group, one GPU per rank.
pub(crate) struct Nccl {
    control: Group,
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    device: usize,
    version: String,
    watch: Arc<Watch>,
}

// SAFETY: the communicator's raw handle is used only under the mutex, one call at a time, which is all NCCL asks
// of a communicator shared between threads; the stream is cudarc's thread-safe handle.
unsafe impl Send for Nccl {}
// SAFETY: as above.
unsafe impl Sync for Nccl {}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Transport(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Joins every rank of `control` into one NCCL communicator on CUDA device `device`, then checks it with a sum
    /// whose answer is known (a broken fabric fails here, before any training step depends on it).
    pub(crate) fn new(
        control: Group,
        device: usize,
        timeout: Option<Duration>,
    ) -> Result<Self, JoinError> {
        // SAFETY: these only try to open the shared libraries by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(JoinError::Nccl(
                "no CUDA driver (libcuda) on this machine: NCCL needs NVIDIA GPUs; set YTRAINER_TRANSPORT=mpi to \
                 sum gradients over MPI instead"
                    .into(),
            ));
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(JoinError::Nccl(
                "the NCCL library was not found (looked for libnccl.so and the names cudarc knows; NCCL's own \
                 soname is libnccl.so.2): install NCCL, or put a directory with a `libnccl.so` link to it on \
                 LD_LIBRARY_PATH (PyTorch's wheel ships one under site-packages/nvidia/nccl/lib), or set \
                 YTRAINER_TRANSPORT=mpi"
                    .into(),
            ));
        }
        let (rank, size) = (control.get().rank(), control.get().world_size());
        let ctx = CudaContext::new(device)
            .map_err(|e| JoinError::Nccl(format!("cannot open CUDA device {device}: {e:?}")))?;
        let stream = ctx.default_stream();
        let mut id_bytes: Vec<u8> = if rank == 0 {
            let id = Id::new().map_err(|e| JoinError::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        control
            .get()
            .broadcast_bytes(&mut id_bytes, 0)
            .map_err(|e| JoinError::Nccl(format!("sending rank 0's NCCL id: {e}")))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(JoinError::Nccl(format!(
                "rank 0's NCCL id has {} bytes, expected {}",
                id_bytes.len(),
                internal.len()
            )));
        }
        for (dst, src) in internal.iter_mut().zip(&id_bytes) {
            *dst = *src as std::ffi::c_char;
        }
        let comm =
            Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal)).map_err(|e| {
                JoinError::Nccl(format!("ncclCommInitRank (rank {rank} of {size}): {e:?}"))
            })?;
        let version = cudarc::nccl::result::get_nccl_version()
            .map(|v| format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
            .unwrap_or_else(|_| "?".into());
        let watch = Arc::new(Watch::default());
        if let Some(t) = timeout {
            spawn_watchdog(watch.clone(), t, rank, size);
        }
        let n = Nccl {
            control,
            comm: Mutex::new(comm),
            stream,
            device,
            version,
            watch,
        };
        let mut probe = vec![(rank + 1) as f32; 8];
        n.all_reduce_f32(&mut probe)
            .map_err(|e| JoinError::Nccl(format!("first sum: {e}")))?;
        let want = (size * (size + 1) / 2) as f32;
        if probe.iter().any(|&v| v != want) {
            return Err(JoinError::Nccl(format!(
                "the check sum over {size} rank(s) gave {probe:?}, expected {want} everywhere"
            )));
        }
        Ok(n)
    }

    fn sum<T: NcclType + DeviceRepr>(&self, buf: &mut [T]) -> Result<(), DistError> {
        let _in_call = self.watch.enter("NCCL sum of gradients or counters");
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in buf.chunks_mut(CHUNK) {
            let mut d = self
                .stream
                .clone_htod(&*chunk)
                .map_err(|e| nccl_error("copy to the GPU", e))?;
            comm.all_reduce_in_place(&mut d, &ReduceOp::Sum)
                .map_err(|e| nccl_error("all-reduce", e))?;
            self.stream
                .memcpy_dtoh(&d, chunk)
                .map_err(|e| nccl_error("copy from the GPU", e))?;
            self.stream
                .synchronize()
                .map_err(|e| nccl_error("synchronize", e))?;
        }
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.control.get().rank()
    }
    fn world_size(&self) -> usize {
        self.control.get().world_size()
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.sum(buf)
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        self.sum(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), DistError> {
        self.control.get().broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.control.get().barrier()
    }
    fn sums_needed(&self) -> bool {
        // Even one rank sums through NCCL, so a machine with one GPU exercises the transport.
        true
    }
    fn describe(&self) -> String {
        format!(
            "NCCL {} on cuda:{}, host-staged; control: {}",
            self.version,
            self.device,
            self.control.get().describe()
        )
    }
}
