//! PUBLISH: a build directory becomes a release in the store (the CI side
//! of a deploy: `fleetsync publish build/ --source s3://code/app`).
//!
//! walk -> hash -> diff -> upload -> manifest -> pointer:
//! - [`walk`]: the build's files, symlinks and empty directories, every
//!   path one the agent accepts; files hashed (SHA-256) on every core;
//! - diff: against the latest release's manifest, the store's index of
//!   what it holds (no LIST, no HEAD per file): content already stored is
//!   named where it is, only new content is uploaded;
//! - [`upload`]: new small files packed, each compressed on its own; large
//!   files as blobs; both named by their digest and written once. A
//!   `publishing/` marker tells `prune` to leave content alone meanwhile;
//! - the manifest, written once under the release id: an id can never name
//!   other content (the same content again is a no-op, so a CI re-run of
//!   one build collides with nothing);
//! - last, `latest.json`, compare-and-swap: of two concurrent publishes,
//!   one wins and the other exits 1 naming the winner.
//!
//! Killed at any moment, the pointer still names a complete release; run
//! again, the same packs are built and found stored, so nothing is
//! uploaded twice. Nothing here deploys: the agents follow their group's
//! deployed release, which `fleetsync sync` sets.

mod upload;
mod walk;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::source::{s3_client, ClientOptions, S3Url};
use crate::store::check_release_id;
use crate::store::manifest::{Entry, FileEntry, Location, Manifest, SharedPaths};
use crate::store::pointer::{self, Expect, Found, Latest};
use crate::store::{fence, fetch_bytes, fetch_manifest, Digest, Store};

use walk::Item;

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub dir: PathBuf,
    pub dest: S3Url,
    /// The release's name; default: `c` and the start of its tree digest.
    pub release_id: Option<String>,
    pub follow_symlinks: bool,
    pub dry_run: bool,
    pub client: ClientOptions,
    /// Paths every node keeps outside its releases (`--shared`,
    /// `--shared-file`), declared in the manifest, besides those the latest
    /// release declares ([`inherit`]).
    pub shared: SharedPaths,
    /// Paths the latest release declares that this one must not
    /// (`--unshare`).
    pub unshare: Vec<String>,
}

/// What a publish did.
#[derive(Debug, Default, Serialize)]
pub struct PublishReport {
    pub source: String,
    pub dest: String,
    pub release_id: String,
    /// The release's content digest.
    pub tree: String,
    pub files: u64,
    pub bytes: u64,
    /// Files whose content the store did not hold, and their stored
    /// (compressed) bytes uploaded.
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
    /// Files whose content was in the store already.
    pub reused_files: u64,
    pub packs_uploaded: u64,
    pub blobs_uploaded: u64,
    /// The same content was the latest release already: nothing written.
    pub unchanged: bool,
    pub dry_run: bool,
    /// The release `latest.json` names now.
    pub latest: String,
    /// The shared paths the release declares.
    #[serde(skip_serializing_if = "SharedPaths::is_empty")]
    pub shared: SharedPaths,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub hash_ms: u64,
}

/// Runs one publish.
pub async fn publish(opts: &PublishOptions) -> Result<PublishReport> {
    let t0 = Instant::now();
    if let Some(id) = &opts.release_id {
        check_release_id(id)?;
    }
    // Checked (and normalised) before the build is read: a bad path costs
    // nothing.
    let given = declared(&opts.shared)?;
    let (dir, follow) = (opts.dir.clone(), opts.follow_symlinks);
    let items = tokio::task::spawn_blocking(move || -> Result<Vec<Item>> {
        let mut items = walk::walk(&dir, follow)?;
        walk::hash_all(&mut items)?;
        Ok(items)
    })
    .await
    .expect("the walk does not panic")?;
    let hash_ms = t0.elapsed().as_millis() as u64;
    warn_if_all_group_writable(&items);

    let client = s3_client(&opts.client).await;
    let store = Store::of(&opts.dest);
    // The latest release: its manifest is the index of what the store holds.
    let (latest, latest_etag, known) = match pointer::read::<Latest>(&client, &store, &store.latest_key(), None).await? {
        Found::Value { value, etag } => {
            let manifest = fetch_manifest(&client, &store, &value.release, Some(&value.manifest)).await?;
            (Some(value), Some(etag), Some(manifest))
        }
        _ => (None, None, None),
    };

    let shared = declared(&inherit(&given, known.as_ref().map(|k| &k.header.shared), &opts.unshare)?)?;
    let mut plan = Plan::new(known.as_ref());
    // In path order, whatever order the file system listed them in: which
    // of two identical files uploads the content, and so the packs' bytes,
    // must not depend on the machine (a CI re-run on another runner builds
    // the same packs and finds them stored).
    let mut items = items;
    items.sort_by(|a, b| a.path().cmp(b.path()));
    for item in items {
        plan.add(item);
    }
    let sorted = {
        let mut e = plan.entries.clone();
        e.sort_by(|a, b| a.path().cmp(b.path()));
        e
    };
    let tree = crate::store::manifest::tree_digest(&sorted);
    let modes = crate::store::manifest::modes_digest(&sorted);
    // The content's name: its tree, and which files are group-writable
    // when any is (a build that only changes that is another release).
    // And the shared paths it declares, when any (they change how nodes
    // lay it out).
    let declared = (!shared.is_empty()).then(|| serde_json::to_string(&shared).expect("serializes"));
    let content = match (modes, declared) {
        (None, None) => tree,
        (m, d) => Digest::of(format!("{tree}{}{}", m.map(|m| m.to_string()).unwrap_or_default(), d.unwrap_or_default()).as_bytes()),
    };
    let id = opts.release_id.clone().unwrap_or_else(|| format!("c{}", &content.to_string()[..16]));
    let mut report = PublishReport {
        source: opts.dir.display().to_string(),
        dest: opts.dest.to_string(),
        release_id: id.clone(),
        tree: tree.to_string(),
        files: plan.files,
        bytes: plan.bytes,
        reused_files: plan.reused,
        uploaded_files: plan.new_files() as u64,
        dry_run: opts.dry_run,
        latest: latest.as_ref().map(|l| l.release.clone()).unwrap_or_default(),
        shared: shared.clone(),
        hash_ms,
        ..Default::default()
    };
    // The latest release has this content: nothing to publish (under its
    // id, unless another one was asked for).
    if let Some(l) = latest.as_ref().filter(|l| {
        (l.tree, l.modes) == (tree, modes)
            && known.as_ref().is_some_and(|k| k.header.shared == shared)
            && opts.release_id.as_ref().is_none_or(|id| *id == l.release)
    }) {
        report.release_id = l.release.clone();
        report.unchanged = true;
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    crate::store::tombstone::check(&client, &store, &id, tree).await?;
    if opts.dry_run {
        report.uploaded_bytes = plan.new_bytes();
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }

    // Everything written from here on is under a marker that keeps `prune`
    // off the store, and only once no prune is under way (see `fence`).
    let marker = fence::Marker::put(&client, &store, fence::Side::Publishing).await?;
    let written = async {
        fence::wait_for_prunes(&client, &store, &marker).await?;
        // A publish that landed since `latest` was read may have been
        // followed by a whole prune, which may have removed content this
        // plan takes from the release it read. This publish would lose the
        // pointer's compare-and-swap anyway: it stops before it writes a
        // manifest that could name what is gone (one 304 otherwise).
        if let Some(etag) = &latest_etag {
            if !matches!(pointer::read::<Latest>(&client, &store, &store.latest_key(), Some(etag)).await?, Found::Unchanged) {
                return Err(Error::S3(format!(
                    "another publish wrote {} while this one was planning ({}): publish again (what is stored is not uploaded twice)",
                    store.url(&store.latest_key()),
                    winner(&client, &store).await?
                )));
            }
        }
        write(&client, &store, &marker, &mut plan, (latest, latest_etag), (&id, &shared), tree, report, t0).await
    }
    .await;
    marker.remove(&client, &store).await;
    written
}

/// The shared paths as the manifest declares them: checked as a node
/// checks its own, normalised (`storage/` is `storage`) and sorted, so the
/// flags' order does not make another release.
fn declared(given: &SharedPaths) -> Result<SharedPaths> {
    let mut out = SharedPaths::default();
    for s in crate::release::Shared::declared(given)? {
        if s.file { &mut out.files } else { &mut out.dirs }.push(s.path.to_string());
    }
    out.dirs.sort();
    out.files.sort();
    Ok(out)
}

/// Says so when most of the build's directories are group-writable: a
/// build made under umask 002 (a desktop user's default on Debian) makes
/// every node's copy group-writable, `public/` included, which is rarely
/// what was meant. Kept, as the build has it (the bit is how a `storage/`
/// the application's group writes into is published), but named.
fn warn_if_all_group_writable(items: &[Item]) {
    let writable = items.iter().filter(|i| matches!(i, Item::Other(Entry::WritableDir { .. }))).count();
    if writable < 2 {
        return;
    }
    let empty = items.iter().filter_map(|i| if let Item::Other(e) = i { e.dir_path() } else { None });
    let dirs: std::collections::HashSet<&str> = items.iter().flat_map(|i| i.path().ancestors()).chain(empty).collect();
    if writable * 2 > dirs.len() {
        tracing::warn!(
            "{writable} of the build's {} directories are group-writable (built under umask 002?): every node's copy will be too; publish with umask 022, or chmod -R g-w what the group must not write",
            dirs.len()
        );
    }
}

/// What a publish declares shared: what it was given ([`declared`]), and
/// what the latest release declares unless `unshare` names it. A path the application
/// writes to must never stop being shared by accident (a hotfix published
/// without the flags): its uploads would go into the release, and the next
/// drift check would remove them. So stopping takes `--unshare PATH`.
fn inherit(given: &SharedPaths, latest: Option<&SharedPaths>, unshare: &[String]) -> Result<SharedPaths> {
    let latest = latest.cloned().unwrap_or_default();
    let unshare: Vec<&str> = unshare.iter().map(|u| u.trim_end_matches('/')).collect();
    for &u in &unshare {
        if given.iter().any(|(p, _)| p == u) {
            return Err(Error::Config(format!("--unshare {u}: this publish also declares it shared; give one or the other")));
        }
        if !latest.iter().any(|(p, _)| p == u) {
            return Err(Error::Config(format!(
                "--unshare {u}: the latest release does not declare it shared (it declares {}); nothing to stop",
                if latest.is_empty() { "none".to_string() } else { latest.iter().map(|(p, _)| p).collect::<Vec<_>>().join(", ") }
            )));
        }
    }
    let mut out = given.clone();
    for (p, file) in latest.iter() {
        if !given.iter().any(|(g, _)| g == p) && !unshare.contains(&p) {
            if file { &mut out.files } else { &mut out.dirs }.push(p.to_string());
        }
    }
    Ok(out)
}

/// Uploads the new content, then writes the manifest and the pointer.
#[allow(clippy::too_many_arguments)]
async fn write(
    client: &aws_sdk_s3::Client,
    store: &Store,
    marker: &fence::Marker,
    plan: &mut Plan,
    latest: (Option<Latest>, Option<String>),
    (id, shared): (&str, &SharedPaths),
    tree: Digest,
    mut report: PublishReport,
    t0: Instant,
) -> Result<PublishReport> {
    let uploaded = upload::content(client, store, plan).await?;
    report.uploaded_bytes = uploaded.bytes;
    report.packs_uploaded = uploaded.packs;
    report.blobs_uploaded = uploaded.blobs;

    // The manifest, once under its id, and only while this publish's
    // marker still stands (a prune that took it for a killed publish's may
    // have removed content the manifest would name).
    marker.check(client, store).await?;
    // Again inside the fence: a prune that ran between the first check
    // and this publish's marker may have retired the id since.
    crate::store::tombstone::check(client, store, id, tree).await?;
    let manifest = Manifest::new(id.to_string(), crate::fleet_lock::user_at_host(), plan.packs.clone(), plan.entries.clone())
        .with_shared(shared.clone());
    let bytes = manifest.to_bytes();
    let digest = Digest::of(&bytes);
    let key = store.manifest_key(id);
    if !pointer::put_once(client, store, &key, bytes, "application/zstd").await? {
        let existing = fetch_manifest(client, store, id, None).await?;
        if (existing.header.tree, existing.header.modes, &existing.header.shared)
            != (manifest.header.tree, manifest.header.modes, &manifest.header.shared)
        {
            return Err(Error::Config(format!(
                "release {id} already exists in {} with other content: give this build a new --release-id (in CI, include the run attempt: ${{{{ github.sha }}}}-${{{{ github.run_attempt }}}})",
                store.url(&key)
            )));
        }
        // This very content was published under this id before (a re-run):
        // the pointer names the stored manifest.
        let digest = Digest::of(&fetch_bytes(client, store, &key).await?);
        return point_latest(client, store, latest, &existing, digest, report, t0).await;
    }
    point_latest(client, store, latest, &manifest, digest, report, t0).await
}

/// Writes `latest.json` (compare-and-swap on what was read at the start).
async fn point_latest(
    client: &aws_sdk_s3::Client,
    store: &Store,
    (was, etag): (Option<Latest>, Option<String>),
    manifest: &Manifest,
    digest: Digest,
    mut report: PublishReport,
    t0: Instant,
) -> Result<PublishReport> {
    let h = &manifest.header;
    let latest = Latest {
        release: h.id.clone(),
        manifest: digest,
        tree: h.tree,
        modes: h.modes,
        files: h.files,
        bytes: h.bytes,
        published_at_ms: crate::store::now_ms(),
        publisher: crate::fleet_lock::user_at_host(),
        previous: was.map(|l| l.release).filter(|r| *r != h.id),
    };
    let expect = etag.map_or(Expect::Absent, Expect::Etag);
    if pointer::swap(client, store, &store.latest_key(), &latest, &expect).await?.is_none() {
        return Err(Error::S3(format!(
            "another publish wrote {} first ({}); release {} is in the store but not latest: deploy it with `fleetsync sync --releases --release {}`, or publish again",
            store.url(&store.latest_key()),
            winner(client, store).await?,
            h.id,
            h.id
        )));
    }
    report.latest = h.id.clone();
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

/// Who holds `latest` now, for the error of a publish that lost it.
async fn winner(client: &aws_sdk_s3::Client, store: &Store) -> Result<String> {
    Ok(match pointer::read::<Latest>(client, store, &store.latest_key(), None).await? {
        Found::Value { value, .. } => format!("release {} by {}", value.release, value.publisher),
        _ => "a publish that was then removed".to_string(),
    })
}

/// What will go into the new release: its entries, with each file's bytes
/// either where the store has them already or still to upload.
pub(crate) struct Plan {
    pub entries: Vec<Entry>,
    pub packs: Vec<Digest>,
    /// Content the store holds: hash -> where (packs named by digest).
    known: HashMap<Digest, (Option<Digest>, Location)>,
    /// The pack indexes of known packs in `packs`.
    pack_index: HashMap<Digest, u32>,
    /// Files to upload (first path of each new content), and the entries
    /// waiting for their location: content hash -> entry indexes.
    pub new: Vec<walk::LocalFile>,
    pub waiting: HashMap<Digest, Vec<usize>>,
    files: u64,
    bytes: u64,
    reused: u64,
}

impl Plan {
    fn new(known: Option<&Manifest>) -> Plan {
        let mut index = HashMap::new();
        if let Some(m) = known {
            for f in m.files() {
                let pack = match f.at {
                    Location::Pack { pack, .. } => Some(m.header.packs[pack as usize]),
                    Location::Blob { .. } => None,
                };
                index.entry(f.hash).or_insert((pack, f.at));
            }
        }
        Plan {
            entries: Vec::new(),
            packs: Vec::new(),
            known: index,
            pack_index: HashMap::new(),
            new: Vec::new(),
            waiting: HashMap::new(),
            files: 0,
            bytes: 0,
            reused: 0,
        }
    }

    fn add(&mut self, item: Item) {
        let f = match item {
            Item::Other(e) => return self.entries.push(e),
            Item::File(f) => f,
        };
        let hash = f.hash.expect("files are hashed before planning");
        self.files += 1;
        self.bytes += f.size;
        let at = match self.known.get(&hash).copied() {
            Some((pack, at)) => {
                self.reused += 1;
                match (pack, at) {
                    (Some(p), Location::Pack { offset, len, compressed, .. }) => {
                        Location::Pack { pack: self.pack_number(p), offset, len, compressed }
                    }
                    (_, at) => at,
                }
            }
            None => {
                let waiting = self.waiting.entry(hash).or_default();
                waiting.push(self.entries.len());
                let first = waiting.len() == 1;
                let at = Location::Blob { len: f.size };
                let entry = Entry::File(FileEntry { path: f.path.clone(), size: f.size, mode: f.mode, hash, at });
                self.entries.push(entry);
                if first {
                    self.new.push(f);
                }
                return;
            }
        };
        self.entries.push(Entry::File(FileEntry { path: f.path, size: f.size, mode: f.mode, hash, at }));
    }

    /// The index of pack `p` in this release's pack list, adding it.
    pub(crate) fn pack_number(&mut self, p: Digest) -> u32 {
        let next = self.packs.len() as u32;
        *self.pack_index.entry(p).or_insert_with(|| {
            self.packs.push(p);
            next
        })
    }

    /// Content `hash` is stored at `at`: every entry waiting for it says so.
    pub(crate) fn stored(&mut self, hash: &Digest, at: Location) {
        for &i in self.waiting.get(hash).map(Vec::as_slice).unwrap_or_default() {
            if let Entry::File(f) = &mut self.entries[i] {
                f.at = at;
            }
        }
    }

    fn new_files(&self) -> usize {
        self.waiting.values().map(Vec::len).sum()
    }

    fn new_bytes(&self) -> u64 {
        self.new.iter().map(|f| f.size).sum()
    }
}
