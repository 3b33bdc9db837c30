//! Release mode on disk: where things are (DEST, `DEST/releases/ID`,
//! `DEST/current`, the registry in the state dir), and every change made
//! there, through descriptors that never follow a symlink.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::{Registry, CURRENT, RELEASES};
use crate::error::{Error, Result};
use crate::safe_fs::{self, DestDir};
use crate::state::StateStore;

/// DEST in release mode: where things are, and the registry.
pub(super) struct Layout {
    pub dest: PathBuf,
    /// The DEST's own state-store directory, which holds the registry.
    pub state: PathBuf,
    pub state_root: PathBuf,
}

impl Layout {
    pub(super) fn new(dest: &Path, state_dir: &Path) -> Layout {
        Layout { dest: dest.to_path_buf(), state: StateStore::dir_for(state_dir, dest), state_root: state_dir.to_path_buf() }
    }

    /// A release's path, for messages, the hook's environment and its state
    /// store's name (never to write through: see [`Releases`]).
    pub(super) fn dir(&self, id: &str) -> PathBuf {
        self.dest.join(RELEASES).join(id)
    }

    pub(super) fn registry_path(&self) -> PathBuf {
        self.state.join("releases.json")
    }

    pub(super) fn last_pull_path(&self) -> PathBuf {
        self.state.join("last-release-pull.json")
    }

    /// The registry (empty when there is none yet).
    ///
    /// One that cannot be parsed (written before its writes were durable,
    /// a disk error, a hand edit) is never fatal, or every later pull
    /// would fail until a person came: with `repair`, it is moved aside
    /// (`releases.json.damaged`, for a person to read) and the pull starts
    /// from an empty registry; without (status, dry runs: they write
    /// nothing) it reads as empty. The live release is then checked
    /// against its manifest and registered again by the pull; other kept
    /// releases are no longer known complete, and the pull sweeps them.
    pub(super) fn load(&self, repair: bool) -> Result<Registry> {
        let path = self.registry_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registry::default()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        match serde_json::from_slice(&bytes) {
            Ok(registry) => Ok(registry),
            Err(e) if repair => {
                let aside = path.with_extension("json.damaged");
                std::fs::rename(&path, &aside).map_err(|e| Error::io(format!("moving {} aside", path.display()), e))?;
                tracing::warn!(registry = %path.display(), moved_to = %aside.display(), error = %e,
                    "the release registry was damaged; starting from the live release alone");
                Ok(Registry::default())
            }
            Err(e) => {
                tracing::warn!(registry = %path.display(), error = %e, "the release registry is damaged; the next pull rebuilds it");
                Ok(Registry::default())
            }
        }
    }

    pub(super) fn save(&self, registry: &Registry) -> Result<()> {
        std::fs::create_dir_all(&self.state).map_err(|e| Error::io(format!("creating {}", self.state.display()), e))?;
        safe_fs::write_state_file(&self.registry_path(), &serde_json::to_vec_pretty(registry).expect("the registry serializes"))
    }

    /// The live release, from the `current` symlink (read only: a link
    /// planted elsewhere names no release of ours).
    pub(super) fn current(&self) -> Result<Option<String>> {
        let link = self.dest.join(CURRENT);
        match std::fs::read_link(&link) {
            Ok(target) => Ok(target.strip_prefix(RELEASES).ok().and_then(|t| t.to_str()).map(str::to_string)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Err(Error::Config(format!(
                "{} exists and is not a symlink: DEST holds an in-place tree; give --releases a DEST of its own",
                link.display()
            ))),
            Err(e) => Err(Error::io(format!("reading {}", link.display()), e)),
        }
    }

    /// Removes a release's state store (its directory goes through [`Releases`]).
    pub(super) fn forget(&self, id: &str) {
        let _ = std::fs::remove_dir_all(StateStore::dir_for(&self.state_root, &self.dir(id)));
    }
}

/// The name a release removed by a deploy waits under, in `releases/`,
/// until a pull that does not switch removes it ([`Releases::retire`]).
const RETIRED: &str = ".retired-";

/// DEST and `DEST/releases/`, held open: every change release mode makes
/// on disk goes through these descriptors, and `releases` (and everything
/// in it) is reached without following a symlink, so a link planted at
/// `DEST/releases` (or at a release) makes the pull fail instead of making
/// the agent, as root, delete or build somewhere else. DEST itself is the
/// operator's choice and may be a symlink.
pub(super) struct Releases {
    dest: PathBuf,
    root: OwnedFd,
    dir: OwnedFd,
    /// `--owner` of what a release build makes (not of `releases/` itself).
    owner: Option<crate::owner::Owner>,
}

impl Releases {
    /// Opens DEST and `DEST/releases`, creating them.
    pub(super) fn open(dest: &Path, owner: Option<crate::owner::Owner>) -> Result<Releases> {
        let err = |e| Error::io(format!("opening {}", dest.join(RELEASES).display()), e);
        std::fs::create_dir_all(dest).map_err(|e| Error::io(format!("creating DEST {}", dest.display()), e))?;
        let root = safe_fs::open_root(dest).map_err(err)?;
        let dir = safe_fs::open_dir_at(&root, RELEASES, true, None).map_err(err)?;
        Ok(Releases { dest: dest.to_path_buf(), root, dir, owner })
    }

    pub(super) fn path(&self, id: &str) -> PathBuf {
        self.dest.join(RELEASES).join(id)
    }

    /// A release directory to build into (created if missing).
    pub(super) fn build(&self, id: &str) -> Result<DestDir> {
        DestDir::open_in(&self.dir, id, self.path(id), self.owner)
            .map_err(|e| Error::io(format!("creating release {}", self.path(id).display()), e))
    }

    /// `DEST/shared` (shared paths), created if missing, reached without
    /// following a symlink (a link planted there fails the pull), what is
    /// made in it owned by `--owner`.
    pub(super) fn shared(&self) -> Result<DestDir> {
        let path = self.dest.join(super::SHARED);
        DestDir::open_in(&self.root, super::SHARED, path.clone(), self.owner)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))
    }

    /// A complete release, to share its files; `None` if it is gone.
    pub(super) fn read(&self, id: &str) -> Result<Option<DestDir>> {
        DestDir::open_read_only_in(&self.dir, id, self.path(id))
            .map_err(|e| Error::io(format!("opening release {}", self.path(id).display()), e))
    }

    /// The names in `releases/`.
    pub(super) fn names(&self) -> Result<Vec<String>> {
        let err = |e: rustix::io::Errno| Error::io(format!("reading {}", self.dest.join(RELEASES).display()), e.into());
        let dir = rustix::fs::Dir::read_from(&self.dir).map_err(err)?;
        let mut names = Vec::new();
        for entry in dir {
            let name = entry.map_err(err)?.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Renames release directory `from` to `to` (in `releases/`, never
    /// over an existing directory).
    pub(super) fn rename(&self, from: &str, to: &str) -> Result<()> {
        rustix::fs::renameat_with(&self.dir, from, &self.dir, to, rustix::fs::RenameFlags::NOREPLACE)
            .map_err(|e| Error::io(format!("renaming {} to {}", self.path(from).display(), self.path(to).display()), e.into()))
    }

    /// Removes a release's tree (never following a symlink in it).
    pub(super) fn remove(&self, id: &str) -> Result<()> {
        safe_fs::remove_tree_at(&self.dir, id).map_err(|e| Error::io(format!("removing release {}", self.path(id).display()), e))
    }

    /// Sets release `id` (unregistered already) aside under a hidden name,
    /// for [`Releases::remove_retired`]: one rename, where removing it
    /// would unlink every file it holds (seconds for a hundred thousand)
    /// while a deploy waits for this pull.
    pub(super) fn retire(&self, id: &str) -> Result<()> {
        self.rename(id, &format!("{RETIRED}{}-{id}", crate::store::now_ms()))
    }

    /// Removes the releases [`Releases::retire`] set aside but the newest
    /// `leave`: by a pull that did not switch (the timer's, at its low
    /// priority), after it let go of the node lock, out of any deploy's
    /// way. Best effort: what cannot be removed is tried again by the next
    /// pull.
    pub(super) fn remove_retired(&self, leave: usize) {
        let Ok(names) = self.names() else { return };
        // `.retired-<ms>-<id>`: the oldest first.
        let mut retired: Vec<(u64, &String)> =
            names.iter().filter_map(|n| Some((n.strip_prefix(RETIRED)?.split_once('-')?.0.parse().ok()?, n))).collect();
        retired.sort_unstable();
        for (_, name) in &retired[..retired.len().saturating_sub(leave)] {
            match safe_fs::remove_tree_at(&self.dir, name) {
                Ok(()) => tracing::info!(dir = %name, "removed a release set aside by a deploy"),
                Err(e) => {
                    tracing::warn!(dir = %self.path(name).display(), error = %e, "could not remove a release set aside by a deploy; the next pull tries again")
                }
            }
        }
    }

    /// Points `current` at the release `id` atomically: a new symlink under
    /// a temporary name, renamed over the old one. A reader resolving
    /// `current` sees the old release or the new one, never neither.
    ///
    /// The file system is synced first: the release's files were written
    /// through the page cache, and a power loss after the switch must not
    /// leave the live release with empty or partial files. One syncfs
    /// costs what writing the new files back costs, once per switch.
    pub(super) fn switch_to(&self, id: &str) -> Result<()> {
        use rustix::fs::{renameat, symlinkat, syncfs, unlinkat, AtFlags};
        let err = |e: rustix::io::Errno| Error::io(format!("switching {} to release {id}", self.dest.join(CURRENT).display()), e.into());
        syncfs(&self.root).map_err(err)?;
        let tmp = format!(".{CURRENT}.tmp-{}", std::process::id());
        let _ = unlinkat(&self.root, tmp.as_str(), AtFlags::empty());
        symlinkat(Path::new(RELEASES).join(id), &self.root, tmp.as_str()).map_err(err)?;
        renameat(&self.root, tmp.as_str(), &self.root, CURRENT).map_err(err)?;
        // The rename is durable once DEST's directory entry is on disk.
        rustix::fs::fsync(&self.root).map_err(err)
    }

    /// Writes back what is pending on DEST's file system (after staging the
    /// next release: the next switch's own sync then waits for what that
    /// deploy wrote alone).
    pub(super) fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(&self.root).map_err(|e| Error::io(format!("syncing {}", self.dest.display()), e.into()))
    }

    /// Removes the temporary `current` links a switch killed between its
    /// symlink and its rename left in DEST (`.current.tmp-PID`).
    fn sweep_switch_leftovers(&self) -> Result<()> {
        use rustix::fs::{unlinkat, AtFlags, Dir};
        let err = |e: rustix::io::Errno| Error::io(format!("reading {}", self.dest.display()), e.into());
        let prefix = format!(".{CURRENT}.tmp-");
        for entry in Dir::read_from(&self.root).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_string_lossy();
            if name.starts_with(&prefix) && entry.file_type() == rustix::fs::FileType::Symlink {
                // A symlink is unlinked, never followed.
                unlinkat(&self.root, entry.file_name(), AtFlags::empty())
                    .map_err(|e| Error::io(format!("removing {}", self.dest.join(&*name).display()), e.into()))?;
            }
        }
        Ok(())
    }

    /// Removes release directories that never completed (a killed or failed
    /// build): in `releases/` but not in the registry, and not live.
    pub(super) fn sweep_incomplete(&self, layout: &Layout, registry: &Registry, current: Option<&str>) -> Result<()> {
        self.sweep_switch_leftovers()?;
        for name in self.names()? {
            // Removed after a pull that does not switch, never before a build.
            if name.starts_with(RETIRED) {
                continue;
            }
            // The staged next release stays while it copies the live one.
            if name == super::next::NEXT {
                if current.is_some_and(|c| super::next::staged_from(layout, c)) {
                    continue;
                }
                super::next::drop_stamp(layout);
            }
            if Some(name.as_str()) != current && registry.get(&name).is_none() {
                tracing::info!(release = %name, "removing a release that never completed (or was pruned)");
                match self.remove(&name) {
                    Ok(()) => layout.forget(&name),
                    // Unregistered, so never live or "previous": harmless
                    // where it is until a later pull can remove it.
                    Err(e) => tracing::warn!(release = %name, error = %e, "could not remove it; a later pull tries again"),
                }
            }
        }
        Ok(())
    }
}
