//! A small seeded generator for weight initialisation.
//!
//! Our own (core's SplitMix64, [`ytrainer_core::rng`], + Box-Muller) rather than the device RNG so that the same
//! seed gives the same weights on every backend and every Burn version: LoRA inits and the `tiny` preset must be
//! reproducible across machines.

use ytrainer_core::rng::SplitMix64;

/// Core's SplitMix64 with per-tensor seeding and the uniform / normal draws of initialisation.
#[derive(Debug, Clone)]
pub struct InitRng(SplitMix64);

impl InitRng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
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
        self.0.next_u64()
    }

    /// Uniform in [0, 1) (53 bits; scaling by `2^-53` is exact, so it equals `(bits >> 11) / 2^53`).
    pub fn next_f64(&mut self) -> f64 {
        self.0.next_f64()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams recorded from the generator's own SplitMix64 before it became core's: LoRA inits and the `tiny`
    /// preset's weights must not change.
    #[test]
    fn streams_are_unchanged() {
        let mut r = InitRng::for_tensor(42, "model.layers.0.self_attn.q_proj.lora_A");
        assert_eq!(r.next_u64(), 2930647907834696648);
        let u: Vec<u32> = r
            .uniform(3, -0.5, 0.5)
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(u, [3198256385, 1039817741, 1049118126]);
        let n: Vec<u32> = InitRng::for_tensor(7, "embed")
            .normal(3, 0.0, 0.02)
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(n, [3148771515, 1000717482, 3149931298]);
        let mut r = InitRng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_f64().to_bits(), 4595424208203033092);
    }
}
