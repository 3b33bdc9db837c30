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
//! lease are ignored (and prune removes them). Ages are measured on S3's
//! clock (see [`Marker`]), never one machine's against another's. A
//! publish renews its marker while it works and checks it is still there
//! before it names anything in a manifest. A prune stops deleting once half
//! its lease has passed since it began writing its marker (by its own
//! monotonic clock, every call bounded by what is left), so a publish that
//! waits out a prune's lease never races its deletes.

use std::time::{Duration, Instant};

use super::{list_objects, now_ms, pointer, Listed, Store};
use crate::error::{Error, Result};
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
        let standard = match self {
            Side::Publishing => Duration::from_secs(6 * 3600),
            Side::Pruning => Duration::from_secs(10 * 60),
        };
        test_lease(self).unwrap_or(standard)
    }
}

/// A shorter prune lease for the tests (`FLEETSYNC_TEST_PRUNE_LEASE_MS`),
/// so that a stale marker and a prune out of budget can be seen in seconds
/// rather than 10 minutes: S3 cannot be asked to backdate an object. Read
/// by dev builds only; a release build always uses the standard lease.
fn test_lease(side: Side) -> Option<Duration> {
    if !cfg!(debug_assertions) || side != Side::Pruning {
        return None;
    }
    let ms = std::env::var("FLEETSYNC_TEST_PRUNE_LEASE_MS").ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// This process's marker, and S3's clock as it saw it.
///
/// Marker ages are measured on S3's clock, never the local one against S3's
/// `LastModified`: a host whose clock is 5 minutes fast would otherwise take
/// a prune under way for a dead one. The marker's own `LastModified` is S3's
/// time when it was written; [`Marker::now_ms`] adds the monotonic time
/// since (at most a second off: S3 keeps whole seconds).
pub struct Marker {
    key: String,
    side: Side,
    written_ms: u64,
    at: Instant,
    /// Rewrites a publish's marker every quarter lease, so that a publish
    /// longer than a lease is not taken for a killed one. Aborted on drop.
    renewal: Option<tokio::task::JoinHandle<()>>,
    /// Set by the renewal when the marker it renews is gone or was
    /// replaced: a prune took it for a killed process's.
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Marker {
    /// Writes the marker (who and when, for an operator who finds it).
    pub async fn put(client: &aws_sdk_s3::Client, store: &Store, side: Side) -> Result<Marker> {
        Self::put_renewing(client, store, side, side.lease() / 4).await
    }

    /// [`Marker::put`], a publish's marker renewed `every` (a quarter
    /// lease there; the tests renew faster).
    pub async fn put_renewing(client: &aws_sdk_s3::Client, store: &Store, side: Side, every: Duration) -> Result<Marker> {
        let key = format!("{}{:032x}.json", side.prefix(store), rand::random::<u128>());
        let body = serde_json::json!({ "started_at_ms": now_ms(), "by": crate::fleet_lock::user_at_host() }).to_string().into_bytes();
        let at = Instant::now();
        pointer::put_once(client, store, &key, body.clone(), "application/json").await?;
        let (written_ms, etag) = match head(client, store, &key).await {
            Ok(Some(found)) => found,
            // Never leave a marker behind that this process cannot vouch
            // for: it would hold the other side off for a whole lease.
            failed => {
                let _ = client.delete_object().bucket(&store.bucket).key(&key).send().await;
                return Err(failed
                    .err()
                    .unwrap_or_else(|| Error::S3(format!("{} vanished right after it was written; run again", store.url(&key)))));
            }
        };
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewal = (side == Side::Publishing).then(|| {
            let (client, store, key, lost) = (client.clone(), store.clone(), key.clone(), lost.clone());
            tokio::spawn(async move {
                let mut etag = etag;
                loop {
                    tokio::time::sleep(every).await;
                    // Only the marker this process wrote: one a prune
                    // deleted (or that `remove` deleted) is never recreated.
                    let put = client
                        .put_object()
                        .bucket(&store.bucket)
                        .key(&key)
                        .content_type("application/json")
                        .if_match(&etag)
                        .body(body.clone().into());
                    match put.send().await {
                        Ok(out) => etag = out.e_tag().unwrap_or_default().to_string(),
                        Err(e) => match ApiFailure::from_sdk(&e) {
                            f if matches!(f.status, Some(404 | 412)) => {
                                lost.store(true, std::sync::atomic::Ordering::SeqCst);
                                return;
                            }
                            f => tracing::warn!(marker = %key, error = %f.message, "could not renew this publish's marker; trying again later"),
                        },
                    }
                }
            })
        });
        Ok(Marker { key, side, written_ms, at, renewal, lost })
    }

    /// S3's clock now, as this marker's writing measured it.
    pub fn now_ms(&self) -> u64 {
        self.written_ms + self.at.elapsed().as_millis() as u64
    }

    /// Fails unless the marker still stands, fresh: a prune may take a
    /// marker past its lease for a killed process's, and remove what this
    /// process relies on. Checked before a publish names anything in a
    /// manifest, and before a deploy names an old release.
    pub async fn check(&self, client: &aws_sdk_s3::Client, store: &Store) -> Result<()> {
        let what = match self.side {
            Side::Publishing => "publish",
            Side::Pruning => "prune",
        };
        let gone =
            |why: &str| Err(Error::S3(format!("this {what}'s marker {} {why}: nothing was named; run it again", store.url(&self.key))));
        if self.lost.load(std::sync::atomic::Ordering::SeqCst) {
            return gone("was removed or replaced (a prune took it for a killed one's)");
        }
        match head(client, store, &self.key).await? {
            None => gone("is gone (a prune took it for a killed one's)"),
            Some((modified, _)) if self.now_ms().saturating_sub(modified) >= self.side.lease().as_millis() as u64 => {
                gone("is older than its lease (it could not be renewed)")
            }
            Some(_) => Ok(()),
        }
    }

    /// Removes the marker. One that cannot be removed ages out.
    pub async fn remove(mut self, client: &aws_sdk_s3::Client, store: &Store) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        if let Err(e) = client.delete_object().bucket(&store.bucket).key(&self.key).send().await {
            tracing::warn!(marker = %self.key, error = %ApiFailure::from_sdk(&e).message, "could not remove a marker; it ages out");
        }
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
    }
}

/// A marker's `LastModified` (S3's clock) and ETag; `None` when absent.
async fn head(client: &aws_sdk_s3::Client, store: &Store, key: &str) -> Result<Option<(u64, String)>> {
    match client.head_object().bucket(&store.bucket).key(key).send().await {
        Ok(head) => {
            let modified = head.last_modified().and_then(|t| t.to_millis().ok()).unwrap_or(0).max(0) as u64;
            Ok(Some((modified, head.e_tag().unwrap_or_default().to_string())))
        }
        Err(e) => match ApiFailure::from_sdk(&e) {
            f if f.status == Some(404) => Ok(None),
            f => Err(f.to_error(&format!("reading {}", store.url(key)))),
        },
    }
}

/// The `side` markers: (within their lease, older), aged against `now_ms`
/// on S3's clock (see [`Marker`]).
pub async fn markers(client: &aws_sdk_s3::Client, store: &Store, side: Side, now_ms: u64) -> Result<(Vec<Listed>, Vec<Listed>)> {
    let lease = side.lease().as_millis() as u64;
    Ok(list_objects(client, store, &side.prefix(store)).await?.into_iter().partition(|m| now_ms.saturating_sub(m.modified_ms) < lease))
}

/// Waits until no prune is under way (a publish, after writing its own
/// `marker`): at most a prune's lease.
pub async fn wait_for_prunes(client: &aws_sdk_s3::Client, store: &Store, marker: &Marker) -> Result<()> {
    let mut told = false;
    loop {
        let (fresh, _) = markers(client, store, Side::Pruning, marker.now_ms()).await?;
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
