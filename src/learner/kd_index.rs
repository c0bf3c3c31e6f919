//! A k-d tree over the points of one group of the neighbour memory ([`super::knn`]), so that
//! a k-nearest query costs O(log n) instead of a scan of the whole memory.
//!
//! The memory is a ring whose points are overwritten as fast as they arrive, so the tree is
//! static: it is built over the group's points, newer points wait in a short unsorted tail,
//! and an overwritten point is skipped by its slot's write generation. The group is rebuilt
//! when its tail or its stale entries grow past a fraction of the tree, which keeps inserts
//! at amortised O(log n). It splits index ranges at medians ordered by (coordinate, slot), so
//! many equal coordinates (a parked vehicle) need nothing special, and ties between equal
//! distances go to the lower slot, as the memory's plain scan breaks them.

/// Ranges this short are scanned, not split.
const LEAF: usize = 8;

/// The tree and tail of one group.
#[derive(Debug, Clone, Default)]
pub struct KdIndex {
    dims: usize,
    /// The indexed points in tree order (each range's median at its middle), as indexed.
    coords: Vec<f32>,
    slots: Vec<u32>,
    gens: Vec<u32>,
    /// Points added since the build, as (slot, generation).
    tail: Vec<(u32, u32)>,
    /// Entries, in the tree or the tail, whose slot has been overwritten since.
    stale: usize,
}

/// What a query reads of the memory: points by slot, their classes, and the generation each
/// slot is at.
pub struct Slots<'a> {
    pub dims: usize,
    pub points: &'a [f32],
    pub labels: &'a [u16],
    pub gens: &'a [u32],
}

impl Slots<'_> {
    fn point(&self, slot: usize) -> &[f32] {
        &self.points[slot * self.dims..(slot + 1) * self.dims]
    }
}

impl KdIndex {
    /// A tree over `slots` (each at its current generation in `mem`).
    pub fn build(mem: &Slots<'_>, slots: Vec<u32>) -> Self {
        let dims = mem.dims;
        let mut order = slots;
        arrange(mem, &mut order, 0);
        let mut coords = Vec::with_capacity(order.len() * dims);
        for &s in &order {
            coords.extend_from_slice(mem.point(s as usize));
        }
        KdIndex {
            dims,
            coords,
            gens: order.iter().map(|&s| mem.gens[s as usize]).collect(),
            slots: order,
            tail: Vec::new(),
            stale: 0,
        }
    }

    /// Points in the tree and the tail, stale ones included.
    pub fn entries(&self) -> usize {
        self.slots.len() + self.tail.len()
    }

    /// Whether a rebuild is due: the tail (scanned by every query) outgrew 4·√n points, or
    /// the stale entries half the tree. A rebuild costs O(n log n) every 4·√n inserts, so a
    /// sample's insert and query cost O(√n · log n) together, against O(n) for a scan
    /// (`cargo bench --bench scoring -- knn_memory` times both).
    pub fn worn(&self) -> bool {
        let tree = self.slots.len();
        self.tail.len() > 32.max(4 * tree.isqrt()) || self.stale > 32.max(tree / 2)
    }

    /// A point written to `slot` at generation `generation`.
    pub fn push(&mut self, slot: u32, generation: u32) {
        self.tail.push((slot, generation));
    }

    /// One of this group's entries was overwritten.
    pub fn mark_stale(&mut self) {
        self.stale += 1;
    }

    /// The `out.len()` nearest live points to `q`, nearest first, as (squared distance,
    /// class); returns how many were found.
    pub fn nearest(&self, mem: &Slots<'_>, q: &[f32], out: &mut [(f32, u16)]) -> usize {
        let mut best = TopK::new(out.len());
        self.search(mem, q, 0, self.slots.len(), 0, &mut best);
        for &(slot, generation) in &self.tail {
            if mem.gens[slot as usize] == generation {
                let d = distance(mem.point(slot as usize), q);
                best.offer(d, slot, mem.labels[slot as usize]);
            }
        }
        for (o, &(d, _, label)) in out.iter_mut().zip(&best.items) {
            *o = (d, label);
        }
        best.items.len()
    }

    fn search(
        &self,
        mem: &Slots<'_>,
        q: &[f32],
        lo: usize,
        hi: usize,
        depth: usize,
        best: &mut TopK,
    ) {
        if hi - lo <= LEAF {
            for i in lo..hi {
                self.offer(mem, q, i, best);
            }
            return;
        }
        let mid = lo + (hi - lo) / 2;
        self.offer(mem, q, mid, best);
        let axis = depth % self.dims;
        let diff = q[axis] - self.coords[mid * self.dims + axis];
        let (near, far) = if diff < 0.0 {
            ((lo, mid), (mid + 1, hi))
        } else {
            ((mid + 1, hi), (lo, mid))
        };
        self.search(mem, q, near.0, near.1, depth + 1, best);
        // A point beyond the split is at least |diff| away; at exactly the k-th distance it
        // may still win its tie by a lower slot.
        if diff * diff <= best.worst() {
            self.search(mem, q, far.0, far.1, depth + 1, best);
        }
    }

    fn offer(&self, mem: &Slots<'_>, q: &[f32], i: usize, best: &mut TopK) {
        let slot = self.slots[i];
        if mem.gens[slot as usize] == self.gens[i] {
            let d = distance(&self.coords[i * self.dims..(i + 1) * self.dims], q);
            best.offer(d, slot, mem.labels[slot as usize]);
        }
    }
}

/// Orders `order` into a balanced tree: the median of each range by (coordinate on the
/// depth's axis, slot) at its middle, smaller ones before it, larger after.
fn arrange(mem: &Slots<'_>, order: &mut [u32], depth: usize) {
    if order.len() <= LEAF {
        return;
    }
    let axis = depth % mem.dims;
    let key = |s: &u32| (mem.point(*s as usize)[axis], *s);
    let mid = order.len() / 2;
    order.select_nth_unstable_by(mid, |a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0).then(ka.1.cmp(&kb.1))
    });
    let (left, rest) = order.split_at_mut(mid);
    arrange(mem, left, depth + 1);
    arrange(mem, &mut rest[1..], depth + 1);
}

/// Squared Euclidean distance, summed in the order of the memory's scan (the same floats).
fn distance(p: &[f32], q: &[f32]) -> f32 {
    let mut d = 0.0;
    for (a, b) in p.iter().zip(q) {
        d += (a - b) * (a - b);
    }
    d
}

/// The k smallest (distance, slot) pairs so far, sorted, with their classes.
struct TopK {
    k: usize,
    items: Vec<(f32, u32, u16)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    /// The distance a point must not exceed to be considered (infinite until k are found).
    fn worst(&self) -> f32 {
        if self.items.len() < self.k {
            f32::INFINITY
        } else {
            self.items[self.k - 1].0
        }
    }

    fn offer(&mut self, d: f32, slot: u32, label: u16) {
        // A NaN or infinite distance never enters (as in the scan, where it compares false
        // against the initial infinity).
        if self.k == 0 || !d.is_finite() {
            return;
        }
        let ahead = |x: &(f32, u32, u16)| x.0 < d || (x.0 == d && x.1 < slot);
        if self.items.len() == self.k && ahead(&self.items[self.k - 1]) {
            return;
        }
        let at = self.items.partition_point(ahead);
        self.items.insert(at, (d, slot, label));
        self.items.truncate(self.k);
    }
}
