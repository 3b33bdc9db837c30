//! The state store: what the agent placed in DEST, kept outside DEST.
//!
//! For every file it wrote, the agent remembers the object's ETag and size
//! and the file's size and mtime as written. That is what makes a no-op pull
//! cost LIST requests only (no HEAD, no GET), catches same-size changes (the
//! ETag moved), repairs local drift (size or mtime moved), and limits
//! deletions to files the agent placed itself.
//!
//! Layout, in `STATE_DIR/dest-<hash of DEST>/`:
//! - `placed.jsonl`: a snapshot, one JSON record per line, replaced
//!   atomically (temp file, fsync, rename) at the end of a pull;
//! - `journal.jsonl`: records appended as files are placed or deleted during
//!   a pull, each with one write(2) of its own (no user-space buffer), so a
//!   SIGKILL loses or tears at most the last line, which loading skips: the
//!   file it described is simply fetched again by the next pull, and a file
//!   placed is never forgotten (and so never left undeleted).
//!
//! Loading replays the journal over the snapshot and immediately compacts,
//! so a journal only ever holds one pull's records.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keypath::RelPath;

/// Marker file present while a pull runs.
const IN_PROGRESS: &str = "in-progress";

/// What the agent knows about one file it placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// The object's ETag (quotes included, as S3 returns it).
    #[serde(rename = "e")]
    pub etag: String,
    /// The object's size; equals `file_size` unless the file drifted.
    #[serde(rename = "s")]
    pub size: u64,
    /// Size of the file as we wrote it.
    #[serde(rename = "fs")]
    pub file_size: u64,
    /// mtime of the file as we wrote it, in nanoseconds since the epoch.
    #[serde(rename = "m")]
    pub mtime_ns: i64,
}

/// One line of the snapshot or journal.
#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(rename = "k")]
    path: String,
    /// `None` records a deletion (journal only).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    placed: Option<Placed>,
}

/// The store for one DEST. The map is only read while planning; writes go
/// through the journal, which a std `Mutex` guards: appends are short and
/// never held across an `.await`, so an async mutex would buy nothing.
pub(crate) struct StateStore {
    dir: PathBuf,
    /// Unbuffered: a record is in the kernel once `append` returns (one
    /// write(2) a file: 10,000 of them cost a few milliseconds on a pull).
    journal: Mutex<File>,
    /// Whether this pull journaled anything; a no-op pull then skips
    /// rewriting (and fsyncing) the snapshot.
    dirty: std::sync::atomic::AtomicBool,
    /// The previous pull did not finish (its in-progress marker was still
    /// there): it may have left temporary files in DEST.
    interrupted: bool,
}

impl StateStore {
    /// Opens (creating) the store for `dest` under `state_dir`, and loads
    /// what it holds.
    pub(crate) fn open(state_dir: &Path, dest: &Path) -> Result<(StateStore, HashMap<RelPath, Placed>)> {
        let dir = StateStore::dir_for(state_dir, dest);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating state dir {}", dir.display()), e))?;
        let mut placed = HashMap::new();
        let snapshot = dir.join("placed.jsonl");
        let journal = dir.join("journal.jsonl");
        let had_journal = journal.exists();
        replay(&snapshot, &mut placed)?;
        replay(&journal, &mut placed)?;
        if had_journal {
            write_snapshot(&dir, &placed)?;
            std::fs::remove_file(&journal).map_err(|e| Error::io(format!("removing {}", journal.display()), e))?;
        }
        Ok((StateStore::attach(dir)?, placed))
    }

    /// The store in `dir`, its journal open for appending.
    fn attach(dir: PathBuf) -> Result<StateStore> {
        let journal = dir.join("journal.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .map_err(|e| Error::io(format!("opening {}", journal.display()), e))?;
        let interrupted = dir.join(IN_PROGRESS).exists();
        Ok(StateStore { dir, journal: Mutex::new(file), dirty: Default::default(), interrupted })
    }

    /// [`StateStore::open`] for a store whose records are at hand already
    /// (read while something else was waited for): when it has no journal
    /// to replay, the records are not read again.
    pub(crate) fn open_loaded(
        state_dir: &Path,
        dest: &Path,
        placed: HashMap<RelPath, Placed>,
    ) -> Result<(StateStore, HashMap<RelPath, Placed>)> {
        let dir = StateStore::dir_for(state_dir, dest);
        if dir.join("journal.jsonl").metadata().is_ok_and(|m| m.len() > 0) || !dir.join("placed.jsonl").exists() {
            return StateStore::open(state_dir, dest);
        }
        Ok((StateStore::attach(dir)?, placed))
    }

    /// Whether the previous pull into this DEST was killed before the end.
    /// The store's directory for `dest`: one per DEST (and per release).
    pub(crate) fn dir_for(state_dir: &Path, dest: &Path) -> PathBuf {
        state_dir.join(format!("dest-{}", dest_id(dest)))
    }

    pub(crate) fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Marks a pull as running; a marker still there at the next start
    /// means the pull was killed.
    pub(crate) fn mark_in_progress(&self) -> Result<()> {
        let p = self.dir.join(IN_PROGRESS);
        File::create(&p).map(drop).map_err(|e| Error::io(format!("writing {}", p.display()), e))
    }

    pub(crate) fn clear_in_progress(&self) {
        let _ = std::fs::remove_file(self.dir.join(IN_PROGRESS));
    }

    /// Loads the state for `dest` without creating or changing anything
    /// (dry runs). Missing state is empty state.
    pub(crate) fn load_read_only(state_dir: &Path, dest: &Path) -> Result<HashMap<RelPath, Placed>> {
        let dir = state_dir.join(format!("dest-{}", dest_id(dest)));
        let mut placed = HashMap::new();
        replay(&dir.join("placed.jsonl"), &mut placed)?;
        replay(&dir.join("journal.jsonl"), &mut placed)?;
        Ok(placed)
    }

    /// Records that `path` now holds `placed`. Call after the rename.
    pub(crate) fn record_placed(&self, path: &RelPath, placed: &Placed) -> Result<()> {
        self.append(&Record { path: path.to_string(), placed: Some(placed.clone()) })
    }

    /// Records that `path` was deleted. Call after the unlink.
    pub(crate) fn record_deleted(&self, path: &RelPath) -> Result<()> {
        self.append(&Record { path: path.to_string(), placed: None })
    }

    fn append(&self, rec: &Record) -> Result<()> {
        let mut line = serde_json::to_vec(rec).expect("records serialize");
        line.push(b'\n');
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        j.write_all(&line).map_err(|e| Error::io(format!("appending to journal in {}", self.dir.display()), e))
    }

    /// Ends a pull: writes the full snapshot atomically and empties the
    /// journal. `placed` is the state after the pull.
    pub(crate) fn compact(&self, placed: &HashMap<RelPath, Placed>) -> Result<()> {
        if !self.dirty.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        write_snapshot(&self.dir, placed)?;
        let journal = self.dir.join("journal.jsonl");
        let j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        j.set_len(0).map_err(|e| Error::io(format!("truncating {}", journal.display()), e))
    }

    /// Starts the store with `placed` as its whole content (a release seeded
    /// with hard links from the one before it).
    pub(crate) fn seed(&self, placed: &HashMap<RelPath, Placed>) -> Result<()> {
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        self.compact(placed)
    }
}

/// A stable short name for DEST, so one state dir can serve several DESTs.
fn dest_id(dest: &Path) -> String {
    use md5::{Digest, Md5};
    let abs = std::path::absolute(dest).unwrap_or_else(|_| dest.to_path_buf());
    hex::encode(&Md5::digest(abs.as_os_str().as_encoded_bytes())[..8])
}

fn replay(path: &Path, placed: &mut HashMap<RelPath, Placed>) -> Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::new();
    while r.read_until(b'\n', &mut line).map_err(|e| Error::io(format!("reading {}", path.display()), e))? > 0 {
        // A torn or foreign line is skipped: the file it describes is then
        // unknown, and unknown files are fetched again, which is safe.
        if let Ok(rec) = serde_json::from_slice::<RecordIn>(&line) {
            if let Some(rel) = RelPath::from_stored(&rec.k) {
                match (rec.e, rec.s, rec.fs, rec.m) {
                    (Some(etag), Some(size), Some(file_size), Some(mtime_ns)) => {
                        placed.insert(rel, Placed { etag, size, file_size, mtime_ns });
                    }
                    // A deletion, or a record of another shape: the path
                    // is then unknown (as before records were read field
                    // by field).
                    _ => {
                        placed.remove(&rel);
                    }
                }
            }
        }
        line.clear();
    }
    Ok(())
}

/// A [`Record`] as read: its fields one by one, the path borrowed from the
/// line. (`#[serde(flatten)]` reads each line through an intermediate map,
/// several times slower, and a deploy reads a hundred thousand of them
/// before its switch.)
#[derive(Deserialize)]
struct RecordIn<'a> {
    #[serde(borrow)]
    k: std::borrow::Cow<'a, str>,
    e: Option<String>,
    s: Option<u64>,
    fs: Option<u64>,
    m: Option<i64>,
}

fn write_snapshot(dir: &Path, placed: &HashMap<RelPath, Placed>) -> Result<()> {
    let tmp = dir.join("placed.jsonl.tmp");
    let dst = dir.join("placed.jsonl");
    let err = |e| Error::io(format!("writing {}", tmp.display()), e);
    let mut out = BufWriter::new(File::create(&tmp).map_err(err)?);
    let mut entries: Vec<_> = placed.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (path, p) in entries {
        let mut line = serde_json::to_vec(&Record { path: path.to_string(), placed: Some(p.clone()) }).expect("records serialize");
        line.push(b'\n');
        out.write_all(&line).map_err(err)?;
    }
    let file = out.into_inner().map_err(|e| err(e.into_error()))?;
    crate::safe_fs::commit_state_file(file, &tmp, &dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::from_stored(s).unwrap()
    }

    fn p(etag: &str) -> Placed {
        Placed { etag: etag.into(), size: 3, file_size: 3, mtime_ns: 42 }
    }

    #[test]
    fn journal_survives_without_compaction_and_torn_lines_are_skipped() {
        let state = tempfile::tempdir().unwrap();
        let dest = Path::new("/srv/www");
        {
            let (s, m) = StateStore::open(state.path(), dest).unwrap();
            assert!(m.is_empty());
            s.record_placed(&rel("a"), &p("\"1\"")).unwrap();
            s.record_placed(&rel("b/c"), &p("\"2\"")).unwrap();
            s.record_deleted(&rel("a")).unwrap();
            // A SIGKILL mid-append: no destructor runs (nothing is flushed
            // on the way out), and the last record is torn.
            let j = s.dir.join("journal.jsonl");
            let mut f = OpenOptions::new().append(true).open(j).unwrap();
            f.write_all(b"{\"k\":\"x\",\"e\":").unwrap();
            std::mem::forget(s);
        }
        let (s, m) = StateStore::open(state.path(), dest).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[&rel("b/c")], p("\"2\""));
        // The journal was compacted into the snapshot on load.
        assert_eq!(std::fs::metadata(s.dir.join("journal.jsonl")).unwrap().len(), 0);
    }

    #[test]
    fn compact_replaces_the_snapshot() {
        let state = tempfile::tempdir().unwrap();
        let dest = Path::new("/srv/www");
        let (s, _) = StateStore::open(state.path(), dest).unwrap();
        let mut m = HashMap::new();
        m.insert(rel("z"), p("\"9\""));
        s.record_placed(&rel("z"), &p("\"9\"")).unwrap();
        s.compact(&m).unwrap();
        drop(s);
        let (_, loaded) = StateStore::open(state.path(), dest).unwrap();
        assert_eq!(loaded, m);
    }

    #[test]
    fn a_tampered_state_cannot_point_outside_dest() {
        let state = tempfile::tempdir().unwrap();
        let dest = Path::new("/srv/www");
        let (s, _) = StateStore::open(state.path(), dest).unwrap();
        std::fs::write(s.dir.join("placed.jsonl"), "{\"k\":\"../../etc/passwd\",\"e\":\"x\",\"s\":1,\"fs\":1,\"m\":1}\n").unwrap();
        drop(s);
        let (_, loaded) = StateStore::open(state.path(), dest).unwrap();
        assert!(loaded.is_empty());
    }
}
