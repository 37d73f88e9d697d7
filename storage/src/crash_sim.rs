//! Crash simulation for tests: keeps *written* and *durable* bytes apart, so that a test can
//! cut the power and see only what the log made durable.
//!
//! Every place where storage makes something durable calls a hook here: an fsync of a file's
//! data ([`file_synced`]), an fsync of a directory ([`dir_synced`]), a rename, a truncation.
//! With the `crash-sim` feature the hooks record, per file, the length that was durable at its
//! last fsync, and per directory the names that existed at its last fsync. [`power_cut`] then
//! rewinds a directory to that state: every file is cut to its durable length and every name
//! a directory fsync never covered is removed. Without the feature every hook is an empty
//! inline function and nothing is recorded.
//!
//! # Model and its limits
//! - File data is durable up to the length seen at its last `fsync`/`fdatasync`; a truncation
//!   lowers it (a rewrite past the cut is not durable until fsynced again). Bytes overwritten
//!   in place below that length (the memory-mapped indexes) are kept: recovery checks indexes
//!   against the log anyway.
//! - A name is durable once a directory fsync saw it. Deletions are treated as immediately
//!   durable (a deleted file cannot be brought back), and a rename carries the durable length
//!   of its source.
//! - The test hooks also count segment fsyncs per directory, can hold segment fsyncs in a
//!   directory until released (so a test can line appenders up behind a running fsync
//!   without relying on timing), and can make the next segment write in a directory fail after
//!   writing part of a batch, as a full disk does.

#[cfg(feature = "crash-sim")]
pub use imp::*;

#[cfg(not(feature = "crash-sim"))]
mod off {
    use std::fs::File;
    use std::path::Path;

    #[inline(always)]
    pub(crate) fn file_synced(_path: &Path, _file: &File) {}
    #[inline(always)]
    pub(crate) fn dir_synced(_dir: &Path) {}
    #[inline(always)]
    pub(crate) fn renamed(_from: &Path, _to: &Path) {}
    #[inline(always)]
    pub(crate) fn truncated(_path: &Path, _len: u64) {}
    #[inline(always)]
    pub(crate) fn before_segment_fsync(_path: &Path) {}
    #[inline(always)]
    pub(crate) fn take_write_failure(_path: &Path) -> bool {
        false
    }
    #[inline(always)]
    pub(crate) fn cleaner_step(_step: &str) {}
}

#[cfg(not(feature = "crash-sim"))]
pub(crate) use off::*;

#[cfg(feature = "crash-sim")]
mod imp {
    /// Environment variable naming a cleaner step (`crate::cleaner::swap::steps`) and which
    /// of its occurrences kills the process, as `STEP:N` (N from 1): a test child compacting
    /// under it dies there, as a SIGKILL would take it.
    pub const CLEANER_KILL_AT_ENV: &str = "CONVEYOR_CLEANER_KILL_AT";

    /// Kills the process if `CONVEYOR_CLEANER_KILL_AT` names this occurrence of `step`.
    pub(crate) fn cleaner_step(step: &str) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEEN: AtomicU64 = AtomicU64::new(0);
        let Ok(target) = std::env::var(CLEANER_KILL_AT_ENV) else {
            return;
        };
        let Some((name, n)) = target.split_once(':') else {
            return;
        };
        if name != step {
            return;
        }
        let seen = SEEN.fetch_add(1, Ordering::SeqCst) + 1;
        if n.parse::<u64>().is_ok_and(|n| n == seen) {
            // SAFETY: raising a signal at the calling thread; SIGKILL cannot be caught.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
    }

    use std::collections::{HashMap, HashSet};
    use std::ffi::OsString;
    use std::fs::{self, File};
    use std::path::{Path, PathBuf};
    use std::sync::{Condvar, Mutex, MutexGuard};

    #[derive(Default)]
    struct State {
        /// Durable length of each file, as of its last fsync.
        durable_len: HashMap<PathBuf, u64>,
        /// Names in each directory as of its last fsync.
        durable_names: HashMap<PathBuf, HashSet<OsString>>,
        /// Segment (`.log`) fsyncs per directory.
        segment_fsyncs: HashMap<PathBuf, u64>,
        /// Directories whose next segment write fails.
        fail_next_write: HashSet<PathBuf>,
    }

    static STATE: Mutex<Option<State>> = Mutex::new(None);

    /// Directories whose segment fsyncs are held, with the number of fsyncs waiting.
    static GATE: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);
    static GATE_CHANGED: Condvar = Condvar::new();

    fn gate() -> MutexGuard<'static, Option<HashMap<PathBuf, usize>>> {
        GATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds every segment fsync in `dir` until [`release_fsyncs`].
    pub fn hold_fsyncs(dir: &Path) {
        gate().get_or_insert_with(HashMap::new).insert(dir.to_path_buf(), 0);
    }

    /// Lets held segment fsyncs in `dir` (and later ones) run.
    pub fn release_fsyncs(dir: &Path) {
        if let Some(held) = gate().as_mut() {
            held.remove(dir);
        }
        GATE_CHANGED.notify_all();
    }

    /// Segment fsyncs in `dir` waiting for [`release_fsyncs`].
    pub fn fsyncs_waiting(dir: &Path) -> usize {
        gate().as_ref().and_then(|h| h.get(dir).copied()).unwrap_or(0)
    }

    /// Blocks while segment fsyncs in this file's directory are held.
    pub(crate) fn before_segment_fsync(path: &Path) {
        let dir = parent(path);
        let mut held = gate();
        if let Some(waiting) = held.as_mut().and_then(|h| h.get_mut(&dir)) {
            *waiting += 1;
        } else {
            return;
        }
        while held.as_ref().is_some_and(|h| h.contains_key(&dir)) {
            held = GATE_CHANGED
                .wait(held)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard: MutexGuard<'_, Option<State>> = STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(guard.get_or_insert_with(State::default))
    }

    fn parent(path: &Path) -> PathBuf {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// A file's data was fsynced: its current length is durable.
    pub(crate) fn file_synced(path: &Path, file: &File) {
        let Ok(meta) = file.metadata() else { return };
        with(|s| {
            s.durable_len.insert(path.to_path_buf(), meta.len());
            if path.extension().is_some_and(|e| e == "log") {
                *s.segment_fsyncs.entry(parent(path)).or_default() += 1;
            }
        });
    }

    /// A directory was fsynced: the names in it now are durable.
    pub(crate) fn dir_synced(dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        let names: HashSet<OsString> = entries.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        with(|s| {
            s.durable_names.insert(dir.to_path_buf(), names);
        });
    }

    /// `from` was renamed to `to`: the data durable under the old name moves with it.
    pub(crate) fn renamed(from: &Path, to: &Path) {
        with(|s| match s.durable_len.remove(from) {
            Some(len) => {
                s.durable_len.insert(to.to_path_buf(), len);
            }
            None => {
                s.durable_len.remove(to);
            }
        });
    }

    /// A file was cut to `len`: nothing at or past it is durable any more.
    pub(crate) fn truncated(path: &Path, len: u64) {
        with(|s| {
            if let Some(d) = s.durable_len.get_mut(path) {
                *d = (*d).min(len);
            }
        });
    }

    /// True (once) if the next segment write in this file's directory must fail.
    pub(crate) fn take_write_failure(path: &Path) -> bool {
        with(|s| s.fail_next_write.remove(&parent(path)))
    }

    /// Makes the next segment write in `dir` write part of its batch and then fail with
    /// `ENOSPC`, as a full disk does.
    pub fn fail_next_write(dir: &Path) {
        with(|s| {
            s.fail_next_write.insert(dir.to_path_buf());
        });
    }

    /// Segment fsyncs made in `dir` so far.
    pub fn segment_fsyncs(dir: &Path) -> u64 {
        with(|s| s.segment_fsyncs.get(dir).copied().unwrap_or(0))
    }

    /// What a power cut removed.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct PowerCut {
        /// Files cut shorter, with the bytes each lost.
        pub truncated: Vec<(PathBuf, u64)>,
        /// Files removed because no directory fsync covered their name.
        pub removed: Vec<PathBuf>,
    }

    /// Rewinds `dir` to what was durable: files cut to their length at their last fsync
    /// (never fsynced: empty), names no directory fsync covered removed. Everything left is
    /// then durable. The caller must have dropped every log open on `dir` first.
    pub fn power_cut(dir: &Path) -> std::io::Result<PowerCut> {
        let mut cut = PowerCut::default();
        with(|s| {
            let names = s.durable_names.remove(dir).unwrap_or_default();
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let path = entry.path();
                if !names.contains(&entry.file_name()) {
                    fs::remove_file(&path)?;
                    s.durable_len.remove(&path);
                    cut.removed.push(path);
                    continue;
                }
                let len = entry.metadata()?.len();
                let durable = s.durable_len.get(&path).copied().unwrap_or(0).min(len);
                if durable < len {
                    fs::OpenOptions::new().write(true).open(&path)?.set_len(durable)?;
                    cut.truncated.push((path.clone(), len - durable));
                }
                s.durable_len.insert(path, durable);
            }
            cut.removed.sort();
            cut.truncated.sort();
            let survivors = fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            s.durable_names.insert(dir.to_path_buf(), survivors);
            Ok(cut)
        })
    }
}
