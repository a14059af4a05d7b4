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

use super::spec::Aggregate;

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
struct Bucket {
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
        use serde::ser::SerializeTuple;
        let len = match (self.numeric, self.values.is_empty()) {
            (0, true) => 2,
            (_, true) => 6,
            _ => 7,
        };
        let mut t = s.serialize_tuple(len)?;
        t.serialize_element(&self.idx)?;
        t.serialize_element(&self.count)?;
        if len > 2 {
            t.serialize_element(&self.numeric)?;
            t.serialize_element(&self.sum)?;
            t.serialize_element(&self.min)?;
            t.serialize_element(&self.max)?;
        }
        if len > 6 {
            t.serialize_element(&self.values)?;
        }
        t.end()
    }
}

/// One group's window state.
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
    fn first_idx(&self, head_ms: i64) -> i64 {
        self.idx(head_ms) - self.span + 1
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds one event at `t_ms` to a window whose head is `head_ms` (callers advance the head
    /// first when the event is newer). `value` is the numeric field (sum/avg/min/max) and
    /// `distinct` the value's [`distinct_hash`] (distinct); an event without a value still counts.
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
}
