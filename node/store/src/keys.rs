//! The key and value layout both embedded backends share (and the ScyllaDB table mirrors):
//! big-endian numbers so byte order is time order, tenant first in every key.

use signalops_core::effects::StateKey;
use signalops_core::model::{LogPosition, StoredEvent, TenantId};

use crate::StoreError;

const DAY_MS: i64 = 86_400_000;

pub(super) fn ts(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

pub(super) fn ts_from(b: &[u8]) -> Option<i64> {
    let arr: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(arr) ^ (1 << 63)) as i64)
}

pub(super) fn day(ms: i64) -> [u8; 4] {
    (ms.div_euclid(DAY_MS).clamp(0, u32::MAX as i64) as u32).to_be_bytes()
}

pub(super) fn event_key(tenant: &TenantId, ms: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(28 + id.len());
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(&day(ms));
    k.extend_from_slice(&ts(ms));
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn time_prefix(tenant: &TenantId, ms: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(28);
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(&day(ms));
    k.extend_from_slice(&ts(ms));
    k
}

pub(super) fn tenant_key(tenant: &TenantId, tail: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + tail.len());
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(tail.as_bytes());
    k
}

pub(super) fn type_prefix(tenant: &TenantId, event_type: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + event_type.len() + 8);
    k.extend_from_slice(tenant.as_bytes());
    k.push(event_type.len() as u8);
    k.extend_from_slice(event_type.as_bytes());
    k
}

pub(super) fn type_key(tenant: &TenantId, event_type: &str, ms: i64, id: &str) -> Vec<u8> {
    let mut k = type_prefix(tenant, event_type);
    k.extend_from_slice(&ts(ms));
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn decode(bytes: &[u8]) -> Result<StoredEvent, StoreError> {
    let position =
        position_from(bytes).ok_or_else(|| StoreError::Corrupt("event value shorter than its header".into()))?;
    let record = rmp_serde::from_slice(&bytes[12..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(StoredEvent { record, position })
}

/// The log position at the head of an `events` value.
pub(super) fn position_from(bytes: &[u8]) -> Option<LogPosition> {
    let partition = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    let sequence = u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
    Some(LogPosition { partition, sequence })
}

pub(super) fn alert_key(tenant: &TenantId, id: &uuid::Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(32);
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn series_key(tenant: &TenantId, event_type: &str, minute: i64) -> Vec<u8> {
    let mut k = type_prefix(tenant, event_type);
    k.extend_from_slice(&ts(minute));
    k
}

/// Engine keyspace: `partition(4) | 0` holds the partition's meta; `partition(4) | 1 | tenant(16) |
/// rule(16) | 0` a rule's meta and `... | 1 | group` one group's state.
pub(super) fn meta_key(partition: u32) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.push(0);
    k
}

/// The newest owner epoch committed for a partition.
pub(super) fn fence_key(partition: u32) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.push(2);
    k
}

pub(super) fn state_prefix(partition: u32) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.push(1);
    k
}

pub(super) fn state_key(partition: u32, key: &StateKey) -> Vec<u8> {
    let mut k = state_prefix(partition);
    k.extend_from_slice(key.tenant.as_bytes());
    k.extend_from_slice(key.rule.as_bytes());
    match &key.group {
        None => k.push(0),
        Some(g) => {
            k.push(1);
            k.extend_from_slice(g.as_bytes());
        }
    }
    k
}

pub(super) fn state_key_from(partition: u32, k: &[u8]) -> Option<StateKey> {
    let rest = k.strip_prefix(state_prefix(partition).as_slice())?;
    let tenant = uuid::Uuid::from_slice(rest.get(..16)?).ok()?;
    let rule = uuid::Uuid::from_slice(rest.get(16..32)?).ok()?;
    let group = match rest.get(32)? {
        0 => None,
        _ => Some(std::str::from_utf8(rest.get(33..)?).ok()?.to_string()),
    };
    Some(StateKey { tenant, rule, group })
}
