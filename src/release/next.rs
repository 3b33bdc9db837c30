//! NEXT: what makes a small change, and a no-op, cost what changed rather
//! than the size of the tree: the next release's unchanged part made ahead
//! of time, and when the live release was last checked for drift.
//!
//! - **The next release, staged.** Once a store release is live and
//!   checked whole (by a pull that found it live: the timer's, after a
//!   deploy), its published files are hard-linked into
//!   `DEST/releases/.next`, its directories and symlinks made, its state
//!   records copied: `cp -al` of the release, at the pull's (low) priority,
//!   out of any deploy's way. `next.json` names the release it copies. The
//!   next build of a store release from that live release renames `.next`
//!   to the new release and applies the two manifests' differences alone:
//!   the unchanged files are not linked, stat-ed or recorded again, so a
//!   1% change writes 1% of the tree before it switches. Anything else
//!   (another live release, a stamp or a directory missing: a second
//!   deploy before a timer's pull) and the build links from the live
//!   release as before.
//! - **The drift check, on a schedule.** A pull that finds its release
//!   live and checked within `verify_every` trusts it: one request and a
//!   few small reads. The full check (a stat per file against the state
//!   store and a walk for what should not be there) runs on the first pull
//!   after `verify_every` has passed, on the first pull after a release
//!   built from the staged copy went live, and on every pull with
//!   `--verify-every 0`; what it finds, that pull repairs. (A release built
//!   fresh went live checked: each file it shares was stat-ed as it was
//!   linked.) A file changed under the live release therefore stays at
//!   most `verify_every` plus the pull timer's interval (docs/agent.md).
//!
//! Staged files share their inodes with the live release: one that the
//! application rewrites in place changes in `.next` too, and so in the
//! release built from it; the first pull after that release's switch
//! checks it and repairs it. A repair of the live release drops the
//! staged copy (it may hold what was repaired).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::from_store::Shape;
use super::layout::{Layout, Releases};
use crate::error::{Error, Result};
use crate::keypath::RelPath;
use crate::state::StateStore;

/// The staged release's directory name in `releases/` (a dot name: never
/// a release id, which `check_release_id` keeps to other names).
pub(super) const NEXT: &str = ".next";

/// A state store's records, as loaded.
pub(super) type Records = std::collections::HashMap<RelPath, crate::state::Placed>;

/// `next.json`: the live release `.next` is a copy of, laid out as [`key`] says.
#[derive(Serialize, Deserialize)]
struct Stamp {
    from: String,
    key: String,
}

/// `verified.json`: the release whose files the last full check found
/// whole, laid out as [`key`] says, and when (ms since the epoch).
#[derive(Serialize, Deserialize)]
struct Verified {
    release: String,
    key: String,
    at_ms: u64,
}

/// What a check or a staged copy holds only for: the shared paths and the
/// owner it was made with (others given now mean laying the release out
/// again, which the full check does).
pub(super) fn key(opts: &super::ReleaseOptions) -> String {
    let shared: Vec<String> = opts.shared.iter().map(super::from_store::spec).collect();
    format!("shared={shared:?} owner={:?}", opts.pull.owner)
}

fn stamp_path(layout: &Layout) -> std::path::PathBuf {
    layout.state.join("next.json")
}

fn verified_path(layout: &Layout) -> std::path::PathBuf {
    layout.state.join("verified.json")
}

/// Whether release `id` was checked whole within `every`.
pub(super) fn verified_within(layout: &Layout, id: &str, key: &str, every: Duration) -> bool {
    let Some(v) = std::fs::read(verified_path(layout)).ok().and_then(|b| serde_json::from_slice::<Verified>(&b).ok()) else {
        return false;
    };
    let age = crate::store::now_ms().saturating_sub(v.at_ms);
    v.release == id && v.key == key && !every.is_zero() && age < every.as_millis() as u64
}

/// Records that release `id` was just checked whole. Best effort: a
/// record that cannot be written means one more full check.
pub(super) fn mark_verified(layout: &Layout, id: &str, key: &str) {
    let v = Verified { release: id.to_string(), key: key.to_string(), at_ms: crate::store::now_ms() };
    if let Err(e) = crate::safe_fs::write_state_file(&verified_path(layout), &serde_json::to_vec(&v).expect("serializes")) {
        tracing::warn!(error = %e, "could not record the drift check; the next pull checks again");
    }
}

/// Forgets the last check and the staged copy's stamp: the live release
/// (and what was staged from it, which shares its inodes) changed or may
/// have; the next pull checks it in full and stages again.
pub(super) fn distrust(layout: &Layout) {
    let _ = std::fs::remove_file(verified_path(layout));
    drop_stamp(layout);
}

/// Forgets what `.next` is a copy of (it is then never taken).
pub(super) fn drop_stamp(layout: &Layout) {
    let _ = std::fs::remove_file(stamp_path(layout));
}

/// Removes the staged release, its state store and its stamp, if any.
pub(super) fn discard(layout: &Layout, releases: &Releases) -> Result<()> {
    drop_stamp(layout);
    releases.remove(NEXT)?;
    layout.forget(NEXT);
    Ok(())
}

/// Stages the next release from live release `live` (see the module doc):
/// replaces what was staged. Returns the files linked.
pub(super) fn prepare(layout: &Layout, releases: &Releases, state_dir: &Path, live: &str, key: &str) -> Result<u64> {
    discard(layout, releases)?;
    let live_path = layout.dir(live);
    let (Some(shape), Some(src)) = (Shape::load(state_dir, &live_path), releases.read(live)?) else {
        return Ok(0);
    };
    let placed = StateStore::load_read_only(state_dir, &live_path)?;
    let dst = releases.build(NEXT)?;
    let next_path = layout.dir(NEXT);
    let err = |what: &str, e: std::io::Error| Error::io(format!("staging the next release in {}: {what}", next_path.display()), e);
    // Parents before children: the shape's directories are sorted.
    for d in shape.dirs.iter().filter(|d| !d.is_empty()) {
        let rel = RelPath::from_stored(d).ok_or_else(|| err(d, std::io::Error::other("not a relative path")))?;
        dst.make_dir(&rel).map_err(|e| err(d, e))?;
    }
    for (i, (path, target)) in shape.symlinks.iter().enumerate() {
        let rel = RelPath::from_stored(path).ok_or_else(|| err(path, std::io::Error::other("not a relative path")))?;
        dst.symlink(&rel, target, i as u64).map_err(|e| err(path, e))?;
    }
    for path in placed.keys() {
        dst.link_from(&src, path).map_err(|e| err(path.as_str(), e))?;
    }
    let (state, _) = StateStore::open(state_dir, &next_path)?;
    state.seed(&placed)?;
    Shape { made: Default::default(), ..shape }.save(state_dir, &next_path)?;
    // Written back now, while nothing waits: a deploy's switch syncs the
    // file system, and should wait for what that deploy wrote alone.
    releases.sync()?;
    crate::safe_fs::write_state_file(
        &stamp_path(layout),
        &serde_json::to_vec(&Stamp { from: live.to_string(), key: key.to_string() }).expect("serializes"),
    )?;
    Ok(placed.len() as u64)
}

/// Makes the staged copy of live release `live` the build directory of
/// release `id` (its state store and shape with it), if there is one;
/// otherwise drops whatever was staged. The staged copy's shape, when it
/// did.
pub(super) fn take(layout: &Layout, releases: &Releases, state_dir: &Path, live: &str, id: &str, key: &str) -> Result<Option<Shape>> {
    let fits = stamp(layout).is_some_and(|s| s.from == live && s.key == key) && releases.read(NEXT)?.is_some();
    let Some(shape) = Shape::load(state_dir, &layout.dir(NEXT)).filter(|_| fits) else {
        discard(layout, releases)?;
        return Ok(None);
    };
    // The stamp goes first: a kill after it leaves a `.next` that nothing
    // trusts. The release directory next: a kill after it leaves an
    // unregistered `releases/ID`, which the next pull's sweep removes with
    // its state (none yet), while `.next`'s state stays `.next`'s.
    std::fs::remove_file(stamp_path(layout)).map_err(|e| Error::io(format!("removing {}", stamp_path(layout).display()), e))?;
    let (from, to) = (StateStore::dir_for(state_dir, &layout.dir(NEXT)), StateStore::dir_for(state_dir, &layout.dir(id)));
    let _ = std::fs::remove_dir_all(&to);
    releases.rename(NEXT, id)?;
    std::fs::rename(&from, &to).map_err(|e| Error::io(format!("moving {} to {}", from.display(), to.display()), e))?;
    Ok(Some(shape))
}

/// Starts reading the records of the staged copy of `live`, when there
/// is one: a hundred thousand lines for as many files, read while the
/// manifest downloads. Only a pull that builds a new release asks: a
/// no-op would wait for the read at exit (a runtime's blocking tasks
/// cannot be cancelled) and use none of it.
pub(super) fn preload(layout: &Layout, state_dir: &Path, live: &str) -> Option<tokio::task::JoinHandle<Result<Records>>> {
    staged_from(layout, live).then(|| {
        let (state_dir, path) = (state_dir.to_path_buf(), layout.dir(NEXT));
        tokio::task::spawn_blocking(move || StateStore::load_read_only(&state_dir, &path))
    })
}

/// Whether a staged copy of `live` is waiting.
pub(super) fn staged_from(layout: &Layout, live: &str) -> bool {
    stamp(layout).is_some_and(|s| s.from == live)
}

/// The staged copy's stamp, if there is one that can be read.
fn stamp(layout: &Layout) -> Option<Stamp> {
    serde_json::from_slice(&std::fs::read(stamp_path(layout)).ok()?).ok()
}
