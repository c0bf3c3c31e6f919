//! Small differences between two ways of doing the same work, timed in alternation: each
//! round runs every variant once, in a rotating order, so that a change in the machine's
//! speed (this VM's moves by ±10% within minutes) falls on all of them alike. criterion runs
//! one benchmark after another, which is right for a figure but not for a difference of a
//! few percent between two of them.
//!
//! `cargo bench --bench paired` prints, per batch size, the median time per call of:
//! - exact per-sample norms with their parts taken inside the ReLU passes (as the learner's
//!   exact scoring runs them) and by a separate pass afterwards;
//! - a plain forward + backward (the mean loss's weight gradient), and the same with every
//!   row's exact norm, whose ratio is issue 11's "norms on top of a step".

use burn::tensor::Device;
use gradsift::learner::fused::FusedMlp;
use gradsift::learner::model::{Head, Mlp};
use std::hint::black_box;
use std::time::Instant;

const ROUNDS: usize = 400;

#[derive(Clone, Copy)]
enum Variant {
    NormsTracked,
    NormsAfter,
    FwdBwd,
    FwdBwdNorms,
}

const VARIANTS: [(Variant, &str); 4] = [
    (
        Variant::NormsTracked,
        "exact norms, parts taken in the passes",
    ),
    (
        Variant::NormsAfter,
        "exact norms, parts by a pass afterwards",
    ),
    (Variant::FwdBwd, "forward + backward"),
    (Variant::FwdBwdNorms, "forward + backward + exact norms"),
];

fn main() {
    // `cargo bench` passes `--bench`; a filter argument, if any, is ignored.
    let head = Head::Regression;
    let params = Mlp::new(16, &[64, 64], head, &Device::flex()).dense_params();
    println!("| B | work | median µs | min µs |\n|---|---|---|---|");
    let mut notes = Vec::new();
    for n in [256usize, 8] {
        let x: Vec<f32> = (0..n * 16)
            .map(|k| ((k * 2_654_435_761) % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let y: Vec<f32> = (0..n).map(|i| x[i * 16] * 0.5 - x[i * 16 + 1]).collect();
        let w = vec![1.0 / n as f32; n];
        let mut f = FusedMlp::from_dense(&params, head);
        let mut norms = vec![0.0; n];
        let mut grads = vec![(Vec::new(), Vec::new()); params.len()];
        // Enough calls per timing that the clock's resolution does not matter.
        let reps = if n >= 64 { 50 } else { 1000 };
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); VARIANTS.len()];
        for round in 0..ROUNDS {
            for j in 0..VARIANTS.len() {
                let v = (j + round) % VARIANTS.len();
                let (variant, _) = VARIANTS[v];
                let tracked = matches!(variant, Variant::NormsTracked | Variant::FwdBwdNorms);
                f.track_norms(tracked);
                let t = Instant::now();
                for _ in 0..reps {
                    f.forward(black_box(&x), n);
                    f.backward(&y);
                    if !matches!(variant, Variant::FwdBwd) {
                        f.sq_norms(&mut norms);
                    }
                    if matches!(variant, Variant::FwdBwd | Variant::FwdBwdNorms) {
                        f.weighted_grads(&w, &mut grads);
                    }
                    black_box((&norms, &grads));
                }
                times[v].push(t.elapsed().as_secs_f64() / reps as f64 * 1e6);
            }
        }
        let median: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            })
            .collect();
        for (v, (_, name)) in VARIANTS.iter().enumerate() {
            println!("| {n} | {name} | {:.3} | {:.3} |", median[v], times[v][0]);
        }
        notes.push(format!(
            "B = {n}: norms in the passes / afterwards {:.3}; norms on top of a step {:+.1}%",
            median[0] / median[1],
            (median[3] / median[2] - 1.0) * 100.0
        ));
    }
    for line in notes {
        println!("{line}");
    }
}
