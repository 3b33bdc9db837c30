//! PRUNE: `fleetsync prune --source s3://BUCKET/PREFIX --keep N`: removes what the
//! release store no longer needs, without a lock against publishes.
//!
//! Mark and sweep:
//! - manifests: the newest `keep`, every release a pointer names
//!   (`latest.json` and the release it named before, each group's deployed
//!   release and the one before it), and any younger than the grace period
//!   stay; the others are deleted;
//! - content: every pack and blob a remaining manifest names is marked;
//!   the others are deleted when older than the grace period, so an
//!   in-flight publish's uploads (not named by any manifest yet) survive.
//!
//! A publish may name content no manifest names yet, or a manifest no
//! pointer names yet (a re-run). So a prune writes its `pruning/` marker
//! first and deletes nothing while a publish's marker is fresh; a publish
//! that finds a prune's marker waits for it (see `store::fence`). Deleting
//! stops once half the prune's lease has passed: run it again.
//!
//! Deploy records beyond the newest `--keep-history` of each group go too.
//!
//! A pruned id is retired (`store::tombstone`): a later publish may not
//! give it other content.
//!
//! Packs only partly used by the kept releases are kept whole (rewriting
//! them, as restic's prune does, is not done).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;

use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::source::{s3_client, ApiFailure, ClientOptions, S3Url};
use crate::store::manifest::Location;
use crate::store::pointer::{self, Deployed, Found, Latest};
use crate::store::{fence, fetch_manifest, list_objects as list, tombstone, Digest, Listed, Store, MANIFEST_SUFFIX};

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub source: S3Url,
    /// Releases kept besides those a pointer names.
    pub keep: usize,
    /// Nothing younger than this is deleted.
    pub grace: Duration,
    /// Deploy records (`deploys/`, what `fleetsync history` shows) kept
    /// for each group: the newest this many; older ones go.
    pub keep_history: usize,
    pub dry_run: bool,
    pub client: ClientOptions,
}

/// What a prune did (or, with `--dry-run`, would do).
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub source: String,
    pub kept: Vec<String>,
    pub deleted_releases: Vec<String>,
    pub deleted_packs: u64,
    pub deleted_blobs: u64,
    /// Deploy records removed (beyond `--keep-history`).
    pub deleted_history: u64,
    pub freed_bytes: u64,
    /// Why content was left alone this time, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_skipped: Option<String>,
    pub dry_run: bool,
}

pub async fn prune(opts: &PruneOptions) -> Result<PruneReport> {
    let client = s3_client(&opts.client).await;
    let store = Store::of(&opts.source);
    let mut report = PruneReport { source: opts.source.to_string(), dry_run: opts.dry_run, ..Default::default() };
    if opts.dry_run {
        return plan(&client, &store, opts, crate::store::now_ms(), &mut report).await.map(|_| report);
    }
    // The budget counts from before the marker is written: a publish that
    // waits out the lease from when it saw the marker never races a delete.
    let started = Instant::now();
    let marker = fence::Marker::put(&client, &store, fence::Side::Pruning).await?;
    let result = async {
        // A publish under way may name anything: nothing is deleted.
        let (fresh, stale) = fence::markers(&client, &store, fence::Side::Publishing, marker.now_ms()).await?;
        if let Some(m) = fresh.first() {
            report.content_skipped =
                Some(format!("a publish is under way ({}): nothing was removed; prune again once it is done", store.url(&m.key)));
            return Ok(());
        }
        let doomed = plan(&client, &store, opts, marker.now_ms(), &mut report).await?;
        let budget = fence::Side::Pruning.lease() / 2;
        // Each pruned id is retired first (a publish then refuses it for
        // other content), then the manifests go, in requests of their own
        // and every key's error checked, and only then the content they
        // named: a manifest left behind by a failed delete must never name
        // packs that are gone (a re-run publish or `sync --release` would
        // trust it).
        let buried: Vec<Result<()>> = futures::stream::iter(&doomed.manifests)
            .map(|(_, id, tree)| tombstone::bury(&client, &store, id, *tree))
            .buffer_unordered(8)
            .collect()
            .await;
        buried.into_iter().collect::<Result<()>>()?;
        // Stale publish markers go with the manifests, before any content:
        // a publish that was only slow then finds its marker gone when it
        // checks, and names nothing.
        let (_, stale_prunes) = fence::markers(&client, &store, fence::Side::Pruning, marker.now_ms()).await?;
        let first = doomed.manifests.into_iter().map(|(key, _, _)| key).chain(stale.into_iter().map(|m| m.key));
        delete(&client, &store, first.collect(), started, budget).await?;
        // Then content, and the markers of prunes that were killed (this
        // prune's own is fresh).
        delete(&client, &store, doomed.content.into_iter().chain(stale_prunes.into_iter().map(|m| m.key)).collect(), started, budget).await
    }
    .await;
    marker.remove(&client, &store).await;
    result.map(|()| report)
}

/// What a prune removes: manifests first (a kill between the two leaves
/// content no manifest names, which the next prune removes; never a
/// manifest whose content is gone).
struct Doomed {
    /// Each release's manifest key, id and tree digest (for its
    /// tombstone; `None` when its manifest could not be read).
    manifests: Vec<(String, String, Option<Digest>)>,
    content: Vec<String>,
}

/// Reads the pointers and the store and decides what goes (filling in the
/// report); deletes nothing. `now` is S3's clock (the prune's marker's),
/// against which objects' ages are measured.
async fn plan(client: &aws_sdk_s3::Client, store: &Store, opts: &PruneOptions, now: u64, report: &mut PruneReport) -> Result<Doomed> {
    let young = |o: &Listed| now.saturating_sub(o.modified_ms) < opts.grace.as_millis() as u64;
    let client = client.clone();
    let store = store.clone();

    // What the pointers name.
    let mut named: HashSet<String> = HashSet::new();
    if let Found::Value { value, .. } = pointer::read::<Latest>(&client, &store, &store.latest_key(), None).await? {
        named.insert(value.release);
        named.extend(value.previous);
    }
    for o in list(&client, &store, &format!("{}deployed/", store.root)).await? {
        if let Found::Value { value, .. } = pointer::read::<Deployed>(&client, &store, &o.key, None).await? {
            named.insert(value.release);
            named.extend(value.previous.map(|p| p.release));
        }
    }

    // Manifests: newest first.
    let mut manifests = list(&client, &store, &store.manifests_prefix()).await?;
    manifests.sort_by(|a, b| b.modified_ms.cmp(&a.modified_ms).then(b.key.cmp(&a.key)));
    let id_of =
        |o: &Listed| o.key.strip_prefix(&store.manifests_prefix()).and_then(|k| k.strip_suffix(MANIFEST_SUFFIX)).map(str::to_string);
    let mut doomed = Vec::new();
    for (i, o) in manifests.iter().enumerate() {
        let Some(id) = id_of(o) else { continue };
        if i < opts.keep || named.contains(&id) || young(o) {
            report.kept.push(id);
        } else {
            doomed.push((o.key.clone(), id));
        }
    }

    // Mark what the kept releases name.
    let mut marked: HashSet<Digest> = HashSet::new();
    for id in &report.kept {
        let m = fetch_manifest(&client, &store, id, None).await?;
        marked.extend(m.header.packs.iter().copied());
        marked.extend(m.files().filter(|f| matches!(f.at, Location::Blob { .. })).map(|f| f.hash));
    }

    report.deleted_releases = doomed.iter().map(|(_, id)| id.clone()).collect();
    // Each doomed release's content, for its tombstone (not for a dry run:
    // it writes none). A manifest that cannot be read retires its id for
    // any content; it is deleted all the same.
    let retired: Vec<(String, String, Option<Digest>)> = if opts.dry_run {
        doomed.into_iter().map(|(key, id)| (key, id, None)).collect()
    } else {
        futures::stream::iter(doomed)
            .map(|(key, id)| {
                let (client, store) = (&client, &store);
                async move {
                    let tree = fetch_manifest(client, store, &id, None).await.ok().map(|m| m.header.tree);
                    (key, id, tree)
                }
            })
            .buffered(8)
            .collect()
            .await
    };

    // Sweep content nothing kept names.
    let mut sweep = Vec::new();
    for (prefix, is_pack) in [(store.packs_prefix(), true), (store.blobs_prefix(), false)] {
        for o in list(&client, &store, &prefix).await? {
            let name = o.key.strip_prefix(&prefix).unwrap_or(&o.key);
            let Ok(digest) = name.trim_end_matches(".pack").parse::<Digest>() else { continue };
            if marked.contains(&digest) || young(&o) {
                continue;
            }
            report.freed_bytes += o.size;
            if is_pack {
                report.deleted_packs += 1;
            } else {
                report.deleted_blobs += 1;
            }
            sweep.push(o.key);
        }
    }
    // Deploy records beyond the newest `keep_history` of each group (their
    // names sort by time), so that a busy group never takes a quiet one's.
    let mut by_group: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
    for o in list(&client, &store, &store.deploys_prefix()).await? {
        let group = crate::store::history::group_of(&store, &o.key).unwrap_or_default().to_string();
        by_group.entry(group).or_default().push(o.key);
    }
    for mut records in by_group.into_values() {
        records.sort();
        records.truncate(records.len().saturating_sub(opts.keep_history));
        report.deleted_history += records.len() as u64;
        sweep.extend(records);
    }
    Ok(Doomed { manifests: retired, content: sweep })
}

/// Deletes `keys`, a thousand per request, as long as `budget` has not
/// passed since `started` (the prune's lease: see `store::fence`).
async fn delete(client: &aws_sdk_s3::Client, store: &Store, keys: Vec<String>, started: Instant, budget: Duration) -> Result<()> {
    for chunk in keys.chunks(1000) {
        if started.elapsed() > budget {
            return Err(over_budget(store, budget));
        }
        let objects = chunk.iter().map(|k| ObjectIdentifier::builder().key(k).build().expect("a key is set")).collect();
        let call = client
            .delete_objects()
            .bucket(&store.bucket)
            .delete(Delete::builder().set_objects(Some(objects)).quiet(true).build().expect("objects are set"))
            .send();
        // Bounded by what is left of the budget: the SDK's retries of one
        // call could otherwise carry a delete past the lease.
        let out = tokio::time::timeout(budget.saturating_sub(started.elapsed()), call)
            .await
            .map_err(|_| over_budget(store, budget))?
            .map_err(|e| ApiFailure::from_sdk(&e).to_error(&format!("deleting from {}", store.url(&store.root))))?;
        if let Some(e) = out.errors().first() {
            return Err(Error::S3(format!(
                "deleting {} failed: {}",
                store.url(e.key().unwrap_or_default()),
                e.message().unwrap_or_default()
            )));
        }
    }
    Ok(())
}

fn over_budget(store: &Store, budget: Duration) -> Error {
    Error::S3(format!(
        "the prune of {} ran longer than {} s and stopped before its lease ran out; run it again to remove the rest",
        store.url(&store.root),
        budget.as_secs()
    ))
}
