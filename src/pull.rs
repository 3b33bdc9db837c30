//! The pull: list -> plan -> fetch -> switch -> report, under the node lock.
//!
//! ```text
//!  lister task ──pages──▶ planner thread ──jobs──▶ download tasks ──▶ gate ──▶ rename
//!  (ListObjectsV2)        (validate, diff)         (GET, verify)     (open once the
//!                                                                     listing is valid)
//! ```
//!
//! Downloads start with the first LIST page; renames wait until every key
//! has been validated, then happen as each download finishes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::fetch::{self, FetchCtx, FetchError, FetchStats};
use crate::keypath::RelPath;
use crate::list::{self, RemoteObject};
use crate::node_lock::{IfBusy, NodeLock};
use crate::plan::{FetchJob, FetchReason, PlanEnd, Planner};
use crate::progress::Observer;
use crate::report::{Plan, PullReport, MAX_PLAN};
use crate::safe_fs::DestDir;
use crate::source::{s3_client, ClientOptions, S3Url};
use crate::state::{Placed, StateStore};
use crate::switch::{self, Gate, GateWaiter};

/// Where the agent keeps its state when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fleetsync";
/// Downloads in flight. Small objects are latency-bound, so many in flight
/// is what makes a cold pull fast; 64 keeps memory well under 100 MiB.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// Everything a pull needs to know.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub source: S3Url,
    pub dest: PathBuf,
    /// Holds the node lock and the state store; must be outside DEST.
    pub state_dir: PathBuf,
    pub concurrency: usize,
    /// Delete files we placed that the source no longer has.
    pub delete: bool,
    /// Let an empty listing delete everything placed (or, in release mode,
    /// go live as an empty release). Off by default: an empty source is far
    /// more often a typo in the prefix or a publish not yet done than an
    /// intent to wipe the fleet's codebase.
    pub allow_empty: bool,
    pub dry_run: bool,
    pub if_busy: IfBusy,
    pub client: ClientOptions,
    /// `--owner`: who owns the files and directories placed (see `owner`).
    pub owner: Option<crate::owner::Owner>,
}

/// The last completed pull into a DEST, kept for coalescing.
#[derive(Serialize, Deserialize)]
struct LastPull {
    /// When that pull started (after taking the lock, before listing).
    started_at_ns: u128,
    report: PullReport,
}

/// Runs one pull and returns its report. `Err` means the pull as a whole
/// failed (configuration, hostile key, busy); per-file failures are in the
/// report.
pub async fn pull(opts: &PullOptions, observer: Arc<dyn Observer>) -> Result<PullReport> {
    let t0 = Instant::now();
    let requested_at = now_ns();
    check_options(opts)?;
    let client = s3_client(&opts.client).await;
    if opts.dry_run {
        return dry_run(opts, client, observer, t0).await;
    }

    let (_lock, lock_wait) = NodeLock::acquire(&opts.state_dir, opts.if_busy).await?;
    let last_path = StateStore::dir_for(&opts.state_dir, &opts.dest).join("last-pull.json");
    if let Some(mut last) = read_last(&last_path) {
        // A pull that started after we asked has seen everything we would
        // see: its result is ours, and the pile-up ends here.
        if last.started_at_ns > requested_at && last.report.source == opts.source.to_string() {
            last.report.coalesced = true;
            last.report.durations.lock_wait_ms = lock_wait.as_millis() as u64;
            return Ok(last.report);
        }
    }

    let started_at_ns = now_ns();
    let mut report = place(opts, open_dest(&opts.dest)?.with_owner(opts.owner), client, None, observer, t0, false).await?;
    report.durations.lock_wait_ms = lock_wait.as_millis() as u64;
    let record = LastPull { started_at_ns, report: report.clone() };
    tokio::task::spawn_blocking(move || {
        crate::safe_fs::write_state_file(&last_path, &serde_json::to_vec(&record).expect("report serializes"))
    })
    .await
    .expect("state write does not panic")?;
    Ok(report)
}

/// Makes `dest` (opened from `opts.dest`) match the source: the pull
/// proper, without the node lock and coalescing, which the caller owns.
/// Lists the source unless `listing` is given (release mode has listed it
/// already, to name the release). With `strict`, an object replaced or
/// deleted since it was listed fails its file (a release is one listing)
/// instead of being fetched at its new version.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn place(
    opts: &PullOptions,
    dest: DestDir,
    client: aws_sdk_s3::Client,
    listing: Option<Vec<RemoteObject>>,
    observer: Arc<dyn Observer>,
    t0: Instant,
    strict: bool,
) -> Result<PullReport> {
    let (state, placed) = {
        let (sd, d) = (opts.state_dir.clone(), opts.dest.clone());
        tokio::task::spawn_blocking(move || StateStore::open(&sd, &d)).await.expect("state load does not panic")?
    };
    let mut report = PullReport::new(opts.source.to_string(), opts.dest.display().to_string(), false);
    report.started_at_ms = (now_ns() / 1_000_000) as u64;

    let dest = Arc::new(dest);
    if state.interrupted() {
        // The last pull was killed: it may have left temporary files beside
        // their final paths. Rare, so a walk of DEST is affordable.
        let d = dest.clone();
        let swept = tokio::task::spawn_blocking(move || d.sweep_temps()).await.expect("sweep does not panic");
        let swept = swept.map_err(|e| Error::io(format!("removing temporary files left in {}", opts.dest.display()), e))?;
        tracing::info!(swept, "the previous pull was interrupted; removed its temporary files");
    }
    state.mark_in_progress()?;
    let state = Arc::new(state);
    let result = run(opts, client, listing, dest, state.clone(), placed, observer, &mut report, strict).await;

    if result.is_err() {
        // Every temporary file was discarded on the way out.
        state.clear_in_progress();
    }
    let placed = result?;
    report.settle();
    report.durations.total_ms = t0.elapsed().as_millis() as u64;
    report.finished_at_ms = (now_ns() / 1_000_000) as u64;
    tokio::task::spawn_blocking(move || -> Result<()> {
        state.compact(&placed)?;
        state.clear_in_progress();
        Ok(())
    })
    .await
    .expect("state write does not panic")?;
    Ok(report)
}

/// An empty prefix that holds a release store (`fleetsync publish` puts
/// everything under `.fleetsync/`, which a listing skips): the error that
/// says to pull it in release mode, rather than an empty tree reported ok.
async fn published_store(client: &aws_sdk_s3::Client, source: &S3Url) -> Option<Error> {
    let store = crate::store::Store::of(source);
    let head = client.head_object().bucket(&store.bucket).key(store.latest_key()).send().await;
    head.ok().map(|_| {
        Error::Config(format!(
            "{source} holds a release store (`fleetsync publish`), which in-place mode does not read: pull it with --releases (or mode = \"releases\" in agent.toml)"
        ))
    })
}

/// The error for an empty listing that would wipe what is there.
pub(crate) fn empty_source(source: &S3Url, would: &str) -> Error {
    Error::Config(format!(
        "{source} lists no objects: refusing to {would} (check the source URL and that a build was published, or pass --allow-empty)"
    ))
}

pub(crate) fn check_options(opts: &PullOptions) -> Result<()> {
    if opts.concurrency == 0 {
        return Err(Error::Config("--concurrency must be at least 1".into()));
    }
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if abs(&opts.state_dir).starts_with(abs(&opts.dest)) {
        return Err(Error::Config(format!(
            "the state dir {} is inside DEST {}; choose a --state-dir outside the served tree",
            opts.state_dir.display(),
            opts.dest.display()
        )));
    }
    Ok(())
}

fn open_dest(dest: &Path) -> Result<DestDir> {
    DestDir::open(dest).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotADirectory | std::io::ErrorKind::AlreadyExists => {
            Error::Config(format!("DEST {} is not a directory; give a directory path with --dest", dest.display()))
        }
        _ => Error::io(format!("opening DEST {}", dest.display()), e),
    })
}

/// The outcome of one download task.
enum Outcome {
    Placed {
        path: RelPath,
        placed: Placed,
        reason: FetchReason,
    },
    Failed {
        key: String,
        error: String,
    },
    Vanished,
    /// The pull was aborted before this file could be switched.
    Abandoned,
}

/// Lists, plans, fetches and switches; returns the state after the pull.
#[allow(clippy::too_many_arguments)]
async fn run(
    opts: &PullOptions,
    client: aws_sdk_s3::Client,
    listing: Option<Vec<RemoteObject>>,
    dest: Arc<DestDir>,
    state: Arc<StateStore>,
    placed: HashMap<RelPath, Placed>,
    observer: Arc<dyn Observer>,
    report: &mut PullReport,
    strict: bool,
) -> Result<HashMap<RelPath, Placed>> {
    // In place, this pull lists the source itself (release mode hands it a listing).
    let in_place = listing.is_none();
    let (mut jobs, planner) = start_planner(opts, client.clone(), listing, Some(dest.clone()), placed, observer.clone());
    let gate = Gate::new();
    let ctx = Arc::new(FetchCtx {
        client,
        bucket: opts.source.bucket.clone(),
        dest: dest.clone(),
        gate: gate.waiter(),
        ranges: Arc::new(Semaphore::new(fetch::RANGES_TOTAL)),
        strict,
    });
    let permits = Arc::new(Semaphore::new(opts.concurrency));
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut seq = 0u64;
    while let Some(job) = jobs.recv().await {
        observer.planned(job.size);
        seq += 1;
        // The permit is taken before the task exists: a task per listed
        // file up front would hold 100,000 download futures (and their SDK
        // request state) at once on a large cold pull. Jobs wait in the
        // channel instead, a few hundred bytes each, and the listing still
        // runs ahead of the downloads.
        let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let task = download(ctx.clone(), state.clone(), permit, gate.waiter(), job, seq, observer.clone());
        tasks.spawn(task);
        while let Some(done) = tasks.try_join_next() {
            outcomes.push(done.expect("download tasks do not panic"));
        }
    }

    let end = match planner.await.expect("planner does not panic") {
        Ok(end) => end,
        Err(e) => {
            // Nothing was renamed into place, and every temporary file so far
            // is in the staging directory, which goes when DEST is dropped:
            // stop the downloads rather than finish them for nothing.
            gate.abort();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            return Err(e);
        }
    };
    if end.listed == 0 && in_place {
        if let Some(e) = published_store(&ctx.client, &opts.source).await {
            gate.abort();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            return Err(e);
        }
    }
    report.counts.listed = end.listed;
    report.counts.unchanged = end.unchanged;
    observer.listing_done(end.listed);
    let PlanEnd { deletions, dirs, mut placed, .. } = end.plan;
    if end.listed == 0 && !deletions.is_empty() && !opts.allow_empty {
        gate.abort();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        return Err(empty_source(&opts.source, &format!("delete the {} files placed in {}", deletions.len(), opts.dest.display())));
    }

    // Deletions first: a file the source dropped may stand where a new
    // directory must go (`a` was a file, now `a/b` is).
    let (deleted, delete_failures) = {
        let (dest, state) = (dest.clone(), state.clone());
        tokio::task::spawn_blocking(move || switch::delete(&dest, &state, &deletions, &dirs)).await.expect("deletions do not panic")
    };
    for path in deleted {
        placed.remove(&path);
        report.counts.deleted += 1;
    }
    for (path, error) in delete_failures {
        report.push_error(format!("{}{}", opts.source.prefix, path), error);
    }
    gate.open();

    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.expect("download tasks do not panic"));
    }
    for (outcome, stats) in outcomes {
        report.counts.retries += stats.retries as u64;
        report.counts.replanned += stats.replanned as u64;
        match outcome {
            Outcome::Placed { path, placed: p, reason } => {
                report.counts.downloaded += 1;
                report.counts.repaired += (reason == FetchReason::Drifted) as u64;
                report.bytes_downloaded += p.size;
                placed.insert(path, p);
            }
            Outcome::Failed { key, error } => report.push_error(key, error),
            Outcome::Vanished => report.counts.vanished += 1,
            Outcome::Abandoned => {}
        }
    }
    Ok(placed)
}

/// Fetches one object, waits for the gate, switches it into place.
async fn download(
    ctx: Arc<FetchCtx>,
    state: Arc<StateStore>,
    permit: tokio::sync::OwnedSemaphorePermit,
    gate: GateWaiter,
    job: FetchJob,
    seq: u64,
    observer: Arc<dyn Observer>,
) -> (Outcome, FetchStats) {
    // Boxed: the fetch's state (the SDK request, the body stream) lives on
    // the heap only while it runs, so a task that then waits at the gate
    // for the listing to finish is a few hundred bytes, not the size of the
    // largest state the fetch ever has.
    let (result, stats) = Box::pin(fetch::fetch(&ctx, &job, seq)).await;
    // The permit bounds downloads, not files waiting at the gate.
    drop(permit);
    let staged = match result {
        Ok(s) => s,
        Err(FetchError::Vanished) => return (Outcome::Vanished, stats),
        Err(FetchError::Failed(error)) => {
            observer.failed(&job.key, &error);
            return (Outcome::Failed { key: job.key, error }, stats);
        }
    };
    observer.downloaded(staged.placed.size);
    if !gate.wait().await {
        ctx.dest.discard(&staged.temp);
        return (Outcome::Abandoned, stats);
    }
    // A rename (and, for a file beside its final path, nothing else) is
    // cheap: done on this worker for the same reason as small writes.
    let committed = switch::commit(&ctx.dest, &state, &staged, &job.path).map(|()| staged.placed);
    match committed {
        Ok(placed) => {
            observer.placed();
            (Outcome::Placed { path: job.path, placed, reason: job.reason }, stats)
        }
        Err(error) => {
            observer.failed(&job.key, &error);
            (Outcome::Failed { key: job.key, error }, stats)
        }
    }
}

/// What the planner thread hands back.
struct PlannerEnd {
    plan: PlanEnd,
    listed: u64,
    unchanged: u64,
}

/// Starts the lister and the planner thread; returns the stream of jobs
/// and the planner's result.
fn start_planner(
    opts: &PullOptions,
    client: aws_sdk_s3::Client,
    listing: Option<Vec<RemoteObject>>,
    dest: Option<Arc<DestDir>>,
    placed: HashMap<RelPath, Placed>,
    observer: Arc<dyn Observer>,
) -> (mpsc::UnboundedReceiver<FetchJob>, tokio::task::JoinHandle<Result<PlannerEnd>>) {
    let mut lister = match listing {
        Some(objects) => list::given(objects),
        None => list::start(client, opts.source.clone()),
    };
    // Unbounded: jobs are small, and the listing must not wait for the
    // downloads (files fetched before it ends are staged, then moved).
    let (tx, rx) = mpsc::unbounded_channel();
    let prefix = opts.source.prefix.clone();
    let delete = opts.delete;
    let planner = tokio::task::spawn_blocking(move || {
        let mut planner = Planner::new(&prefix, dest.as_deref(), placed);
        while let Some(page) = lister.pages.blocking_recv() {
            let before = planner.listed;
            for job in planner.plan_page(page?)? {
                if tx.send(job).is_err() {
                    return Err(Error::S3("the pull was cancelled".into()));
                }
            }
            observer.listed(planner.listed - before);
        }
        let (listed, unchanged) = (planner.listed, planner.unchanged);
        Ok(PlannerEnd { plan: planner.finish(delete)?, listed, unchanged })
    });
    (rx, planner)
}

/// Lists and plans without writing anything, not even the lock or state.
async fn dry_run(opts: &PullOptions, client: aws_sdk_s3::Client, observer: Arc<dyn Observer>, t0: Instant) -> Result<PullReport> {
    let placed = StateStore::load_read_only(&opts.state_dir, &opts.dest)?;
    let dest =
        DestDir::open_read_only(&opts.dest).map_err(|e| Error::io(format!("opening DEST {}", opts.dest.display()), e))?.map(Arc::new);
    let (mut jobs, planner) = start_planner(opts, client.clone(), None, dest, placed, observer);
    let mut report = PullReport::new(opts.source.to_string(), opts.dest.display().to_string(), true);
    let mut plan = Plan::default();
    while let Some(job) = jobs.recv().await {
        report.counts.downloaded += 1;
        report.counts.repaired += (job.reason == FetchReason::Drifted) as u64;
        plan.fetch_bytes += job.size;
        if plan.fetch.len() < MAX_PLAN {
            plan.fetch.push(job.path.to_string());
        }
    }
    let end = planner.await.expect("planner does not panic")?;
    if end.listed == 0 {
        if let Some(e) = published_store(&client, &opts.source).await {
            return Err(e);
        }
    }
    report.counts.listed = end.listed;
    report.counts.unchanged = end.unchanged;
    report.counts.deleted = end.plan.deletions.len() as u64;
    plan.delete = end.plan.deletions.iter().take(MAX_PLAN).map(|p| p.to_string()).collect();
    report.bytes_downloaded = plan.fetch_bytes;
    report.plan = Some(plan);
    report.durations.total_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn read_last(path: &Path) -> Option<LastPull> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}
