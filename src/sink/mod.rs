//! Sinks: where results go. The per-sample score file (Parquet) and the dead-letter file.
//! Each is written off the learner's hot path or only on the (rare) bad-input path.

pub mod dead_letter;
pub mod scores;
