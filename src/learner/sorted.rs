//! Sorted copies of sliding windows (in `f32::total_cmp` order), so that a quantile is one
//! lookup. A full window replaces its oldest value by the newest in a single memmove over the
//! span between their two positions (a third of the window on average), not a remove and an
//! insert (the whole window): the selection window is updated once per sample.
//!
//! Also the integer keys whose order is `total_cmp`'s, for sorting and ranking floats with
//! integer comparisons (the score test's windows, the replay buffer's importance order).

/// Inserts `x` at its place.
pub fn insert(v: &mut Vec<f32>, x: f32) {
    let at = position(v, x);
    v.insert(at, x);
}

/// Replaces one occurrence of `old` (which must be there) by `new`, keeping the order.
pub fn replace(v: &mut [f32], old: f32, new: f32) {
    let from = position(v, old);
    debug_assert!(v.get(from).is_some_and(|y| y.total_cmp(&old).is_eq()));
    let to = position(v, new);
    if to > from {
        // Everything strictly between `old` and `new`'s place moves one step down.
        v.copy_within(from + 1..to, from);
        v[to - 1] = new;
    } else {
        v.copy_within(to..from, to + 1);
        v[to] = new;
    }
}

/// An integer whose order is `f32::total_cmp`'s.
pub fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | (1 << 31) }
}

/// An integer whose order is `f64::total_cmp`'s.
pub fn order_key64(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 { !b } else { b | (1 << 63) }
}

/// The first index whose value is not below `x`.
fn position(v: &[f32], x: f32) -> usize {
    v.partition_point(|y| y.total_cmp(&x).is_lt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::LearnerRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn order_keys_order_as_total_cmp() {
        let v = [
            f64::NEG_INFINITY,
            -1e9,
            -2.5,
            -1e-300,
            -0.0,
            0.0,
            1e-300,
            3.0,
            1e12,
            f64::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(order_key64(w[0]) < order_key64(w[1]), "{w:?}");
            let (a, b) = (w[0] as f32, w[1] as f32);
            assert_eq!(order_key(a).cmp(&order_key(b)), a.total_cmp(&b), "{w:?}");
        }
    }

    #[test]
    fn a_sliding_window_stays_the_sorted_copy_of_its_values() {
        let mut rng = LearnerRng::seed_from_u64(1);
        let mut ring = std::collections::VecDeque::new();
        let mut sorted = Vec::new();
        for i in 0..5000 {
            // Few distinct values, so that duplicates and equal old/new values are exercised.
            let x =
                f32::from(rng.random_range(0u8..40)) * 0.5 - if i % 97 == 0 { 0.0 } else { 3.0 };
            if ring.len() == 64 {
                let old = ring.pop_front().unwrap();
                replace(&mut sorted, old, x);
            } else {
                insert(&mut sorted, x);
            }
            ring.push_back(x);
            let mut want: Vec<f32> = ring.iter().copied().collect();
            want.sort_unstable_by(f32::total_cmp);
            assert_eq!(sorted, want, "after {i} values");
        }
    }
}
