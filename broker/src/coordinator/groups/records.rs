//! The keys of the group coordinator's records in `__consumer_offsets`. Values are the
//! protobuf messages of `conveyor/internal/v1/groups.proto`; which one, the key's kind says.
//!
//! A key is a kind byte, the group id (u16 length, bytes), then what the kind names: nothing
//! for the group's metadata, the member id for a member, the topic (u16 length, bytes) and
//! partition (i32) for a committed offset. Keys are compared as bytes by compaction, so
//! each must have exactly one encoding.

use bytes::{BufMut, Bytes, BytesMut};

const GROUP: u8 = 0;
const MEMBER: u8 = 1;
const OFFSET: u8 = 2;

/// What a record's key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Group(String),
    Member {
        group: String,
        member: String,
    },
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
}

impl Key {
    pub fn group(&self) -> &str {
        match self {
            Key::Group(g) | Key::Member { group: g, .. } | Key::Offset { group: g, .. } => g,
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        let put_str = |out: &mut BytesMut, s: &str| {
            // Lengths are bounded by request validation (ids, topic names) well below u16.
            out.put_u16(s.len().min(u16::MAX as usize) as u16);
            out.put_slice(&s.as_bytes()[..s.len().min(u16::MAX as usize)]);
        };
        match self {
            Key::Group(group) => {
                out.put_u8(GROUP);
                put_str(&mut out, group);
            }
            Key::Member { group, member } => {
                out.put_u8(MEMBER);
                put_str(&mut out, group);
                out.put_slice(member.as_bytes());
            }
            Key::Offset {
                group,
                topic,
                partition,
            } => {
                out.put_u8(OFFSET);
                put_str(&mut out, group);
                put_str(&mut out, topic);
                out.put_i32(*partition);
            }
        }
        out.freeze()
    }

    pub fn decode(bytes: &[u8]) -> Result<Key, String> {
        let mut at = 0usize;
        let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
            let end = at.checked_add(n).filter(|&e| e <= bytes.len()).ok_or("key too short")?;
            let out = &bytes[*at..end];
            *at = end;
            Ok(out)
        };
        let string = |at: &mut usize| -> Result<String, String> {
            let len = take(at, 2)?;
            let len = u16::from_be_bytes([len[0], len[1]]) as usize;
            String::from_utf8(take(at, len)?.to_vec()).map_err(|_| "key holds a name that is not UTF-8".to_string())
        };
        let kind = take(&mut at, 1)?[0];
        let group = string(&mut at)?;
        let key = match kind {
            GROUP => Key::Group(group),
            MEMBER => {
                let member = String::from_utf8(bytes[at..].to_vec()).map_err(|_| "member id is not UTF-8")?;
                at = bytes.len();
                Key::Member { group, member }
            }
            OFFSET => {
                let topic = string(&mut at)?;
                let p = take(&mut at, 4)?;
                Key::Offset {
                    group,
                    topic,
                    partition: i32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                }
            }
            other => return Err(format!("unknown key kind {other}")),
        };
        if at != bytes.len() {
            return Err("key has trailing bytes".into());
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_garbage() {
        let keys = [
            Key::Group("g".into()),
            Key::Group(String::new()),
            Key::Member {
                group: "workers".into(),
                member: "m-1".into(),
            },
            Key::Offset {
                group: "workers".into(),
                topic: "orders".into(),
                partition: 11,
            },
        ];
        for k in keys {
            assert_eq!(Key::decode(&k.encode()), Ok(k.clone()));
            let mut longer = k.encode().to_vec();
            longer.push(0);
            if !matches!(k, Key::Member { .. }) {
                assert!(Key::decode(&longer).is_err(), "{k:?}");
            }
        }
        for bad in [&[][..], &[9, 0, 0], &[2, 0, 5, b'a'], &[0, 0xff, 0xff]] {
            assert!(Key::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn different_keys_encode_differently() {
        let a = Key::Offset {
            group: "ab".into(),
            topic: "c".into(),
            partition: 0,
        };
        let b = Key::Offset {
            group: "a".into(),
            topic: "bc".into(),
            partition: 0,
        };
        assert_ne!(a.encode(), b.encode());
    }
}
