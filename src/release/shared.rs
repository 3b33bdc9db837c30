//! SHARED: what outlives a release (uploads, `storage/`, `.env`, an EFS
//! mount), as Capistrano's `linked_dirs` and Deployer's `shared_dirs` do.
//!
//! Each shared PATH of a store release is a symlink, made in the new
//! release before it goes live, to `DEST/shared/PATH` (relative, so DEST
//! may move) or to an absolute TARGET (an EFS mount, say). Every kept
//! release links to the same place, so a rollback sees the same data.
//!
//! The first time a path is shared, `DEST/shared/PATH` is seeded: copied
//! from the live release when it has the path (what the application wrote
//! there so far stays), else from the new release's published content,
//! else made an empty directory. From then on, what a release publishes
//! under a shared path is never placed (the report counts it): the release
//! is built from its manifest without those entries and with the link in
//! their place, so the drift check and its repair keep the link too.
//!
//! The paths come from the node (`--shared`, `--shared-file`, agent.toml)
//! and from the release itself (`fleetsync publish --shared`: see
//! [`SharedPaths`]); the node's own setting for a path wins ([`effective`]).
//!
//! Safety as for the rest of DEST: PATH is a relative path with no `..`
//! or empty component; TARGET is absolute, normalised and outside
//! `DEST/releases`; copies and links are made without following a symlink.

use std::path::{Component, Path, PathBuf};

use super::layout::Releases;
use crate::error::{Error, Result};
use crate::keypath::RelPath;
use crate::safe_fs::{DestDir, OnDisk};
use crate::store::manifest::{Entry, Manifest, SharedPaths, MAX_SHARED};

/// Where shared paths live in DEST.
pub const SHARED: &str = "shared";

/// One shared path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// In the release, relative to its root.
    pub path: RelPath,
    /// What the link points at: `None` for `DEST/shared/PATH`.
    pub target: Option<PathBuf>,
    /// A file (`.env`, `wp-config.php`: `--shared-file`), not a directory:
    /// never made empty, so a pull that finds no copy and a release that
    /// publishes none fails naming it instead of linking to an empty
    /// directory.
    pub file: bool,
    /// Declared by the release (`fleetsync publish --shared`), not set on
    /// the node: what its messages name.
    pub declared: bool,
}

impl Shared {
    /// `PATH` or `PATH=TARGET`, a directory, as `--shared` and agent.toml's
    /// `shared` give it.
    pub fn parse(spec: &str) -> Result<Shared> {
        Shared::parse_as(spec, false)
    }

    /// `PATH` or `PATH=TARGET`, a file, as `--shared-file` and agent.toml's
    /// `shared-files` give it.
    pub fn parse_file(spec: &str) -> Result<Shared> {
        Shared::parse_as(spec, true)
    }

    fn parse_as(spec: &str, file: bool) -> Result<Shared> {
        let flag = if file { "--shared-file" } else { "--shared" };
        let bad = |why: &str| Error::Config(format!("{flag} {spec:?}: {why}"));
        let (path, target) = match spec.split_once('=') {
            Some((p, t)) => (p, Some(t)),
            None => (spec, None),
        };
        if file && path.ends_with('/') {
            return Err(bad("PATH names a file: no trailing `/` (e.g. .env)"));
        }
        let trimmed = path.trim_end_matches('/');
        if trimmed.is_empty() || trimmed.starts_with('/') || trimmed.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(bad(
                "PATH must be relative to the release, without `.`, `..` or empty components (e.g. storage or public/uploads)",
            ));
        }
        let path = RelPath::from_stored(trimmed).ok_or_else(|| bad("PATH is not a usable path inside a release"))?;
        let target = match target {
            None => None,
            Some(t) => {
                let t = Path::new(t);
                if !t.is_absolute() || t.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
                    return Err(bad("TARGET must be an absolute path without `.` or `..` (e.g. /mnt/efs/uploads)"));
                }
                Some(t.to_path_buf())
            }
        };
        Ok(Shared { path, target, file, declared: false })
    }

    /// The paths a publish declares ([`SharedPaths`]), checked as the node's
    /// are, none with a TARGET (where the data lives is each node's choice).
    pub fn declared(paths: &SharedPaths) -> Result<Vec<Shared>> {
        let count = paths.dirs.len() + paths.files.len();
        if count > MAX_SHARED {
            return Err(Error::Config(format!(
                "{count} shared paths declared, more than {MAX_SHARED}: share the directories that hold them"
            )));
        }
        let shared = paths
            .iter()
            .map(|(p, file)| {
                let s = Shared::parse_as(p, file)?;
                match s.target {
                    Some(_) => Err(Error::Config(format!(
                        "{} {p:?}: a release declares PATH alone; a TARGET (an EFS mount) is each node's: set it in agent.toml's shared",
                        s.flag()
                    ))),
                    None => Ok(s),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        overlaps(&shared)?;
        Ok(shared)
    }

    /// The flag that names it: `--shared` or `--shared-file`, of
    /// `fleetsync publish` when the release declared it.
    pub(crate) fn flag(&self) -> &'static str {
        match (self.declared, self.file) {
            (false, false) => "--shared",
            (false, true) => "--shared-file",
            (true, false) => "the release's publish --shared",
            (true, true) => "the release's publish --shared-file",
        }
    }

    /// The symlink's target, as written in the release.
    pub(crate) fn link(&self) -> String {
        match &self.target {
            Some(t) => t.display().to_string(),
            // From DEST/releases/ID/a/b up to DEST: one `..` per directory.
            None => format!("{}{SHARED}/{}", "../".repeat(self.path.components().count() + 1), self.path),
        }
    }

    /// Whether `p` is this path or lies under it.
    fn covers(&self, p: &RelPath) -> bool {
        p.as_str() == self.path.as_str() || p.as_str().strip_prefix(self.path.as_str()).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// The shared paths of a pull of a release that declares `declared`: the
/// node's own, then each declared path that no path of the node's is, is
/// inside or holds (the node's setting wins: `public=/mnt/efs/public` on
/// the node covers a declared `public/uploads`), checked together.
pub(super) fn effective(node: &[Shared], declared: &SharedPaths, dest: &Path) -> Result<Vec<Shared>> {
    if declared.is_empty() {
        return Ok(node.to_vec());
    }
    let mut all = node.to_vec();
    for mut d in Shared::declared(declared)? {
        if !node.iter().any(|n| n.covers(&d.path) || d.covers(&n.path)) {
            d.declared = true;
            all.push(d);
        }
    }
    check(&all, dest)?;
    Ok(all)
}

fn overlaps(shared: &[Shared]) -> Result<()> {
    for (i, a) in shared.iter().enumerate() {
        for b in &shared[i + 1..] {
            if a.covers(&b.path) || b.covers(&a.path) {
                return Err(Error::Config(format!("{} {} and {} {} overlap: share one or the other", a.flag(), a.path, b.flag(), b.path)));
            }
        }
    }
    Ok(())
}

/// Checks the shared paths of a pull: no two the same or one inside
/// another, no TARGET inside DEST (a release's files go away with it, and
/// a TARGET under `current` would be a loop).
pub(crate) fn check(shared: &[Shared], dest: &Path) -> Result<()> {
    let dest = std::path::absolute(dest).map_err(|e| Error::io(format!("resolving {}", dest.display()), e))?;
    let dest = std::fs::canonicalize(&dest).unwrap_or(dest);
    overlaps(shared)?;
    for a in shared {
        if let Some(t) = &a.target {
            let resolved = std::fs::canonicalize(t).unwrap_or_else(|_| t.clone());
            if t.starts_with(&dest) || resolved.starts_with(&dest) {
                return Err(Error::Config(format!(
                    "{} {}={}: TARGET must be outside {} (a release's files go away with it)",
                    a.flag(),
                    a.path,
                    t.display(),
                    dest.display()
                )));
            }
        }
    }
    Ok(())
}

/// Where a shared path's data comes from in this pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seed {
    /// It is there already (or is TARGET): the release links to it.
    Ready,
    /// Copied from what the new release publishes there, once built.
    FromRelease,
}

/// What the manifest says is at `path`: a file, a directory (or entries
/// under it), a symlink, or nothing.
fn published(m: &Manifest, s: &Shared) -> Option<OnDisk> {
    let mut found = None;
    for e in m.entries.iter().filter(|e| s.covers(e.path())) {
        let at_path = e.path().as_str() == s.path.as_str();
        found = Some(match e {
            Entry::File(_) if at_path => OnDisk::File,
            Entry::Symlink { target, .. } if at_path => OnDisk::Symlink(target.clone()),
            _ => OnDisk::Dir,
        });
        if at_path {
            break;
        }
    }
    found
}

/// Makes each shared path's place ready before release `id` is built
/// from `m`: checks that what is there and what the release publishes are
/// the same kind, seeds `DEST/shared/PATH` from the live release (a copy)
/// or makes it empty; what must be seeded from the new release itself is
/// left for [`finish`]. One [`Seed`] per shared path.
pub(super) fn prepare(
    shared: &[Shared],
    releases: &Releases,
    dest: &Path,
    live: Option<&DestDir>,
    m: &Manifest,
    id: &str,
) -> Result<Vec<Seed>> {
    let mut seeds = Vec::with_capacity(shared.len());
    let store = if shared.iter().any(|s| s.target.is_none()) { Some(releases.shared()?) } else { None };
    for s in shared {
        let publishes = published(m, s);
        let there = match &s.target {
            Some(t) => Some(match std::fs::metadata(t) {
                Ok(md) if md.is_dir() => OnDisk::Dir,
                Ok(_) => OnDisk::File,
                Err(e) => {
                    return Err(Error::Config(format!(
                        "{} {}={}: {e}: mount or create it before the pull (TARGET is never created)",
                        s.flag(),
                        s.path,
                        t.display()
                    )))
                }
            }),
            None => {
                let store = store.as_ref().expect("opened for paths without a target");
                let st =
                    store.stat(&s.path).map_err(|e| Error::io(format!("reading {}", store.path().join(s.path.as_str()).display()), e))?;
                st.map(|st| match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                    rustix::fs::FileType::Directory => OnDisk::Dir,
                    rustix::fs::FileType::RegularFile => OnDisk::File,
                    _ => OnDisk::Other,
                })
            }
        };
        let shared_at = || s.target.clone().unwrap_or_else(|| dest.join(SHARED).join(s.path.as_str()));
        if s.file {
            if let Some(dir) = [&there, &publishes].into_iter().flatten().find(|k| **k == OnDisk::Dir) {
                let (what, at) = if there.as_ref() == Some(dir) {
                    ("is", shared_at().display().to_string())
                } else {
                    ("is published as", format!("release {id}"))
                };
                return Err(Error::Config(format!(
                    "shared file {} {what} a directory in {at}: nothing went live; share it with --shared, or make it a file",
                    s.path
                )));
            }
        }
        // The live release still holds the path itself: what is shared
        // there is older than what the application writes now (a pull that
        // seeded it never went live, or a copy made by hand). Set aside,
        // never deleted, and seeded again from the live release below.
        let live_holds = live.and_then(|l| l.stat(&s.path).ok().flatten()).is_some_and(|st| {
            let t = rustix::fs::FileType::from_raw_mode(st.st_mode);
            t == rustix::fs::FileType::Directory || t == rustix::fs::FileType::RegularFile
        });
        let there = match (&there, live_holds, &s.target, &store) {
            (Some(_), true, None, Some(store)) => {
                let aside = format!("{}.stale-{}", s.path.components().last().unwrap_or("shared"), crate::store::now_ms());
                store.rename_beside(&s.path, &aside).map_err(|e| Error::io(format!("setting {} aside", shared_at().display()), e))?;
                tracing::warn!(path = %s.path, aside = %aside, "the shared copy was older than the live release's: set aside, seeded again");
                None
            }
            _ => there,
        };
        match (&there, &publishes) {
            (Some(OnDisk::Other), _) => {
                return Err(Error::Config(format!("{} is neither a file nor a directory: move it aside", shared_at().display())));
            }
            (Some(have), Some(want)) if !matches!(want, OnDisk::Symlink(_)) && have != want => {
                return Err(Error::Config(format!(
                    "shared path {} is a {} in {} but release {id} publishes a {} there: nothing went live; publish it as a {0} again, or move {2} aside",
                    s.path,
                    kind(have),
                    shared_at().display(),
                    kind(want),
                )));
            }
            (Some(_), _) => {
                seeds.push(Seed::Ready);
                continue;
            }
            (None, _) => {}
        }
        let store = store.as_ref().expect("a missing DEST/shared/PATH has no target");
        // First use: what the live release holds there (the application's
        // data so far), else the new release's content, else nothing.
        if let (true, Some(live)) = (live_holds, live) {
            store.copy_in(live, &s.path).map_err(|e| Error::io(format!("seeding {} from the live release", shared_at().display()), e))?;
            tracing::info!(path = %s.path, "seeded the shared path from the live release");
            seeds.push(Seed::Ready);
        } else if matches!(publishes, Some(OnDisk::Dir | OnDisk::File)) {
            seeds.push(Seed::FromRelease);
        } else if s.file {
            return Err(Error::Config(format!(
                "shared file {}: {} does not exist and release {id} publishes none: nothing went live; put the file there first (the instance's user-data or configuration management writes it), or publish a default",
                s.path,
                shared_at().display()
            )));
        } else {
            store.make_dir(&s.path).map_err(|e| Error::io(format!("creating {}", shared_at().display()), e))?;
            seeds.push(Seed::Ready);
        }
    }
    Ok(seeds)
}

fn kind(k: &OnDisk) -> &'static str {
    match k {
        OnDisk::Dir => "directory",
        OnDisk::File => "file",
        OnDisk::Symlink(_) => "symlink",
        OnDisk::Other | OnDisk::NotUtf8 => "special file",
    }
}

/// The manifest release `id` is built from: what lies under each shared
/// path left out, and the link in its place; but a path still to be
/// seeded from this release (`Seed::FromRelease`) keeps its content, to be
/// moved by [`finish`]. Also how many published files were left out.
pub(super) fn filter(m: &Manifest, shared: &[Shared], seeds: &[Seed]) -> (Manifest, u64) {
    let mut out = Manifest { header: m.header.clone(), entries: Vec::with_capacity(m.entries.len()) };
    let mut skipped = 0;
    for e in &m.entries {
        match shared.iter().zip(seeds).find(|(s, _)| s.covers(e.path())) {
            Some((_, Seed::Ready)) => skipped += u64::from(matches!(e, Entry::File(_))),
            _ => out.entries.push(e.clone()),
        }
    }
    for (s, seed) in shared.iter().zip(seeds) {
        if *seed == Seed::Ready {
            out.entries.push(Entry::Symlink { path: s.path.clone(), target: s.link() });
        }
    }
    out.entries.sort_by(|a, b| a.path().cmp(b.path()));
    out.header.files = out.entries.iter().filter(|e| matches!(e, Entry::File(_))).count() as u64;
    (out, skipped)
}

/// Once release `release` is built: each path seeded from it is copied to
/// `DEST/shared/PATH`, removed from the release and linked. The paths
/// removed (for the state store), each with what was under it.
pub(super) fn finish(shared: &[Shared], seeds: &[Seed], releases: &Releases, release: &DestDir) -> Result<Vec<RelPath>> {
    let mut moved = Vec::new();
    if !seeds.contains(&Seed::FromRelease) {
        return Ok(moved);
    }
    let store = releases.shared()?;
    for (i, (s, _)) in shared.iter().zip(seeds).filter(|(_, seed)| **seed == Seed::FromRelease).enumerate() {
        let at = || store.path().join(s.path.as_str());
        store.copy_in(release, &s.path).map_err(|e| Error::io(format!("seeding {} from the new release", at().display()), e))?;
        release.remove_any(&s.path).map_err(|e| Error::io(format!("removing {} from the new release", s.path), e))?;
        release.symlink(&s.path, &s.link(), i as u64).map_err(|e| Error::io(format!("linking {} to {}", s.path, s.link()), e))?;
        tracing::info!(path = %s.path, "seeded the shared path from the new release");
        moved.push(s.path.clone());
    }
    Ok(moved)
}

/// Whether `p` lies under one of `paths` (or is one).
pub(super) fn under(paths: &[RelPath], p: &RelPath) -> bool {
    paths.iter().any(|s| p.as_str() == s.as_str() || p.as_str().strip_prefix(s.as_str()).is_some_and(|rest| rest.starts_with('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_targets_are_checked_and_links_are_relative_to_the_release() {
        let s = Shared::parse("public/uploads").unwrap();
        assert_eq!((s.path.as_str(), s.link()), ("public/uploads", "../../../shared/public/uploads".to_string()));
        assert_eq!(Shared::parse("storage/").unwrap().link(), "../../shared/storage");
        assert_eq!(Shared::parse("media=/mnt/efs/media").unwrap().link(), "/mnt/efs/media");
        assert!(Shared::parse_file(".env").unwrap().file && !Shared::parse(".env").unwrap().file);
        assert!(Shared::parse_file("../.env").unwrap_err().to_string().contains("--shared-file"));
        for bad in ["", "/etc", "../x", "a//b", "a/./b", "a/../b", ".fleetsync.tmp/x", "x=relative", "x=/mnt/../etc"] {
            assert!(Shared::parse(bad).is_err(), "{bad}");
        }
        let dest = Path::new("/var/www/app");
        let two = |a: &str, b: &str| check(&[Shared::parse(a).unwrap(), Shared::parse(b).unwrap()], dest);
        assert!(two("storage", "storage/logs").is_err());
        assert!(two("storage", "storage").is_err());
        assert!(two("storage", "storagex").is_ok());
        assert!(check(&[Shared::parse("x=/var/www/app/releases/r1/x").unwrap()], dest).is_err());
    }
}
