//! The fleet lock: one deploy per Auto Scaling Group at a time.
//!
//! An S3 object (by default `s3://BUCKET/.fleetsync/locks/<asg>.json` in the
//! source bucket) created with a conditional PutObject `If-None-Match: *`,
//! so exactly one of any number of concurrent bastions gets it: S3 decides,
//! not a clock or a read-then-write. The body names the holder (a random
//! owner token, user, host, pid, command) and a lease expiry.
//!
//! - While held, a background task renews the lease with `If-Match: <etag>`.
//!   If a renewal finds the object changed (someone broke or took over the
//!   lock), the holder is told through [`HeldLock::lost`] and must stop
//!   starting new work. Two answers are not that: a 409
//!   ConditionalRequestConflict (S3's answer to a contender's write racing
//!   ours) is retried within the renewal window, and a 412 whose object
//!   still carries our owner token means our own earlier attempt landed and
//!   only its response was lost: the lock is still ours.
//! - Release is a DeleteObject guarded by the same ETag, so a holder never
//!   deletes a lock it no longer owns. It first stops the renewal task and
//!   waits for a renewal in flight, whose write would otherwise move the
//!   ETag under the DELETE and leave the lock behind for a whole lease.
//! - A lock whose lease has expired (its holder crashed or was paused) may
//!   be taken over: a PutObject with `If-Match` on the stale ETag, which
//!   again only one contender wins.
//! - A PUT that is retried after a lost response and finds its own owner
//!   token counts as acquired.
//!
//! Leases are compared against the local clock, so they must be much longer
//! than the clock skew between bastions (the default is 60 s, renewed
//! every 20 s).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::source::ApiFailure;

/// What the lock object says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Random per acquisition: tells "my lock" from "a lock by the same user".
    pub owner: String,
    pub user: String,
    pub host: String,
    pub pid: u32,
    pub command: String,
    pub started_at_ms: u64,
    pub expires_at_ms: u64,
}

impl LockInfo {
    /// A fresh description of this process as a holder.
    pub fn for_this_process(command: &str, lease: Duration) -> LockInfo {
        let now = now_ms();
        LockInfo {
            owner: format!("{:032x}", rand::random::<u128>()),
            user: user(),
            host: host(),
            pid: std::process::id(),
            command: command.to_string(),
            started_at_ms: now,
            expires_at_ms: now + lease.as_millis() as u64,
        }
    }

    pub fn expired(&self) -> bool {
        self.expires_at_ms <= now_ms()
    }

    /// `user@host (pid N), held for 42 s: command`.
    pub fn describe(&self) -> String {
        let age = now_ms().saturating_sub(self.started_at_ms) / 1000;
        format!("{}@{} (pid {}), held for {age} s: {}", self.user, self.host, self.pid, self.command)
    }
}

/// Where the lock lives.
#[derive(Debug, Clone)]
pub struct LockObject {
    pub bucket: String,
    pub key: String,
}

impl LockObject {
    /// The default lock of a group: `.fleetsync/locks/<asg>.json` in the
    /// source bucket, so a deploy needs no other bucket or permission setup.
    pub fn for_group(source: &crate::S3Url, asg: &str) -> Result<LockObject> {
        let ok = !asg.is_empty()
            && asg.len() <= 255
            && asg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+'))
            && asg != "."
            && asg != "..";
        if !ok {
            return Err(Error::Config(format!(
                "group name {asg:?} cannot name a lock object; give the lock's location with --lock s3://BUCKET/KEY"
            )));
        }
        Ok(LockObject { bucket: source.bucket.clone(), key: format!(".fleetsync/locks/{asg}.json") })
    }

    /// A lock object given as `s3://BUCKET/KEY`.
    pub fn parse(url: &str) -> Result<LockObject> {
        let bad = || Error::Config(format!("lock {url:?} is not valid (expected s3://BUCKET/KEY)"));
        let parsed = crate::S3Url::parse(url).map_err(|_| bad())?;
        let key = parsed.prefix.trim_end_matches('/').to_string();
        if key.is_empty() {
            return Err(bad());
        }
        Ok(LockObject { bucket: parsed.bucket, key })
    }
}

impl std::fmt::Display for LockObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("the fleet lock {object} is held by {}", holder.describe())]
    Held { object: String, holder: LockInfo },
    #[error(transparent)]
    Other(#[from] Error),
}

/// A held lock. Its renewal task stops when it is dropped; call
/// [`HeldLock::release`] to delete the object.
pub struct HeldLock {
    client: aws_sdk_s3::Client,
    object: LockObject,
    info: LockInfo,
    /// The ETag of our current version of the object, updated by renewals.
    /// A std Mutex: read or replaced in one step, never held across `.await`.
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    /// Until when (ms since the epoch, the clock others judge expiry by) the
    /// last successful write keeps the lease ours; moved by renewals.
    valid_until: Arc<AtomicU64>,
    /// A renewal period: the lock counts as lost once less than this is
    /// left of the lease, whether or not a renewal has run to say so (a
    /// process paused with SIGSTOP resumes with its lease long gone).
    period_ms: u64,
    renewal: tokio::task::JoinHandle<()>,
    /// Tells the renewal task to stop between renewals (see `release`).
    stop: tokio::sync::watch::Sender<bool>,
    /// Whether we took over an expired lock (for the report).
    pub took_over: Option<LockInfo>,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl HeldLock {
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// Whether the lock may no longer be ours: a renewal found it broken or
    /// taken over, or the lease is about to run out unrenewed. Once true,
    /// the holder must not start anything new.
    /// Latched: a lock seen lost stays lost, even if a late renewal then
    /// lands (the holder may already have stopped on the first answer).
    pub fn lost(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return true;
        }
        let gone = room(&self.valid_until, Duration::from_millis(self.period_ms)) == 0;
        if gone {
            self.lost.store(true, Ordering::SeqCst);
        }
        gone
    }

    /// Stops renewing (waiting for a renewal in flight, at most half a
    /// period: one stuck on a stalled connection is dropped, and a write of
    /// it that lands after all is recognised below by its owner) and
    /// deletes the lock, if it is still ours.
    pub async fn release(mut self) -> Result<()> {
        self.stop.send_replace(true);
        if tokio::time::timeout(attempt_limit(Duration::from_millis(self.period_ms)), &mut self.renewal).await.is_err() {
            self.renewal.abort();
        }
        for _ in 0..RELEASE_TRIES {
            let etag = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let f = match self.client.delete_object().bucket(&self.object.bucket).key(&self.object.key).if_match(etag).send().await {
                Ok(_) => return Ok(()),
                Err(e) => ApiFailure::from_sdk(&e),
            };
            match f.status {
                // A contender's write raced ours: try again.
                Some(409) => tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200)).await,
                // Changed under us: still ours (a write whose answer was
                // lost) or someone else's now.
                Some(412) => match read(&self.client, &self.object).await? {
                    Some((info, etag)) if info.owner == self.info.owner => *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = etag,
                    _ => {
                        return Err(Error::S3(format!(
                            "the fleet lock {} was no longer ours at release (broken or taken over)",
                            self.object
                        )))
                    }
                },
                Some(404) => {
                    return Err(Error::S3(format!("the fleet lock {} was no longer ours at release (broken or taken over)", self.object)))
                }
                _ => return Err(Error::S3(format!("releasing the fleet lock {}: {}", self.object, f.message))),
            }
        }
        Err(Error::S3(format!("releasing the fleet lock {}: it kept changing; its lease lets the next deploy take it over", self.object)))
    }
}

/// Takes the lock as `info` (see [`LockInfo::for_this_process`]), waiting up
/// to `wait` for a live holder to finish. Calling it again with the same
/// `info` after an error is safe: finding its own owner token, it succeeds.
pub async fn acquire(
    client: &aws_sdk_s3::Client,
    object: &LockObject,
    mut info: LockInfo,
    lease: Duration,
    wait: Duration,
) -> Result<HeldLock, LockError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        info.expires_at_ms = now_ms() + lease.as_millis() as u64;
        match try_acquire(client, object, &info).await? {
            Attempt::Acquired { etag, took_over } => {
                let etag = Arc::new(Mutex::new(etag));
                let lost = Arc::new(AtomicBool::new(false));
                let valid_until = Arc::new(AtomicU64::new(info.expires_at_ms));
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let renewal = tokio::spawn(
                    Renewal {
                        client: client.clone(),
                        object: object.clone(),
                        info: info.clone(),
                        lease,
                        etag: etag.clone(),
                        lost: lost.clone(),
                        valid_until: valid_until.clone(),
                    }
                    .run(stopped),
                );
                let period_ms = (lease / 3).as_millis() as u64;
                return Ok(HeldLock {
                    client: client.clone(),
                    object: object.clone(),
                    info,
                    etag,
                    lost,
                    valid_until,
                    period_ms,
                    renewal,
                    stop,
                    took_over,
                });
            }
            Attempt::Held(holder) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(LockError::Held { object: object.to_string(), holder });
                }
                let pause = Duration::from_millis(500 + rand::random::<u64>() % 500);
                tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
            }
            Attempt::Raced => {}
        }
    }
}

enum Attempt {
    Acquired {
        etag: String,
        took_over: Option<LockInfo>,
    },
    Held(LockInfo),
    /// The object changed between our read and our write: try again.
    Raced,
}

async fn try_acquire(client: &aws_sdk_s3::Client, object: &LockObject, info: &LockInfo) -> Result<Attempt> {
    let body = serde_json::to_vec_pretty(info).expect("lock info serializes");
    let put = client.put_object().bucket(&object.bucket).key(&object.key).body(body.clone().into()).if_none_match("*").send().await;
    match put {
        Ok(out) => return Ok(Attempt::Acquired { etag: out.e_tag().unwrap_or_default().to_string(), took_over: None }),
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            if !matches!(f.status, Some(412 | 409)) {
                return Err(f.to_error(&format!("taking the fleet lock {object}")));
            }
        }
    }
    // Someone holds it (or we do, if our earlier attempt's answer was lost).
    let Some((current, etag)) = read(client, object).await? else {
        return Ok(Attempt::Raced);
    };
    if current.owner == info.owner {
        return Ok(Attempt::Acquired { etag, took_over: None });
    }
    if !current.expired() {
        return Ok(Attempt::Held(current));
    }
    let takeover = client.put_object().bucket(&object.bucket).key(&object.key).body(body.into()).if_match(&etag).send().await;
    match takeover {
        Ok(out) => Ok(Attempt::Acquired { etag: out.e_tag().unwrap_or_default().to_string(), took_over: Some(current) }),
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            if matches!(f.status, Some(412 | 409 | 404)) {
                Ok(Attempt::Raced)
            } else {
                Err(f.to_error(&format!("taking over the fleet lock {object}")))
            }
        }
    }
}

/// The lock's current holder and ETag, if there is a lock.
pub async fn read(client: &aws_sdk_s3::Client, object: &LockObject) -> Result<Option<(LockInfo, String)>> {
    let out = match client.get_object().bucket(&object.bucket).key(&object.key).send().await {
        Ok(out) => out,
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            return match f.status {
                Some(404) => Ok(None),
                Some(403) if !f.is_credentials() => Err(crate::source::read_denied("the fleet lock", &object.bucket, &object.key, &f)),
                _ => Err(f.to_error(&format!("reading the fleet lock {object}"))),
            };
        }
    };
    let etag = out.e_tag().unwrap_or_default().to_string();
    let body = out.body.collect().await.map_err(|e| Error::S3(format!("reading the fleet lock {object}: {e}")))?;
    let info = serde_json::from_slice(&body.into_bytes())
        .map_err(|e| Error::S3(format!("the fleet lock {object} is not a fleetsync lock ({e}); remove it with `fleetsync lock break`")))?;
    Ok(Some((info, etag)))
}

/// Deletes the lock whoever holds it; returns what it broke.
pub async fn break_lock(client: &aws_sdk_s3::Client, object: &LockObject) -> Result<Option<LockInfo>> {
    let Some((info, etag)) = read(client, object).await? else {
        return Ok(None);
    };
    client
        .delete_object()
        .bucket(&object.bucket)
        .key(&object.key)
        .if_match(etag)
        .send()
        .await
        .map_err(|e| ApiFailure::from_sdk(&e).to_error(&format!("breaking the fleet lock {object}")))?;
    Ok(Some(info))
}

/// The renewal task's state: what it writes and what it tells the holder.
struct Renewal {
    client: aws_sdk_s3::Client,
    object: LockObject,
    info: LockInfo,
    lease: Duration,
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
    valid_until: Arc<AtomicU64>,
}

/// Times a release tries its conditional DELETE when writes race it.
const RELEASE_TRIES: u32 = 5;

/// What one renewal found.
enum Renewed {
    /// The lease is ours for another whole lease.
    Yes,
    /// A transient failure (after the SDK's own retries): try again soon.
    Again,
    /// The lock is no longer ours, or may not be by now.
    Lost,
}

/// The first pause before renewing again after a transient failure; it
/// doubles up to a quarter of the renewal period. A failed renewal must
/// not wait a whole period: the lease's margin (one period, see
/// [`HeldLock::lost`]) would be spent before the next try.
const AGAIN_FIRST: Duration = Duration::from_millis(250);

impl Renewal {
    /// Renews the lease every third of its length until told to stop, or
    /// until the lock is lost; after a transient failure, again within
    /// seconds, for as long as the lease leaves room.
    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let period = self.lease / 3;
        let (mut pause, mut again) = (period, AGAIN_FIRST);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.renew(period).await {
                Renewed::Yes => (pause, again) = (period, AGAIN_FIRST),
                Renewed::Again => {
                    pause = again.min(Duration::from_millis(self.room(period)));
                    again = (again * 2).min(period / 4);
                }
                Renewed::Lost => {
                    self.lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }

    /// How long (ms) renewals may still be tried: see [`room`].
    fn room(&self, period: Duration) -> u64 {
        room(&self.valid_until, period)
    }

    /// One renewal.
    async fn renew(&mut self, period: Duration) -> Renewed {
        self.info.expires_at_ms = now_ms() + self.lease.as_millis() as u64;
        let body = serde_json::to_vec_pretty(&self.info).expect("lock info serializes");
        loop {
            let current = self.etag.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let put =
                self.client.put_object().bucket(&self.object.bucket).key(&self.object.key).body(body.clone().into()).if_match(current);
            // Bounded (see `attempt_limit`); a write that lands after all
            // is ours (the 412 path below recognises it).
            let attempt = attempt_limit(period);
            let Ok(put) = tokio::time::timeout(attempt, put.send()).await else {
                tracing::warn!(lock = %self.object, "renewing the fleet lock got no answer in time; retrying");
                return if self.room(period) > 0 { Renewed::Again } else { Renewed::Lost };
            };
            let f = match put {
                Ok(out) => {
                    *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = out.e_tag().unwrap_or_default().to_string();
                    self.valid_until.store(self.info.expires_at_ms, Ordering::SeqCst);
                    return Renewed::Yes;
                }
                Err(e) => ApiFailure::from_sdk(&e),
            };
            let room = self.room(period);
            match f.status {
                Some(409) if room > 0 => {
                    tracing::info!(lock = %self.object, "renewing the fleet lock raced another write (409); retrying");
                    tokio::time::sleep(Duration::from_millis((100 + rand::random::<u64>() % 400).min(room))).await;
                }
                Some(412) => match tokio::time::timeout(attempt, read(&self.client, &self.object))
                    .await
                    .unwrap_or_else(|_| Err(Error::S3(format!("reading the fleet lock {}: no answer in time", self.object))))
                {
                    // Our own write landed and its answer was lost: still ours.
                    Ok(Some((info, etag))) if info.owner == self.info.owner => {
                        tracing::info!(lock = %self.object, "a renewal's answer was lost, but the lock is still ours");
                        *self.etag.lock().unwrap_or_else(|p| p.into_inner()) = etag;
                        self.valid_until.store(info.expires_at_ms, Ordering::SeqCst);
                        return Renewed::Yes;
                    }
                    Ok(_) => {
                        tracing::error!(lock = %self.object, "the fleet lock was broken or taken over; stopping");
                        return Renewed::Lost;
                    }
                    Err(e) if room > 0 => {
                        tracing::warn!(lock = %self.object, error = %e, "reading the fleet lock after a refused renewal failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500.min(room))).await;
                    }
                    Err(_) => return Renewed::Lost,
                },
                Some(404) => {
                    tracing::error!(lock = %self.object, "the fleet lock was broken; stopping");
                    return Renewed::Lost;
                }
                _ if room > 0 => {
                    tracing::warn!(lock = %self.object, error = %f.message, "renewing the fleet lock failed; retrying");
                    return Renewed::Again;
                }
                _ => {
                    // Someone may take it over from now on.
                    tracing::error!(lock = %self.object, error = %f.message, "the fleet lock's lease is running out unrenewed; stopping");
                    return Renewed::Lost;
                }
            }
        }
    }
}

/// How long (ms) is left before a holder whose lease runs `valid_until`
/// counts its lock as lost: one renewal `period` before the lease ends
/// (0 once it does). The holder ([`HeldLock::lost`]) and its renewals
/// ([`Renewal::run`]) judge by this one margin.
fn room(valid_until: &AtomicU64, period: Duration) -> u64 {
    valid_until.load(Ordering::SeqCst).saturating_sub(now_ms() + period.as_millis() as u64)
}

/// How long one renewal write (or read), or a release's wait for it, may
/// take: half a period (at least a second), so that a stalled connection
/// (the client's 30 s read timeout) never spends the whole margin.
fn attempt_limit(period: Duration) -> Duration {
    (period / 2).max(Duration::from_secs(1))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Who runs this process, for lock holders and publishers.
/// The login name, else the uid (a service or a container may set neither
/// variable).
fn user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| format!("uid{}", rustix::process::getuid().as_raw()))
}

fn host() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// `user@host`: who publishes, deploys, holds a lock.
pub fn user_at_host() -> String {
    format!("{}@{}", user(), host())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_explicit_lock_locations() {
        let src = crate::S3Url::parse("s3://code/app").unwrap();
        assert_eq!(LockObject::for_group(&src, "web-prod").unwrap().to_string(), "s3://code/.fleetsync/locks/web-prod.json");
        for bad in ["", "..", "a/b", "x y", "a\nb"] {
            assert!(LockObject::for_group(&src, bad).unwrap_err().to_string().contains("--lock"), "{bad:?}");
        }
        assert_eq!(LockObject::parse("s3://locks/fleet/web.json").unwrap().key, "fleet/web.json");
        assert!(LockObject::parse("s3://locks").is_err());
        assert!(LockObject::parse("locks/web.json").is_err());
    }

    #[test]
    fn lock_info_describes_its_holder() {
        let info = LockInfo::for_this_process("fleetsync sync --group web", Duration::from_secs(60));
        assert!(!info.expired());
        assert_eq!(info.owner.len(), 32);
        let d = info.describe();
        assert!(d.contains(&format!("pid {}", std::process::id())) && d.contains("fleetsync sync --group web"), "{d}");
    }
}
