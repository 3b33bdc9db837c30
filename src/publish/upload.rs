//! UPLOAD: a publish's new content into the store, every object written
//! once under its digest.
//!
//! New small files are packed in path order, [`PACK_TARGET`] of raw bytes
//! per pack, each file compressed on its own; packs are built on every core
//! and uploaded as they are done. A pack (or a blob) already stored (a
//! publish run again after a kill builds the very same packs) is found with
//! one HEAD and not uploaded again. Every file is hashed again as it is
//! packed or uploaded: a file that changed since the walk would otherwise
//! be stored under the wrong digest, and every node would refuse it.

use std::io::Read;

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::StreamExt;

use super::walk::LocalFile;
use super::Plan;
use crate::error::{Error, Result};
use crate::source::ApiFailure;
use crate::store::digest::Hasher;
use crate::store::manifest::Location;
use crate::store::pack::{encode, PackWriter, BLOB_THRESHOLD, PACK_TARGET};
use crate::store::{pointer, Digest, Store};

/// Packs built at once (each holds up to a pack's bytes in memory).
const PACKS_AT_ONCE: usize = 3;
/// Blob part size: blobs of this size and more are multipart uploads.
const PART: u64 = 16 * 1024 * 1024;
/// Blob uploads at once.
const BLOBS_AT_ONCE: usize = 4;

/// What was uploaded.
pub(crate) struct Uploaded {
    pub bytes: u64,
    pub packs: u64,
    pub blobs: u64,
}

/// Uploads the plan's new content and fills in where each file went.
pub(crate) async fn content(client: &aws_sdk_s3::Client, store: &Store, plan: &mut Plan) -> Result<Uploaded> {
    let mut new = std::mem::take(&mut plan.new);
    new.sort_by(|a, b| a.path.cmp(&b.path));
    let (small, large): (Vec<LocalFile>, Vec<LocalFile>) = new.into_iter().partition(|f| f.size < BLOB_THRESHOLD);
    let mut up = Uploaded { bytes: 0, packs: 0, blobs: 0 };

    // Packs: a fixed split by raw size, so a re-run builds the same ones.
    let mut groups: Vec<Vec<LocalFile>> = Vec::new();
    let mut raw = 0;
    for f in small {
        if groups.is_empty() || raw + f.size > PACK_TARGET {
            groups.push(Vec::new());
            raw = 0;
        }
        raw += f.size;
        groups.last_mut().expect("a group was pushed").push(f);
    }
    let built: Vec<Result<(Pack, bool)>> = futures::stream::iter(groups)
        .map(|group| async move {
            let mut pack = tokio::task::spawn_blocking(move || build_pack(&group)).await.expect("packing does not panic")?;
            let key = store.pack_key(&pack.digest);
            let bytes = std::mem::take(&mut pack.bytes);
            let uploaded =
                !exists(client, store, &key).await? && pointer::put_once(client, store, &key, bytes, "application/octet-stream").await?;
            Ok((pack, uploaded))
        })
        .buffered(PACKS_AT_ONCE)
        .collect()
        .await;
    for b in built {
        let (built, uploaded) = b?;
        let pack = plan.pack_number(built.digest);
        if uploaded {
            up.packs += 1;
            up.bytes += built.size;
        }
        for (hash, at) in built.members {
            let at = match at {
                Location::Pack { offset, len, compressed, .. } => Location::Pack { pack, offset, len, compressed },
                at => at,
            };
            plan.stored(&hash, at);
        }
    }

    // Blobs: one object each, as they are. (Uploading them while packs are
    // built was measured no faster: the server's ingest is the bound, and
    // the publish held 40% more memory.)
    let blobs: Vec<Result<(Digest, u64, bool)>> = futures::stream::iter(large)
        .map(|f| async move {
            let hash = f.hash.expect("files are hashed");
            let key = store.blob_key(&hash);
            let uploaded = !exists(client, store, &key).await? && upload_blob(client, store, &key, &f).await?;
            Ok((hash, f.size, uploaded))
        })
        .buffer_unordered(BLOBS_AT_ONCE)
        .collect()
        .await;
    for b in blobs {
        let (hash, size, uploaded) = b?;
        if uploaded {
            up.blobs += 1;
            up.bytes += size;
        }
        plan.stored(&hash, Location::Blob { len: size });
    }
    Ok(up)
}

/// A pack built from a group of files.
struct Pack {
    digest: Digest,
    /// Its bytes (taken when it is uploaded) and their length.
    bytes: Vec<u8>,
    size: u64,
    /// Where each file's bytes are in it (pack index 0: the caller numbers packs).
    members: Vec<(Digest, Location)>,
}

/// Reads, checks and compresses a group of files into one pack.
fn build_pack(group: &[LocalFile]) -> Result<Pack> {
    let mut w = PackWriter::default();
    let mut members = Vec::with_capacity(group.len());
    for f in group {
        let data = std::fs::read(&f.full).map_err(|e| Error::io(format!("reading {}", f.full.display()), e))?;
        let hash = f.hash.expect("files are hashed");
        if Digest::of(&data) != hash {
            return Err(changed(f));
        }
        let (stored, compressed) = encode(&data);
        let offset = w.push(&stored);
        members.push((hash, Location::Pack { pack: 0, offset, len: stored.len() as u64, compressed }));
    }
    let (digest, bytes) = w.finish();
    Ok(Pack { digest, size: bytes.len() as u64, bytes, members })
}

fn changed(f: &LocalFile) -> Error {
    Error::Config(format!("{} changed while it was published; publish once the build is done", f.full.display()))
}

/// Whether the object exists (one HEAD; 403 reads as "no" only with
/// s3:ListBucket missing, which the write then reports).
async fn exists(client: &aws_sdk_s3::Client, store: &Store, key: &str) -> Result<bool> {
    match client.head_object().bucket(&store.bucket).key(key).send().await {
        Ok(_) => Ok(true),
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            match f.status {
                Some(404 | 403) => Ok(false),
                _ => Err(f.to_error(&format!("checking {}", store.url(key)))),
            }
        }
    }
}

/// Uploads a large file as it is, checking its digest as it is read; a
/// multipart upload from [`PART`] up. `false` when it was there already.
async fn upload_blob(client: &aws_sdk_s3::Client, store: &Store, key: &str, f: &LocalFile) -> Result<bool> {
    let hash = f.hash.expect("files are hashed");
    let read_part = |offset: u64, len: u64| {
        let path = f.full.clone();
        async move {
            tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                use std::io::{Seek, SeekFrom};
                let mut file = std::fs::File::open(&path)?;
                file.seek(SeekFrom::Start(offset))?;
                let mut buf = vec![0u8; len as usize];
                file.read_exact(&mut buf)?;
                Ok(buf)
            })
            .await
            .expect("reading does not panic")
            .map_err(|e| Error::io(format!("reading {}", f.full.display()), e))
        }
    };
    let fail = |what: &str, e: ApiFailure| e.to_error(&format!("{what} {}", store.url(key)));
    if f.size < PART {
        let body = read_part(0, f.size).await?;
        if Digest::of(&body) != hash {
            return Err(changed(f));
        }
        return pointer::put_once(client, store, key, body, "application/octet-stream").await;
    }
    let created = client
        .create_multipart_upload()
        .bucket(&store.bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| fail("starting", ApiFailure::from_sdk(&e)))?;
    let upload_id = created.upload_id().unwrap_or_default().to_string();
    let result: Result<bool> = async {
        let mut hasher = Hasher::new();
        let mut parts = Vec::new();
        let (mut offset, mut number) = (0, 1);
        while offset < f.size {
            let len = (f.size - offset).min(PART);
            let body = read_part(offset, len).await?;
            hasher.update(&body);
            let out = client
                .upload_part()
                .bucket(&store.bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(body.into())
                .send()
                .await
                .map_err(|e| fail("uploading a part of", ApiFailure::from_sdk(&e)))?;
            parts.push(CompletedPart::builder().part_number(number).set_e_tag(out.e_tag().map(str::to_string)).build());
            offset += len;
            number += 1;
        }
        if hasher.finish() != hash {
            return Err(changed(f));
        }
        let parts = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let mut attempt = 0;
        loop {
            let done = client
                .complete_multipart_upload()
                .bucket(&store.bucket)
                .key(key)
                .upload_id(&upload_id)
                .if_none_match("*")
                .multipart_upload(parts.clone())
                .send()
                .await;
            match done {
                Ok(_) => return Ok(true),
                Err(e) => match ApiFailure::from_sdk(&e) {
                    f if f.status == Some(412) => return Ok(false),
                    // Two publishes sharing this blob completed it at once.
                    // The key is content-addressed: if the other one's is
                    // there, this one is done; else complete again (the
                    // upload stays open until completed or aborted).
                    f if f.status == Some(409) && attempt + 1 < pointer::CONFLICT_TRIES => {
                        if exists(client, store, key).await? {
                            return Ok(false);
                        }
                        pointer::conflict_pause(attempt).await;
                        attempt += 1;
                    }
                    f => return Err(fail("completing", f)),
                },
            }
        }
    }
    .await;
    if !matches!(result, Ok(true)) {
        let _ = client.abort_multipart_upload().bucket(&store.bucket).key(key).upload_id(&upload_id).send().await;
    }
    result
}
