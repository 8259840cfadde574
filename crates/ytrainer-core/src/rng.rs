//! The one small PRNG the project writes itself, and the per-step seed.
//!
//! Preference plans, shuffles, benchmark batches, sampling and weight initialisation (ytrainer-models' `InitRng`
//! is this generator with per-tensor seeding) use SplitMix64 (Steele et al. 2014) rather than a dependency's
//! generator so that a seed means the same stream forever: a resumed run, a re-run benchmark and a documented
//! generation all reproduce exactly, whatever version of `rand` is in the lock file.
//!
//! One stream does not come from here: the SFT epoch plan (`ytrainer_data::batch::plan_epoch`, in the data crate,
//! which sits below this one) shuffles with ChaCha8 (`rand_chacha`, pinned). It is a different algorithm, not a
//! copy of this one, and moving it onto SplitMix64 would change every plan (and the resume of every run planned
//! with it), so it stays as it is. LoRA dropout draws on the device, seeded by [`step_seed`].

/// SplitMix64: a 64-bit state advanced by the golden-ratio increment, output through a fixed mixer.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

/// The golden-ratio increment (`2^64 / phi`), also used to spread step indices over seeds.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    /// A stream starting from `state`.
    pub fn new(state: u64) -> Self {
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The device seed of optimizer step `index`: any randomness inside a step (LoRA dropout) is a function of
/// `(seed, step)`, so a resumed run draws exactly what the uninterrupted run drew.
pub fn step_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add((index as u64).wrapping_mul(GOLDEN))
}

/// The device seed of micro-batch `i` of a step whose seed is `step_seed`: randomness inside a micro-batch
/// (LoRA dropout) is a function of `(seed, step, micro-batch)`, whichever data-parallel rank runs it. The first
/// micro-batch keeps the step's seed.
pub fn micro_batch_seed(step_seed: u64, i: usize) -> u64 {
    if i == 0 {
        return step_seed;
    }
    SplitMix64::new(step_seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // First outputs of SplitMix64 seeded with 1234567 (the reference C implementation's test vector).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }
}
