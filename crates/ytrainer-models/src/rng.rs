//! A small seeded generator for weight initialisation.
//!
//! Our own (SplitMix64 + Box-Muller) rather than the device RNG so that the same seed gives the same weights on
//! every backend and every Burn version: LoRA inits and the `tiny` preset must be reproducible across machines.

/// SplitMix64: tiny, fast, statistically fine for initialisation.
#[derive(Debug, Clone)]
pub struct InitRng {
    state: u64,
}

impl InitRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one named tensor, independent of the order in which tensors are initialised.
    pub fn for_tensor(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = Self::new(seed ^ h);
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` values uniform in [low, high).
    pub fn uniform(&mut self, n: usize, low: f64, high: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (low + (high - low) * self.next_f64()) as f32)
            .collect()
    }

    /// `n` values from N(mean, std^2) (Box-Muller).
    pub fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let u1 = 1.0 - self.next_f64(); // (0, 1]: log is finite
            let u2 = self.next_f64();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            out.push((mean + std * r * t.cos()) as f32);
            if out.len() < n {
                out.push((mean + std * r * t.sin()) as f32);
            }
        }
        out
    }
}
