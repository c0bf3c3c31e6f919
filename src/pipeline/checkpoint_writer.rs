//! The checkpoint writer: one thread that encodes, writes and syncs the checkpoints the
//! learner stage hands it, in order, and only then tells a feed to commit the positions each
//! one covers. Encoding and syncing a checkpoint of 10,000 keys (12 MB) took a quarter of a
//! checkpointed run's wall time on the learner's thread; the learner now only copies its
//! state and goes on. Backpressure: the channel holds nothing (a rendezvous), so the learner
//! hands over the next checkpoint only when the writer is free to take it: at most one is
//! being written while the learner prepares the next, and a disk slower than the checkpoint
//! interval slows the learner instead of queueing copies (a queue of one cost 20 MB of RSS
//! in the soak run and was not faster).
//! A failed write stops the writer and the source (a quiet feed would otherwise wait for a
//! next checkpoint that never comes); the learner stage reports the error at its next
//! checkpoint or its end, and nothing after it is committed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::checkpoint::{self, Checkpoint};
use crate::shutdown::Shutdown;
use crate::source::Ack;
use crate::stage_time::{StageTime, StageTimes};

/// A checkpoint to write, and the positions to commit once it is on disk.
struct Job {
    ckpt: Box<Checkpoint>,
    commit: Vec<(Arc<str>, u64)>,
    /// The learner's part of this checkpoint (segment roll, dead-letter sync, state copy).
    before_s: f64,
}

/// One checkpoint on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Written {
    pub bytes: u64,
    /// The whole checkpoint: the learner's part, then encoding, writing, syncing and
    /// renaming on the writer's thread.
    pub seconds: f64,
    pub written_ms: u64,
}

/// The learner stage's handle on the writer thread.
pub(crate) struct CheckpointWriter {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Result<Written>>,
    thread: Option<JoinHandle<()>>,
    /// Checkpoints handed over and not yet reported back.
    in_flight: usize,
}

impl CheckpointWriter {
    /// A writer of `path` that sends commits on `acks` (none: a file source), the time of the
    /// last checkpoint on disk to `last_ms` (the checkpoint-age gauge), triggers `stop` when a
    /// write fails, and books its thread's time in `times.checkpoint`.
    pub fn start(
        path: PathBuf,
        acks: Option<Sender<Ack>>,
        last_ms: Arc<AtomicU64>,
        stop: Shutdown,
        times: Arc<StageTimes>,
    ) -> Self {
        let (jobs, rx) = sync_channel::<Job>(0);
        let (done_tx, done) = channel();
        let thread = std::thread::Builder::new()
            .name("gradsift-checkpoint".into())
            .spawn(move || {
                let time = &times.checkpoint;
                time.on_thread(|| write_all(&path, rx, acks, &last_ms, &done_tx, &stop, time))
            })
            .expect("a thread for the checkpoint writer");
        CheckpointWriter {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: 0,
        }
    }

    /// Hands over a checkpoint that took the learner `before_s` to prepare (waits while the
    /// previous one is being written).
    pub fn write(
        &mut self,
        ckpt: Checkpoint,
        commit: Vec<(Arc<str>, u64)>,
        before_s: f64,
    ) -> Result<()> {
        let jobs = self
            .jobs
            .as_ref()
            .context("checkpoint writer already finished")?;
        let job = Job {
            ckpt: Box::new(ckpt),
            commit,
            before_s,
        };
        if jobs.send(job).is_err() {
            // The writer stopped at a failed write: its error says why.
            let stopped = self.wait().err();
            return Err(stopped.unwrap_or_else(|| anyhow::anyhow!("the checkpoint writer stopped")));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// The checkpoints written since the last call; the first failed write as an error.
    pub fn written(&mut self) -> Result<Vec<Written>> {
        let mut out = Vec::new();
        while let Ok(r) = self.done.try_recv() {
            self.in_flight -= 1;
            out.push(r?);
        }
        Ok(out)
    }

    /// Waits until every checkpoint handed over is on disk (or one failed).
    pub fn wait(&mut self) -> Result<Vec<Written>> {
        let mut out = Vec::new();
        while self.in_flight > 0 {
            let r = self
                .done
                .recv()
                .context("checkpoint writer thread stopped")?;
            self.in_flight -= 1;
            out.push(r?);
        }
        Ok(out)
    }

    /// Writes what is left, then ends the thread (and with it its hold on the feed's acks).
    pub fn finish(&mut self) -> Result<Vec<Written>> {
        let out = self.wait();
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("checkpoint writer thread panicked"))?;
        }
        out
    }
}

fn write_all(
    path: &std::path::Path,
    jobs: Receiver<Job>,
    acks: Option<Sender<Ack>>,
    last_ms: &AtomicU64,
    done: &Sender<Result<Written>>,
    stop: &Shutdown,
    time: &StageTime,
) {
    while let Ok(job) = time.waiting(|| jobs.recv()) {
        let t0 = Instant::now();
        match checkpoint::save(path, &job.ckpt) {
            Ok(bytes) => {
                // On disk: now the feed may commit what it covers.
                if let Some(a) = &acks {
                    let _ = a.send(Ack::Commit(job.commit));
                }
                last_ms.store(job.ckpt.written_ms, Ordering::Relaxed);
                let w = Written {
                    bytes,
                    seconds: job.before_s + t0.elapsed().as_secs_f64(),
                    written_ms: job.ckpt.written_ms,
                };
                let _ = done.send(Ok(w));
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "checkpoint not written: stopping");
                stop.trigger();
                let _ = done.send(Err(e));
                return;
            }
        }
    }
}
