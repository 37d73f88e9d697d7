//! Putting a cleaned segment in place of the segments it replaces, so that a crash at any
//! point leaves the log with either the old segments or the new one, never both or neither.
//!
//! # Protocol
//! 1. The cleaned segment is written into a staging directory of its own,
//!    `cleaner/<pass>/` inside the partition directory, under its final names (`<base>.log`,
//!    `.index`, `.timeindex`), and fsynced. Each pass has its own staging directory, so a
//!    pass still running on a log object that was retired can never touch the files of a
//!    pass on the log that replaced it.
//! 2. **Commit**: the file `cleaner-swap` is written durably (temporary file, rename,
//!    directory fsync), naming the new base offset, the base offsets it replaces and the
//!    staging directory.
//! 3. The old segments' files are deleted, then the new indexes and last the new `.log` are
//!    renamed into the partition directory; the directory is fsynced.
//! 4. `cleaner-swap` is removed and the directory fsynced.
//!
//! Opening a log first finishes a committed swap (step 3 again, skipping what was done: a
//! new file still staged means its old namesake has not been replaced yet) and then deletes
//! `cleaner/`: without the commit file its contents are an unfinished cleaning, rolled back
//! by deleting them.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{LogError, Result};
use crate::file_names::{self, INDEX_SUFFIX, LOG_SUFFIX, TIME_INDEX_SUFFIX};
use crate::sync::{replace_file_durably, sync_dir};

/// The directory the cleaner writes new segments into.
pub const CLEANER_DIR: &str = "cleaner";
/// Present between a swap's commit and its end.
pub const SWAP_MARKER: &str = "cleaner-swap";

/// New files are renamed in this order: the `.log` last, since its presence in `cleaner/`
/// is what says the swap is unfinished.
const SUFFIXES: [&str; 3] = [INDEX_SUFFIX, TIME_INDEX_SUFFIX, LOG_SUFFIX];

/// Points at which a test may kill the process (see `crash_sim::cleaner_step`).
pub(crate) mod steps {
    pub const WRITTEN: &str = "written";
    pub const COMMITTED: &str = "committed";
    pub const OLD_DELETED: &str = "old-deleted";
    pub const INDEX_MOVED: &str = "index-moved";
    pub const MOVED: &str = "moved";
    pub const DONE: &str = "done";
}

/// The staging directory of the pass named `pass`.
pub(crate) fn staging_dir(dir: &Path, pass: &str) -> PathBuf {
    dir.join(CLEANER_DIR).join(pass)
}

/// A name for a new pass's staging directory, distinct from every other pass of this
/// process and of any process before it.
pub(crate) fn new_pass_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        PASSES.fetch_add(1, Ordering::Relaxed)
    )
}

/// A committed swap: the new segment's base offset, the old segments' base offsets and the
/// pass whose staging directory holds the new files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Swap {
    pub base: u64,
    pub replaced: Vec<u64>,
    pub pass: String,
}

impl Swap {
    fn encode(&self) -> String {
        let replaced: Vec<String> = self.replaced.iter().map(u64::to_string).collect();
        format!("{}\n{}\n{}\n", self.base, replaced.join(" "), self.pass)
    }

    fn decode(text: &str, path: &Path) -> Result<Swap> {
        let corrupt = || LogError::Corrupt {
            path: path.to_path_buf(),
            detail: "unreadable cleaner swap record".into(),
        };
        let mut lines = text.lines();
        let base = lines.next().and_then(|l| l.trim().parse().ok()).ok_or_else(corrupt)?;
        let replaced = lines
            .next()
            .ok_or_else(corrupt)?
            .split_whitespace()
            .map(|b| b.parse().map_err(|_| corrupt()))
            .collect::<Result<Vec<u64>>>()?;
        let pass = lines.next().map(str::trim).unwrap_or_default().to_string();
        if !replaced.contains(&base) || pass.is_empty() || pass.contains(['/', '.']) {
            return Err(corrupt());
        }
        Ok(Swap { base, replaced, pass })
    }

    /// Step 2: makes the swap happen, whatever follows.
    pub(crate) fn commit(&self, dir: &Path) -> Result<()> {
        replace_file_durably(dir, SWAP_MARKER, self.encode().as_bytes())?;
        crate::crash_sim::cleaner_step(steps::COMMITTED);
        Ok(())
    }

    /// Steps 3 and 4, skipping what an interrupted run already did.
    pub(crate) fn finish(&self, dir: &Path) -> Result<()> {
        let staged = staging_dir(dir, &self.pass);
        let new_file = |suffix: &str| file_names::segment_file(&staged, self.base, suffix);
        if new_file(LOG_SUFFIX).exists() {
            for &old in &self.replaced {
                for suffix in SUFFIXES {
                    // The new segment shares its first predecessor's names: a name already
                    // replaced (its new file no longer waits in `cleaner/`) stays.
                    if old == self.base && !new_file(suffix).exists() {
                        continue;
                    }
                    remove_if_present(&file_names::segment_file(dir, old, suffix))?;
                }
            }
            crate::crash_sim::cleaner_step(steps::OLD_DELETED);
            for suffix in SUFFIXES {
                let from = new_file(suffix);
                if from.exists() {
                    let to = file_names::segment_file(dir, self.base, suffix);
                    fs::rename(&from, &to).map_err(LogError::io("move cleaned segment", &from))?;
                    crate::crash_sim::renamed(&from, &to);
                }
                if suffix == INDEX_SUFFIX {
                    crate::crash_sim::cleaner_step(steps::INDEX_MOVED);
                }
            }
            sync_dir(dir)?;
            crate::crash_sim::cleaner_step(steps::MOVED);
        }
        remove_if_present(&dir.join(SWAP_MARKER))?;
        sync_dir(dir)?;
        crate::crash_sim::cleaner_step(steps::DONE);
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Deletes a staging directory and what it holds.
pub(crate) fn remove_staging(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::io("remove cleaner directory", path)(e)),
        _ => Ok(()),
    }
}

/// On open: finishes a committed swap, then rolls back any unfinished cleaning.
pub(crate) fn recover(dir: &Path) -> Result<()> {
    let marker = dir.join(SWAP_MARKER);
    match fs::read_to_string(&marker) {
        Ok(text) => {
            let swap = Swap::decode(&text, &marker)?;
            tracing::info!(dir = %dir.display(), base_offset = swap.base, "finishing a compaction swap a crash interrupted");
            swap.finish(dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LogError::io("read cleaner swap record", &marker)(e)),
    }
    remove_staging(&dir.join(CLEANER_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_record_round_trips_and_garbage_is_refused() {
        let swap = Swap {
            base: 10,
            replaced: vec![10, 20, 30],
            pass: new_pass_name(),
        };
        let path = Path::new("/x");
        assert_eq!(Swap::decode(&swap.encode(), path).expect("decode"), swap);
        assert!(
            Swap::decode("10\n20 30\np\n", path).is_err(),
            "must replace its own base"
        );
        assert!(
            Swap::decode("10\n10 30\n../x\n", path).is_err(),
            "a staging name, not a path"
        );
        assert!(Swap::decode("x\n", path).is_err());
    }
}
