//! The chunk pipeline of a layer build: the tar reader submits chunks in file order, worker
//! threads digest and compress them in batches (the costly part), and one committer stores them into the
//! [`BlobWriter`] strictly in submission order.
//!
//! Invariants: the blob, its chunk table and every [`ChunkRef`] are the same bytes whatever the
//! thread count (commits happen in sequence-number order; workers only do pure work); memory is
//! bounded by the channel capacities (a few chunks per thread), not by the layer size; an error
//! anywhere stops the build and every thread exits when the pipeline is dropped.
//!
//! Full-size all-zero chunks (holes of sparse files, zero-filled images) are digested and
//! compressed once and then reused, so a multi-GiB sparse file costs a zero scan, not a hash
//! and a compression per chunk.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use crate::build::blob_writer::{prepare, BlobWriter, Prepared};
use crate::build::{BuildError, BuildOptions};
use crate::model::ChunkRef;

/// Batches in flight per worker thread (bounds memory to about `threads × 4 × BATCH_BYTES`
/// plus one chunk per batch).
const IN_FLIGHT_PER_THREAD: usize = 2;
/// Chunks travel in batches of about this many bytes (or [`BATCH_CHUNKS`] chunks): most chunks
/// of a layer are small files, and one channel hand-off per chunk would cost more than the work.
const BATCH_BYTES: usize = 1 << 20;
const BATCH_CHUNKS: usize = 256;

/// Consecutive chunks starting at a sequence number.
type Job = (u64, Vec<Vec<u8>>);
type Done = (u64, Result<Vec<Arc<Prepared>>, BuildError>);

/// Accepts chunks in order; [`Pipeline::finish`] returns their references by sequence number.
pub(crate) struct Pipeline<'scope> {
    opts: BuildOptions,
    next_seq: u64,
    zero: Option<Arc<Prepared>>,
    mode: Mode<'scope>,
}

enum Mode<'scope> {
    Inline {
        writer: &'scope mut BlobWriter,
        refs: Vec<ChunkRef>,
    },
    Threaded {
        /// The batch being filled: its first sequence number, chunks and bytes.
        batch: (u64, Vec<Vec<u8>>, usize),
        jobs: Option<SyncSender<Job>>,
        done: Option<SyncSender<Done>>,
        workers: Vec<ScopedJoinHandle<'scope, ()>>,
        committer: ScopedJoinHandle<'scope, Result<Vec<ChunkRef>, BuildError>>,
    },
}

/// The number of worker threads "all cores" means.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl<'scope> Pipeline<'scope> {
    /// Start a pipeline with `threads` workers (1: everything on the calling thread).
    pub(crate) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        writer: &'scope mut BlobWriter,
        opts: BuildOptions,
        threads: usize,
    ) -> Self {
        let mode = if threads <= 1 {
            Mode::Inline {
                writer,
                refs: Vec::new(),
            }
        } else {
            let cap = threads * IN_FLIGHT_PER_THREAD;
            let (jobs_tx, jobs_rx) = sync_channel::<Job>(cap);
            let (done_tx, done_rx) = sync_channel::<Done>(cap);
            let jobs_rx = Arc::new(Mutex::new(jobs_rx));
            let workers = (0..threads)
                .map(|_| {
                    let rx = Arc::clone(&jobs_rx);
                    let tx = done_tx.clone();
                    scope.spawn(move || work(&opts, &rx, &tx))
                })
                .collect();
            let committer = scope.spawn(move || commit_in_order(writer, done_rx));
            Mode::Threaded {
                batch: (0, Vec::new(), 0),
                jobs: Some(jobs_tx),
                done: Some(done_tx),
                workers,
                committer,
            }
        };
        Pipeline {
            opts,
            next_seq: 0,
            zero: None,
            mode,
        }
    }

    /// Submit the next chunk; returns its sequence number.
    pub(crate) fn submit(&mut self, data: Vec<u8>) -> Result<u64, BuildError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        // Ok: bytes to prepare; Err: the shared prepared all-zero chunk.
        let item = if data.len() == self.opts.chunk_size as usize && is_zero(&data) {
            Err(self.zero_chunk(data)?)
        } else {
            Ok(data)
        };
        let sent = match (&mut self.mode, item) {
            (Mode::Inline { writer, refs }, Err(z)) => {
                refs.push(writer.commit(&z)?);
                true
            }
            (Mode::Inline { writer, refs }, Ok(data)) => {
                refs.push(writer.commit(&prepare(&self.opts, data)?)?);
                true
            }
            (
                Mode::Threaded {
                    batch, jobs, done, ..
                },
                Err(z),
            ) => {
                // The batch before this chunk goes first (the committer reorders anyway).
                flush(batch, jobs.as_ref())
                    && done
                        .as_ref()
                        .is_some_and(|d| d.send((seq, Ok(vec![z]))).is_ok())
            }
            (Mode::Threaded { batch, jobs, .. }, Ok(data)) => {
                if batch.1.is_empty() {
                    batch.0 = seq;
                }
                batch.2 += data.len();
                batch.1.push(data);
                if batch.2 >= BATCH_BYTES || batch.1.len() >= BATCH_CHUNKS {
                    flush(batch, jobs.as_ref())
                } else {
                    true
                }
            }
        };
        if !sent {
            // The committer stopped early: `finish` reports its error.
            return Err(BuildError::Internal("chunk pipeline stopped"));
        }
        Ok(seq)
    }

    /// Wait for every submitted chunk; their references, indexed by sequence number.
    pub(crate) fn finish(self) -> Result<Vec<ChunkRef>, BuildError> {
        match self.mode {
            Mode::Inline { refs, .. } => Ok(refs),
            Mode::Threaded {
                mut batch,
                jobs,
                done,
                workers,
                committer,
            } => {
                let flushed = flush(&mut batch, jobs.as_ref());
                drop(jobs);
                drop(done);
                for w in workers {
                    w.join()
                        .map_err(|_| BuildError::Internal("chunk worker panicked"))?;
                }
                let refs = committer
                    .join()
                    .map_err(|_| BuildError::Internal("chunk committer panicked"))??;
                if !flushed {
                    return Err(BuildError::Internal("chunk pipeline stopped"));
                }
                if refs.len() as u64 != self.next_seq {
                    return Err(BuildError::Internal("chunk pipeline lost a chunk"));
                }
                Ok(refs)
            }
        }
    }

    /// The prepared all-zero chunk, computed on first use.
    fn zero_chunk(&mut self, data: Vec<u8>) -> Result<Arc<Prepared>, BuildError> {
        if let Some(z) = &self.zero {
            return Ok(Arc::clone(z));
        }
        let z = Arc::new(prepare(&self.opts, data)?);
        self.zero = Some(Arc::clone(&z));
        Ok(z)
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding 64-byte blocks vectorises; this runs at memory speed.
    let mut blocks = data.chunks_exact(64);
    blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

/// Send the batch being filled (if any) to the workers; false if they are gone.
fn flush(batch: &mut (u64, Vec<Vec<u8>>, usize), jobs: Option<&SyncSender<Job>>) -> bool {
    if batch.1.is_empty() {
        return true;
    }
    let chunks = std::mem::take(&mut batch.1);
    batch.2 = 0;
    jobs.is_some_and(|j| j.send((batch.0, chunks)).is_ok())
}

/// Worker: take batches until the channel closes, send each batch's results.
fn work(opts: &BuildOptions, jobs: &Mutex<Receiver<Job>>, done: &SyncSender<Done>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, chunks)) = job else { return };
        let res = chunks
            .into_iter()
            .map(|data| prepare(opts, data).map(Arc::new))
            .collect();
        if done.send((seq, res)).is_err() {
            return;
        }
    }
}

/// Committer: reorder batches by first sequence number and commit them; after an error keep
/// draining (so no producer blocks) and report the first error.
fn commit_in_order(
    writer: &mut BlobWriter,
    done: Receiver<Done>,
) -> Result<Vec<ChunkRef>, BuildError> {
    let mut refs = Vec::new();
    let mut pending: BTreeMap<u64, Result<Vec<Arc<Prepared>>, BuildError>> = BTreeMap::new();
    let mut failed: Option<BuildError> = None;
    for (seq, res) in done {
        if failed.is_some() {
            continue;
        }
        pending.insert(seq, res);
        while let Some(res) = pending.remove(&(refs.len() as u64)) {
            let committed = res.and_then(|batch| {
                batch
                    .iter()
                    .try_for_each(|p| writer.commit(p).map(|r| refs.push(r)))
            });
            if let Err(e) = committed {
                failed = Some(e);
                pending.clear();
                break;
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(refs),
    }
}
