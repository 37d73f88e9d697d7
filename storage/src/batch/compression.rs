//! Per-batch compression of the records section.
//!
//! A compressed records section is `[uncompressed_len: u32 LE][codec block]`.
//!
//! # Invariants
//! - The declared length is checked against the caller's limit before anything is
//!   decompressed, and the output never takes more memory than the declared length: a small
//!   hostile batch can neither claim nor produce more than the limit.
//! - Memory a section really uses is bounded by what it holds: lz4 gets an output buffer
//!   only as large as its block could fill, and zstd writes into a buffer of the declared
//!   size whose pages are touched only as output arrives (see [`Compression::decompress`]).

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
    /// `limit` bytes or that inflates past what it declared. Not called for `None`.
    ///
    /// Memory stays within the declared size and bounded by what the section really holds:
    /// zstd is decoded in one pass into a buffer of exactly the declared size (see
    /// [`zstd_bounded`]), and lz4 (a block format that must know its output size) only gets
    /// an output buffer the block could actually fill.
    pub(crate) fn decompress(self, section: &[u8], limit: usize) -> Result<Vec<u8>, BatchError> {
        if section.len() < 4 {
            return Err(BatchError::Decompress("missing uncompressed length".into()));
        }
        let (len, block) = section.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let limit = limit.min(MAX_UNCOMPRESSED_BYTES);
        if len > limit {
            return Err(BatchError::InflatesTooLarge { size: len, limit });
        }
        let plain = match self {
            Compression::None => return Ok(section.to_vec()),
            Compression::Lz4 => {
                if len > block.len().saturating_mul(LZ4_MAX_RATIO).saturating_add(LZ4_SLACK) {
                    return Err(BatchError::Decompress(format!(
                        "declared uncompressed size {len} is more than a {}-byte lz4 block can hold",
                        block.len()
                    )));
                }
                lz4_flex::block::decompress(block, len).map_err(|e| BatchError::Decompress(e.to_string()))?
            }
            Compression::Zstd => zstd_bounded(block, len)?,
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

/// Most output one byte of an lz4 block can produce (a match length byte adds 255), and the
/// fixed slack of a block's shortest encodings.
const LZ4_MAX_RATIO: usize = 255;
const LZ4_SLACK: usize = 64;

/// Decodes a zstd block in one pass straight into a buffer of exactly `declared` bytes: the
/// output can never take more memory than the batch declared (which callers have already
/// checked against their limit and reserved), and a block that inflates past it fails with
/// "destination buffer is too small" instead of producing the rest. One-pass decoding uses
/// the output as its window, so no window buffer is allocated whatever the frame asks for.
/// The buffer's pages are only touched as output is written, so a batch that declares more
/// than it holds costs the memory of what it holds.
fn zstd_bounded(block: &[u8], declared: usize) -> Result<Vec<u8>, BatchError> {
    let mut out = Vec::with_capacity(declared);
    zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(block, &mut out))
        .map_err(|e| {
            BatchError::Decompress(format!(
                "zstd block declared to inflate to {declared} bytes could not be decoded within them: {e}"
            ))
        })?;
    Ok(out)
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
    fn a_block_that_inflates_past_its_declared_size_stops_there() {
        let plain = vec![0u8; 8 << 20];
        let mut out = Vec::new();
        Compression::Zstd.compress(&plain, &mut out).expect("compress");
        // Claim 4 MiB: decoding must stop at it, not produce 8 MiB.
        let claim = 4u32 << 20;
        out[..4].copy_from_slice(&claim.to_le_bytes());
        let e = Compression::Zstd
            .decompress(&out, MAX_UNCOMPRESSED_BYTES)
            .expect_err("lies");
        assert!(e.to_string().contains(&format!("inflate to {claim} bytes")), "{e}");
        assert!(e.to_string().contains("too small"), "{e}");
        // Claim 1 KiB: refused just the same.
        out[..4].copy_from_slice(&1024u32.to_le_bytes());
        let e = Compression::Zstd
            .decompress(&out, MAX_UNCOMPRESSED_BYTES)
            .expect_err("lies");
        assert!(matches!(e, BatchError::Decompress(_)), "{e}");
    }

    #[test]
    fn zstd_output_never_takes_more_memory_than_the_declared_size() {
        // Not a power of two: a buffer that grows by doubling overshoots it by almost 2x.
        let plain: Vec<u8> = (0..(3 << 20) + 17u32).map(|i| (i % 251) as u8).collect();
        let mut section = Vec::new();
        Compression::Zstd.compress(&plain, &mut section).expect("compress");
        let out = zstd_bounded(&section[4..], plain.len()).expect("decompress");
        assert_eq!(out, plain);
        assert!(
            out.capacity() <= plain.len(),
            "the output of {} bytes took a buffer of {}",
            plain.len(),
            out.capacity()
        );
    }

    #[test]
    fn a_section_declaring_more_than_the_limit_is_refused_as_too_large() {
        let plain = vec![7u8; 4096];
        for codec in [Compression::Lz4, Compression::Zstd] {
            let mut out = Vec::new();
            codec.compress(&plain, &mut out).expect("compress");
            assert_eq!(
                codec.decompress(&out, 4095),
                Err(BatchError::InflatesTooLarge {
                    size: 4096,
                    limit: 4095
                })
            );
            assert_eq!(codec.decompress(&out, 4096).expect("at the limit"), plain);
        }
    }

    #[test]
    fn an_lz4_block_claiming_more_than_it_can_hold_is_refused() {
        let mut section = (1u32 << 20).to_le_bytes().to_vec();
        section.extend_from_slice(&[0u8; 16]);
        let e = Compression::Lz4
            .decompress(&section, MAX_UNCOMPRESSED_BYTES)
            .expect_err("lies");
        assert!(e.to_string().contains("lz4 block"), "{e}");
    }

    #[test]
    fn a_lying_length_is_refused_before_allocating() {
        let mut section = (u32::MAX).to_le_bytes().to_vec();
        section.extend_from_slice(&[0u8; 16]);
        for codec in [Compression::Lz4, Compression::Zstd] {
            assert!(matches!(
                codec.decompress(&section, MAX_UNCOMPRESSED_BYTES),
                Err(BatchError::InflatesTooLarge { .. })
            ));
        }
    }
}
