//! TOMBSTONE: a release id that `prune` removed stays retired.
//!
//! An id names one content forever: a node trusts a release it holds by its
//! id, and a deploy of a release the node runs costs it no request. Prune
//! deletes a manifest; without a trace, `If-None-Match: *` would then let a
//! publish write other content under that id, and nodes still holding the
//! old release would keep it while the pointers say they run the new one.
//! So before prune deletes a manifest it writes `pruned/ID.json` with the
//! release's tree digest, and a publish refuses the id for any other
//! content (the same content may come back under it: that is a re-run).

use serde::{Deserialize, Serialize};

use super::{fetch_bytes, now_ms, pointer, Digest, Store};
use crate::error::{Error, Result};

/// What `pruned/ID.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tombstone {
    pub release: String,
    /// The content the id named: the only content it may name again.
    /// `None` when its manifest could not be read: then none may.
    pub tree: Option<Digest>,
    pub pruned_at_ms: u64,
    pub by: String,
}

/// Retires `id` (content `tree`) before its manifest is deleted. Written
/// once: a tombstone already there (an earlier prune of the same release,
/// published again since) is left as it is.
pub async fn bury(client: &aws_sdk_s3::Client, store: &Store, id: &str, tree: Option<Digest>) -> Result<()> {
    let t = Tombstone { release: id.to_string(), tree, pruned_at_ms: now_ms(), by: crate::fleet_lock::user_at_host() };
    let body = serde_json::to_vec(&t).expect("a tombstone serializes");
    pointer::put_once(client, store, &store.tombstone_key(id), body, "application/json").await.map(drop)
}

/// Refuses to publish `id` with content `tree` when a prune retired it
/// with other content (or with content it could not read). A tombstone
/// that cannot be parsed retires the id for any content: deleting it would
/// give the id back.
pub async fn check(client: &aws_sdk_s3::Client, store: &Store, id: &str, tree: Digest) -> Result<()> {
    let key = store.tombstone_key(id);
    let bytes = match fetch_bytes(client, store, &key).await {
        Ok(bytes) => bytes,
        Err(Error::NotInStore(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let t: Option<Tombstone> = serde_json::from_slice(&bytes).ok();
    if t.as_ref().is_some_and(|t| t.tree == Some(tree)) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "release id {id} was pruned from {} ({}) and named other content: an id names one content forever, or nodes that kept the old release would run it; give this build a new --release-id",
        store.url(&store.root),
        t.map_or_else(|| store.url(&key), |t| format!("by {}, {}", t.by, store.url(&key)))
    )))
}
