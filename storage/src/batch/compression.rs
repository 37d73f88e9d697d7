//! Per-batch compression of the records section.
//!
//! A compressed records section is `[uncompressed_len: u32 LE][codec block]`. The declared
//! length bounds the allocation before decompressing, so a small hostile batch cannot claim
//! gigabytes.

use crate::error::BatchError;

/// Largest records section a batch may decompress to. Far above any sane batch; it exists so
/// that a lying length field cannot allocate without bound.
pub const MAX_UNCOMPRESSED_BYTES: usize = 256 * 1024 * 1024;

const ZSTD_LEVEL: i32 = 3;

/// Codec for a batch's records section, chosen per batch by the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    pub(crate) fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }

    pub(crate) fn from_id(id: u8) -> Result<Compression, BatchError> {
        match id {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Lz4),
            2 => Ok(Compression::Zstd),
            other => Err(BatchError::UnsupportedCompression(other)),
        }
    }

    /// Appends the compressed form of `plain` to `out`.
    pub(crate) fn compress(self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), BatchError> {
        let len = u32::try_from(plain.len())
            .ok()
            .filter(|&l| l as usize <= MAX_UNCOMPRESSED_BYTES)
            .ok_or(BatchError::Compress(format!(
                "records section of {} bytes exceeds {MAX_UNCOMPRESSED_BYTES}",
                plain.len()
            )))?;
        match self {
            Compression::None => out.extend_from_slice(plain),
            Compression::Lz4 => {
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&lz4_flex::block::compress(plain));
            }
            Compression::Zstd => {
                out.extend_from_slice(&len.to_le_bytes());
                let block = zstd::bulk::compress(plain, ZSTD_LEVEL).map_err(|e| BatchError::Compress(e.to_string()))?;
                out.extend_from_slice(&block);
            }
        }
        Ok(())
    }

    /// Decompresses a compressed records section, refusing one that declares more than
    /// `limit` bytes. Not called for `None`.
    pub(crate) fn decompress(self, section: &[u8], limit: usize) -> Result<Vec<u8>, BatchError> {
        if section.len() < 4 {
            return Err(BatchError::Decompress("missing uncompressed length".into()));
        }
        let (len, block) = section.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let limit = limit.min(MAX_UNCOMPRESSED_BYTES);
        if len > limit {
            return Err(BatchError::Decompress(format!(
                "declared uncompressed size {len} exceeds the limit of {limit}"
            )));
        }
        let plain = match self {
            Compression::None => return Ok(section.to_vec()),
            Compression::Lz4 => {
                lz4_flex::block::decompress(block, len).map_err(|e| BatchError::Decompress(e.to_string()))?
            }
            Compression::Zstd => {
                zstd::bulk::decompress(block, len).map_err(|e| BatchError::Decompress(e.to_string()))?
            }
        };
        if plain.len() != len {
            return Err(BatchError::Decompress(format!(
                "declared {len} bytes, decompressed to {}",
                plain.len()
            )));
        }
        Ok(plain)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!("unknown compression '{other}' (expected none, lz4 or zstd)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let plain: Vec<u8> = (0..10_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        for codec in [Compression::Lz4, Compression::Zstd] {
            let mut out = Vec::new();
            codec.compress(&plain, &mut out).expect("compress");
            assert!(out.len() < plain.len(), "{codec} should shrink repetitive input");
            assert_eq!(
                codec.decompress(&out, MAX_UNCOMPRESSED_BYTES).expect("decompress"),
                plain
            );
        }
    }

    #[test]
    fn a_lying_length_is_refused_before_allocating() {
        let mut section = (u32::MAX).to_le_bytes().to_vec();
        section.extend_from_slice(&[0u8; 16]);
        for codec in [Compression::Lz4, Compression::Zstd] {
            assert!(matches!(
                codec.decompress(&section, MAX_UNCOMPRESSED_BYTES),
                Err(BatchError::Decompress(_))
            ));
        }
    }
}
