//! MurmurHash3 x86 32-bit with seed 0: the hash flagd's `fractional`
//! operator buckets with, so a key lands in the same bucket here as in
//! every flagd provider.

/// MurmurHash3 (x86, 32-bit) of `bytes` with seed 0.
pub(crate) fn murmur3_32(bytes: &[u8]) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h: u32 = 0;
    let mut chunks = bytes.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k: u32 = 0;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    h ^= bytes.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The bucket of `hash` in `[0, total)`: `(hash * total) >> 32`, flagd's
/// integer scheme, exact for any total up to `i32::MAX`.
pub(crate) fn bucket(hash: u32, total: u32) -> u64 {
    (u64::from(hash) * u64::from(total)) >> 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_vectors() {
        // Published vectors of the reference implementation (smhasher).
        assert_eq!(murmur3_32(b""), 0);
        assert_eq!(murmur3_32(b"hello"), 0x248b_fa47);
        assert_eq!(murmur3_32(b"hello, world"), 0x149b_bb7f);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog"),
            0x2e4f_f723
        );
    }

    #[test]
    fn buckets_span_the_whole_range() {
        assert_eq!(bucket(0, 100), 0);
        assert_eq!(bucket(u32::MAX, 100), 99);
        assert_eq!(bucket(u32::MAX / 2, 100), 49);
    }
}
