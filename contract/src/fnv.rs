//! FNV-1a: the one small, stable, non-cryptographic hash of names (parameter names, job UIDs,
//! node names). Stable across processes, versions and platforms, unlike `std`'s hasher, so its
//! values may be written down (file names, seeds, revisions).

/// FNV-1a 64-bit offset basis: the state before any byte.
pub const OFFSET_BASIS_64: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME_64: u64 = 0x0100_0000_01b3;
/// FNV-1a 32-bit offset basis: the state before any byte.
pub const OFFSET_BASIS_32: u32 = 0x811c_9dc5;
const PRIME_32: u32 = 0x0100_0193;

/// The 64-bit FNV-1a hash of `bytes`.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    fnv1a_64_from(OFFSET_BASIS_64, bytes)
}

/// Continues a 64-bit FNV-1a hash from `state` over `bytes` (a seed mixed into the basis keys
/// the hash).
pub fn fnv1a_64_from(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME_64))
}

/// The 32-bit FNV-1a hash of `bytes`.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(OFFSET_BASIS_32, |h, &b| (h ^ u32::from(b)).wrapping_mul(PRIME_32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
        assert_eq!(fnv1a_64_from(OFFSET_BASIS_64, b"foobar"), fnv1a_64(b"foobar"));
    }
}
