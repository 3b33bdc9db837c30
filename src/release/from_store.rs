//! A release from the release store ([`crate::store`]): resolve -> plan ->
//! fetch -> (the caller) switch.
//!
//! Resolve: which release this node should run, with as few requests as
//! possible.
//! - `--release-id ID` (what the bastion passes): that release. When it is
//!   live already, intact on disk and came from the store, not one request.
//! - Otherwise the node's group's `deployed/GROUP.json` (the group is
//!   `--group`, or `group` in agent.toml, or the one the last deploy named),
//!   else `latest.json`, read with `If-None-Match` on the ETag seen last: an
//!   unchanged pointer is a 304 with no body, and with the live release
//!   intact on disk the pull ends there: a no-op is one request.
//! - A deploy under way or failed (`deploying`, `failed`) holds a node that
//!   has a release (the deploy itself switches it); a node with nothing
//!   live boots the group's previous release, the last one deployed whole.
//! - No pointer at all: not a store; the prefix is listed instead.
//!
//! Plan: the manifest (one GET, checked against the pointer's digest and
//! parsed without trusting it) diffed against the live release's files,
//! which the state store knows by content digest and mode: a file whose
//! digest and mode are unchanged (at any path) is hard-linked, one whose
//! mode alone changed is copied (never chmod-ed under the live release),
//! the rest is fetched ([`super::fetch`]). Nothing is listed.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::fetch::{parse_store_etag, store_etag, store_etag_prefix, Failure, Fetcher};
use super::layout::Layout;
use super::{assets, next, shared, Ctx, Registry, ReleaseInfo, ReleaseOptions, Step};
use crate::error::{Error, Result};
use crate::keypath::RelPath;
use crate::report::{PullReport, ReleaseReport};
use crate::safe_fs::{DestDir, Lstats, OnDisk};
use crate::state::{Placed, StateStore};
use crate::store::manifest::{Entry, FileEntry, Manifest, SharedPaths};
use crate::store::pointer::{self, DeployState, Deployed, Found, Latest};
use crate::store::{fetch_manifest, fetch_manifest_digest, Digest, Store};

/// Which release to make live.
pub(super) enum Target {
    /// This release: its manifest's digest when known (from a pointer, the
    /// bastion, or the manifest at hand, which `digest` then is of).
    /// (Boxed: a manifest header is large beside a reason.)
    Release { id: String, digest: Option<Digest>, manifest: Option<Box<Manifest>> },
    /// Keep the live release: why.
    Hold { reason: String },
}

/// The pointer read last and its ETag, kept in the state dir: what a 304
/// means.
#[derive(Serialize, Deserialize)]
struct Seen {
    key: String,
    etag: String,
    body: serde_json::Value,
}

/// What resolving reads: the pull's view of the node, and whether it may
/// remember what it read (the pointer's ETag, the group); a dry run
/// writes nothing.
pub(super) struct Lookup<'a> {
    pub opts: &'a ReleaseOptions,
    pub layout: &'a Layout,
    pub client: &'a aws_sdk_s3::Client,
    pub current: Option<&'a str>,
    pub registry: &'a Registry,
    pub remember: bool,
}

/// Which release the store says this node should run; `None` when the
/// source has no store.
pub(super) async fn resolve(l: &Lookup<'_>) -> Result<Option<Target>> {
    let store = Store::of(&l.opts.pull.source);
    if let Some(id) = &l.opts.release_id {
        return resolve_id(l, &store, id).await;
    }
    let seen_path = l.layout.state.join("pointer.json");
    let seen: Option<Seen> = std::fs::read(&seen_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let group = group(l)?;
    let mut undeployed = None;
    if let Some(g) = &group {
        let key = store.deployed_key(g);
        match read_pointer::<Deployed>(l, &store, &key, seen.as_ref(), &seen_path).await? {
            Some(d) => return Ok(Some(decide(l.current, g, d))),
            None => undeployed = Some(g),
        }
    }
    let key = store.latest_key();
    let Some(latest) = read_pointer::<Latest>(l, &store, &key, seen.as_ref(), &seen_path).await? else {
        return Ok(None);
    };
    match (undeployed, l.current) {
        // A group never deployed from the store: an instance with no
        // release boots the latest, one that runs a release keeps it until
        // a deploy (publishing is not deploying).
        (Some(g), Some(live)) if live != latest.release => Ok(Some(Target::Hold {
            reason: format!(
                "group {g} has no deployed release yet; this node keeps {live} until `fleetsync sync --releases` deploys one (latest published: {})",
                latest.release
            ),
        })),
        _ => Ok(Some(Target::Release { id: latest.release, digest: Some(latest.manifest), manifest: None })),
    }
}

/// The node's group: given, else the one the last pull that named one
/// recorded (a deploy names it; the agent's timer then follows it).
fn group(l: &Lookup<'_>) -> Result<Option<String>> {
    let path = l.layout.state.join("group");
    match &l.opts.group {
        Some(g) => {
            if l.remember && std::fs::read_to_string(&path).ok().as_deref() != Some(g.as_str()) {
                std::fs::create_dir_all(&l.layout.state).map_err(|e| Error::io(format!("creating {}", l.layout.state.display()), e))?;
                crate::safe_fs::write_state_file(&path, g.as_bytes())?;
            }
            Ok(Some(g.clone()))
        }
        // A damaged file must not read as "no group": the node would then
        // follow `latest`, and a publish would deploy it.
        None => match std::fs::read_to_string(&path).map(|g| g.trim_end_matches(['\n', '\r']).to_string()) {
            // (A line end is a hand edit's, never part of a group's name.)
            Ok(g) if crate::store::check_group(&g).is_ok() => Ok(Some(g)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Ok(g) => Err(Error::Config(format!(
                "the node's group file {} is damaged (it holds {g:?}): give --group GROUP (a `fleetsync sync` does), or delete the file to follow the store's latest release",
                path.display()
            ))),
            Err(e) => Err(Error::io(format!("reading the node's group file {}", path.display()), e)),
        },
    }
}

/// Reads a pointer, conditionally on the ETag seen last for that key; the
/// value (fresh, or remembered when unchanged), `None` when absent.
async fn read_pointer<T: serde::de::DeserializeOwned>(
    l: &Lookup<'_>,
    store: &Store,
    key: &str,
    seen: Option<&Seen>,
    seen_path: &std::path::Path,
) -> Result<Option<T>> {
    let seen = seen.filter(|s| s.key == key);
    match pointer::read::<serde_json::Value>(l.client, store, key, seen.map(|s| s.etag.as_str())).await? {
        Found::Absent => Ok(None),
        Found::Unchanged => {
            let body = seen.expect("a 304 answers an ETag we sent").body.clone();
            Ok(Some(serde_json::from_value(body).map_err(|e| Error::S3(format!("{}: {e}", store.url(key))))?))
        }
        Found::Value { value, etag } => {
            let parsed = serde_json::from_value(value.clone()).map_err(|e| {
                Error::S3(format!("{0} is not a valid fleetsync pointer ({e}): delete it (`aws s3 rm {0}`), then publish or deploy again to write a new one", store.url(key)))
            })?;
            if l.remember {
                let seen = Seen { key: key.to_string(), etag, body: value };
                std::fs::create_dir_all(&l.layout.state).map_err(|e| Error::io(format!("creating {}", l.layout.state.display()), e))?;
                crate::safe_fs::write_state_file(seen_path, &serde_json::to_vec(&seen).expect("serializes"))?;
            }
            Ok(Some(parsed))
        }
    }
}

/// What a group's deployed pointer means for a node running `current`.
fn decide(current: Option<&str>, group: &str, d: Deployed) -> Target {
    match (d.state, current) {
        (DeployState::Done, _) => Target::Release { id: d.release, digest: Some(d.manifest), manifest: None },
        (state, Some(live)) if live != d.release => Target::Hold {
            reason: format!(
                "a deploy of group {group} to release {} is {}; this node keeps {live} until it is switched (or a sync or rollback ends it)",
                d.release,
                if state == DeployState::Deploying { "under way" } else { "failed" }
            ),
        },
        (_, Some(_)) => Target::Release { id: d.release, digest: Some(d.manifest), manifest: None },
        (_, None) => {
            let boot = d.for_boot();
            Target::Release { id: boot.release, digest: Some(boot.manifest), manifest: None }
        }
    }
}

/// `--release-id ID`: that release of the store, or, when the source has
/// no store, the name of the listing's release.
async fn resolve_id(l: &Lookup<'_>, store: &Store, id: &str) -> Result<Option<Target>> {
    // Live, from the store, and the same publish of it that the deploy
    // names (when it names one): nothing to ask.
    let stored_live = l.current == Some(id)
        && l.registry
            .get(id)
            .is_some_and(|r| r.content.starts_with(STORE_CONTENT) && l.opts.manifest.is_none_or(|d| r.manifest == Some(d)));
    if stored_live {
        return Ok(Some(Target::Release { id: id.to_string(), digest: l.opts.manifest, manifest: None }));
    }
    match fetch_manifest_digest(l.client, store, id, l.opts.manifest.as_ref()).await {
        Ok((m, digest)) => Ok(Some(Target::Release { id: id.to_string(), digest: Some(digest), manifest: Some(Box::new(m)) })),
        Err(Error::NotInStore(_)) => match pointer::read::<serde_json::Value>(l.client, store, &store.latest_key(), None).await? {
            Found::Absent => Ok(None),
            _ => Err(Error::Config(format!(
                "release {id} is not in the release store at {} (`fleetsync releases --source {}` lists what is)",
                store.url(&store.root),
                l.opts.pull.source
            ))),
        },
        Err(e) => Err(e),
    }
}

/// `--dry-run` against a release store: the release the pull would make
/// live and what building it would fetch, against the files the state
/// store records (by content digest and mode; no file is stat-ed, so
/// drift is not shown): a release already on the node is checked path by
/// path against its own records, as its repair would; a new one is built
/// from the live release's content, linked or copied, and what leaves the
/// live tree at the switch is listed as deleted. Writes nothing: no node
/// lock, no state, no remembered pointer. `None` when the source has no
/// store.
pub(super) async fn dry_run(l: &Lookup<'_>) -> Result<Option<PullReport>> {
    let p = &l.opts.pull;
    let Some(target) = resolve(l).await? else {
        return Ok(None);
    };
    let mut report = PullReport::new(p.source.to_string(), p.dest.display().to_string(), true);
    let mut release = ReleaseReport { previous: l.current.map(str::to_string), store: true, ..Default::default() };
    let (id, digest, manifest) = match target {
        Target::Hold { reason } => {
            release.id = l.current.unwrap_or_default().to_string();
            release.held = Some(reason);
            report.release = Some(release);
            return Ok(Some(report));
        }
        Target::Release { id, digest, manifest } => (id, digest, manifest),
    };
    let manifest = match manifest {
        Some(m) => *m,
        None => fetch_manifest(l.client, &Store::of(&p.source), &id, digest.as_ref()).await?,
    };
    let on_node = l.current == Some(id.as_str()) || l.registry.get(&id).is_some();
    let base = match if on_node { Some(id.as_str()) } else { l.current } {
        Some(base) => StateStore::load_read_only(&p.state_dir, &l.layout.dir(base))?,
        None => HashMap::new(),
    };
    let have: std::collections::HashSet<(Digest, u32)> = base.values().filter_map(|p| parse_store_etag(&p.etag)).collect();
    let contents: std::collections::HashSet<Digest> = have.iter().map(|(hash, _)| *hash).collect();
    let mut plan = crate::report::Plan::default();
    for f in manifest.entries.iter().filter_map(|e| if let Entry::File(f) = e { Some(f) } else { None }) {
        if on_node && base.get(&f.path).is_some_and(|p| p.etag == store_etag(&f.hash, f.mode)) {
            report.counts.unchanged += 1;
        } else if !on_node && have.contains(&(f.hash, f.mode)) {
            release.linked += 1;
        } else if !on_node && contents.contains(&f.hash) {
            release.copied += 1;
        } else {
            report.counts.downloaded += 1;
            plan.fetch_bytes += f.size;
            if plan.fetch.len() < crate::report::MAX_PLAN {
                plan.fetch.push(f.path.to_string());
            }
        }
    }
    let wanted: std::collections::HashSet<&RelPath> = manifest.entries.iter().map(Entry::path).collect();
    let mut gone: Vec<&RelPath> = base.keys().filter(|p| !wanted.contains(p)).collect();
    gone.sort();
    report.counts.deleted = gone.len() as u64;
    plan.delete = gone.iter().take(crate::report::MAX_PLAN).map(|p| p.to_string()).collect();
    report.counts.listed = manifest.header.files;
    report.counts.unchanged += release.linked + release.copied;
    report.bytes_downloaded = plan.fetch_bytes;
    report.plan = Some(plan);
    release.switched = l.current != Some(id.as_str());
    release.id = id;
    report.release = Some(release);
    Ok(Some(report))
}

/// What the registry records as a store release's content: this prefix and
/// its tree digest.
const STORE_CONTENT: &str = "tree:";

/// Makes the target live (or says it is, or holds).
pub(super) async fn run(ctx: &Ctx<'_>, target: Target) -> Result<Step> {
    let p = &ctx.opts.pull;
    let store = Store::of(&p.source);
    let (id, digest, manifest, hold) = match target {
        Target::Hold { reason } => {
            let current = ctx.current.clone().expect("a node holds only what it has");
            let (ok, files) = match ctx.registry.get(&current) {
                Some(_) => intact(ctx, &current)?,
                None => (false, 0),
            };
            let held = |reason: String| -> Result<Step> {
                let mut report = new_report(ctx);
                (report.counts.listed, report.counts.unchanged) = (files, files);
                Ok(Step::Held { report, id: current.clone(), reason, register: None })
            };
            if ok {
                return held(reason);
            }
            // Held on a live release that drifted, or that the registry
            // lost: checked and repaired below like any other live
            // release (a hold keeps the release, not its drift), then held.
            // One the store no longer has (pruned: no pointer names a
            // release a node holds before its group's first deploy) is
            // held as it is.
            match fetch_manifest_digest(&ctx.client, &store, &current, None).await {
                Ok((m, digest)) => (current.clone(), Some(digest), Some(m), Some(reason)),
                Err(e) => {
                    tracing::warn!(release = %current, error = %e, "the held release cannot be checked against its manifest");
                    return held(format!("{reason} (its files cannot be checked: {e})"));
                }
            }
        }
        Target::Release { id, digest, manifest } => (id, digest, manifest.map(|m| *m), None),
    };
    // A release this node has already: the store's (a release built from
    // a listing may carry the same name), and intact: its hard-linked files
    // share inodes with other releases, which an application may have
    // written to. Drift is repaired in place, file by file, before it goes
    // live (again).
    let live = ctx.current.as_deref() == Some(id.as_str());
    let known = ctx.registry.get(&id).cloned();
    if live || known.is_some() {
        if let Some(k) = known.as_ref().filter(|k| !k.content.starts_with(STORE_CONTENT)) {
            return Err(Error::Config(format!(
                "release {id} on this node was built from a listing of the prefix ({}), not from the release store: publish this build under a new --release-id",
                k.content
            )));
        }
        // The store's release `id` is this node's copy only if it is the
        // same publish: an id published again after a prune (before prunes
        // left tombstones) names other content. A digest other than the
        // one recorded (or none recorded yet) is checked once, by the
        // manifest's tree, then recorded.
        let recorded = known.as_ref().and_then(|k| k.manifest);
        let mut manifest = manifest;
        if manifest.is_none() && digest.is_some() && digest != recorded {
            manifest = Some(fetch_manifest(&ctx.client, &store, &id, digest.as_ref()).await?);
        }
        if let Some(m) = &manifest {
            content_of(ctx, &id, m)?;
        }
        let mut relabel =
            known.as_ref().filter(|_| digest.is_some() && digest != recorded).map(|k| ReleaseInfo { manifest: digest, ..k.clone() });
        // Live but unknown to the registry (rebuilt after a crash): what
        // it holds is known only from its manifest, so it is checked and
        // repaired against it, then registered again.
        // (A hold reaches here only once its stats were found wrong.)
        let unregistered = live && known.is_none();
        let key = next::key(ctx.opts);
        let trusted = known.as_ref().filter(|_| live && next::verified_within(ctx.layout, &id, &key, ctx.opts.verify_every));
        let (ok, files) = if unregistered || hold.is_some() {
            (false, 0)
        } else if let Some(k) = trusted {
            // Checked whole within --verify-every: trusted without a stat
            // (see super::next for how long drift can last).
            (true, k.files)
        } else {
            let (ok, files) = intact(ctx, &id)?;
            if ok && live {
                next::mark_verified(ctx.layout, &id, &key);
            }
            (ok, files)
        };
        if !ok && live {
            // Repaired below: the staged copy may share what drifted.
            next::distrust(ctx.layout);
            next::discard(ctx.layout, ctx.releases)?;
        }
        let mut register = relabel.clone();
        let report = if ok {
            let mut report = new_report(ctx);
            (report.counts.listed, report.counts.unchanged) = (files, files);
            report
        } else {
            let (manifest, digest) = with_manifest(ctx, &store, &id, manifest, digest).await?;
            let content = content_of(ctx, &id, &manifest)?;
            let layout = Shared::prepare(ctx, &id, manifest)?;
            let files = layout.whole.header.files;
            let built = build(ctx, &store, &id, &layout.build, Build::Repair, None).await?;
            if !live && built.report.exit_code != crate::exit::OK {
                return Ok(Step::Incomplete { report: built.report, id, linked: 0 });
            }
            if built.report.exit_code == crate::exit::OK {
                layout.settle(ctx, &id)?;
            }
            // Shared paths changed what the release holds.
            if let Some(k) = relabel.clone().or(known.clone()).filter(|k| k.files != files) {
                relabel = Some(ReleaseInfo { files, ..k });
                register = relabel.clone();
            }
            if unregistered {
                register = Some(ReleaseInfo {
                    id: id.clone(),
                    content,
                    created_at_ms: crate::store::now_ms(),
                    files,
                    rolled_back: false,
                    manifest: digest,
                });
            }
            built.report
        };
        return Ok(match (hold, relabel.or(known).filter(|_| !live)) {
            (Some(reason), _) => Step::Held { report, id, reason, register },
            (None, Some(info)) => Step::Existing { report, info },
            (None, None) => Step::Live { report, id, register },
        });
    }
    let preload = ctx.current.as_deref().and_then(|live| next::preload(ctx.layout, &p.state_dir, live));
    let (manifest, digest) = with_manifest(ctx, &store, &id, manifest, digest).await?;
    let content = content_of(ctx, &id, &manifest)?;
    ctx.check_not_empty(manifest.header.files)?;
    let layout = Shared::prepare(ctx, &id, manifest)?;
    let files = layout.whole.header.files;
    // The preloaded records are awaited before `take` moves their
    // directory (a read still under way would find nothing there).
    let loaded = match preload {
        Some(read) => Some(read.await.expect("reading records does not panic")?),
        None => None,
    };
    // The live release's copy staged after its switch, when there is one
    // and nothing is to be seeded from the new release.
    let staged = match ctx.current.as_deref() {
        Some(live) if layout.seeds.iter().all(|s| matches!(s, shared::Seed::Ready)) => {
            next::take(ctx.layout, ctx.releases, &p.state_dir, live, &id, &next::key(ctx.opts))?
        }
        _ => None,
    };
    ctx.staged.store(staged.is_some(), std::sync::atomic::Ordering::Relaxed);
    let how = match staged {
        Some(shape) => Build::Staged(shape),
        None => Build::Fresh,
    };
    let built = build(ctx, &store, &id, &layout.build, how, loaded).await?;
    if built.report.exit_code != crate::exit::OK {
        return Ok(Step::Incomplete { report: built.report, id, linked: built.linked });
    }
    layout.settle(ctx, &id)?;
    keep_assets(ctx, &id)?;
    let info = ReleaseInfo { id, content, created_at_ms: crate::store::now_ms(), files, rolled_back: false, manifest: digest };
    Ok(Step::Built { report: built.report, info, linked: built.linked, copied: built.copied })
}

/// A release's manifest as the node lays it out with its shared paths
/// ([`super::shared`]).
struct Shared {
    /// What the build places: shared paths' content left out (but what
    /// is still to be seeded from it), their links in its place.
    build: Arc<Manifest>,
    /// The release once settled: every shared path a link. What its shape
    /// and file count are. The same manifest as `build` unless a shared
    /// path is seeded from the release (no copy of a hundred thousand
    /// entries for nothing).
    whole: Arc<Manifest>,
    /// The pull's shared paths: the node's, and those the release
    /// declares ([`shared::effective`]).
    paths: Vec<shared::Shared>,
    /// What the release declares, recorded in its shape.
    declared: SharedPaths,
    seeds: Vec<shared::Seed>,
}

impl Shared {
    /// Makes each shared path's place ready (see [`shared::prepare`]).
    fn prepare(ctx: &Ctx<'_>, id: &str, m: Manifest) -> Result<Shared> {
        let declared = m.header.shared.clone();
        let paths = shared::effective(&ctx.opts.shared, &declared, &ctx.layout.dest)
            .and_then(|paths| ctx.opts.keep_assets.check(&paths).map(|()| paths))
            .map_err(|e| Error::Config(format!("release {id} declares shared paths this node cannot use: {e}")))?;
        let live = match ctx.current.as_deref().filter(|c| *c != id) {
            Some(c) => ctx.releases.read(c)?,
            // A release repaired in place is its own "live release".
            None if ctx.current.as_deref() == Some(id) => ctx.releases.read(id)?,
            None => None,
        };
        let seeds = shared::prepare(&paths, ctx.releases, &ctx.layout.dest, live.as_ref(), &m, id)?;
        if paths.is_empty() {
            let m = Arc::new(m);
            return Ok(Shared { build: m.clone(), whole: m, paths, declared, seeds });
        }
        let (build, skipped) = shared::filter(&m, &paths, &seeds);
        ctx.shared_skipped.store(skipped, std::sync::atomic::Ordering::Relaxed);
        let build = Arc::new(build);
        let whole = match seeds.iter().all(|s| *s == shared::Seed::Ready) {
            true => build.clone(),
            false => Arc::new(shared::filter(&m, &paths, &vec![shared::Seed::Ready; paths.len()]).0),
        };
        Ok(Shared { build, whole, paths, declared, seeds })
    }

    /// Once release `id` is built: paths seeded from it moved and linked,
    /// their records dropped from its state store, and its shape recorded.
    fn settle(&self, ctx: &Ctx<'_>, id: &str) -> Result<()> {
        let p = &ctx.opts.pull;
        let path = ctx.layout.dir(id);
        let dir = ctx.releases.build(id)?;
        // Group-writable directories get their bit before a shared path
        // seeded from the release moves out of it, so the seed keeps it;
        // every build and repair sets it again (a staged copy's
        // directories are made without it).
        for path in self.build.entries.iter().filter_map(|e| if let Entry::WritableDir { path } = e { Some(path) } else { None }) {
            dir.add_group_write(path).map_err(|e| Error::io(format!("giving {} its group write bit", path), e))?;
        }
        let moved = shared::finish(&self.paths, &self.seeds, ctx.releases, &dir)?;
        if !moved.is_empty() {
            let (state, records) = StateStore::open(&p.state_dir, &path)?;
            for gone in records.keys().filter(|k| shared::under(&moved, k)) {
                state.record_deleted(gone)?;
            }
            state.compact(&StateStore::load_read_only(&p.state_dir, &path)?)?;
        }
        let mut shape = Shape::of(&self.whole, &self.paths);
        shape.declared = self.declared.clone();
        // A repair keeps what a before-switch command made.
        shape.made = Shape::load(&p.state_dir, &path).map(|s| s.made).unwrap_or_default();
        shape.save(&p.state_dir, &path)
    }
}

/// `--keep-assets`: the live release's matching assets that new release
/// `id` lacks, linked into it (see [`super::assets`]).
fn keep_assets(ctx: &Ctx<'_>, id: &str) -> Result<()> {
    let keep = &ctx.opts.keep_assets;
    let Some(live) = ctx.current.as_deref().filter(|c| *c != id && !keep.is_empty()) else { return Ok(()) };
    let Some(from) = ctx.releases.read(live)? else { return Ok(()) };
    let published = StateStore::load_read_only(&ctx.opts.pull.state_dir, &ctx.layout.dir(live))?;
    let carried = assets::carry(keep, &from, &published, &ctx.releases.build(id)?)?;
    if !carried.is_empty() {
        adopt_made(ctx.layout, &ctx.opts.pull.state_dir, id);
    }
    ctx.kept_assets.store(carried.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Release `id`'s manifest and its digest: the one at hand, else fetched
/// (checked against `digest` when known).
async fn with_manifest(
    ctx: &Ctx<'_>,
    store: &Store,
    id: &str,
    manifest: Option<Manifest>,
    digest: Option<Digest>,
) -> Result<(Manifest, Option<Digest>)> {
    Ok(match manifest {
        Some(m) => (m, digest),
        None => {
            let (m, d) = fetch_manifest_digest(&ctx.client, store, id, digest.as_ref()).await?;
            (m, Some(d))
        }
    })
}

/// The content a manifest gives release `id` (as the registry records it),
/// once the manifest is known to be that release's and the id is known not
/// to name other content on this node.
fn content_of(ctx: &Ctx<'_>, id: &str, manifest: &Manifest) -> Result<String> {
    if manifest.header.id != id {
        return Err(Error::S3(format!("the manifest of release {id} says it is release {}; the store is damaged", manifest.header.id)));
    }
    // Format 2 names its modes and the shared paths it declares too: the
    // same tree with other group-writable directories or laid out with
    // other shared paths is another release (as its publish named it).
    // Format 1 keeps the tree alone, as nodes recorded it before.
    let h = &manifest.header;
    let content = match h.format {
        1 => format!("{STORE_CONTENT}{}", h.tree),
        _ => format!(
            "{STORE_CONTENT}{} modes:{} shared:{}",
            h.tree,
            h.modes.map(|m| m.to_string()).unwrap_or_default(),
            serde_json::to_string(&h.shared).expect("serializes")
        ),
    };
    match ctx.registry.get(id) {
        // Published twice under one id (reused after a prune, before prunes
        // left tombstones): the node's copy is not the store's release.
        Some(known) if known.content != content => Err(Error::Config(format!(
            "release {id} on this node ({}) is not the store's release {id} ({content}): the id was published twice; deploy a release with a new id, or remove {} from this node",
            known.content,
            ctx.layout.dir(id).display()
        ))),
        _ => Ok(content),
    }
}

/// A report of this pull, started when the pull did.
fn new_report(ctx: &Ctx<'_>) -> PullReport {
    let p = &ctx.opts.pull;
    let mut r = PullReport::new(p.source.to_string(), p.dest.display().to_string(), false);
    r.started_at_ms = crate::store::now_ms().saturating_sub(ctx.t0.elapsed().as_millis() as u64);
    r
}

/// Whether release `id`'s files are on disk as they were placed (size,
/// mtime and mode against the state store; no request), and how many
/// there are. A state store that lost records (fewer than the registry
/// counts) is not intact.
fn intact(ctx: &Ctx<'_>, id: &str) -> Result<(bool, u64)> {
    let placed = StateStore::load_read_only(&ctx.opts.pull.state_dir, &ctx.layout.dir(id))?;
    let Some(dir) = ctx.releases.read(id)? else {
        return Ok((false, 0));
    };
    if ctx.registry.get(id).is_some_and(|r| r.files != placed.len() as u64) {
        return Ok((false, placed.len() as u64));
    }
    // Built before shapes were recorded: checked against its manifest once.
    let Some(shape) = Shape::load(&ctx.opts.pull.state_dir, &ctx.layout.dir(id)) else {
        return Ok((false, placed.len() as u64));
    };
    // Laid out with the shared paths it would have now (the node's may
    // have changed since; the release's own cannot).
    let now = shared::effective(&ctx.opts.shared, &shape.declared, &ctx.layout.dest);
    if now.map(|paths| paths.iter().map(spec).collect::<Vec<_>>()).ok().as_ref() != Some(&shape.shared) {
        return Ok((false, placed.len() as u64));
    }
    // The stats are most of a no-op pull's time: on every core, beside
    // the walk that finds what is there and should not be.
    let files: Vec<(&RelPath, &Placed)> = placed.iter().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk = files.len().div_ceil(threads).max(1);
    let ok = std::thread::scope(|scope| {
        let walk = scope.spawn(|| dir.walk().is_ok_and(|found| shape.matches(&found, &placed)));
        let checks: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                let dir = &dir;
                scope.spawn(move || {
                    let mut stats = dir.lstats();
                    part.iter().all(|(path, p)| on_disk(&mut stats, path, p))
                })
            })
            .collect();
        checks.into_iter().all(|c| c.join().expect("a stat does not panic")) && walk.join().expect("a walk does not panic")
    });
    Ok((ok, placed.len() as u64))
}

/// Whether the file at `path` is still the one `p` records: a regular
/// file of its size, mtime and mode.
fn on_disk(stats: &mut Lstats<'_>, path: &RelPath, p: &Placed) -> bool {
    let mode = parse_store_etag(&p.etag).map(|(_, mode)| mode);
    match stats.stat(path) {
        Some(st) => {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                && st.st_size as u64 == p.file_size
                && st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64 == p.mtime_ns
                && mode.is_none_or(|m| st.st_mode & 0o7777 == m)
        }
        _ => false,
    }
}

/// What a build did.
struct Built {
    report: PullReport,
    linked: u64,
    copied: u64,
}

/// How a build starts.
enum Build {
    /// An empty directory beside the live release: what did not change is
    /// hard-linked from it.
    Fresh,
    /// The staged copy of the live release ([`super::next`]), with its
    /// shape: only what changed is removed, linked or fetched.
    Staged(Shape),
    /// The release itself: its drifted files replaced, what it should not
    /// hold removed.
    Repair,
}

/// Builds release `id` from its manifest (see [`Build`]); `loaded`: the
/// staged copy's records, when they were read already (used only by a
/// staged build, whose records they are).
async fn build(
    ctx: &Ctx<'_>,
    store: &Store,
    id: &str,
    manifest: &Arc<Manifest>,
    how: Build,
    loaded: Option<HashMap<RelPath, Placed>>,
) -> Result<Built> {
    let repair = matches!(how, Build::Repair);
    let staged = matches!(how, Build::Staged(_));
    let p = &ctx.opts.pull;
    let path = ctx.layout.dir(id);
    let dst = ctx.releases.build(id)?;
    let (state, existing) = match loaded.filter(|_| staged) {
        Some(records) => StateStore::open_loaded(&p.state_dir, &path, records)?,
        None => StateStore::open(&p.state_dir, &path)?,
    };
    if state.interrupted() {
        // A repair was killed: its temporary files are beside their paths.
        let swept = dst.sweep_temps().map_err(|e| Error::io(format!("removing temporary files left in {}", path.display()), e))?;
        tracing::info!(swept, "the previous pull was interrupted; removed its temporary files");
    }
    state.mark_in_progress()?;
    let base = match (&ctx.current, &how) {
        (Some(cur), Build::Fresh) => {
            let placed = StateStore::load_read_only(&p.state_dir, &ctx.layout.dir(cur))?;
            ctx.releases.read(cur)?.map(|dir| (dir, placed))
        }
        // The staged copy's records are the live release's.
        (Some(cur), Build::Staged(_)) => ctx.releases.read(cur)?.map(|dir| (dir, HashMap::new())),
        _ => None,
    };
    let fetcher = Arc::new(Fetcher {
        client: ctx.client.clone(),
        store: store.clone(),
        dest: Arc::new(dst),
        state: Arc::new(state),
        observer: ctx.observer.clone(),
        seq: AtomicU64::new(0),
    });
    ctx.observer.listed(manifest.header.files);

    // Plan (and link, copy, make directories and symlinks) on the blocking
    // pool: thousands of small system calls.
    let (f2, m2) = (fetcher.clone(), manifest.clone());
    // What a before-switch command wrote stays through a repair.
    let made = if repair { Shape::load(&p.state_dir, &path).map(|s| s.made).unwrap_or_default() } else { Default::default() };
    let planned = tokio::task::spawn_blocking(move || match how {
        Build::Staged(old) => Ok(plan_staged(&f2, &m2, base, existing, old)),
        Build::Fresh | Build::Repair => plan(&f2, &m2, base, existing, made, repair),
    })
    .await
    .expect("planning does not panic")?;
    ctx.observer.listing_done(manifest.header.files);
    let fetched = fetcher.fetch(&manifest.header.packs, planned.fetch).await;

    let mut report = new_report(ctx);
    report.counts.listed = manifest.header.files;
    report.counts.downloaded = fetched.files;
    report.counts.unchanged = planned.unchanged + planned.linked + planned.copied;
    report.counts.deleted = planned.deleted;
    report.counts.retries = fetched.retries;
    report.bytes_downloaded = fetched.bytes;
    for (path, error) in planned.failed.into_iter().chain(fetched.failed) {
        report.push_error(path, error);
    }
    report.settle();
    // The state store ends like a pull's: snapshot written, marker cleared.
    // A staged build leaves its few records in the journal, over the
    // staged snapshot (the next open compacts them): rewriting the whole
    // snapshot would cost what the staging saved.
    let state = &fetcher.state;
    if !staged {
        let records = StateStore::load_read_only(&p.state_dir, &path)?;
        state.compact(&records)?;
    }
    state.clear_in_progress();
    Ok(Built { report, linked: planned.linked, copied: planned.copied })
}

/// What planning decided and did.
#[derive(Default)]
struct Planned {
    fetch: Vec<FileEntry>,
    linked: u64,
    copied: u64,
    unchanged: u64,
    deleted: u64,
    failed: Vec<(String, String)>,
}

/// The live release's files by content: digest -> (path, mode, record).
type Index = HashMap<Digest, Vec<(RelPath, u32, Placed)>>;

/// Decides every entry: a directory or a symlink is made now; a file is
/// kept (repair), linked, copied, or left to fetch. Blocking.
fn plan(
    f: &Fetcher,
    m: &Manifest,
    base: Option<(DestDir, HashMap<RelPath, Placed>)>,
    existing: HashMap<RelPath, Placed>,
    made: std::collections::BTreeMap<String, Made>,
    repair: bool,
) -> Result<Planned> {
    let dst = &f.dest;
    let mut out = Planned::default();
    let mut index: Index = HashMap::new();
    if let Some((_, placed)) = &base {
        for (path, p) in placed {
            if let Some((hash, mode)) = parse_store_etag(&p.etag) {
                index.entry(hash).or_default().push((path.clone(), mode, p.clone()));
            }
        }
    }
    let seq = || f.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if repair {
        remove_unwanted(f, m, &existing, &made, &mut out);
    }
    let mut wanted: std::collections::HashSet<&RelPath> = std::collections::HashSet::new();
    let (mut dst_stats, mut base_stats) = (dst.lstats(), base.as_ref().map(|(dir, _)| dir.lstats()));
    for e in &m.entries {
        wanted.insert(e.path());
        let result = match e {
            Entry::Dir { path } | Entry::WritableDir { path } => dst.make_dir(path).map_err(|e| format!("creating directory {path}: {e}")),
            Entry::Symlink { path, target } => {
                if dst.read_link(path).as_deref() == Some(target.as_str()) {
                    Ok(())
                } else {
                    dst.symlink(path, target, seq()).map_err(|e| format!("making symlink {path}: {e}"))
                }
            }
            Entry::File(file) => {
                let etag = store_etag(&file.hash, file.mode);
                if repair && existing.get(&file.path).is_some_and(|p| p.etag == etag && on_disk(&mut dst_stats, &file.path, p)) {
                    out.unchanged += 1;
                    continue;
                }
                if repair {
                    f.observer.planned(file.size);
                    out.fetch.push(file.clone());
                    continue;
                }
                link_or_fetch(f, base.as_ref().map(|(dir, _)| dir).zip(base_stats.as_mut()), &index, file, &mut out);
                Ok(())
            }
        };
        if let Err(why) = result {
            out.failed.push((e.path().to_string(), why));
        }
    }
    if repair {
        // Records of files the manifest does not have (removed above, or
        // gone already) go too.
        for path in existing.keys().filter(|p| !wanted.contains(p)) {
            let _ = f.state.record_deleted(path);
        }
    }
    Ok(out)
}

/// Applies manifest `m` to the staged copy of the live release (see
/// [`super::next`]; `existing`: its records, the live release's, and
/// `old`: its shape): removes what the new release does not hold as it
/// is, then makes what it adds or changed, linked from the live release
/// when its content is there, else left to fetch. What did not change is
/// trusted as staged: no stat, no link, no record. Blocking.
fn plan_staged(
    f: &Fetcher,
    m: &Manifest,
    base: Option<(DestDir, HashMap<RelPath, Placed>)>,
    existing: HashMap<RelPath, Placed>,
    old: Shape,
) -> Planned {
    use std::collections::HashSet;
    let dst = &f.dest;
    let mut out = Planned::default();
    // One pass over the files: kept as staged, or to place. A changed
    // file is placed as a new inode (renamed over the staged link), never
    // written into the one the live release shares.
    // Paths are unique in a manifest: the staged files it names are those
    // kept and those replaced, and when they are all of them, none goes.
    let (mut kept, mut replaced) = (0, 0);
    let mut place: Vec<&FileEntry> = Vec::new();
    for file in m.files() {
        // Parsed, not formatted: a hundred thousand of these.
        match existing.get(&file.path).map(|p| parse_store_etag(&p.etag)) {
            Some(Some((hash, mode))) if hash == file.hash && mode == file.mode => kept += 1,
            Some(_) => {
                replaced += 1;
                place.push(file);
            }
            None => place.push(file),
        }
    }
    out.unchanged = kept;
    let remove = |path: &str, out: &mut Planned| -> bool {
        let Some(rel) = RelPath::from_stored(path) else { return false };
        match dst.remove_any(&rel) {
            Ok(()) => true,
            Err(e) => {
                out.failed.push((path.to_string(), format!("removing what the new release does not hold: {e}")));
                false
            }
        }
    };
    // What goes: files the new release does not have, symlinks gone or
    // retargeted, directories gone (deepest first; what they held went
    // first).
    if kept + replaced < existing.len() as u64 {
        let named: HashSet<&RelPath> = m.files().map(|file| &file.path).collect();
        for path in existing.keys().filter(|p| !named.contains(p)) {
            if remove(path.as_str(), &mut out) {
                let _ = f.state.record_deleted(path);
                out.deleted += 1;
            }
        }
    }
    let new = Shape::of(m, &[]);
    let new_dirs: HashSet<&str> = new.dirs.iter().map(String::as_str).collect();
    for (path, target) in &old.symlinks {
        if new.symlinks.get(path) != Some(target) && remove(path, &mut out) && !new.symlinks.contains_key(path) {
            out.deleted += 1;
        }
    }
    for d in old.dirs.iter().rev().filter(|d| !d.is_empty() && !new_dirs.contains(d.as_str())) {
        remove(d, &mut out);
    }
    // What comes: directories and symlinks, then the files to place,
    // linked from the live release when their content is there.
    let old_dirs: HashSet<&str> = old.dirs.iter().map(String::as_str).collect();
    let seq = || f.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for e in &m.entries {
        let result = match e {
            Entry::Dir { path } | Entry::WritableDir { path } if !old_dirs.contains(path.as_str()) => {
                dst.make_dir(path).map_err(|e| format!("creating directory {path}: {e}"))
            }
            Entry::Symlink { path, target } if old.symlinks.get(path.as_str()) != Some(target) => {
                dst.symlink(path, target, seq()).map_err(|e| format!("making symlink {path}: {e}"))
            }
            _ => Ok(()),
        };
        if let Err(why) = result {
            out.failed.push((e.path().to_string(), why));
        }
    }
    // The live release's files with the content of one to place (a file
    // moved, or content that was elsewhere): each record matched first by
    // its digest's first 8 bytes (a binary search of integers among the
    // few wanted), and parsed only then.
    let wanted: HashSet<Digest> = place.iter().map(|file| file.hash).collect();
    let mut prefixes: Vec<u64> = wanted.iter().map(Digest::prefix).collect();
    prefixes.sort_unstable();
    let in_wanted = |etag: &str| store_etag_prefix(etag).is_some_and(|p| prefixes.binary_search(&p).is_ok());
    let mut index: Index = HashMap::new();
    for (path, p) in existing.iter().filter(|(_, p)| in_wanted(&p.etag)) {
        if let Some((hash, mode)) = parse_store_etag(&p.etag).filter(|(hash, _)| wanted.contains(hash)) {
            index.entry(hash).or_default().push((path.clone(), mode, p.clone()));
        }
    }
    let mut base_stats = base.as_ref().map(|(dir, _)| dir.lstats());
    for file in place {
        link_or_fetch(f, base.as_ref().map(|(dir, _)| dir).zip(base_stats.as_mut()), &index, file, &mut out);
    }
    out
}

/// Repairing a release in place: removes what is on disk and not in its
/// manifest, or there as another kind (a file where a directory belongs,
/// a directory for a symlink): extra files and directories, whatever was
/// written there. The planning that follows makes the rest as the
/// manifest says (a symlink's target, a file's content).
fn remove_unwanted(
    f: &Fetcher,
    m: &Manifest,
    existing: &HashMap<RelPath, Placed>,
    made: &std::collections::BTreeMap<String, Made>,
    out: &mut Planned,
) {
    let shape = Shape::of(m, &[]);
    let dirs: std::collections::HashSet<&str> = shape.dirs.iter().map(String::as_str).collect();
    let files: std::collections::HashSet<&str> = m.files().map(|f| f.path.as_str()).collect();
    let found = match f.dest.walk() {
        Ok(found) => found,
        Err(e) => return out.failed.push((String::new(), format!("listing the release to repair it: {e}"))),
    };
    // Directories removed, whose entries went with them (the walk lists a
    // directory's entries before it enters any of its subdirectories).
    let mut removed_dirs: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (path, kind) in found {
        if RelPath::from_stored(&path).is_some_and(|p| p.ancestors().any(|a| removed_dirs.contains(a))) {
            continue; // went with its directory
        }
        let fits = made.get(&path).is_some_and(|m| m.fits(&kind))
            || match &kind {
                OnDisk::Dir => dirs.contains(path.as_str()),
                OnDisk::File => files.contains(path.as_str()),
                OnDisk::Symlink(_) => shape.symlinks.contains_key(&path),
                OnDisk::Other | OnDisk::NotUtf8 => false,
            };
        if fits {
            continue;
        }
        let Some(rel) = RelPath::from_stored(&path).filter(|_| kind != OnDisk::NotUtf8) else {
            out.failed.push((
                path,
                "not in the release, and its name cannot be removed safely (not UTF-8, or reserved): remove it by hand".into(),
            ));
            continue;
        };
        match f.dest.remove_any(&rel) {
            Ok(()) => {
                tracing::info!(path = %path, "removed what the release does not hold");
                if existing.contains_key(&rel) {
                    let _ = f.state.record_deleted(&rel);
                }
                if kind == OnDisk::Dir {
                    removed_dirs.insert(path);
                }
                out.deleted += 1;
            }
            Err(e) => out.failed.push((path, format!("removing what the release does not hold: {e}"))),
        }
    }
}

/// What a store release holds besides its files: every directory (those
/// its manifest names and those its entries sit in) and every symlink with
/// its target. Kept beside the release's state store, written when the
/// release is built or repaired, so that checking the live tree for drift
/// (an extra file, an empty directory removed, a symlink changed) needs no
/// request and no manifest.
#[derive(Default, Serialize, Deserialize)]
pub(super) struct Shape {
    pub(super) dirs: Vec<String>,
    pub(super) symlinks: std::collections::BTreeMap<String, String>,
    /// The shared paths it was laid out with (`PATH` or `PATH=TARGET`):
    /// others given now mean laying it out again.
    #[serde(default)]
    pub(super) shared: Vec<String>,
    /// The shared paths its manifest declares (part of `shared`).
    #[serde(default, skip_serializing_if = "SharedPaths::is_empty")]
    pub(super) declared: SharedPaths,
    /// What was made on this node and never published: what the
    /// before-switch command wrote (a config cache, compiled views) and
    /// the assets kept from the release before (`--keep-assets`). Part of
    /// the release from then on, kept by a repair, but not required (a
    /// repair cannot make it again).
    #[serde(default)]
    pub(super) made: std::collections::BTreeMap<String, Made>,
}

/// One entry made on the node (see [`Shape::made`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Made {
    Dir,
    File,
    Symlink(String),
}

impl Made {
    fn fits(&self, found: &OnDisk) -> bool {
        match (self, found) {
            (Made::Dir, OnDisk::Dir) | (Made::File, OnDisk::File) => true,
            (Made::Symlink(a), OnDisk::Symlink(b)) => a == b,
            _ => false,
        }
    }
}

/// The published files of release `id` that are no longer as placed
/// (size, mtime, mode): after a before-switch command, the ones it
/// rewrote in place. Those are hard links shared with the live release
/// (and older ones), which changed with them. At most `limit`.
pub(super) fn rewritten(layout: &Layout, state_dir: &std::path::Path, id: &str, limit: usize) -> Vec<String> {
    let path = layout.dir(id);
    let (Ok(placed), Ok(Some(dir))) = (StateStore::load_read_only(state_dir, &path), DestDir::open_read_only(&path)) else {
        return Vec::new();
    };
    let mut stats = dir.lstats();
    let mut out: Vec<String> = placed.iter().filter(|(p, rec)| !on_disk(&mut stats, p, rec)).map(|(p, _)| p.to_string()).collect();
    out.sort();
    out.truncate(limit);
    out
}

/// After a before-switch command succeeded on release `id`, or assets were
/// kept in it: what is there and was not published becomes part of the
/// release's shape, so that the drift check does not take it for drift and
/// remove it. Best effort: a shape that cannot be updated means one repair
/// at the next pull.
pub(super) fn adopt_made(layout: &Layout, state_dir: &std::path::Path, id: &str) {
    let path = layout.dir(id);
    let Some(mut shape) = Shape::load(state_dir, &path) else { return };
    let Ok(placed) = StateStore::load_read_only(state_dir, &path) else { return };
    let Ok(Some(dir)) = DestDir::open_read_only(&path) else { return };
    let Ok(found) = dir.walk() else { return };
    let dirs: std::collections::HashSet<&str> = shape.dirs.iter().map(String::as_str).collect();
    let mut made = Vec::new();
    for (p, kind) in found {
        let known = match &kind {
            OnDisk::Dir => dirs.contains(p.as_str()),
            OnDisk::File => placed.contains_key(p.as_str()),
            OnDisk::Symlink(t) => shape.symlinks.get(&p) == Some(t),
            OnDisk::Other | OnDisk::NotUtf8 => true,
        };
        if !known {
            made.push((
                p,
                match kind {
                    OnDisk::Dir => Made::Dir,
                    OnDisk::Symlink(t) => Made::Symlink(t),
                    _ => Made::File,
                },
            ));
        }
    }
    shape.made.extend(made);
    if let Err(e) = shape.save(state_dir, &path) {
        tracing::warn!(release = %id, error = %e, "could not record what was made in the release");
    }
}

/// How a shared path is recorded in a shape.
pub(super) fn spec(s: &shared::Shared) -> String {
    match &s.target {
        Some(t) => format!("{}={}", s.path, t.display()),
        None => s.path.to_string(),
    }
}

impl Shape {
    fn of(m: &Manifest, shared: &[shared::Shared]) -> Shape {
        // A directory is named by every entry under it, and the entries
        // under it are next to each other (they are sorted): one the entry
        // before does not start with is new. A hundred thousand entries
        // name a few thousand directories.
        let mut dirs: Vec<String> = Vec::new();
        let mut prev = "";
        for e in &m.entries {
            let path = e.path().as_str();
            for dir in e.path().ancestors() {
                if !(prev.starts_with(dir) && prev.as_bytes().get(dir.len()) == Some(&b'/')) {
                    dirs.push(dir.to_string());
                }
            }
            dirs.extend(e.dir_path().map(str::to_string));
            prev = path;
        }
        dirs.sort_unstable();
        dirs.dedup();
        let symlinks = m
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Symlink { path, target } => Some((path.to_string(), target.clone())),
                _ => None,
            })
            .collect();
        Shape { dirs, symlinks, shared: shared.iter().map(spec).collect(), declared: SharedPaths::default(), made: Default::default() }
    }

    fn path(state_dir: &std::path::Path, release: &std::path::Path) -> std::path::PathBuf {
        StateStore::dir_for(state_dir, release).join("shape.json")
    }

    /// The release's shape; `None` when none was recorded or it cannot be
    /// read (the release is then checked against its manifest).
    pub(super) fn load(state_dir: &std::path::Path, release: &std::path::Path) -> Option<Shape> {
        serde_json::from_slice(&std::fs::read(Self::path(state_dir, release)).ok()?).ok()
    }

    pub(super) fn save(&self, state_dir: &std::path::Path, release: &std::path::Path) -> Result<()> {
        crate::safe_fs::write_state_file(&Self::path(state_dir, release), &serde_json::to_vec(self).expect("a shape serializes"))
    }

    /// Whether a walk of the release found exactly this shape and `files`
    /// (whose content the stats check): nothing more, nothing less.
    fn matches(&self, found: &[(String, OnDisk)], files: &HashMap<RelPath, Placed>) -> bool {
        let dirs: std::collections::HashSet<&str> = self.dirs.iter().map(String::as_str).collect();
        let (mut seen_dirs, mut seen_links, mut seen_files) = (0, 0, 0);
        for (path, kind) in found {
            if self.made.get(path).is_some_and(|m| m.fits(kind)) {
                continue;
            }
            let fits = match kind {
                OnDisk::Dir => dirs.contains(path.as_str()),
                OnDisk::File => files.contains_key(path.as_str()),
                OnDisk::Symlink(target) => self.symlinks.get(path) == Some(target),
                OnDisk::Other | OnDisk::NotUtf8 => false,
            };
            if !fits {
                return false;
            }
            match kind {
                OnDisk::Dir => seen_dirs += 1,
                OnDisk::Symlink(_) => seen_links += 1,
                _ => seen_files += 1,
            }
        }
        seen_dirs == self.dirs.len() && seen_links == self.symlinks.len() && seen_files == files.len()
    }
}

/// A file the new release needs: shared with the live release when its
/// content is there ([`reuse`]), else left to fetch.
fn link_or_fetch(f: &Fetcher, base: Option<(&DestDir, &mut Lstats<'_>)>, index: &Index, file: &FileEntry, out: &mut Planned) {
    match reuse(f, base, index, file) {
        Some(Reused::Linked) => out.linked += 1,
        Some(Reused::Copied) => out.copied += 1,
        None => {
            f.observer.planned(file.size);
            out.fetch.push(file.clone());
        }
    }
}

enum Reused {
    Linked,
    Copied,
}

/// Shares a file with the live release when its content is there, intact:
/// a hard link when its mode is the same too, else a copy with the new mode.
fn reuse(f: &Fetcher, base: Option<(&DestDir, &mut Lstats<'_>)>, index: &Index, file: &FileEntry) -> Option<Reused> {
    let (src, stats) = base?;
    let candidates = index.get(&file.hash)?;
    let intact: Vec<&(RelPath, u32, Placed)> = candidates.iter().filter(|(path, _, p)| on_disk(stats, path, p)).collect();
    if let Some((path, _, p)) = intact.iter().find(|(_, mode, _)| *mode == file.mode) {
        if f.dest.link_as(src, path, &file.path).is_ok() && f.state.record_placed(&file.path, p).is_ok() {
            return Some(Reused::Linked);
        }
    }
    let (path, _, _) = intact.first()?;
    let mut from = src.open_file(path).ok()?;
    match f.place_copy(&file.path, &mut from, file.mode, &file.hash, file.size) {
        Ok(()) => Some(Reused::Copied),
        Err(Failure::Retry(_) | Failure::Fatal(_)) => None,
    }
}
