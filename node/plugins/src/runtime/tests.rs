use super::*;

#[test]
fn the_short_decisions_read_like_any_other_map() {
    for fire in [false, true] {
        let short = decode_output(&[0x81, 0xa4, b'f', b'i', b'r', b'e', if fire { 0xc3 } else { 0xc2 }]);
        // The same map in a longer form (str8 key) goes through the general reader.
        let long = decode_output(&[0x81, 0xd9, 4, b'f', b'i', b'r', b'e', if fire { 0xc3 } else { 0xc2 }]);
        assert_eq!(short.as_ref().ok(), long.as_ref().ok());
        assert_eq!(short.map(|d| d.fire).ok(), Some(fire));
    }
    assert!(decode_output(&[0x81, 0xa4, b'f', b'i', b'r', b'e', 0xc0]).is_err(), "fire must be a boolean");
}
