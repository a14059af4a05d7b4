//! Partition assignment: the leader gives every partition of the event stream to one live
//! member, balanced (owned counts differ by at most one), sticky (a partition stays where it is
//! unless its owner is down or has more than its share) and with as few moves as that allows.
//! Each move is a Raft command that bumps the partition's epoch.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::PartitionOwner;

/// The moves that take `current` to a balanced assignment of `partitions` partitions over
/// `live` nodes: `(partition, new owner)`, in partition order. None when `live` is empty.
pub fn plan(current: &BTreeMap<u32, PartitionOwner>, partitions: u32, live: &BTreeSet<u64>) -> Vec<(u32, u64)> {
    if live.is_empty() || partitions == 0 {
        return Vec::new();
    }
    let n = live.len() as u32;
    let cap = partitions.div_ceil(n) as usize;
    let mut owned: BTreeMap<u64, Vec<u32>> = live.iter().map(|id| (*id, Vec::new())).collect();
    let mut orphans = Vec::new();
    for p in 0..partitions {
        match current.get(&p).map(|o| o.node) {
            Some(node) if owned.get(&node).is_some_and(|v| v.len() < cap) => {
                if let Some(v) = owned.get_mut(&node) {
                    v.push(p);
                }
            }
            _ => orphans.push(p),
        }
    }
    for p in orphans {
        if let Some(v) = owned.values_mut().min_by_key(|v| v.len()) {
            v.push(p);
        }
    }
    // Sticky placement can leave one node short by more than one (say it just joined):
    // move partitions from the fullest to the emptiest until counts differ by at most one.
    while let (Some(max), Some(min)) = (
        owned.iter().max_by_key(|(id, v)| (v.len(), std::cmp::Reverse(**id))).map(|(id, _)| *id),
        owned.iter().min_by_key(|(id, v)| (v.len(), **id)).map(|(id, _)| *id),
    ) {
        if owned[&max].len() <= owned[&min].len() + 1 {
            break;
        }
        let moved = owned.get_mut(&max).and_then(Vec::pop);
        if let (Some(p), Some(v)) = (moved, owned.get_mut(&min)) {
            v.push(p);
        }
    }
    let mut moves: Vec<(u32, u64)> = owned
        .into_iter()
        .flat_map(|(node, ps)| ps.into_iter().map(move |p| (p, node)))
        .filter(|(p, node)| current.get(p).map(|o| o.node) != Some(*node))
        .collect();
    moves.sort_unstable();
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(current: &mut BTreeMap<u32, PartitionOwner>, moves: &[(u32, u64)]) {
        for (p, node) in moves {
            let epoch = current.get(p).map_or(0, |o| o.epoch) + 1;
            current.insert(*p, PartitionOwner { node: *node, epoch });
        }
    }

    fn counts(current: &BTreeMap<u32, PartitionOwner>) -> BTreeMap<u64, usize> {
        let mut c = BTreeMap::new();
        for o in current.values() {
            *c.entry(o.node).or_default() += 1;
        }
        c
    }

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn balanced_sticky_and_minimal() {
        let mut a = BTreeMap::new();
        // One node takes everything.
        let m = plan(&a, 16, &set(&[1]));
        assert_eq!(m.len(), 16);
        apply(&mut a, &m);
        assert!(plan(&a, 16, &set(&[1])).is_empty(), "a balanced assignment is left alone");
        // A second and a third node join: each gets its share, moved from the first.
        let m = plan(&a, 16, &set(&[1, 2]));
        assert_eq!(m.len(), 8, "{m:?}");
        apply(&mut a, &m);
        let m = plan(&a, 16, &set(&[1, 2, 3]));
        assert_eq!(m.len(), 5, "only what the new node needs moves: {m:?}");
        apply(&mut a, &m);
        let c = counts(&a);
        assert!(c.values().all(|n| (5..=6).contains(n)), "{c:?}");
        // Node 2 goes down: only its partitions move, to the two others.
        let before = a.clone();
        let m = plan(&a, 16, &set(&[1, 3]));
        assert!(m.iter().all(|(p, node)| before[p].node == 2 && *node != 2), "{m:?}");
        apply(&mut a, &m);
        assert_eq!(counts(&a).values().copied().collect::<Vec<_>>(), vec![8, 8]);
        // Every move bumped its partition's epoch.
        assert!(m.iter().all(|(p, _)| a[p].epoch == before[p].epoch + 1));
        // Nobody live: nothing to do.
        assert!(plan(&a, 16, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn more_nodes_than_partitions() {
        let mut a = BTreeMap::new();
        let m = plan(&a, 2, &set(&[1, 2, 3]));
        apply(&mut a, &m);
        assert_eq!(a.len(), 2);
        assert!(counts(&a).values().all(|n| *n == 1));
        assert!(plan(&a, 2, &set(&[1, 2, 3])).is_empty());
    }
}
