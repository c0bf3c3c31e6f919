//! The model: a burn MLP (ReLU between dense layers) with a regression (MSE) or a
//! classification (softmax cross-entropy) head.
//!
//! Why the hand-written pieces: importance scoring needs the per-sample output gradient of
//! every layer, g_k = dℓ_i/dz_k, and the layer inputs a_k. For an MLP both come out of one
//! forward pass ([`trace`]) and one backward pass over the *sum* of per-sample losses
//! ([`backward_deltas`]); from them the exact per-sample gradient norms ([`sq_norms`], the
//! "ghost norm" of method.md §1) and the parameter gradient of any weighted subset of the
//! rows ([`weighted_grads`]) follow with a few cheap reductions. The same quantities can be
//! had from burn's autodiff with zero "probe" tensors ([`probe_trace`]); the two routes are
//! checked against each other and against one backward per sample ([`naive_sq_norms`]) in
//! the tests. Parameters live in a burn [`Module`] so that burn's Adam and burn's file
//! format apply to them.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};

/// What the last layer predicts and how its loss is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// One output, squared error ℓ = (ŷ − y)².
    Regression,
    /// `classes` logits, cross-entropy ℓ = −log softmax(z)_y.
    Classification { classes: usize },
}

impl Head {
    /// Width of the last layer.
    pub fn outputs(&self) -> usize {
        match self {
            Head::Regression => 1,
            Head::Classification { classes } => *classes,
        }
    }
}

/// A multi-layer perceptron: `inputs → hidden[0] → … → head.outputs()`.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
}

/// The tensors of one dense layer, detached from the module (no autodiff).
#[derive(Clone, Debug)]
pub struct DenseParams {
    /// `[d_in, d_out]`, burn's layout: z = a·W + b.
    pub weight: Tensor<2>,
    /// `[d_out]`.
    pub bias: Tensor<1>,
}

/// Held while burn's one RNG per process is seeded or drawn from ([`with_init_lock`]).
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f`, which seeds burn's RNG or draws initial weights from it, while no other thread
/// does. Why: the RNG is one per process, so a model built on another thread between a seed
/// and its draws (parallel tests) would take draws from the seeded stream, and the same seed
/// would not give the same weights. [`Mlp::new`] and [`Mlp::seeded`] hold it.
fn with_init_lock<T>(f: impl FnOnce() -> T) -> T {
    let _one_at_a_time = INIT.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

impl Mlp {
    /// A freshly initialised MLP (burn's default Kaiming-uniform initialisation), drawing on
    /// burn's RNG where it stands.
    pub fn new(inputs: usize, hidden: &[usize], head: Head, device: &Device) -> Self {
        with_init_lock(|| Self::drawn_now(inputs, hidden, head, device))
    }

    /// The same after `seed` (which seeds burn's RNG), with no other model's draws between.
    pub fn seeded(
        seed: impl FnOnce(),
        inputs: usize,
        hidden: &[usize],
        head: Head,
        device: &Device,
    ) -> Self {
        with_init_lock(|| {
            seed();
            Self::drawn_now(inputs, hidden, head, device)
        })
    }

    /// Builds the layers and draws their values (under the init lock).
    fn drawn_now(inputs: usize, hidden: &[usize], head: Head, device: &Device) -> Self {
        let mut widths = vec![inputs];
        widths.extend_from_slice(hidden);
        widths.push(head.outputs());
        let layers = widths
            .windows(2)
            .map(|w| LinearConfig::new(w[0], w[1]).init(device))
            .collect();
        Mlp { layers }.untracked().drawn()
    }

    /// The same model with every parameter's initial values drawn now. Why: burn draws a
    /// parameter's values lazily, on its first read, so a model built under the init lock
    /// but read later would draw from whatever another thread had seeded meanwhile. Layer by
    /// layer, weight then bias: the order the first read took before.
    fn drawn(self) -> Self {
        for l in &self.layers {
            let _ = l.weight.val();
            let _ = l.bias.as_ref().map(|b| b.val());
        }
        self
    }

    /// Parameters that do not require gradients. The hot path computes gradients by hand and
    /// hands them to burn's Adam, which re-marks every parameter it updates as require-grad
    /// when it was so: each such mark opens an autodiff graph that only a burn `backward()`
    /// would free, and the learner never calls one, so the graphs (about 8 KB per step)
    /// piled up for ever (issue 10, defect 1).
    fn untracked(self) -> Self {
        self.set_require_grad(false)
    }

    /// The same model with require-grad parameters, for burn's own backward (the autodiff
    /// references of tests and benchmarks). Not for the learner: see `Mlp::untracked`.
    pub fn tracked(self) -> Self {
        self.set_require_grad(true)
    }

    /// Whether any parameter is marked require-grad (see `Mlp::untracked`).
    pub fn tracks_gradients(&self) -> bool {
        self.layers.iter().any(|l| {
            l.weight.is_require_grad() || l.bias.as_ref().is_some_and(|b| b.is_require_grad())
        })
    }

    /// Plain forward pass through burn's modules (works on autodiff devices too).
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut h = x;
        for (k, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h);
            if k < last {
                h = relu(h);
            }
        }
        h
    }

    /// The current parameters as plain tensors, one entry per layer.
    pub fn dense_params(&self) -> Vec<DenseParams> {
        self.layers
            .iter()
            .map(|l| DenseParams {
                weight: l.weight.val().inner(),
                bias: l
                    .bias
                    .as_ref()
                    .expect("layers are built with bias")
                    .val()
                    .inner(),
            })
            .collect()
    }

    /// Register one gradient per parameter, in the order of [`Mlp::dense_params`].
    pub fn gradients(&self, grads: Vec<(Tensor<2>, Tensor<1>)>) -> burn::optim::GradientsParams {
        let mut out = burn::optim::GradientsParams::new();
        for (layer, (gw, gb)) in self.layers.iter().zip(grads) {
            out.register(layer.weight.id, gw);
            if let Some(b) = &layer.bias {
                out.register(b.id, gb);
            }
        }
        out
    }

    /// Number of dense layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// The weights as plain numbers with their parameter ids (the optimiser's state is keyed
    /// by these ids, so a restored model must carry the same ones).
    pub fn to_saved(&self) -> Vec<SavedLayer> {
        self.layers
            .iter()
            .map(|l| {
                let w = l.weight.val();
                let b = l.bias.as_ref().expect("layers are built with bias").val();
                let [d_in, d_out] = w.dims();
                SavedLayer {
                    d_in,
                    d_out,
                    weight_id: l.weight.id.val(),
                    weight: w.into_data().try_to_vec::<f32>().expect("f32 weights"),
                    bias_id: l.bias.as_ref().expect("bias").id.val(),
                    bias: b.into_data().try_to_vec::<f32>().expect("f32 bias"),
                }
            })
            .collect()
    }

    /// Rebuilds a model saved by [`Mlp::to_saved`] on `device` (an autodiff device).
    pub fn from_saved(saved: &[SavedLayer], device: &Device) -> Self {
        let layers = saved
            .iter()
            .map(|s| {
                let mut weight =
                    Param::from_data(TensorData::new(s.weight.clone(), [s.d_in, s.d_out]), device);
                weight.id = ParamId::from(s.weight_id);
                let mut bias = Param::from_data(TensorData::new(s.bias.clone(), [s.d_out]), device);
                bias.id = ParamId::from(s.bias_id);
                Linear {
                    weight,
                    bias: Some(bias),
                }
            })
            .collect();
        Mlp { layers }.untracked()
    }

    /// Layer widths, `inputs → … → outputs`.
    pub fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.layers.iter().map(|l| l.weight.dims()[0]).collect();
        w.extend(self.layers.last().map(|l| l.weight.dims()[1]));
        w
    }
}

/// One dense layer as a checkpoint stores it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedLayer {
    pub d_in: usize,
    pub d_out: usize,
    pub weight_id: u64,
    /// Row-major `[d_in, d_out]`.
    pub weight: Vec<f32>,
    pub bias_id: u64,
    pub bias: Vec<f32>,
}

/// Layer widths `inputs → … → outputs` of saved layers (to check a restore's shape).
pub fn saved_widths(layers: &[SavedLayer]) -> Vec<usize> {
    let mut w: Vec<usize> = layers.iter().map(|l| l.d_in).collect();
    w.extend(layers.last().map(|l| l.d_out));
    w
}

/// What the forward pass keeps for the backward pass.
pub struct Trace {
    /// a_k, the input of layer k (`inputs[0]` is the batch itself).
    pub inputs: Vec<Tensor<2>>,
    /// z_k, the pre-activation output of layer k; the last one is the model output.
    pub pre: Vec<Tensor<2>>,
}

impl Trace {
    /// The model output (logits or the regression value), `[n, outputs]`.
    pub fn output(&self) -> Tensor<2> {
        self.pre.last().expect("at least one layer").clone()
    }

    /// The same trace restricted to some rows (for training a subset after a forward pass).
    pub fn rows(&self, idx: &Tensor<1, burn::tensor::Int>) -> Trace {
        Trace {
            inputs: self
                .inputs
                .iter()
                .map(|t| t.clone().select(0, idx.clone()))
                .collect(),
            pre: self
                .pre
                .iter()
                .map(|t| t.clone().select(0, idx.clone()))
                .collect(),
        }
    }
}

/// Forward pass on plain tensors, keeping every layer's input and pre-activation.
pub fn trace(params: &[DenseParams], x: Tensor<2>) -> Trace {
    let last = params.len() - 1;
    let mut inputs = Vec::with_capacity(params.len());
    let mut pre = Vec::with_capacity(params.len());
    let mut h = x;
    for (k, p) in params.iter().enumerate() {
        let z = h.clone().matmul(p.weight.clone()) + p.bias.clone().unsqueeze::<2>();
        inputs.push(h);
        h = if k < last { relu(z.clone()) } else { z.clone() };
        pre.push(z);
    }
    Trace { inputs, pre }
}

/// Targets of a batch as tensors: `[n, 1]` values (regression) or `[n, classes]` one-hot.
pub fn target_tensor(head: Head, y: &[f32], device: &Device) -> Tensor<2> {
    let n = y.len();
    match head {
        Head::Regression => Tensor::from_data(TensorData::new(y.to_vec(), [n, 1]), device),
        Head::Classification { classes } => {
            let mut onehot = vec![0f32; n * classes];
            for (i, &c) in y.iter().enumerate() {
                let c = (c as usize).min(classes - 1);
                onehot[i * classes + c] = 1.0;
            }
            Tensor::from_data(TensorData::new(onehot, [n, classes]), device)
        }
    }
}

/// Per-sample loss ℓ_i, `[n, 1]`.
pub fn per_sample_loss(head: Head, out: Tensor<2>, target: Tensor<2>) -> Tensor<2> {
    match head {
        Head::Regression => (out - target).square(),
        Head::Classification { .. } => (log_softmax(out, 1) * target).sum_dim(1).neg(),
    }
}

/// g_L = dℓ_i/dz_L in closed form: 2(ŷ − y) for MSE, softmax(z) − onehot(y) for cross-entropy.
pub fn output_grad(head: Head, out: Tensor<2>, target: Tensor<2>) -> Tensor<2> {
    match head {
        Head::Regression => (out - target).mul_scalar(2.0),
        Head::Classification { .. } => softmax(out, 1) - target,
    }
}

/// Back-propagates g_L through the ReLU layers: g_{k-1} = (g_k·W_kᵀ) ⊙ 1[z_{k-1} > 0].
/// Row i of every returned tensor depends on sample i only, which is what makes both the
/// per-sample norms and any row-weighted parameter gradient exact.
pub fn backward_deltas(params: &[DenseParams], tr: &Trace, g_out: Tensor<2>) -> Vec<Tensor<2>> {
    let depth = params.len();
    let mut deltas = vec![g_out; 1];
    for k in (1..depth).rev() {
        let g = deltas.last().expect("non-empty").clone();
        let back = g.matmul(params[k].weight.clone().transpose());
        let mask = tr.pre[k - 1].clone().greater_elem(0.0).float();
        deltas.push(back * mask);
    }
    deltas.reverse();
    deltas
}

/// Squared per-sample gradient norm over all parameters, `[n]`:
/// s_i² = Σ_k (‖a_k,i‖² + 1)·‖g_k,i‖².
pub fn sq_norms(inputs: &[Tensor<2>], deltas: &[Tensor<2>]) -> Tensor<1> {
    let n = deltas[0].dims()[0];
    let mut total: Option<Tensor<2>> = None;
    for (a, g) in inputs.iter().zip(deltas) {
        let a_sq = a.clone().square().sum_dim(1).add_scalar(1.0);
        let term = a_sq * g.clone().square().sum_dim(1);
        total = Some(match total {
            None => term,
            Some(t) => t + term,
        });
    }
    total.expect("at least one layer").reshape([n])
}

/// Squared norm of the last layer's per-sample gradient only (the `last_layer` proxy).
pub fn last_layer_sq_norms(tr: &Trace, g_out: &Tensor<2>) -> Tensor<1> {
    let last = tr.inputs.len() - 1;
    sq_norms(&tr.inputs[last..], std::slice::from_ref(g_out))
}

/// Gradient of Σ_i w_i ℓ_i for every layer: dW_k = a_kᵀ·(w ⊙ g_k), db_k = Σ_i w_i g_k,i.
/// `w` is `[n, 1]`.
pub fn weighted_grads(
    inputs: &[Tensor<2>],
    deltas: &[Tensor<2>],
    w: Tensor<2>,
) -> Vec<(Tensor<2>, Tensor<1>)> {
    inputs
        .iter()
        .zip(deltas)
        .map(|(a, g)| {
            let wg = g.clone() * w.clone();
            let d_out = wg.dims()[1];
            let db = wg.clone().sum_dim(0).reshape([d_out]);
            let dw = a.clone().transpose().matmul(wg);
            (dw, db)
        })
        .collect()
}

/// The same (a_k, g_k) as [`trace`] + [`backward_deltas`], obtained from burn's autodiff:
/// a zero `require_grad` probe p_k is added to each layer output, z_k = a_k·W + b + p_k, and
/// after one backward of Σ ℓ_i the probe's gradient is g_k row by row (method.md §1).
/// Returns (inputs, deltas, per-sample losses, outputs).
pub fn probe_trace(
    params: &[DenseParams],
    head: Head,
    x: Tensor<2>,
    target: Tensor<2>,
) -> (Vec<Tensor<2>>, Vec<Tensor<2>>, Tensor<2>, Tensor<2>) {
    let device = x.device().autodiff();
    let n = x.dims()[0];
    let last = params.len() - 1;
    let mut probes = Vec::with_capacity(params.len());
    let mut inputs = Vec::with_capacity(params.len());
    let mut h = x.autodiff();
    for (k, p) in params.iter().enumerate() {
        let d_out = p.bias.dims()[0];
        let probe = Tensor::<2>::zeros([n, d_out], &device).require_grad();
        let z = h.clone().matmul(p.weight.clone().autodiff())
            + p.bias.clone().autodiff().unsqueeze::<2>()
            + probe.clone();
        inputs.push(h.clone().inner());
        probes.push(probe);
        h = if k < last { relu(z) } else { z };
    }
    let output = h.clone().inner();
    let losses = per_sample_loss(head, h, target.autodiff());
    let grads = losses.clone().sum().backward();
    let deltas = probes
        .iter()
        .map(|p| p.grad(&grads).expect("probe gradient").inner())
        .collect();
    (inputs, deltas, losses.inner(), output)
}

/// Reference: s_i² from B separate single-sample backward passes through burn's autodiff.
/// Slow on purpose; the tests and the benchmark compare the fast routes against it.
pub fn naive_sq_norms(params: &[DenseParams], head: Head, x: &[f32], y: &[f32]) -> Vec<f32> {
    let device = params[0].weight.device();
    let ad = device.clone().autodiff();
    let n = y.len();
    let d = x.len() / n.max(1);
    let last = params.len() - 1;
    (0..n)
        .map(|i| {
            let leaves: Vec<(Tensor<2>, Tensor<1>)> = params
                .iter()
                .map(|p| {
                    (
                        p.weight.clone().autodiff().require_grad(),
                        p.bias.clone().autodiff().require_grad(),
                    )
                })
                .collect();
            let xi = Tensor::<2>::from_data(
                TensorData::new(x[i * d..(i + 1) * d].to_vec(), [1, d]),
                &ad,
            );
            let ti = target_tensor(head, &y[i..i + 1], &device).autodiff();
            let mut h = xi;
            for (k, (w, b)) in leaves.iter().enumerate() {
                let z = h.matmul(w.clone()) + b.clone().unsqueeze::<2>();
                h = if k < last { relu(z) } else { z };
            }
            let grads = per_sample_loss(head, h, ti).sum().backward();
            leaves
                .iter()
                .map(|(w, b)| {
                    let gw: f32 = w.grad(&grads).expect("w grad").square().sum().into_scalar();
                    let gb: f32 = b.grad(&grads).expect("b grad").square().sum().into_scalar();
                    gw + gb
                })
                .sum()
        })
        .collect()
}

/// Copies a tensor's values out to the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor")
}

/// A `[n, d]` tensor from row-major host values.
pub fn matrix(values: Vec<f32>, n: usize, d: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, [n, d]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(m: &Mlp) -> Vec<f32> {
        m.to_saved()
            .into_iter()
            .flat_map(|l| [l.weight, l.bias].concat())
            .collect()
    }

    fn build(seed: u64) -> Mlp {
        let device = Device::default();
        Mlp::seeded(|| device.seed(seed), 3, &[5], Head::Regression, &device)
    }

    /// A model's initial weights are fixed when it is built, whatever is seeded or drawn
    /// between its build and its first read (as another thread's model would be).
    #[test]
    fn initial_weights_are_drawn_when_the_model_is_built() {
        let alone = weights(&build(11));
        let first = build(11);
        let other = weights(&build(12));
        assert_ne!(other, alone, "two seeds give two models");
        assert_eq!(weights(&first), alone);
    }
}
