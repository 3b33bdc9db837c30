//! WALK: the build directory as release entries, every file hashed.
//!
//! Walked without following symlinks. A symlink is kept when its target is
//! relative and stays inside the build (Capistrano's `public/storage ->
//! ../storage/app/public`), refused otherwise, unless `--follow-symlinks`
//! uploads what it points to. Every path must be one the agent accepts, so
//! a build that nodes would refuse fails here, before anything is uploaded.
//! Empty directories are kept. Files are hashed on every core at once.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::keypath::{map_key, Entry as KeyEntry, RelPath};
use crate::list::RESERVED_DIR;
use crate::store::manifest::{check_symlink_target, Entry};
use crate::store::Digest;

/// One path of the build: a file still to hash and place in the store,
/// or what goes into the manifest as it is (a symlink, an empty or a
/// group-writable directory).
#[derive(Debug)]
pub(crate) enum Item {
    File(LocalFile),
    Other(Entry),
}

impl Item {
    pub(crate) fn path(&self) -> &RelPath {
        match self {
            Item::File(f) => &f.path,
            Item::Other(e) => e.path(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct LocalFile {
    pub path: RelPath,
    pub full: PathBuf,
    pub size: u64,
    /// 0o644 or 0o755, with the group write bit when the build has it
    /// ([`crate::store::manifest::file_mode`]).
    pub mode: u32,
    /// Filled by [`hash_all`].
    pub hash: Option<Digest>,
}

/// Walks `dir`; files are not hashed yet.
pub(crate) fn walk(dir: &Path, follow: bool) -> Result<Vec<Item>> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::Config(format!("cannot read the build directory {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Config(format!("{} is not a directory: publish takes a build directory", dir.display())));
    }
    let mut items = Vec::new();
    // Each directory, and whether its group may write to it (the build's
    // own directory says nothing: it is DEST's).
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize, false)];
    while let Some((path, rel, depth, writable)) = stack.pop() {
        if depth > 64 {
            return Err(Error::Config(format!("{} is nested more than 64 levels deep (a symlink loop?)", path.display())));
        }
        let entries = std::fs::read_dir(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let mut empty = true;
        for entry in entries {
            empty = false;
            let entry = entry.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let name = entry.file_name().into_string().map_err(|n| {
                Error::Config(format!("{} has a name that is not UTF-8: S3 keys must be UTF-8; rename it", path.join(n).display()))
            })?;
            let full = entry.path();
            let rel_path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            if depth == 0 && format!("{name}/") == RESERVED_DIR {
                return Err(Error::Config(format!("{} is reserved for fleetsync's own objects; rename it in the build", full.display())));
            }
            let path_of = |p: &str| path_of(p, &full);
            let mut meta = std::fs::symlink_metadata(&full).map_err(|e| Error::io(format!("reading {}", full.display()), e))?;
            if meta.file_type().is_symlink() && !follow {
                let target = std::fs::read_link(&full).map_err(|e| Error::io(format!("reading {}", full.display()), e))?;
                let target = target.to_str().ok_or_else(|| Error::Config(format!("{}: its target is not UTF-8", full.display())))?;
                let path = path_of(&rel_path)?;
                check_symlink_target(&path, target).map_err(|e| {
                    Error::Config(format!(
                        "{e} ({}): make it relative and inside the build, or pass --follow-symlinks to upload what it points to",
                        full.display()
                    ))
                })?;
                items.push(Item::Other(Entry::Symlink { path, target: target.to_string() }));
                continue;
            }
            if meta.file_type().is_symlink() {
                meta = std::fs::metadata(&full).map_err(|e| Error::Config(format!("{} is a broken symlink: {e}", full.display())))?;
            }
            if meta.is_dir() {
                let writable = meta.permissions().mode() & 0o020 != 0;
                stack.push((full, rel_path, depth + 1, writable));
            } else if meta.is_file() {
                let mode = crate::store::manifest::file_mode(meta.permissions().mode());
                items.push(Item::File(LocalFile { path: path_of(&rel_path)?, full, size: meta.len(), mode, hash: None }));
            } else {
                return Err(Error::Config(format!(
                    "{} is not a regular file, directory or symlink; remove it from the build",
                    full.display()
                )));
            }
        }
        if writable {
            items.push(Item::Other(Entry::WritableDir { path: path_of(&rel, &path)? }));
        } else if empty && depth > 0 {
            items.push(Item::Other(Entry::Dir { path: path_of(&rel, &path)? }));
        }
    }
    Ok(items)
}

/// The release path of `rel` (at `full` in the build), if agents accept it.
fn path_of(rel: &str, full: &Path) -> Result<RelPath> {
    match map_key(rel, "") {
        Ok(Some(KeyEntry::File(p))) => Ok(p),
        Ok(_) => unreachable!("a non-empty path maps to a file"),
        Err(e) => Err(Error::Config(format!("{}: agents would refuse this path: {e}; rename it", full.display()))),
    }
}

/// Hashes every file, on every core. A file that changes size while it is
/// read is an error: the build is still being written.
pub(crate) fn hash_all(items: &mut [Item]) -> Result<()> {
    let mut files: Vec<&mut LocalFile> = items.iter_mut().filter_map(|i| if let Item::File(f) = i { Some(f) } else { None }).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(files.len().max(1));
    let next = AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<&mut LocalFile>> = files.drain(..).map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(slot) = slots.get(i) else { return Ok(()) };
                        let mut f = slot.lock().unwrap_or_else(|p| p.into_inner());
                        let err = |e| Error::io(format!("reading {}", f.full.display()), e);
                        let file = std::fs::File::open(&f.full).map_err(err)?;
                        let mut counted = CountingReader { inner: file, n: 0 };
                        let hash = Digest::of_reader(&mut counted).map_err(err)?;
                        if counted.n != f.size {
                            return Err(Error::Config(format!(
                                "{} changed while it was read ({} bytes, then {}); publish once the build is done",
                                f.full.display(),
                                f.size,
                                counted.n
                            )));
                        }
                        f.hash = Some(hash);
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("hashing does not panic"))
    })
}

struct CountingReader<R> {
    inner: R,
    n: u64,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}
