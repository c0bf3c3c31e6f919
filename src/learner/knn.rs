//! A bounded memory of labelled points and the k nearest of a query among them.
//!
//! Beam selection is a map from position to beam: the classes of the nearest past positions
//! are a strong vote, strongest at a cold start when the model has seen little. This memory
//! backs the online k-nearest-neighbour baseline of the report. It holds the last
//! `capacity` points (a ring: the oldest is overwritten), each with its class and a group
//! (the key it came from: a neighbour of another site is not a neighbour). A query scans the
//! points of its group, O(capacity · dims): at the 4,096 points and 2-4 dimensions it is
//! used with, about a microsecond, less than a training step of one row. Why not a k-d tree
//! crate: points leave the ring as fast as they arrive, and the candidates (`kiddo`)
//! rebuild or panic on many equal coordinates, which parked vehicles produce.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnnMemory {
    dims: usize,
    capacity: usize,
    points: Vec<f32>,
    labels: Vec<u16>,
    groups: Vec<u32>,
    /// Slot the next point goes to once the ring is full.
    next: usize,
}

impl KnnMemory {
    pub fn new(dims: usize, capacity: usize) -> Self {
        KnnMemory {
            dims,
            capacity: capacity.max(1),
            points: Vec::new(),
            labels: Vec::new(),
            groups: Vec::new(),
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Remembers a point (overwriting the oldest when full).
    pub fn insert(&mut self, point: &[f32], label: u16, group: u32) {
        debug_assert_eq!(point.len(), self.dims);
        if self.labels.len() < self.capacity {
            self.points.extend_from_slice(point);
            self.labels.push(label);
            self.groups.push(group);
            return;
        }
        let i = self.next;
        self.points[i * self.dims..(i + 1) * self.dims].copy_from_slice(point);
        self.labels[i] = label;
        self.groups[i] = group;
        self.next = (i + 1) % self.capacity;
    }

    /// The `out.len()` nearest points of `group` to `q`, nearest first, as (squared
    /// distance, class); returns how many were found. Equal distances keep the newer point.
    pub fn nearest(&self, q: &[f32], group: u32, out: &mut [(f32, u16)]) -> usize {
        let k = out.len();
        let mut found = 0;
        if k == 0 {
            return 0;
        }
        // Newest first, so that a later equal-distance point never displaces an earlier one.
        let n = self.labels.len();
        for age in 0..n {
            let i = (self.next + n - 1 - age) % n;
            if self.groups[i] != group {
                continue;
            }
            let p = &self.points[i * self.dims..(i + 1) * self.dims];
            let d: f32 = p.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
            if found == k && d >= out[k - 1].0 {
                continue;
            }
            // Insertion into the short sorted list.
            let mut j = found.min(k - 1);
            out[j] = (d, self.labels[i]);
            while j > 0 && out[j - 1].0 > out[j].0 {
                out.swap(j - 1, j);
                j -= 1;
            }
            found = (found + 1).min(k);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_nearest_of_its_group_and_forgets_the_oldest() {
        let mut m = KnnMemory::new(2, 4);
        m.insert(&[0.0, 0.0], 1, 0);
        m.insert(&[1.0, 0.0], 2, 0);
        m.insert(&[0.1, 0.0], 3, 1); // another group
        m.insert(&[5.0, 0.0], 4, 0);
        let mut out = [(0.0, 0); 2];
        assert_eq!(m.nearest(&[0.2, 0.0], 0, &mut out), 2);
        assert_eq!((out[0].1, out[1].1), (1, 2));
        m.insert(&[0.3, 0.0], 5, 0); // overwrites the oldest, class 1
        assert_eq!(m.len(), 4);
        m.nearest(&[0.2, 0.0], 0, &mut out);
        assert_eq!((out[0].1, out[1].1), (5, 2));
        let mut three = [(0.0, 0); 3];
        assert_eq!(
            m.nearest(&[0.0, 0.0], 1, &mut three),
            1,
            "one point in group 1"
        );
        assert_eq!(m.nearest(&[0.0, 0.0], 9, &mut three), 0);
    }

    #[test]
    fn matches_a_sort_of_every_point() {
        let mut m = KnnMemory::new(3, 64);
        let mut all = Vec::new();
        let mut v = 0.37f32;
        for i in 0..100u16 {
            let mut p = [0f32; 3];
            for x in &mut p {
                v = (v * 7.13 + 0.291).fract();
                *x = v;
            }
            m.insert(&p, i, 0);
            all.push((p, i));
        }
        let q = [0.5, 0.5, 0.5];
        let mut want: Vec<(f32, u16)> = all[36..]
            .iter()
            .map(|(p, c)| (p.iter().zip(&q).map(|(a, b)| (a - b) * (a - b)).sum(), *c))
            .collect();
        want.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = [(0.0, 0); 5];
        assert_eq!(m.nearest(&q, 0, &mut out), 5);
        assert_eq!(out.to_vec(), want[..5].to_vec());
    }
}
