//! FENCE: how a publish and a prune of one store keep out of each other's
//! way without a lock (`publishing/` and `pruning/` markers).
//!
//! A publish may name content it did not upload: content the latest
//! manifest names, or an older object it found stored (one HEAD). A prune
//! deletes content and manifests no kept release names. Run at the same
//! time, the prune could delete what the publish is about to name. So each
//! side writes its marker first and then lists the other's (S3 lists are
//! strongly consistent after a write): of two that overlap, at least one
//! sees the other. A prune that sees a publish deletes nothing; a publish
//! that sees a prune waits until it is done before it trusts what the
//! store holds.
//!
//! A killed process leaves its marker behind; markers older than their
//! lease are ignored (and prune removes them). A prune stops deleting once
//! half its lease has passed (by its own monotonic clock), so a publish
//! that waits out a prune's lease never races its deletes, whatever the
//! clocks of the two machines say to within that half.

use std::time::Duration;

use super::{list_objects, now_ms, pointer, Listed, Store};
use crate::error::Result;
use crate::source::ApiFailure;

/// Which side a marker stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Publishing,
    Pruning,
}

impl Side {
    fn prefix(self, store: &Store) -> String {
        match self {
            Side::Publishing => format!("{}publishing/", store.root),
            Side::Pruning => format!("{}pruning/", store.root),
        }
    }

    /// How long a marker stands: a publish of a large build can take an
    /// hour; a prune is bounded by its own lease (see the module comment).
    pub fn lease(self) -> Duration {
        match self {
            Side::Publishing => Duration::from_secs(6 * 3600),
            Side::Pruning => Duration::from_secs(10 * 60),
        }
    }
}

/// This process's marker.
pub struct Marker {
    key: String,
}

impl Marker {
    /// Writes the marker (who and when, for an operator who finds it).
    pub async fn put(client: &aws_sdk_s3::Client, store: &Store, side: Side) -> Result<Marker> {
        let key = format!("{}{:032x}.json", side.prefix(store), rand::random::<u128>());
        let body = serde_json::json!({ "started_at_ms": now_ms(), "by": crate::fleet_lock::user_at_host() });
        pointer::put_once(client, store, &key, body.to_string().into_bytes(), "application/json").await?;
        Ok(Marker { key })
    }

    /// Removes the marker. One that cannot be removed ages out.
    pub async fn remove(self, client: &aws_sdk_s3::Client, store: &Store) {
        if let Err(e) = client.delete_object().bucket(&store.bucket).key(&self.key).send().await {
            tracing::warn!(marker = %self.key, error = %ApiFailure::from_sdk(&e).message, "could not remove a marker; it ages out");
        }
    }
}

/// The other side's markers: (within their lease, older).
pub async fn markers(client: &aws_sdk_s3::Client, store: &Store, side: Side) -> Result<(Vec<Listed>, Vec<Listed>)> {
    let now = now_ms();
    let lease = side.lease().as_millis() as u64;
    Ok(list_objects(client, store, &side.prefix(store)).await?.into_iter().partition(|m| now.saturating_sub(m.modified_ms) < lease))
}

/// Waits until no prune is under way (a publish, after writing its own
/// marker): at most a prune's lease.
pub async fn wait_for_prunes(client: &aws_sdk_s3::Client, store: &Store) -> Result<()> {
    let mut told = false;
    loop {
        let (fresh, _) = markers(client, store, Side::Pruning).await?;
        let Some(m) = fresh.first() else { return Ok(()) };
        if !told {
            tracing::warn!(marker = %store.url(&m.key), "a prune of this store is under way; waiting for it before trusting what the store holds");
            eprintln!(
                "fleetsync: a prune of {} is under way; waiting for it to end (if that prune was killed, delete {} to go on now)",
                store.url(&store.root),
                store.url(&m.key)
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
