//! File names inside a partition directory.
//!
//! Segments are named by their base offset, zero-padded to 20 digits so that lexical order is
//! offset order: `00000000000000000000.log`, `.index`, `.timeindex`.

use std::path::{Path, PathBuf};

pub const LOG_SUFFIX: &str = "log";
pub const INDEX_SUFFIX: &str = "index";
pub const TIME_INDEX_SUFFIX: &str = "timeindex";
/// Present only after a clean close: the next open may skip recovery.
pub const CLEAN_SHUTDOWN: &str = ".clean_shutdown";
/// Offset below which every batch is known to be on disk.
pub const RECOVERY_POINT: &str = "recovery-point";

pub fn segment_file(dir: &Path, base_offset: u64, suffix: &str) -> PathBuf {
    dir.join(format!("{base_offset:020}.{suffix}"))
}

/// The base offset of a `NNNNNNNNNNNNNNNNNNNN.log` file name.
pub fn parse_log_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_twenty_digit_base_offsets() {
        let p = segment_file(Path::new("/d"), 42, LOG_SUFFIX);
        assert_eq!(p, Path::new("/d/00000000000000000042.log"));
        assert_eq!(parse_log_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_name("42.log"), None);
        assert_eq!(parse_log_name("00000000000000000042.index"), None);
    }
}
