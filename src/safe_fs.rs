//! File-system operations inside DEST that never follow a symlink.
//!
//! Everything below DEST is reached by walking from an open directory
//! descriptor one component at a time with `openat(O_NOFOLLOW|O_DIRECTORY)`,
//! then acting with the `*at` calls on the final directory. A symlink planted
//! anywhere inside DEST (say `DEST/assets -> /etc`) therefore makes that one
//! file fail with an error instead of redirecting the write. DEST itself is
//! opened normally: it is the operator's choice and may be a symlink.
//!
//! rustix is used rather than cap-std because cap-std follows symlinks that
//! stay inside the sandbox, and we want none followed at all.
//!
//! The agent's own state files (outside DEST, in its state directory) are
//! replaced here too, durably: [`write_state_file`] and [`commit_state_file`].

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::keypath::{RelPath, STAGING_DIR, TEMP_PREFIX};
use crate::owner::Owner;

/// Mode of directories we create. Directory markers carry no mode we trust.
const DIR_MODE: u32 = 0o755;
/// Directory descriptors kept open. Far below the usual RLIMIT_NOFILE of
/// 1024, leaving room for 64 downloads' files and the HTTP connections.
const DIR_CACHE: usize = 512;

/// An open DEST, its staging directory, and a cache of open directories.
///
/// Owning the descriptors (rather than re-opening paths) is what makes the
/// walk immune to DEST's ancestors being swapped while we work.
#[derive(Debug)]
pub(crate) struct DestDir {
    root: Arc<OwnedFd>,
    /// `None` when opened read-only (dry runs): nothing may be written then.
    staging: Option<Arc<OwnedFd>>,
    path: PathBuf,
    /// Directories below DEST already walked (without following symlinks),
    /// by relative path, so that placing 10,000 files does not walk their
    /// parents 10,000 times. A std Mutex: held for a map lookup or insert
    /// only, never across a system call or an `.await`.
    dirs: Mutex<HashMap<String, Arc<OwnedFd>>>,
    /// `--owner`: every file and directory made here is chowned to it as
    /// it is created, before it has its final name.
    owner: Option<Owner>,
}

/// A temporary file's name and the directory it was created in.
#[derive(Debug)]
pub(crate) struct TempName {
    dir: Arc<OwnedFd>,
    name: String,
}

/// Where to create a temporary file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TempAt<'a> {
    /// In `DEST/.fleetsync.tmp/`: creates nothing else in DEST, for
    /// downloads that finish before the whole listing has been validated.
    Staging,
    /// Beside the file's final path, creating its parent directories: the
    /// rename is then within one directory, which Linux does without the
    /// file-system-wide lock a cross-directory rename takes.
    Beside(&'a RelPath),
}

pub(crate) fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl DestDir {
    /// Opens (creating if needed) DEST and a fresh staging directory in it.
    /// A staging directory left by a killed pull is removed first: its files
    /// were never renamed into place, so they are garbage by definition.
    pub(crate) fn open(path: &Path) -> std::io::Result<DestDir> {
        std::fs::create_dir_all(path)?;
        let root = open_root(path)?;
        remove_tree_at(&root, STAGING_DIR)?;
        rfs::mkdirat(&root, STAGING_DIR, Mode::from_raw_mode(0o700))?;
        let staging = rfs::openat(&root, STAGING_DIR, dir_flags(), Mode::empty())?;
        Ok(DestDir {
            root: Arc::new(root),
            staging: Some(Arc::new(staging)),
            path: path.to_path_buf(),
            dirs: Default::default(),
            owner: None,
        })
    }

    /// Opens (creating) the directory `name` in `parent` as a DEST of its
    /// own (a release being built), without following a symlink at `name`;
    /// `path` is how it is named in messages.
    pub(crate) fn open_in(parent: &OwnedFd, name: &str, path: PathBuf, owner: Option<Owner>) -> std::io::Result<DestDir> {
        let root = open_dir_at(parent, name, true, owner)?;
        remove_tree_at(&root, STAGING_DIR)?;
        rfs::mkdirat(&root, STAGING_DIR, Mode::from_raw_mode(0o700))?;
        let staging = rfs::openat(&root, STAGING_DIR, dir_flags(), Mode::empty())?;
        Ok(DestDir { root: Arc::new(root), staging: Some(Arc::new(staging)), path, dirs: Default::default(), owner })
    }

    /// Opens the directory `name` in `parent` for reading only, without
    /// following a symlink at `name`; `None` when it does not exist.
    pub(crate) fn open_read_only_in(parent: &OwnedFd, name: &str, path: PathBuf) -> std::io::Result<Option<DestDir>> {
        match open_dir_at(parent, name, false, None) {
            Ok(root) => Ok(Some(DestDir { root: Arc::new(root), staging: None, path, dirs: Default::default(), owner: None })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens DEST for looking only (dry runs): creates nothing, and `None`
    /// when DEST does not exist yet.
    pub(crate) fn open_read_only(path: &Path) -> std::io::Result<Option<DestDir>> {
        match open_root(path) {
            Ok(root) => {
                Ok(Some(DestDir { root: Arc::new(root), staging: None, path: path.to_path_buf(), dirs: Default::default(), owner: None }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// What is made here from now on belongs to `owner` (`--owner`).
    pub(crate) fn with_owner(mut self, owner: Option<Owner>) -> DestDir {
        self.owner = owner;
        self
    }

    /// Creates a new temporary file with a unique name.
    pub(crate) fn create_temp(&self, at: TempAt<'_>, seq: u64) -> std::io::Result<(File, TempName)> {
        let dir = match at {
            TempAt::Staging => self.staging.clone().ok_or_else(|| std::io::Error::other("DEST was opened read-only"))?,
            TempAt::Beside(path) => self.dir_fd(&path.split_parent().0, true)?,
        };
        let name = format!("{TEMP_PREFIX}{seq:x}-{:08x}", rand::random::<u32>());
        let fd = rfs::openat(
            &*dir,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        if let Some(o) = self.owner {
            if let Err(e) = rfs::fchown(&fd, Some(uid(o)), Some(gid(o))) {
                let _ = rfs::unlinkat(&*dir, name.as_str(), AtFlags::empty());
                return Err(owner_error(e, o));
            }
        }
        Ok((File::from(fd), TempName { dir, name }))
    }

    /// Removes a temporary file (a download that failed or was abandoned).
    pub(crate) fn discard(&self, temp: &TempName) {
        let _ = rfs::unlinkat(&*temp.dir, temp.name.as_str(), AtFlags::empty());
    }

    /// Renames a finished temporary file to `path`, creating parent
    /// directories as needed. The rename replaces whatever entry is at
    /// `path` (a file or a symlink: the link itself is replaced, never
    /// followed) atomically, so a reader sees the old content or the new,
    /// never a mix.
    pub(crate) fn commit(&self, temp: &TempName, path: &RelPath) -> std::io::Result<()> {
        let (parents, file_name) = path.split_parent();
        let parent = self.dir_fd(&parents, true)?;
        rfs::renameat(&*temp.dir, temp.name.as_str(), &*parent, file_name).map_err(|e| match e {
            Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST => {
                std::io::Error::other("a directory is in the way of this file (not placed by fleetsync)")
            }
            e => e.into(),
        })
    }

    /// Creates the directory `path` (a directory marker) and its parents.
    pub(crate) fn make_dir(&self, path: &RelPath) -> std::io::Result<()> {
        let parts: Vec<&str> = path.components().collect();
        self.dir_fd(&parts, true).map(drop)
    }

    /// Gives the directory `path` the group write bit (a release's
    /// group-writable directory), through no symlink (one on the way, or at
    /// `path`, is an error); nothing when nothing is there.
    pub(crate) fn add_group_write(&self, path: &RelPath) -> std::io::Result<()> {
        let parts: Vec<&str> = path.components().collect();
        let dir = match self.dir_fd(&parts, false) {
            Ok(dir) => dir,
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let st = rfs::fstat(&*dir)?;
        rfs::fchmod(&*dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o020)).map_err(Into::into)
    }

    /// `lstat` of `path`, without following any symlink on the way.
    /// `Ok(None)` when something on the way does not exist or is not a
    /// directory we may enter.
    pub(crate) fn stat(&self, path: &RelPath) -> std::io::Result<Option<rfs::Stat>> {
        let (parents, file_name) = path.split_parent();
        let parent = match self.dir_fd(&parents, false) {
            Ok(dir) => dir,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rfs::statat(&*parent, file_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every entry below DEST, parents before children, by path relative to
    /// it, walked with `openat(O_NOFOLLOW)` from DEST's descriptor: how a
    /// release is compared with all it should hold (an extra file, an
    /// empty directory, a changed symlink). fleetsync's staging directory
    /// and temporary files are not listed; a name that is not UTF-8 is
    /// listed lossily (it matches nothing a manifest names).
    pub(crate) fn walk(&self) -> std::io::Result<Vec<(String, OnDisk)>> {
        let mut out = Vec::new();
        walk_at(&self.root, "", &mut out)?;
        Ok(out)
    }

    /// Renames what is at `path` to `name` beside it (same directory), not
    /// following a symlink; what is at `name` already makes it fail.
    pub(crate) fn rename_beside(&self, path: &RelPath, name: &str) -> std::io::Result<()> {
        let (parents, file_name) = path.split_parent();
        let dir = self.dir_fd(&parents, false)?;
        rfs::renameat_with(&*dir, file_name, &*dir, name, rfs::RenameFlags::NOREPLACE).map_err(Into::into)
    }

    /// Removes whatever is at `path`, a directory with all it holds,
    /// without following a symlink; nothing there is not an error. Parent
    /// directories stay.
    pub(crate) fn remove_any(&self, path: &RelPath) -> std::io::Result<()> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let (parents, name) = path.split_parent();
        match self.dir_fd(&parents, false) {
            Ok(parent) => remove_tree_at(&parent, name),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copies what is at `path` in `from` (a file, a symlink, or a
    /// directory with all it holds) to `path` here, without following a
    /// symlink on either side: files and directories with their mode and
    /// owner (`--owner` instead when this DEST has one: what the
    /// application wrote stays writable by it), symlinks as symlinks. Never
    /// hard links: a copy shares no inode with `from`. The number of files
    /// copied.
    pub(crate) fn copy_in(&self, from: &DestDir, path: &RelPath) -> std::io::Result<u64> {
        let mut copied = 0;
        let Some(st) = from.stat(path)? else { return Ok(0) };
        let mut entries = vec![(path.as_str().to_string(), kind_of(&st, from, path)?)];
        if matches!(entries[0].1, OnDisk::Dir) {
            let parts: Vec<&str> = path.components().collect();
            let dir = from.dir_fd(&parts, false)?;
            let mut below = Vec::new();
            walk_at(&dir, "", &mut below)?;
            entries.extend(below.into_iter().map(|(p, kind)| (format!("{path}/{p}"), kind)));
        }
        for (i, (p, kind)) in entries.into_iter().enumerate() {
            let rel = RelPath::from_stored(&p).ok_or_else(|| std::io::Error::other(format!("{p:?} cannot be copied safely")))?;
            match kind {
                OnDisk::Dir => {
                    self.make_dir(&rel)?;
                    if let Some(st) = from.stat(&rel)? {
                        let parts: Vec<&str> = rel.components().collect();
                        let dir = self.dir_fd(&parts, false)?;
                        rfs::fchmod(&*dir, Mode::from_raw_mode(st.st_mode & 0o7777))?;
                        if self.owner.is_none() {
                            rfs::fchown(&*dir, Some(rfs::Uid::from_raw(st.st_uid)), Some(rfs::Gid::from_raw(st.st_gid)))?;
                        }
                    }
                }
                OnDisk::Symlink(target) => self.symlink(&rel, &target, i as u64)?,
                OnDisk::File => {
                    let mut src = from.open_file(&rel)?;
                    let st = rfs::fstat(&src)?;
                    let (mut file, temp) = self.create_temp(TempAt::Beside(&rel), i as u64)?;
                    let owner = (self.owner.is_none()).then(|| (rfs::Uid::from_raw(st.st_uid), rfs::Gid::from_raw(st.st_gid)));
                    let done = std::io::copy(&mut src, &mut file)
                        .and_then(|_| match owner {
                            Some((uid, gid)) => rfs::fchown(&file, Some(uid), Some(gid)).map_err(Into::into),
                            None => Ok(()),
                        })
                        .and_then(|()| rfs::fchmod(&file, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(Into::into))
                        .and_then(|()| self.commit(&temp, &rel));
                    if let Err(e) = done {
                        self.discard(&temp);
                        return Err(e);
                    }
                    copied += 1;
                }
                OnDisk::Other | OnDisk::NotUtf8 => {}
            }
        }
        Ok(copied)
    }

    /// A checker of many paths' `lstat`, for checks that only read.
    pub(crate) fn lstats(&self) -> Lstats<'_> {
        Lstats { root: &self.root, dirs: HashMap::new() }
    }

    /// Removes the file at `path` (if it is there), then every parent
    /// directory that this left empty, up to but not including DEST. A
    /// directory for which `keep` says so (a marker in the source) stays
    /// even when empty.
    pub(crate) fn remove_file(&self, path: &RelPath, keep: &dyn Fn(&str) -> bool) -> std::io::Result<()> {
        // Directories may disappear below: forget every cached descriptor.
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let (parents, file_name) = path.split_parent();
        let mut chain: Vec<OwnedFd> = Vec::with_capacity(parents.len());
        for (i, c) in parents.iter().enumerate() {
            let from = chain.last().map(|d| d.as_fd()).unwrap_or(self.root.as_fd());
            match rfs::openat(from, *c, dir_flags(), Mode::empty()) {
                Ok(fd) => chain.push(fd),
                // Gone or replaced by a symlink: our file is not there.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(()),
                Err(e) => return Err(ctx(e.into(), &parents[..=i].join("/"))),
            }
        }
        let parent = chain.last().map(|d| d.as_fd()).unwrap_or(self.root.as_fd());
        match rfs::unlinkat(parent, file_name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) => return Ok(()), // a directory now: not ours to remove
            Err(e) => return Err(e.into()),
        }
        // Walk back up, removing directories that are now empty.
        for depth in (0..parents.len()).rev() {
            if keep(&parents[..=depth].join("/")) {
                break;
            }
            chain.pop();
            let parent = chain.last().map(|d| d.as_fd()).unwrap_or(self.root.as_fd());
            if rfs::unlinkat(parent, parents[depth], AtFlags::REMOVEDIR).is_err() {
                break; // not empty (or not ours): stop here
            }
        }
        Ok(())
    }

    /// Hard-links the regular file at `path` in `from` to the same path
    /// here, creating parent directories: how a release shares the files
    /// that did not change with the one before it. Neither side's symlinks
    /// are followed (`linkat` without `AT_SYMLINK_FOLLOW` links a symlink
    /// itself, so it is checked to be a regular file first).
    pub(crate) fn link_from(&self, from: &DestDir, path: &RelPath) -> std::io::Result<()> {
        self.link_as(from, path, path)
    }

    /// Hard-links the regular file at `from_path` in `from` to `path` here
    /// (a file whose content moved to another path), as [`link_from`].
    ///
    /// [`link_from`]: DestDir::link_from
    pub(crate) fn link_as(&self, from: &DestDir, from_path: &RelPath, path: &RelPath) -> std::io::Result<()> {
        let (src_parents, src_name) = from_path.split_parent();
        let src = from.dir_fd(&src_parents, false)?;
        let st = rfs::statat(&*src, src_name, AtFlags::SYMLINK_NOFOLLOW)?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Err(std::io::Error::other(format!("{from_path} is not a regular file")));
        }
        // A link shares the inode, and so its owner: a file owned otherwise
        // than what is placed here now (--owner set, changed or dropped) is
        // copied or fetched instead, by the caller.
        let o = effective_owner(self.owner);
        if (st.st_uid, st.st_gid) != (o.uid, o.gid) {
            return Err(std::io::Error::other(format!("{from_path} has another owner than the files placed now")));
        }
        let (parents, file_name) = path.split_parent();
        let dst = self.dir_fd(&parents, true)?;
        Ok(rfs::linkat(&*src, src_name, &*dst, file_name, AtFlags::empty())?)
    }

    /// Opens the regular file at `path` for reading, without following a
    /// symlink anywhere on the way.
    pub(crate) fn open_file(&self, path: &RelPath) -> std::io::Result<File> {
        let (parents, file_name) = path.split_parent();
        let dir = self.dir_fd(&parents, false)?;
        let fd = rfs::openat(&*dir, file_name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
        Ok(File::from(fd))
    }

    /// Makes `path` a symlink to `target` (replacing what is there
    /// atomically: a new link under a temporary name, renamed over it).
    /// The link itself is created; its target is never followed here.
    pub(crate) fn symlink(&self, path: &RelPath, target: &str, seq: u64) -> std::io::Result<()> {
        let (parents, file_name) = path.split_parent();
        let dir = self.dir_fd(&parents, true)?;
        let tmp = format!("{TEMP_PREFIX}{seq:x}-{:08x}", rand::random::<u32>());
        rfs::symlinkat(target, &*dir, tmp.as_str())?;
        if let Some(o) = self.owner {
            if let Err(e) = chown_symlink(&dir, &tmp, o) {
                let _ = rfs::unlinkat(&*dir, tmp.as_str(), AtFlags::empty());
                return Err(e);
            }
        }
        rfs::renameat(&*dir, tmp.as_str(), &*dir, file_name).map_err(|e| {
            let _ = rfs::unlinkat(&*dir, tmp.as_str(), AtFlags::empty());
            match e {
                Errno::ISDIR | Errno::NOTEMPTY | Errno::EXIST => std::io::Error::other("a directory is in the way of this symlink"),
                e => e.into(),
            }
        })
    }

    /// The target of the symlink at `path`, if `path` is one.
    pub(crate) fn read_link(&self, path: &RelPath) -> Option<String> {
        let (parents, file_name) = path.split_parent();
        let dir = self.dir_fd(&parents, false).ok()?;
        rfs::readlinkat(&*dir, file_name, Vec::new()).ok()?.into_string().ok()
    }

    /// Removes temporary files a killed pull left beside their final paths.
    /// Only called after an interrupted pull, so the walk is rare. Returns
    /// how many were removed.
    pub(crate) fn sweep_temps(&self) -> std::io::Result<u64> {
        fn sweep(dir: &Path, removed: &mut u64) -> std::io::Result<()> {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                // DirEntry::file_type does not follow symlinks.
                let ft = entry.file_type()?;
                let name = entry.file_name();
                if ft.is_dir() && name.to_string_lossy().starts_with(TEMP_PREFIX) {
                    // A directory made for --owner and never renamed into
                    // place (a kill, a failed chown). remove_dir_all does
                    // not follow symlinks.
                    std::fs::remove_dir_all(entry.path())?;
                    *removed += 1;
                } else if ft.is_dir() && name != STAGING_DIR {
                    sweep(&entry.path(), removed)?;
                } else if ft.is_file() && name.to_string_lossy().starts_with(TEMP_PREFIX) {
                    std::fs::remove_file(entry.path())?;
                    *removed += 1;
                }
            }
            Ok(())
        }
        let mut removed = 0;
        sweep(&self.path, &mut removed)?;
        Ok(removed)
    }

    /// The directory `parts` below DEST, walked without following symlinks
    /// (creating missing directories when `create`), from the cache when
    /// it was walked before.
    fn dir_fd(&self, parts: &[&str], create: bool) -> std::io::Result<Arc<OwnedFd>> {
        if parts.is_empty() {
            return Ok(self.root.clone());
        }
        // Start from the deepest directory already walked.
        let (mut cur, mut depth) = (self.root.clone(), 0);
        {
            let cache = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            for i in (1..=parts.len()).rev() {
                if let Some(fd) = cache.get(&parts[..i].join("/")) {
                    (cur, depth) = (fd.clone(), i);
                    break;
                }
            }
        }
        for i in depth..parts.len() {
            cur = Arc::new(open_dir_at(&cur, parts[i], create, self.owner).map_err(|e| ctx(e, &parts[..=i].join("/")))?);
            let mut cache = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= DIR_CACHE {
                cache.clear();
            }
            cache.insert(parts[..=i].join("/"), cur.clone());
        }
        Ok(cur)
    }
}

/// `lstat` of many paths under one DEST, for checks that only read (is
/// this still the file that was placed?): each directory on the way is
/// checked once not to be a symlink, top first, and then each path is one
/// `statx` from DEST. That is a third of the system calls of
/// [`DestDir::stat`], which opens and closes every directory: on a 10,000-
/// file release the difference is most of a no-op pull's time. A directory
/// swapped for a symlink between its check and a later stat is followed,
/// so nothing may be written through a path on the strength of this (every
/// write walks with `openat(O_NOFOLLOW)`).
pub(crate) struct Lstats<'a> {
    root: &'a OwnedFd,
    /// Directory path -> whether it is a real directory.
    dirs: HashMap<String, bool>,
}

impl Lstats<'_> {
    /// The `lstat` of `path`; `None` when it, or a directory on the way, is
    /// missing, not a directory, or a symlink.
    pub(crate) fn stat(&mut self, path: &RelPath) -> Option<rfs::Stat> {
        for dir in path.ancestors() {
            let is_dir = match self.dirs.get(dir) {
                Some(known) => *known,
                None => {
                    let st = rfs::statat(self.root, dir, AtFlags::SYMLINK_NOFOLLOW);
                    let is_dir = st.is_ok_and(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory);
                    self.dirs.insert(dir.to_string(), is_dir);
                    is_dir
                }
            };
            if !is_dir {
                return None;
            }
        }
        rfs::statat(self.root, path.as_str(), AtFlags::SYMLINK_NOFOLLOW).ok()
    }
}

/// One entry of a tree as [`DestDir::walk`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OnDisk {
    Dir,
    File,
    /// With its target.
    Symlink(String),
    /// A device, socket or FIFO: nothing fleetsync places.
    Other,
    /// A name that is not UTF-8 (listed lossily): nothing fleetsync places,
    /// and nothing it can name safely to remove.
    NotUtf8,
}

/// What the entry `st` (of `path` in `dir`) is.
fn kind_of(st: &rfs::Stat, dir: &DestDir, path: &RelPath) -> std::io::Result<OnDisk> {
    Ok(match rfs::FileType::from_raw_mode(st.st_mode) {
        rfs::FileType::Directory => OnDisk::Dir,
        rfs::FileType::RegularFile => OnDisk::File,
        rfs::FileType::Symlink => {
            OnDisk::Symlink(dir.read_link(path).ok_or_else(|| std::io::Error::other("a symlink that cannot be read"))?)
        }
        _ => OnDisk::Other,
    })
}

/// [`DestDir::walk`] of the directory `dir`, at `prefix`.
fn walk_at(dir: &OwnedFd, prefix: &str, out: &mut Vec<(String, OnDisk)>) -> std::io::Result<()> {
    let mut subdirs = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let raw = entry.file_name();
        let name = raw.to_string_lossy();
        if name == "." || name == ".." || name.starts_with(TEMP_PREFIX) || (prefix.is_empty() && name == STAGING_DIR) {
            continue;
        }
        let path = if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
        if raw.to_str().is_err() {
            out.push((path, OnDisk::NotUtf8));
            continue;
        }
        let mut kind = entry.file_type();
        if kind == rfs::FileType::Unknown {
            // A file system without d_type.
            kind = rfs::FileType::from_raw_mode(rfs::statat(dir, raw, AtFlags::SYMLINK_NOFOLLOW)?.st_mode);
        }
        let found = match kind {
            rfs::FileType::Directory => {
                subdirs.push((raw.to_owned(), path.clone()));
                OnDisk::Dir
            }
            rfs::FileType::RegularFile => OnDisk::File,
            rfs::FileType::Symlink => OnDisk::Symlink(rfs::readlinkat(dir, raw, Vec::new())?.to_string_lossy().into_owned()),
            _ => OnDisk::Other,
        };
        out.push((path, found));
    }
    for (name, path) in subdirs {
        let sub = rfs::openat(dir, name.as_c_str(), dir_flags(), Mode::empty())?;
        walk_at(&sub, &path, out)?;
    }
    Ok(())
}

/// Opens the directory `name` in `from` without following a symlink,
/// creating it first when `create` and it is missing (owned by `owner`
/// when given).
pub(crate) fn open_dir_at(from: &OwnedFd, name: &str, create: bool, owner: Option<Owner>) -> std::io::Result<OwnedFd> {
    match rfs::openat(from, name, dir_flags(), Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) if create => {
            match owner {
                None => match rfs::mkdirat(from, name, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                },
                Some(o) => make_owned_dir(from, name, o)?,
            }
            open_dir_at(from, name, false, None)
        }
        // O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR (or
        // ELOOP); lstat says which it was, for the message.
        Err(Errno::LOOP | Errno::NOTDIR) => {
            let is_link = rfs::statat(from, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink);
            Err(if is_link {
                std::io::Error::other("is a symlink; fleetsync never follows symlinks inside DEST")
            } else {
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "is a file where a directory is needed")
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Makes the directory `name` in `from` owned by `o`: under a temporary
/// name first, chowned through its own descriptor, then renamed into
/// place, so that it never has its final name with the wrong owner (a
/// failed chown or a kill in between leaves a temporary name, which the
/// next pull's sweep removes). Another pull's directory that won the race
/// is kept.
fn make_owned_dir(from: &OwnedFd, name: &str, o: Owner) -> std::io::Result<()> {
    let tmp = format!("{TEMP_PREFIX}d-{:08x}", rand::random::<u32>());
    rfs::mkdirat(from, tmp.as_str(), Mode::from_raw_mode(DIR_MODE))?;
    let owned = rfs::openat(from, tmp.as_str(), dir_flags(), Mode::empty())
        .and_then(|fd| rfs::fchown(&fd, Some(uid(o)), Some(gid(o))))
        .map_err(|e| owner_error(e, o))
        .and_then(|()| match rfs::renameat_with(from, tmp.as_str(), from, name, rfs::RenameFlags::NOREPLACE) {
            // A file system without RENAME_NOREPLACE: a plain rename, which
            // replaces only an empty directory (one another pull just made).
            Err(Errno::INVAL) => Ok(rfs::renameat(from, tmp.as_str(), from, name)?),
            other => Ok(other?),
        });
    match owned {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = rfs::unlinkat(from, tmp.as_str(), AtFlags::REMOVEDIR);
            match e.raw_os_error() {
                Some(code) if code == Errno::EXIST.raw_os_error() => Ok(()),
                _ => Err(e),
            }
        }
    }
}

/// Chowns the symlink `name` in `dir` that was just made, through a
/// descriptor of the link itself (O_PATH): whatever another user of the
/// directory put at that name meanwhile, only a symlink is ever chowned,
/// never a file a name was swapped for.
fn chown_symlink(dir: &OwnedFd, name: &str, o: Owner) -> std::io::Result<()> {
    let fd = rfs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rfs::fstat(&fd)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::Symlink {
        return Err(std::io::Error::other("the new symlink was replaced before it was chowned"));
    }
    rfs::chownat(&fd, "", Some(uid(o)), Some(gid(o)), AtFlags::EMPTY_PATH).map_err(|e| owner_error(e, o))
}

/// Who a file placed by this agent belongs to: `--owner`, else the agent.
fn effective_owner(owner: Option<Owner>) -> Owner {
    owner.unwrap_or_else(|| Owner { uid: rustix::process::geteuid().as_raw(), gid: rustix::process::getegid().as_raw() })
}

fn uid(o: Owner) -> rfs::Uid {
    rfs::Uid::from_raw(o.uid)
}

fn gid(o: Owner) -> rfs::Gid {
    rfs::Gid::from_raw(o.gid)
}

/// A chown that failed: most often the agent not running as root.
fn owner_error(e: Errno, o: Owner) -> std::io::Error {
    let hint = if e == Errno::PERM { " (only root may give files away: run the agent as root for --owner)" } else { "" };
    std::io::Error::other(format!("chown to {}:{}: {e}{hint}", o.uid, o.gid))
}

impl Drop for DestDir {
    /// The staging directory is empty after a pull that ran to the end; after
    /// an abort it holds abandoned downloads. Either way it goes.
    fn drop(&mut self) {
        if self.staging.is_some() {
            let _ = remove_tree_at(&self.root, STAGING_DIR);
        }
    }
}

/// Replaces the state file `path` with `data` so that a reader, a crash or
/// a power loss finds the old content or the new one, never an empty or a
/// torn file (see [`commit_state_file`]).
pub(crate) fn write_state_file(path: &Path, data: &[u8]) -> crate::error::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|e| crate::error::Error::io(format!("writing {}", tmp.display()), e))?;
    file.write_all(data).map_err(|e| crate::error::Error::io(format!("writing {}", tmp.display()), e))?;
    commit_state_file(file, &tmp, path)
}

/// Makes `tmp`, written through `file`, the content of `path`, durably.
///
/// The data is synced before the rename, and the directory after it.
/// Without the first, XFS (Amazon Linux's default) and ext4 without
/// `auto_da_alloc` may put the rename on disk before the data: after a
/// power loss the file is empty. Without the second the rename itself may
/// be lost. Two fsyncs of a small file: a few milliseconds a pull.
pub(crate) fn commit_state_file(file: File, tmp: &Path, path: &Path) -> crate::error::Result<()> {
    let err = |e| crate::error::Error::io(format!("writing {}", path.display()), e);
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(tmp, path).map_err(err)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match File::open(dir).and_then(|d| d.sync_all()) {
        // A file system that cannot sync a directory (some network and
        // FUSE ones) has no better way to make the rename durable: the
        // file is in place all the same.
        Err(e) if matches!(Errno::from_io_error(&e), Some(Errno::INVAL | Errno::NOTSUP)) => {
            tracing::debug!(dir = %dir.display(), error = %e, "this file system cannot sync a directory");
            Ok(())
        }
        r => r.map_err(|e| crate::error::Error::io(format!("syncing directory {}", dir.display()), e)),
    }
}

pub(crate) fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    let file = File::open(path)?;
    if !file.metadata()?.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"));
    }
    Ok(file.into())
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory)
        || e.raw_os_error() == Some(Errno::LOOP.raw_os_error())
}

fn ctx(e: std::io::Error, at: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{at}: {e}"))
}

/// Removes `name` under `dir` recursively without following symlinks
/// (`std::fs::remove_dir_all` is symlink-safe since Rust 1.58.1).
pub(crate) fn remove_tree_at(dir: &OwnedFd, name: &str) -> std::io::Result<()> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory => {
            let path = PathBuf::from(format!("/proc/self/fd/{}/{name}", std::os::fd::AsRawFd::as_raw_fd(dir)));
            std::fs::remove_dir_all(path)
        }
        Ok(_) => rfs::unlinkat(dir, name, AtFlags::empty()).map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keypath::{map_key, Entry};

    fn rel(s: &str) -> RelPath {
        match map_key(s, "").unwrap() {
            Some(Entry::File(p)) => p,
            _ => unreachable!(),
        }
    }

    fn stage(d: &DestDir, body: &[u8]) -> TempName {
        use std::io::Write;
        let (mut f, name) = d.create_temp(TempAt::Staging, 1).unwrap();
        f.write_all(body).unwrap();
        name
    }

    #[test]
    fn commit_creates_parents_and_replaces_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DestDir::open(tmp.path()).unwrap();
        let n = stage(&d, b"one");
        d.commit(&n, &rel("a/b/c.txt")).unwrap();
        let n = stage(&d, b"two");
        d.commit(&n, &rel("a/b/c.txt")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("a/b/c.txt")).unwrap(), b"two");
    }

    #[test]
    fn a_planted_symlink_directory_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(outside.path(), dest.join("assets")).unwrap();
        let d = DestDir::open(&dest).unwrap();
        let n = stage(&d, b"evil");
        let e = d.commit(&n, &rel("assets/x.txt")).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_planted_symlink_file_is_replaced_not_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("f")).unwrap();
        let d = DestDir::open(tmp.path()).unwrap();
        let n = stage(&d, b"new");
        d.commit(&n, &rel("f")).unwrap();
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(tmp.path().join("f")).unwrap().file_type().is_symlink());
    }

    #[test]
    fn remove_prunes_empty_parents_but_not_dest_or_kept_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DestDir::open(tmp.path()).unwrap();
        for p in ["a/b/c.txt", "k/x/y.txt"] {
            let n = stage(&d, b"x");
            d.commit(&n, &rel(p)).unwrap();
        }
        d.remove_file(&rel("a/b/c.txt"), &|_| false).unwrap();
        assert!(!tmp.path().join("a").exists());
        d.remove_file(&rel("k/x/y.txt"), &|p| p == "k/x").unwrap();
        assert!(tmp.path().join("k/x").is_dir());
        assert!(tmp.path().exists());
    }

    #[test]
    fn temps_beside_their_file_rename_in_place_and_are_swept() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let d = DestDir::open(tmp.path()).unwrap();
        let (mut f, t) = d.create_temp(TempAt::Beside(&rel("x/y/z.txt")), 7).unwrap();
        f.write_all(b"z").unwrap();
        d.commit(&t, &rel("x/y/z.txt")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("x/y/z.txt")).unwrap(), b"z");
        // A temp left by a killed pull is swept; real files are not.
        let (_f, _left) = d.create_temp(TempAt::Beside(&rel("x/y/other")), 8).unwrap();
        assert_eq!(d.sweep_temps().unwrap(), 1);
        assert_eq!(std::fs::read_dir(tmp.path().join("x/y")).unwrap().count(), 1);
    }

    #[test]
    fn leftover_staging_from_a_crash_is_cleared_and_removed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join(STAGING_DIR).join("sub")).unwrap();
        std::fs::write(tmp.path().join(STAGING_DIR).join("partial"), b"x").unwrap();
        let d = DestDir::open(tmp.path()).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path().join(STAGING_DIR)).unwrap().count(), 0);
        drop(d);
        assert!(!tmp.path().join(STAGING_DIR).exists());
    }
}
