//! Exact per-sample gradient norms against a plain batched forward+backward of the same MLP
//! and against one backward per sample; and the learner core's throughput (score + select +
//! train + buffer on in-memory micro-batches). Default MLP: 16 → 64 → 64 → 1, B = 256.
//!
//! `cargo bench --bench scoring` ; the ratios are read off one run (same machine, same load).

use burn::tensor::Device;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gradsift::learner::buffer::{BufferConfig, EvictionPolicy, ReplaySampling};
use gradsift::learner::importance::ImportanceMethod;
use gradsift::learner::model::{self, Head, Mlp};
use gradsift::learner::select::SelectionConfig;
use gradsift::learner::{
    Backend, FreshBatch, LearnerConfig, ModelConfig, OnlineLearner, TrainingConfig,
};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const B: usize = 256;
const D: usize = 16;

fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * D).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<f32> = (0..n)
        .map(|i| x[i * D] * 0.5 - x[i * D + 1] + rng.random_range(-0.1..0.1))
        .collect();
    (x, y)
}

fn scoring(c: &mut Criterion) {
    let (x, y) = data(B, 1);
    let head = Head::Regression;
    let mut g = c.benchmark_group("per_sample_norms_B256");
    g.throughput(Throughput::Elements(B as u64));
    for (name, dev) in [
        ("flex", Device::flex()),
        #[allow(deprecated)]
        ("ndarray", Device::ndarray()),
    ] {
        let ad_model = Mlp::new(D, &[64, 64], head, &dev.clone().autodiff()).tracked();
        let params = ad_model.dense_params();
        g.bench_function(BenchmarkId::new("plain_autodiff_fwd_bwd", name), |b| {
            b.iter(|| {
                let xt = model::matrix(x.clone(), B, D, &dev.clone().autodiff());
                let t = model::target_tensor(head, &y, &dev).autodiff();
                let loss = model::per_sample_loss(head, ad_model.forward(xt), t).mean();
                let grads = loss.backward();
                burn::optim::GradientsParams::from_grads(grads, &ad_model)
            })
        });
        g.bench_function(BenchmarkId::new("exact_fused", name), |b| {
            b.iter(|| {
                let xt = model::matrix(x.clone(), B, D, &dev);
                let t = model::target_tensor(head, &y, &dev);
                let tr = model::trace(&params, xt);
                let deltas =
                    model::backward_deltas(&params, &tr, model::output_grad(head, tr.output(), t));
                model::to_vec(model::sq_norms(&tr.inputs, &deltas))
            })
        });
        g.bench_function(BenchmarkId::new("exact_autodiff_probes", name), |b| {
            b.iter(|| {
                let xt = model::matrix(x.clone(), B, D, &dev);
                let t = model::target_tensor(head, &y, &dev);
                let (inputs, deltas, _, _) = model::probe_trace(&params, head, xt, t);
                model::to_vec(model::sq_norms(&inputs, &deltas))
            })
        });
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("naive_per_sample_backward", name), |b| {
            b.iter(|| model::naive_sq_norms(&params, head, &x, &y))
        });
        g.sample_size(100);
    }
    g.finish();
}

fn learner_core(c: &mut Criterion) {
    let n_batches = 64;
    let (x, y) = data(B * n_batches, 2);
    let keys: Vec<Arc<str>> = (0..B)
        .map(|i| Arc::from(format!("cell-{}", i % 32).as_str()))
        .collect();
    let times: Vec<i64> = (0..B as i64).collect();
    let mut g = c.benchmark_group("learner_core_B256");
    g.throughput(Throughput::Elements(B as u64));
    for (name, method, keep, backend) in [
        (
            "exact_keep0.8_flex",
            ImportanceMethod::Exact,
            0.8,
            Backend::Flex,
        ),
        (
            "exact_keep1.0_flex",
            ImportanceMethod::Exact,
            1.0,
            Backend::Flex,
        ),
        (
            "last_layer_keep0.8_flex",
            ImportanceMethod::LastLayer,
            0.8,
            Backend::Flex,
        ),
        (
            "exact_keep0.8_ndarray",
            ImportanceMethod::Exact,
            0.8,
            Backend::Ndarray,
        ),
    ] {
        let mut learner = OnlineLearner::new(LearnerConfig {
            inputs: D,
            head: Head::Regression,
            model: ModelConfig {
                backend,
                hidden: vec![64, 64],
            },
            importance: method,
            selection: SelectionConfig {
                keep,
                warmup: 1024,
                window: 4096,
                unbiased_q: 0.0,
                ..SelectionConfig::default()
            },
            buffer: BufferConfig {
                policy: EvictionPolicy::Importance,
                capacity: 8192,
                max_bytes: 4 << 20,
                decay: 0.9999,
                replay_ratio: 0.25,
                replay_sampling: ReplaySampling::Uniform,
                rescore_every: 50,
                rescore_slice: 512,
            },
            reference_replay_ratio: 1.0,
            holdout_every: 10,
            training: TrainingConfig {
                micro_batch: B,
                learning_rate: 1e-3,
                seed: 3,
                ..TrainingConfig::default()
            },
        });
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                let k = i % n_batches;
                i += 1;
                learner.learn_batch(FreshBatch {
                    x: &x[k * B * D..(k + 1) * B * D],
                    y: &y[k * B..(k + 1) * B],
                    keys: &keys,
                    times: &times,
                })
            })
        });
    }
    g.finish();
}

/// The scoring-and-gradient work of one micro-batch (forward, per-sample output gradients,
/// exact per-sample norms, weighted parameter gradient) through burn (flex) and through the
/// fused CPU kernel, at the B = 256 and at the shipped micro-batch of 8 rows.
fn fused_kernel(c: &mut Criterion) {
    use gradsift::learner::fused::FusedMlp;
    let head = Head::Regression;
    let dev = Device::flex();
    let params = Mlp::new(D, &[64, 64], head, &dev).dense_params();
    for n in [8, B] {
        let (x, y) = data(n, 2);
        let w = vec![1.0f32; n];
        let mut g = c.benchmark_group(format!("norms_and_grads_B{n}"));
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("burn_flex", |b| {
            b.iter(|| {
                let tr = model::trace(&params, model::matrix(x.clone(), n, D, &dev));
                let t = model::target_tensor(head, &y, &dev);
                let deltas =
                    model::backward_deltas(&params, &tr, model::output_grad(head, tr.output(), t));
                let norms = model::to_vec(model::sq_norms(&tr.inputs, &deltas));
                let grads = model::weighted_grads(
                    &tr.inputs,
                    &deltas,
                    model::matrix(w.clone(), n, 1, &dev),
                );
                (
                    norms,
                    grads
                        .into_iter()
                        .map(|(gw, gb)| (model::to_vec(gw), model::to_vec(gb)))
                        .collect::<Vec<_>>(),
                )
            })
        });
        let mut f = FusedMlp::from_dense(&params, head);
        let mut norms = vec![0.0; n];
        let mut grads = vec![(Vec::new(), Vec::new()); params.len()];
        g.bench_function("fused_kernel", |b| {
            b.iter(|| {
                f.forward(&x, n);
                f.backward(&y);
                f.sq_norms(&mut norms);
                f.weighted_grads(&w, &mut grads);
                norms[0]
            })
        });
        g.finish();
    }
}

criterion_group!(benches, scoring, learner_core, fused_kernel);
criterion_main!(benches);
