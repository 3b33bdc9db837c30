//! The store's catalogue, for `fleetsync releases`: every release it holds
//! (from the manifests' headers), which is the latest published, and which
//! release each group is deployed on.

use futures::StreamExt;
use serde::Serialize;

use super::pointer::{self, Deployed, Found, Latest};
use super::{fetch_header, Store, MANIFEST_SUFFIX};
use crate::error::Result;

/// One release of the store.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseEntry {
    pub id: String,
    pub created_at_ms: u64,
    pub publisher: String,
    pub files: u64,
    pub bytes: u64,
    pub latest: bool,
    /// Groups deployed on it (`group` or `group (deploying)`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deployed: Vec<String>,
}

/// The store's releases, oldest first, and the groups' pointers.
#[derive(Debug, Clone, Serialize)]
pub struct Catalog {
    pub store: String,
    pub latest: Option<String>,
    pub releases: Vec<ReleaseEntry>,
}

pub async fn catalog(client: &aws_sdk_s3::Client, store: &Store) -> Result<Catalog> {
    let latest = match pointer::read::<Latest>(client, store, &store.latest_key(), None).await? {
        Found::Value { value, .. } => Some(value.release),
        _ => None,
    };
    let mut groups: Vec<(String, Deployed)> = Vec::new();
    let prefix = format!("{}deployed/", store.root);
    for key in keys(client, store, &prefix).await? {
        if let Found::Value { value, .. } = pointer::read::<Deployed>(client, store, &key, None).await? {
            let named = key.strip_prefix(&prefix).and_then(|k| k.strip_suffix(".json")).unwrap_or(&key);
            let group = percent_encoding::percent_decode_str(named).decode_utf8_lossy().into_owned();
            groups.push((group, value));
        }
    }
    let ids: Vec<String> = keys(client, store, &store.manifests_prefix())
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix(&store.manifests_prefix()).and_then(|k| k.strip_suffix(MANIFEST_SUFFIX)).map(str::to_string))
        .collect();
    let headers: Vec<Result<super::manifest::Header>> =
        futures::stream::iter(ids).map(|id| async move { fetch_header(client, store, &id).await }).buffered(8).collect().await;
    let mut releases = Vec::new();
    for h in headers {
        let h = h?;
        let deployed = groups
            .iter()
            .filter(|(_, d)| d.release == h.id)
            .map(|(g, d)| match d.state {
                pointer::DeployState::Done => g.clone(),
                pointer::DeployState::Deploying => format!("{g} (deploying)"),
                pointer::DeployState::Failed => format!("{g} (failed)"),
            })
            .collect();
        releases.push(ReleaseEntry {
            latest: latest.as_deref() == Some(h.id.as_str()),
            id: h.id,
            created_at_ms: h.created_at_ms,
            publisher: h.publisher,
            files: h.files,
            bytes: h.bytes,
            deployed,
        });
    }
    releases.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
    Ok(Catalog { store: store.url(&store.root), latest, releases })
}

async fn keys(client: &aws_sdk_s3::Client, store: &Store, prefix: &str) -> Result<Vec<String>> {
    Ok(super::list_objects(client, store, prefix).await?.into_iter().map(|o| o.key).collect())
}
