//! A fixed pool of worker threads behind a bounded queue: FUSE threads hand reads to it so one
//! slow chunk fetch holds up one worker, not the filesystem.
//!
//! Invariants: at most `queue` jobs wait (a full queue hands the job back to the caller, which
//! serves it itself — backpressure without unbounded memory); a job that panics is caught, so the
//! pool never shrinks; dropping the pool closes the queue, lets queued jobs finish and joins every
//! worker.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

pub(crate) struct Pool<T: Send + 'static> {
    tx: Option<SyncSender<T>>,
    workers: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Pool<T> {
    /// Start `workers` threads named `name-N` that run `handler` on each job.
    pub(crate) fn new(
        name: &str,
        workers: usize,
        queue: usize,
        handler: Arc<dyn Fn(T) + Send + Sync>,
    ) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<T>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = Pool {
            tx: Some(tx),
            workers: Vec::with_capacity(workers),
        };
        for i in 0..workers {
            let (rx, handler) = (rx.clone(), handler.clone());
            let worker = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work(&rx, handler.as_ref()))?;
            pool.workers.push(worker);
        }
        Ok(pool)
    }

    /// Queue `job`, or hand it back if the queue is full.
    pub(crate) fn try_submit(&self, job: T) -> Result<(), T> {
        let Some(tx) = &self.tx else { return Err(job) };
        tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
        })
    }
}

fn work<T>(rx: &Mutex<Receiver<T>>, handler: &(dyn Fn(T) + Send + Sync)) {
    loop {
        // One worker waits in recv while the others wait for the lock; the job runs unlocked.
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        // A panicking job has already dropped its reply (which answers EIO); keep the worker.
        let _ = catch_unwind(AssertUnwindSafe(|| handler(job)));
    }
}

impl<T: Send + 'static> Drop for Pool<T> {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_in_parallel_and_a_full_queue_hands_back() {
        let gate = Arc::new(Barrier::new(3));
        let done = Arc::new(AtomicUsize::new(0));
        let (g, d) = (gate.clone(), done.clone());
        let pool = Pool::new(
            "t",
            2,
            1,
            Arc::new(move |block: bool| {
                if block {
                    g.wait();
                }
                d.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        // Two blocking jobs occupy both workers (they meet at the barrier with us); once both
        // are off the queue, one more job fits in it and the next is handed back.
        submit_eventually(&pool, true);
        submit_eventually(&pool, true);
        submit_eventually(&pool, false);
        assert_eq!(pool.try_submit(false), Err(false));
        gate.wait();
        drop(pool);
        assert!(done.load(Ordering::SeqCst) >= 3);
    }

    fn submit_eventually(pool: &Pool<bool>, job: bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pool.try_submit(job).is_err() {
            assert!(std::time::Instant::now() < deadline, "queue never drained");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_panicking_job_keeps_the_worker() {
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let pool = Pool::new(
            "p",
            1,
            4,
            Arc::new(move |boom: bool| {
                assert!(!boom, "job panics on purpose");
                d.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        pool.try_submit(true).unwrap();
        pool.try_submit(false).unwrap();
        drop(pool);
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
