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

/// The learner core (score + select + train + buffer) on in-memory micro-batches, at the
/// issue's B = 256 and at the shipped micro-batch of 8; exact scores, keep 0.8, replay 3.
fn learner_core(c: &mut Criterion) {
    let n_batches = 64;
    for n in [B, 8] {
        let (x, y) = data(n * n_batches, 2);
        let keys: Vec<Arc<str>> = (0..n)
            .map(|i| Arc::from(format!("cell-{}", i % 32).as_str()))
            .collect();
        let times: Vec<i64> = (0..n as i64).collect();
        let mut g = c.benchmark_group(format!("learner_core_B{n}"));
        g.throughput(Throughput::Elements(n as u64));
        // The shipped pipelines' FIFO buffer; and the importance buffer, whose ordered
        // re-ranking of every replayed row is measured apart.
        let runs = [
            (
                "exact_keep0.8_replay3_fused",
                ImportanceMethod::Exact,
                Backend::Fused,
                EvictionPolicy::Fifo,
            ),
            (
                "exact_keep0.8_replay3_flex",
                ImportanceMethod::Exact,
                Backend::Flex,
                EvictionPolicy::Fifo,
            ),
            (
                "el2n_keep0.8_replay3_fused",
                ImportanceMethod::El2n,
                Backend::Fused,
                EvictionPolicy::Fifo,
            ),
            (
                "exact_keep0.8_replay3_importance_buffer_fused",
                ImportanceMethod::Exact,
                Backend::Fused,
                EvictionPolicy::Importance,
            ),
        ];
        for (name, method, backend, policy) in runs {
            let mut learner = core_learner(n, method, backend, policy);
            let mut i = 0;
            g.bench_function(name, |b| {
                b.iter(|| {
                    let k = i % n_batches;
                    i += 1;
                    learner.learn_batch(FreshBatch {
                        x: &x[k * n * D..(k + 1) * n * D],
                        y: &y[k * n..(k + 1) * n],
                        keys: &keys,
                        times: &times,
                    })
                })
            });
        }
        g.finish();
    }
}

fn core_learner(
    n: usize,
    importance: ImportanceMethod,
    backend: Backend,
    policy: EvictionPolicy,
) -> OnlineLearner {
    OnlineLearner::new(LearnerConfig {
        inputs: D,
        head: Head::Regression,
        model: ModelConfig {
            backend,
            hidden: vec![64, 64],
            max_models: 1,
            ..Default::default()
        },
        importance,
        selection: SelectionConfig {
            keep: 0.8,
            warmup: 1024,
            window: 4096,
            unbiased_q: 0.0,
            ..SelectionConfig::default()
        },
        buffer: BufferConfig {
            policy,
            capacity: 8192,
            max_bytes: 4 << 20,
            decay: 0.9999,
            replay_ratio: 3.0,
            replay_sampling: ReplaySampling::Uniform,
            rescore_every: if policy == EvictionPolicy::Importance {
                50
            } else {
                0
            },
            rescore_slice: 512,
        },
        reference_replay_ratio: 3.0,
        holdout_every: 10,
        training: TrainingConfig {
            micro_batch: n,
            learning_rate: 1e-3,
            seed: 3,
            ..TrainingConfig::default()
        },
    })
}

/// The work the peer scripts (`benches/peers/`) time in JAX and numpy, through the fused
/// kernel: exact per-sample norms (forward + per-sample backward + ghost norms), a plain
/// forward + backward (mean-loss gradient), and the same plus an Adam step.
fn peers(c: &mut Criterion) {
    use gradsift::learner::fused::{FusedAdam, FusedMlp};
    let head = Head::Regression;
    let params = Mlp::new(D, &[64, 64], head, &Device::flex()).dense_params();
    for n in [B, 8] {
        let (x, y) = data(n, 2);
        let w = vec![1.0 / n as f32; n];
        let mut g = c.benchmark_group(format!("peers_B{n}"));
        g.throughput(Throughput::Elements(n as u64));
        let mut f = FusedMlp::from_dense(&params, head);
        let mut norms = vec![0.0; n];
        // The passes that end in norms take their parts as they go (as the learner's exact
        // scoring does); the plain step does not.
        f.track_norms(true);
        g.bench_function("norms_exact", |b| {
            b.iter(|| {
                f.forward(&x, n);
                f.backward(&y);
                f.sq_norms(&mut norms);
                norms[0]
            })
        });
        // (The same norms with their parts taken afterwards: `cargo bench --bench paired`.)
        f.track_norms(false);
        let mut grads = vec![(Vec::new(), Vec::new()); params.len()];
        g.bench_function("fwd_bwd", |b| {
            b.iter(|| {
                f.forward(&x, n);
                f.backward(&y);
                f.weighted_grads(&w, &mut grads);
                grads[0].0[0]
            })
        });
        // The same step plus every row's exact gradient norm (ghost norm): what the norms
        // of rows a step back-propagates anyway cost on top of it.
        f.track_norms(true);
        g.bench_function("fwd_bwd_norms", |b| {
            b.iter(|| {
                f.forward(&x, n);
                f.backward(&y);
                f.sq_norms(&mut norms);
                f.weighted_grads(&w, &mut grads);
                grads[0].0[0] + norms[0]
            })
        });
        // The norms alone, on the rows of a finished backward pass that did not take
        // their parts: one pass over the activations and gradients.
        f.track_norms(false);
        f.forward(&x, n);
        f.backward(&y);
        g.bench_function("ghost_norms", |b| {
            b.iter(|| {
                f.sq_norms(&mut norms);
                norms[0]
            })
        });
        let mut adam = FusedAdam::default();
        g.bench_function("fwd_bwd_adam", |b| {
            b.iter(|| {
                f.forward(&x, n);
                f.backward(&y);
                f.weighted_grads(&w, &mut grads);
                adam.step(&mut f, &grads, 1e-3);
            })
        });
        // The update alone, on a real gradient (the groups above may have been filtered out).
        // It reads four arrays of the parameters' size and writes three (85 kB of state for
        // the 16-64-64-1 MLP, beyond L1). Without its square root and division a standalone
        // loop ran in 1.6-1.9 µs against 2.7-3.3 µs (2026-11-30), so about a third is the
        // divider; neither a division-free variant (square root and division by Newton
        // steps: slower) nor an AVX-512 one from the hardware's 14-bit rsqrt/rcp estimates
        // refined by Newton steps (2.86 vs 2.91-2.98 µs, two alternating runs) recovered it.
        f.forward(&x, n);
        f.backward(&y);
        f.weighted_grads(&w, &mut grads);
        g.bench_function("adam", |b| b.iter(|| adam.step(&mut f, &grads, 1e-3)));
        g.finish();
    }
}

/// This machine's one-core f32 FMA peak: 192 independent FMA chains (12 AVX-512 registers,
/// enough to fill two FMA ports of 4-cycle latency), compiled for AVX-512, AVX2+FMA or baseline and
/// picked at run time like the kernel. Writes the fastest call's rate to
/// `$CARGO_TARGET_DIR/fma_peak.json` for `benches/peers/table.py`.
fn fma_peak(c: &mut Criterion) {
    const ITERS: usize = 100_000;
    let flops = (ITERS * 192 * 2) as u64;
    let mut acc = [1.0f32; 192];
    // The fastest call seen, timed inside criterion's own loop so that nothing runs when
    // the group is filtered out.
    let best = std::cell::Cell::new(f64::INFINITY);
    let mut g = c.benchmark_group("fma_peak");
    g.throughput(Throughput::Elements(flops));
    g.bench_function("one_core", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let t = std::time::Instant::now();
                fma_chains(std::hint::black_box(&mut acc), ITERS);
                best.set(best.get().min(t.elapsed().as_secs_f64()));
            }
            start.elapsed()
        })
    });
    g.finish();
    if best.get().is_finite() {
        let gflops = flops as f64 / best.get() / 1e9;
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        let path = std::path::Path::new(&dir).join("fma_peak.json");
        let json = format!("{{\"gflops\": {gflops:.1}}}\n");
        std::fs::write(&path, json).expect("write fma_peak.json");
        println!(
            "fma_peak: {gflops:.1} GFLOP/s on one core ({})",
            path.display()
        );
    }
}

/// What the learner thread does to a record batch before the learner sees it: decode the
/// columns, check every row, and build its features (lags, calendar, scaling), per row of
/// the bundled Milan archive (8,928 rows, one key, batches of 1,024 as the replay reads).
fn decode_features(c: &mut Criterion) {
    use gradsift::decode::Decoder;
    use gradsift::features::{FeatureEngine, Samples};
    use gradsift::schema::Schema;
    use gradsift::source::RowOrigin;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema = Arc::new(Schema::load(&repo.join("schemas/milan_internet.json")).unwrap());
    let file = std::fs::File::open(repo.join("data/milan/internet_square5161.parquet")).unwrap();
    let batches: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .with_batch_size(1024)
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let source: Arc<str> = Arc::from("bench");
    let origins: Vec<RowOrigin> = (0..1024)
        .map(|i| RowOrigin {
            source: source.clone(),
            index: i,
        })
        .collect();
    let decoder = Decoder::new(schema.clone());
    let mut g = c.benchmark_group("decode_features");
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function("milan_archive", |b| {
        b.iter(|| {
            let mut features = FeatureEngine::new(schema.clone(), decoder.numeric_columns(), 1000);
            let mut out = Samples::default();
            for batch in &batches {
                let d = decoder.decode(batch).unwrap();
                features.push_batch(&d, &origins[..batch.num_rows()], &mut out, |_, _| {});
            }
            out.len()
        })
    });
    g.finish();
}

/// The neighbour memory of the classification baselines and the 5-NN blend: one query
/// (5 nearest among 4,096 or 16,384 two-dimensional positions; beam pipelines hold 4,096)
/// per sample, through the k-d trees and by the reference scan, to set beside
/// `learner_core` per sample. The positions are the bench data's first two columns, a
/// quarter of them snapped to a coarse lattice (many equal coordinates, as parked vehicles
/// give).
fn knn_memory(c: &mut Criterion) {
    use gradsift::learner::knn::KnnMemory;
    let mut g = c.benchmark_group("knn_memory");
    for n in [4096usize, 16384] {
        let mut m = KnnMemory::new(2, n);
        let (x, _) = data(n + 256, 9);
        let snap = |i: usize, v: f32| if i.is_multiple_of(4) { v.round() } else { v };
        for (i, p) in x.chunks(16).take(n).enumerate() {
            m.insert(&[snap(i, p[0]), snap(i, p[1])], (i % 64) as u16, 0);
        }
        let queries: Vec<[f32; 2]> = x.chunks(16).skip(n).map(|p| [p[0], p[1]]).collect();
        g.throughput(Throughput::Elements(queries.len() as u64));
        type Query = fn(&KnnMemory, &[f32], u32, &mut [(f32, u16)]) -> usize;
        let ways: [(&str, Query); 2] = [
            ("tree", KnnMemory::nearest),
            ("scan", KnnMemory::scan_nearest),
        ];
        for (way, query) in ways {
            g.bench_function(format!("nearest5_of_{n}_{way}"), |b| {
                let mut out = [(0f32, 0u16); 5];
                b.iter(|| {
                    queries
                        .iter()
                        .map(|q| query(&m, q, 0, &mut out))
                        .sum::<usize>()
                })
            });
        }
        // A sample's whole cost: its query, then its own point in (the ring overwrites the
        // oldest; the trees are rebuilt as they wear).
        g.bench_function(format!("query_and_insert_{n}_tree"), |b| {
            let mut out = [(0f32, 0u16); 5];
            b.iter(|| {
                let mut found = 0;
                for (i, q) in queries.iter().enumerate() {
                    found += m.nearest(q, 0, &mut out);
                    m.insert(&[snap(i, q[0]), snap(i, q[1])], (i % 64) as u16, 0);
                }
                found
            })
        });
    }
    g.finish();
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn fma_chains(acc: &mut [f32; 192], iters: usize) {
    let (a, b) = (0.999_999f32, 1e-6f32);
    let mut regs = *acc;
    for _ in 0..iters {
        for v in regs.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    *acc = regs;
}

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
        // As the learner runs it for exact scores: the passes take the norms' parts.
        f.track_norms(true);
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

/// The importance-score drift test (two-sample KS against the same stretch one week of
/// 10-minute slots earlier, window 256, as the Milan pipeline runs it), per score.
fn drift_score_test(c: &mut Criterion) {
    use gradsift::learner::drift::ScoreShift;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let scores: Vec<f32> = (0..1 << 16).map(|_| rng.random_range(0.0..1.0)).collect();
    let mut s = ScoreShift::new(256, 1.95, 1008);
    let mut g = c.benchmark_group("drift_score_test");
    g.throughput(Throughput::Elements(1024));
    let mut i = 0;
    g.bench_function("window256_season1008", |b| {
        b.iter(|| {
            let mut fired = 0;
            for _ in 0..1024 {
                fired += u32::from(s.update(scores[i % scores.len()]).is_some());
                i += 1;
            }
            fired
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    scoring,
    learner_core,
    fused_kernel,
    peers,
    fma_peak,
    decode_features,
    knn_memory,
    drift_score_test
);
criterion_main!(benches);
