//! The sink stage: a thread of its own that writes score rows to the score file (or its
//! checkpoint-rolled segments) and the output topic. It takes rows from the learner through
//! a bounded channel (the learner blocks when the sinks fall behind: backpressure) and, on a
//! `Roll`, makes everything so far durable before the learner writes a checkpoint.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::sink::scores::{ScoreRow, ScoreSegments, ScoreSink};
use crate::sink::topic::SampleTopicSink;

/// What the sink thread is told.
pub(super) enum SinkMsg {
    Rows(Vec<ScoreRow>),
    /// Make everything sent so far durable; reply with the next score segment number (none
    /// without segments: the checkpoint keeps the number it had, so that a later run with
    /// segments does not take every earlier one for uncovered and delete it).
    Roll(SyncSender<Result<Option<u64>>>),
    /// The run ended: complete the outputs. A sender gone without it is a run that failed,
    /// whose score file must not take its final name.
    Finish,
}

/// The per-sample score output: one file (written under its temporary name and renamed
/// when complete), or segments rolled at each checkpoint.
pub(super) enum ScoreOut {
    File { sink: ScoreSink, path: PathBuf },
    Segments(ScoreSegments),
}

/// The sinks one run writes to.
pub(super) struct SinkStage {
    pub scores: Option<ScoreOut>,
    pub topic: Option<SampleTopicSink>,
}

/// Rows written to the score output and records sent to the topic.
pub(super) type SinkTotals = (Option<u64>, Option<u64>);

impl SinkStage {
    pub fn is_on(&self) -> bool {
        self.scores.is_some() || self.topic.is_some()
    }

    /// Runs the stage on its own thread until the learner drops its sender.
    pub fn spawn(
        self,
        rx: Receiver<SinkMsg>,
        times: std::sync::Arc<crate::stage_time::StageTimes>,
    ) -> JoinHandle<Result<SinkTotals>> {
        std::thread::spawn(move || times.sink.on_thread(|| self.run(rx, &times.sink)))
    }

    fn run(
        mut self,
        rx: Receiver<SinkMsg>,
        time: &crate::stage_time::StageTime,
    ) -> Result<SinkTotals> {
        while let Ok(msg) = time.waiting(|| rx.recv()) {
            match msg {
                SinkMsg::Finish => return self.finish(),
                SinkMsg::Rows(rows) => self.write(&rows)?,
                SinkMsg::Roll(reply) => {
                    let done = self.roll();
                    let failed = done.is_err();
                    let _ = reply.send(done);
                    if failed {
                        anyhow::bail!("a sink could not make its output durable");
                    }
                }
            }
        }
        // The learner stopped without finishing (its own error is the run's): the score file
        // stays under its temporary name, and no segment is closed that no checkpoint covers.
        if let Some(ScoreOut::File { path, .. }) = &self.scores {
            tracing::warn!(file = %crate::durable::tmp_path(path).display(), "the run did not finish: its score file keeps its temporary name");
        }
        Ok((None, self.topic.map(|t| t.records)))
    }

    fn write(&mut self, rows: &[ScoreRow]) -> Result<()> {
        match &mut self.scores {
            Some(ScoreOut::File { sink, .. }) => sink.write(rows)?,
            Some(ScoreOut::Segments(s)) => s.write(rows)?,
            None => {}
        }
        if let Some(t) = &mut self.topic {
            t.send(rows)?;
        }
        Ok(())
    }

    fn roll(&mut self) -> Result<Option<u64>> {
        if let Some(t) = &self.topic {
            t.flush()?;
        }
        match &mut self.scores {
            Some(ScoreOut::Segments(s)) => s.roll().map(Some),
            _ => Ok(None),
        }
    }

    fn finish(self) -> Result<SinkTotals> {
        if let Some(t) = &self.topic {
            t.flush()?;
        }
        let written = match self.scores {
            Some(ScoreOut::File { sink, path }) => {
                let rows = sink.finish()?;
                let tmp = crate::durable::tmp_path(&path);
                // On disk before it takes the final name: a power cut must not leave an
                // empty file there.
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("cannot sync {}", tmp.display()))?;
                std::fs::rename(&tmp, &path).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), path.display())
                })?;
                crate::durable::sync_dir(&path)?;
                Some(rows)
            }
            Some(ScoreOut::Segments(mut s)) => {
                s.roll()?;
                Some(s.rows)
            }
            None => None,
        };
        Ok((written, self.topic.map(|t| t.records)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without score segments a checkpoint's roll names no segment: the checkpoint keeps the
    /// number it had. Before, it saved 0, and a later run with segments deleted every
    /// segment an earlier one had written (all numbered ≥ 0, so all "uncovered").
    #[test]
    fn a_roll_without_segments_names_none() {
        let mut stage = SinkStage {
            scores: None,
            topic: None,
        };
        assert_eq!(stage.roll().unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let columns = crate::sink::scores::ScoreColumns {
            timestamps: true,
            features: false,
        };
        // Segments 1 and 2, which a checkpoint with next segment 3 covers.
        for n in [1, 2] {
            std::fs::write(dir.path().join(format!("part-{n:06}.parquet")), b"").unwrap();
        }
        let segments = ScoreSegments::open(dir.path(), columns, 3).unwrap();
        let mut stage = SinkStage {
            scores: Some(ScoreOut::Segments(segments)),
            topic: None,
        };
        assert_eq!(
            stage.roll().unwrap(),
            Some(3),
            "nothing written: the same number"
        );
    }

    /// The score file takes its final name only when the learner says the run finished; a
    /// learner that failed (its sender dropped without `Finish`) leaves it temporary.
    #[test]
    fn the_score_file_is_renamed_only_at_a_finish() {
        let columns = crate::sink::scores::ScoreColumns {
            timestamps: true,
            features: false,
        };
        for finish in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("scores.parquet");
            let tmp = crate::durable::tmp_path(&path);
            let stage = SinkStage {
                scores: Some(ScoreOut::File {
                    sink: crate::sink::scores::ScoreSink::create(&tmp, columns).unwrap(),
                    path: path.clone(),
                }),
                topic: None,
            };
            let (tx, rx) = std::sync::mpsc::sync_channel(4);
            let times = std::sync::Arc::new(crate::stage_time::StageTimes::default());
            let handle = stage.spawn(rx, times);
            if finish {
                tx.send(SinkMsg::Finish).unwrap();
            }
            drop(tx);
            handle.join().unwrap().unwrap();
            assert_eq!(
                (path.exists(), tmp.exists()),
                (finish, !finish),
                "finish: {finish}"
            );
        }
    }
}
