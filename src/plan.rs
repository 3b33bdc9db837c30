//! PLAN: decides, for each listed object, whether to fetch it, and at the
//! end which placed files to delete.
//!
//! A file is fetched when it is new to us, when its ETag changed (this is
//! what catches a same-size edit that size+mtime tools miss), or when the
//! file on disk no longer matches what we wrote (local drift is repaired).
//! Everything else costs no request at all.
//!
//! The planner runs on a blocking thread: it `lstat`s every listed file, and
//! 100,000 stats are better done in one thread than as 100,000 tasks.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::keypath::{map_key, Entry, RelPath};
use crate::list::RemoteObject;
use crate::safe_fs::DestDir;
use crate::state::Placed;

/// One object to download.
#[derive(Debug, Clone)]
pub(crate) struct FetchJob {
    pub key: String,
    pub path: RelPath,
    pub etag: String,
    pub size: u64,
    /// Why: a new file, a changed object, or local drift.
    pub reason: FetchReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FetchReason {
    New,
    Changed,
    Drifted,
}

/// What the whole listing implies once it is complete.
#[derive(Debug)]
pub(crate) struct PlanEnd {
    /// Files we placed earlier that are no longer in the source.
    pub deletions: Vec<RelPath>,
    /// Directory markers in the source.
    pub dirs: HashSet<RelPath>,
    /// The loaded state, handed back for the switch step to update.
    pub placed: HashMap<RelPath, Placed>,
}

pub(crate) struct Planner<'a> {
    prefix: String,
    dest: Option<&'a DestDir>,
    placed: HashMap<RelPath, Placed>,
    files: HashSet<RelPath>,
    dirs: HashSet<RelPath>,
    pub listed: u64,
    pub unchanged: u64,
}

impl<'a> Planner<'a> {
    /// `dest` is `None` when DEST does not exist yet (a dry run of a first
    /// pull): every file is then new.
    pub(crate) fn new(prefix: &str, dest: Option<&'a DestDir>, placed: HashMap<RelPath, Placed>) -> Planner<'a> {
        Planner { prefix: prefix.to_string(), dest, placed, files: HashSet::new(), dirs: HashSet::new(), listed: 0, unchanged: 0 }
    }

    /// Plans one LIST page. A hostile key fails the whole pull.
    pub(crate) fn plan_page(&mut self, page: Vec<RemoteObject>) -> Result<Vec<FetchJob>> {
        let mut jobs = Vec::new();
        for obj in page {
            let path = match map_key(&obj.key, &self.prefix)? {
                None => continue,
                Some(Entry::Dir(d)) => {
                    self.dirs.insert(d);
                    continue;
                }
                Some(Entry::File(p)) => p,
            };
            self.listed += 1;
            let reason = match self.placed.get(&path) {
                None => Some(FetchReason::New),
                Some(p) if p.etag != obj.etag || p.size != obj.size => Some(FetchReason::Changed),
                Some(p) => match self.on_disk(&path) {
                    Some((size, mtime)) if size == p.file_size && mtime == p.mtime_ns => None,
                    _ => Some(FetchReason::Drifted),
                },
            };
            match reason {
                None => self.unchanged += 1,
                Some(reason) => jobs.push(FetchJob { key: obj.key, path: path.clone(), etag: obj.etag, size: obj.size, reason }),
            }
            self.files.insert(path);
        }
        Ok(jobs)
    }

    /// `(size, mtime_ns)` of a regular file at `path`, without following
    /// symlinks; `None` if it is missing or not a regular file.
    fn on_disk(&self, path: &RelPath) -> Option<(u64, i64)> {
        let st = self.dest?.stat(path).ok()??;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return None;
        }
        Some((st.st_size as u64, st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64))
    }

    /// Closes the plan once the listing is complete: refuses a source where
    /// one path is both a file and a directory, and lists deletions.
    pub(crate) fn finish(self, delete: bool) -> Result<PlanEnd> {
        let file_and_dir =
            |path: &RelPath, reason: &str| Error::HostileKey { key: format!("{}{}", self.prefix, path), reason: reason.to_string() };
        for path in self.files.iter().chain(self.dirs.iter()) {
            if let Some(a) = path.ancestors().find(|a| self.files.contains(*a)) {
                return Err(file_and_dir(path, &format!("'{a}' is also a file in the source; a path cannot be both")));
            }
        }
        if let Some(d) = self.dirs.iter().find(|d| self.files.contains(*d)) {
            return Err(file_and_dir(d, "it is both a file and a directory marker in the source"));
        }
        let mut deletions: Vec<RelPath> =
            if delete { self.placed.keys().filter(|p| !self.files.contains(*p)).cloned().collect() } else { Vec::new() };
        // Deepest first, so that emptied directories are pruned bottom-up.
        deletions.sort_by(|a, b| b.cmp(a));
        Ok(PlanEnd { deletions, dirs: self.dirs, placed: self.placed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, etag: &str, size: u64) -> RemoteObject {
        RemoteObject { key: key.into(), etag: etag.into(), size }
    }

    fn rel(s: &str) -> RelPath {
        RelPath::from_stored(s).unwrap()
    }

    #[test]
    fn new_changed_and_same_size_changes_are_fetched() {
        let mut placed = HashMap::new();
        placed.insert(rel("same"), Placed { etag: "\"a\"".into(), size: 3, file_size: 3, mtime_ns: 1 });
        placed.insert(rel("gone"), Placed { etag: "\"g\"".into(), size: 3, file_size: 3, mtime_ns: 1 });
        let mut p = Planner::new("p/", None, placed);
        let jobs = p.plan_page(vec![obj("p/new", "\"n\"", 1), obj("p/same", "\"b\"", 3), obj("p/dir/", "", 0)]).unwrap();
        let reasons: Vec<_> = jobs.iter().map(|j| (j.path.to_string(), j.reason)).collect();
        assert_eq!(reasons, [("new".into(), FetchReason::New), ("same".into(), FetchReason::Changed)]);
        let end = p.finish(true).unwrap();
        assert_eq!(end.deletions, [rel("gone")]);
        assert!(end.dirs.contains(&rel("dir")));
    }

    #[test]
    fn no_delete_keeps_everything() {
        let mut placed = HashMap::new();
        placed.insert(rel("gone"), Placed { etag: "\"g\"".into(), size: 3, file_size: 3, mtime_ns: 1 });
        let p = Planner::new("", None, placed);
        assert!(p.finish(false).unwrap().deletions.is_empty());
    }

    #[test]
    fn a_path_that_is_both_file_and_directory_is_refused() {
        let mut p = Planner::new("", None, HashMap::new());
        p.plan_page(vec![obj("a", "\"1\"", 1), obj("a/b", "\"2\"", 1)]).unwrap();
        let e = p.finish(true).unwrap_err().to_string();
        assert!(e.contains("a/b") && e.contains("both"), "{e}");

        let mut p = Planner::new("", None, HashMap::new());
        p.plan_page(vec![obj("a", "\"1\"", 1), obj("a/", "", 0)]).unwrap();
        assert!(p.finish(true).is_err());
    }

    #[test]
    fn a_hostile_key_fails_the_page() {
        let mut p = Planner::new("", None, HashMap::new());
        let e = p.plan_page(vec![obj("ok", "\"1\"", 1), obj("../x", "\"2\"", 1)]).unwrap_err();
        assert!(e.to_string().contains("../x"));
    }
}
