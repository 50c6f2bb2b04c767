//! FNV-1a hashing for the short string keys (job ids, namespaces) looked up on every pass.
//!
//! The keys come from the operator, not from an adversary on the network, so the DoS resistance
//! of std's SipHash buys nothing here and costs a noticeable share of a pass. (A crate such as
//! `rustc-hash` would do the same; this crate keeps to std.)

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A 64-bit FNV-1a hasher.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A map keyed through [`Fnv`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;
