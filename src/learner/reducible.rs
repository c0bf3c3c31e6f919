//! The reducible loss (RHO-LOSS, Mindermann et al., ICML 2022): score a sample by its loss
//! under the model minus its loss under a small model fitted on held-out data. A sample that
//! even the held-out model cannot fit is noise (irreducible); one the held-out model fits but
//! ours does not is worth learning. The high-norm noise that makes top-k by gradient norm
//! lose to random on our streams is exactly what this subtraction is meant to discount.
//!
//! Online: every `holdout_every`-th fresh sample is held out: the main model never trains on
//! it, the irreducible-loss model (a linear layer, the smallest model of the same head) takes
//! one Adam step on the held-out rows of each micro-batch. Its forward costs a few percent of
//! the MLP's and its CPU time is booked as scoring work by the learner (its FLOPs, about 1%
//! of the MLP's, are not added to the FLOP count). Checkpoints keep this model and its Adam
//! state (since format 17), so a resumed run scores as the uninterrupted one.

use burn::optim::{AdamConfig, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};

use serde::{Deserialize, Serialize};

use super::model::{self, Head, Mlp, SavedLayer};

/// What a checkpoint keeps of the held-out model: its weights and burn's record of its Adam
/// state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrreducibleState {
    pub model: Vec<SavedLayer>,
    pub optimizer: Vec<u8>,
}

/// The held-out model and its optimiser.
pub struct IrreducibleLoss {
    model: Mlp,
    optim: ModuleOptimizer,
    head: Head,
    device: Device,
    pub holdout_every: u64,
    learning_rate: f64,
}

impl IrreducibleLoss {
    pub fn new(inputs: usize, head: Head, device: &Device, holdout_every: u64, lr: f64) -> Self {
        IrreducibleLoss {
            // Continues burn's stream where the learner's own model left it.
            model: Mlp::new(inputs, &[], head, &device.clone().autodiff()),
            optim: AdamConfig::new().init(),
            head,
            device: device.clone(),
            holdout_every: holdout_every.max(2),
            learning_rate: lr,
        }
    }

    /// The held-out model and its optimiser, for a checkpoint.
    pub fn state(&self) -> anyhow::Result<IrreducibleState> {
        let optimizer = self.optim.into_bytes().map_err(|e| {
            anyhow::anyhow!("cannot serialise the held-out model's optimiser: {e:?}")
        })?;
        Ok(IrreducibleState {
            model: self.model.to_saved(),
            optimizer: optimizer.to_vec(),
        })
    }

    /// Continues from [`IrreducibleLoss::state`]; the widths must be this model's.
    pub fn restore(&mut self, s: IrreducibleState) -> anyhow::Result<()> {
        let widths = model::saved_widths(&s.model);
        anyhow::ensure!(
            widths == self.model.widths(),
            "the saved held-out model has widths {widths:?}; this pipeline builds {:?}",
            self.model.widths()
        );
        self.model = Mlp::from_saved(&s.model, &self.device.clone().autodiff());
        self.optim = AdamConfig::new()
            .init()
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(s.optimizer))
            .map_err(|e| anyhow::anyhow!("cannot load the held-out model's optimiser: {e:?}"))?;
        Ok(())
    }

    /// Whether the `sample`-th fresh sample of the stream is held out.
    pub fn held_out(&self, sample: u64) -> bool {
        sample.is_multiple_of(self.holdout_every)
    }

    /// Per-sample losses of `n` rows under the held-out model.
    pub fn losses(&self, x: &[f32], y: &[f32]) -> Vec<f32> {
        let n = y.len();
        if n == 0 {
            return Vec::new();
        }
        let params = self.model.dense_params();
        let xt = model::matrix(x.to_vec(), n, x.len() / n, &self.device);
        let out = model::trace(&params, xt).output();
        let target = model::target_tensor(self.head, y, &self.device);
        model::to_vec(model::per_sample_loss(self.head, out, target))
    }

    /// One Adam step on the mean loss of the held-out rows.
    pub fn learn(&mut self, x: &[f32], y: &[f32]) {
        let n = y.len();
        if n == 0 {
            return;
        }
        let params = self.model.dense_params();
        let xt = model::matrix(x.to_vec(), n, x.len() / n, &self.device);
        let tr = model::trace(&params, xt);
        let target = model::target_tensor(self.head, y, &self.device);
        let g = model::output_grad(self.head, tr.output(), target);
        let deltas = model::backward_deltas(&params, &tr, g);
        let w = Tensor::<2>::from_data(
            TensorData::new(vec![1.0 / n as f32; n], [n, 1]),
            &self.device,
        );
        let grads = self
            .model
            .gradients(model::weighted_grads(&tr.inputs, &deltas, w));
        self.model = self
            .optim
            .step(self.learning_rate, self.model.clone(), grads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_out_model_learns_what_it_is_shown() {
        let dev = Device::flex();
        let mut m = IrreducibleLoss::new(2, Head::Regression, &dev, 5, 0.05);
        let x: Vec<f32> = (0..64).flat_map(|i| [i as f32 / 64.0, 1.0]).collect();
        let y: Vec<f32> = (0..64).map(|i| 3.0 * i as f32 / 64.0 - 1.0).collect();
        let before: f32 = m.losses(&x, &y).iter().sum();
        for _ in 0..300 {
            m.learn(&x, &y);
        }
        let after: f32 = m.losses(&x, &y).iter().sum();
        assert!(after < 0.05 * before, "{before} → {after}");
        assert!(m.held_out(10) && !m.held_out(11));
    }
}
