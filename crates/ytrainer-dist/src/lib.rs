//! How a ytrainer process joins its data-parallel group: under `mpirun` / `srun` (detected from the launcher's
//! environment) it initialises MPI and hands the training loop an [`ytrainer_core::dist::Collective`] over
//! `MPI_COMM_WORLD`; otherwise it is the single process. The MPI part is the cargo feature `mpi` (the `mpi` crate
//! over the system's MPI library, Open MPI from Debian here), so the default build needs no MPI.
//!
//! Sums are a reduce to rank 0 followed by a broadcast, not `MPI_Allreduce`: the standard does not promise that an
//! all-reduce hands every rank the same bits, and replicas that differ by one rounding would drift apart.
//! MPI's default error handler is fatal, so a failed or lost peer ends every rank (mpirun names the rank).
//! A peer that hangs without dying fails nothing in MPI: every other rank would wait in its next collective call
//! forever. A watchdog thread therefore ends a rank whose collective call has waited longer than
//! `YTRAINER_COLLECTIVE_TIMEOUT` seconds ([`collective_timeout`]), and the launcher then ends the rest.

use std::sync::Arc;

use ytrainer_core::dist::{Collective, Group};

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(any(feature = "mpi", feature = "nccl"))]
mod watchdog;

/// The first of the launcher's variables `keys` that holds a number.
fn launcher_number(keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The number of processes the launcher started, when this process was started by one (`mpirun` of Open MPI,
/// MPICH's Hydra, Slurm's `srun` with PMI / PMIx).
pub fn launcher_world_size() -> Option<usize> {
    // Slurm sets SLURM_NTASKS in every job step's environment; only a task started by srun with MPI support
    // (PMI / PMIx) is part of a group.
    let under_pmi =
        std::env::var_os("PMIX_RANK").is_some() || std::env::var_os("PMI_RANK").is_some();
    let keys: &[&str] = if under_pmi {
        &[
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "PMIX_SIZE",
            "SLURM_NTASKS",
        ]
    } else {
        &["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
    };
    launcher_number(keys)
}

/// How long one collective call may wait for the other ranks before this rank gives up, the whole group with
/// it: `YTRAINER_COLLECTIVE_TIMEOUT` in seconds, default 600 (PyTorch's NCCL default is the same ten minutes);
/// `0` waits forever. It bounds how long a rank may run ahead of the slowest, so raise it when rank 0 alone does
/// something long while the others wait (exporting a very large merged model at the end of a run).
pub fn collective_timeout() -> Result<Option<std::time::Duration>, JoinError> {
    const VAR: &str = "YTRAINER_COLLECTIVE_TIMEOUT";
    let Ok(text) = std::env::var(VAR) else {
        return Ok(Some(std::time::Duration::from_secs(600)));
    };
    match text.trim().parse::<f64>() {
        Ok(0.0) => Ok(None),
        Ok(s) if s.is_finite() && s > 0.0 && s <= 1e7 => {
            Ok(Some(std::time::Duration::from_secs_f64(s)))
        }
        _ => Err(JoinError::Timeout(text)),
    }
}

/// Why a process could not join its group.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// `YTRAINER_COLLECTIVE_TIMEOUT` is not a number of seconds.
    #[error(
        "environment variable YTRAINER_COLLECTIVE_TIMEOUT = {0:?} is not a number of seconds: give how long one \
         collective call may wait for the other ranks (e.g. 600), or 0 to wait forever"
    )]
    Timeout(String),
    /// Started by a launcher with several processes, but built without MPI.
    #[error(
        "this process was started by an MPI launcher with {0} processes, but this ytrainer was built without MPI \
         support, so every process would train alone into the same run directory; build it with `cargo build \
         --release -p ytrainer-cli --features mpi` (needs Open MPI: apt-get install openmpi-bin libopenmpi-dev \
         libclang-dev), or run one process"
    )]
    NoMpi(usize),
    /// MPI could not be initialised.
    #[error("cannot initialise MPI: {0}")]
    Init(String),
    /// `YTRAINER_TRANSPORT` names no transport, or one this build or device cannot use.
    #[error("environment variable YTRAINER_TRANSPORT = {0:?}: {1}")]
    Transport(String, String),
    /// The NCCL communicator could not be set up.
    #[error("cannot set up NCCL: {0}")]
    Nccl(String),
}

/// The group a process belongs to, and what must live until the process ends (MPI is finalised when it drops).
pub struct Membership {
    /// The group handed to runs.
    pub group: Group,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<mpi_impl::Mpi>>,
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

impl Membership {
    /// The single process.
    pub fn single() -> Self {
        Membership {
            group: Group::default(),
            #[cfg(feature = "mpi")]
            mpi: None,
            #[cfg(feature = "mpi")]
            _universe: None,
        }
    }

    /// Ends every rank of the group at once (after an error on this rank: the others may be waiting for it in a
    /// collective call and would otherwise wait forever). Returns only in a single process.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.abort(code);
        }
        let _ = code;
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.group.get().world_size()
    }
}

/// Joins the launcher's group when started by one (MPI initialised, `MPI_THREAD_SERIALIZED`: collective calls
/// come from the thread that runs the command, which need not be the main thread), else the single process.
pub fn join() -> Result<Membership, JoinError> {
    let Some(n) = launcher_world_size() else {
        return Ok(Membership::single());
    };
    let timeout = collective_timeout()?;
    #[cfg(feature = "mpi")]
    {
        let _ = n;
        mpi_impl::init(timeout)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = timeout;
        if n > 1 {
            Err(JoinError::NoMpi(n))
        } else {
            Ok(Membership::single())
        }
    }
}

/// This process's index among the ranks on its node, when a launcher says (Open MPI, MPICH / Hydra, Slurm).
pub fn launcher_local_rank() -> Option<usize> {
    launcher_number(&[
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "PMI_LOCAL_RANK",
        "SLURM_LOCALID",
    ])
}

/// The device a rank of a data-parallel group trains on: a GPU kind without an index (`cuda`, `wgpu`) means the
/// rank's own GPU on its node, `cuda:<local rank>`; anything else (`cpu`, `cuda:3`) is taken as written.
pub fn rank_device(spec: &str, local_rank: Option<usize>) -> String {
    let s = spec.trim();
    match (s, local_rank) {
        ("cuda" | "wgpu", Some(l)) => format!("{s}:{l}"),
        _ => s.to_string(),
    }
}

/// The CUDA device index of a device string (`cuda` is 0), if it names a CUDA device.
fn cuda_index(device: &str) -> Option<usize> {
    match device.trim() {
        "cuda" => Some(0),
        d => d.strip_prefix("cuda:")?.parse().ok(),
    }
}

/// The group whose sums a run on `device` uses, as `YTRAINER_TRANSPORT` says: `auto` (unset: NCCL when this build
/// has the `nccl` feature, the device is CUDA and there are several ranks; otherwise the group as joined), `mpi`
/// (the group as joined: host buffers over MPI), or `nccl` (NCCL even for one rank, e.g. to check it on a
/// machine with one GPU). Every rank must call it at the same point: NCCL's set-up is collective.
pub fn transport_for(group: Group, device: &str) -> Result<Group, JoinError> {
    let choice = std::env::var("YTRAINER_TRANSPORT").unwrap_or_else(|_| "auto".into());
    let bad = |why: String| JoinError::Transport(choice.clone(), why);
    let want_nccl = match choice.trim() {
        "mpi" => false,
        "auto" => {
            cfg!(feature = "nccl") && cuda_index(device).is_some() && group.get().world_size() > 1
        }
        "nccl" => {
            if !cfg!(feature = "nccl") {
                return Err(bad(
                    "this ytrainer was built without NCCL; build it with `--features nccl` (with `mpi` for several processes), or unset it"
                        .into(),
                ));
            }
            if cuda_index(device).is_none() {
                return Err(bad(format!(
                    "NCCL sums on CUDA GPUs, but the run's device is `{device}`; train with `--device cuda` or unset it"
                )));
            }
            true
        }
        _ => return Err(bad("expected `auto`, `mpi` or `nccl`".into())),
    };
    if !want_nccl {
        return Ok(group);
    }
    #[cfg(feature = "nccl")]
    {
        let index = cuda_index(device).unwrap_or(0);
        let n = nccl::Nccl::new(group, index, collective_timeout()?)?;
        Ok(Group(Arc::new(n)))
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(bad("this ytrainer was built without NCCL".into()))
    }
}

/// The group of a membership as a shareable collective (for tests and benchmarks).
pub fn collective(m: &Membership) -> Arc<dyn Collective> {
    m.group.0.clone()
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use mpi::collective::SystemOperation;
    use mpi::environment::Threading;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use ytrainer_core::dist::{Collective, DistError, Group};

    use super::{JoinError, Membership};
    use crate::watchdog::{Watch, spawn_watchdog};

    /// Counts per MPI call: element counts are C `int`s.
    const CHUNK: usize = 1 << 28;

    /// `MPI_COMM_WORLD`.
    pub struct Mpi {
        world: Mutex<SimpleCommunicator>,
        rank: usize,
        size: usize,
        library: String,
        watch: Arc<Watch>,
    }

    // SAFETY: MPI was initialised with MPI_THREAD_SERIALIZED (checked in `init`): any thread may call MPI as long
    // as no two do so at once, which the mutex around the communicator guarantees.
    unsafe impl Send for Mpi {}
    // SAFETY: as above; every use of the communicator goes through the mutex.
    unsafe impl Sync for Mpi {}

    pub(super) fn init(timeout: Option<Duration>) -> Result<Membership, JoinError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| JoinError::Init("MPI was already initialised".into()))?;
        if threading < Threading::Serialized {
            return Err(JoinError::Init(format!(
                "the MPI library offers thread level {threading:?}; ytrainer needs MPI_THREAD_SERIALIZED"
            )));
        }
        let world = universe.world();
        let library = mpi::environment::library_version()
            .map(|v| v.split([',', '\n']).next().unwrap_or("").trim().to_string())
            .unwrap_or_else(|_| "MPI".into());
        let watch = Arc::new(Watch::default());
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if let Some(timeout) = timeout {
            spawn_watchdog(watch.clone(), timeout, rank, size);
        }
        let m = Arc::new(Mpi {
            rank,
            size,
            world: Mutex::new(world),
            library,
            watch,
        });
        Ok(Membership {
            group: Group(m.clone()),
            mpi: Some(m),
            _universe: Some(universe),
        })
    }

    impl Mpi {
        fn world(&self) -> MutexGuard<'_, SimpleCommunicator> {
            self.world.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(super) fn abort(&self, code: i32) -> ! {
            self.world().abort(code)
        }

        fn sum<T: Equivalence + Copy>(&self, buf: &mut [T]) {
            let _in_call = self.watch.enter("sum of gradients or counters");
            let w = self.world();
            let root = w.process_at_rank(0);
            for chunk in buf.chunks_mut(CHUNK) {
                if self.rank == 0 {
                    let send = chunk.to_vec();
                    root.reduce_into_root(&send[..], chunk, SystemOperation::sum());
                } else {
                    root.reduce_into(&chunk[..], SystemOperation::sum());
                }
                root.broadcast_into(chunk);
            }
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), DistError> {
            self.sum(buf);
            Ok(())
        }
        fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            self.sum(buf);
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), DistError> {
            if root >= self.size {
                return Err(DistError::Transport(format!(
                    "broadcast from rank {root} in a group of {}",
                    self.size
                )));
            }
            let _in_call = self.watch.enter("broadcast");
            let w = self.world();
            let r = w.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            r.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            for chunk in buf.chunks_mut(CHUNK) {
                r.broadcast_into(chunk);
            }
            Ok(())
        }
        fn barrier(&self) -> Result<(), DistError> {
            let _in_call = self.watch.enter("barrier");
            self.world().barrier();
            Ok(())
        }
        fn describe(&self) -> String {
            format!("MPI, {}", self.library)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_kind_without_index_is_the_ranks_own_gpu() {
        assert_eq!(rank_device("cuda", Some(3)), "cuda:3");
        assert_eq!(rank_device(" wgpu ", Some(1)), "wgpu:1");
        assert_eq!(rank_device("cuda:0", Some(3)), "cuda:0");
        assert_eq!(rank_device("cpu", Some(3)), "cpu");
        assert_eq!(rank_device("cuda", None), "cuda");
        assert_eq!(cuda_index("cuda"), Some(0));
        assert_eq!(cuda_index("cuda:7"), Some(7));
        assert_eq!(cuda_index("cuda:x"), None);
        assert_eq!(cuda_index("wgpu:1"), None);
        assert_eq!(cuda_index("cpu"), None);
    }
}
