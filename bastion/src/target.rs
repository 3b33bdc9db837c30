//! TARGET: which release a deploy of a published source moves the group to,
//! and the group's deployed pointer (`deployed/GROUP.json` in the release
//! store), which booting instances and the agents' timers follow.
//!
//! Publishing is not deploying: `publish` only adds a release to the store.
//! A deploy, under the fleet lock, sets the group's pointer to `deploying`
//! (compare-and-swap on what it read) before any node is asked, so that an
//! instance booting meanwhile takes the release deployed before and a
//! node's timer keeps what it has; and when the deploy ends, to `done`,
//! `failed`, or back to the previous release when the deploy rolled the
//! fleet back.

use anyhow::Context;
use fleetsync::source::S3Client;
use fleetsync::store::pointer::{self, DeployState, Deployed, Expect, Found, Latest};
use fleetsync::store::{Digest, Store};
use fleetsync::S3Url;

/// A deploy's release and the pointer it moves.
pub struct Target {
    pub store: Store,
    pub group: String,
    pub release: String,
    /// SHA-256 of the release's manifest object (agents check it).
    pub manifest: Digest,
    /// The last release deployed whole, if any: what booting instances take
    /// while this deploy runs, and what a fleet rollback returns to.
    pub previous: Option<pointer::Target>,
    /// The release the group's pointer named before this deploy (for the
    /// history and the progress: "from r1").
    pub from: Option<String>,
    /// The release the group's pointer said its last deploy ended whole on
    /// (`done`), if it did: nodes this deploy never started still run it.
    /// `None` after a failed or interrupted deploy.
    pub settled_on: Option<String>,
    /// The deploy's id (its history record's name).
    pub deploy: String,
    /// The pointer's ETag as last read or written.
    etag: Option<String>,
}

/// What the group's pointer says now, and its ETag.
async fn deployed(s3: &S3Client, store: &Store, group: &str) -> anyhow::Result<(Option<Deployed>, Option<String>)> {
    Ok(match pointer::read::<Deployed>(s3, store, &store.deployed_key(group), None).await? {
        Found::Value { value, etag } => (Some(value), Some(etag)),
        _ => (None, None),
    })
}

/// The last release deployed whole: the current one when its deploy is
/// done, else the one before it.
fn last_good(d: &Deployed) -> Option<pointer::Target> {
    match d.state {
        DeployState::Done => Some(pointer::Target { release: d.release.clone(), manifest: d.manifest }),
        _ => d.previous.clone(),
    }
}

/// `sync --releases`: `requested`, else the latest published release.
/// `None` when the source has no release store (a plain prefix).
pub async fn for_sync(s3: &S3Client, source: &S3Url, group: &str, requested: Option<&str>) -> anyhow::Result<Option<Target>> {
    let store = Store::of(source);
    let latest = match pointer::read::<Latest>(s3, &store, &store.latest_key(), None).await? {
        Found::Value { value, .. } => value,
        _ => return Ok(None),
    };
    let (current, etag) = deployed(s3, &store, group).await?;
    let (release, manifest) = match requested {
        None => (latest.release, latest.manifest),
        Some(id) if id == latest.release => (latest.release, latest.manifest),
        Some(id) => (id.to_string(), manifest_digest(s3, &store, id).await?),
    };
    let previous =
        current.as_ref().and_then(|d| if d.release == release && d.state == DeployState::Done { d.previous.clone() } else { last_good(d) });
    let settled_on = current.as_ref().filter(|d| d.state == DeployState::Done).map(|d| d.release.clone());
    let deploy = fleetsync::store::history::new_id(group);
    let from = current.map(|d| d.release);
    Ok(Some(Target { store, group: group.to_string(), release, manifest, previous, from, settled_on, deploy, etag }))
}

/// `rollback`: `to`, else the group's previous release. `None` when the
/// source has no release store (each node then rolls back on its own).
pub async fn for_rollback(s3: &S3Client, source: &S3Url, group: &str, to: Option<&str>) -> anyhow::Result<Option<Target>> {
    let store = Store::of(source);
    if matches!(pointer::read::<Latest>(s3, &store, &store.latest_key(), None).await?, Found::Absent) {
        return Ok(None);
    }
    let (current, etag) = deployed(s3, &store, group).await?;
    let (release, manifest) = match (to, current.as_ref().and_then(|d| d.previous.clone())) {
        (Some(id), _) => (id.to_string(), manifest_digest(s3, &store, id).await?),
        (None, Some(prev)) => (prev.release, prev.manifest),
        (None, None) => {
            return Err(fleetsync::Error::Config(format!(
                "nothing to roll group {group} back to: no release was deployed to it before the current one; name one with --to ID (`fleetsync releases --source {source}` lists them)"
            ))
            .into())
        }
    };
    // After a rollback there is no "previous" to bounce back to: a second
    // rollback names its release.
    let deploy = fleetsync::store::history::new_id(group);
    let from = current.map(|d| d.release);
    Ok(Some(Target { store, group: group.to_string(), release, manifest, previous: None, from, settled_on: None, deploy, etag }))
}

/// The digest of release `id`'s manifest object (which must exist).
async fn manifest_digest(s3: &S3Client, store: &Store, id: &str) -> anyhow::Result<Digest> {
    fleetsync::store::check_release_id(id)?;
    let bytes = fleetsync::store::fetch_bytes(s3, store, &store.manifest_key(id))
        .await
        .with_context(|| format!("release {id} is not in the release store (`fleetsync releases` lists what is)"))?;
    Ok(Digest::of(&bytes))
}

impl Target {
    /// Under the fleet lock, before any node: the group is deploying.
    pub async fn begin(&mut self, s3: &S3Client) -> anyhow::Result<()> {
        self.set(s3, &self.release.clone(), self.manifest, self.previous.clone(), DeployState::Deploying).await
    }

    /// The deploy ended: `state` for this release, or with `rolled_back`,
    /// the group is on the previous release again.
    pub async fn end(&mut self, s3: &S3Client, state: DeployState, rolled_back: bool) -> anyhow::Result<()> {
        match (rolled_back, self.previous.clone()) {
            (true, Some(prev)) => self.set(s3, &prev.release, prev.manifest, None, DeployState::Done).await,
            _ => self.set(s3, &self.release.clone(), self.manifest, self.previous.clone(), state).await,
        }
    }

    async fn set(
        &mut self,
        s3: &S3Client,
        release: &str,
        manifest: Digest,
        previous: Option<pointer::Target>,
        state: DeployState,
    ) -> anyhow::Result<()> {
        let value = Deployed {
            release: release.to_string(),
            manifest,
            previous,
            state,
            deploy: self.deploy.clone(),
            set_by: fleetsync::fleet_lock::user_at_host(),
            set_at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        };
        let key = self.store.deployed_key(&self.group);
        let expect = self.etag.clone().map_or(Expect::Absent, Expect::Etag);
        match pointer::swap(s3, &self.store, &key, &value, &expect).await? {
            Some(etag) => {
                self.etag = Some(etag);
                Ok(())
            }
            None => Err(anyhow::anyhow!(
                "{} changed under this deploy (another deploy, holding the fleet lock after this one lost it?) and was not overwritten: see `fleetsync history` and `fleetsync status`, then deploy again",
                self.store.url(&key)
            )),
        }
    }
}
