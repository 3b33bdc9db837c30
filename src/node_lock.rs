//! The node lock: two pulls on one node never overlap.
//!
//! An OS file lock (`flock` via `File::lock`) on `STATE_DIR/node.lock`. The
//! kernel releases it when the holder exits for any reason, so a crashed or
//! SIGKILLed pull never blocks the next one, and there is no stale-lock
//! clean-up to get wrong.
//!
//! Coalescing (the point of waiting rather than failing) lives in `pull`:
//! once the lock is ours, a pull that started after our request was made has
//! already seen everything we would see, so its result is ours too.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// What to do when another pull holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IfBusy {
    /// Wait for it, then coalesce with it when possible.
    #[default]
    Wait,
    /// Give up at once (exit code 3).
    Fail,
}

/// A held node lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub(crate) struct NodeLock {
    _file: File,
}

impl NodeLock {
    /// Takes the lock in `state_dir`, waiting if `if_busy` says so. Returns
    /// the guard and how long it waited.
    pub(crate) async fn acquire(state_dir: &Path, if_busy: IfBusy) -> Result<(NodeLock, Duration)> {
        let path = lock_path(state_dir);
        std::fs::create_dir_all(state_dir).map_err(|e| Error::io(format!("creating state dir {}", state_dir.display()), e))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening node lock {}", path.display()), e))?;
        let start = Instant::now();
        match file.try_lock() {
            Ok(()) => return Ok((NodeLock { _file: file }, Duration::ZERO)),
            Err(std::fs::TryLockError::WouldBlock) if if_busy == IfBusy::Fail => return Err(Error::Busy { path }),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(format!("locking {}", path.display()), e)),
        }
        // A warning, so it is seen by default: a pull that seems to hang is
        // most often this, in a cron log and in the bastion's report alike.
        tracing::warn!(lock = %path.display(), "another pull is running on this node; waiting for it");
        // flock blocks the thread, so it waits on the blocking pool.
        let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .expect("lock task does not panic")
            .map_err(|e| Error::io(format!("locking {}", lock_path(state_dir).display()), e))?;
        Ok((NodeLock { _file: file }, start.elapsed()))
    }
}

fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("node.lock")
}
