//! The reduction seam of data-parallel training: what the one training loop needs from a group of processes
//! (rank, world size, sums of host buffers, a broadcast, a barrier), a single-process implementation that does
//! nothing, and the helpers the loop builds on it (sharding a step, reducing tallies and gradients, checking
//! that every rank runs the same config).
//!
//! A data-parallel step equals the single-process step over the same global batch: every rank plans the same
//! global steps, takes the micro-batches `i` with `i % world == rank` ([`Shard::owns`]), and the loop sums the
//! objective's counters ([`Tally`]) and the gradients over the ranks before it normalises, takes the global
//! norm, clips and updates. Micro-batches are never split, so anything a plugin computes over a micro-batch
//! (rho1's top-k, truncation's quantile) sees exactly what it sees in a single process. The MPI implementation
//! lives in the `ytrainer-dist` crate.

use std::time::Instant;

/// A failed collective operation (a peer died, the transport broke) or ranks that disagree.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DistError {
    /// The transport reported an error.
    #[error("data-parallel communication failed: {0}")]
    Transport(String),
    /// A rank runs a different config than rank 0.
    #[error(
        "rank {rank} of {world} runs a different config than rank 0 ({differing}); every rank must be started \
         with the same config file and flags"
    )]
    ConfigMismatch {
        /// The first rank that differs.
        rank: usize,
        /// Number of ranks.
        world: usize,
        /// `key: rank 0's value -> this rank's value`, comma-separated.
        differing: String,
    },
    /// A rank planned a different number of steps than rank 0 (its data differs).
    #[error(
        "rank {rank} of {world} planned {steps} optimizer steps but rank 0 planned {root_steps}: the ranks read \
         different training data; give every rank the same data file (a shared file system or identical copies)"
    )]
    PlanMismatch {
        /// The first rank that differs.
        rank: usize,
        /// Number of ranks.
        world: usize,
        /// Its steps.
        steps: usize,
        /// Rank 0's steps.
        root_steps: usize,
    },
}

/// Collective operations over a fixed group of processes (ranks `0..world_size`). Every rank must call the same
/// operations in the same order with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by its element-wise sum over all ranks; every rank receives the same bits.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// [`Collective::all_reduce_f32`] for f64 (counters, scalars).
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Replaces `buf` on every rank by `root`'s `buf` (lengths may differ before the call).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), DistError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
    /// Whether the loop sums over this group: several ranks, or a transport exercised with one rank (a 1-rank
    /// NCCL group checks NCCL on a machine with one GPU; its sums change nothing).
    fn sums_needed(&self) -> bool {
        self.world_size() > 1
    }
    /// A short description for logs (`"MPI (Open MPI 4.1.4)"`).
    fn describe(&self) -> String {
        "single process".to_string()
    }
}

/// One process: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

/// The group of one process, the default of every run.
pub static SINGLE: SingleProcess = SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
}

/// A shareable handle on a run's group (the single process unless a launcher says otherwise).
#[derive(Clone)]
pub struct Group(pub std::sync::Arc<dyn Collective>);

impl Group {
    /// The collective behind the handle.
    pub fn get(&self) -> &dyn Collective {
        self.0.as_ref()
    }
    /// Whether this process writes the run's files (rank 0).
    pub fn is_writer(&self) -> bool {
        self.0.rank() == 0
    }
}

impl Default for Group {
    fn default() -> Self {
        Group(std::sync::Arc::new(SingleProcess))
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rank {} of {} ({})",
            self.0.rank(),
            self.0.world_size(),
            self.0.describe()
        )
    }
}

/// Which share of a step's micro-batches (or an evaluation's) this rank takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Shard {
    /// The whole step (one process).
    pub const ALL: Shard = Shard { rank: 0, world: 1 };

    /// The shard of `dist`'s rank.
    pub fn of(dist: &dyn Collective) -> Shard {
        Shard {
            rank: dist.rank(),
            world: dist.world_size().max(1),
        }
    }

    /// Whether micro-batch `i` of a step (in plan order) is this rank's: round robin, a pure function of the
    /// global plan, so every rank agrees without talking.
    pub fn owns(&self, i: usize) -> bool {
        i % self.world == self.rank
    }

    /// Which of a step's micro-batches are this rank's, balanced by `costs` (padded tokens: what a micro-batch's
    /// forward and backward cost): longest first, each to the rank with the least work so far (ties to the lower
    /// rank). Round robin gives one rank the long micro-batches whenever lengths vary, and every rank waits for
    /// the slowest at the all-reduce; this is a pure function of the global plan, so the ranks agree without
    /// talking, and the sum of gradients is the same whoever computes each term.
    pub fn deal(&self, costs: &[usize]) -> Vec<bool> {
        if self.world <= 1 {
            return vec![true; costs.len()];
        }
        let mut order: Vec<usize> = (0..costs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(costs[i]));
        let mut load = vec![0usize; self.world];
        let mut mine = vec![false; costs.len()];
        for i in order {
            let r = (0..self.world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += costs[i].max(1);
            mine[i] = r == self.rank;
        }
        mine
    }
}

/// Per-step (or per-evaluation) tallies that add up across ranks: counts, sums of losses and weights. The loop
/// sums them over the ranks before the objective derives its normaliser and metrics from them.
pub trait Tally {
    /// The tally as numbers in a fixed order (counts as f64: exact below 2^53).
    fn to_sums(&self) -> Vec<f64>;
    /// Replaces the tally by `sums` (the element-wise sums of every rank's [`Tally::to_sums`]).
    fn set_sums(&mut self, sums: &[f64]);
}

/// Sums a tally over all ranks in place (nothing to do in one process).
pub fn reduce_tally<T: Tally>(dist: &dyn Collective, t: &mut T) -> Result<(), DistError> {
    if !dist.sums_needed() {
        return Ok(());
    }
    let mut v = t.to_sums();
    dist.all_reduce_f64(&mut v)?;
    t.set_sums(&v);
    Ok(())
}

/// What the loop spent on communication: bytes summed and seconds inside collective calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommStats {
    /// Bytes this rank contributed to all-reduces (gradients and tallies).
    pub bytes: u64,
    /// Seconds spent in collective calls once every rank had arrived (the transfer itself).
    pub seconds: f64,
    /// Seconds spent waiting for the slowest rank to finish its share of the step (load imbalance).
    pub wait_seconds: f64,
    /// Steps whose gradients were reduced.
    pub steps: usize,
    /// Seconds of each such step's transfer (tally and gradients).
    pub step_seconds: Vec<f64>,
}

impl CommStats {
    /// Times `f` and adds `bytes`.
    pub fn time<T>(&mut self, bytes: usize, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.seconds += t.elapsed().as_secs_f64();
        self.bytes += bytes as u64;
        r
    }

    /// The median of the per-step transfer times: on a shared machine a few steps stall for a scheduler
    /// time slice, which the mean would report as the typical cost.
    pub fn median_step_seconds(&self) -> f64 {
        let mut v = self.step_seconds.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

/// Every rank checks that it runs rank 0's config (`fingerprint`: canonical JSON of everything that shapes the
/// trajectory) before anything else is exchanged. All ranks learn the verdict, so they stop together with the
/// same message, naming the first differing rank and the keys that differ.
pub fn check_same_config(dist: &dyn Collective, fingerprint: &str) -> Result<(), DistError> {
    let world = dist.world_size();
    if world <= 1 {
        return Ok(());
    }
    let mut root = fingerprint.as_bytes().to_vec();
    dist.broadcast_bytes(&mut root, 0)?;
    let mut differs = vec![0f64; world];
    differs[dist.rank()] = f64::from(u8::from(root != fingerprint.as_bytes()));
    dist.all_reduce_f64(&mut differs)?;
    let Some(rank) = differs.iter().position(|&d| d > 0.0) else {
        return Ok(());
    };
    // The differing rank sends its fingerprint so every rank can name the keys.
    let mut theirs = fingerprint.as_bytes().to_vec();
    dist.broadcast_bytes(&mut theirs, rank)?;
    let differing = crate::trainer::config_diff(
        &String::from_utf8_lossy(&root),
        &String::from_utf8_lossy(&theirs),
    )
    .join(", ");
    Err(DistError::ConfigMismatch {
        rank,
        world,
        differing,
    })
}

/// Every rank checks that it planned as many steps as rank 0 (a cheap guard against different data behind the
/// same path).
pub fn check_same_plan(dist: &dyn Collective, steps: usize) -> Result<(), DistError> {
    let world = dist.world_size();
    if world <= 1 {
        return Ok(());
    }
    let mut all = vec![0f64; world];
    all[dist.rank()] = steps as f64;
    dist.all_reduce_f64(&mut all)?;
    match all.iter().position(|&s| s != all[0]) {
        None => Ok(()),
        Some(rank) => Err(DistError::PlanMismatch {
            rank,
            world,
            steps: all[rank] as usize,
            root_steps: all[0] as usize,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dealt_shards_cover_every_micro_batch_once_and_balance_the_tokens() {
        // One long micro-batch among short ones: round robin also gives its rank half of the short ones.
        let costs = [4096, 512, 512, 512, 512, 512, 512, 512, 512];
        for world in 1..5 {
            let shards: Vec<Vec<bool>> = (0..world)
                .map(|rank| Shard { rank, world }.deal(&costs))
                .collect();
            for i in 0..costs.len() {
                assert_eq!(
                    shards.iter().filter(|s| s[i]).count(),
                    1,
                    "world {world}, mb {i}"
                );
            }
            let load = |mine: &dyn Fn(usize) -> bool| -> usize {
                (0..costs.len())
                    .filter(|&i| mine(i))
                    .map(|i| costs[i])
                    .sum()
            };
            let dealt = (0..world).map(|r| load(&|i| shards[r][i])).max().unwrap();
            let robin = (0..world)
                .map(|r| load(&|i| Shard { rank: r, world }.owns(i)))
                .max()
                .unwrap();
            assert!(dealt <= robin, "world {world}: {dealt} > {robin}");
            if world == 2 {
                assert_eq!((dealt, robin), (4096, 6144));
            }
        }
    }

    #[test]
    fn round_robin_shards_cover_every_micro_batch_once() {
        for world in 1..5 {
            for i in 0..17 {
                let owners = (0..world)
                    .filter(|&rank| Shard { rank, world }.owns(i))
                    .count();
                assert_eq!(owners, 1, "micro-batch {i} over {world} ranks");
            }
        }
        assert!((0..9).all(|i| Shard::ALL.owns(i)));
    }

    #[test]
    fn single_process_is_the_identity() {
        let mut v = vec![1.5f32, -2.0];
        SINGLE.all_reduce_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let mut b = b"abc".to_vec();
        SINGLE.broadcast_bytes(&mut b, 0).unwrap();
        assert_eq!(b, b"abc");
        check_same_config(&SINGLE, "{}").unwrap();
        check_same_plan(&SINGLE, 3).unwrap();
        assert_eq!(Shard::of(&SINGLE), Shard::ALL);
    }
}
