//! Upload limits: a fixed number of upload slots (concurrent range
//! uploads; when all are taken a request is answered `Busy` at once, never
//! queued) and one token bucket of bytes per second shared by all uploads.
//!
//! The bucket lets uploads go into debt: `take(n)` always succeeds and says
//! how long the caller must wait before sending, so concurrent uploads are
//! served in the order they asked and the long-run rate is exact. The
//! bucket logic is a pure state machine (`Bucket`); `RateLimiter` adds the
//! clock and the sleep.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Concurrent uploads allowed.
#[derive(Clone, Debug)]
pub struct UploadSlots {
    sem: Arc<Semaphore>,
    total: usize,
}

impl UploadSlots {
    pub fn new(total: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.sem).try_acquire_owned().ok()
    }

    pub fn free(&self) -> usize {
        self.sem.available_permits()
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Shared bytes-per-second limit; `rate == 0` means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Option<Mutex<Bucket>>,
}

impl RateLimiter {
    /// `burst`: bytes that may go out at once after a quiet period.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            bucket: (rate > 0).then(|| Mutex::new(Bucket::new(rate, burst, Instant::now()))),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: u64) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        let wait = bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(Instant::now(), n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Token bucket state: `tokens` may go negative (debt).
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        Self {
            rate: rate.max(1),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens at `now`; returns how long to wait before using
    /// them (zero if they were there).
    pub fn take(&mut self, now: Instant, n: u64) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_the_long_run_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, 500, t0);
        // The burst goes out at once.
        assert_eq!(b.take(t0, 500), Duration::ZERO);
        // Then 1000 bytes take a second, and the next 1000 another second.
        assert_eq!(b.take(t0, 1000), Duration::from_secs(1));
        assert_eq!(b.take(t0, 1000), Duration::from_secs(2));
        // After the debt is paid off and a quiet period, the burst is back
        // but not more.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(later, 500), Duration::ZERO);
        assert_eq!(b.take(later, 1), Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_sleeps_for_its_debt() {
        let limiter = RateLimiter::new(1 << 20, 1 << 20);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire(1 << 20).await;
        }
        // 1 MiB burst + 4 MiB at 1 MiB/s.
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(4) && took < Duration::from_millis(4100));
        let unlimited = RateLimiter::new(0, 0);
        let start = Instant::now();
        unlimited.acquire(u64::MAX).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn slots_are_counted() {
        let slots = UploadSlots::new(2);
        let a = slots.try_acquire();
        let b = slots.try_acquire();
        assert!(a.is_some() && b.is_some());
        assert!(slots.try_acquire().is_none());
        drop(a);
        assert_eq!(slots.free(), 1);
        assert!(slots.try_acquire().is_some());
        assert_eq!(slots.total(), 2);
    }
}
