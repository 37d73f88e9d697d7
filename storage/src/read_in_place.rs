//! Reads that refuse to wait on the disk: `preadv2(RWF_NOWAIT)` returns what the page cache
//! holds and `EAGAIN` instead of starting I/O. The broker tries a tail read this way on its
//! reactor and hands it to a blocking thread only when the bytes are not cached
//! (`PartitionLog::read_up_to_in_place`).

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, TryLockError};

use crate::error::{LogError, Result};

thread_local! {
    /// Set while this thread's segment reads must not wait on the disk.
    static IN_PLACE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `read` with this thread's segment reads refusing to wait on the disk: `None` if one
/// would have had to.
pub(crate) fn without_waiting<T>(read: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_PLACE.set(self.0);
        }
    }
    let _restore = Restore(IN_PLACE.replace(true));
    match read() {
        Ok(v) => Ok(Some(v)),
        Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// A read lock on `lock`; in a [`without_waiting`] scope, `WouldBlock` instead of waiting
/// for a writer (a segment roll syncs an index under its lock, a truncation files).
pub(crate) fn read_lock<'a, T>(lock: &'a RwLock<T>, path: &Path) -> Result<RwLockReadGuard<'a, T>> {
    if !IN_PLACE.get() {
        return Ok(lock.read().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
    match lock.try_read() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(LogError::io("read lock", path)(io::ErrorKind::WouldBlock.into())),
    }
}

/// `pread` of exactly `buf.len()` bytes at `position`; in a [`without_waiting`] scope, a read
/// that would wait on the disk fails with `WouldBlock` instead.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], position: u64) -> io::Result<()> {
    if !IN_PLACE.get() {
        return std::os::unix::fs::FileExt::read_exact_at(file, buf, position);
    }
    read_exact_at_nowait(file, buf, position)
}

#[cfg(target_os = "linux")]
fn read_exact_at_nowait(file: &File, buf: &mut [u8], position: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let at = i64::try_from(position + done as u64).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `iov` points into `rest`, which is live, writable and `iov_len` bytes long
        // for the duration of the call; the descriptor is the open file's.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not cached, or a kernel or file system that cannot tell: the caller reads
                // on a thread that may wait.
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL) => Err(io::ErrorKind::WouldBlock.into()),
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn read_exact_at_nowait(_: &File, _: &mut [u8], _: u64) -> io::Result<()> {
    Err(io::ErrorKind::WouldBlock.into())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_cached_read_in_place_returns_the_bytes_and_the_flag_is_cleared_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = File::create(&path).expect("create");
        f.write_all(b"hello, page cache").expect("write");
        let f = File::open(&path).expect("open");
        let read = without_waiting(|| {
            let mut buf = [0u8; 5];
            read_exact_at(&f, &mut buf, 7).map_err(LogError::io("read", &path))?;
            Ok(buf)
        })
        .expect("no error");
        // Just written: cached, so the read is done in place (None only where the kernel
        // cannot tell, which a Linux of this decade can).
        assert_eq!(read, Some(*b"page "));
        assert!(!IN_PLACE.get(), "the scope ends with the call");
        let past_end = without_waiting(|| {
            let mut buf = [0u8; 5];
            read_exact_at(&f, &mut buf, 100).map_err(LogError::io("read", &path))?;
            Ok(buf)
        });
        assert!(past_end.is_err(), "a read past the end is an error, not a miss");
    }

    /// A segment roll syncs the old segment's index under its write lock, and a truncation
    /// changes the segment list under its own: a read in place does not wait for either.
    #[test]
    fn a_read_in_place_does_not_wait_for_a_writer_of_the_index_or_the_segment_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = crate::PartitionLog::open(dir.path(), crate::LogConfig::default()).expect("open");
        let mut b = crate::batch::BatchBuilder::new(crate::batch::Compression::None);
        b.push(&crate::batch::Record {
            timestamp: 1,
            value: Some(bytes::Bytes::from_static(b"v")),
            ..crate::batch::Record::default()
        });
        log.append(&b.build().expect("batch")).expect("append");
        let end = log.log_end_offset();
        assert!(log.read_up_to_in_place(0, 1 << 20, end).expect("read").is_some());
        let active = log.active();
        let index = active.offset_index_mut();
        assert_eq!(log.read_up_to_in_place(0, 1 << 20, end).expect("read"), None);
        drop(index);
        let segments = log.write_segments();
        let read = std::thread::scope(|s| {
            s.spawn(|| log.read_up_to_in_place(0, 1 << 20, end).expect("read"))
                .join()
                .expect("reader")
        });
        drop(segments);
        assert_eq!(read, None);
        assert!(log.read_up_to_in_place(0, 1 << 20, end).expect("read").is_some());
    }
}
