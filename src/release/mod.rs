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
//! A pull names the release the source stands for, then makes it live:
//! - from the release store ([`from_store`]), when the source was published
//!   with `fleetsync publish`: the release the node's group is deployed on
//!   (or `--release-id`, or the latest one), one conditional GET of a
//!   pointer; its manifest diffed against the live release's files;
//! - from a listing ([`from_listing`]) of a plain prefix written by anything
//!   else: named by `--release-id` or a hash of its keys and ETags.
//!
//! If the release is live already, the pull checks it on disk (and repairs
//! drift). If it is an older complete release, it goes live again without a
//! download. Otherwise it is built beside the live one: files that did not
//! change are hard links to the live release's, the rest is fetched into
//! the new directory. Only a release whose every file arrived goes into the
//! registry and then live; a failed or killed build is removed by the next
//! pull and never counted.
//!
//! Hard links are safe to share because nothing writes into a placed file:
//! a changed file is a new temporary file renamed over the link, which
//! leaves the inode the older release holds untouched; and a file whose
//! mode alone changed is copied, never chmod-ed under the older release.

mod assets;
mod fetch;
mod from_listing;
mod from_store;
pub mod health;
mod hook;
mod layout;
mod next;
mod shared;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::node_lock::{IfBusy, NodeLock};
use crate::progress::Observer;
use crate::pull::{self, PullOptions};
use crate::report::{PullReport, ReleaseReport};
use crate::source::s3_client;
use crate::store::check_release_id;

pub use assets::KeepAssets;
pub use hook::DEFAULT_TIMEOUT as DEFAULT_HOOK_TIMEOUT;
use layout::{Layout, Releases};
pub use shared::{Shared, SHARED};

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
    /// The release to make live: a release of the store, or the name of
    /// a plain prefix's release; default: the group's deployed release (in
    /// a store), else derived from the content.
    pub release_id: Option<String>,
    /// With `release_id`: the SHA-256 of its manifest, as the deploy that
    /// names it read it. A copy on the node recorded with another digest
    /// is checked against the store before it is trusted; without it, a
    /// live copy of the id is trusted by name (no request).
    pub manifest: Option<crate::store::Digest>,
    /// The Auto Scaling Group the node belongs to: the node follows the
    /// release this group is deployed on. Default: the group recorded by
    /// the last pull that named one.
    pub group: Option<String>,
    /// Releases kept (besides the live one and the one before it, which
    /// are never removed).
    pub keep: usize,
    /// A shell command run in the new release, complete, before the
    /// switch (a cache warm-up, `php artisan config:cache`): failing or
    /// timing out, nothing switches.
    pub before_switch: Option<String>,
    /// A shell command run after the switch (a restart of an app that
    /// loads its code at start).
    pub after_switch: Option<String>,
    /// How long either hook may run before it is killed, with its process
    /// group.
    pub hook_timeout: std::time::Duration,
    /// Asked for after the switch (and after `after_switch`), and on a
    /// pull that finds the release live already: it must answer 2xx within
    /// `health_timeout` (see [`health`]).
    pub health_url: Option<String>,
    pub health_timeout: std::time::Duration,
    /// Switch back to the previous release when `after_switch` or the
    /// health check fails.
    pub rollback_on_failure: bool,
    /// Paths that outlive a release (`--shared`): see [`Shared`].
    pub shared: Vec<Shared>,
    /// Assets of the live release carried into the new one
    /// (`--keep-assets`): see [`KeepAssets`].
    pub keep_assets: KeepAssets,
    /// How long a full check of the live release for drift is trusted: a
    /// pull within it stats nothing (see [`next`]); zero checks on every
    /// pull.
    pub verify_every: std::time::Duration,
}

/// `--verify-every` when not given: with the timer's 5 minutes (and up to
/// 1 minute of jitter), a file changed under the live release is repaired
/// within 21 minutes.
pub const DEFAULT_VERIFY_EVERY: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// One complete release, as the registry remembers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub id: String,
    /// Its content: the store's tree digest, or for a listing the hash of
    /// its keys and ETags. An id never names two contents.
    pub content: String,
    pub created_at_ms: u64,
    pub files: u64,
    /// Taken out of service by a rollback: never "previous" again.
    #[serde(default)]
    pub rolled_back: bool,
    /// A store release: the SHA-256 of the manifest it was built from. A
    /// pointer (or the bastion) naming this id with another digest names
    /// another publish of it, which is checked before the node trusts its
    /// copy. `None` for a listing's release, and for one recorded before
    /// digests were (checked once, then recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<crate::store::Digest>,
}

/// The complete releases of one DEST, in the order they went live.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Registry {
    releases: Vec<ReleaseInfo>,
}

/// `fleetsync-agent status`: what is live and what could be rolled back to.
#[derive(Debug, Serialize)]
pub struct ReleaseStatus {
    /// [`crate::report::REPORT_FORMAT`]: the status shares the report's.
    pub format: u32,
    /// `fleetsync-agent --version` of the agent that answered.
    pub agent_version: String,
    pub dest: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub releases: Vec<ReleaseInfo>,
    /// The report of the last release pull (or rollback).
    pub last_pull: Option<PullReport>,
}

impl Registry {
    pub(crate) fn get(&self, id: &str) -> Option<&ReleaseInfo> {
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

/// What the source asked for, once a release path has looked at it.
enum Step {
    /// The live release is it (drift repaired, if any): nothing switches.
    /// `register`: the registry did not know it (it was rebuilt after a
    /// crash); it is registered again, as verified by this pull.
    Live { report: PullReport, id: String, register: Option<ReleaseInfo> },
    /// A deploy of the node's group is under way or failed: the node keeps
    /// its live release (`register`: as for `Live`).
    Held { report: PullReport, id: String, reason: String, register: Option<ReleaseInfo> },
    /// A complete release already on disk: it goes live again.
    Existing { report: PullReport, info: ReleaseInfo },
    /// A new release, complete: registered, then live.
    Built { report: PullReport, info: ReleaseInfo, linked: u64, copied: u64 },
    /// A new release that did not complete: removed, never live.
    Incomplete { report: PullReport, id: String, linked: u64 },
}

/// What a release path needs: the options, where things are on disk, what
/// is live, the client, the progress observer.
struct Ctx<'a> {
    opts: &'a ReleaseOptions,
    layout: &'a Layout,
    releases: &'a Releases,
    registry: &'a Registry,
    current: Option<String>,
    client: aws_sdk_s3::Client,
    observer: Arc<dyn Observer>,
    t0: Instant,
    /// Files the release publishes under shared paths, not placed.
    shared_skipped: std::sync::atomic::AtomicU64,
    /// Assets of the live release carried into the new one.
    kept_assets: std::sync::atomic::AtomicU64,
    /// The new release was built from the staged copy ([`next`]).
    staged: std::sync::atomic::AtomicBool,
}

impl Ctx<'_> {
    /// Refuses `id` for `content` when the registry knows it with other
    /// content: an id never names two trees.
    fn check_content(&self, id: &str, content: &str) -> Result<()> {
        match self.registry.get(id) {
            Some(known) if known.content != content => Err(Error::Config(format!(
                "release {id} already exists with other content on this node ({}): give this build a new --release-id",
                known.content
            ))),
            _ => Ok(()),
        }
    }

    /// A release with no files never goes live, first or not: an instance
    /// must never enter service with no code.
    fn check_not_empty(&self, files: u64) -> Result<()> {
        if files > 0 || self.opts.pull.allow_empty {
            return Ok(());
        }
        let would = match &self.current {
            Some(cur) => format!("replace release {cur} with an empty one"),
            None => "make an empty first release live".to_string(),
        };
        Err(pull::empty_source(&self.opts.pull.source, &would))
    }
}

/// Runs one release pull: name the release, build it (or reuse it),
/// switch, run the after-switch command, prune. Under the node lock, like
/// an in-place pull.
pub async fn pull_release(opts: &ReleaseOptions, observer: Arc<dyn Observer>) -> Result<PullReport> {
    let t0 = Instant::now();
    let p = &opts.pull;
    pull::check_options(p)?;
    if let Some(id) = &opts.release_id {
        check_release_id(id)?;
    }
    if let Some(g) = &opts.group {
        crate::store::check_group(g)?;
    }
    shared::check(&opts.shared, &p.dest)?;
    opts.keep_assets.check(&opts.shared)?;
    let layout = Layout::new(&p.dest, &p.state_dir);
    if p.dry_run {
        // What the pull would change, relative to the live release.
        let current = layout.current()?;
        let client = s3_client(&p.client).await;
        let registry = layout.load(false)?;
        let lookup = from_store::Lookup {
            opts,
            layout: &layout,
            client: &client,
            current: current.as_deref(),
            registry: &registry,
            remember: false,
        };
        if let Some(report) = from_store::dry_run(&lookup).await? {
            return Ok(report);
        }
        let dest = current.map_or_else(|| layout.dest.join(RELEASES).join(".none"), |id| layout.dir(&id));
        return pull::pull(&PullOptions { dest, ..p.clone() }, observer).await;
    }
    let client = s3_client(&p.client).await;
    let (lock, lock_wait) = NodeLock::acquire(&p.state_dir, p.if_busy).await?;
    let releases = Releases::open(&p.dest, p.owner)?;
    let mut registry = layout.load(true)?;
    let current = layout.current()?;
    releases.sweep_incomplete(&layout, &registry, current.as_deref())?;

    let ctx = Ctx {
        opts,
        layout: &layout,
        releases: &releases,
        registry: &registry,
        current: current.clone(),
        client,
        observer,
        t0,
        shared_skipped: std::sync::atomic::AtomicU64::new(0),
        kept_assets: std::sync::atomic::AtomicU64::new(0),
        staged: std::sync::atomic::AtomicBool::new(false),
    };
    let lookup =
        from_store::Lookup { opts, layout: &layout, client: &ctx.client, current: current.as_deref(), registry: &registry, remember: true };
    let (step, store) = match from_store::resolve(&lookup).await? {
        Some(target) => (from_store::run(&ctx, target).await?, true),
        None => (from_listing::run(&ctx).await?, false),
    };

    let mut release = ReleaseReport {
        previous: current.clone(),
        store,
        shared_skipped: ctx.shared_skipped.load(std::sync::atomic::Ordering::Relaxed),
        kept_assets: ctx.kept_assets.load(std::sync::atomic::Ordering::Relaxed),
        staged: ctx.staged.load(std::sync::atomic::Ordering::Relaxed),
        ..Default::default()
    };
    let (mut report, id) = match step {
        Step::Live { report, id, register } => {
            register_live(&mut registry, &layout, register, &report)?;
            release.previous = registry.previous(current.as_deref()).map(|r| r.id.clone());
            (report, id)
        }
        Step::Held { report, id, reason, register } => {
            register_live(&mut registry, &layout, register, &report)?;
            release.previous = registry.previous(current.as_deref()).map(|r| r.id.clone());
            release.held = Some(reason);
            (report, id)
        }
        Step::Existing { mut report, info } => {
            let id = info.id.clone();
            if let Some(failed) = before_switch(opts, &layout, &id, current.as_deref(), &mut release, &mut report).await {
                // Complete and kept: the next pull runs the command again.
                return report_with(failed, release, lock_wait, &layout);
            }
            registry.went_live(info);
            layout.save(&registry)?;
            releases.switch_to(&id)?;
            report.durations.live_after_ms = t0.elapsed().as_millis() as u64;
            release.switched = true;
            (report, id)
        }
        Step::Built { mut report, info, linked, copied } => {
            let id = info.id.clone();
            (release.created, release.linked, release.copied) = (true, linked, copied);
            if let Some(failed) = before_switch(opts, &layout, &id, current.as_deref(), &mut release, &mut report).await {
                // Never live, never registered: removed as a failed build
                // is (the next pull builds it again from what is on disk).
                releases.remove(&id)?;
                layout.forget(&id);
                return report_with(failed, release, lock_wait, &layout);
            }
            registry.went_live(info);
            layout.save(&registry)?;
            releases.switch_to(&id)?;
            report.durations.live_after_ms = t0.elapsed().as_millis() as u64;
            (release.created, release.switched, release.linked, release.copied) = (true, true, linked, copied);
            (report, id)
        }
        Step::Incomplete { mut report, id, linked } => {
            // Not every file arrived: the release is not complete, never goes
            // live and is not kept. The live release is untouched.
            // (A release this node had, whose repair failed, is unregistered
            // first: the registry never names a release that is not whole.)
            if registry.get(&id).is_some() {
                registry.releases.retain(|r| r.id != id);
                layout.save(&registry)?;
            }
            releases.remove(&id)?;
            layout.forget(&id);
            report.set_error(format!("release {id} was not switched: {} files failed (see errors)", report.counts.failed));
            report.durations.total_ms = t0.elapsed().as_millis() as u64;
            release.id = id;
            release.linked = linked;
            return report_with(report, release, lock_wait, &layout);
        }
    };
    release.id = id.clone();

    // What must hold once the release is live: its after-switch command ran
    // (after a switch), and it serves. A pull that finds its release live
    // already asks it too: a re-run of a deploy whose health check failed
    // (and did not roll back) must not report the node healthy. The first
    // that fails fails the pull; only a switch is switched back.
    let live_already =
        !release.switched && release.held.is_none() && opts.health_url.is_some() && layout.current()?.as_deref() == Some(id.as_str());
    let previous = release.previous.clone();
    let failed =
        AfterLive::of(opts).run(&layout, &id, previous.as_deref(), release.switched, release.switched || live_already, &mut release).await;
    if let Some(what) = failed {
        let already = if live_already { ", live already" } else { "" };
        report.exit_code = crate::exit::PARTIAL;
        report.status = crate::report::PullStatus::Failed;
        report.set_error(format!("{what} on release {id}{already}"));
        if release.switched && opts.rollback_on_failure {
            if let Some(prev) = release.previous.clone().filter(|prev| registry.get(prev).is_some()) {
                if let Some(r) = registry.releases.iter_mut().find(|r| r.id == id) {
                    r.rolled_back = true;
                }
                layout.save(&registry)?;
                releases.switch_to(&prev)?;
                release.rolled_back = true;
                // What the after-switch command did (an app restarted into
                // this release, a web server pointed at it) is undone by
                // running it again for the release live again.
                let again = match &opts.after_switch {
                    Some(cmd) => match hook::run(cmd, &layout, &prev, Some(&id), opts.hook_timeout).await {
                        back if back.ok => String::new(),
                        back => format!(" (its after-switch command failed too: {})", back.stderr.lines().last().unwrap_or("no output")),
                    },
                    None => String::new(),
                };
                report.set_error(format!("{what} on release {id}; {prev} is live again{again}"));
            }
        }
    }

    if store && !release.rolled_back {
        after_store_pull(opts, &layout, &releases, &id, release.switched, release.staged);
    }
    if release.switched {
        // Unregistered first, then set aside: a kill in between leaves an
        // unregistered directory, which the next pull sweeps, never a
        // half-deleted release the registry calls complete. Its files are
        // unlinked by the next pull that does not switch (the timer's),
        // not by this one, which a deploy waits for.
        let live = layout.current()?;
        let old = registry.beyond(opts.keep, live.as_deref());
        registry.releases.retain(|r| !old.contains(&r.id));
        layout.save(&registry)?;
        for id in old {
            // A release that cannot be set aside is already unregistered:
            // the next pull's sweep removes it. Not a reason to fail a pull
            // that went live.
            match releases.retire(&id) {
                Ok(()) => {
                    layout.forget(&id);
                    release.removed.push(id);
                }
                Err(e) => tracing::warn!(release = %id, error = %e, "could not set an old release aside; the next pull removes it"),
            }
        }
    }
    report.durations.total_ms = t0.elapsed().as_millis() as u64;
    let switched = release.switched;
    let report = report_with(report, release, lock_wait, &layout);
    // After the lock: a deploy that starts meanwhile does not wait for
    // these unlinks (nothing else touches a release set aside). A pull
    // that switched leaves them to the next one, unless more than a few
    // wait (a node whose pulls all switch: no timer).
    drop(lock);
    releases.remove_retired(if switched { RETIRED_WAITING } else { 0 });
    report
}

/// Releases set aside by deploys that a deploy's own pull leaves for the
/// next pull that switches nothing (see [`Releases::retire`]); beyond
/// them, the oldest are removed by the deploy itself, so a node whose
/// pulls all switch does not fill its disk.
const RETIRED_WAITING: usize = 2;

/// What follows a store release's pull, out of the deploy's way
/// ([`next`]):
/// - a release built fresh went live checked (each file it shares with
///   the release before was stat-ed as it was linked, the rest is new),
///   which is recorded; one built from the staged copy was not looked at
///   before its switch, and the next pull checks it in full;
/// - a pull that found its release live and checked (by this pull, or
///   within `--verify-every`) stages the next release from it, once: at
///   the pull's (low) priority, on the timer's pull after a deploy rather
///   than in the deploy, whose nodes the bastion waits for.
///
/// Neither can fail the pull.
fn after_store_pull(opts: &ReleaseOptions, layout: &Layout, releases: &Releases, id: &str, switched: bool, staged: bool) {
    let key = next::key(opts);
    if switched {
        if staged {
            next::distrust(layout);
        } else {
            next::mark_verified(layout, id, &key);
        }
        return;
    }
    if next::staged_from(layout, id) || !next::verified_within(layout, id, &key, opts.verify_every.max(std::time::Duration::from_secs(60)))
    {
        return;
    }
    let t = Instant::now();
    match next::prepare(layout, releases, &opts.pull.state_dir, id, &key) {
        Ok(files) => tracing::info!(release = %id, files, ms = t.elapsed().as_millis() as u64, "staged the next release"),
        Err(e) => {
            tracing::warn!(release = %id, error = %e, "could not stage the next release; the next deploy links from the live one");
            let _ = next::discard(layout, releases);
        }
    }
}

/// Runs the before-switch command, if any, on release `id` (complete, not
/// live); on success records what it wrote as part of the release (a store
/// release's shape). The report to end the pull with when it failed:
/// nothing switched, exit 1, the command's last lines.
async fn before_switch(
    opts: &ReleaseOptions,
    layout: &Layout,
    id: &str,
    live: Option<&str>,
    release: &mut ReleaseReport,
    report: &mut PullReport,
) -> Option<PullReport> {
    let cmd = opts.before_switch.as_ref()?;
    let hook = hook::run(cmd, layout, id, live, opts.hook_timeout).await;
    let still = live.map_or("nothing".to_string(), |l| format!("release {l}"));
    let why = if hook.ok {
        // Published files are hard links shared with the live release: a
        // command that rewrites one in place changed the live one too.
        let rewritten = from_store::rewritten(layout, &opts.pull.state_dir, id, 5);
        if rewritten.is_empty() {
            release.before_switch = Some(hook);
            release.id = id.to_string();
            from_store::adopt_made(layout, &opts.pull.state_dir, id);
            return None;
        }
        // The live release changed with them: checked in full next time.
        next::distrust(layout);
        format!(
            "the before-switch command rewrote published files in place ({}): they are hard links shared with the live release, which changed too (the next pull repairs it); write new files, or replace files by renaming a new one over them. Nothing switched, {still} is still live",
            rewritten.join(", ")
        )
    } else {
        // Its last lines (stdout and stderr as they came): the reason.
        let mut tail: Vec<&str> = hook.stderr.lines().rev().map(str::trim).filter(|l| !l.is_empty()).take(3).collect();
        tail.reverse();
        let last = if tail.is_empty() { "no output".to_string() } else { tail.join("; ") };
        let how = hook.exit_code.map_or("was killed".to_string(), |c| format!("exited {c}"));
        format!("the before-switch command {how} on release {id} ({last}): nothing switched, {still} is still live")
    };
    release.before_switch = Some(hook);
    release.id = id.to_string();
    let mut failed = std::mem::replace(report, PullReport::new(String::new(), String::new(), false));
    failed.exit_code = crate::exit::PARTIAL;
    failed.status = crate::report::PullStatus::Failed;
    failed.set_error(why);
    Some(failed)
}

/// Puts the release part into the report, records it as the last pull
/// (for `status`), and returns it.
fn report_with(mut report: PullReport, release: ReleaseReport, lock_wait: std::time::Duration, layout: &Layout) -> Result<PullReport> {
    report.dest = layout.dest.display().to_string();
    report.durations.lock_wait_ms = lock_wait.as_millis() as u64;
    report.finished_at_ms = now_ms();
    report.release = Some(release);
    std::fs::create_dir_all(&layout.state).map_err(|e| Error::io(format!("creating {}", layout.state.display()), e))?;
    crate::safe_fs::write_state_file(&layout.last_pull_path(), &serde_json::to_vec(&report).expect("reports serialize"))?;
    Ok(report)
}

fn read_last(layout: &Layout) -> Option<PullReport> {
    serde_json::from_slice(&std::fs::read(layout.last_pull_path()).ok()?).ok()
}

/// Registers the live release again when the registry had lost it and
/// this pull checked it whole against its source.
fn register_live(registry: &mut Registry, layout: &Layout, register: Option<ReleaseInfo>, report: &PullReport) -> Result<()> {
    match register.filter(|_| report.exit_code == crate::exit::OK) {
        // Known already (a digest or file count recorded): updated where it
        // is, so the going-live order, and so `previous`, stay.
        Some(info) if registry.get(&info.id).is_some() => {
            if let Some(r) = registry.releases.iter_mut().find(|r| r.id == info.id) {
                *r = ReleaseInfo { rolled_back: r.rolled_back, ..info };
            }
            layout.save(registry)
        }
        Some(info) => {
            registry.went_live(info);
            layout.save(registry)
        }
        None => Ok(()),
    }
}

/// `rollback`: makes `to` (default: the release before the live one) live
/// again, under the node lock. The release rolled back from is kept but is
/// never "previous" again.
///
/// What `then` names follows, as after a pull's switch: the after-switch
/// command (a Node app restarted into the release made live) and the
/// health check. A release that fails either stays live (it is what was
/// asked for) and the report says so, exit 1.
pub async fn rollback(dest: &Path, state_dir: &Path, to: Option<&str>, then: &AfterLive, if_busy: IfBusy) -> Result<PullReport> {
    let layout = Layout::new(dest, state_dir);
    let (_lock, lock_wait) = NodeLock::acquire(state_dir, if_busy).await?;
    let mut registry = layout.load(true)?;
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
        // What goes live was not checked by this command: the next pull
        // checks it, and stages from it, before trusting it.
        next::distrust(&layout);
        Releases::open(dest, None)?.switch_to(&target.id)?;
        release.switched = true;
    }
    report.counts.unchanged = target.files;
    if let Some(what) = then.run(&layout, &target.id, current.as_deref(), release.switched, true, &mut release).await {
        report.exit_code = crate::exit::PARTIAL;
        report.status = crate::report::PullStatus::Failed;
        report.set_error(format!("release {} is live, but {what}: roll back to another release, or fix it and deploy", target.id));
    }
    report_with(report, release, lock_wait, &layout)
}

/// What must hold once a release is live, after a pull's switch and a
/// rollback's alike: its after-switch command ran, and it answers its
/// health URL.
#[derive(Debug, Clone, Default)]
pub struct AfterLive {
    /// The after-switch command (`--after-switch`, `after-switch` in
    /// agent.toml), run only when the release was just switched to.
    pub after_switch: Option<String>,
    pub hook_timeout: std::time::Duration,
    /// A URL the release must answer with 2xx (`--health-url`).
    pub health_url: Option<String>,
    pub health_timeout: std::time::Duration,
}

impl AfterLive {
    /// A pull's, from its options.
    fn of(opts: &ReleaseOptions) -> AfterLive {
        AfterLive {
            after_switch: opts.after_switch.clone(),
            hook_timeout: opts.hook_timeout,
            health_url: opts.health_url.clone(),
            health_timeout: opts.health_timeout,
        }
    }

    /// Runs the after-switch command on release `id` when it was just
    /// `switched` to, then, when that passed and `ask`, the health check;
    /// records both in `release`. What failed, if anything.
    async fn run(
        &self,
        layout: &Layout,
        id: &str,
        previous: Option<&str>,
        switched: bool,
        ask: bool,
        release: &mut ReleaseReport,
    ) -> Option<String> {
        if let (true, Some(cmd)) = (switched, &self.after_switch) {
            let hook = hook::run(cmd, layout, id, previous, self.hook_timeout).await;
            let ok = hook.ok;
            release.after_switch = Some(hook);
            if !ok {
                return Some("the after-switch command failed".to_string());
            }
        }
        let url = self.health_url.as_ref().filter(|_| ask)?;
        let health = health::check(url, self.health_timeout).await;
        let failed = (!health.ok).then(|| format!("the health check of {url} failed ({})", health.error.as_deref().unwrap_or("no answer")));
        release.health = Some(health);
        failed
    }
}

/// `status`: the live release, the one before it, every kept release and
/// the last pull's report. Takes no lock: it only reads.
pub fn status(dest: &Path, state_dir: &Path) -> Result<ReleaseStatus> {
    let layout = Layout::new(dest, state_dir);
    let registry = layout.load(false)?;
    let current = layout.current()?;
    Ok(ReleaseStatus {
        format: crate::report::REPORT_FORMAT,
        agent_version: crate::VERSION.to_string(),
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
        ReleaseInfo { id: id.into(), content: id.into(), created_at_ms: 0, files: 1, rolled_back: false, manifest: None }
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
        use super::from_listing::content_id;
        use crate::list::RemoteObject;
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
