//! Sinks: where results go. The per-sample score file (Parquet), the per-sample output topic
//! (Kafka), the dead-letter file and the run plot. Each is written off the learner's hot path or only on
//! the (rare) bad-input path.

pub mod dead_letter;
pub mod metric_plot;
pub mod scores;
pub mod topic;
