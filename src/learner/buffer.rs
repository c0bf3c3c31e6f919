//! The replay buffer: a bounded store of past samples mixed into every training step.
//!
//! Capacity is enforced twice, in samples and in bytes (entry payload plus a fixed per-entry
//! overhead), so a long stream cannot grow the process (method.md §3). Three eviction
//! policies sit behind the one interface so that they compare at equal capacity:
//! `importance` evicts the lowest effective importance e_i = s_i·λ^age (age in samples since
//! admission), `fifo` the oldest, `reservoir` a uniformly random entry (Vitter's algorithm R).
//! Ranking by e_i needs no re-sorting as time passes: log e_i = (log s_i − t_i·log λ) +
//! now·log λ, and the last term is shared, so the bracket is a time-invariant key held in a
//! B-tree. Scores go stale as the model moves; the learner re-scores replayed rows for free
//! in its fused pass and a rotating slice every `rescore_every` steps.

use std::collections::{BTreeSet, VecDeque};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::sorted::order_key64;

/// Which entry leaves when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictionPolicy {
    Importance,
    Fifo,
    Reservoir,
}

/// How replayed entries are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaySampling {
    Uniform,
    /// Probability ∝ effective importance s·λ^age, loss weight 1/(N·p).
    Importance,
}

/// Buffer settings (the `[buffer]` table of a pipeline).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    #[serde(default = "default_policy")]
    pub policy: EvictionPolicy,
    /// Maximum number of entries.
    pub capacity: usize,
    /// Maximum bytes held (payload + per-entry overhead).
    pub max_bytes: usize,
    /// λ in e_i = s_i·λ^age, age in samples; 1 disables ageing.
    #[serde(default = "default_decay")]
    pub decay: f64,
    /// Replayed rows per fresh row in each training step.
    #[serde(default = "default_replay_ratio")]
    pub replay_ratio: f64,
    #[serde(default = "default_sampling")]
    pub replay_sampling: ReplaySampling,
    /// Re-score a slice of the buffer every this many training steps (0: never).
    #[serde(default = "default_rescore_every")]
    pub rescore_every: u64,
    /// Rows per re-scoring slice.
    #[serde(default = "default_rescore_slice")]
    pub rescore_slice: usize,
}

fn default_policy() -> EvictionPolicy {
    EvictionPolicy::Importance
}
fn default_decay() -> f64 {
    0.9999
}
fn default_replay_ratio() -> f64 {
    0.25
}
fn default_sampling() -> ReplaySampling {
    ReplaySampling::Uniform
}
fn default_rescore_every() -> u64 {
    50
}
fn default_rescore_slice() -> usize {
    512
}

/// One retained sample's record; its inputs live in the buffer's row slab, one row per slot,
/// so admitting a sample allocates nothing once the slab has grown to the buffer's size.
///
/// The sample's key is not kept, only its length (for the byte charge): the key's `Arc` is
/// shared with the feature stage's thread, and cloning it here and dropping it at eviction
/// moved its reference count between the cores: 7% of the learner thread's samples on a
/// 10,000-key Milan stream (`perf`). Nothing reads a retained sample's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub y: f32,
    /// Length of the sample's key in bytes.
    pub key_bytes: u32,
    pub time: i64,
    pub score: f32,
    /// Model version (training steps) that computed `score`.
    pub version: u64,
    /// Stream position (samples seen) at admission; age = now − born.
    pub born: u64,
    /// The admission's inverse probability (1/p under `sample` and `infobatch`, 1/q for
    /// top-k's sampled rows, else 1): a replayed row's loss weight carries it, over the
    /// buffer's mean, so that replay under an unbiased policy is as unbiased as its fresh
    /// rows, as far as eviction is blind to the rows (FIFO, reservoir); importance eviction
    /// keeps the high scores longer and the weights do not undo that.
    pub weight: f32,
}

impl Entry {
    /// Bytes this entry is charged with a row of `inputs` values: payload plus
    /// [`ENTRY_OVERHEAD`].
    pub fn bytes(&self, inputs: usize) -> usize {
        inputs * size_of::<f32>() + self.key_bytes as usize + ENTRY_OVERHEAD
    }
}

/// An entry with its row, as a checkpoint keeps it (postcard writes a nested struct's fields
/// in line: the row, then the entry's fields; a test holds it to that).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedEntry {
    x: Box<[f32]>,
    entry: Entry,
}

/// Largest loss weight of a replayed row under importance replay, admission weight included
/// (bounds the variance that a near-zero score would otherwise bring).
pub const MAX_REPLAY_WEIGHT: f64 = 20.0;

/// Fixed bytes charged per entry, with its key's length: what an entry held when it kept a
/// boxed row and its key (the slot's record of 48 bytes, the box's 16, the ordering index
/// node's 2 × 16, the key's `Arc` header 16; on 64-bit targets), so that a byte cap holds the
/// entries it held before. An entry now takes less: a slab row and a 48-byte record.
pub const ENTRY_OVERHEAD: usize = 112;

/// Counters a run reports.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BufferStats {
    pub admitted: u64,
    pub rejected: u64,
    pub evicted: u64,
    pub rescored: u64,
}

impl BufferStats {
    pub fn add(&mut self, o: &BufferStats) {
        self.admitted += o.admitted;
        self.rejected += o.rejected;
        self.evicted += o.evicted;
        self.rescored += o.rescored;
    }
}

/// A bounded replay buffer with pluggable eviction.
#[derive(Debug)]
pub struct ReplayBuffer {
    cfg: BufferConfig,
    ln_decay: f64,
    slots: Vec<Option<Entry>>,
    /// Slot i's inputs at `rows[i·inputs..(i + 1)·inputs]`.
    rows: Vec<f32>,
    /// Values per row (0 until the first admission).
    inputs: usize,
    free: Vec<usize>,
    /// `importance`: (ordering key as an order key, slot); min leaves first.
    order: BTreeSet<(u64, usize)>,
    /// `fifo`: the live slots, oldest first. A queue, not the tree: admitting a row and
    /// evicting the oldest were 5% of the learner thread's CPU in the tree on a Milan run.
    queue: VecDeque<usize>,
    len: usize,
    bytes: usize,
    /// Σ of the live entries' admission weights (`Entry::weight`).
    weight_sum: f64,
    offered: u64,
    cursor: usize,
    pub stats: BufferStats,
}

/// What a checkpoint keeps of a [`ReplayBuffer`]: its entries with their slots, the free
/// slots and the FIFO queue as they were (so that a resumed run draws what the uninterrupted
/// one would have: a draw picks a slot), the admission weights' running sum to the bit, and
/// the counters. The importance index is rebuilt from the entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferState {
    entries: Vec<SavedEntry>,
    /// Each entry's slot.
    slot_of: Vec<usize>,
    /// Slots in all, live or free.
    slots: usize,
    free: Vec<usize>,
    queue: Vec<usize>,
    weight_sum: f64,
    offered: u64,
    cursor: usize,
    stats: BufferStats,
}

impl ReplayBuffer {
    pub fn state(&self) -> BufferState {
        let (slot_of, entries) = (self.slots.iter().enumerate())
            .filter_map(|(i, e)| {
                e.as_ref().map(|e| {
                    let saved = SavedEntry {
                        x: self.row(i).into(),
                        entry: e.clone(),
                    };
                    (i, saved)
                })
            })
            .unzip();
        BufferState {
            entries,
            slot_of,
            slots: self.slots.len(),
            free: self.free.clone(),
            queue: self.queue.iter().copied().collect(),
            weight_sum: self.weight_sum,
            offered: self.offered,
            cursor: self.cursor,
            stats: self.stats,
        }
    }

    /// Refills an empty buffer from a saved state, in its saved layout.
    pub fn restore(&mut self, s: BufferState) {
        *self = ReplayBuffer::new(self.cfg.clone());
        self.inputs = s.entries.first().map_or(0, |e| e.x.len());
        self.slots = vec![None; s.slots];
        self.rows = vec![0.0; s.slots * self.inputs];
        for (&slot, e) in s.slot_of.iter().zip(s.entries) {
            let fits = slot < s.slots && self.slots[slot].is_none() && e.x.len() == self.inputs;
            assert!(
                fits,
                "a checkpointed buffer entry out of its layout (slot {slot})"
            );
            self.fill(slot, &e.x, e.entry);
        }
        self.free = s.free;
        if self.cfg.policy == EvictionPolicy::Fifo {
            // Saved under another policy, the queue is rebuilt oldest first.
            self.queue = if s.queue.len() == self.len {
                s.queue.into()
            } else {
                let mut live: Vec<(u64, usize)> = (self.slots.iter().enumerate())
                    .filter_map(|(i, e)| e.as_ref().map(|e| (e.born, i)))
                    .collect();
                live.sort_unstable();
                live.into_iter().map(|(_, i)| i).collect()
            };
        }
        self.weight_sum = s.weight_sum;
        self.offered = s.offered;
        self.cursor = s.cursor;
        self.stats = s.stats;
        self.shrink_to_caps();
    }

    /// Evicts, by the policy's order, until both caps hold (a checkpoint restored under a
    /// smaller `capacity` or `max_bytes`).
    fn shrink_to_caps(&mut self) {
        while self.len > self.cfg.capacity || self.bytes > self.cfg.max_bytes {
            let victim = match self.cfg.policy {
                EvictionPolicy::Importance => self.order.first().map(|&(_, s)| s),
                EvictionPolicy::Fifo => self.queue.front().copied(),
                // Oldest first: no draw, so a restore stays repeatable.
                EvictionPolicy::Reservoir => (self.slots.iter())
                    .enumerate()
                    .filter_map(|(i, e)| e.as_ref().map(|e| (e.born, i)))
                    .min()
                    .map(|(_, i)| i),
            };
            let Some(victim) = victim else { break };
            self.remove(victim);
            self.stats.evicted += 1;
        }
    }

    pub fn new(cfg: BufferConfig) -> Self {
        let ln_decay = cfg.decay.clamp(1e-12, 1.0).ln();
        ReplayBuffer {
            // Places the byte cap allows at most, not a huge `capacity`'s.
            slots: Vec::with_capacity(
                cfg.capacity
                    .min(cfg.max_bytes / ENTRY_OVERHEAD + 1)
                    .min(1 << 20),
            ),
            rows: Vec::new(),
            inputs: 0,
            cfg,
            ln_decay,
            free: Vec::new(),
            order: BTreeSet::new(),
            queue: VecDeque::new(),
            len: 0,
            bytes: 0,
            weight_sum: 0.0,
            offered: 0,
            cursor: 0,
            stats: BufferStats::default(),
        }
    }

    pub fn config(&self) -> &BufferConfig {
        &self.cfg
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `importance`'s ordering key: lower leaves first.
    fn rank(&self, e: &Entry) -> u64 {
        order_key64(log_score(e.score) - e.born as f64 * self.ln_decay)
    }

    fn remove(&mut self, slot: usize) -> Entry {
        let e = self.slots[slot].take().expect("live slot");
        match self.cfg.policy {
            EvictionPolicy::Importance => {
                self.order.remove(&(self.rank(&e), slot));
            }
            EvictionPolicy::Fifo => {
                // At the front, but in `forget_born_before` (see there).
                let at = self.queue.iter().position(|&s| s == slot);
                self.queue.remove(at.expect("a live slot is queued"));
            }
            EvictionPolicy::Reservoir => {}
        }
        self.free.push(slot);
        self.len -= 1;
        self.bytes -= e.bytes(self.inputs);
        self.weight_sum = if self.len == 0 {
            0.0
        } else {
            self.weight_sum - f64::from(e.weight)
        };
        e
    }

    fn insert(&mut self, x: &[f32], e: Entry) {
        if self.slots.is_empty() {
            self.inputs = x.len();
        }
        assert_eq!(
            x.len(),
            self.inputs,
            "every buffered row has the same inputs"
        );
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.rows.resize(self.slots.len() * self.inputs, 0.0);
            self.slots.len() - 1
        });
        self.fill(slot, x, e);
    }

    /// Puts `e` with its inputs `x` in the empty `slot` and indexes it.
    fn fill(&mut self, slot: usize, x: &[f32], mut e: Entry) {
        // A weight that is not a positive number would poison the buffer's mean weight, and
        // one far out of the policies' range (1 to 20/keep, or 1/q) would swamp it.
        e.weight = if e.weight.is_finite() && e.weight > 0.0 {
            e.weight.clamp(1e-6, 1e6)
        } else {
            1.0
        };
        self.rows[slot * self.inputs..(slot + 1) * self.inputs].copy_from_slice(x);
        match self.cfg.policy {
            EvictionPolicy::Importance => {
                self.order.insert((self.rank(&e), slot));
            }
            // Rows are offered in the order they arrive: the newest joins the back. A restore
            // puts the saved queue back.
            EvictionPolicy::Fifo => self.queue.push_back(slot),
            EvictionPolicy::Reservoir => {}
        }
        self.len += 1;
        self.bytes += e.bytes(self.inputs);
        self.weight_sum += f64::from(e.weight);
        self.slots[slot] = Some(e);
        self.stats.admitted += 1;
    }

    fn fits(&self, extra: usize) -> bool {
        self.len < self.cfg.capacity && self.bytes + extra <= self.cfg.max_bytes
    }

    fn random_live(&self, rng: &mut impl Rng) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        loop {
            let s = rng.random_range(0..self.slots.len());
            if self.slots[s].is_some() {
                return Some(s);
            }
        }
    }

    /// Removes every entry born before sample `born`; returns how many. In slot order, so
    /// FIFO's queue may lose entries from its middle: a scan each, on a rare reaction.
    pub fn forget_born_before(&mut self, born: u64) -> usize {
        let old: Vec<usize> = (self.slots.iter().enumerate())
            .filter(|(_, e)| e.as_ref().is_some_and(|e| e.born < born))
            .map(|(s, _)| s)
            .collect();
        let before = self.len;
        for &s in &old {
            self.remove(s);
        }
        self.stats.evicted += old.len() as u64;
        // The survivors are a uniform sample of the rows offered since `born` (reservoir):
        // Algorithm R goes on as if that many fewer had been offered, or it would admit the
        // next rows far more rarely than they are owed.
        if before > 0 {
            self.offered = (self.offered as f64 * self.len as f64 / before as f64).round() as u64;
        }
        old.len()
    }

    /// Offers a sample (its inputs `x` and record `e`); returns whether it was retained. Both
    /// caps hold afterwards (they held before it).
    pub fn offer(&mut self, x: &[f32], e: Entry, rng: &mut impl Rng) -> bool {
        let need = e.bytes(x.len());
        if need > self.cfg.max_bytes || self.cfg.capacity == 0 {
            self.stats.rejected += 1;
            return false;
        }
        self.offered += 1;
        match self.cfg.policy {
            EvictionPolicy::Reservoir => {
                if !self.fits(need) {
                    // Algorithm R keeps a row with probability (rows held) / (rows offered):
                    // rows held, not the count cap, since the byte cap may bind first.
                    let j = rng.random_range(0..self.offered);
                    if j >= self.len() as u64 {
                        self.stats.rejected += 1;
                        return false;
                    }
                    while !self.fits(need) {
                        let victim = self.random_live(rng).expect("full buffer has entries");
                        self.remove(victim);
                        self.stats.evicted += 1;
                    }
                }
            }
            EvictionPolicy::Fifo => {
                while !self.fits(need) {
                    let &victim = self.queue.front().expect("full buffer has entries");
                    self.remove(victim);
                    self.stats.evicted += 1;
                }
            }
            EvictionPolicy::Importance => {
                // The victims the row needs, lowest rank first: none leaves unless all of
                // them rank below the row (else an entry could go and the row be refused).
                let new_rank = self.rank(&e);
                let (mut len, mut bytes, mut victims) = (self.len, self.bytes, 0);
                for &(rank, slot) in &self.order {
                    if len < self.cfg.capacity && bytes + need <= self.cfg.max_bytes {
                        break;
                    }
                    if new_rank <= rank {
                        self.stats.rejected += 1;
                        return false;
                    }
                    let held = self.slots[slot].as_ref().expect("ordered slots are live");
                    (len, bytes, victims) = (len - 1, bytes - held.bytes(self.inputs), victims + 1);
                }
                // They are the lowest-ranked: each is the order's first in turn.
                for _ in 0..victims {
                    let &(_, slot) = self.order.first().expect("counted above");
                    self.remove(slot);
                    self.stats.evicted += 1;
                }
            }
        }
        self.insert(x, e);
        true
    }

    /// Draws `n` slots to replay (with replacement) and their loss weights: uniformly with
    /// weight 1, or with probability p_j ∝ e_j = s_j·λ^age and weight 1/(N·p_j) (capped at
    /// [`MAX_REPLAY_WEIGHT`]), so that replay stays an unbiased sample of the buffer; either
    /// times the entry's admission weight (see [`Self::admission_weight`]).
    pub fn sample(&self, n: usize, rng: &mut impl Rng) -> (Vec<usize>, Vec<f32>) {
        if self.len == 0 || n == 0 {
            return (Vec::new(), Vec::new());
        }
        if self.cfg.replay_sampling == ReplaySampling::Uniform {
            return (0..n)
                .map(|_| {
                    let s = self.random_live(rng).expect("non-empty");
                    (s, self.admission_weight(s))
                })
                .unzip();
        }
        let ln_decay = self.ln_decay;
        let w = self.weighted(|e| log_score(e.score) - e.born as f64 * ln_decay);
        let mean = w.total() / w.slots.len() as f64;
        (0..n)
            .map(|_| {
                let j = w.draw(rng);
                let draw = mean / w.weights[j] * f64::from(self.admission_weight(w.slots[j]));
                (w.slots[j], draw.min(MAX_REPLAY_WEIGHT) as f32)
            })
            .unzip()
    }

    /// A live slot's admission weight over the buffer's mean one: E[w·g] over the buffer is
    /// then the mean gradient of the stretch of stream it covers, whatever the admission
    /// probabilities were (Σ_buffer 1/p estimates the rows offered). Exactly 1 when every
    /// weight is 1 (sums of ones are exact).
    fn admission_weight(&self, slot: usize) -> f32 {
        let e = self.slots[slot].as_ref().expect("live slot");
        (f64::from(e.weight) * self.len as f64 / self.weight_sum) as f32
    }

    /// `n` slots drawn with weight 2^(−age / `half_life`), age in samples since admission,
    /// and loss weights of their admission weights over those draws' mean: a deliberate bias toward the rows admitted since a change (the
    /// `replay_recent` drift reaction), which leaves the older rows in the buffer.
    pub fn sample_recent(
        &self,
        n: usize,
        half_life: f64,
        rng: &mut impl Rng,
    ) -> (Vec<usize>, Vec<f32>) {
        if self.len == 0 || n == 0 {
            return (Vec::new(), Vec::new());
        }
        // −age·rate is born·rate up to a constant shared by every entry.
        let rate = std::f64::consts::LN_2 / half_life.max(1e-9);
        let w = self.weighted(|e| e.born as f64 * rate);
        // Over the mean admission weight under these draws, not the buffer's: the recent rows
        // (all of weight 1 under `keep_all`) would otherwise replay at 1 / the buffer's mean.
        let adm = |j: usize| f64::from(self.slots[w.slots[j]].as_ref().expect("live").weight);
        let drawn_mean = (0..w.slots.len())
            .map(|j| w.weights[j] * adm(j))
            .sum::<f64>()
            / w.total();
        (0..n)
            .map(|_| {
                let j = w.draw(rng);
                (w.slots[j], (adm(j) / drawn_mean) as f32)
            })
            .unzip()
    }

    /// The live slots with weights exp(l − max l) for a log-weight `l` per entry (relative to
    /// the largest, so that exp cannot overflow), ready for draws ∝ weight.
    fn weighted(&self, log_weight: impl Fn(&Entry) -> f64) -> Weighted {
        let (slots, logs): (Vec<usize>, Vec<f64>) = (self.slots.iter().enumerate())
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, log_weight(e))))
            .unzip();
        let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logs.iter().map(|l| (l - top).exp()).collect();
        let cum = weights
            .iter()
            .scan(0.0, |t, w| {
                *t += w;
                Some(*t)
            })
            .collect();
        Weighted {
            slots,
            weights,
            cum,
        }
    }

    /// The next `n` live slots in a rotating sweep (for periodic re-scoring).
    pub fn rescore_slice(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n.min(self.len));
        let total = self.slots.len();
        let mut visited = 0;
        while out.len() < n.min(self.len) && visited < total {
            self.cursor = (self.cursor + 1) % total;
            if self.slots[self.cursor].is_some() {
                out.push(self.cursor);
            }
            visited += 1;
        }
        out
    }

    pub fn get(&self, slot: usize) -> Option<&Entry> {
        self.slots.get(slot).and_then(|s| s.as_ref())
    }

    /// The inputs of `slot` (live or not: a freed slot keeps its last row until reused).
    fn row(&self, slot: usize) -> &[f32] {
        &self.rows[slot * self.inputs..(slot + 1) * self.inputs]
    }

    /// Replaces an entry's score with one from the current model.
    pub fn rescore(&mut self, slot: usize, score: f32, version: u64) {
        let Some(e) = self.slots[slot].as_ref() else {
            return;
        };
        // Only the importance order depends on the score (FIFO ranks by age alone, and the
        // reservoir keeps no order): the other policies skip the two tree updates.
        let reorder = self.cfg.policy == EvictionPolicy::Importance;
        if reorder {
            self.order.remove(&(self.rank(e), slot));
        }
        let e = self.slots[slot].as_mut().expect("live slot");
        e.score = score;
        e.version = version;
        if reorder {
            let e = self.slots[slot].as_ref().expect("live slot");
            self.order.insert((self.rank(e), slot));
        }
        self.stats.rescored += 1;
    }

    /// Appends the features and targets of `slots` to `x` and `y`.
    pub fn gather(&self, slots: &[usize], x: &mut Vec<f32>, y: &mut Vec<f32>) {
        for &s in slots {
            let e = self.slots[s].as_ref().expect("live slot");
            x.extend_from_slice(self.row(s));
            y.push(e.y);
        }
    }

    /// Iterates over the live entries.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().flatten()
    }
}

/// Live slots with draw weights and their running sums.
struct Weighted {
    slots: Vec<usize>,
    weights: Vec<f64>,
    cum: Vec<f64>,
}

/// ln of a score for eviction ranks and replay weights, floored at 1e-30. A score that is
/// not a number (a diverged model's) counts as the least: +∞ would make every weight NaN and
/// its entry unevictable.
fn log_score(score: f32) -> f64 {
    let s = if score.is_finite() {
        score.max(1e-30)
    } else {
        1e-30
    };
    (s as f64).ln()
}

impl Weighted {
    fn total(&self) -> f64 {
        self.cum.last().copied().unwrap_or(0.0)
    }

    /// An index into `slots`, with probability ∝ its weight.
    fn draw(&self, rng: &mut impl Rng) -> usize {
        let u = rng.random::<f64>() * self.total();
        self.cum
            .partition_point(|c| *c <= u)
            .min(self.slots.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(policy: EvictionPolicy, capacity: usize, max_bytes: usize) -> BufferConfig {
        BufferConfig {
            policy,
            capacity,
            max_bytes,
            decay: 1.0,
            replay_ratio: 0.25,
            replay_sampling: ReplaySampling::Uniform,
            rescore_every: 0,
            rescore_slice: 0,
        }
    }

    /// A buffer of `capacity` rows (bytes to spare) replaying ∝ score.
    fn importance_replay(policy: EvictionPolicy, capacity: usize) -> ReplayBuffer {
        let mut c = cfg(policy, capacity, 1 << 20);
        c.replay_sampling = ReplaySampling::Importance;
        ReplayBuffer::new(c)
    }

    /// The inputs every test entry is offered with.
    const ROW: [f32; 8] = [0.0; 8];

    fn entry(score: f32, born: u64, key: &str) -> Entry {
        Entry {
            y: 0.0,
            key_bytes: key.len() as u32,
            time: born as i64,
            score,
            version: 0,
            born,
            weight: 1.0,
        }
    }

    /// Reservoir sampling stays uniform over the stream when the byte cap, not the count
    /// cap, fills the buffer: of 20,000 rows through 100 places, about half were born in the
    /// first half of the stream.
    #[test]
    fn the_reservoir_is_uniform_when_the_byte_cap_binds() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(5);
        let one = entry(1.0, 0, "k").bytes(ROW.len());
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Reservoir, 1000, 100 * one));
        for i in 0..20_000 {
            b.offer(&ROW, entry(1.0, i, "k"), &mut rng);
        }
        assert_eq!(b.len(), 100);
        let early = b.entries().filter(|e| e.born < 10_000).count();
        assert!(
            (30..=70).contains(&early),
            "{early} of 100 born in the first half"
        );
    }

    /// Importance eviction evicts nothing for a row it then refuses: A (score 1) and B
    /// (score 9) fill the bytes, C (score 5) needs both their places; before, A was evicted
    /// and C refused on meeting B.
    #[test]
    fn importance_eviction_drops_no_row_for_one_it_refuses() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(7);
        let short = entry(1.0, 0, "k").bytes(ROW.len());
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Importance, 10, 2 * short));
        assert!(b.offer(&ROW, entry(1.0, 0, "k"), &mut rng));
        assert!(b.offer(&ROW, entry(9.0, 1, "k"), &mut rng));
        let long_key = "k".repeat(short + 1);
        assert!(!b.offer(&ROW, entry(5.0, 2, &long_key), &mut rng));
        assert_eq!(b.len(), 2, "A is still held");
        assert_eq!(b.stats.evicted, 0);
        // One that outranks both takes both places.
        assert!(b.offer(&ROW, entry(20.0, 3, &long_key), &mut rng));
        assert_eq!((b.len(), b.stats.evicted), (1, 2));
    }

    /// After `forget_born_before`, reservoir sampling goes on as if the survivors were the
    /// whole stream so far: 1,000 places, 100,000 rows before a change and 1,000 after it.
    /// Forgetting the old rows leaves about 10, standing for the 1,000 since the change; the
    /// buffer refills, and rows 2,000-3,000 after the change are admitted at about
    /// 1,000 / 2,500, not at 1,000 / 102,500 as before.
    #[test]
    fn a_forgetting_reservoir_admits_at_the_rate_of_what_it_kept() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(8);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Reservoir, 1000, 1 << 24));
        for i in 0..101_000 {
            b.offer(&ROW, entry(1.0, i, "k"), &mut rng);
        }
        let forgotten = b.forget_born_before(100_000);
        assert!(forgotten > 970, "{forgotten} forgotten");
        for i in 101_000..102_000 {
            b.offer(&ROW, entry(1.0, i, "k"), &mut rng);
        }
        let before = b.stats.admitted;
        for i in 102_000..103_000 {
            b.offer(&ROW, entry(1.0, i, "k"), &mut rng);
        }
        let admitted = b.stats.admitted - before;
        assert_eq!(b.len(), 1000);
        assert!(
            (330..=480).contains(&admitted),
            "{admitted} of 1,000 admitted"
        );
    }

    /// A restored buffer draws the same rows with the same weights as the one it was saved
    /// from, under every policy, with gaps in its slots (a forget) and unequal admission
    /// weights, and admits and evicts the same rows after: a resumed run repeats the
    /// uninterrupted one. Before, the restore packed the entries into fresh slots.
    #[test]
    fn a_restored_buffer_draws_what_the_saved_one_would_have() {
        let seeded = crate::learner::LearnerRng::seed_from_u64;
        for (policy, sampling) in [
            (EvictionPolicy::Fifo, ReplaySampling::Uniform),
            (EvictionPolicy::Importance, ReplaySampling::Importance),
            (EvictionPolicy::Reservoir, ReplaySampling::Uniform),
        ] {
            let mut c = cfg(policy, 64, 1 << 20);
            c.replay_sampling = sampling;
            let mut b = ReplayBuffer::new(c.clone());
            let mut rng = seeded(10);
            let offer = |b: &mut ReplayBuffer, i: u64, rng: &mut crate::learner::LearnerRng| {
                let mut e = entry(1.0 + (i % 7) as f32, i, "k");
                e.weight = 1.0 + (i % 3) as f32;
                b.offer(&ROW, e, rng)
            };
            for i in 0..200 {
                offer(&mut b, i, &mut rng);
            }
            assert!(b.forget_born_before(185) > 0, "{policy:?}: gaps");
            for i in 200..205 {
                offer(&mut b, i, &mut rng);
            }
            let mut r = ReplayBuffer::new(c);
            r.restore(b.state());
            let drawn = |b: &ReplayBuffer, n: usize, rng: &mut crate::learner::LearnerRng| {
                let (slots, w) = b.sample(n, rng);
                let born: Vec<u64> = slots
                    .iter()
                    .map(|&s| b.slots[s].as_ref().unwrap().born)
                    .collect();
                (born, w)
            };
            let (mut r1, mut r2) = (seeded(11), seeded(11));
            assert_eq!(
                drawn(&b, 300, &mut r1),
                drawn(&r, 300, &mut r2),
                "{policy:?}"
            );
            for i in 205..260 {
                assert_eq!(
                    offer(&mut b, i, &mut r1),
                    offer(&mut r, i, &mut r2),
                    "{policy:?}"
                );
            }
            assert_eq!(
                drawn(&b, 300, &mut r1),
                drawn(&r, 300, &mut r2),
                "{policy:?}"
            );
        }
    }

    /// A checkpoint restored under smaller caps is cut down to them, by the policy's order.
    #[test]
    fn a_restore_under_smaller_caps_holds_them() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(9);
        for policy in [
            EvictionPolicy::Fifo,
            EvictionPolicy::Importance,
            EvictionPolicy::Reservoir,
        ] {
            let mut b = ReplayBuffer::new(cfg(policy, 100, 1 << 20));
            for i in 0..100 {
                b.offer(&ROW, entry(1.0 + i as f32, i, "k"), &mut rng);
            }
            let one = entry(1.0, 0, "k").bytes(ROW.len());
            let mut small = ReplayBuffer::new(cfg(policy, 60, 50 * one));
            small.restore(b.state());
            assert_eq!(small.len(), 50, "{policy:?}");
            assert!(small.bytes() <= 50 * one);
            // Every policy keeps its 50 best by its own order: here, the newest.
            assert!(small.entries().all(|e| e.born >= 50), "{policy:?}");
        }
    }

    /// A non-finite score ranks least and leaves the replay weights numbers.
    #[test]
    fn a_non_finite_score_does_not_break_importance_replay() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(6);
        let mut b = importance_replay(EvictionPolicy::Importance, 10);
        for i in 0..10 {
            let score = if i == 3 {
                f32::INFINITY
            } else {
                1.0 + i as f32
            };
            b.offer(&ROW, entry(score, i, "k"), &mut rng);
        }
        let (slots, w) = b.sample(10_000, &mut rng);
        let distinct: std::collections::HashSet<usize> = slots.iter().copied().collect();
        assert!(distinct.len() > 5, "{} slots drawn", distinct.len());
        assert!(w.iter().all(|w| w.is_finite()));
        // And it is the first evicted.
        b.offer(&ROW, entry(0.5, 10, "k"), &mut rng);
        assert!(b.entries().all(|e| e.score.is_finite()));
    }

    #[test]
    fn forgetting_the_old_regime_keeps_the_index_consistent() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(0);
        for policy in [EvictionPolicy::Fifo, EvictionPolicy::Importance] {
            let mut b = ReplayBuffer::new(cfg(policy, 10, 1 << 20));
            for i in 0..10 {
                b.offer(&ROW, entry(i as f32, i, "k"), &mut rng);
            }
            assert_eq!(b.forget_born_before(7), 7);
            assert_eq!((b.len(), b.stats.evicted), (3, 7));
            // The index still evicts correctly after the removal.
            for i in 10..20 {
                b.offer(&ROW, entry(i as f32, i, "k"), &mut rng);
            }
            let mut born: Vec<u64> = b.entries().map(|e| e.born).collect();
            born.sort();
            assert_eq!(born, (10..20).collect::<Vec<_>>(), "{policy:?}");
        }
    }

    /// Weight 2^(−age/h): with ages 0-999 and h = 100, half the draws are younger than 100
    /// (the rest of the geometric tail beyond 1,000 is 2^-10), none is missing, and the
    /// loss weights are 1.
    #[test]
    fn recent_replay_halves_the_weight_every_half_life() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(3);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 1000, 1 << 24));
        for i in 0..1000 {
            b.offer(&ROW, entry(1.0, i, "k"), &mut rng);
        }
        let (slots, w) = b.sample_recent(20_000, 100.0, &mut rng);
        let ages: Vec<u64> = slots
            .iter()
            .map(|s| 1000 - b.get(*s).unwrap().born)
            .collect();
        let young = ages.iter().filter(|a| **a <= 100).count() as f64 / ages.len() as f64;
        assert!((young - 0.5).abs() < 0.02, "{young}");
        let old = ages.iter().filter(|a| **a > 500).count() as f64 / ages.len() as f64;
        assert!((old - 1.0 / 32.0).abs() < 0.01, "{old}");
        assert!(w.iter().all(|v| *v == 1.0));
        assert_eq!(b.len(), 1000, "nothing leaves the buffer");
    }

    #[test]
    fn importance_keeps_the_highest_scores() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(0);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Importance, 10, 1 << 20));
        for i in 0..100 {
            b.offer(&ROW, entry(i as f32, i, "k"), &mut rng);
        }
        let mut kept: Vec<f32> = b.entries().map(|e| e.score).collect();
        kept.sort_by(f32::total_cmp);
        assert_eq!(kept, (90..100).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn ageing_lets_new_samples_displace_old_important_ones() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(0);
        let mut c = cfg(EvictionPolicy::Importance, 4, 1 << 20);
        c.decay = 0.9;
        let mut b = ReplayBuffer::new(c);
        for i in 0..4 {
            b.offer(&ROW, entry(10.0, i, "old"), &mut rng);
        }
        // 10·0.9^100 ≪ 1: the old entries are worth less than fresh ones of score 1.
        assert!(b.offer(&ROW, entry(1.0, 100, "new"), &mut rng));
        assert_eq!(b.entries().filter(|e| e.born == 100).count(), 1);
    }

    #[test]
    fn both_caps_hold_for_every_policy() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(3);
        for policy in [
            EvictionPolicy::Importance,
            EvictionPolicy::Fifo,
            EvictionPolicy::Reservoir,
        ] {
            let per = entry(0.0, 0, "key-0").bytes(ROW.len());
            let mut b = ReplayBuffer::new(cfg(policy, 50, per * 30 + 7));
            for i in 0..5000u64 {
                let key = format!("key-{}", i % 1000);
                b.offer(&ROW, entry(rng.random(), i, &key), &mut rng);
                assert!(b.len() <= 50 && b.bytes() <= per * 30 + 7, "{policy:?}");
            }
            let live: usize = b.entries().map(|e| e.bytes(ROW.len())).sum();
            assert_eq!(live, b.bytes());
            assert!(b.len() >= 25, "{policy:?} fills up: {}", b.len());
        }
    }

    #[test]
    fn fifo_keeps_the_newest() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(0);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 5, 1 << 20));
        for i in 0..20 {
            b.offer(&ROW, entry(100.0 - i as f32, i, "k"), &mut rng);
        }
        let mut born: Vec<u64> = b.entries().map(|e| e.born).collect();
        born.sort();
        assert_eq!(born, vec![15, 16, 17, 18, 19]);
    }

    #[test]
    fn importance_replay_draws_by_score_with_inverse_weights() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(8);
        let mut b = importance_replay(EvictionPolicy::Fifo, 100);
        for i in 0..100 {
            b.offer(&ROW, entry(1.0 + (i % 2) as f32 * 3.0, i, "k"), &mut rng);
        }
        let (slots, w) = b.sample(20_000, &mut rng);
        let high = slots
            .iter()
            .filter(|s| b.get(**s).unwrap().score > 2.0)
            .count();
        // Scores 4 and 1 in equal numbers: 80% of the draws are the high ones.
        assert!((high as f64 / 20_000.0 - 0.8).abs() < 0.02, "{high}");
        // Weights 1/(N p): mean 2.5/4 for the high rows, 2.5 for the low; E[w] = 1.
        let mean = w.iter().map(|v| *v as f64).sum::<f64>() / w.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "mean weight {mean}");
        let (slots, w) =
            ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 4, 1 << 20)).sample(3, &mut rng);
        assert!(slots.is_empty() && w.is_empty());
    }

    /// Each slot's row in the slab is the row its entry was offered with, through evictions
    /// that reuse slots and through a checkpoint; the byte charge is the boxed-row one.
    #[test]
    fn rows_follow_their_entries_through_reuse_and_a_checkpoint() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 5, 1_000_000));
        let row = |i: u64| -> Vec<f32> { (0..8).map(|j| (i * 10 + j) as f32).collect() };
        for i in 0..12 {
            let mut e = entry(1.0, i, "k");
            e.y = i as f32;
            assert!(b.offer(&row(i), e, &mut rng));
        }
        let check = |b: &ReplayBuffer| {
            let slots: Vec<usize> = (0..b.slots.len()).filter(|&s| b.get(s).is_some()).collect();
            let (mut x, mut y) = (Vec::new(), Vec::new());
            b.gather(&slots, &mut x, &mut y);
            let mut ys = y.clone();
            ys.sort_by(f32::total_cmp);
            assert_eq!(ys, [7.0, 8.0, 9.0, 10.0, 11.0], "FIFO keeps the newest 5");
            for (k, &yv) in y.iter().enumerate() {
                assert_eq!(&x[k * 8..(k + 1) * 8], row(yv as u64).as_slice());
            }
        };
        check(&b);
        let mut restored = ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 5, 1_000_000));
        restored.restore(b.state());
        check(&restored);
        // The restored queue is in admission order, whatever the slots' order.
        let mut e = entry(1.0, 12, "k");
        e.y = 12.0;
        restored.offer(&row(12), e, &mut rng);
        let mut ys: Vec<f32> = restored.entries().map(|e| e.y).collect();
        ys.sort_by(f32::total_cmp);
        assert_eq!(ys, [8.0, 9.0, 10.0, 11.0, 12.0], "the oldest left");
        #[cfg(target_pointer_width = "64")]
        assert_eq!(ENTRY_OVERHEAD, 112, "the charge of the boxed-row layout");
    }

    /// A replayed row weighs its admission weight over the buffer's mean, under uniform and
    /// importance replay alike, so that rows admitted at 1/3 the probability weigh 3 times
    /// as much; a buffer of unit weights replays at exactly 1.
    #[test]
    fn replay_carries_the_admission_weight_over_the_buffer_mean() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(8);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 100, 1 << 20));
        for i in 0..100 {
            b.offer(&ROW, entry(1.0, i, "k"), &mut rng);
        }
        let (_, w) = b.sample(50, &mut rng);
        assert!(w.iter().all(|w| *w == 1.0), "unit weights replay at 1");
        for i in 100..200 {
            let mut e = entry(1.0, i, "k");
            e.weight = if i.is_multiple_of(2) { 1.0 } else { 3.0 };
            b.offer(&ROW, e, &mut rng);
        }
        for sampling in [ReplaySampling::Uniform, ReplaySampling::Importance] {
            b.cfg.replay_sampling = sampling;
            let (slots, w) = b.sample(4000, &mut rng);
            for (s, w) in slots.iter().zip(&w) {
                let expect = if b.get(*s).unwrap().born.is_multiple_of(2) {
                    0.5
                } else {
                    1.5
                };
                assert!((w - expect).abs() < 1e-6, "{sampling:?}: {w} vs {expect}");
            }
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            assert!(
                (mean - 1.0).abs() < 0.05,
                "{sampling:?}: mean weight {mean}"
            );
        }
        // The sum follows evictions: one more unit row evicts a weight-1 row (born 100).
        b.offer(&ROW, entry(1.0, 200, "k"), &mut rng);
        let sum: f64 = b.entries().map(|e| f64::from(e.weight)).sum();
        assert_eq!(sum, b.weight_sum);
    }

    /// Replay toward recent rows weighs each by its admission weight over the mean of the
    /// draws, not of the buffer: after a change whose recovery trains every row (weight 1)
    /// the recent rows replay at about 1, not at 1 / the older rows' mean.
    #[test]
    fn recent_replay_weights_average_one_over_its_own_draws() {
        let mut rng = crate::learner::LearnerRng::seed_from_u64(9);
        let mut b = ReplayBuffer::new(cfg(EvictionPolicy::Fifo, 100, 1 << 20));
        for i in 0..120 {
            let mut e = entry(1.0, i, "k");
            e.weight = if i < 100 { 3.0 } else { 1.0 };
            b.offer(&ROW, e, &mut rng);
        }
        let (slots, w) = b.sample_recent(4000, 3.0, &mut rng);
        let recent = slots
            .iter()
            .filter(|s| b.get(**s).unwrap().born >= 100)
            .count();
        assert!(recent > 3900, "{recent} of 4000 drawn since the change");
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        assert!(
            (mean - 1.0).abs() < 0.02,
            "mean weight {mean} (the buffer's mean is 2.6)"
        );
    }

    /// A checkpoint keeps each entry as its row and then the entry's fields, in this order.
    #[test]
    fn saved_entries_are_the_row_then_the_fields() {
        #[derive(Serialize)]
        struct Format13 {
            x: Box<[f32]>,
            y: f32,
            key_bytes: u32,
            time: i64,
            score: f32,
            version: u64,
            born: u64,
            weight: f32,
        }
        let old = Format13 {
            x: vec![1.5, -2.0, 3.25].into(),
            y: 4.0,
            key_bytes: 6,
            time: -9,
            score: 0.125,
            version: 11,
            born: 12,
            weight: 2.5,
        };
        let bytes = postcard::to_stdvec(&old).unwrap();
        let now: SavedEntry = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&*now.x, &[1.5, -2.0, 3.25]);
        let e = &now.entry;
        assert_eq!((e.y, e.key_bytes, e.time, e.score), (4.0, 6, -9, 0.125));
        assert_eq!((e.version, e.born, e.weight), (11, 12, 2.5));
        assert_eq!(postcard::to_stdvec(&now).unwrap(), bytes);
    }
}
