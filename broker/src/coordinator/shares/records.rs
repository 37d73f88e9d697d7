//! The keys of the share coordinator's records in `__share_state`. Values are the protobuf
//! messages of `conveyor/internal/v1/shares.proto`; which one, the key's kind says.
//!
//! A key is a kind byte and the group id (u16 length, bytes), then for a partition's
//! snapshot the partition (i32), and for an update the partition and the update's slot
//! (its sequence mod [`UPDATE_SLOTS`], one byte). Updates reuse their slots: a partition
//! writes a snapshot every [`UPDATE_SLOTS`] sequences, so compaction keeps at most that many
//! updates per partition and every update newer than the last snapshot survives it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const GROUP: u8 = 0;
const SNAPSHOT: u8 = 1;
const UPDATE: u8 = 2;

/// Update keys per partition; a snapshot is written at every multiple of it.
pub const UPDATE_SLOTS: u64 = 64;

/// What a record's key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Group(String),
    Snapshot { group: String, partition: i32 },
    Update { group: String, partition: i32, slot: u8 },
}

impl Key {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(32);
        let put_group = |out: &mut BytesMut, kind: u8, group: &str| {
            out.put_u8(kind);
            // Group ids are at most 255 bytes (checked on every request).
            let len = group.len().min(u16::MAX as usize);
            out.put_u16(len as u16);
            out.put_slice(&group.as_bytes()[..len]);
        };
        match self {
            Key::Group(group) => put_group(&mut out, GROUP, group),
            Key::Snapshot { group, partition } => {
                put_group(&mut out, SNAPSHOT, group);
                out.put_i32(*partition);
            }
            Key::Update { group, partition, slot } => {
                put_group(&mut out, UPDATE, group);
                out.put_i32(*partition);
                out.put_u8(*slot);
            }
        }
        out.freeze()
    }

    pub fn decode(mut key: &[u8]) -> Result<Key, String> {
        let short = || "a share record key too short".to_string();
        if key.len() < 3 {
            return Err(short());
        }
        let kind = key.get_u8();
        let len = key.get_u16() as usize;
        if key.len() < len {
            return Err(short());
        }
        let group = std::str::from_utf8(&key[..len])
            .map_err(|_| "a share record key's group is not UTF-8".to_string())?
            .to_string();
        key.advance(len);
        match kind {
            GROUP if key.is_empty() => Ok(Key::Group(group)),
            SNAPSHOT if key.len() == 4 => Ok(Key::Snapshot {
                group,
                partition: key.get_i32(),
            }),
            UPDATE if key.len() == 5 => {
                let partition = key.get_i32();
                Ok(Key::Update {
                    group,
                    partition,
                    slot: key.get_u8(),
                })
            }
            other => Err(format!("a share record key of unknown kind {other} or length")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_differ_by_kind() {
        let keys = [
            Key::Group("workers".into()),
            Key::Snapshot {
                group: "workers".into(),
                partition: 2,
            },
            Key::Update {
                group: "workers".into(),
                partition: 2,
                slot: 63,
            },
        ];
        for k in &keys {
            assert_eq!(&Key::decode(&k.encode()).expect("decodes"), k);
        }
        assert_ne!(keys[1].encode(), keys[2].encode());
        assert!(Key::decode(b"\x01\x00\x05ab").is_err());
        assert!(Key::decode(b"\x09\x00\x00").is_err());
    }
}
