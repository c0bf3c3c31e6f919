//! A bounded memory of labelled points and the k nearest of a query among them.
//!
//! Beam selection is a map from position to beam: the classes of the nearest past positions
//! are a strong vote, strongest at a cold start when the model has seen little. This memory
//! backs the online k-nearest-neighbour baseline of the report and the 5-NN blend. It holds
//! the last `capacity` points (a ring: the oldest is overwritten), each with its class and a
//! group (the key it came from: a neighbour of another site is not a neighbour). Queries go
//! through a k-d tree per group ([`super::kd_index`]): O(log n) in the tree, plus a tail of
//! at most 4·√n newer points; the plain scan of the memory, O(capacity · dims), is the
//! reference the tests hold the trees to, and answers
//! until the first insert after a restore builds the trees (they are not checkpointed). Both
//! give the same neighbours, ties to the lower slot. Why not a k-d tree crate: points leave
//! the ring as fast as they arrive, and the candidates (`kiddo`) rebuild or panic on many
//! equal coordinates, which parked vehicles produce.

use serde::{Deserialize, Serialize};

use super::kd_index::{KdIndex, Slots};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnnMemory {
    dims: usize,
    capacity: usize,
    points: Vec<f32>,
    labels: Vec<u16>,
    groups: Vec<u32>,
    /// Slot the next point goes to once the ring is full.
    next: usize,
    /// Per slot, how often it was written (an index entry of an older write is stale), and
    /// the trees by group; `None` until built.
    #[serde(skip)]
    gens: Vec<u32>,
    #[serde(skip)]
    index: Option<foldhash::HashMap<u32, KdIndex>>,
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
            gens: Vec::new(),
            index: None,
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
        if self.index.is_none() {
            self.build_index();
        }
        let slot = if self.labels.len() < self.capacity {
            self.points.extend_from_slice(point);
            self.labels.push(label);
            self.groups.push(group);
            self.gens.push(0);
            self.labels.len() - 1
        } else {
            let i = self.next;
            let old = self.groups[i];
            self.points[i * self.dims..(i + 1) * self.dims].copy_from_slice(point);
            self.labels[i] = label;
            self.groups[i] = group;
            self.gens[i] = self.gens[i].wrapping_add(1);
            self.next = (i + 1) % self.capacity;
            let index = self.index.as_mut().expect("built");
            if let Some(t) = index.get_mut(&old) {
                t.mark_stale();
            }
            if old != group {
                self.refresh(old);
            }
            i
        };
        let generation = self.gens[slot];
        let index = self.index.as_mut().expect("built");
        index
            .entry(group)
            .or_default()
            .push(slot as u32, generation);
        self.refresh(group);
    }

    /// Trees for every group from the memory as it is (after a restore, or at the start).
    fn build_index(&mut self) {
        self.gens = vec![0; self.labels.len()];
        let mut by_group: foldhash::HashMap<u32, Vec<u32>> = Default::default();
        for (s, g) in self.groups.iter().enumerate() {
            by_group.entry(*g).or_default().push(s as u32);
        }
        let mem = self.slots();
        let index = by_group
            .into_iter()
            .map(|(g, slots)| (g, KdIndex::build(&mem, slots)))
            .collect();
        self.index = Some(index);
    }

    /// Rebuilds a group's tree once it is worn; drops it once the group has no point left.
    fn refresh(&mut self, group: u32) {
        let worn = self
            .index
            .as_ref()
            .and_then(|i| i.get(&group))
            .is_some_and(KdIndex::worn);
        if !worn {
            return;
        }
        let slots: Vec<u32> = (0..self.groups.len() as u32)
            .filter(|s| self.groups[*s as usize] == group)
            .collect();
        let tree = (!slots.is_empty()).then(|| KdIndex::build(&self.slots(), slots));
        let index = self.index.as_mut().expect("built");
        match tree {
            Some(t) => index.insert(group, t),
            None => index.remove(&group),
        };
    }

    fn slots(&self) -> Slots<'_> {
        Slots {
            dims: self.dims,
            points: &self.points,
            labels: &self.labels,
            gens: &self.gens,
        }
    }

    /// Index entries held, stale ones included (bounded: each tree is rebuilt once its
    /// stale entries outgrow half of it).
    #[cfg(test)]
    fn index_entries(&self) -> usize {
        self.index
            .as_ref()
            .map_or(0, |i| i.values().map(KdIndex::entries).sum())
    }

    /// The `out.len()` nearest points of `group` to `q`, nearest first, as (squared
    /// distance, class); returns how many were found. Of equal distances, the point in the
    /// lower slot of the ring wins (deterministic, not by age: a scan in storage order is
    /// 4× faster than one in age order, which needs a modulo per point).
    pub fn nearest(&self, q: &[f32], group: u32, out: &mut [(f32, u16)]) -> usize {
        if out.is_empty() || self.dims == 0 {
            return 0;
        }
        if let Some(index) = &self.index {
            return match index.get(&group) {
                Some(t) => t.nearest(&self.slots(), q, out),
                None => 0,
            };
        }
        self.scan_nearest(q, group, out)
    }

    /// [`Self::nearest`] by a scan of every point: the reference the trees are held to.
    pub fn scan_nearest(&self, q: &[f32], group: u32, out: &mut [(f32, u16)]) -> usize {
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

    /// The trees answer exactly as the scan does, through ring wraps, groups that come and
    /// go, many equal coordinates (ties go to the lower slot) and a restore, and their
    /// entries stay bounded.
    #[test]
    fn the_trees_give_the_scans_neighbours() {
        use crate::learner::LearnerRng;
        use rand::{Rng, SeedableRng};
        for dims in [2usize, 3] {
            let mut rng = LearnerRng::seed_from_u64(dims as u64);
            let mut m = KnnMemory::new(dims, 500);
            let point = |rng: &mut LearnerRng| -> Vec<f32> {
                // A quarter of the points on a small lattice (parked vehicles, equal
                // coordinates and equal distances), the rest anywhere.
                (0..dims)
                    .map(|_| {
                        if rng.random_bool(0.25) {
                            f32::from(rng.random_range(0u8..3))
                        } else {
                            rng.random_range(-50.0..50.0f32)
                        }
                    })
                    .collect()
            };
            for i in 0..6000u32 {
                // Groups drift: 0-2 early, 1-4 later, so whole groups leave the ring.
                let group = if i < 3000 { i % 3 } else { 1 + i % 4 };
                let p = point(&mut rng);
                m.insert(&p, rng.random_range(0..64), group);
                if i % 7 == 0 {
                    let q = point(&mut rng);
                    for g in 0..5 {
                        let (mut a, mut b) = ([(0.0, 0); 5], [(0.0, 0); 5]);
                        let (na, nb) = (m.nearest(&q, g, &mut a), m.scan_nearest(&q, g, &mut b));
                        assert_eq!((na, a), (nb, b), "dims {dims}, insert {i}, group {g}");
                    }
                }
                assert!(
                    m.index_entries() <= 2 * 500 + 5 * 64,
                    "{}",
                    m.index_entries()
                );
            }
            // A restored memory has no trees: it scans, then builds them at its next insert.
            let bytes = postcard::to_stdvec(&m).unwrap();
            let mut back: KnnMemory = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back.index_entries(), 0);
            for _ in 0..50 {
                let p = point(&mut rng);
                back.insert(&p, 1, 2);
                let q = point(&mut rng);
                let (mut a, mut b) = ([(0.0, 0); 5], [(0.0, 0); 5]);
                assert_eq!(
                    back.nearest(&q, 2, &mut a),
                    back.scan_nearest(&q, 2, &mut b)
                );
                assert_eq!(a, b);
            }
        }
    }
}
