//! The chunk pipeline of a layer build: the tar reader submits chunks in file order, worker
//! threads digest and compress them (the costly part), and one committer stores them into the
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

/// Chunks in flight per worker thread (bounds memory to about `threads × 4 × chunk size`).
const IN_FLIGHT_PER_THREAD: usize = 2;

type Job = (u64, Vec<u8>);
type Done = (u64, Result<Arc<Prepared>, BuildError>);

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
        let zero = data.len() == self.opts.chunk_size as usize && is_zero(&data);
        let sent = if zero {
            let z = self.zero_chunk(data)?;
            match &mut self.mode {
                Mode::Inline { writer, refs } => {
                    refs.push(writer.commit(&z)?);
                    true
                }
                Mode::Threaded { done, .. } => {
                    done.as_ref().is_some_and(|d| d.send((seq, Ok(z))).is_ok())
                }
            }
        } else {
            match &mut self.mode {
                Mode::Inline { writer, refs } => {
                    refs.push(writer.commit(&prepare(&self.opts, data)?)?);
                    true
                }
                Mode::Threaded { jobs, .. } => {
                    jobs.as_ref().is_some_and(|j| j.send((seq, data)).is_ok())
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
                jobs,
                done,
                workers,
                committer,
            } => {
                drop(jobs);
                drop(done);
                for w in workers {
                    w.join()
                        .map_err(|_| BuildError::Internal("chunk worker panicked"))?;
                }
                let refs = committer
                    .join()
                    .map_err(|_| BuildError::Internal("chunk committer panicked"))??;
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

/// Worker: take jobs until the channel closes, send each result.
fn work(opts: &BuildOptions, jobs: &Mutex<Receiver<Job>>, done: &SyncSender<Done>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, data)) = job else { return };
        if done.send((seq, prepare(opts, data).map(Arc::new))).is_err() {
            return;
        }
    }
}

/// Committer: reorder results by sequence number and commit them; after an error keep draining
/// (so no producer blocks) and report the first error.
fn commit_in_order(
    writer: &mut BlobWriter,
    done: Receiver<Done>,
) -> Result<Vec<ChunkRef>, BuildError> {
    let mut refs = Vec::new();
    let mut pending: BTreeMap<u64, Result<Arc<Prepared>, BuildError>> = BTreeMap::new();
    let mut failed: Option<BuildError> = None;
    for (seq, res) in done {
        if failed.is_some() {
            continue;
        }
        pending.insert(seq, res);
        while let Some(res) = pending.remove(&(refs.len() as u64)) {
            match res.and_then(|p| writer.commit(&p)) {
                Ok(r) => refs.push(r),
                Err(e) => {
                    failed = Some(e);
                    pending.clear();
                    break;
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(refs),
    }
}
