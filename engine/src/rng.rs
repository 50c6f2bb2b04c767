//! Counter-based randomness: every draw is a pure function of (seed, stream, counter).
//!
//! candle's CPU generator cannot be seeded, and a counter-based design makes resume exact: the
//! state to checkpoint is a counter, not an opaque generator.

/// SplitMix64 finaliser: a well-mixed 64-bit hash of one word.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a hash of a name, used to key a parameter's initialisation stream.
pub fn name_hash(name: &str) -> u64 {
    flotilla_contract::fnv::fnv1a_64(name.as_bytes())
}

/// A deterministic stream of random numbers keyed by `(seed, stream)`, positioned at `counter`.
#[derive(Clone, Debug)]
pub struct CounterRng {
    key: u64,
    /// Draws taken so far; restoring it restores the stream exactly.
    pub counter: u64,
}

impl CounterRng {
    /// A stream for `seed` and `stream` starting at draw `counter`.
    pub fn new(seed: u64, stream: u64, counter: u64) -> Self {
        Self { key: mix64(seed ^ mix64(stream)), counter }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let out = mix64(self.key ^ mix64(self.counter));
        self.counter += 1;
        out
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift; the bias is below 2^-32 for the small ranges used here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A standard normal draw (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// `n` normal values with standard deviation `std`, a pure function of `(seed, name)`.
pub fn normal_init(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let mut rng = CounterRng::new(seed, name_hash(name), 0);
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_keyed_by_seed_and_name() {
        let a = normal_init(1, "model.embed_tokens.weight", 64, 0.02);
        assert_eq!(a, normal_init(1, "model.embed_tokens.weight", 64, 0.02));
        assert_ne!(a, normal_init(2, "model.embed_tokens.weight", 64, 0.02));
        assert_ne!(a, normal_init(1, "lm_head.weight", 64, 0.02));
        let big = normal_init(3, "x", 20_000, 1.0);
        let mean = big.iter().map(|&x| f64::from(x)).sum::<f64>() / 20_000.0;
        let var = big.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / 20_000.0;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }

    #[test]
    fn counter_restores_the_stream() {
        let mut a = CounterRng::new(7, 3, 0);
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let mut b = CounterRng::new(7, 3, 2);
        assert_eq!(b.next_u64(), first[2]);
    }
}
