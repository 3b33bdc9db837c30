//! FETCH (from the release store): the files a release build needs, from
//! packs and blobs, each verified against its SHA-256 before it gets its
//! name.
//!
//! - Pack members: coalesced ranged GETs ([`pack::plan`]), [`RANGES`] in
//!   flight, each range held in memory (at most 8 MiB) and decoded on the
//!   blocking pool: every file decompressed, hashed, written to a
//!   temporary file beside its final path, given its mode and renamed into
//!   place. A file whose bytes do not match its hash (a flipped byte on the
//!   wire, a damaged pack) is fetched again, up to [`ATTEMPTS`] times, and
//!   then fails the build: it never gets its name.
//! - Blobs: parallel ranged GETs written in place (`pwrite`), then the
//!   whole file hashed before it gets its name.
//!
//! The release being built is not live, so files are renamed into it as
//! they arrive; the switch happens only once every file is there.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::keypath::RelPath;
use crate::progress::Observer;
use crate::safe_fs::{DestDir, TempAt};
use crate::source::ApiFailure;
use crate::state::{Placed, StateStore};
use crate::store::manifest::{FileEntry, Location};
use crate::store::pack::{self, Wanted};
use crate::store::{Digest, Store};

/// Ranged GETs of packs in flight (each up to 8 MiB held while decoded).
const RANGES: usize = 8;
/// One ranged GET of a blob, and how many a blob has in flight.
const BLOB_RANGE: u64 = 16 * 1024 * 1024;
const BLOB_RANGES: usize = 4;
/// Attempts per range or blob, for failures the SDK does not retry itself
/// (a body cut short, bytes that do not match their hash).
const ATTEMPTS: u32 = 5;

/// What the store tells the state store about a file it placed: the
/// content's digest and mode, so that the next release can share the file
/// when neither changed.
pub(crate) fn store_etag(hash: &Digest, mode: u32) -> String {
    format!("sha256:{hash}:{mode:o}")
}

/// The digest and mode a [`store_etag`] holds.
pub(crate) fn parse_store_etag(etag: &str) -> Option<(Digest, u32)> {
    let (hash, mode) = etag.strip_prefix("sha256:")?.split_once(':')?;
    Some((Digest::from_hex(hash.as_bytes())?, u32::from_str_radix(mode, 8).ok()?))
}

/// The [`Digest::prefix`] of the digest a [`store_etag`] holds, from its
/// first 16 digits only: a cheap first match before [`parse_store_etag`].
pub(crate) fn store_etag_prefix(etag: &str) -> Option<u64> {
    Digest::prefix_from_hex(etag.strip_prefix("sha256:")?.as_bytes().get(..16)?)
}

/// What fetching gave.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    pub files: u64,
    /// Bytes received (compressed, as stored).
    pub bytes: u64,
    pub retries: u64,
    /// (path, why) of files that could not be placed.
    pub failed: Vec<(String, String)>,
    pub requests: u64,
}

/// Everything a fetch needs, shared by its tasks.
pub(crate) struct Fetcher {
    pub client: aws_sdk_s3::Client,
    pub store: Store,
    pub dest: Arc<DestDir>,
    pub state: Arc<StateStore>,
    pub observer: Arc<dyn Observer>,
    pub seq: AtomicU64,
}

impl Fetcher {
    /// Fetches and places `files` (of a manifest whose packs are `packs`).
    pub(crate) async fn fetch(self: &Arc<Self>, packs: &[Digest], files: Vec<FileEntry>) -> Fetched {
        let mut wanted = Vec::new();
        let mut blobs = Vec::new();
        for (i, f) in files.iter().enumerate() {
            match f.at {
                Location::Pack { pack, offset, len, .. } => wanted.push((pack, Wanted { index: i, offset, len })),
                Location::Blob { .. } => blobs.push(i),
            }
        }
        let files = Arc::new(files);
        let ranges = pack::plan(wanted);
        let range_results = futures::stream::iter(ranges)
            .map(|r| {
                let key = self.store.pack_key(&packs[r.pack as usize]);
                let (this, files) = (self.clone(), files.clone());
                async move { this.range(&key, r, &files).await }
            })
            .buffer_unordered(RANGES);
        let blob_results = futures::stream::iter(blobs)
            .map(|i| {
                let (this, files) = (self.clone(), files.clone());
                async move { this.blob(&files[i]).await }
            })
            .buffer_unordered(2);
        let mut all = futures::stream::select(range_results, blob_results);
        let mut total = Fetched::default();
        while let Some(part) = all.next().await {
            total.files += part.files;
            total.bytes += part.bytes;
            total.retries += part.retries;
            total.requests += part.requests;
            total.failed.extend(part.failed);
        }
        total
    }

    /// One coalesced range of a pack: fetched, and its files placed; the
    /// files that did not verify fetched again.
    async fn range(self: &Arc<Self>, key: &str, r: pack::Range, files: &Arc<Vec<FileEntry>>) -> Fetched {
        let mut out = Fetched::default();
        let mut pending = r.items;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                out.retries += 1;
                backoff(attempt).await;
            }
            let start = pending.iter().map(|w| w.offset).min().expect("a range has files");
            let end = pending.iter().map(|w| w.offset + w.len).max().expect("a range has files");
            out.requests += 1;
            let body = match self.get_range(key, start, end).await {
                Ok(b) => b,
                Err(Failure::Retry(why)) => {
                    last = why;
                    continue;
                }
                Err(Failure::Fatal(why)) => {
                    out.failed.extend(pending.iter().map(|w| (files[w.index].path.to_string(), why.clone())));
                    return out;
                }
            };
            out.bytes += body.len() as u64;
            let (this, files2, items) = (self.clone(), files.clone(), pending.clone());
            let placed = tokio::task::spawn_blocking(move || {
                items
                    .iter()
                    .map(|w| (*w, this.place_stored(&files2[w.index], &body[(w.offset - start) as usize..][..w.len as usize])))
                    .collect::<Vec<_>>()
            })
            .await
            .expect("placing does not panic");
            pending.clear();
            for (w, result) in placed {
                match result {
                    Ok(()) => out.files += 1,
                    Err(Failure::Retry(why)) => {
                        last = format!("{}: {why}", files[w.index].path);
                        pending.push(w);
                    }
                    Err(Failure::Fatal(why)) => out.failed.push((files[w.index].path.to_string(), why)),
                }
            }
            if pending.is_empty() {
                return out;
            }
        }
        let why = format!("gave up after {ATTEMPTS} attempts: {last}");
        out.failed.extend(pending.iter().map(|w| (files[w.index].path.to_string(), why.clone())));
        out
    }

    /// Decodes, verifies and places one pack member. Blocking.
    fn place_stored(&self, f: &FileEntry, stored: &[u8]) -> Result<(), Failure> {
        let compressed = matches!(f.at, Location::Pack { compressed: true, .. });
        let data = pack::decode(stored, compressed, f.size, &f.hash).map_err(Failure::Retry)?;
        self.place(&f.path, &data, f.mode, &f.hash)
    }

    /// Writes `data` to `path` (a temporary file beside it, given its mode,
    /// renamed into place) and records it. Blocking.
    pub(crate) fn place(&self, path: &RelPath, data: &[u8], mode: u32, hash: &Digest) -> Result<(), Failure> {
        use std::io::Write;
        self.place_with(path, mode, hash, data.len() as u64, |file| file.write_all(data))
    }

    /// Copies `src` to `path` as [`Fetcher::place`] writes, a megabyte at a
    /// time (a file of any size costs no more memory), checking that what
    /// was copied hashes to `hash`. Blocking.
    pub(crate) fn place_copy(
        &self,
        path: &RelPath,
        src: &mut impl std::io::Read,
        mode: u32,
        hash: &Digest,
        size: u64,
    ) -> Result<(), Failure> {
        use std::io::Write;
        self.place_with(path, mode, hash, size, |file| {
            let mut hasher = crate::store::digest::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
            if hasher.finish() != *hash {
                return Err(std::io::Error::other("the copy does not hash to the manifest's SHA-256"));
            }
            Ok(())
        })
    }

    /// A temporary file beside `path`, filled by `fill`, given `mode`, then
    /// recorded and renamed into place. Blocking.
    fn place_with(
        &self,
        path: &RelPath,
        mode: u32,
        hash: &Digest,
        size: u64,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> Result<(), Failure> {
        let fatal = |e: std::io::Error| Failure::Fatal(format!("writing {path} in {}: {e}", self.dest.path().display()));
        let (mut file, temp) = self.dest.create_temp(TempAt::Beside(path), self.seq.fetch_add(1, Ordering::Relaxed)).map_err(fatal)?;
        let written = fill(&mut file).and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)));
        if let Err(e) = written {
            self.dest.discard(&temp);
            return Err(fatal(e));
        }
        self.finish(path, &file, temp, mode, hash, size)
    }

    /// Records a written temporary file and renames it into place.
    fn finish(
        &self,
        path: &RelPath,
        file: &std::fs::File,
        temp: crate::safe_fs::TempName,
        mode: u32,
        hash: &Digest,
        size: u64,
    ) -> Result<(), Failure> {
        let st = rustix::fs::fstat(file).map_err(|e| Failure::Fatal(format!("{path}: {e}")))?;
        let placed = Placed {
            etag: store_etag(hash, mode),
            size,
            file_size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
        };
        let staged = crate::switch::Staged { temp, placed: placed.clone() };
        crate::switch::commit(&self.dest, &self.state, &staged, path).map_err(Failure::Fatal)?;
        self.observer.downloaded(size);
        self.observer.placed();
        Ok(())
    }

    /// One blob: parallel ranged GETs into a temporary file, then hashed.
    async fn blob(self: &Arc<Self>, f: &FileEntry) -> Fetched {
        let mut out = Fetched::default();
        let key = self.store.blob_key(&f.hash);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                out.retries += 1;
                backoff(attempt).await;
            }
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let created =
                self.dest.create_temp(TempAt::Beside(&f.path), seq).and_then(|(file, t)| file.set_len(f.size).map(|()| (file, t)));
            let (file, temp) = match created {
                Ok(x) => x,
                Err(e) => {
                    out.failed.push((f.path.to_string(), format!("writing {} in {}: {e}", f.path, self.dest.path().display())));
                    return out;
                }
            };
            let file = Arc::new(file);
            // The ranges are made as they are fetched, and the first that
            // fails stops the rest: a size in a hostile manifest can be
            // anything, and neither a list of its ranges nor a GET for each
            // may follow from it.
            let size = f.size;
            let ranges = (0..size).step_by(BLOB_RANGE as usize).map(move |s| (s, (s + BLOB_RANGE).min(size)));
            let issued = AtomicU64::new(0);
            let fetched: Result<u64, Failure> = async {
                let received = futures::stream::iter(ranges)
                    .map(|(start, end)| {
                        let (this, file, key) = (self.clone(), file.clone(), key.clone());
                        issued.fetch_add(1, Ordering::Relaxed);
                        async move {
                            let body = this.get_range(&key, start, end).await?;
                            let n = body.len() as u64;
                            tokio::task::spawn_blocking(move || file.write_all_at(&body, start))
                                .await
                                .expect("pwrite does not panic")
                                .map_err(|e| Failure::Fatal(format!("writing {}: {e}", key)))?;
                            Ok::<u64, Failure>(n)
                        }
                    })
                    .buffer_unordered(BLOB_RANGES)
                    .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
                    .await?;
                let (file, f) = (file.clone(), f.clone());
                tokio::task::spawn_blocking(move || -> Result<(), Failure> {
                    let mut reader = ReadAt { file: &file, at: 0 };
                    let hash = Digest::of_reader(&mut reader).map_err(|e| Failure::Fatal(format!("reading back {}: {e}", f.path)))?;
                    if hash != f.hash {
                        return Err(Failure::Retry("its SHA-256 does not match the manifest".into()));
                    }
                    file.set_permissions(std::fs::Permissions::from_mode(f.mode)).map_err(|e| Failure::Fatal(format!("{}: {e}", f.path)))
                })
                .await
                .expect("hashing does not panic")?;
                Ok(received)
            }
            .await;
            out.requests += issued.into_inner();
            match fetched {
                Ok(received) => {
                    out.bytes += received;
                    match self.finish(&f.path, &file, temp, f.mode, &f.hash, f.size) {
                        Ok(()) => out.files += 1,
                        Err(Failure::Retry(why) | Failure::Fatal(why)) => out.failed.push((f.path.to_string(), why)),
                    }
                    return out;
                }
                Err(Failure::Retry(why)) => {
                    self.dest.discard(&temp);
                    last = why;
                }
                Err(Failure::Fatal(why)) => {
                    self.dest.discard(&temp);
                    out.failed.push((f.path.to_string(), why));
                    return out;
                }
            }
        }
        out.failed.push((f.path.to_string(), format!("gave up after {ATTEMPTS} attempts: {last}")));
        out
    }

    /// Bytes `start..end` of `key`, all of them.
    async fn get_range(&self, key: &str, start: u64, end: u64) -> Result<Bytes, Failure> {
        let out =
            self.client.get_object().bucket(&self.store.bucket).key(key).range(format!("bytes={start}-{}", end - 1)).send().await.map_err(
                |e| {
                    let f = ApiFailure::from_sdk(&e);
                    match f.status {
                        Some(404) => {
                            Failure::Fatal(format!("{} is missing from the store (pruned while still named?)", self.store.url(key)))
                        }
                        Some(403) => Failure::Fatal(format!("GET {} denied: {} ({})", self.store.url(key), f.message, f.hint())),
                        _ => Failure::Retry(format!("GET {} failed: {}", self.store.url(key), f.message)),
                    }
                },
            )?;
        let body =
            out.body.collect().await.map_err(|e| Failure::Retry(format!("reading {} failed: {e}", self.store.url(key))))?.into_bytes();
        if body.len() as u64 != end - start {
            return Err(Failure::Retry(format!("{} gave {} bytes of {start}..{end}", self.store.url(key), body.len())));
        }
        Ok(body)
    }
}

/// A failed attempt, and whether another may succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    Retry(String),
    Fatal(String),
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis((100 << attempt.min(5)) + rand::random::<u64>() % 100)).await;
}

/// Reads a file from the start with `pread`, for hashing what was written.
struct ReadAt<'a> {
    file: &'a std::fs::File,
    at: u64,
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}
