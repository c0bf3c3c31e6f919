//! gradsift: score every streamed telecom sample by the norm of its per-sample gradient,
//! train on the ones that matter, keep the most important in a bounded replay buffer, and
//! retrain incrementally.
//!
//! The path of one sample, in module order: [`source`] → [`decode`] → [`features`] →
//! [`learner`] (score → select → train → buffer → evaluate) → [`sink`]; [`pipeline`] wires
//! them with bounded channels, [`config`] and [`schema`] say what to wire, [`report`] sums up, [`telemetry`]
//! and [`energy`] tell operators how it goes.
#![deny(unsafe_code)] // two exceptions, the kernel modules `learner::matmul` (gemm, a transpose) and `learner::row_ops`

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decode;
pub mod durable;
pub mod energy;
pub mod experiment;
pub mod features;
pub mod learner;
pub mod offline;
pub mod payload;
pub mod pipeline;
pub mod plotting;
pub mod produce;
pub mod producer;
pub mod report;
pub mod schema;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod stage_time;
pub mod telemetry;
pub mod validate;
