//! Sliding event-time windows.
//!
//! A window of N seconds is kept as buckets of `width` seconds each (1 s for windows up to an
//! hour, N/3600 s rounded up above that, so a window never holds more than 3,600 buckets).
//! At head time `h`, the window holds the buckets whose index lies in `(b(h) - N/width, b(h)]`,
//! where `b(t) = floor(t / width)`: with 1-second buckets, an event counts while its
//! `occurred_at` second is one of the last N seconds up to and including the head's second.
//!
//! Count is exact. Sum is kept incrementally: a bucket that leaves is subtracted, and after a
//! window's worth of leaving buckets the sum is recomputed from the buckets, so rounding never
//! accumulates beyond one window span. Min and max are recomputed only when the leaving bucket
//! held the extreme. Distinct keeps, for each value, the newest bucket it was seen in; the
//! value leaves when that bucket does. Values are told apart by their 64-bit XXH3 hash
//! ([`distinct_hash`]), so a window never allocates per value; two values collide with
//! probability about n²/2⁶⁵ (below 10⁻⁹ for 100,000 values in one window).

use std::collections::VecDeque;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use signalops_core::alert::Aggregate;

/// The identity of a distinct value: XXH3-64 of its rendered key (stable across versions and
/// restarts, as checkpoints keep it).
pub fn distinct_hash(rendered: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(rendered.as_bytes())
}

/// A distinct value as checkpoints hold it: its hash, or (checkpoints written before values
/// were hashed) the rendered value itself.
#[derive(Deserialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
enum StoredValue {
    Hash(u64),
    Text(String),
}

impl StoredValue {
    fn hash(self) -> u64 {
        match self {
            StoredValue::Hash(h) => h,
            StoredValue::Text(s) => distinct_hash(&s),
        }
    }
}

fn de_values<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    let v: Vec<StoredValue> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(StoredValue::hash).collect())
}

fn de_distinct<'de, D: Deserializer<'de>>(d: D) -> Result<foldhash::HashMap<u64, i64>, D::Error> {
    let m: std::collections::HashMap<StoredValue, i64> = std::collections::HashMap::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k.hash(), v)).collect())
}

/// Most buckets a window keeps.
pub const MAX_BUCKETS: u64 = 3_600;

/// Bucket width in milliseconds for a window of `seconds`.
pub fn bucket_width_ms(seconds: u64) -> i64 {
    let width_s = seconds.div_ceil(MAX_BUCKETS).max(1);
    (width_s * 1000) as i64
}

/// One bucket. Checkpoints hold it as an array: `[idx, count]` when it has no numeric and no
/// distinct value (count windows), else `[idx, count, numeric, sum, min, max]` and then the
/// distinct values if any. Checkpoints from before wrote maps with field names; both decode.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Bucket {
    idx: i64,
    count: u64,
    /// Events in the bucket that carried a numeric value.
    #[serde(default)]
    numeric: u64,
    #[serde(default)]
    sum: f64,
    #[serde(default = "positive_infinity")]
    min: f64,
    #[serde(default = "negative_infinity")]
    max: f64,
    /// Distinct values (hashes) whose newest sighting was (at the time) this bucket.
    #[serde(default, deserialize_with = "de_values")]
    values: Vec<u64>,
}

fn positive_infinity() -> f64 {
    f64::INFINITY
}

fn negative_infinity() -> f64 {
    f64::NEG_INFINITY
}

impl Serialize for Bucket {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let acc = (self.count, self.numeric, self.sum, self.min, self.max);
        serialize_bucket(s, self.idx, acc, Values(self.values.iter().copied(), self.values.len()))
    }
}

/// Distinct values serialized as a sequence of known length.
struct Values<I>(I, usize);

impl<I: Iterator<Item = u64> + Clone> Serialize for Values<I> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.1))?;
        for v in self.0.clone() {
            seq.serialize_element(&v)?;
        }
        seq.end()
    }
}

/// A bucket as checkpoints hold it (see [`Bucket`]); `acc` is (count, numeric, sum, min, max).
fn serialize_bucket<S: Serializer, I: Iterator<Item = u64> + Clone>(
    s: S,
    idx: i64,
    (count, numeric, sum, min, max): (u64, u64, f64, f64, f64),
    values: Values<I>,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeTuple;
    let len = match (numeric, values.1 == 0) {
        (0, true) => 2,
        (_, true) => 6,
        _ => 7,
    };
    let mut t = s.serialize_tuple(len)?;
    t.serialize_element(&idx)?;
    t.serialize_element(&count)?;
    if len > 2 {
        t.serialize_element(&numeric)?;
        t.serialize_element(&sum)?;
        t.serialize_element(&min)?;
        t.serialize_element(&max)?;
    }
    if len > 6 {
        t.serialize_element(&values)?;
    }
    t.end()
}

/// One rule's window in one group, as it is checkpointed per rule and group (and exported from
/// and imported into a [`Timeline`] lane). Its own `insert`, `advance` and `value` are the
/// single-window model the timeline's lanes are tested against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    width_ms: i64,
    /// Number of buckets the window spans.
    span: i64,
    buckets: VecDeque<Bucket>,
    count: u64,
    /// Events that carried a numeric value (sum/avg/min/max).
    numeric: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// Distinct value (hash) → index of the newest bucket it was seen in.
    #[serde(default, skip_serializing_if = "foldhash::HashMap::is_empty", deserialize_with = "de_distinct")]
    distinct: foldhash::HashMap<u64, i64>,
    /// Buckets that left since the sum was last recomputed from the buckets.
    #[serde(skip)]
    left_since_recompute: i64,
}

/// What happened to an inserted observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Counted,
    /// Older than the window at its head: it can no longer change the result.
    TooLate,
}

impl Window {
    pub fn new(seconds: u64) -> Window {
        let width_ms = bucket_width_ms(seconds);
        let span = ((seconds as i64) * 1000).div_euclid(width_ms).max(1);
        Window::new_with(width_ms, span)
    }

    fn new_with(width_ms: i64, span: i64) -> Window {
        Window {
            width_ms,
            span,
            buckets: VecDeque::new(),
            count: 0,
            numeric: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            distinct: foldhash::HashMap::default(),
            left_since_recompute: 0,
        }
    }

    fn idx(&self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.width_ms)
    }

    /// The lowest bucket index still inside the window at `head_ms`.
    #[cfg(test)]
    fn first_idx(&self, head_ms: i64) -> i64 {
        self.idx(head_ms) - self.span + 1
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds one event at `t_ms` to a window whose head is `head_ms` (callers advance the head
    /// first when the event is newer). `value` is the numeric field (sum/avg/min/max) and
    /// `distinct` the value's [`distinct_hash`] (distinct); an event without a value still counts.
    #[cfg(test)]
    pub fn insert(&mut self, head_ms: i64, t_ms: i64, value: Option<f64>, distinct: Option<u64>) -> Insert {
        let idx = self.idx(t_ms);
        if idx < self.first_idx(head_ms) {
            return Insert::TooLate;
        }
        let last = self.buckets.len().wrapping_sub(1);
        let found = match self.buckets.back() {
            // Events mostly land in the newest bucket, or just after it.
            Some(b) if b.idx <= idx => Some(last),
            _ => self.buckets.iter().rposition(|b| b.idx <= idx),
        };
        let pos = match found {
            Some(p) if self.buckets[p].idx == idx => p,
            found => {
                let at = found.map_or(0, |p| p + 1);
                let b = Bucket {
                    idx,
                    count: 0,
                    numeric: 0,
                    sum: 0.0,
                    min: f64::INFINITY,
                    max: f64::NEG_INFINITY,
                    values: vec![],
                };
                self.buckets.insert(at, b);
                at
            }
        };
        let b = &mut self.buckets[pos];
        b.count += 1;
        self.count += 1;
        if let Some(v) = value.filter(|v| v.is_finite()) {
            b.numeric += 1;
            b.sum += v;
            b.min = b.min.min(v);
            b.max = b.max.max(v);
            self.numeric += 1;
            self.sum += v;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        if let Some(d) = distinct {
            let newest = self.distinct.entry(d).or_insert(i64::MIN);
            if *newest < idx {
                *newest = idx;
                b.values.push(d);
            }
        }
        Insert::Counted
    }

    /// Drops the buckets that fell out of the window at `head_ms`.
    #[cfg(test)]
    pub fn advance(&mut self, head_ms: i64) {
        let first = self.first_idx(head_ms);
        let mut extreme_left = false;
        while self.buckets.front().is_some_and(|b| b.idx < first) {
            let Some(b) = self.buckets.pop_front() else { break };
            self.count -= b.count;
            if b.numeric > 0 {
                self.numeric -= b.numeric;
                self.sum -= b.sum;
                extreme_left |= b.min <= self.min || b.max >= self.max;
                self.left_since_recompute += 1;
            }
            for v in b.values {
                if self.distinct.get(&v) == Some(&b.idx) {
                    self.distinct.remove(&v);
                }
            }
        }
        if self.numeric == 0 {
            self.clear_numeric();
        } else if extreme_left || self.left_since_recompute >= self.span {
            self.recompute();
        }
    }

    #[cfg(test)]
    fn clear_numeric(&mut self) {
        self.sum = 0.0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
        self.left_since_recompute = 0;
    }

    fn recompute(&mut self) {
        self.left_since_recompute = 0;
        self.sum = 0.0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
        self.numeric = 0;
        for b in &self.buckets {
            self.numeric += b.numeric;
            self.sum += b.sum;
            self.min = self.min.min(b.min);
            self.max = self.max.max(b.max);
        }
    }

    /// The aggregate over the window; `None` when it has no data (avg, min and max of nothing).
    #[cfg(test)]
    pub fn value(&self, aggregate: Aggregate) -> Option<f64> {
        match aggregate {
            Aggregate::Count => Some(self.count as f64),
            Aggregate::Sum => Some(self.sum),
            Aggregate::Distinct => Some(self.distinct.len() as f64),
            Aggregate::Min => (self.numeric > 0).then_some(self.min),
            Aggregate::Max => (self.numeric > 0).then_some(self.max),
            Aggregate::Avg => (self.numeric > 0).then(|| self.sum / self.numeric as f64),
        }
    }
}

/// One group's windows for several rules at once: the rules of a tenant that group by the
/// same fields over windows of the same length share one bucket timeline per group, and each
/// bucket holds every member rule's ("lane's") accumulators side by side. An event then
/// touches one run of adjacent memory per (group-by, window length) instead of one separate
/// window per rule.
///
/// Each lane keeps its own head (the latest event time it saw, or the watermark), so a lane
/// behaves exactly like a [`Window`] of its own: its accumulators are never set in buckets
/// past its head, its totals cover the buckets in `(b(head) - span, b(head)]`, and a bucket
/// leaves the timeline once it has left every started lane's window.
#[derive(Debug, Clone)]
pub struct Timeline {
    width_ms: i64,
    span: i64,
    lanes: usize,
    /// Bucket indexes, ascending.
    idxs: VecDeque<i64>,
    /// `lanes` event counts per bucket, bucket after bucket.
    counts: VecDeque<u32>,
    /// Whether a lane aggregates a numeric field; then `nums` holds `lanes` numeric
    /// accumulators per bucket, like `counts` (else it stays empty, and count and distinct
    /// windows keep four bytes per lane and bucket).
    numeric: bool,
    nums: VecDeque<Num>,
    /// Per bucket (only when a lane counts distinct values): the values whose newest sighting
    /// in some lane was, at the time, this bucket.
    dvals: VecDeque<Vec<u64>>,
    /// Per lane: its column among the distinct lanes.
    dslots: std::sync::Arc<[Option<u32>]>,
    dlanes: usize,
    /// Distinct value → its row in `rows`, which holds the newest bucket index per distinct
    /// lane (`i64::MIN`: not in that lane's window).
    distinct: foldhash::HashMap<u64, u32>,
    rows: Vec<i64>,
    free_rows: Vec<u32>,
    /// The value last looked up and its row (the lanes of an event look up the same value).
    row_hint: Option<(u64, u32)>,
    totals: Vec<Totals>,
}

/// One lane's share of one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Acc {
    count: u32,
    numeric: u32,
    sum: f64,
    min: f64,
    max: f64,
}

const EMPTY_ACC: Acc = Acc { count: 0, numeric: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY };

/// The numeric part of an [`Acc`], kept only by timelines with a numeric lane.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Num {
    numeric: u32,
    sum: f64,
    min: f64,
    max: f64,
}

const EMPTY_NUM: Num = Num { numeric: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY };

/// One lane's aggregate over its window, and its head.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Totals {
    started: bool,
    head_ms: i64,
    count: u64,
    numeric: u64,
    sum: f64,
    min: f64,
    max: f64,
    distinct: u64,
    left_since_recompute: i64,
}

const IDLE_LANE: Totals = Totals {
    started: false,
    head_ms: i64::MIN,
    count: 0,
    numeric: 0,
    sum: 0.0,
    min: f64::INFINITY,
    max: f64::NEG_INFINITY,
    distinct: 0,
    left_since_recompute: 0,
};

impl Timeline {
    /// A timeline for windows of `seconds`, with one lane per entry of `dslots` (each lane's
    /// column among the lanes that count distinct values, if it does); `numeric` when a lane
    /// aggregates a numeric field (sum, avg, min, max). Without, numeric values are ignored.
    pub fn new(seconds: u64, dslots: std::sync::Arc<[Option<u32>]>, numeric: bool) -> Timeline {
        let width_ms = bucket_width_ms(seconds);
        let span = ((seconds as i64) * 1000).div_euclid(width_ms).max(1);
        let dlanes = dslots.iter().flatten().count();
        Timeline {
            width_ms,
            span,
            lanes: dslots.len(),
            idxs: VecDeque::new(),
            counts: VecDeque::new(),
            numeric,
            nums: VecDeque::new(),
            dvals: VecDeque::new(),
            dlanes,
            dslots: dslots.clone(),
            distinct: foldhash::HashMap::default(),
            rows: Vec::new(),
            free_rows: Vec::new(),
            row_hint: None,
            totals: vec![IDLE_LANE; dslots.len()],
        }
    }

    fn idx(&self, t_ms: i64) -> i64 {
        t_ms.div_euclid(self.width_ms)
    }

    fn first_idx(&self, head_ms: i64) -> i64 {
        self.idx(head_ms) - self.span + 1
    }

    /// Position of the first bucket whose index is at least `idx`.
    fn position(&self, idx: i64) -> usize {
        self.idxs.partition_point(|&i| i < idx)
    }

    /// Lane `lane`'s share of the bucket at position `b`.
    fn acc(&self, b: usize, lane: usize) -> Acc {
        let at = b * self.lanes + lane;
        let count = self.counts.get(at).copied().unwrap_or_default();
        match self.nums.get(at) {
            Some(n) => Acc { count, numeric: n.numeric, sum: n.sum, min: n.min, max: n.max },
            None => Acc { count, ..EMPTY_ACC },
        }
    }

    fn set_acc(&mut self, b: usize, lane: usize, acc: Acc) {
        let at = b * self.lanes + lane;
        if let Some(c) = self.counts.get_mut(at) {
            *c = acc.count;
        }
        if let Some(n) = self.nums.get_mut(at) {
            *n = Num { numeric: acc.numeric, sum: acc.sum, min: acc.min, max: acc.max };
        }
    }

    pub fn is_started(&self, lane: usize) -> bool {
        self.totals.get(lane).is_some_and(|t| t.started)
    }

    /// Whether no lane is started (the timeline holds nothing).
    pub fn is_idle(&self) -> bool {
        !self.totals.iter().any(|t| t.started)
    }

    pub fn head(&self, lane: usize) -> i64 {
        self.totals.get(lane).map_or(i64::MIN, |t| t.head_ms)
    }

    /// Whether the lane's window holds no event.
    pub fn lane_is_empty(&self, lane: usize) -> bool {
        self.totals.get(lane).is_none_or(|t| t.count == 0)
    }

    /// Starts a lane with its head at `head_ms` and an empty window.
    pub fn start(&mut self, lane: usize, head_ms: i64) {
        self.stop(lane);
        if let Some(t) = self.totals.get_mut(lane) {
            t.started = true;
            t.head_ms = head_ms;
        }
    }

    /// Empties a lane and stops it.
    pub fn stop(&mut self, lane: usize) {
        let Some(t) = self.totals.get_mut(lane) else { return };
        let was_started = t.started;
        *t = IDLE_LANE;
        if !was_started {
            return;
        }
        for b in 0..self.idxs.len() {
            self.set_acc(b, lane, EMPTY_ACC);
        }
        if let Some(d) = self.dslots[lane] {
            let (d, n) = (d as usize, self.dlanes);
            for row in self.rows.chunks_mut(n) {
                row[d] = i64::MIN;
            }
        }
        self.trim();
    }

    /// Moves a started lane's head to `head_ms` (when later) and drops from its window the
    /// buckets that fell out.
    pub fn advance(&mut self, lane: usize, head_ms: i64) {
        let Some(t) = self.totals.get(lane).copied().filter(|t| t.started && t.head_ms < head_ms) else { return };
        let (old_first, new_first) = (self.first_idx(t.head_ms), self.first_idx(head_ms));
        self.totals[lane].head_ms = head_ms;
        if new_first == old_first {
            return;
        }
        let (from, to) = (self.position(old_first), self.position(new_first));
        let mut extreme_left = false;
        let dslot = self.dslots[lane].map(|d| d as usize);
        for b in from..to {
            let acc = self.acc(b, lane);
            self.set_acc(b, lane, EMPTY_ACC);
            let tot = &mut self.totals[lane];
            tot.count -= u64::from(acc.count);
            if acc.numeric > 0 {
                tot.numeric -= u64::from(acc.numeric);
                tot.sum -= acc.sum;
                extreme_left |= acc.min <= tot.min || acc.max >= tot.max;
                tot.left_since_recompute += 1;
            }
            if let (Some(d), Some(vals)) = (dslot, self.dvals.get(b)) {
                let idx = self.idxs[b];
                for v in vals {
                    let Some(&r) = self.distinct.get(v) else { continue };
                    let cell = &mut self.rows[r as usize * self.dlanes + d];
                    if *cell == idx {
                        *cell = i64::MIN;
                        self.totals[lane].distinct -= 1;
                    }
                }
            }
        }
        let tot = &mut self.totals[lane];
        if tot.numeric == 0 {
            tot.sum = 0.0;
            tot.min = f64::INFINITY;
            tot.max = f64::NEG_INFINITY;
            tot.left_since_recompute = 0;
        } else if extreme_left || tot.left_since_recompute >= self.span {
            self.recompute(lane);
        }
        self.trim();
    }

    fn recompute(&mut self, lane: usize) {
        let head = self.totals[lane].head_ms;
        let (from, to) = (self.position(self.first_idx(head)), self.position(self.idx(head) + 1));
        let (mut numeric, mut sum, mut min, mut max) = (0u64, 0.0, f64::INFINITY, f64::NEG_INFINITY);
        for b in from..to {
            let acc = self.acc(b, lane);
            numeric += u64::from(acc.numeric);
            sum += acc.sum;
            min = min.min(acc.min);
            max = max.max(acc.max);
        }
        let tot = &mut self.totals[lane];
        (tot.numeric, tot.sum, tot.min, tot.max, tot.left_since_recompute) = (numeric, sum, min, max, 0);
    }

    /// Drops the buckets no started lane's window reaches any more.
    fn trim(&mut self) {
        let first = self.totals.iter().filter(|t| t.started).map(|t| self.first_idx(t.head_ms)).min();
        let first = first.unwrap_or(i64::MAX);
        while self.idxs.front().is_some_and(|&i| i < first) {
            self.idxs.pop_front();
            self.counts.drain(..self.lanes);
            if self.numeric {
                self.nums.drain(..self.lanes);
            }
            if let Some(vals) = self.dvals.pop_front() {
                for v in vals {
                    let Some(&r) = self.distinct.get(&v) else { continue };
                    let row = &self.rows[r as usize * self.dlanes..][..self.dlanes];
                    if row.iter().all(|&c| c == i64::MIN) {
                        self.distinct.remove(&v);
                        self.free_rows.push(r);
                        self.row_hint = None;
                    }
                }
            }
        }
    }

    /// The position of bucket `idx`, created (empty in every lane) when missing.
    fn bucket(&mut self, idx: i64) -> usize {
        // Events mostly land in the newest bucket, or just after it.
        let at = match self.idxs.back() {
            Some(&last) if last == idx => return self.idxs.len() - 1,
            Some(&last) if last < idx => self.idxs.len(),
            _ => self.position(idx),
        };
        if self.idxs.get(at) == Some(&idx) {
            return at;
        }
        self.idxs.insert(at, idx);
        if at == self.idxs.len() - 1 {
            self.counts.extend(std::iter::repeat_n(0, self.lanes));
            if self.numeric {
                self.nums.extend(std::iter::repeat_n(EMPTY_NUM, self.lanes));
            }
        } else {
            let tail = self.counts.split_off(at * self.lanes);
            self.counts.extend(std::iter::repeat_n(0, self.lanes));
            self.counts.extend(tail);
            if self.numeric {
                let tail = self.nums.split_off(at * self.lanes);
                self.nums.extend(std::iter::repeat_n(EMPTY_NUM, self.lanes));
                self.nums.extend(tail);
            }
        }
        if self.dlanes > 0 {
            self.dvals.insert(at, Vec::new());
        }
        at
    }

    /// The row of a distinct value, created (in no lane's window) when missing.
    fn row(&mut self, value: u64) -> usize {
        if let Some((_, r)) = self.row_hint.filter(|h| h.0 == value) {
            return r as usize;
        }
        if let Some(&r) = self.distinct.get(&value) {
            self.row_hint = Some((value, r));
            return r as usize;
        }
        let r = match self.free_rows.pop() {
            Some(r) => r,
            None => {
                self.rows.extend(std::iter::repeat_n(i64::MIN, self.dlanes));
                (self.rows.len() / self.dlanes - 1) as u32
            }
        };
        self.rows[r as usize * self.dlanes..][..self.dlanes].fill(i64::MIN);
        self.distinct.insert(value, r);
        self.row_hint = Some((value, r));
        r as usize
    }

    /// Adds one event at `t_ms` to a started lane (callers advance the lane's head first when
    /// the event is newer). `value` and `distinct` are as for [`Window::insert`].
    pub fn insert(&mut self, lane: usize, t_ms: i64, value: Option<f64>, distinct: Option<u64>) -> Insert {
        let Some(head) = self.totals.get(lane).filter(|t| t.started).map(|t| t.head_ms) else {
            return Insert::TooLate;
        };
        let idx = self.idx(t_ms);
        if idx < self.first_idx(head) {
            return Insert::TooLate;
        }
        let b = self.bucket(idx);
        let at = b * self.lanes + lane;
        if let Some(c) = self.counts.get_mut(at) {
            *c = c.saturating_add(1);
        }
        let tot = &mut self.totals[lane];
        tot.count += 1;
        if let (Some(v), Some(n)) = (value.filter(|v| v.is_finite()), self.nums.get_mut(at)) {
            n.numeric = n.numeric.saturating_add(1);
            n.sum += v;
            n.min = n.min.min(v);
            n.max = n.max.max(v);
            tot.numeric += 1;
            tot.sum += v;
            tot.min = tot.min.min(v);
            tot.max = tot.max.max(v);
        }
        if let (Some(v), Some(d)) = (distinct, self.dslots[lane]) {
            let r = self.row(v);
            let row = &mut self.rows[r * self.dlanes..][..self.dlanes];
            let cell = row[d as usize];
            if cell < idx {
                let listed = row.contains(&idx);
                row[d as usize] = idx;
                if cell == i64::MIN {
                    self.totals[lane].distinct += 1;
                }
                if !listed {
                    if let Some(vals) = self.dvals.get_mut(b) {
                        vals.push(v);
                    }
                }
            }
        }
        Insert::Counted
    }

    /// A lane's aggregate over its window, as [`Window::value`].
    pub fn value(&self, lane: usize, aggregate: Aggregate) -> Option<f64> {
        let t = self.totals.get(lane)?;
        match aggregate {
            Aggregate::Count => Some(t.count as f64),
            Aggregate::Sum => Some(t.sum),
            Aggregate::Distinct => Some(t.distinct as f64),
            Aggregate::Min => (t.numeric > 0).then_some(t.min),
            Aggregate::Max => (t.numeric > 0).then_some(t.max),
            Aggregate::Avg => (t.numeric > 0).then(|| t.sum / t.numeric as f64),
        }
    }

    /// A lane's window as a [`Window`] of its own, for [`Timeline::import`] (its buckets do
    /// not list their distinct values; the distinct map has them).
    pub fn export(&self, lane: usize) -> Window {
        let mut w = Window::new_with(self.width_ms, self.span);
        let Some(t) = self.totals.get(lane).filter(|t| t.started) else { return w };
        (w.count, w.numeric, w.sum, w.min, w.max) = (t.count, t.numeric, t.sum, t.min, t.max);
        let dslot = self.dslots[lane].map(|d| d as usize);
        if let Some(d) = dslot {
            for (&v, &r) in &self.distinct {
                let cell = self.rows[r as usize * self.dlanes + d];
                if cell != i64::MIN {
                    w.distinct.insert(v, cell);
                }
            }
        }
        let (from, to) = (self.position(self.first_idx(t.head_ms)), self.position(self.idx(t.head_ms) + 1));
        for b in from..to {
            let acc = self.acc(b, lane);
            if acc.count == 0 {
                continue;
            }
            w.buckets.push_back(Bucket {
                idx: self.idxs[b],
                count: u64::from(acc.count),
                numeric: u64::from(acc.numeric),
                sum: acc.sum,
                min: acc.min,
                max: acc.max,
                values: Vec::new(),
            });
        }
        w
    }

    /// Starts a lane from a [`Window`] of its own whose head was `head_ms` (a restored
    /// checkpoint). A window of another bucket width starts the lane empty.
    pub fn import(&mut self, lane: usize, head_ms: i64, w: &Window) {
        self.start(lane, head_ms);
        if w.width_ms != self.width_ms || w.span != self.span || lane >= self.lanes {
            return;
        }
        let first = self.first_idx(head_ms);
        let dslot = self.dslots[lane];
        let last = self.idx(head_ms);
        for bk in w.buckets.iter().filter(|b| b.idx >= first && b.idx <= last) {
            let b = self.bucket(bk.idx);
            let acc = Acc {
                count: u32::try_from(bk.count).unwrap_or(u32::MAX),
                numeric: u32::try_from(bk.numeric).unwrap_or(u32::MAX),
                sum: bk.sum,
                min: bk.min,
                max: bk.max,
            };
            self.set_acc(b, lane, acc);
            // Numeric totals are recomputed from the buckets below.
            self.totals[lane].count += bk.count;
        }
        if let Some(d) = dslot {
            // A value is in the window while its newest sighting's bucket is.
            for (&v, &newest) in &w.distinct {
                let b = self.position(newest);
                if newest < first || self.idxs.get(b) != Some(&newest) {
                    continue;
                }
                if let Some(vals) = self.dvals.get_mut(b) {
                    if !vals.contains(&v) {
                        vals.push(v);
                    }
                }
                let r = self.row(v);
                self.rows[r * self.dlanes + d as usize] = newest;
                self.totals[lane].distinct += 1;
            }
        }
        self.recompute(lane);
        self.trim();
    }
}

/// Checkpoint parts of a timeline: a shared group's entry holds the bucket indexes and the
/// distinct values once, and each lane refers to them by position.
impl Timeline {
    /// The bucket indexes, ascending.
    pub fn stored_idxs(&self) -> &VecDeque<i64> {
        &self.idxs
    }

    /// The distinct values (hashes), in an order [`Timeline::stored_distinct`] follows.
    pub fn stored_values(&self) -> impl Serialize + '_ {
        StoredValues(self)
    }

    /// A lane's non-empty buckets as `[position, count]` or
    /// `[position, count, numeric, sum, min, max]`.
    pub fn stored_buckets(&self, lane: usize) -> impl Serialize + '_ {
        StoredBuckets(self, lane)
    }

    /// Fills `ages` with, per stored value, the age of its newest sighting in the lane's
    /// window in buckets before the lane's head bucket (`None` when it is not in the window).
    /// Leaves it empty for a lane that does not count distinct values.
    pub fn stored_distinct(&self, lane: usize, ages: &mut Vec<Option<u32>>) {
        ages.clear();
        let started = self.totals.get(lane).filter(|t| t.started);
        let (Some(d), Some(t)) = (self.dslots.get(lane).copied().flatten(), started) else { return };
        let head = self.idx(t.head_ms);
        ages.extend(self.distinct.values().map(|&r| {
            let cell = self.rows[r as usize * self.dlanes + d as usize];
            (cell != i64::MIN).then(|| u32::try_from(head - cell).unwrap_or(u32::MAX))
        }));
    }
}

/// Rebuilds the window of a lane whose head was `head_ms` from a stored shared group (see the
/// `stored_*` methods of [`Timeline`]); bucket positions out of range are dropped.
pub fn window_from_stored(
    seconds: u64,
    head_ms: i64,
    idxs: &[i64],
    values: &[u64],
    buckets: Vec<Bucket>,
    distinct: &[Option<u32>],
) -> Window {
    let mut w = Window::new(seconds);
    let head = w.idx(head_ms);
    for mut b in buckets {
        let Some(&idx) = usize::try_from(b.idx).ok().and_then(|p| idxs.get(p)) else { continue };
        b.idx = idx;
        b.values.clear();
        w.count += b.count;
        w.buckets.push_back(b);
    }
    for (v, age) in values.iter().zip(distinct) {
        if let Some(age) = age {
            w.distinct.insert(*v, head - i64::from(*age));
        }
    }
    w.recompute();
    w
}

struct StoredValues<'a>(&'a Timeline);

impl Serialize for StoredValues<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.distinct.keys())
    }
}

struct StoredBuckets<'a>(&'a Timeline, usize);

impl Serialize for StoredBuckets<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let (tl, lane) = (self.0, self.1);
        let acc = |b: usize| tl.acc(b, lane);
        let used = (0..tl.idxs.len()).filter(|&b| lane < tl.lanes && acc(b).count > 0);
        let mut seq = s.serialize_seq(Some(used.clone().count()))?;
        for b in used {
            let a = acc(b);
            let totals = (u64::from(a.count), u64::from(a.numeric), a.sum, a.min, a.max);
            seq.serialize_element(&BucketOut(b as i64, totals))?;
        }
        seq.end()
    }
}

/// A lane's bucket, with its position for index. Its distinct values are left out: the
/// stored distinct positions say which bucket each value leaves with.
struct BucketOut(i64, (u64, u64, f64, f64, f64));

impl Serialize for BucketOut {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_bucket(s, self.0, self.1, Values(std::iter::empty(), 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    #[test]
    fn window_bounds_are_the_last_n_seconds_including_the_head() {
        let mut w = Window::new(10);
        assert_eq!(w.insert(0, 0, None, None), Insert::Counted);
        assert_eq!(w.insert(9 * S, 9 * S + 999, None, None), Insert::Counted);
        w.advance(9 * S + 999);
        assert_eq!(w.value(Aggregate::Count), Some(2.0), "seconds 0..=9 are inside a 10 s window at second 9");
        w.advance(10 * S);
        assert_eq!(w.value(Aggregate::Count), Some(1.0), "second 0 leaves when the head reaches second 10");
        assert_eq!(w.insert(10 * S, 0, None, None), Insert::TooLate, "an event outside the window is late");
        assert_eq!(w.insert(10 * S, 5 * S, None, None), Insert::Counted, "an out-of-order event inside still counts");
        assert_eq!(w.value(Aggregate::Count), Some(2.0));
        w.advance(100 * S);
        assert!(w.is_empty());
        assert_eq!(w.value(Aggregate::Count), Some(0.0));
    }

    #[test]
    fn numeric_aggregates_skip_events_without_a_value() {
        let mut w = Window::new(60);
        for (t, v) in [(1, Some(1.0)), (2, None), (3, Some(10.0)), (4, Some(4.0))] {
            w.insert(t * S, t * S, v, None);
        }
        assert_eq!(w.value(Aggregate::Count), Some(4.0));
        assert_eq!(w.value(Aggregate::Sum), Some(15.0));
        assert_eq!(w.value(Aggregate::Avg), Some(5.0));
        assert_eq!(w.value(Aggregate::Min), Some(1.0));
        assert_eq!(w.value(Aggregate::Max), Some(10.0));
        // The bucket holding the minimum leaves: min and the sums are recomputed.
        w.advance(61 * S);
        assert_eq!(w.value(Aggregate::Min), Some(4.0));
        assert_eq!(w.value(Aggregate::Sum), Some(14.0));
        assert_eq!(w.value(Aggregate::Avg), Some(7.0));
        assert_eq!(w.value(Aggregate::Count), Some(3.0));
        w.advance(70 * S);
        assert_eq!((w.value(Aggregate::Avg), w.value(Aggregate::Min), w.value(Aggregate::Max)), (None, None, None));
        assert_eq!(w.value(Aggregate::Sum), Some(0.0));
    }

    #[test]
    fn sums_do_not_drift_across_expiries() {
        let mut w = Window::new(5);
        for t in 0..10_000 {
            w.insert(t * S, t * S, Some(0.1), None);
            w.advance(t * S);
        }
        let sum = w.value(Aggregate::Sum).unwrap();
        assert!((sum - 0.5).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn distinct_counts_each_value_once_while_any_sighting_is_inside() {
        let mut w = Window::new(10);
        let (a, b) = (distinct_hash("a"), distinct_hash("b"));
        w.insert(0, 0, None, Some(a));
        w.insert(S, S, None, Some(b));
        w.insert(5 * S, 5 * S, None, Some(a));
        w.insert(5 * S, 5 * S, None, Some(a));
        assert_eq!(w.value(Aggregate::Distinct), Some(2.0));
        w.advance(12 * S);
        assert_eq!(w.value(Aggregate::Distinct), Some(1.0), "b left; a stays through its later sighting");
        w.advance(15 * S);
        assert_eq!(w.value(Aggregate::Distinct), Some(0.0));
    }

    #[test]
    fn checkpoints_with_rendered_distinct_values_still_restore() {
        // The shape windows were checkpointed in before distinct values were hashed.
        #[derive(Serialize)]
        struct OldBucket {
            idx: i64,
            count: u64,
            numeric: u64,
            sum: f64,
            min: f64,
            max: f64,
            values: Vec<String>,
        }
        #[derive(Serialize)]
        struct OldWindow {
            width_ms: i64,
            span: i64,
            buckets: Vec<OldBucket>,
            count: u64,
            numeric: u64,
            sum: f64,
            min: f64,
            max: f64,
            distinct: std::collections::BTreeMap<String, i64>,
        }
        let bucket = |idx: i64, values: &[&str]| OldBucket {
            idx,
            count: values.len() as u64,
            numeric: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let old = OldWindow {
            width_ms: 1000,
            span: 10,
            buckets: vec![bucket(0, &["\"a\""]), bucket(1, &["\"b\""])],
            count: 2,
            numeric: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            distinct: [("\"a\"".to_string(), 0), ("\"b\"".to_string(), 1)].into_iter().collect(),
        };
        let mut w: Window = rmp_serde::from_slice(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        assert_eq!(w.value(Aggregate::Distinct), Some(2.0));
        w.insert(S, S, None, Some(distinct_hash("\"a\"")));
        assert_eq!(w.value(Aggregate::Distinct), Some(2.0), "a restored value is the same value as a new sighting");
        w.advance(10 * S);
        assert_eq!(w.value(Aggregate::Distinct), Some(2.0), "a moved to bucket 1 with its new sighting");
        w.advance(11 * S);
        assert_eq!(w.value(Aggregate::Distinct), Some(0.0));
        assert_eq!(w.value(Aggregate::Count), Some(0.0));
    }

    #[test]
    fn checkpointed_windows_restore_exactly() {
        let mut count = Window::new(300);
        let mut sum = Window::new(600);
        let mut distinct = Window::new(60);
        for t in 0..50 {
            count.insert(t * S, t * S, None, None);
            sum.insert(t * S, t * S, Some(t as f64 - 10.5), None);
            distinct.insert(t * S, t * S, None, Some(distinct_hash(&(t % 7).to_string())));
        }
        for w in [&count, &sum, &distinct] {
            let back: Window = rmp_serde::from_slice(&rmp_serde::to_vec_named(w).unwrap()).unwrap();
            assert_eq!(&back, w);
        }
        let mut back: Window = rmp_serde::from_slice(&rmp_serde::to_vec_named(&sum).unwrap()).unwrap();
        back.advance(620 * S);
        assert_eq!(back.value(Aggregate::Min), Some(10.5), "restored buckets keep their minimums");
    }

    #[test]
    fn min_and_max_follow_the_buckets_that_leave() {
        let mut w = Window::new(3);
        for (t, v) in [(0, 5.0), (1, 1.0), (2, 9.0), (3, 4.0), (4, 2.0)] {
            w.advance(t * S);
            w.insert(t * S, t * S, Some(v), None);
        }
        // Seconds 2..=4 are inside: 9, 4, 2.
        assert_eq!((w.value(Aggregate::Min), w.value(Aggregate::Max)), (Some(2.0), Some(9.0)));
        w.advance(5 * S);
        assert_eq!((w.value(Aggregate::Min), w.value(Aggregate::Max)), (Some(2.0), Some(4.0)));
        assert_eq!(w.value(Aggregate::Sum), Some(6.0));
        w.advance(7 * S);
        assert_eq!(
            (w.value(Aggregate::Min), w.value(Aggregate::Max), w.value(Aggregate::Sum)),
            (None, None, Some(0.0))
        );
    }

    #[test]
    fn long_windows_use_wider_buckets() {
        assert_eq!(bucket_width_ms(3600), 1000);
        assert_eq!(bucket_width_ms(86_400), 24_000);
        let mut w = Window::new(86_400);
        w.insert(0, 0, None, None);
        w.advance(86_399 * S);
        assert_eq!(w.value(Aggregate::Count), Some(1.0));
        w.advance(86_400 * S);
        assert_eq!(w.value(Aggregate::Count), Some(0.0));
    }
    /// Lanes of a shared timeline behave exactly like windows of their own, whatever the other
    /// lanes do: random events (in and out of order, late ones too), watermark advances, lanes
    /// stopped and restarted, and lanes exported and imported again.
    #[test]
    fn timeline_lanes_match_independent_windows() {
        use rand::{Rng, SeedableRng};
        let aggregates =
            [Aggregate::Count, Aggregate::Sum, Aggregate::Avg, Aggregate::Min, Aggregate::Max, Aggregate::Distinct];
        // Numeric timelines, and count-only ones (no lane aggregates a numeric field).
        for (seconds, numeric) in [(3u64, true), (10, true), (7_200, true), (10, false), (7_200, false)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seconds + u64::from(numeric));
            let dslots: std::sync::Arc<[Option<u32>]> = vec![None, Some(0), None, Some(1)].into();
            let mut tl = Timeline::new(seconds, dslots.clone(), numeric);
            let mut reference: Vec<Option<(i64, Window)>> = vec![None; 4];
            let step = (seconds as i64 * 1000) / 8;
            let mut now = 0i64;
            for round in 0..4_000 {
                let lane = rng.random_range(0..4usize);
                match rng.random_range(0..20) {
                    0 => {
                        tl.stop(lane);
                        reference[lane] = None;
                    }
                    1 => {
                        // The watermark moves every started lane's head.
                        now += step;
                        for (l, r) in reference.iter_mut().enumerate() {
                            if let Some((head, w)) = r.as_mut().filter(|(h, _)| *h < now - 2 * step) {
                                *head = now - 2 * step;
                                w.advance(*head);
                                tl.advance(l, now - 2 * step);
                            }
                        }
                    }
                    2 => {
                        let Some((head, _)) = &reference[lane] else { continue };
                        let exported = tl.export(lane);
                        let head = *head;
                        tl.import(lane, head, &exported);
                    }
                    _ => {
                        now += rng.random_range(0..step / 4 + 1);
                        let t = now - rng.random_range(0..3 * step);
                        let value =
                            (numeric && rng.random_range(0..5) > 0).then(|| rng.random_range(-50..50) as f64 / 4.0);
                        let distinct = dslots[lane].map(|_| rng.random_range(0..12u64));
                        let (head, w) = reference[lane].get_or_insert_with(|| {
                            tl.start(lane, t);
                            (t, Window::new(seconds))
                        });
                        if t > *head {
                            *head = t;
                            w.advance(t);
                            tl.advance(lane, t);
                        }
                        assert_eq!(
                            tl.insert(lane, t, value, distinct),
                            w.insert(*head, t, value, distinct),
                            "round {round}"
                        );
                    }
                }
                for (l, r) in reference.iter().enumerate() {
                    let Some((head, w)) = r else {
                        assert!(!tl.is_started(l));
                        continue;
                    };
                    assert_eq!(tl.head(l), *head);
                    for a in aggregates {
                        let (got, want) = (tl.value(l, a), w.value(a));
                        let close = match (got, want) {
                            (Some(g), Some(w)) => (g - w).abs() < 1e-6,
                            (g, w) => g == w,
                        };
                        assert!(close, "{seconds} s, round {round}, lane {l}, {a:?}: {got:?} vs {want:?}");
                    }
                    let exported = tl.export(l);
                    assert_eq!(exported.count(), w.count());
                    assert_eq!(exported.value(Aggregate::Distinct), w.value(Aggregate::Distinct));
                }
            }
            // Nothing outlives the lanes that used it.
            for l in 0..4 {
                tl.stop(l);
            }
            assert!(tl.is_idle() && tl.idxs.is_empty() && tl.counts.is_empty() && tl.nums.is_empty());
            assert!(tl.distinct.is_empty());
        }
    }

    #[test]
    fn a_stored_lane_rebuilds_its_window() {
        let dslots: std::sync::Arc<[Option<u32>]> = vec![Some(0), None].into();
        let mut tl = Timeline::new(60, dslots, true);
        let mut w = Window::new(60);
        tl.start(0, 0);
        tl.start(1, 0);
        for t in 0..90 {
            w.advance(t * S);
            tl.advance(0, t * S);
            tl.advance(1, t * S);
            let d = Some(distinct_hash(&(t % 13).to_string()));
            w.insert(t * S, t * S, Some(t as f64), d);
            tl.insert(0, t * S, Some(t as f64), d);
            tl.insert(1, t * S, None, None);
        }
        // Stored as a shared group's entry stores it, and rebuilt.
        let stored = |lane: usize| {
            let mut ages = Vec::new();
            tl.stored_distinct(lane, &mut ages);
            let parts = (tl.stored_idxs(), tl.stored_values(), tl.stored_buckets(lane), ages);
            type Parts = (Vec<i64>, Vec<u64>, Vec<Bucket>, Vec<Option<u32>>);
            let (idxs, values, buckets, distinct): Parts =
                rmp_serde::from_slice(&rmp_serde::to_vec(&parts).unwrap()).unwrap();
            window_from_stored(60, tl.head(lane), &idxs, &values, buckets, &distinct)
        };
        for lane in 0..2 {
            assert_eq!(stored(lane), tl.export(lane), "lane {lane}");
        }
        let back = stored(0);
        // Restored into a timeline, the lane goes on as the window it was.
        let mut restored = Timeline::new(60, vec![Some(0)].into(), true);
        restored.import(0, 89 * S, &back);
        for t in [95, 100, 120, 148, 150] {
            restored.advance(0, t * S);
            w.advance(t * S);
            for a in [Aggregate::Count, Aggregate::Sum, Aggregate::Min, Aggregate::Distinct] {
                assert_eq!(restored.value(0, a), w.value(a), "{a:?} at {t} s");
            }
        }
    }
}
