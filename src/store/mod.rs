//! THE RELEASE STORE: every published release as an immutable,
//! content-addressed snapshot under the source's `PREFIX/.fleetsync/`. One
//! concept shared by the flows that write it (`publish`, the bastion's
//! deploys), read it (the agent's release mode) and sweep it (`prune`).
//!
//! ```text
//! PREFIX/.fleetsync/
//!   latest.json                the last release published        (compare-and-swap)
//!   deployed/GROUP.json        a group's desired release (sync, rollback; compare-and-swap)
//!   manifests/ID.jsonl.zst     one per release: every path, its mode, hash, where its bytes are (write once)
//!   packs/SHA256.pack          small files, each compressed on its own      (write once)
//!   blobs/SHA256               one large file, as is                        (write once)
//!   deploys/TIME-ID.json       one per deploy or rollback: who, what, each node's result
//!   publishing/TOKEN.json      a publish under way: prune deletes nothing meanwhile   (see `fence`)
//!   pruning/TOKEN.json         a prune under way: a publish waits for it
//!   pruned/ID.json             a release prune removed: its id stays retired  (see `tombstone`)
//! ```
//!
//! Nothing but the two pointers is ever rewritten: content is stored under
//! the SHA-256 of its bytes and written with `If-None-Match: *`, and a
//! manifest under its release id, once. A publish writes content, then the
//! manifest, then `latest.json`; killed at any moment, the pointers still
//! name complete releases. Reading a release is one GET of its manifest and
//! ranged GETs of the packs and blobs it names, each file verified against
//! its hash.

pub mod catalog;
pub mod digest;
pub mod fence;
pub mod history;
pub mod manifest;
pub mod pack;
pub mod pointer;
pub mod tombstone;

use crate::source::S3Url;

pub use digest::Digest;

/// Where a source's store lives, and the key of each kind of object in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub bucket: String,
    /// `PREFIX/.fleetsync/` (the source's reserved directory).
    pub root: String,
}

impl Store {
    pub fn of(source: &S3Url) -> Store {
        Store { bucket: source.bucket.clone(), root: format!("{}{}", source.prefix, crate::list::RESERVED_DIR) }
    }

    /// `s3://BUCKET/KEY`, for messages.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    pub fn latest_key(&self) -> String {
        format!("{}latest.json", self.root)
    }

    pub fn deployed_key(&self, group: &str) -> String {
        format!("{}deployed/{}.json", self.root, group_in_key(group))
    }

    pub fn manifests_prefix(&self) -> String {
        format!("{}manifests/", self.root)
    }

    pub fn manifest_key(&self, id: &str) -> String {
        format!("{}{id}{MANIFEST_SUFFIX}", self.manifests_prefix())
    }

    pub fn tombstone_key(&self, id: &str) -> String {
        format!("{}pruned/{id}.json", self.root)
    }

    pub fn packs_prefix(&self) -> String {
        format!("{}packs/", self.root)
    }

    pub fn pack_key(&self, hash: &Digest) -> String {
        format!("{}{hash}.pack", self.packs_prefix())
    }

    pub fn blobs_prefix(&self) -> String {
        format!("{}blobs/", self.root)
    }

    pub fn blob_key(&self, hash: &Digest) -> String {
        format!("{}{hash}", self.blobs_prefix())
    }

    pub fn deploys_prefix(&self) -> String {
        format!("{}deploys/", self.root)
    }
}

/// A release's manifest, checked against `digest` (the SHA-256 of its
/// object, from a pointer) when given.
pub async fn fetch_manifest(
    client: &aws_sdk_s3::Client,
    store: &Store,
    id: &str,
    digest: Option<&Digest>,
) -> crate::Result<manifest::Manifest> {
    Ok(fetch_manifest_digest(client, store, id, digest).await?.0)
}

/// [`fetch_manifest`], with the digest of the manifest's bytes: what a
/// node records with the release it builds, so that an id published twice
/// (reused after a prune) is found by comparing digests.
pub async fn fetch_manifest_digest(
    client: &aws_sdk_s3::Client,
    store: &Store,
    id: &str,
    digest: Option<&Digest>,
) -> crate::Result<(manifest::Manifest, Digest)> {
    let key = store.manifest_key(id);
    let mut bytes = fetch_bytes(client, store, &key).await?;
    // Bytes damaged on the way are fetched again; bytes that stay wrong were
    // changed after the manifest was published.
    for _ in 1..MANIFEST_TRIES {
        if digest.is_none_or(|d| Digest::of(&bytes) == *d) {
            break;
        }
        bytes = fetch_bytes(client, store, &key).await?;
    }
    if let Some(d) = digest {
        if Digest::of(&bytes) != *d {
            return Err(crate::Error::S3(format!(
                "{} does not match the digest its pointer gives: it was changed after it was published (store objects are never rewritten); publish the build again under a new --release-id",
                store.url(&key)
            )));
        }
    }
    let what = store.url(&key);
    let got = Digest::of(&bytes);
    let m = tokio::task::spawn_blocking(move || manifest::Manifest::parse(&bytes, &what)).await.expect("parsing does not panic")?;
    Ok((m, got))
}

/// The whole object at `key`; a missing one is a configuration error
/// (an id that was never published).
pub async fn fetch_bytes(client: &aws_sdk_s3::Client, store: &Store, key: &str) -> crate::Result<Vec<u8>> {
    let out = match client.get_object().bucket(&store.bucket).key(key).send().await {
        Ok(out) => out,
        Err(e) => {
            let f = crate::source::ApiFailure::from_sdk(&e);
            let absent = || crate::Error::NotInStore(format!("{} does not exist: no release of that id was published", store.url(key)));
            return Err(match f.status {
                Some(404) => absent(),
                Some(403) if !f.is_credentials() && absent_by_listing(client, &store.bucket, key).await => absent(),
                _ => f.to_error(&format!("reading {}", store.url(key))),
            });
        }
    };
    collect_limited(out.body, MAX_MANIFEST_BYTES, &store.url(key)).await
}

/// Whether a key that a GET answered 403 is simply absent.
///
/// S3 answers a missing key 404 only to a caller that may list the bucket;
/// the template grants `s3:ListBucket` with an `s3:prefix` condition, and no
/// AWS document says whether such a grant counts. The same grant allows
/// `ListObjectsV2 prefix=KEY max-keys=1`: an empty answer means absent. A
/// listing that is refused too (or finds the key) leaves the 403 a denial.
pub async fn absent_by_listing(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> bool {
    let listed = client.list_objects_v2().bucket(bucket).prefix(key).max_keys(1).send().await;
    listed.is_ok_and(|l| l.contents().iter().all(|o| o.key() != Some(key)))
}

/// Largest manifest object read: [`manifest::MAX_ENTRIES`] entries
/// compress to well under this.
const MAX_MANIFEST_BYTES: usize = 512 << 20;

/// A response body whole, refused once it passes `limit` bytes (a body
/// from the network never decides how much memory a node spends).
pub async fn collect_limited(mut body: aws_sdk_s3::primitives::ByteStream, limit: usize, what: &str) -> crate::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| crate::Error::S3(format!("reading {what}: {e}")))?;
        if out.len() + chunk.len() > limit {
            return Err(crate::Error::S3(format!(
                "{what} is larger than {limit} bytes, more than fleetsync ever writes there: remove it or publish again"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A release's manifest header alone: the first 64 KiB of the object,
/// decompressed as far as its first line (`fleetsync releases` lists many
/// releases without downloading their manifests whole).
pub async fn fetch_header(client: &aws_sdk_s3::Client, store: &Store, id: &str) -> crate::Result<manifest::Header> {
    let key = store.manifest_key(id);
    let out = client
        .get_object()
        .bucket(&store.bucket)
        .key(&key)
        .range("bytes=0-65535")
        .send()
        .await
        .map_err(|e| crate::source::ApiFailure::from_sdk(&e).to_error(&format!("reading {}", store.url(&key))))?;
    let bytes = out.body.collect().await.map_err(|e| crate::Error::S3(format!("reading {}: {e}", store.url(&key))))?.into_bytes();
    manifest::Manifest::parse_header(&bytes, &store.url(&key))
}

/// One object of the store, as a listing shows it.
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Milliseconds since the epoch.
    pub modified_ms: u64,
}

/// Every object under `prefix` (listed with `encoding-type=url`, decoded).
pub async fn list_objects(client: &aws_sdk_s3::Client, store: &Store, prefix: &str) -> crate::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&store.bucket)
        .prefix(prefix)
        .encoding_type(aws_sdk_s3::types::EncodingType::Url)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| crate::source::ApiFailure::from_sdk(&e).to_error(&format!("listing {}", store.url(prefix))))?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            let modified_ms = o.last_modified().and_then(|t| t.to_millis().ok()).unwrap_or(0).max(0) as u64;
            out.push(Listed { key: crate::list::url_decode(key), size: o.size().unwrap_or(0).max(0) as u64, modified_ms });
        }
    }
    Ok(out)
}

/// Fetches of a manifest whose digest does not match before giving up.
const MANIFEST_TRIES: u32 = 3;

/// How a manifest's key ends.
pub const MANIFEST_SUFFIX: &str = ".jsonl.zst";

/// A release id: one path component of safe characters, not starting with
/// `.` (hidden, or `..`) or `-` (it would read as a flag).
pub fn check_release_id(id: &str) -> crate::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with(['.', '-'])
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Config(format!(
            "release id {id:?} is not usable as a directory name: use letters, digits, '.', '_' and '-' (not first '.' or '-'), at most 128"
        )))
    }
}

/// A group name usable in a key (the bastion's `--group`).
pub fn check_group(group: &str) -> crate::Result<()> {
    // An Auto Scaling Group's name: 1 to 255 characters, almost any.
    if !group.is_empty() && group.chars().count() <= 255 && !group.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(crate::Error::Config(format!("{group:?} is not an Auto Scaling Group name (1 to 255 characters, no control characters)")))
    }
}

/// A group's name as it appears in keys: percent-encoded but for letters,
/// digits and `-_.` (group names may hold `/`, spaces, anything).
pub(crate) fn group_in_key(group: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
    percent_encoding::utf8_percent_encode(group, KEEP).to_string()
}

/// Milliseconds since the epoch (store records carry wall-clock times).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_group_name_makes_one_key_and_a_name_that_is_not_one_is_refused() {
        let store = Store::of(&S3Url::parse("s3://code/app").unwrap());
        assert_eq!(store.deployed_key("web-prod_1.a"), "app/.fleetsync/deployed/web-prod_1.a.json");
        assert_eq!(store.deployed_key("web/prod eu"), "app/.fleetsync/deployed/web%2Fprod%20eu.json");
        assert_ne!(store.deployed_key("a/b"), store.deployed_key("a%2Fb"), "the encoding is one to one");
        assert!(check_group("web/prod eu").is_ok());
        for bad in ["", "a\nb", &"x".repeat(256)] {
            assert!(check_group(bad).unwrap_err().to_string().contains("not an Auto Scaling Group name"), "{bad:?}");
        }
    }
}
