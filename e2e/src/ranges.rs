//! Range-request expectations shared by the proxy tests and the harness self-test (which runs them
//! against the origin registry, the reference implementation): start, middle, last byte, open-ended,
//! suffix and over-long ranges answer 206 with the right `Content-Range` and bytes; a range starting
//! past the end answers 416.

use anyhow::{ensure, Result};

use crate::http;

/// Checks ranged GETs of `url` (a blob whose content is `bytes`) through `client`.
pub fn check_ranges(client: &reqwest::blocking::Client, url: &str, bytes: &[u8]) -> Result<()> {
    let len = bytes.len() as u64;
    let mid = len / 2;
    let cases: Vec<(String, u64, u64)> = vec![
        ("bytes=0-0".into(), 0, 0),
        ("bytes=0-65535".into(), 0, 65_535),
        (
            format!("bytes={mid}-{}", mid + 1_000_000),
            mid,
            mid + 1_000_000,
        ),
        (format!("bytes={}-{}", len - 1, len - 1), len - 1, len - 1),
        (format!("bytes={}-", len - 5000), len - 5000, len - 1),
        ("bytes=-4097".into(), len - 4097, len - 1),
        (
            format!("bytes={}-{}", len - 10, len + 1000),
            len - 10,
            len - 1,
        ),
    ];
    for (range, first, last) in cases {
        let got = http::fetch(client.get(url).header("Range", &range))?;
        ensure!(
            got.status.as_u16() == 206,
            "{range}: expected 206, got {}",
            got.short()
        );
        let expected_cr = format!("bytes {first}-{last}/{len}");
        ensure!(
            got.header("content-range") == Some(expected_cr.as_str()),
            "{range}: Content-Range {:?}, expected {expected_cr:?}",
            got.header("content-range")
        );
        let want = &bytes[first as usize..=last as usize];
        ensure!(
            got.body_error.is_none(),
            "{range}: body broke off: {:?}",
            got.body_error
        );
        ensure!(
            got.body == want,
            "{range}: wrong bytes ({} received)",
            got.body.len()
        );
    }
    let bad = format!("bytes={len}-{}", len + 10);
    let got = http::fetch(client.get(url).header("Range", &bad))?;
    ensure!(
        got.status.as_u16() == 416,
        "{bad}: expected 416, got {}",
        got.short()
    );
    Ok(())
}
