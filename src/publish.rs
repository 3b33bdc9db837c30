//! PUBLISH: uploads a build directory to the source prefix, the CI side of
//! a deploy (`fleetsync publish build/ s3://code/app`).
//!
//! walk -> diff -> upload -> delete -> pointer:
//! - the build directory is walked without following symlinks (refused
//!   unless `--follow-symlinks`); every path must be a key the agent
//!   accepts, so a build that nodes would refuse fails here, before upload;
//! - each file's ETag is computed as S3 computes it (MD5, or for files of
//!   [`PART_SIZE`] and more the multipart form `md5-of-part-md5s-N` with the
//!   part size used for upload), so a file whose ETag matches the listing
//!   is not uploaded again, large files included;
//! - uploads run concurrently with the file's mode in `x-amz-meta-mode`;
//! - remote objects missing locally are deleted only after every upload
//!   succeeded, so a failed publish never removes what nodes still need;
//! - last, the release pointer `PREFIX/.fleetsync/current.json` names the
//!   release and its content hash. Agents in release mode name the release
//!   after it and refuse a listing whose hash differs (a publish still in
//!   progress), so no node ever builds a half-published release.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use futures::StreamExt;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keypath::{map_key, Entry};
use crate::list::{self, RemoteObject, RESERVED_DIR};
use crate::release::{check_release_id, content_id};
use crate::source::{s3_client, ApiFailure, ClientOptions, S3Url};

/// Multipart part size, and the size from which files go multipart: the
/// AWS CLI's defaults, so objects it uploaded compare equal too.
pub const PART_SIZE: u64 = 8 * 1024 * 1024;
/// Uploads in flight (each holds at most one part in memory).
const UPLOADS: usize = 16;
/// The release pointer, under the prefix.
pub const POINTER: &str = "current.json";

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub dir: PathBuf,
    pub dest: S3Url,
    pub release_id: Option<String>,
    pub follow_symlinks: bool,
    pub dry_run: bool,
    pub client: ClientOptions,
}

/// What a publish did.
#[derive(Debug, Default, Serialize)]
pub struct PublishReport {
    pub source: String,
    pub dest: String,
    pub release_id: String,
    pub content: String,
    pub files: u64,
    pub uploaded: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub bytes_uploaded: u64,
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    pub exit_code: i32,
    pub duration_ms: u64,
}

/// `PREFIX/.fleetsync/current.json`: what was last published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pointer {
    pub release_id: String,
    /// The content hash of the prefix as published (see `release::content_id`).
    pub content: String,
    pub files: u64,
    pub published_at_ms: u64,
    /// user@host of the publisher.
    pub publisher: String,
}

/// One local file to publish.
struct LocalFile {
    key: String,
    path: PathBuf,
    size: u64,
    mode: u32,
    /// Quoted, as LIST returns it.
    etag: String,
}

/// Runs one publish.
pub async fn publish(opts: &PublishOptions) -> Result<PublishReport> {
    let t0 = Instant::now();
    if let Some(id) = &opts.release_id {
        check_release_id(id)?;
    }
    let (dir, prefix, follow) = (opts.dir.clone(), opts.dest.prefix.clone(), opts.follow_symlinks);
    let files = tokio::task::spawn_blocking(move || walk(&dir, &prefix, follow)).await.expect("the walk does not panic")?;
    let client = s3_client(&opts.client).await;
    let remote: HashMap<String, RemoteObject> =
        list::collect(client.clone(), opts.dest.clone()).await?.into_iter().map(|o| (o.key.clone(), o)).collect();

    let listing: Vec<RemoteObject> =
        files.iter().map(|f| RemoteObject { key: f.key.clone(), etag: f.etag.clone(), size: f.size }).collect();
    let content = content_id(&listing, &opts.dest.prefix);
    let mut report = PublishReport {
        source: opts.dir.display().to_string(),
        dest: opts.dest.to_string(),
        release_id: opts.release_id.clone().unwrap_or_else(|| content.clone()),
        content: content.clone(),
        files: files.len() as u64,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let local: std::collections::HashSet<&str> = files.iter().map(|f| f.key.as_str()).collect();
    let stale: Vec<String> = remote.keys().filter(|k| !local.contains(k.as_str())).cloned().collect();
    let (changed, same): (Vec<&LocalFile>, Vec<&LocalFile>) =
        files.iter().partition(|f| remote.get(&f.key).is_none_or(|r| r.etag != f.etag));
    report.unchanged = same.len() as u64;
    if opts.dry_run {
        report.uploaded = changed.len() as u64;
        report.bytes_uploaded = changed.iter().map(|f| f.size).sum();
        report.deleted = stale.len() as u64;
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }

    let results: Vec<std::result::Result<u64, String>> = futures::stream::iter(changed)
        .map(|f| {
            let client = client.clone();
            let bucket = opts.dest.bucket.clone();
            async move { upload(&client, &bucket, f).await.map(|()| f.size).map_err(|e| format!("{}: {e}", f.key)) }
        })
        .buffer_unordered(UPLOADS)
        .collect()
        .await;
    for r in results {
        match r {
            Ok(bytes) => {
                report.uploaded += 1;
                report.bytes_uploaded += bytes;
            }
            Err(e) => report.errors.push(e),
        }
    }
    if !report.errors.is_empty() {
        // Nodes may still need what a delete would remove, and the pointer
        // must not name content that is not all there.
        report.exit_code = crate::exit::PARTIAL;
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    report.deleted = delete(&client, &opts.dest.bucket, &stale).await?;
    let pointer = Pointer {
        release_id: report.release_id.clone(),
        content,
        files: report.files,
        published_at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        publisher: crate::fleet_lock::user_at_host(),
    };
    let key = pointer_key(&opts.dest);
    client
        .put_object()
        .bucket(&opts.dest.bucket)
        .key(&key)
        .content_type("application/json")
        .body(ByteStream::from(serde_json::to_vec_pretty(&pointer).expect("the pointer serializes")))
        .send()
        .await
        .map_err(|e| ApiFailure::from_sdk(&e).to_error(&format!("writing the release pointer s3://{}/{key}", opts.dest.bucket)))?;
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

/// The release pointer's key for a source.
pub fn pointer_key(source: &S3Url) -> String {
    format!("{}{RESERVED_DIR}{POINTER}", source.prefix)
}

/// Reads the release pointer; `None` when nothing was published with one.
pub async fn read_pointer(client: &aws_sdk_s3::Client, source: &S3Url) -> Result<Option<Pointer>> {
    let key = pointer_key(source);
    let out = match client.get_object().bucket(&source.bucket).key(&key).send().await {
        Ok(out) => out,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            if f.status == Some(403) && !f.is_credentials() {
                return Err(crate::source::read_denied("the release pointer", &source.bucket, &key, &f));
            }
            return Err(f.to_error(&format!("reading the release pointer s3://{}/{key}", source.bucket)));
        }
    };
    let body = out.body.collect().await.map_err(|e| Error::S3(format!("reading the release pointer s3://{}/{key}: {e}", source.bucket)))?;
    serde_json::from_slice(&body.into_bytes()).map(Some).map_err(|e| {
        Error::Config(format!("the release pointer s3://{}/{key} is not valid ({e}); publish again to rewrite it", source.bucket))
    })
}

/// The files of the build directory, with their keys, modes and ETags.
fn walk(dir: &Path, prefix: &str, follow: bool) -> Result<Vec<LocalFile>> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::Config(format!("cannot read the build directory {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Config(format!("{} is not a directory: publish takes a build directory", dir.display())));
    }
    let mut files = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((path, rel, depth)) = stack.pop() {
        if depth > 64 {
            return Err(Error::Config(format!("{} is nested more than 64 levels deep (a symlink loop?)", path.display())));
        }
        let entries = std::fs::read_dir(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let name = entry.file_name().into_string().map_err(|n| {
                Error::Config(format!("{} has a name that is not UTF-8: S3 keys must be UTF-8; rename it", path.join(n).display()))
            })?;
            let full = entry.path();
            let rel_path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            if depth == 0 && format!("{name}/") == RESERVED_DIR {
                return Err(Error::Config(format!("{} is reserved for fleetsync's own objects; rename it in the build", full.display())));
            }
            let mut meta = std::fs::symlink_metadata(&full).map_err(|e| Error::io(format!("reading {}", full.display()), e))?;
            if meta.file_type().is_symlink() {
                if !follow {
                    return Err(Error::Config(format!(
                        "{} is a symlink: S3 cannot hold one; remove it from the build or pass --follow-symlinks to upload what it points to",
                        full.display()
                    )));
                }
                meta = std::fs::metadata(&full).map_err(|e| Error::Config(format!("{} is a broken symlink: {e}", full.display())))?;
            }
            if meta.is_dir() {
                stack.push((full, rel_path, depth + 1));
            } else if meta.is_file() {
                let key = format!("{prefix}{rel_path}");
                match map_key(&key, prefix) {
                    Ok(Some(Entry::File(_))) => {}
                    Ok(_) => unreachable!("a file's key maps to a file"),
                    Err(e) => return Err(Error::Config(format!("{}: agents would refuse its key: {e}; rename it", full.display()))),
                }
                let etag = file_etag(&full, meta.len())?;
                files.push(LocalFile { key, path: full, size: meta.len(), mode: meta.permissions().mode() & 0o7777, etag });
            } else {
                return Err(Error::Config(format!("{} is not a regular file or directory; remove it from the build", full.display())));
            }
        }
    }
    files.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(files)
}

/// The ETag S3 gives this file when uploaded the way [`upload`] does it.
fn file_etag(path: &Path, size: u64) -> Result<String> {
    let err = |e| Error::io(format!("reading {}", path.display()), e);
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut buf = vec![0u8; 1 << 20];
    if size < PART_SIZE {
        let mut h = Md5::new();
        loop {
            let n = f.read(&mut buf).map_err(err)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        return Ok(format!("\"{}\"", hex::encode(h.finalize())));
    }
    let mut parts = Vec::new();
    let mut left = size;
    while left > 0 {
        let mut h = Md5::new();
        let mut part_left = left.min(PART_SIZE);
        left -= part_left;
        while part_left > 0 {
            let want = part_left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want]).map_err(err)?;
            if n == 0 {
                return Err(Error::S3(format!("{} shrank while being read; publish again once the build is done", path.display())));
            }
            h.update(&buf[..n]);
            part_left -= n as u64;
        }
        parts.extend_from_slice(&h.finalize());
    }
    Ok(format!("\"{}-{}\"", hex::encode(Md5::digest(&parts)), parts.len() / 16))
}

/// The mode as stored in `x-amz-meta-mode`.
fn mode_meta(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Uploads one file: one PUT, or multipart from [`PART_SIZE`] up.
async fn upload(client: &aws_sdk_s3::Client, bucket: &str, f: &LocalFile) -> std::result::Result<(), String> {
    let read_part = |offset: u64, len: u64| {
        let path = f.path.clone();
        async move {
            let p = path.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                use std::io::{Seek, SeekFrom};
                let mut file = std::fs::File::open(&p)?;
                file.seek(SeekFrom::Start(offset))?;
                let mut buf = vec![0u8; len as usize];
                file.read_exact(&mut buf)?;
                Ok(buf)
            })
            .await
            .expect("reading does not panic")
            .map_err(|e| format!("reading {}: {e}", path.display()))
        }
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what} failed: {e}");
    if f.size < PART_SIZE {
        let body = read_part(0, f.size).await?;
        client
            .put_object()
            .bucket(bucket)
            .key(&f.key)
            .metadata("mode", mode_meta(f.mode))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| fail("PutObject", &ApiFailure::from_sdk(&e).message))?;
        return Ok(());
    }
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(&f.key)
        .metadata("mode", mode_meta(f.mode))
        .send()
        .await
        .map_err(|e| fail("CreateMultipartUpload", &ApiFailure::from_sdk(&e).message))?;
    let upload_id = created.upload_id().unwrap_or_default().to_string();
    let mut parts = Vec::new();
    let mut offset = 0;
    let mut number = 1;
    let result: std::result::Result<(), String> = async {
        while offset < f.size {
            let len = (f.size - offset).min(PART_SIZE);
            let body = read_part(offset, len).await?;
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(&f.key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| fail("UploadPart", &ApiFailure::from_sdk(&e).message))?;
            parts.push(CompletedPart::builder().part_number(number).set_e_tag(out.e_tag().map(str::to_string)).build());
            offset += len;
            number += 1;
        }
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(&f.key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| fail("CompleteMultipartUpload", &ApiFailure::from_sdk(&e).message))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = client.abort_multipart_upload().bucket(bucket).key(&f.key).upload_id(&upload_id).send().await;
    }
    result
}

/// Deletes `keys`, a thousand per request.
async fn delete(client: &aws_sdk_s3::Client, bucket: &str, keys: &[String]) -> Result<u64> {
    let mut deleted = 0;
    for chunk in keys.chunks(1000) {
        let objects = chunk.iter().map(|k| ObjectIdentifier::builder().key(k).build().expect("a key is set")).collect();
        let out = client
            .delete_objects()
            .bucket(bucket)
            .delete(Delete::builder().set_objects(Some(objects)).quiet(true).build().expect("objects are set"))
            .send()
            .await
            .map_err(|e| ApiFailure::from_sdk(&e).to_error(&format!("deleting removed files from s3://{bucket}")))?;
        if let Some(e) = out.errors().first() {
            return Err(Error::S3(format!(
                "deleting s3://{bucket}/{} failed: {}",
                e.key().unwrap_or_default(),
                e.message().unwrap_or_default()
            )));
        }
        deleted += chunk.len() as u64;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_etags_are_computed_as_s3_does() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"hello").unwrap();
        assert_eq!(file_etag(&small, 5).unwrap(), "\"5d41402abc4b2a76b9719d911017c592\"");
        // Two parts: the MD5 of the two parts' binary MD5s, then "-2".
        let big = dir.path().join("big");
        let body: Vec<u8> = (0..PART_SIZE + 10).map(|i| (i % 251) as u8).collect();
        std::fs::write(&big, &body).unwrap();
        let mut both = Md5::digest(&body[..PART_SIZE as usize]).to_vec();
        both.extend_from_slice(&Md5::digest(&body[PART_SIZE as usize..]));
        assert_eq!(file_etag(&big, body.len() as u64).unwrap(), format!("\"{}-2\"", hex::encode(Md5::digest(&both))));
        assert_eq!(mode_meta(0o100755), "0755");
    }
}
