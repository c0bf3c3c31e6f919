//! The exact per-sample gradient norms (burn's fused backward, burn's autodiff probes, and
//! the fused CPU kernel of the default backend) must equal B separate single-sample backward
//! passes, for both heads, on random and on real data.

mod common;

use burn::tensor::Device;
use gradsift::learner::model::{self, DenseParams, Head, Mlp};
use rand::{Rng, SeedableRng};

fn fused(params: &[DenseParams], head: Head, x: &[f32], y: &[f32], dev: &Device) -> Vec<f32> {
    let n = y.len();
    let xt = model::matrix(x.to_vec(), n, x.len() / n, dev);
    let target = model::target_tensor(head, y, dev);
    let tr = model::trace(params, xt);
    let g = model::output_grad(head, tr.output(), target);
    let deltas = model::backward_deltas(params, &tr, g);
    model::to_vec(model::sq_norms(&tr.inputs, &deltas))
}

fn probes(params: &[DenseParams], head: Head, x: &[f32], y: &[f32], dev: &Device) -> Vec<f32> {
    let n = y.len();
    let xt = model::matrix(x.to_vec(), n, x.len() / n, dev);
    let target = model::target_tensor(head, y, dev);
    let (inputs, deltas, _, _) = model::probe_trace(params, head, xt, target);
    model::to_vec(model::sq_norms(&inputs, &deltas))
}

/// The fused CPU kernel (`model.backend = "fused"`) on the same weights.
fn kernel(params: &[DenseParams], head: Head, x: &[f32], y: &[f32]) -> Vec<f32> {
    let mut k = gradsift::learner::fused::FusedMlp::from_dense(params, head);
    k.forward(x, y.len());
    k.backward(y);
    let mut out = vec![0.0; y.len()];
    k.sq_norms(&mut out);
    out
}

/// Largest relative error of the norms (not the squares).
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let (x, y) = ((*x as f64).sqrt(), (*y as f64).sqrt());
            (x - y).abs() / y.abs().max(1e-12)
        })
        .fold(0.0, f64::max)
}

/// burn's random initialisation draws from a per-device generator that both tests share:
/// seeded under one lock, each model's weights are the same on every run. Unseeded, one run
/// in CI drew weights for which a sample's norm came out 1.15e-4 off in f32 on ndarray.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(head: Head, x: &[f32], y: &[f32], d: usize, what: &str) {
    for dev in [
        Device::flex(),
        #[allow(deprecated)]
        Device::ndarray(),
    ] {
        let mlp = {
            let _one = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
            dev.seed(7);
            Mlp::new(d, &[64, 64], head, &dev)
        };
        let params = mlp.dense_params();
        let naive = model::naive_sq_norms(&params, head, x, y);
        assert!(
            naive.iter().all(|v| v.is_finite() && *v > 0.0),
            "{what}: naive norms are positive"
        );
        let f = fused(&params, head, x, y, &dev);
        let p = probes(&params, head, x, y, &dev);
        let k = kernel(&params, head, x, y);
        let (ef, ep, ek) = (
            max_rel(&f, &naive),
            max_rel(&p, &naive),
            max_rel(&k, &naive),
        );
        println!(
            "{what} on {dev:?}: fused rel err {ef:.2e}, probes {ep:.2e}, kernel {ek:.2e} over {} samples",
            y.len()
        );
        assert!(ef < 1e-4, "{what}: fused exact norms off by {ef}");
        assert!(ep < 1e-4, "{what}: autodiff-probe norms off by {ep}");
        assert!(ek < 1e-4, "{what}: the fused kernel's norms off by {ek}");
    }
}

#[test]
fn exact_norms_match_naive_on_random_data() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let (n, d) = (48, 16);
    let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
    check(Head::Regression, &x, &y, d, "random regression");
    let c: Vec<f32> = (0..n).map(|_| rng.random_range(0..64) as f32).collect();
    check(
        Head::Classification { classes: 64 },
        &x,
        &c,
        d,
        "random classification",
    );
}

#[test]
fn exact_norms_match_naive_on_real_data() {
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    let (s, d, _) = common::feature_rows("milan_internet", &milan, 64);
    assert_eq!(s.len(), 64);
    check(
        Head::Regression,
        &s.x,
        &s.y,
        d,
        "Milan traffic (regression)",
    );

    let beam = common::shared_data().join("beam/deepsense_scenario1.parquet");
    let (s, d, _) = common::feature_rows("deepsense_beam", &beam, 64);
    assert_eq!(s.len(), 64);
    check(
        Head::Classification { classes: 64 },
        &s.x,
        &s.y,
        d,
        "DeepSense beams (classification)",
    );
}

#[test]
fn weighted_gradient_equals_autodiff_gradient_of_weighted_loss() {
    // The training step reuses the scoring backward: Σ w_i a_iᵀ g_i must be burn's own
    // gradient of Σ w_i ℓ_i.
    let dev = Device::flex();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let (n, d) = (32, 8);
    let head = Head::Classification { classes: 5 };
    let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.random_range(0..5) as f32).collect();
    let w: Vec<f32> = (0..n)
        .map(|i| {
            if i % 3 == 0 {
                0.0
            } else {
                rng.random_range(0.1..2.0)
            }
        })
        .collect();
    // Built on the autodiff device so burn can differentiate it; dense_params() are plain.
    let ad = Mlp::new(d, &[16, 16], head, &dev.clone().autodiff()).tracked();
    let params = ad.dense_params();
    let xt = model::matrix(x.clone(), n, d, &dev);
    let target = model::target_tensor(head, &y, &dev);
    let tr = model::trace(&params, xt.clone());
    let deltas = model::backward_deltas(
        &params,
        &tr,
        model::output_grad(head, tr.output(), target.clone()),
    );
    let ours = model::weighted_grads(&tr.inputs, &deltas, model::matrix(w.clone(), n, 1, &dev));

    let losses = model::per_sample_loss(head, ad.forward(xt.autodiff()), target.autodiff());
    let grads = (losses * model::matrix(w, n, 1, &dev).autodiff())
        .sum()
        .backward();
    let theirs = burn::optim::GradientsParams::from_grads(grads, &ad);
    assert_eq!(ad.depth(), ours.len());
    let ids = param_ids(&ad);
    for (k, (gw, gb)) in ours.into_iter().enumerate() {
        let tw: burn::Tensor<2> = theirs.get(ids[2 * k]).expect("weight grad");
        let tb: burn::Tensor<1> = theirs.get(ids[2 * k + 1]).expect("bias grad");
        let dw = (gw - tw.clone().inner()).abs().max().into_scalar::<f32>();
        let db = (gb - tb.inner()).abs().max().into_scalar::<f32>();
        let scale = tw.inner().abs().max().into_scalar::<f32>().max(1e-6);
        assert!(
            dw / scale < 1e-4 && db / scale < 1e-4,
            "layer {k}: {dw} {db} (scale {scale})"
        );
    }
}

fn param_ids(m: &Mlp) -> Vec<burn::module::ParamId> {
    use burn::module::{ModuleVisitor, Param};
    struct Ids(Vec<burn::module::ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, p: &Param<burn::Tensor<D>>) {
            self.0.push(p.id);
        }
    }
    let mut v = Ids(Vec::new());
    burn::module::Module::visit(m, &mut v);
    v.0
}
