//! The stable-toolchain fuzz driver the test suites share: seeded mutations of real inputs (bit
//! flips, boundary values over 4- and 8-byte fields, truncation, insertion, copies within the
//! input) plus plain random bytes, under a deadline; and the replay of a committed corpus. The
//! same inputs on every run. `SHOAL_FUZZ_SEEDS=<dir>` also writes each target's seeds to
//! `<dir>/<target>/`, which is how the libFuzzer runner (`e2e/fuzz/run`) gets its starting corpus.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// splitmix64: cheap, seeded, the same sequence on every run (also the load runner's, in e2e).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One mutation of one seed (or, now and then, random bytes).
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(20) == 0 || seeds.is_empty() {
        let n = rng.below(4096);
        return (0..n).map(|_| rng.next_u64() as u8).collect();
    }
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if d.is_empty() {
            break;
        }
        let at = rng.below(d.len());
        match rng.below(6) {
            0 => d[at] ^= 1 << rng.below(8),
            1 => d[at] = rng.next_u64() as u8,
            2 => {
                let v: u64 = [0, 1, u64::MAX, u64::from(u32::MAX), 1 << 31, 4096][rng.below(6)];
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                let end = (at + w).min(d.len());
                d[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => d.truncate(at),
            4 => {
                let n = rng.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                d.splice(at..at, bytes);
            }
            _ => {
                // Copy a range of the input over another place (duplicated structures).
                let len = rng.below(256).min(d.len() - at);
                let src = rng.below(d.len() - len + 1);
                let chunk = d[src..src + len].to_vec();
                let end = (at + len).min(d.len());
                d[at..end].copy_from_slice(&chunk[..end - at]);
            }
        }
    }
    d
}

/// Runs `target` over `seeds` and `n` mutations of them on a thread; panics if the target
/// panics or all of it takes longer than `limit` (a hang, not a speed goal: the limits are
/// minutes for work that takes seconds).
pub fn smoke(name: &str, seeds: Vec<Vec<u8>>, n: usize, limit: Duration, target: fn(&[u8])) {
    export_seeds(name, &seeds);
    let (tx, rx) = mpsc::channel();
    let salt = name.len() as u64;
    std::thread::spawn(move || {
        let mut rng = Rng(0x5EED ^ salt);
        for s in &seeds {
            target(s);
        }
        for _ in 0..n {
            target(&mutate(&mut rng, &seeds));
        }
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: {n} inputs took over {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: the target panicked"),
    }
}

/// Writes `seeds` to `$SHOAL_FUZZ_SEEDS/<name>/seed-<i>` when that variable is set.
fn export_seeds(name: &str, seeds: &[Vec<u8>]) {
    let Some(root) = std::env::var_os("SHOAL_FUZZ_SEEDS") else {
        return;
    };
    let dir = Path::new(&root).join(name);
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        seeds
            .iter()
            .enumerate()
            .try_for_each(|(i, s)| std::fs::write(dir.join(format!("seed-{i}")), s))
    });
    if let Err(e) = written {
        panic!("writing the seeds of {name} to {}: {e}", dir.display());
    }
}

/// Runs `target` over every file in `dir` (a committed corpus or the minimized crashes of one
/// target); returns how many. A missing directory is zero files.
pub fn replay(dir: &Path, target: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in &files {
        match std::fs::read(f) {
            Ok(data) => target(&data),
            Err(e) => panic!("reading {}: {e}", f.display()),
        }
    }
    files.len()
}
