//! Predicting with averaged weights (`training.average_decay = d`): the learner's
//! predictions come from an exponential moving average of its weights, taken after every
//! optimiser step, while training goes on with the live weights (Polyak averaging).
//!
//! Why: each step follows a micro-batch of a few noisy rows (the best beam is within 0.5 dB of
//! the runner-up in 81-99% of beam rows; traffic has spikes), so the live weights jitter
//! around what the stream supports; their average jitters less. Nothing else changes: the
//! same rows train, with the same scores and losses (selection, the replay buffer and the
//! drift detectors read the live model), so the compute is the same but for one more forward
//! pass of the fresh rows (booked as inference) and about 3 FLOPs per parameter per step
//! (booked with the step). The decay of update t is min(d, (1 + t)/(10 + t)), the schedule of
//! TensorFlow's `ExponentialMovingAverage` with `num_updates`: a young model's average is not
//! held back by its random start.
//!
//! An average lags when the stream changes: on Milan's Christmas weeks it lost 7.6% more
//! than the live weights. So each learner keeps both predictors' running losses on the rows
//! they predicted (labels arrive with the rows) and predicts with the average only while it
//! has lost no more than the live weights: the same rule as `model.decision = "switch"`.
//! Measured per workload in `experiments/README.md` ("Predicting with averaged weights").

use serde::{Deserialize, Serialize};

use super::fused::FusedMlp;
use super::model::{Head, SavedLayer};

/// Each earlier row's weight in the running losses, per later row (a memory of about 100
/// rows). Chosen on the validation periods of Milan and the two beam pipelines among 0.9,
/// 0.99 and 0.999 (5 seeds; their sum was best, the three within the seed spread).
const RECORD_DECAY: f64 = 0.99;

/// The averaged weights and how many steps they have followed.
pub struct WeightAverage {
    decay: f64,
    updates: u64,
    /// Each predictor's running loss on the rows it predicted (see [`Self::prefers_average`]).
    live_loss: f64,
    average_loss: f64,
    mlp: FusedMlp,
    /// Shapes and parameter ids, to save the average as the live weights are saved.
    layout: Vec<SavedLayer>,
}

/// What a checkpoint keeps of a [`WeightAverage`] (since format 11).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AverageState {
    pub updates: u64,
    pub live_loss: f64,
    pub average_loss: f64,
    pub weights: Vec<SavedLayer>,
}

impl WeightAverage {
    /// Starts from the live weights `start`.
    pub fn new(decay: f64, start: Vec<SavedLayer>, head: Head) -> Self {
        WeightAverage {
            decay,
            updates: 0,
            live_loss: 0.0,
            average_loss: 0.0,
            mlp: FusedMlp::from_saved(&start, head),
            layout: start,
        }
    }

    /// The weight the average keeps at its next update (the rest goes to the live weights).
    fn keep(&self) -> f32 {
        let t = (self.updates + 1) as f64;
        self.decay.min((1.0 + t) / (10.0 + t)) as f32
    }

    /// Moves the average toward the live weights after an optimiser step.
    pub fn update(&mut self, live: &FusedMlp) {
        let keep = self.keep();
        self.mlp.average_toward(live, keep);
        self.updates += 1;
    }

    /// The same from weights in checkpoint form (the burn engine's live weights).
    pub fn update_from_saved(&mut self, live: &[SavedLayer]) {
        let keep = self.keep();
        let head = self.mlp.head();
        self.mlp
            .average_toward(&FusedMlp::from_saved(live, head), keep);
        self.updates += 1;
    }

    /// The averaged model's outputs for `n` rows of `x`.
    pub fn predict(&mut self, x: &[f32], n: usize) -> Vec<f32> {
        self.mlp.forward(x, n).to_vec()
    }

    /// Whether the averaged model has lost no more than the live one on recent rows.
    pub fn prefers_average(&self) -> bool {
        self.average_loss <= self.live_loss
    }

    /// Books both predictors' losses on the rows of the last [`Self::predict`], once their
    /// labels are known (`live` holds the live model's losses on the same rows).
    /// A loss that is not finite counts as twice the other side's: that side lost the row,
    /// but one overflow must not fix the choice for the rest of the run. A row where both
    /// are not finite changes nothing.
    pub fn record(&mut self, y: &[f32], live: &[f32]) {
        self.mlp.output_grads(y);
        for (&a, &l) in self.mlp.losses().iter().zip(live) {
            let (a, l) = match (a.is_finite(), l.is_finite()) {
                (true, true) => (a, l),
                (false, true) => (2.0 * l, l),
                (true, false) => (a, 2.0 * a),
                (false, false) => continue,
            };
            self.average_loss = RECORD_DECAY * self.average_loss + a as f64;
            self.live_loss = RECORD_DECAY * self.live_loss + l as f64;
        }
    }

    pub fn state(&self) -> AverageState {
        let mut weights = self.layout.clone();
        self.mlp.save_into(&mut weights);
        AverageState {
            updates: self.updates,
            live_loss: self.live_loss,
            average_loss: self.average_loss,
            weights,
        }
    }

    /// Continues from a checkpoint's average (of the same shapes: the caller checked the live
    /// weights', and the average is saved beside them).
    pub fn restore(&mut self, s: AverageState) {
        self.mlp = FusedMlp::from_saved(&s.weights, self.mlp.head());
        self.layout = s.weights;
        self.updates = s.updates;
        self.live_loss = s.live_loss;
        self.average_loss = s.average_loss;
    }

    /// Starts again from the live weights (after the learner went back to its last good ones),
    /// with an empty record: losses from before the divergence do not choose after it.
    pub fn reset(&mut self, live: &[SavedLayer]) {
        self.mlp = FusedMlp::from_saved(live, self.mlp.head());
        self.updates = 0;
        self.live_loss = 0.0;
        self.average_loss = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(w: f32, b: f32) -> Vec<SavedLayer> {
        vec![SavedLayer {
            d_in: 2,
            d_out: 1,
            weight_id: 1,
            weight: vec![w; 2],
            bias_id: 2,
            bias: vec![b],
        }]
    }

    #[test]
    fn the_average_follows_the_schedule_then_the_decay() {
        let mut a = WeightAverage::new(0.9, layer(0.0, 0.0), Head::Regression);
        // Update 1 keeps (1 + 1)/(10 + 1) = 2/11 of the start.
        a.update_from_saved(&layer(11.0, 1.0));
        let s = a.state();
        assert!(
            (s.weights[0].weight[0] - 9.0).abs() < 1e-5,
            "{:?}",
            s.weights
        );
        assert!((s.weights[0].bias[0] - 9.0 / 11.0).abs() < 1e-6);
        // From update 80 on, (1 + t)/(10 + t) ≥ 0.9: the decay holds.
        for _ in 1..100 {
            a.update_from_saved(&layer(1.0, 0.0));
        }
        assert_eq!(a.keep(), 0.9);
        let before = a.state().weights[0].weight[0];
        a.update_from_saved(&layer(2.0, 0.0));
        let after = a.state().weights[0].weight[0];
        assert!((after - (0.9 * before + 0.1 * 2.0)).abs() < 1e-6);
        // Predictions are the averaged model's: x = (1, 1) → 2·w + b.
        let out = a.predict(&[1.0, 1.0], 1);
        let s = a.state();
        assert!((out[0] - (2.0 * after + s.weights[0].bias[0])).abs() < 1e-5);
    }

    /// A non-finite loss on one row (the live model overflowed) does not decide the choice
    /// for good: the record skips it and follows the rows after it.
    #[test]
    fn a_non_finite_loss_does_not_lock_the_choice() {
        // The average predicts 2·w for x = (1, 1) against a target of 10: with w = 0 it
        // loses 100 per row against the live weights' 0; with w = 5 nothing against 100.
        for bad in [f32::INFINITY, f32::NAN] {
            for (w, live_loss, average_wins) in [(0.0, 0.0, false), (5.0, 100.0, true)] {
                let mut a = WeightAverage::new(0.9, layer(w, 0.0), Head::Regression);
                a.predict(&[1.0, 1.0], 1);
                a.record(&[0.0], &[bad]);
                for _ in 0..50 {
                    a.predict(&[1.0, 1.0], 1);
                    a.record(&[10.0], &[live_loss]);
                }
                assert_eq!(a.prefers_average(), average_wins, "after {bad}");
            }
        }
    }

    /// An average whose output overflows lost that row: the record counts it against it
    /// (twice the live loss), so the live model is preferred. It was skipped, and the
    /// overflowing average stayed preferred.
    #[test]
    fn an_overflowing_average_loses_its_rows() {
        let mut a = WeightAverage::new(0.9, layer(f32::MAX, 0.0), Head::Regression);
        assert!(a.prefers_average());
        a.predict(&[1.0, 1.0], 1);
        a.record(&[10.0], &[1.0]);
        assert!(!a.prefers_average());
    }

    #[test]
    fn a_restored_average_predicts_as_the_saved_one() {
        let mut a = WeightAverage::new(0.99, layer(0.5, 0.1), Head::Regression);
        for k in 0..20 {
            a.update_from_saved(&layer(k as f32, -1.0));
        }
        let bytes = postcard::to_stdvec(&a.state()).unwrap();
        let mut b = WeightAverage::new(0.99, layer(0.0, 0.0), Head::Regression);
        b.restore(postcard::from_bytes(&bytes).unwrap());
        assert_eq!(a.predict(&[1.0, 2.0], 1), b.predict(&[1.0, 2.0], 1));
        a.update_from_saved(&layer(3.0, 3.0));
        b.update_from_saved(&layer(3.0, 3.0));
        assert_eq!(a.predict(&[1.0, 2.0], 1), b.predict(&[1.0, 2.0], 1));
    }
}
