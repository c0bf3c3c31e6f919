//! Memory of the learner's step path stays flat: thousands of optimiser steps must not grow
//! the process (issue 10, defect 1: every Adam step used to leave an autodiff graph behind,
//! about 8 KB per step, for ever). Fast tier: synthetic rows, no file, broker or Python.
//! The flat-RSS figures over millions of samples come from `benches/soak.py`.

use std::sync::Arc;

use gradsift::learner::buffer::{BufferConfig, EvictionPolicy, ReplaySampling};
use gradsift::learner::importance::ImportanceMethod;
use gradsift::learner::model::Head;
use gradsift::learner::select::SelectionConfig;
use gradsift::learner::{FreshBatch, LearnerConfig, ModelConfig, OnlineLearner, TrainingConfig};

/// Resident set size of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn thousands_of_steps_do_not_grow_the_process() {
    let (d, mb) = (16, 8);
    let mut l = OnlineLearner::new(LearnerConfig {
        inputs: d,
        head: Head::Regression,
        model: ModelConfig::default(),
        importance: ImportanceMethod::Exact,
        selection: SelectionConfig {
            keep: 0.7,
            warmup: 100,
            window: 512,
            ..SelectionConfig::default()
        },
        buffer: BufferConfig {
            policy: EvictionPolicy::Fifo,
            capacity: 512,
            max_bytes: 1_000_000,
            decay: 0.999,
            replay_ratio: 2.0,
            replay_sampling: ReplaySampling::Uniform,
            rescore_every: 0,
            rescore_slice: 128,
        },
        reference_replay_ratio: 2.0,
        holdout_every: 10,
        training: TrainingConfig {
            micro_batch: mb,
            learning_rate: 1e-3,
            seed: 3,
            ..TrainingConfig::default()
        },
    });
    let keys: Vec<Arc<str>> = (0..mb).map(|_| Arc::from("k")).collect();
    let times = vec![0i64; mb];
    let mut state = 12345u32;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state as f32 / u32::MAX as f32 - 0.5
    };
    let mut steps = |n: usize, l: &mut OnlineLearner| {
        for _ in 0..n {
            let x: Vec<f32> = (0..mb * d).map(|_| uniform()).collect();
            let y: Vec<f32> = x.chunks(d).map(|r| r[0] - 2.0 * r[1]).collect();
            l.learn_batch(FreshBatch {
                x: &x,
                y: &y,
                keys: &keys,
                times: &times,
            });
        }
    };
    steps(1_000, &mut l);
    let warm = rss_bytes();
    let before = l.stats().steps;
    steps(8_000, &mut l);
    let grown = rss_bytes().saturating_sub(warm);
    let taken = l.stats().steps - before;
    assert!(taken >= 8_000, "{taken} optimiser steps taken");
    eprintln!("RSS grew by {grown} bytes over {taken} optimiser steps");
    // Before the fix: ~8 KB per step, 60+ MB here.
    assert!(
        grown < 8 << 20,
        "RSS grew by {:.1} MB over {taken} optimiser steps ({:.0} bytes per step)",
        grown as f64 / 1e6,
        grown as f64 / taken as f64
    );
}
