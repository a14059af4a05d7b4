//! Which partition a tenant's events go to: FNV-1a of the tenant id's text, modulo the
//! partition count. Fixed for the life of a stream (changing it would move tenants).

use crate::model::TenantId;

/// FNV-1a, 32 bit.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub fn partition_of(tenant: &TenantId, partitions: u32) -> u32 {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    fnv1a(tenant.hyphenated().encode_lower(&mut text).as_bytes()) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a(b""), 0x811c9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c292c);
        assert_eq!(fnv1a(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let t = uuid::Uuid::parse_str("0193a0f4-0000-7000-8000-000000000001").unwrap();
        let p = partition_of(&t, 16);
        assert!(p < 16);
        assert_eq!(p, partition_of(&t, 16));
        assert_eq!(p, fnv1a(b"0193a0f4-0000-7000-8000-000000000001") % 16);
    }
}
