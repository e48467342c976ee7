//! A minimal ustar writer for tests that build layers and bootstrap layers by hand.

/// A ustar archive of directories (`None`) and regular files, in order, with the two zero
/// blocks at its end.
pub fn ustar<S: AsRef<str>>(entries: &[(S, Option<Vec<u8>>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        let mut h = [0u8; 512];
        let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
        let len = data.as_ref().map_or(0, Vec::len);
        put(&mut h, 0, name.as_ref().as_bytes());
        put(
            &mut h,
            100,
            if data.is_some() {
                b"0000644\0"
            } else {
                b"0000755\0"
            },
        );
        put(&mut h, 108, b"0000000\0");
        put(&mut h, 116, b"0000000\0");
        put(&mut h, 124, format!("{len:011o}\0").as_bytes());
        put(&mut h, 136, b"00000000000\0");
        put(&mut h, 148, b"        ");
        h[156] = if data.is_some() { b'0' } else { b'5' };
        put(&mut h, 257, b"ustar\0");
        put(&mut h, 263, b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        if let Some(d) = data {
            out.extend_from_slice(d);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}
