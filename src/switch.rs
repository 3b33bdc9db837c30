//! SWITCH: makes verified downloads live, and removes what the source dropped.
//!
//! In-place mode switches file by file: each rename from the staging
//! directory is atomic, so a reader sees a file's old content or its new
//! content, never a partial one. Nothing is renamed before the whole listing
//! has been planned and validated (the [`Gate`]): a hostile key on page 90
//! must leave DEST untouched even though pages 1-89 were already downloading.

use std::collections::HashSet;

use tokio::sync::watch;

use crate::keypath::RelPath;
use crate::safe_fs::{DestDir, TempName};
use crate::state::{Placed, StateStore};

/// A verified download waiting in the staging directory.
#[derive(Debug)]
pub(crate) struct Staged {
    /// The temporary file holding the content.
    pub temp: TempName,
    /// What the state store will record once it is renamed into place.
    pub placed: Placed,
}

/// Whether staged downloads may be renamed into place yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    /// The listing is still being validated: hold staged files.
    Closed,
    /// The plan is valid and deletions are done: rename.
    Open,
    /// The pull failed as a whole: discard staged files.
    Aborted,
}

/// The gate between fetching and switching. A `watch` channel because any
/// number of download tasks wait on one state change, and can also read the
/// current state without waiting.
pub(crate) struct Gate {
    tx: watch::Sender<GateState>,
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate { tx: watch::channel(GateState::Closed).0 }
    }

    pub(crate) fn open(&self) {
        self.tx.send_replace(GateState::Open);
    }

    pub(crate) fn abort(&self) {
        self.tx.send_replace(GateState::Aborted);
    }

    pub(crate) fn waiter(&self) -> GateWaiter {
        GateWaiter { rx: self.tx.subscribe() }
    }
}

impl Drop for Gate {
    /// A gate dropped without a decision (the pull future was cancelled)
    /// aborts, so no waiting task renames anything afterwards.
    fn drop(&mut self) {
        if *self.tx.borrow() == GateState::Closed {
            self.abort();
        }
    }
}

#[derive(Clone)]
pub(crate) struct GateWaiter {
    rx: watch::Receiver<GateState>,
}

impl GateWaiter {
    /// Whether the gate is open now (downloads then create their temporary
    /// file beside the final path).
    pub(crate) fn is_open(&self) -> bool {
        *self.rx.borrow() == GateState::Open
    }

    /// Waits for the decision; `true` means rename.
    pub(crate) async fn wait(mut self) -> bool {
        match self.rx.wait_for(|s| *s != GateState::Closed).await {
            Ok(s) => *s == GateState::Open,
            Err(_) => false,
        }
    }
}

/// Renames a staged file to `path` and records it. Blocking.
pub(crate) fn commit(dest: &DestDir, state: &StateStore, staged: &Staged, path: &RelPath) -> Result<(), String> {
    if let Err(e) = dest.commit(&staged.temp, path) {
        dest.discard(&staged.temp);
        return Err(format!("placing {} in {}: {e}", path, dest.path().display()));
    }
    state.record_placed(path, &staged.placed).map_err(|e| e.to_string())
}

/// Deletes files we placed that the source no longer has, pruning the
/// directories this empties (but not directory markers the source still
/// has). Returns the paths deleted and the failures. Blocking.
pub(crate) fn delete(
    dest: &DestDir,
    state: &StateStore,
    deletions: &[RelPath],
    dirs: &HashSet<RelPath>,
) -> (Vec<RelPath>, Vec<(RelPath, String)>) {
    let keep = |d: &str| dirs.contains(d);
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for path in deletions {
        match dest.remove_file(path, &keep) {
            Ok(()) => match state.record_deleted(path) {
                Ok(()) => done.push(path.clone()),
                Err(e) => failed.push((path.clone(), e.to_string())),
            },
            Err(e) => failed.push((path.clone(), format!("deleting {path}: {e}"))),
        }
    }
    // Directory markers: make sure each exists.
    for d in dirs {
        if let Err(e) = dest.make_dir(d) {
            failed.push((d.clone(), format!("creating directory {d}: {e}")));
        }
    }
    (done, failed)
}
