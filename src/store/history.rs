//! Deploy history: one object per deploy or rollback under `deploys/`,
//! named by its start time so that a listing is in time order: who ran it,
//! from where, which release, what each node did, how it ended.

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::Store;
use crate::error::{Error, Result};
use crate::source::ApiFailure;

/// One deploy, as `fleetsync history` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    /// `TIME-GROUP-RANDOM`, also the object's name.
    pub id: String,
    /// `sync` or `rollback`.
    pub verb: String,
    pub group: String,
    /// The release the group was moved to.
    pub release: Option<String>,
    /// What the group ran before.
    pub previous: Option<String>,
    /// user@host.
    pub by: String,
    pub command: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// `ok`, `failed`, `rolled-back` (failed, and the switched nodes were
    /// switched back), `interrupted`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<String>,
    pub nodes: Vec<NodeOutcome>,
}

/// What one node did in a deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeOutcome {
    pub instance_id: String,
    /// `ok`, `failed`, `not-attempted`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A new deploy's id: sortable by time, unique without coordination.
pub fn new_id(group: &str) -> String {
    format!("{:013}-{}-{:08x}", super::now_ms(), super::group_in_key(group), rand::random::<u32>())
}

/// Largest deploy record read (a record of 2,000 nodes is about 400 KB).
const MAX_RECORD_BYTES: usize = 16 << 20;

/// Records a deploy (written once; a deploy writes its record at its end).
pub async fn record(client: &aws_sdk_s3::Client, store: &Store, r: &DeployRecord) -> Result<()> {
    let key = format!("{}{}.json", store.deploys_prefix(), r.id);
    let body = serde_json::to_vec_pretty(r).expect("a deploy record serializes");
    super::pointer::put_once(client, store, &key, body, "application/json").await.map(drop)
}

/// The group of a deploy record's key, as it appears in keys:
/// `deploys/TIME-GROUP-RANDOM.json`, the group is what is between.
pub(crate) fn group_of<'k>(store: &Store, key: &'k str) -> Option<&'k str> {
    let name = key.strip_prefix(&store.deploys_prefix())?;
    name.strip_suffix(".json")?.split_once('-')?.1.rsplit_once('-').map(|(group, _)| group)
}

/// The last `n` deploys (of `group`, when given), oldest first.
pub async fn last(client: &aws_sdk_s3::Client, store: &Store, group: Option<&str>, n: usize) -> Result<Vec<DeployRecord>> {
    let prefix = store.deploys_prefix();
    let mut keys = Vec::new();
    for o in super::list_objects(client, store, &prefix).await? {
        if group.is_none_or(|g| group_of(store, &o.key) == Some(super::group_in_key(g).as_str())) {
            keys.push(o.key);
        }
    }
    keys.sort();
    let keys = keys.split_off(keys.len().saturating_sub(n));
    let records = futures::stream::iter(keys)
        .map(|key| async move {
            let out = client
                .get_object()
                .bucket(&store.bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| ApiFailure::from_sdk(&e).to_error(&format!("reading {}", store.url(&key))))?;
            let body = super::collect_limited(out.body, MAX_RECORD_BYTES, &store.url(&key)).await?;
            serde_json::from_slice::<DeployRecord>(&body).map_err(|e| Error::S3(format!("{} is not a deploy record: {e}", store.url(&key))))
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    records.into_iter().collect()
}
