//! Norm clipping (`selection.clip = q`): every row of a training step keeps its loss weight
//! times min(1, τ/s_i), where s_i is its gradient norm under the current model and τ the `q`
//! quantile of the norms of the last `window` fresh rows (recomputed every `window / 8`
//! fresh rows). A row's pull on the step is then
//! at most τ: per-sample gradient clipping, with the threshold following the stream.
//!
//! Why: on our streams the highest-norm rows are mostly noise (traffic spikes, weak-link
//! beams), yet ranking rows by norm to *select* them never beat random at equal compute.
//! `trim` drops the top few percent outright; clipping keeps those rows' direction and bounds
//! their weight, and costs nothing: it reads the free norms (`el2n`, `last_layer`) of rows
//! the step forwards anyway, and trains exactly the rows it would train without it. With
//! `el2n` on a squared-error head (‖g‖ = 2|ŷ − y|) it is a Huber loss whose threshold is the
//! residuals' running quantile; on a softmax head it down-weights the rows the model gets
//! most wrong. Checkpoints keep its window and threshold, so a restart clips from its first
//! row as the uninterrupted run would.

/// Fresh rows' norms needed before the first clip (a quantile of fewer means little).
pub const MIN_SCORES: usize = 256;

/// τ is recomputed every `window / REFRESHES` fresh rows. Why: keeping a sorted copy of the
/// window up to date (one memmove per row, as the selection window does) cost 7 points of
/// learning CPU saved at micro-batches of 8 (`benches/cpu_saved.sh`); a selection over a copy
/// every so often costs a few tens of ns per row, and τ moves slowly anyway.
const REFRESHES: usize = 8;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NormClip {
    level: f64,
    /// The last `cap` fresh norms, oldest overwritten first.
    ring: Vec<f32>,
    next: usize,
    cap: usize,
    /// Rows since τ was last computed, and τ (0 before [`MIN_SCORES`] norms, or where the
    /// quantile is 0: no clipping).
    since: usize,
    tau: f32,
    /// Whether τ was computed yet (a quantile of 0 is a value, refreshed on the schedule).
    computed: bool,
    #[serde(skip)]
    scratch: Vec<f32>,
}

impl NormClip {
    /// Clips at the `level` quantile of a window of `window` fresh rows' norms.
    pub fn new(level: f64, window: usize) -> Self {
        let cap = window.max(1);
        NormClip {
            level,
            ring: Vec::with_capacity(cap),
            next: 0,
            cap,
            since: 0,
            tau: 0.0,
            computed: false,
            scratch: Vec::with_capacity(cap),
        }
    }

    /// Scales each weight `w[i]` by `min(1, τ/norms[i])` with τ as it was before this step,
    /// then adds the step's `fresh` norms to the window. Returns the rows whose weight was
    /// cut (rows with weight 0 are left alone).
    pub fn apply(&mut self, fresh: &[f32], norms: &[f32], w: &mut [f32]) -> usize {
        debug_assert_eq!(norms.len(), w.len(), "one norm per weighted row");
        let tau = self.tau;
        let mut cut = 0;
        if tau > 0.0 {
            for (wi, &s) in w.iter_mut().zip(norms) {
                if *wi > 0.0 && s > tau {
                    *wi *= tau / s;
                    cut += 1;
                }
            }
        }
        // A norm that is not a number (a diverged model's) stays out of the quantile.
        for &s in fresh.iter().filter(|s| s.is_finite()) {
            if self.ring.len() < self.cap {
                self.ring.push(s);
            } else {
                self.ring[self.next] = s;
            }
            self.next = (self.next + 1) % self.cap;
        }
        self.since += fresh.len();
        let warm = self.ring.len() >= MIN_SCORES.min(self.cap);
        if warm && (!self.computed || self.since >= (self.cap / REFRESHES).max(1)) {
            self.tau = self.quantile();
            self.since = 0;
            self.computed = true;
        }
        cut
    }

    /// The `level` quantile of the window now (the k-th smallest, k = ⌊level·len⌋).
    fn quantile(&mut self) -> f32 {
        if self.ring.is_empty() {
            return 0.0;
        }
        self.scratch.clone_from(&self.ring);
        let k = ((self.level * self.scratch.len() as f64) as usize).min(self.scratch.len() - 1);
        *self.scratch.select_nth_unstable_by(k, f32::total_cmp).1
    }

    /// The threshold in force (0 before `MIN_SCORES` norms: nothing is cut).
    pub fn threshold(&self) -> f32 {
        self.tau
    }

    /// Continues from a checkpoint's window. A window of another length is not taken (the
    /// configuration changed: it refills); at another level, τ is recomputed from it.
    pub fn restore(&mut self, saved: NormClip) {
        if saved.cap != self.cap {
            return;
        }
        let level = self.level;
        *self = NormClip { level, ..saved };
        if saved.level != level && self.computed {
            self.tau = self.quantile();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quantile of 0 (most rows fitted exactly) turns clipping off until the next refresh,
    /// every `window / 8` rows like any τ; it was recomputed on every step.
    #[test]
    fn a_zero_threshold_is_refreshed_on_the_schedule() {
        let mut c = NormClip::new(0.9, 256);
        let mut w = vec![1.0; 256];
        c.apply(&[0.0; 256], &[0.0; 256], &mut w);
        assert!(c.computed && c.threshold() == 0.0);
        // The 0.9 quantile is 5 from the 26th norm of 5 on; the refresh comes at the 32nd.
        let mut w = [1.0];
        for _ in 0..27 {
            c.apply(&[5.0], &[5.0], &mut w);
        }
        assert_eq!(c.threshold(), 0.0);
        for _ in 27..32 {
            c.apply(&[5.0], &[5.0], &mut w);
        }
        assert_eq!(c.threshold(), 5.0);
    }

    #[test]
    fn rows_above_the_running_quantile_are_cut_to_it_and_the_rest_keep_their_weight() {
        let mut c = NormClip::new(0.9, 1000);
        // Before MIN_SCORES norms nothing is cut, whatever the norm.
        let mut w = vec![0.5; 2];
        assert_eq!(c.apply(&[1.0; 2], &[1e6, 1.0], &mut w), 0);
        assert_eq!(w, [0.5, 0.5]);
        // Norms 1..=1000 (the window keeps the last 1000): τ = the 0.9 quantile = 901.
        let norms: Vec<f32> = (1..=1000).map(|v| v as f32).collect();
        let mut w = vec![0.0; norms.len()];
        c.apply(&norms, &norms, &mut w);
        assert_eq!(
            c.threshold(),
            901.0,
            "τ is computed once the window holds 256 norms"
        );
        let mut w = vec![0.25, 0.25, 0.25, 0.0];
        let cut = c.apply(&[], &[100.0, 901.0, 1802.0, 1e9], &mut w);
        assert_eq!(cut, 1, "only the trained row above τ");
        assert_eq!(w, [0.25, 0.25, 0.125, 0.0]);
    }

    #[test]
    fn a_restored_window_clips_as_the_uninterrupted_one() {
        let norms: Vec<f32> = (1..=500).map(|v| v as f32).collect();
        let mut a = NormClip::new(0.5, 400);
        a.apply(&norms, &[], &mut []);
        let bytes = postcard::to_stdvec(&a).unwrap();
        let mut b = NormClip::new(0.5, 400);
        b.restore(postcard::from_bytes(&bytes).unwrap());
        let (mut wa, mut wb) = ([1.0; 3], [1.0; 3]);
        a.apply(&[7.0; 60], &[10.0, 400.0, 1e4], &mut wa);
        b.apply(&[7.0; 60], &[10.0, 400.0, 1e4], &mut wb);
        assert_eq!((wa, a.threshold()), (wb, b.threshold()));
        assert!(a.threshold() > 0.0 && wa[2] < 1.0);
        // Another level recomputes τ from the saved window; another window length refills.
        let mut c = NormClip::new(0.9, 400);
        c.restore(postcard::from_bytes(&bytes).unwrap());
        assert!(c.threshold() > a.threshold());
        let mut d = NormClip::new(0.5, 300);
        d.restore(postcard::from_bytes(&bytes).unwrap());
        assert_eq!(d.threshold(), 0.0);
    }

    #[test]
    fn the_threshold_follows_the_stream() {
        let mut c = NormClip::new(0.5, 300);
        let mut none = [];
        c.apply(&[1.0; 300], &[], &mut none);
        assert_eq!(c.threshold(), 1.0);
        c.apply(&[10.0; 300], &[], &mut none);
        assert_eq!(c.threshold(), 10.0, "the old regime has left the window");
        let mut w = [1.0];
        c.apply(&[], &[20.0], &mut w);
        assert_eq!(w, [0.5]);
    }
}
