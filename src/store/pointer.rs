//! The store's two movable pointers, and the write-once and
//! compare-and-swap primitives everything in the store is written with.
//!
//! - `latest.json` ([`Latest`]): the last release published. `publish`
//!   writes it last, compare-and-swap (`If-Match` on the ETag it read, or
//!   `If-None-Match: *` for the first), so two concurrent publishes never
//!   silently overwrite each other.
//! - `deployed/GROUP.json` ([`Deployed`]): the release a group runs, set by
//!   `sync` and `rollback` under the fleet lock, compare-and-swap too.
//!   Booting instances and the agent's timer follow it, never `latest`:
//!   publishing is not deploying.
//!
//! Agents read a pointer with `If-None-Match: <ETag they last saw>`: an
//! unchanged pointer is a 304 with no body, which makes a no-op pull one
//! request.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Digest, Store};
use crate::error::{Error, Result};
use crate::source::ApiFailure;

/// `latest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    pub release: String,
    /// SHA-256 of the manifest object's bytes: an agent checks what it
    /// fetched against it.
    pub manifest: Digest,
    /// The release's tree digest (its content).
    pub tree: Digest,
    /// Which of its files keep the group write bit (the manifest header's
    /// `modes`), absent when none does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modes: Option<Digest>,
    pub files: u64,
    pub bytes: u64,
    pub published_at_ms: u64,
    pub publisher: String,
    /// The release latest named before: `prune` keeps it too, since a
    /// publish that started then may still name its content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// `deployed/GROUP.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// The release the group is being (or was) moved to.
    pub release: String,
    pub manifest: Digest,
    /// What the group ran before, for a fleet rollback and for instances
    /// that boot while a deploy is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Target>,
    pub state: DeployState,
    /// The deploy that set it (its record is under `deploys/`).
    pub deploy: String,
    pub set_by: String,
    pub set_at_ms: u64,
}

/// A release and its manifest's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub release: String,
    pub manifest: Digest,
}

/// Where a group's deploy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployState {
    /// A deploy is moving the group to `release`; nodes that have a release
    /// keep it (the deploy switches them), instances that boot meanwhile
    /// take `previous`.
    Deploying,
    /// Every node was asked and the deploy succeeded: nodes converge on
    /// `release`.
    Done,
    /// The deploy failed and did not roll back: nodes keep what they have
    /// until the next sync or rollback; instances that boot take `previous`.
    Failed,
}

impl Deployed {
    /// The release an instance with nothing live should boot.
    pub fn for_boot(&self) -> Target {
        match (self.state, &self.previous) {
            (DeployState::Done, _) | (_, None) => Target { release: self.release.clone(), manifest: self.manifest },
            (_, Some(prev)) => prev.clone(),
        }
    }
}

/// What reading a pointer found.
#[derive(Debug)]
pub enum Found<T> {
    Absent,
    /// 304: the ETag given is still current.
    Unchanged,
    Value {
        value: T,
        etag: String,
    },
}

/// Largest pointer read (they are a few hundred bytes).
const MAX_POINTER_BYTES: usize = 64 * 1024;

/// Reads a JSON object of the store, conditionally on `if_none_match`.
pub async fn read<T: DeserializeOwned>(
    client: &aws_sdk_s3::Client,
    store: &Store,
    key: &str,
    if_none_match: Option<&str>,
) -> Result<Found<T>> {
    let what = store.url(key);
    let out = match client.get_object().bucket(&store.bucket).key(key).set_if_none_match(if_none_match.map(str::to_string)).send().await {
        Ok(out) => out,
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            return match f.status {
                Some(304) => Ok(Found::Unchanged),
                Some(404) => Ok(Found::Absent),
                Some(403) if !f.is_credentials() && super::absent_by_listing(client, &store.bucket, key).await => Ok(Found::Absent),
                Some(403) if !f.is_credentials() => Err(crate::source::read_denied("the release pointer", &store.bucket, key, &f)),
                _ => Err(f.to_error(&format!("reading {what}"))),
            };
        }
    };
    let etag = out.e_tag().unwrap_or_default().to_string();
    let body = super::collect_limited(out.body, MAX_POINTER_BYTES, &what).await?;
    let value = serde_json::from_slice(&body)
        .map_err(|e| Error::S3(format!("{what} is not a valid fleetsync pointer ({e}): delete it (`aws s3 rm {what}`), then publish or deploy again to write a new one")))?;
    Ok(Found::Value { value, etag })
}

/// What a compare-and-swap write expects to find.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Nothing: the first write (`If-None-Match: *`).
    Absent,
    /// The version with this ETag (`If-Match`).
    Etag(String),
}

/// A compare-and-swap write of a pointer: `Ok(Some(etag))` when it was
/// ours, `Ok(None)` when someone else's write came first (412).
///
/// A write can land while its answer is lost (a timeout, a reset): the
/// SDK's retry then finds its own write and is refused. So every refusal
/// is checked against what the pointer now holds: our very bytes (which
/// carry a time and a deploy or publish of their own) mean the write was
/// ours.
pub async fn swap<T: Serialize>(
    client: &aws_sdk_s3::Client,
    store: &Store,
    key: &str,
    value: &T,
    expect: &Expect,
) -> Result<Option<String>> {
    let body = serde_json::to_vec_pretty(value).expect("a pointer serializes");
    for attempt in 0..CONFLICT_TRIES {
        let mut put = client.put_object().bucket(&store.bucket).key(key).content_type("application/json").body(body.clone().into());
        put = match expect {
            Expect::Absent => put.if_none_match("*"),
            Expect::Etag(e) => put.if_match(e),
        };
        match put.send().await {
            Ok(out) => return Ok(Some(out.e_tag().unwrap_or_default().to_string())),
            Err(e) => {
                let f = ApiFailure::from_sdk(&e);
                match f.status {
                    Some(412) => return landed(client, store, key, &body).await,
                    // If-Match on an object deleted meanwhile: S3 says 404.
                    Some(404) if matches!(expect, Expect::Etag(_)) => return Ok(None),
                    // A conditional write racing another: ask again.
                    Some(409) if attempt + 1 < CONFLICT_TRIES => conflict_pause(attempt).await,
                    _ => return Err(f.to_error(&format!("writing {}", store.url(key)))),
                }
            }
        }
    }
    landed(client, store, key, &body).await
}

/// After a refused write: `Some(etag)` when the object holds `body`
/// exactly (the write was ours after all), else `None`.
async fn landed(client: &aws_sdk_s3::Client, store: &Store, key: &str, body: &[u8]) -> Result<Option<String>> {
    let out = match client.get_object().bucket(&store.bucket).key(key).send().await {
        Ok(out) => out,
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            return match f.status {
                Some(404) => Ok(None),
                _ => Err(f.to_error(&format!("reading {}", store.url(key)))),
            };
        }
    };
    let etag = out.e_tag().unwrap_or_default().to_string();
    let now = super::collect_limited(out.body, MAX_POINTER_BYTES, &store.url(key)).await?;
    Ok((now == body).then_some(etag))
}

/// Writes an object that must never be overwritten (`If-None-Match: *`):
/// `Ok(true)` when this call created it, `Ok(false)` when it was there.
pub async fn put_once(client: &aws_sdk_s3::Client, store: &Store, key: &str, body: Vec<u8>, content_type: &str) -> Result<bool> {
    for attempt in 0..CONFLICT_TRIES {
        let put =
            client.put_object().bucket(&store.bucket).key(key).content_type(content_type).body(body.clone().into()).if_none_match("*");
        match put.send().await {
            Ok(_) => return Ok(true),
            Err(e) => {
                let f = ApiFailure::from_sdk(&e);
                match f.status {
                    Some(412) => return Ok(false),
                    Some(409) if attempt + 1 < CONFLICT_TRIES => conflict_pause(attempt).await,
                    _ => return Err(f.to_error(&format!("writing {}", store.url(key)))),
                }
            }
        }
    }
    Ok(false)
}

/// Attempts of a conditional write answered 409 ConditionalRequestConflict.
pub(crate) const CONFLICT_TRIES: u32 = 5;

/// The pause before attempt `attempt + 1` of a conditional write answered
/// 409: 100 ms doubling, with jitter so two writers do not meet again.
pub(crate) async fn conflict_pause(attempt: u32) {
    let ms = (100u64 << attempt.min(4)) + rand::random::<u64>() % 100;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_booting_mid_deploy_takes_the_previous_release() {
        let t = |r: &str| Target { release: r.into(), manifest: Digest::of(r.as_bytes()) };
        let mut d = Deployed {
            release: "new".into(),
            manifest: Digest::of(b"new"),
            previous: Some(t("old")),
            state: DeployState::Deploying,
            deploy: "d1".into(),
            set_by: "ci".into(),
            set_at_ms: 0,
        };
        assert_eq!(d.for_boot().release, "old");
        d.state = DeployState::Failed;
        assert_eq!(d.for_boot().release, "old");
        d.state = DeployState::Done;
        assert_eq!(d.for_boot().release, "new");
        d.previous = None;
        d.state = DeployState::Deploying;
        assert_eq!(d.for_boot().release, "new", "a first deploy has nothing older to boot");
    }
}
