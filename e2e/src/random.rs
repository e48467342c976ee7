//! Deterministic pseudo-random bytes (xorshift64), for blobs whose content only has to be
//! incompressible and reproducible — never secret.

/// `len` pseudo-random bytes from `seed` (the same seed and length give the same bytes).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    if x == 0 {
        x = 1;
    }
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn reproducible_and_seeded() {
        let a = super::pseudo_random(1000, 1);
        assert_eq!(a, super::pseudo_random(1000, 1));
        assert_ne!(a, super::pseudo_random(1000, 2));
        assert_eq!(a.len(), 1000);
    }
}
