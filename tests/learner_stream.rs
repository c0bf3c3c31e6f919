//! A long stream through the learner: the replay buffer stays within both caps after every
//! step, whatever the eviction policy.

mod common;

use gradsift::learner::buffer::{BufferConfig, ENTRY_OVERHEAD, EvictionPolicy, ReplaySampling};
use gradsift::learner::importance::ImportanceMethod;
use gradsift::learner::model::Head;
use gradsift::learner::select::SelectionConfig;
use gradsift::learner::{FreshBatch, LearnerConfig, ModelConfig, OnlineLearner, TrainingConfig};

#[test]
fn buffer_never_exceeds_either_cap_on_a_long_stream() {
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    let (s, d, _) = common::feature_rows("milan_internet", &milan, 8784);
    let per_entry = d * 4 + s.keys[0].len() + ENTRY_OVERHEAD;
    for (policy, sampling) in [
        (EvictionPolicy::Importance, ReplaySampling::Importance),
        (EvictionPolicy::Fifo, ReplaySampling::Uniform),
        (EvictionPolicy::Reservoir, ReplaySampling::Uniform),
    ] {
        // The byte cap binds before the sample cap (about 700 entries' worth).
        let (capacity, max_bytes) = (1000, per_entry * 700 + 13);
        let mut l = OnlineLearner::new(LearnerConfig {
            inputs: d,
            head: Head::Regression,
            model: ModelConfig::default(),
            importance: ImportanceMethod::Exact,
            selection: SelectionConfig {
                keep: 0.8,
                warmup: 500,
                window: 2048,
                unbiased_q: 0.0,
                ..SelectionConfig::default()
            },
            buffer: BufferConfig {
                policy,
                capacity,
                max_bytes,
                decay: 0.999,
                replay_ratio: 0.5,
                replay_sampling: sampling,
                rescore_every: 10,
                rescore_slice: 128,
            },
            reference_replay_ratio: 1.0,
            holdout_every: 10,
            training: TrainingConfig {
                micro_batch: 64,
                learning_rate: 1e-3,
                seed: 1,
                ..TrainingConfig::default()
            },
        });
        let mut peak = (0, 0);
        // 10 passes over the archive: about 88k samples.
        for _ in 0..10 {
            for k in 0..s.len() / 64 {
                let r = k * 64..(k + 1) * 64;
                l.learn_batch(FreshBatch {
                    x: &s.x[r.start * d..r.end * d],
                    y: &s.y[r.clone()],
                    keys: &s.keys[r.clone()],
                    times: &s.times[r],
                });
                let b = l.buffer();
                assert!(
                    b.len() <= capacity && b.bytes() <= max_bytes,
                    "{policy:?}: {} entries, {} bytes",
                    b.len(),
                    b.bytes()
                );
                peak = (peak.0.max(b.len()), peak.1.max(b.bytes()));
            }
        }
        let b = l.buffer();
        println!(
            "{policy:?}: peak {} entries / {} bytes (caps {capacity} / {max_bytes}), {:?}",
            peak.0, peak.1, b.stats
        );
        assert!(peak.0 >= 690, "{policy:?} fills to the byte cap");
        assert!(b.stats.evicted > 0);
        assert!(l.stats().seen > 80_000);
    }
}
