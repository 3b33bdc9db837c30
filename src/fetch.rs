//! FETCH: downloads one object into a staging file and verifies it.
//!
//! A download never touches its final path: it is streamed into a
//! temporary file (beside the final path once the listing is validated, in
//! `DEST/.fleetsync.tmp/` before that), checked (MD5 against the ETag when the ETag is a
//! plain MD5, length always), given its mode, and only then handed to the
//! switch step for the rename. The GET carries `If-Match: <listed ETag>`, so
//! an object replaced between LIST and GET answers 412 instead of mixing
//! versions; we then fetch the new version and record its ETag.
//!
//! Objects of [`RANGED_THRESHOLD`] and more are fetched as parallel ranged
//! GETs, each with the same `If-Match`, written in place with `pwrite`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest, Md5};

use crate::keypath::RelPath;
use crate::plan::FetchJob;
use crate::safe_fs::{DestDir, TempAt, TempName};
use crate::source::ApiFailure;
use crate::state::Placed;
use crate::switch::{GateWaiter, Staged};

/// Objects at least this large are fetched as parallel ranged GETs.
pub const RANGED_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Size of one ranged GET.
const RANGE_SIZE: u64 = 16 * 1024 * 1024;
/// Ranged GETs in flight for one large object.
const RANGES_IN_FLIGHT: usize = 8;
/// Ranged GETs in flight across all large objects of a pull. Without a
/// shared cap, 20 large objects at once were 140 streams, each buffering up
/// to a MiB: measured on 20 x 100 MiB, 264 MiB peak RSS and slower than with
/// fewer streams, the two cores being busy switching between them.
pub(crate) const RANGES_TOTAL: usize = 16;
/// Body bytes buffered before a write to disk: large enough that a typical
/// source file is one write, small enough that 64 downloads stay light.
const WRITE_BUFFER: usize = 1024 * 1024;
/// Files up to this size are written on the async worker itself rather
/// than on the blocking pool. Creating, writing, chmod-ing and renaming a
/// small file is a few tens of microseconds of page-cache work; handing it
/// to the blocking pool costs more than that in thread wake-ups (measured:
/// 160,000 futex calls and 50 threads contending for 2 cores on a
/// 10,000-file pull). Larger writes can stall on the disk, so they still go
/// to the blocking pool.
const INLINE_WRITE: usize = 256 * 1024;
/// Attempts per object for failures the SDK does not retry itself (a body
/// cut mid-stream, a checksum mismatch).
const ATTEMPTS: u32 = 5;

/// What happened besides the result, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FetchStats {
    /// Attempts beyond the first.
    pub retries: u32,
    /// The object changed between LIST and GET and was fetched again.
    pub replanned: bool,
}

#[derive(Debug)]
pub(crate) enum FetchError {
    /// The object was deleted between LIST and GET: nothing to place.
    Vanished,
    /// Gave up; the message names what went wrong.
    Failed(String),
}

/// Everything a download needs, shared by all of them.
pub(crate) struct FetchCtx {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    pub dest: Arc<DestDir>,
    /// Open once the whole listing is validated: temporary files may then be
    /// created beside their final path instead of in the staging directory.
    pub gate: GateWaiter,
    /// [`RANGES_TOTAL`] permits, one per ranged GET in flight.
    pub ranges: Arc<tokio::sync::Semaphore>,
    /// An object replaced (412) or deleted (404) since it was listed fails
    /// its file instead of being fetched at its new version (release mode:
    /// a release is one listing, never a mix of two).
    pub strict: bool,
}

impl FetchCtx {
    fn create_temp(&self, path: &RelPath, seq: u64) -> std::io::Result<(File, TempName)> {
        let at = if self.gate.is_open() { TempAt::Beside(path) } else { TempAt::Staging };
        self.dest.create_temp(at, seq)
    }
}

/// One failed attempt, and whether another may succeed.
enum Attempt {
    /// 412: the object is not the one we listed any more.
    Replaced,
    /// 404: the object is gone.
    Vanished,
    Retry(String),
    Fatal(String),
}

/// Downloads one object into a temporary file.
pub(crate) async fn fetch(ctx: &Arc<FetchCtx>, job: &FetchJob, seq: u64) -> (Result<Staged, FetchError>, FetchStats) {
    let (etag, size) = (job.etag.as_str(), job.size);
    let mut stats = FetchStats::default();
    // After a 412 we stop insisting on the listed ETag and take the current
    // object, verifying it against the ETag its own response carries.
    let mut if_match = Some(etag.to_string());
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            stats.retries += 1;
            let backoff = Duration::from_millis(100 << attempt.min(5)) + Duration::from_millis(rand::random::<u64>() % 100);
            tokio::time::sleep(backoff).await;
        }
        let result = if size >= RANGED_THRESHOLD && if_match.is_some() {
            fetch_ranged(ctx, job, seq).await
        } else {
            fetch_whole(ctx, job, if_match.as_deref(), seq).await
        };
        match result {
            Ok(staged) => return (Ok(staged), stats),
            Err(Attempt::Replaced) if ctx.strict => {
                let why = "it was replaced after it was listed (something is writing the prefix); the release is not switched, the next pull lists again";
                return (Err(FetchError::Failed(why.into())), stats);
            }
            Err(Attempt::Vanished) if ctx.strict => {
                let why = "it was deleted after it was listed (something is writing the prefix); the release is not switched, the next pull lists again";
                return (Err(FetchError::Failed(why.into())), stats);
            }
            Err(Attempt::Replaced) => {
                stats.replanned = true;
                if_match = None;
                last = "the object changed while it was being fetched".into();
            }
            Err(Attempt::Vanished) => return (Err(FetchError::Vanished), stats),
            Err(Attempt::Retry(m)) => last = m,
            Err(Attempt::Fatal(m)) => return (Err(FetchError::Failed(m)), stats),
        }
    }
    (Err(FetchError::Failed(format!("gave up after {ATTEMPTS} attempts: {last}"))), stats)
}

fn classify<E>(err: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Attempt
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let f = ApiFailure::from_sdk(&err);
    match (f.status, f.code.as_deref()) {
        (Some(412), _) | (_, Some("PreconditionFailed")) => Attempt::Replaced,
        (Some(404), _) | (_, Some("NoSuchKey")) => Attempt::Vanished,
        (Some(403), _) => Attempt::Fatal(format!("GET denied: {} ({})", f.message, f.hint())),
        _ => Attempt::Retry(format!("GET failed: {}", f.message)),
    }
}

/// Whether the ETag is the MD5 of the content: 32 hex digits, which is what
/// S3 returns for single-part uploads without SSE-KMS or SSE-C.
fn etag_md5(etag: &str) -> Option<[u8; 16]> {
    let hex_part = etag.trim_matches('"');
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// The file mode from `x-amz-meta-mode` (octal), capped: 0755 if any
/// execute bit is set, 0644 otherwise. Setuid, setgid, sticky and group or
/// world write never come from the bucket.
pub(crate) fn mode_from_meta(meta: Option<&std::collections::HashMap<String, String>>) -> u32 {
    let raw = meta.and_then(|m| m.get("mode")).and_then(|m| u32::from_str_radix(m.trim().trim_start_matches("0o"), 8).ok());
    match raw {
        Some(m) if m & 0o111 != 0 => 0o755,
        _ => 0o644,
    }
}

/// Checks that the content may be verified by MD5: the ETag is plain and
/// the object is not encrypted with a key that changes the ETag.
fn md5_verifiable(etag: &str, sse: Option<&aws_sdk_s3::types::ServerSideEncryption>, sse_c: Option<&str>) -> Option<[u8; 16]> {
    use aws_sdk_s3::types::ServerSideEncryption as Sse;
    if sse_c.is_some() || matches!(sse, Some(Sse::AwsKms | Sse::AwsKmsDsse)) {
        return None;
    }
    etag_md5(etag)
}

async fn fetch_whole(ctx: &Arc<FetchCtx>, job: &FetchJob, if_match: Option<&str>, seq: u64) -> Result<Staged, Attempt> {
    let mut out = ctx
        .client
        .get_object()
        .bucket(&ctx.bucket)
        .key(&job.key)
        .set_if_match(if_match.map(str::to_string))
        .send()
        .await
        .map_err(classify)?;
    let etag = out.e_tag().unwrap_or_default().to_string();
    let expect_md5 = md5_verifiable(&etag, out.server_side_encryption(), out.sse_customer_algorithm());
    let expect_len = out.content_length().map(|l| l.max(0) as u64);
    let mode = mode_from_meta(out.metadata());

    let mut hasher = Md5::new();
    let mut writer = StagedWriter::new(ctx.clone(), job.path.clone(), seq);
    let mut len = 0u64;
    while let Some(chunk) = out.body.next().await {
        let chunk = chunk.map_err(|e| Attempt::Retry(format!("reading the body failed after {len} bytes: {e}")))?;
        len += chunk.len() as u64;
        if expect_md5.is_some() {
            hasher.update(&chunk);
        }
        writer.push(chunk).await?;
    }
    if let Some(expected) = expect_len {
        if len != expected {
            writer.discard();
            return Err(Attempt::Retry(format!("body was {len} bytes, Content-Length said {expected}")));
        }
    }
    if let Some(expected) = expect_md5 {
        if hasher.finalize()[..] != expected[..] {
            writer.discard();
            return Err(Attempt::Retry(format!("MD5 of the body does not match ETag {etag}")));
        }
    }
    writer.finish(mode, etag, len).await
}

async fn fetch_ranged(ctx: &Arc<FetchCtx>, job: &FetchJob, seq: u64) -> Result<Staged, Attempt> {
    use futures::{StreamExt, TryStreamExt};
    let (key, etag, size) = (job.key.as_str(), job.etag.as_str(), job.size);
    let (c, path) = (ctx.clone(), job.path.clone());
    let (file, temp) = tokio::task::spawn_blocking(move || {
        let (f, t) = c.create_temp(&path, seq)?;
        f.set_len(size)?;
        Ok::<_, std::io::Error>((Arc::new(f), t))
    })
    .await
    .expect("temporary file creation does not panic")
    .map_err(|e| Attempt::Fatal(format!("creating a temporary file: {e}")))?;
    let discard = |e: Attempt| {
        ctx.dest.discard(&temp);
        e
    };

    let ranges: Vec<(u64, u64)> = (0..size).step_by(RANGE_SIZE as usize).map(|s| (s, (s + RANGE_SIZE).min(size) - 1)).collect();
    let modes: Vec<u32> = futures::stream::iter(ranges)
        .map(|(first, last)| {
            let file = file.clone();
            async move {
                let _permit = ctx.ranges.acquire().await.expect("the range semaphore is never closed");
                let mut out = ctx
                    .client
                    .get_object()
                    .bucket(&ctx.bucket)
                    .key(key)
                    .if_match(etag)
                    .range(format!("bytes={first}-{last}"))
                    .send()
                    .await
                    .map_err(classify)?;
                let mode = mode_from_meta(out.metadata());
                let mut at = first;
                let mut buf = Vec::with_capacity(WRITE_BUFFER);
                loop {
                    let chunk =
                        out.body.next().await.transpose().map_err(|e| Attempt::Retry(format!("reading range {first}-{last}: {e}")))?;
                    if let Some(c) = &chunk {
                        buf.extend_from_slice(c);
                    }
                    if buf.len() >= WRITE_BUFFER || (chunk.is_none() && !buf.is_empty()) {
                        let (f, data, off) = (file.clone(), std::mem::take(&mut buf), at);
                        at += data.len() as u64;
                        tokio::task::spawn_blocking(move || f.write_all_at(&data, off))
                            .await
                            .expect("pwrite does not panic")
                            .map_err(|e| Attempt::Fatal(format!("writing a staging file: {e}")))?;
                    }
                    if chunk.is_none() {
                        break;
                    }
                }
                if at != last + 1 {
                    return Err(Attempt::Retry(format!("range {first}-{last} ended after {} bytes", at - first)));
                }
                Ok(mode)
            }
        })
        .buffer_unordered(RANGES_IN_FLIGHT)
        .try_collect()
        .await
        .map_err(discard)?;
    let mode = modes.into_iter().next().unwrap_or(0o644);

    // The whole object's MD5, read back from the page cache once every
    // range has landed. Hashing each range as soon as it and all before it
    // had landed (overlapping the download) was tried and measured: no
    // faster on this 2-core machine, where the hash, the download and the
    // server all compete for CPU (1 GiB: 1.16 s vs 1.11 s; 20 x 100 MiB:
    // 2.91 s vs 2.24 s, medians of 3), so the simpler order stays.
    let expect_md5 = etag_md5(etag);
    let f = file.clone();
    let verified = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let Some(expected) = expect_md5 else {
            return Ok(true);
        };
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; WRITE_BUFFER];
        let mut off = 0;
        loop {
            let n = f.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        Ok(hasher.finalize()[..] == expected[..])
    })
    .await
    .expect("hashing does not panic")
    .map_err(|e| discard(Attempt::Fatal(format!("reading back a staging file: {e}"))))?;
    if !verified {
        return Err(discard(Attempt::Retry(format!("MD5 of the assembled ranges does not match ETag {etag}"))));
    }
    let file = Arc::try_unwrap(file).map_err(|_| discard(Attempt::Fatal("staging file still shared".into())))?;
    let etag = etag.to_string();
    let placed = tokio::task::spawn_blocking(move || seal(&file, mode, etag, size))
        .await
        .expect("seal does not panic")
        .map_err(|e| discard(Attempt::Fatal(format!("finishing a temporary file: {e}"))))?;
    Ok(Staged { temp, placed })
}

/// Sets the final mode and reads back size and mtime for the state store.
/// The rename that follows changes neither.
fn seal(file: &File, mode: u32, etag: String, size: u64) -> std::io::Result<Placed> {
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    let st = rustix::fs::fstat(file)?;
    Ok(Placed { etag, size, file_size: st.st_size as u64, mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64 })
}

/// Streams a body into a staging file with few, large writes. The file is
/// created lazily, so a small object is written in one go (create, write,
/// chmod, stat), on the async worker itself (see [`INLINE_WRITE`]).
struct StagedWriter {
    ctx: Arc<FetchCtx>,
    path: RelPath,
    seq: u64,
    file: Option<(File, TempName)>,
    buf: Vec<Bytes>,
    buffered: usize,
}

impl StagedWriter {
    fn new(ctx: Arc<FetchCtx>, path: RelPath, seq: u64) -> StagedWriter {
        StagedWriter { ctx, path, seq, file: None, buf: Vec::new(), buffered: 0 }
    }

    async fn push(&mut self, chunk: Bytes) -> Result<(), Attempt> {
        self.buffered += chunk.len();
        self.buf.push(chunk);
        if self.buffered >= WRITE_BUFFER {
            self.flush(None).await?;
        }
        Ok(())
    }

    /// Writes what is buffered; with `seal_with`, also finishes the file.
    async fn flush(&mut self, seal_with: Option<(u32, String, u64)>) -> Result<Option<Placed>, Attempt> {
        let (ctx, path, seq) = (self.ctx.clone(), self.path.clone(), self.seq);
        let (is_final, pending, was_open) = (seal_with.is_some(), self.buffered, self.file.is_some());
        let file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        self.buffered = 0;
        let write = move || {
            let (mut f, temp) = match file {
                Some(f) => f,
                None => match ctx.create_temp(&path, seq) {
                    Ok(f) => f,
                    Err(e) => return (Err(e), None),
                },
            };
            let mut res = buf.iter().try_for_each(|b| f.write_all(b)).map(|()| None);
            if let (Ok(_), Some((mode, etag, size))) = (&res, seal_with) {
                res = seal(&f, mode, etag, size).map(Some);
            }
            (res, Some((f, temp)))
        };
        let (res, file) = if !was_open && is_final && pending <= INLINE_WRITE {
            write()
        } else {
            tokio::task::spawn_blocking(write).await.expect("temporary file writes do not panic")
        };
        self.file = file;
        res.map_err(|e| {
            self.discard();
            let full = e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error());
            let msg = format!("writing a temporary file in {}: {e}", self.ctx.dest.path().display());
            if full {
                Attempt::Fatal(msg)
            } else {
                Attempt::Retry(msg)
            }
        })
    }

    async fn finish(mut self, mode: u32, etag: String, size: u64) -> Result<Staged, Attempt> {
        let placed = self.flush(Some((mode, etag, size))).await?.expect("sealed");
        let (_, temp) = self.file.take().expect("file exists after a flush");
        Ok(Staged { temp, placed })
    }

    fn discard(&mut self) {
        if let Some((_, temp)) = self.file.take() {
            self.ctx.dest.discard(&temp);
        }
    }
}

impl Drop for StagedWriter {
    /// A writer dropped before `finish` (the pull was cancelled) leaves no
    /// staging file behind.
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_capped() {
        let m = |s: &str| {
            let mut h = std::collections::HashMap::new();
            h.insert("mode".to_string(), s.to_string());
            mode_from_meta(Some(&h))
        };
        assert_eq!(m("0755"), 0o755);
        assert_eq!(m("100755"), 0o755);
        assert_eq!(m("0644"), 0o644);
        assert_eq!(m("4777"), 0o755);
        assert_eq!(m("7777"), 0o755);
        assert_eq!(m("0666"), 0o644);
        assert_eq!(m("garbage"), 0o644);
        assert_eq!(mode_from_meta(None), 0o644);
    }

    #[test]
    fn only_plain_etags_are_md5() {
        assert!(etag_md5("\"d41d8cd98f00b204e9800998ecf8427e\"").is_some());
        assert!(etag_md5("\"d41d8cd98f00b204e9800998ecf8427e-3\"").is_none());
        assert!(etag_md5("").is_none());
        use aws_sdk_s3::types::ServerSideEncryption as Sse;
        let e = "\"d41d8cd98f00b204e9800998ecf8427e\"";
        assert!(md5_verifiable(e, Some(&Sse::AwsKms), None).is_none());
        assert!(md5_verifiable(e, None, Some("AES256")).is_none());
        assert!(md5_verifiable(e, Some(&Sse::Aes256), None).is_some());
    }
}
