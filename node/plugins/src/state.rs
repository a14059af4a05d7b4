//! What plugins keep between calls: sliding-window counters and small key-value entries, per
//! (tenant, rule), inside the partition engine's state (so they are checkpointed with it and
//! replay exactly). A call's changes are journaled and rolled back unless the call succeeds.

use std::collections::VecDeque;

// Keys come from events (a tenant's data): foldhash is randomly seeded per process.
use foldhash::{HashMap, HashSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Longest key of a window counter or state entry, in bytes (ABI v1).
pub const MAX_KEY_BYTES: usize = 256;
/// Largest state value, in bytes (ABI v1).
pub const MAX_VALUE_BYTES: usize = 4096;
/// Longest window, in seconds (ABI v1).
pub const MAX_WINDOW_SECONDS: i64 = 3600;

/// Helper return codes (ABI v1): bad arguments, and a full rule state.
pub const ERR_INVALID: i64 = -1;
pub const ERR_FULL: i64 = -2;

/// A sliding-window counter: sums per second of event time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    /// Longest window asked of this counter; buckets older than that are dropped.
    pub span_s: i64,
    /// (second, sum), ascending by second.
    pub buckets: VecDeque<(i64, i64)>,
}

impl Counter {
    fn add(&mut self, sec: i64, delta: i64) -> bool {
        let pos = self.buckets.iter().rposition(|(s, _)| *s <= sec);
        match pos {
            Some(i) if self.buckets[i].0 == sec => {
                self.buckets[i].1 = self.buckets[i].1.saturating_add(delta);
                false
            }
            Some(i) => {
                self.buckets.insert(i + 1, (sec, delta));
                true
            }
            None => {
                self.buckets.push_front((sec, delta));
                true
            }
        }
    }

    /// Sum over `(sec - seconds, sec]`.
    pub fn sum(&self, sec: i64, seconds: i64) -> i64 {
        self.buckets
            .iter()
            .rev()
            .skip_while(|(s, _)| *s > sec)
            .take_while(|(s, _)| *s > sec - seconds)
            .fold(0i64, |acc, (_, v)| acc.saturating_add(*v))
    }
}

/// Which entry of a rule's plugin state changed (for checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKey {
    Window(Vec<u8>),
    State(Vec<u8>),
}

/// Undo records of one call; `key` is a range of the journal's key bytes.
#[derive(Debug)]
enum Undo {
    WindowAdd { key: Range<usize>, sec: i64, delta: i64, new_bucket: bool, new_key: bool, span_s: i64 },
    Span { key: Range<usize>, span_s: i64 },
    State { key: Range<usize>, previous: Option<Vec<u8>> },
}

/// Limits on one rule's plugin state.
#[derive(Debug, Clone, Copy)]
pub struct StateLimits {
    pub max_keys: usize,
    pub max_buckets: usize,
}

/// One rule's plugin state in one partition.
#[derive(Debug, Default)]
pub struct PluginState {
    pub windows: HashMap<Vec<u8>, Counter>,
    pub kv: HashMap<Vec<u8>, Vec<u8>>,
    buckets: usize,
    journal: Vec<Undo>,
    /// The keys the journal names, back to back (no allocation per call).
    journal_keys: Vec<u8>,
    /// Entries changed since the last checkpoint.
    dirty_windows: HashSet<Vec<u8>>,
    dirty_state: HashSet<Vec<u8>>,
}

impl PluginState {
    /// Restores one checkpointed counter.
    pub fn restore_window(&mut self, key: Vec<u8>, c: Counter) {
        self.buckets += c.buckets.len();
        self.windows.insert(key, c);
    }

    pub fn keys(&self) -> usize {
        self.windows.len() + self.kv.len()
    }

    fn journal_key(&mut self, key: &[u8]) -> Range<usize> {
        let start = self.journal_keys.len();
        self.journal_keys.extend_from_slice(key);
        start..self.journal_keys.len()
    }

    fn touch_window(&mut self, key: &[u8]) {
        if !self.dirty_windows.contains(key) {
            self.dirty_windows.insert(key.to_vec());
        }
    }

    fn touch_state(&mut self, key: &[u8]) {
        if !self.dirty_state.contains(key) {
            self.dirty_state.insert(key.to_vec());
        }
    }

    /// Takes the entries changed since the last call (for a checkpoint).
    pub fn take_dirty(&mut self) -> Vec<EntryKey> {
        let windows = self.dirty_windows.drain().map(EntryKey::Window);
        windows.chain(self.dirty_state.drain().map(EntryKey::State)).collect()
    }

    pub fn window_add(&mut self, key: &[u8], now_ms: i64, seconds: i64, delta: i64, limits: StateLimits) -> i64 {
        // Counters only grow (sums are never negative, so they cannot be mistaken for errors).
        if key.len() > MAX_KEY_BYTES || !(1..=MAX_WINDOW_SECONDS).contains(&seconds) || delta < 0 {
            return ERR_INVALID;
        }
        let sec = now_ms.div_euclid(1000);
        let keys = self.keys();
        let buckets_full = self.buckets >= limits.max_buckets;
        // One lookup for a counter that exists (the common case), a second to insert a new one.
        let (c, new_key) = match self.windows.get_mut(key) {
            Some(c) => {
                if buckets_full && !c.buckets.iter().any(|(s, _)| *s == sec) {
                    return ERR_FULL;
                }
                (c, false)
            }
            None => {
                if keys >= limits.max_keys || buckets_full {
                    return ERR_FULL;
                }
                (self.windows.entry(key.to_vec()).or_default(), true)
            }
        };
        let span_s = c.span_s;
        c.span_s = c.span_s.max(seconds);
        let new_bucket = c.add(sec, delta);
        let sum = c.sum(sec, seconds);
        if new_bucket {
            self.buckets += 1;
        }
        let key_range = self.journal_key(key);
        self.journal.push(Undo::WindowAdd { key: key_range, sec, delta, new_bucket, new_key, span_s });
        self.touch_window(key);
        sum
    }

    pub fn window_sum(&mut self, key: &[u8], now_ms: i64, seconds: i64) -> i64 {
        if key.len() > MAX_KEY_BYTES || !(1..=MAX_WINDOW_SECONDS).contains(&seconds) {
            return ERR_INVALID;
        }
        let Some(c) = self.windows.get_mut(key) else { return 0 };
        let sum = c.sum(now_ms.div_euclid(1000), seconds);
        if seconds > c.span_s {
            // A longer window from now on keeps buckets longer.
            let span_s = std::mem::replace(&mut c.span_s, seconds);
            let key_range = self.journal_key(key);
            self.journal.push(Undo::Span { key: key_range, span_s });
            self.touch_window(key);
        }
        sum
    }

    pub fn state_get(&self, key: &[u8]) -> Option<&[u8]> {
        self.kv.get(key).map(|v| v.as_slice())
    }

    pub fn state_set(&mut self, key: &[u8], value: &[u8], limits: StateLimits) -> i64 {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return ERR_INVALID;
        }
        if !self.kv.contains_key(key) && self.keys() >= limits.max_keys {
            return ERR_FULL;
        }
        let previous = self.kv.insert(key.to_vec(), value.to_vec());
        let key_range = self.journal_key(key);
        self.journal.push(Undo::State { key: key_range, previous });
        self.touch_state(key);
        0
    }

    pub fn state_delete(&mut self, key: &[u8]) -> i64 {
        match self.kv.remove(key) {
            Some(previous) => {
                let key_range = self.journal_key(key);
                self.journal.push(Undo::State { key: key_range, previous: Some(previous) });
                self.touch_state(key);
                1
            }
            None => 0,
        }
    }

    /// Keeps the changes of the call that just ended.
    pub fn commit(&mut self) {
        self.journal.clear();
        self.journal_keys.clear();
    }

    /// Undoes the changes of the call that just ended (newest first).
    pub fn rollback(&mut self) {
        while let Some(u) = self.journal.pop() {
            match u {
                Undo::WindowAdd { key, sec, delta, new_bucket, new_key, span_s } => {
                    let key = &self.journal_keys[key];
                    if new_key {
                        if let Some(c) = self.windows.remove(key) {
                            self.buckets -= c.buckets.len();
                        }
                        continue;
                    }
                    let Some(c) = self.windows.get_mut(key) else { continue };
                    c.span_s = span_s;
                    if let Some(i) = c.buckets.iter().position(|(s, _)| *s == sec) {
                        if new_bucket {
                            c.buckets.remove(i);
                            self.buckets -= 1;
                        } else {
                            c.buckets[i].1 = c.buckets[i].1.saturating_sub(delta);
                        }
                    }
                }
                Undo::Span { key, span_s } => {
                    if let Some(c) = self.windows.get_mut(&self.journal_keys[key]) {
                        c.span_s = span_s;
                    }
                }
                Undo::State { key, previous } => {
                    let key = &self.journal_keys[key];
                    match previous {
                        Some(v) => {
                            self.kv.insert(key.to_vec(), v);
                        }
                        None => {
                            self.kv.remove(key);
                        }
                    }
                }
            }
        }
        self.journal_keys.clear();
    }

    /// Drops buckets that no window can reach any more: older than `span` before `now_ms`
    /// (the partition's watermark); counters left empty go, and are marked dirty so the
    /// checkpoint deletes them.
    pub fn expire(&mut self, now_ms: i64) {
        let sec = now_ms.div_euclid(1000);
        let mut gone = Vec::new();
        for (k, c) in self.windows.iter_mut() {
            let before = c.buckets.len();
            while c.buckets.front().is_some_and(|(s, _)| *s <= sec - c.span_s) {
                c.buckets.pop_front();
            }
            let removed = before - c.buckets.len();
            if removed > 0 {
                self.buckets -= removed;
                if !self.dirty_windows.contains(k) {
                    self.dirty_windows.insert(k.clone());
                }
                if c.buckets.is_empty() {
                    gone.push(k.clone());
                }
            }
        }
        for k in gone {
            self.windows.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: StateLimits = StateLimits { max_keys: 3, max_buckets: 100 };

    #[test]
    fn windows_slide_over_event_time() {
        let mut s = PluginState::default();
        assert_eq!(s.window_add(b"card", 10_000, 10, 1, L), 1);
        assert_eq!(s.window_add(b"card", 15_500, 10, 1, L), 2);
        // A late event lands in its own second and counts in windows that reach it.
        assert_eq!(s.window_add(b"card", 12_000, 10, 1, L), 2);
        assert_eq!(s.window_sum(b"card", 19_999, 10), 3);
        assert_eq!(s.window_sum(b"card", 20_000, 10), 2);
        assert_eq!(s.window_sum(b"card", 26_000, 10), 0);
        assert_eq!(s.window_add(b"card", 0, 0, 1, L), ERR_INVALID);
        assert_eq!(s.window_add(b"card", 0, 10, -1, L), ERR_INVALID);
        assert_eq!(s.window_add(&[0; 257], 0, 1, 1, L), ERR_INVALID);
        s.commit();
        s.expire(30_000);
        assert!(s.windows.is_empty());
        assert_eq!(s.buckets, 0);
    }

    #[test]
    fn rollback_restores_everything_a_call_changed() {
        let mut s = PluginState::default();
        s.window_add(b"a", 1_000, 60, 5, L);
        s.state_set(b"k", b"v1", L);
        s.commit();
        s.take_dirty();
        s.window_add(b"a", 1_000, 60, 2, L);
        s.window_add(b"a", 2_000, 120, 1, L);
        s.window_add(b"b", 1_000, 60, 1, L);
        s.state_set(b"k", b"v2", L);
        s.state_set(b"new", b"x", L);
        assert_eq!(s.state_delete(b"k"), 1);
        s.rollback();
        assert_eq!(s.window_sum(b"a", 2_000, 60), 5);
        assert_eq!(s.windows.get(b"a".as_slice()).map(|c| c.span_s), Some(60));
        assert!(!s.windows.contains_key(b"b".as_slice()));
        assert_eq!(s.state_get(b"k"), Some(b"v1".as_slice()));
        assert_eq!(s.state_get(b"new"), None);
        assert_eq!(s.buckets, 1);
    }

    #[test]
    fn limits_refuse_new_keys_but_not_existing_ones() {
        let mut s = PluginState::default();
        for k in [b"a", b"b", b"c"] {
            assert_eq!(s.state_set(k, b"1", L), 0);
        }
        assert_eq!(s.state_set(b"d", b"1", L), ERR_FULL);
        assert_eq!(s.window_add(b"w", 0, 1, 1, L), ERR_FULL);
        assert_eq!(s.state_set(b"a", b"2", L), 0);
        assert_eq!(s.state_set(b"a", &[0; MAX_VALUE_BYTES + 1], L), ERR_INVALID);
    }
}
