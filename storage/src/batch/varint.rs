//! LEB128 varints (unsigned) and zigzag varints (signed) used inside the records section.
//!
//! Decoding never reads past the slice it is given and rejects encodings longer than the
//! type allows, so a hostile batch cannot make the decoder loop or overflow.

/// Appends `value` as an unsigned LEB128 varint.
pub(crate) fn put_u64(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// Appends `value` zigzag-encoded, so small negative numbers stay short.
pub(crate) fn put_i64(buf: &mut Vec<u8>, value: i64) {
    put_u64(buf, ((value << 1) ^ (value >> 63)) as u64);
}

/// Number of bytes `put_u64` writes for `value`.
pub(crate) fn len_u64(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Number of bytes `put_i64` writes for `value`.
pub(crate) fn len_i64(value: i64) -> usize {
    len_u64(((value << 1) ^ (value >> 63)) as u64)
}

/// Reads an unsigned varint at `*pos`, advancing it. `None` when truncated or over 10 bytes.
#[inline]
pub(crate) fn get_u64(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut result: u64 = 0;
    let mut shift = 0u32;
    loop {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        result |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(result);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// Reads a zigzag varint at `*pos`, advancing it.
#[inline]
pub(crate) fn get_i64(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let raw = get_u64(buf, pos)?;
    Some(((raw >> 1) as i64) ^ -((raw & 1) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn unsigned_round_trips(v in any::<u64>()) {
            let mut buf = Vec::new();
            put_u64(&mut buf, v);
            prop_assert_eq!(buf.len(), len_u64(v));
            let mut pos = 0;
            prop_assert_eq!(get_u64(&buf, &mut pos), Some(v));
            prop_assert_eq!(pos, buf.len());
        }

        #[test]
        fn signed_round_trips(v in any::<i64>()) {
            let mut buf = Vec::new();
            put_i64(&mut buf, v);
            prop_assert_eq!(buf.len(), len_i64(v));
            let mut pos = 0;
            prop_assert_eq!(get_i64(&buf, &mut pos), Some(v));
        }
    }

    #[test]
    fn truncated_and_overlong_varints_are_rejected() {
        let mut pos = 0;
        assert_eq!(get_u64(&[0x80, 0x80], &mut pos), None);
        let overlong = [0xffu8; 11];
        let mut pos = 0;
        assert_eq!(get_u64(&overlong, &mut pos), None);
    }
}
