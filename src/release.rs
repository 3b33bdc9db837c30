//! RELEASES: the agent's atomic-release mode (`--releases`), where a web
//! server never sees a half-synced tree and a bad deploy is undone in
//! one rename.
//!
//! ```text
//! DEST/releases/<id>/        one complete tree per release, not changed once live
//! DEST/current -> releases/<id>   the live tree, switched with rename(2)
//! STATE/dest-<DEST>/releases.json  the complete releases, in the order they went live
//! ```
//!
//! A pull lists the source once and names the release: `--release-id`, or a
//! hash of the sorted key and ETag list, so identical content is one
//! release. If that is the live release, the pull is the in-place pull of
//! the live tree (which repairs local drift and downloads nothing). If it
//! is an older complete release, it goes live again without a download.
//! Otherwise the new release is built beside the live one: every file whose
//! ETag did not change is hard-linked from the live release (with its
//! record in the state store, so the pull sees it as placed), and the
//! in-place pull ([`pull::place`]) fetches the rest into the new directory
//! with the listing already made. Only a release whose every file arrived
//! goes into the registry and then live; a failed or killed build is
//! removed by the next pull and never counted.
//!
//! Hard links are safe to share because nothing writes into a placed file:
//! a changed file is a new temporary file renamed over the link, which
//! leaves the inode the older release holds untouched.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keypath::{map_key, Entry, RelPath};
use crate::list::{self, RemoteObject};
use crate::node_lock::{IfBusy, NodeLock};
use crate::progress::Observer;
use crate::pull::{self, write_atomic, PullOptions};
use crate::report::PullReport;
use crate::safe_fs::{self, DestDir};
use crate::source::s3_client;
use crate::state::{Placed, StateStore};

/// The live release's name in DEST.
pub const CURRENT: &str = "current";
/// Where the releases live in DEST.
pub const RELEASES: &str = "releases";
/// Releases kept when `--keep` is not given.
pub const DEFAULT_KEEP: usize = 5;

/// A release pull: the in-place pull's options (`dest` is the releases
/// root) and what is particular to releases.
#[derive(Debug, Clone)]
pub struct ReleaseOptions {
    pub pull: PullOptions,
    /// The release's name; default: derived from the content.
    pub release_id: Option<String>,
    /// Releases kept (besides the live one and the one before it, which
    /// are never removed).
    pub keep: usize,
    /// A shell command run after the switch (e.g. reload php-fpm).
    pub after_switch: Option<String>,
    /// Switch back to the previous release when `after_switch` fails.
    pub rollback_on_failure: bool,
}

/// What a release pull did, inside its [`PullReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// The release the source's content is (live now unless the pull failed
    /// or was rolled back).
    pub id: String,
    /// What was live before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// This pull built the release directory.
    pub created: bool,
    /// `current` was switched by this pull.
    pub switched: bool,
    /// Files shared with the previous release by hard link (not downloaded).
    pub linked: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_switch: Option<HookReport>,
    /// The after-switch command failed and the previous release is live again.
    pub rolled_back: bool,
    /// Old releases removed (`--keep`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// How the after-switch command went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub command: String,
    pub exit_code: Option<i32>,
    pub ok: bool,
    /// The end of its stderr (at most 2,000 characters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

/// One complete release, as the registry remembers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub id: String,
    /// The content hash (sorted keys and ETags): what `id` is when derived.
    pub content: String,
    pub created_at_ms: u64,
    pub files: u64,
    /// Taken out of service by a rollback: never "previous" again.
    #[serde(default)]
    pub rolled_back: bool,
}

/// The complete releases of one DEST, in the order they went live.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    releases: Vec<ReleaseInfo>,
}

/// `fleetsync-agent status`: what is live and what could be rolled back to.
#[derive(Debug, Serialize)]
pub struct ReleaseStatus {
    pub dest: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub releases: Vec<ReleaseInfo>,
    /// The report of the last release pull (or rollback).
    pub last_pull: Option<PullReport>,
}

/// DEST in release mode: where things are, and the registry.
struct Layout {
    dest: PathBuf,
    /// The DEST's own state-store directory, which holds the registry.
    state: PathBuf,
    state_root: PathBuf,
}

impl Layout {
    fn new(dest: &Path, state_dir: &Path) -> Layout {
        Layout { dest: dest.to_path_buf(), state: StateStore::dir_for(state_dir, dest), state_root: state_dir.to_path_buf() }
    }

    /// A release's path, for messages, the hook's environment and its state
    /// store's name (never to write through: see [`Releases`]).
    fn dir(&self, id: &str) -> PathBuf {
        self.dest.join(RELEASES).join(id)
    }

    fn registry_path(&self) -> PathBuf {
        self.state.join("releases.json")
    }

    fn last_pull_path(&self) -> PathBuf {
        self.state.join("last-release-pull.json")
    }

    fn load(&self) -> Result<Registry> {
        match std::fs::read(self.registry_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Config(format!(
                    "the release registry {} is damaged ({e}); move it aside to start over",
                    self.registry_path().display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => Err(Error::io(format!("reading {}", self.registry_path().display()), e)),
        }
    }

    fn save(&self, registry: &Registry) -> Result<()> {
        std::fs::create_dir_all(&self.state).map_err(|e| Error::io(format!("creating {}", self.state.display()), e))?;
        write_atomic(&self.registry_path(), &serde_json::to_vec_pretty(registry).expect("the registry serializes"))
    }

    /// The live release, from the `current` symlink (read only: a link
    /// planted elsewhere names no release of ours).
    fn current(&self) -> Result<Option<String>> {
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
    fn forget(&self, id: &str) {
        let _ = std::fs::remove_dir_all(StateStore::dir_for(&self.state_root, &self.dir(id)));
    }
}

/// DEST and `DEST/releases/`, held open: every change release mode makes
/// on disk goes through these descriptors, and `releases` (and everything
/// in it) is reached without following a symlink, so a link planted at
/// `DEST/releases` (or at a release) makes the pull fail instead of making
/// the agent, as root, delete or build somewhere else. DEST itself is the
/// operator's choice and may be a symlink.
struct Releases {
    dest: PathBuf,
    root: OwnedFd,
    dir: OwnedFd,
}

impl Releases {
    /// Opens DEST and `DEST/releases`, creating them.
    fn open(dest: &Path) -> Result<Releases> {
        let err = |e| Error::io(format!("opening {}", dest.join(RELEASES).display()), e);
        std::fs::create_dir_all(dest).map_err(|e| Error::io(format!("creating DEST {}", dest.display()), e))?;
        let root = safe_fs::open_root(dest).map_err(err)?;
        let dir = safe_fs::open_dir_at(&root, RELEASES, true).map_err(err)?;
        Ok(Releases { dest: dest.to_path_buf(), root, dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dest.join(RELEASES).join(id)
    }

    /// A release directory to build into (created if missing).
    fn build(&self, id: &str) -> Result<DestDir> {
        DestDir::open_in(&self.dir, id, self.path(id)).map_err(|e| Error::io(format!("creating release {}", self.path(id).display()), e))
    }

    /// A complete release, to share its files; `None` if it is gone.
    fn read(&self, id: &str) -> Result<Option<DestDir>> {
        DestDir::open_read_only_in(&self.dir, id, self.path(id))
            .map_err(|e| Error::io(format!("opening release {}", self.path(id).display()), e))
    }

    /// The names in `releases/`.
    fn names(&self) -> Result<Vec<String>> {
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

    /// Removes a release's tree (never following a symlink in it).
    fn remove(&self, id: &str) -> Result<()> {
        safe_fs::remove_tree_at(&self.dir, id).map_err(|e| Error::io(format!("removing release {}", self.path(id).display()), e))
    }

    /// Points `current` at the release `id` atomically: a new symlink under
    /// a temporary name, renamed over the old one. A reader resolving
    /// `current` sees the old release or the new one, never neither.
    ///
    /// The file system is synced first: the release's files were written
    /// through the page cache, and a power loss after the switch must not
    /// leave the live release with empty or partial files. One syncfs
    /// costs what writing the new files back costs, once per switch.
    fn switch_to(&self, id: &str) -> Result<()> {
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

    /// Removes release directories that never completed (a killed or failed
    /// build): in `releases/` but not in the registry, and not live.
    fn sweep_incomplete(&self, layout: &Layout, registry: &Registry, current: Option<&str>) -> Result<()> {
        for name in self.names()? {
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

impl Registry {
    fn get(&self, id: &str) -> Option<&ReleaseInfo> {
        self.releases.iter().find(|r| r.id == id)
    }

    /// `id` went live: it moves to the end of the order.
    fn went_live(&mut self, mut info: ReleaseInfo) {
        self.releases.retain(|r| r.id != info.id);
        info.rolled_back = false;
        self.releases.push(info);
    }

    /// The release that was live before `current`: the last one before it
    /// in going-live order that was not rolled back.
    fn previous(&self, current: Option<&str>) -> Option<&ReleaseInfo> {
        let at = self.releases.iter().position(|r| Some(r.id.as_str()) == current)?;
        self.releases[..at].iter().rev().find(|r| !r.rolled_back)
    }

    /// Releases beyond the `keep` most recent, except the live one and the
    /// one before it.
    fn beyond(&self, keep: usize, current: Option<&str>) -> Vec<String> {
        let previous = self.previous(current).map(|r| r.id.clone());
        let n = self.releases.len();
        self.releases[..n.saturating_sub(keep)]
            .iter()
            .filter(|r| Some(r.id.as_str()) != current && Some(&r.id) != previous.as_ref())
            .map(|r| r.id.clone())
            .collect()
    }
}

/// A release id: one path component of safe characters.
pub fn check_release_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "release id {id:?} is not usable as a directory name: use letters, digits, '.', '_' and '-' (not first '.'), at most 128"
        )))
    }
}

/// The release id of a listing: a hash of its sorted (key, ETag) pairs,
/// keys relative to the prefix.
pub(crate) fn content_id(objects: &[RemoteObject], prefix: &str) -> String {
    use md5::{Digest, Md5};
    let mut pairs: Vec<(&str, &str)> = objects.iter().map(|o| (o.key.strip_prefix(prefix).unwrap_or(&o.key), o.etag.as_str())).collect();
    pairs.sort_unstable();
    let mut h = Md5::new();
    for (k, e) in pairs {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(e.as_bytes());
        h.update([b'\n']);
    }
    format!("c{}", &hex::encode(h.finalize())[..15])
}

/// Runs one release pull: list, name, build (or reuse), switch, prune,
/// after-switch. Under the node lock, like an in-place pull.
pub async fn pull_release(opts: &ReleaseOptions, observer: Arc<dyn Observer>) -> Result<PullReport> {
    let t0 = Instant::now();
    let p = &opts.pull;
    pull::check_options(p)?;
    if let Some(id) = &opts.release_id {
        check_release_id(id)?;
    }
    let layout = Layout::new(&p.dest, &p.state_dir);
    if p.dry_run {
        // What the pull would change, relative to the live release.
        let current = layout.current()?;
        let dest = current.map_or_else(|| layout.dest.join(RELEASES).join(".none"), |id| layout.dir(&id));
        return pull::pull(&PullOptions { dest, ..p.clone() }, observer).await;
    }
    let client = s3_client(&p.client).await;
    let (_lock, lock_wait) = NodeLock::acquire(&p.state_dir, p.if_busy).await?;
    let releases = Releases::open(&p.dest)?;
    let mut registry = layout.load()?;
    let current = layout.current()?;
    releases.sweep_incomplete(&layout, &registry, current.as_deref())?;

    let (listing, content, pointer) = consistent_listing(&client, &p.source).await?;
    let id = opts.release_id.clone().or_else(|| pointer.map(|p| p.release_id)).unwrap_or_else(|| content.clone());
    check_release_id(&id)?;
    if let Some(known) = registry.get(&id).filter(|r| r.content != content) {
        return Err(Error::Config(format!(
            "release {id} already exists with other content ({}): give this build a new --release-id",
            known.content
        )));
    }
    // "Empty" counts files: S3-compatible servers may still list a
    // directory marker for the prefix itself.
    // A first release as well as a later one: an instance must never
    // enter service with no code.
    let no_files = !listing.iter().any(|o| matches!(map_key(&o.key, &p.source.prefix), Ok(Some(Entry::File(_)))));
    if no_files && !p.allow_empty {
        let would = match &current {
            Some(cur) => format!("replace release {cur} with an empty one"),
            None => "make an empty first release live".to_string(),
        };
        return Err(pull::empty_source(&p.source, &would));
    }
    let mut release = ReleaseReport { id: id.clone(), previous: current.clone(), ..Default::default() };

    let mut report = if current.as_deref() == Some(id.as_str()) {
        // Live already: the in-place pull of the live tree repairs drift.
        release.previous = registry.previous(current.as_deref()).map(|r| r.id.clone());
        let live = PullOptions { dest: layout.dir(&id), ..p.clone() };
        pull::place(&live, releases.build(&id)?, client, Some(listing), observer, t0).await?
    } else if let Some(info) = registry.get(&id).cloned() {
        // An older complete release: live again, nothing to download.
        let mut report = PullReport::new(p.source.to_string(), p.dest.display().to_string(), false);
        report.counts.listed = listing.len() as u64;
        report.counts.unchanged = listing.len() as u64;
        registry.went_live(info);
        layout.save(&registry)?;
        releases.switch_to(&id)?;
        release.switched = true;
        report
    } else {
        let (report, linked) = build(opts, &layout, &releases, current.as_deref(), &id, client, listing, observer, t0).await?;
        release.linked = linked;
        if report.exit_code != crate::exit::OK {
            // Not every file arrived: the release is not complete, never goes
            // live and is not kept. The live release is untouched.
            releases.remove(&id)?;
            layout.forget(&id);
            let mut report = report;
            report.error = Some(format!("release {id} was not switched: {} files failed (see errors)", report.counts.failed));
            report.durations.total_ms = t0.elapsed().as_millis() as u64;
            return report_with(report, release, lock_wait, &layout);
        }
        let files = listing_files(&report);
        registry.went_live(ReleaseInfo { id: id.clone(), content: content.clone(), created_at_ms: now_ms(), files, rolled_back: false });
        layout.save(&registry)?;
        releases.switch_to(&id)?;
        release.created = true;
        release.switched = true;
        report
    };

    if release.switched {
        if let Some(cmd) = &opts.after_switch {
            let hook = run_hook(cmd, &layout, &id, release.previous.as_deref()).await;
            let failed = !hook.ok;
            release.after_switch = Some(hook);
            if failed {
                report.exit_code = crate::exit::PARTIAL;
                report.status = crate::report::PullStatus::Failed;
                report.error = Some(format!("the after-switch command failed on release {id}"));
                if opts.rollback_on_failure {
                    if let Some(prev) = release.previous.clone().filter(|prev| registry.get(prev).is_some()) {
                        if let Some(r) = registry.releases.iter_mut().find(|r| r.id == id) {
                            r.rolled_back = true;
                        }
                        layout.save(&registry)?;
                        releases.switch_to(&prev)?;
                        release.rolled_back = true;
                        report.error = Some(format!("the after-switch command failed on release {id}; {prev} is live again"));
                    }
                }
            }
        }
        // Unregistered first, then deleted: a kill in between leaves an
        // unregistered directory, which the next pull sweeps, never a
        // half-deleted release the registry calls complete.
        let live = layout.current()?;
        let old = registry.beyond(opts.keep, live.as_deref());
        registry.releases.retain(|r| !old.contains(&r.id));
        layout.save(&registry)?;
        for id in old {
            // A release that cannot be removed is already unregistered: the
            // next pull's sweep tries again. Not a reason to fail a pull
            // that went live.
            match releases.remove(&id) {
                Ok(()) => {
                    layout.forget(&id);
                    release.removed.push(id);
                }
                Err(e) => tracing::warn!(release = %id, error = %e, "could not remove an old release; the next pull tries again"),
            }
        }
    }
    report.durations.total_ms = t0.elapsed().as_millis() as u64;
    report_with(report, release, lock_wait, &layout)
}

/// Listings tried before concluding that the source does not match its
/// release pointer, and the pause between them.
const POINTER_TRIES: u32 = 3;
const POINTER_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Lists the source and, when `fleetsync publish` wrote a release pointer,
/// checks that the listing is what the pointer describes. A mismatch is a
/// publish in progress (uploads done, pointer not yet written, or the
/// reverse): listed again a few times, then refused, so that no release is
/// ever built from a half-published tree.
async fn consistent_listing(
    client: &aws_sdk_s3::Client,
    source: &crate::S3Url,
) -> Result<(Vec<RemoteObject>, String, Option<crate::publish::Pointer>)> {
    let mut tries = 0;
    loop {
        tries += 1;
        let pointer = crate::publish::read_pointer(client, source).await?;
        let listing = list::collect(client.clone(), source.clone()).await?;
        let content = content_id(&listing, &source.prefix);
        match pointer {
            Some(p) if p.content != content => {
                if tries >= POINTER_TRIES {
                    return Err(Error::S3(format!(
                        "{source} does not match its release pointer (release {}, content {}; listed {content}): a publish is in progress or was interrupted; the live release is unchanged (publish again, or pull once it is done)",
                        p.release_id, p.content
                    )));
                }
                tokio::time::sleep(POINTER_PAUSE).await;
            }
            pointer => return Ok((listing, content, pointer)),
        }
    }
}

/// Builds release `id` beside the live one: hard links for what did not
/// change, the in-place pull for the rest. Returns the pull's report and
/// how many files were linked.
#[allow(clippy::too_many_arguments)]
async fn build(
    opts: &ReleaseOptions,
    layout: &Layout,
    releases: &Releases,
    current: Option<&str>,
    id: &str,
    client: aws_sdk_s3::Client,
    listing: Vec<RemoteObject>,
    observer: Arc<dyn Observer>,
    t0: Instant,
) -> Result<(PullReport, u64)> {
    let p = &opts.pull;
    let dir = layout.dir(id);
    let mut dst = releases.build(id)?;
    let mut linked = 0;
    if let Some(src) = current.map(|cur| releases.read(cur)).transpose()?.flatten() {
        let wanted: HashMap<String, String> = listing
            .iter()
            .filter_map(|o| match map_key(&o.key, &p.source.prefix) {
                Ok(Some(Entry::File(path))) => Some((path.as_str().to_string(), o.etag.clone())),
                _ => None,
            })
            .collect();
        let (state_dir, from) = (p.state_dir.clone(), layout.dir(current.expect("a source release is the live one")));
        let to = dir.clone();
        let seeded = tokio::task::spawn_blocking(move || seed(&state_dir, &from, &src, &to, &dst, &wanted).map(|n| (n, dst)));
        (linked, dst) = seeded.await.expect("seeding does not panic")?;
    }
    let target = PullOptions { dest: dir, ..p.clone() };
    match pull::place(&target, dst, client, Some(listing), observer, t0).await {
        Ok(report) => Ok((report, linked)),
        Err(e) => {
            // The pull failed as a whole (a hostile key, say): the partial
            // release goes, the live one was never touched.
            releases.remove(id)?;
            layout.forget(id);
            Err(e)
        }
    }
}

/// Hard-links into `dst` (release `to`) every file of `src` (release
/// `from`) whose ETag is still wanted, and records them in `to`'s state
/// store as placed.
fn seed(state_dir: &Path, from: &Path, src: &DestDir, to: &Path, dst: &DestDir, wanted: &HashMap<String, String>) -> Result<u64> {
    let placed = StateStore::load_read_only(state_dir, from)?;
    let mut seeded: HashMap<RelPath, Placed> = HashMap::new();
    for (path, record) in placed {
        if wanted.get(path.as_str()) != Some(&record.etag) {
            continue;
        }
        // A file that cannot be linked (gone, drifted into a directory) is
        // simply downloaded by the pull.
        if dst.link_from(src, &path).is_ok() {
            seeded.insert(path, record);
        }
    }
    let (store, _) = StateStore::open(state_dir, to)?;
    store.seed(&seeded)?;
    Ok(seeded.len() as u64)
}

/// The number of files in the release the report describes.
fn listing_files(report: &PullReport) -> u64 {
    report.counts.downloaded + report.counts.unchanged
}

/// Runs the after-switch command with the release in its environment.
async fn run_hook(cmd: &str, layout: &Layout, id: &str, previous: Option<&str>) -> HookReport {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("FLEETSYNC_RELEASE", id)
        .env("FLEETSYNC_RELEASE_DIR", layout.dir(id))
        .env("FLEETSYNC_PREVIOUS_RELEASE", previous.unwrap_or(""))
        .env("FLEETSYNC_DEST", &layout.dest)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            HookReport { command: cmd.to_string(), exit_code: out.status.code(), ok: out.status.success(), stderr: tail.trim().to_string() }
        }
        Err(e) => HookReport { command: cmd.to_string(), exit_code: None, ok: false, stderr: format!("could not run sh: {e}") },
    }
}

/// Puts the release part into the report, records it as the last pull
/// (for `status`), and returns it.
fn report_with(mut report: PullReport, release: ReleaseReport, lock_wait: std::time::Duration, layout: &Layout) -> Result<PullReport> {
    report.dest = layout.dest.display().to_string();
    report.durations.lock_wait_ms = lock_wait.as_millis() as u64;
    report.finished_at_ms = now_ms();
    report.release = Some(release);
    std::fs::create_dir_all(&layout.state).map_err(|e| Error::io(format!("creating {}", layout.state.display()), e))?;
    write_atomic(&layout.last_pull_path(), &serde_json::to_vec(&report).expect("reports serialize"))?;
    Ok(report)
}

fn read_last(layout: &Layout) -> Option<PullReport> {
    serde_json::from_slice(&std::fs::read(layout.last_pull_path()).ok()?).ok()
}

/// `rollback`: makes `to` (default: the release before the live one) live
/// again, under the node lock. The release rolled back from is kept but is
/// never "previous" again.
pub async fn rollback(dest: &Path, state_dir: &Path, to: Option<&str>, if_busy: IfBusy) -> Result<PullReport> {
    let layout = Layout::new(dest, state_dir);
    let (_lock, lock_wait) = NodeLock::acquire(state_dir, if_busy).await?;
    let mut registry = layout.load()?;
    let current = layout.current()?;
    let target = match to {
        Some(id) => {
            check_release_id(id)?;
            registry.get(id).cloned().ok_or_else(|| {
                let known: Vec<&str> = registry.releases.iter().map(|r| r.id.as_str()).collect();
                Error::Config(format!("no complete release {id} in {} (known: {})", dest.display(), known.join(", ")))
            })?
        }
        None => registry.previous(current.as_deref()).cloned().ok_or_else(|| {
            Error::Config(format!("nothing to roll back to in {}: there is no release before the live one", dest.display()))
        })?,
    };
    let mut report = PullReport::new(String::new(), dest.display().to_string(), false);
    report.started_at_ms = now_ms();
    let mut release = ReleaseReport { id: target.id.clone(), previous: current.clone(), ..Default::default() };
    if current.as_deref() != Some(target.id.as_str()) {
        if let Some(cur) = current.as_deref() {
            if let Some(r) = registry.releases.iter_mut().find(|r| r.id == cur) {
                r.rolled_back = true;
            }
        }
        // Keep the going-live order: the target stays where it was, so a
        // second rollback goes further back.
        layout.save(&registry)?;
        Releases::open(dest)?.switch_to(&target.id)?;
        release.switched = true;
    }
    report.counts.unchanged = target.files;
    report_with(report, release, lock_wait, &layout)
}

/// `status`: the live release, the one before it, every kept release and
/// the last pull's report. Takes no lock: it only reads.
pub fn status(dest: &Path, state_dir: &Path) -> Result<ReleaseStatus> {
    let layout = Layout::new(dest, state_dir);
    let registry = layout.load()?;
    let current = layout.current()?;
    Ok(ReleaseStatus {
        dest: dest.display().to_string(),
        previous: registry.previous(current.as_deref()).map(|r| r.id.clone()),
        current,
        releases: registry.releases,
        last_pull: read_last(&layout),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> ReleaseInfo {
        ReleaseInfo { id: id.into(), content: id.into(), created_at_ms: 0, files: 1, rolled_back: false }
    }

    #[test]
    fn previous_skips_rolled_back_releases_and_pruning_spares_live_and_previous() {
        let mut r = Registry::default();
        for id in ["a", "b", "c", "d"] {
            r.went_live(info(id));
        }
        assert_eq!(r.previous(Some("d")).unwrap().id, "c");
        r.releases[3].rolled_back = true; // d rolled back: c is live
        assert_eq!(r.previous(Some("c")).unwrap().id, "b");
        r.went_live(info("e"));
        assert_eq!(r.previous(Some("e")).unwrap().id, "c", "d was rolled back, so c was live before e");
        assert_eq!(r.beyond(1, Some("e")), ["a", "b", "d"]);
        assert_eq!(r.beyond(10, Some("e")), Vec::<String>::new());
        // Live is an old release (rolled back to): it and its previous stay.
        assert_eq!(r.beyond(0, Some("b")), ["c", "d", "e"]);
    }

    #[test]
    fn content_ids_ignore_order_and_see_etag_changes() {
        let o = |k: &str, e: &str| RemoteObject { key: format!("p/{k}"), etag: e.into(), size: 1 };
        let a = content_id(&[o("x", "1"), o("y", "2")], "p/");
        assert_eq!(a, content_id(&[o("y", "2"), o("x", "1")], "p/"));
        assert_ne!(a, content_id(&[o("x", "1"), o("y", "3")], "p/"));
        assert!(check_release_id(&a).is_ok());
        for bad in ["", ".hidden", "a/b", "..", "x y", "é"] {
            assert!(check_release_id(bad).is_err(), "{bad}");
        }
    }
}
