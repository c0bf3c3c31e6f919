//! A bounded memory of labelled points and the k nearest of a query among them.
//!
//! Beam selection is a map from position to beam: the classes of the nearest past positions
//! are a strong vote, strongest at a cold start when the model has seen little. This memory
//! backs the online k-nearest-neighbour baseline of the report. It holds the last
//! `capacity` points (a ring: the oldest is overwritten), each with its class and a group
//! (the key it came from: a neighbour of another site is not a neighbour). A query scans the
//! points of its group, O(capacity · dims): at the 4,096 points and 2 dimensions it is used
//! with, a few microseconds (`cargo bench --bench scoring -- knn_memory`), against about
//! 28 µs of learner time per beam sample. Why not a k-d tree
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
    /// distance, class); returns how many were found. Of equal distances, the point in the
    /// lower slot of the ring wins (deterministic, not by age: a scan in storage order is
    /// 4× faster than one in age order, which needs a modulo per point).
    pub fn nearest(&self, q: &[f32], group: u32, out: &mut [(f32, u16)]) -> usize {
        if out.is_empty() || self.dims == 0 {
            return 0;
        }
        // A known width unrolls the distance (2: positions east/north, the common case).
        match self.dims {
            2 => self.scan::<2>(q, group, out),
            3 => self.scan::<3>(q, group, out),
            4 => self.scan::<4>(q, group, out),
            _ => self.scan_any(q, group, out),
        }
    }

    fn scan<const D: usize>(&self, q: &[f32], group: u32, out: &mut [(f32, u16)]) -> usize {
        let q: &[f32; D] = q.try_into().expect("a query of the memory's width");
        let mut best = Nearest::new(out);
        for (i, (p, &g)) in self.points.chunks_exact(D).zip(&self.groups).enumerate() {
            let p: &[f32; D] = p.try_into().expect("chunks of D");
            let mut d = 0.0;
            for j in 0..D {
                d += (p[j] - q[j]) * (p[j] - q[j]);
            }
            if g == group && d < best.worst {
                best.insert(d, self.labels[i]);
            }
        }
        best.found
    }

    fn scan_any(&self, q: &[f32], group: u32, out: &mut [(f32, u16)]) -> usize {
        let mut best = Nearest::new(out);
        let rows = self.points.chunks_exact(self.dims).zip(&self.groups);
        for (i, (p, &g)) in rows.enumerate() {
            let d: f32 = p.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
            if g == group && d < best.worst {
                best.insert(d, self.labels[i]);
            }
        }
        best.found
    }
}

/// The k nearest so far, sorted, nearest first.
struct Nearest<'a> {
    out: &'a mut [(f32, u16)],
    found: usize,
    /// Distance a point must beat to enter (infinite until k were found).
    worst: f32,
}

impl<'a> Nearest<'a> {
    fn new(out: &'a mut [(f32, u16)]) -> Self {
        Nearest {
            out,
            found: 0,
            worst: f32::INFINITY,
        }
    }

    fn insert(&mut self, d: f32, label: u16) {
        let k = self.out.len();
        let mut j = self.found.min(k - 1);
        self.out[j] = (d, label);
        while j > 0 && self.out[j - 1].0 > self.out[j].0 {
            self.out.swap(j - 1, j);
            j -= 1;
        }
        self.found = (self.found + 1).min(k);
        if self.found == k {
            self.worst = self.out[k - 1].0;
        }
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
        // 3 takes an unrolled scan, 5 the general one.
        for dims in [3usize, 5] {
            let mut m = KnnMemory::new(dims, 64);
            let mut all = Vec::new();
            let mut v = 0.37f32;
            for i in 0..100u16 {
                let p: Vec<f32> = (0..dims)
                    .map(|_| {
                        v = (v * 7.13 + 0.291).fract();
                        v
                    })
                    .collect();
                m.insert(&p, i, 0);
                all.push((p, i));
            }
            let q = vec![0.5; dims];
            let dist = |p: &[f32]| p.iter().zip(&q).map(|(a, b)| (a - b) * (a - b)).sum();
            let mut want: Vec<(f32, u16)> = all[36..].iter().map(|(p, c)| (dist(p), *c)).collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut out = [(0.0, 0); 5];
            assert_eq!(m.nearest(&q, 0, &mut out), 5);
            assert_eq!(out.to_vec(), want[..5].to_vec(), "{dims} dimensions");
        }
    }
}
