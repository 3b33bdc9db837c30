//! PRUNE: `fleetsync prune s3://BUCKET/PREFIX --keep N`: removes what the
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
//! Packs only partly used by the kept releases are kept whole (rewriting
//! them, as restic's prune does, is not done).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::source::{s3_client, ApiFailure, ClientOptions, S3Url};
use crate::store::manifest::Location;
use crate::store::pointer::{self, Deployed, Found, Latest};
use crate::store::{fence, fetch_manifest, list_objects as list, Digest, Listed, Store, MANIFEST_SUFFIX};

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub source: S3Url,
    /// Releases kept besides those a pointer names.
    pub keep: usize,
    /// Nothing younger than this is deleted.
    pub grace: Duration,
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
        return plan(&client, &store, opts, &mut report).await.map(|_| report);
    }
    let marker = fence::Marker::put(&client, &store, fence::Side::Pruning).await?;
    let started = Instant::now();
    let result = async {
        // A publish under way may name anything: nothing is deleted.
        let (fresh, stale) = fence::markers(&client, &store, fence::Side::Publishing).await?;
        if let Some(m) = fresh.first() {
            report.content_skipped =
                Some(format!("a publish is under way ({}): nothing was removed; prune again once it is done", store.url(&m.key)));
            return Ok(());
        }
        let doomed = plan(&client, &store, opts, &mut report).await?;
        let keys = stale.into_iter().map(|m| m.key).chain(doomed.manifests).chain(doomed.content);
        delete(&client, &store, keys.collect(), started, fence::Side::Pruning.lease() / 2).await
    }
    .await;
    marker.remove(&client, &store).await;
    result.map(|()| report)
}

/// What a prune removes: manifests first (a kill between the two leaves
/// content no manifest names, which the next prune removes; never a
/// manifest whose content is gone).
struct Doomed {
    manifests: Vec<String>,
    content: Vec<String>,
}

/// Reads the pointers and the store and decides what goes (filling in the
/// report); deletes nothing.
async fn plan(client: &aws_sdk_s3::Client, store: &Store, opts: &PruneOptions, report: &mut PruneReport) -> Result<Doomed> {
    let now = crate::store::now_ms();
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
    Ok(Doomed { manifests: doomed.into_iter().map(|(key, _)| key).collect(), content: sweep })
}

/// Deletes `keys`, a thousand per request, as long as `budget` has not
/// passed since `started` (the prune's lease: see `store::fence`).
async fn delete(client: &aws_sdk_s3::Client, store: &Store, keys: Vec<String>, started: Instant, budget: Duration) -> Result<()> {
    for chunk in keys.chunks(1000) {
        if started.elapsed() > budget {
            return Err(Error::S3(format!(
                "the prune of {} ran longer than {} s and stopped before its lease ran out; run it again to remove the rest",
                store.url(&store.root),
                budget.as_secs()
            )));
        }
        let objects = chunk.iter().map(|k| ObjectIdentifier::builder().key(k).build().expect("a key is set")).collect();
        let out = client
            .delete_objects()
            .bucket(&store.bucket)
            .delete(Delete::builder().set_objects(Some(objects)).quiet(true).build().expect("objects are set"))
            .send()
            .await
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
