//! DEPLOY: the flow of every command that changes the fleet (`sync`,
//! `rollback`): discover -> lock -> target -> trigger -> collect -> report.
//!
//! - discover: the group's InService, Healthy, running instances;
//! - lock: the fleet lock, so two deploys of one group never overlap (the
//!   source is checked first: a misspelt bucket must not get a lock object);
//! - target (a published source, [`crate::target`]): the release the group
//!   moves to, and its deployed pointer set to `deploying`;
//! - trigger and collect: canaries first, then the rest in `--batch`es,
//!   each node's agent report turned into a result. With `--bake`, each
//!   batch (the canaries too) ends before the next starts, and the deploy
//!   waits that long after it; the `--alarm`s ([`crate::alarms`]) are
//!   watched from the first node to the end of the last bake, and one in
//!   ALARM stops and fails the deploy. Once the pass is over,
//!   the group is listed again, and instances that joined during the
//!   deploy are synced too. When a deploy of a published source fails and
//!   `--rollback-on-failure` is given, every node not known to run the
//!   previous release is switched back to it, so the fleet ends on one
//!   release;
//! - report: the per-node results, for the caller to print, and a record in
//!   the store's deploy history (`fleetsync history`).
//!
//! An interrupt (Ctrl-C, or SIGTERM from a cancelled CI job), during the
//! pass or the switch back, stops starting nodes, cancels what SSM was sent
//! (once the SendCommands in flight have answered, and waiting a while for
//! SSM to end what it cancels), and releases the lock rather than leaving
//! it to block the next deploy for a lease.

use std::time::{Duration, Instant};

use fleetsync::fleet_lock::{self, LockObject};
use fleetsync::source::S3Client;
use fleetsync::{exit, S3Url};

use fleetsync::store::fence;
use fleetsync::store::history::{DeployRecord, NodeOutcome};
use fleetsync::store::pointer::{self, DeployState};

use crate::alarms::{self, Alarms};
use crate::collect::{NodeResult, NodeStatus};
use crate::discover::{self, Node};
use crate::progress::{log, Progress};
use crate::report::{FleetReport, FleetRollback};
use crate::target::{self, Target};
use crate::trigger::{self, Action, AddressChoice, AgentCall, Fleet, Transport};
use crate::values::Limit;

/// Everything one deploy needs, resolved from flags and fleetsync.toml.
pub struct Deploy {
    /// For messages and the SSM comment: `sync`, `rollback`.
    pub verb: &'static str,
    pub asg: String,
    pub source: S3Url,
    /// `--dest` as given (for the report; empty when each node's agent.toml says).
    pub dest: String,
    pub lock: LockObject,
    pub lease: Duration,
    /// How long to wait for another deploy's lock.
    pub lock_wait: Duration,
    /// The command line the lock records, so `lock show` can name it.
    pub command: String,
    pub transport: Transport,
    pub call: AgentCall,
    pub address: AddressChoice,
    pub batch: Option<Limit>,
    pub max_errors: Option<Limit>,
    pub canary: usize,
    /// List the group again and run instances that joined meanwhile too.
    pub rejoin: bool,
    /// Which release, when the source is a release store.
    pub releases: Releases,
    /// A failed deploy of a published source switches the fleet back to
    /// the group's previous release (see `not_on`).
    pub rollback_on_failure: bool,
    /// `--bake`: how long to wait after each batch, watching, before the
    /// next (zero: batches roll on as places free up).
    pub bake: Duration,
    /// `--alarm`: the CloudWatch alarms that fail the deploy.
    pub alarms: Vec<String>,
}

/// What a deploy asks of a release store.
#[derive(Debug, Clone)]
pub enum Releases {
    /// Not release mode (`sync` in place).
    None,
    /// `sync --releases`: this release, or the latest published.
    Sync(Option<String>),
    /// `rollback`: this release, or the group's previous one.
    Rollback(Option<String>),
}

/// How a deploy ended, for the caller to print.
pub enum Ended {
    /// The per-node report (its exit code says how it went).
    Report(Box<FleetReport>),
    /// Another deploy holds the lock: its description.
    Busy(String),
    /// SIGINT or SIGTERM (the lock was released, SSM commands cancelled).
    Interrupted,
}

/// Discovers the targets, or says why there is nothing to do.
pub async fn targets(sdk: &aws_types::SdkConfig, asg: &str, verb: &str) -> anyhow::Result<(Vec<Node>, Vec<Node>)> {
    let (targets, skipped): (Vec<_>, Vec<_>) = discover::discover(sdk, asg).await?.into_iter().partition(Node::is_target);
    if targets.is_empty() {
        return Err(fleetsync::Error::Config(format!("no instance of {asg:?} is InService, Healthy and running; nothing to {verb}")).into());
    }
    Ok((targets, skipped))
}

/// `sync --dry-run`: what would run where, and whether the lock is free.
/// Exit code 3 when another deploy holds it.
pub async fn dry_run(d: &Deploy, sdk: &aws_types::SdkConfig, s3: &S3Client) -> anyhow::Result<(String, i32)> {
    d.transport.check(&d.call)?;
    let (targets, skipped) = targets(sdk, &d.asg, d.verb).await?;
    fleetsync::source::check_source(s3, &d.source).await?;
    if !d.alarms.is_empty() {
        Alarms::new(sdk, d.alarms.clone()).check().await?;
    }
    let mut out = format!("would run on {} nodes over {}: {}\n", targets.len(), d.transport.name(), d.call.command_line());
    for n in &targets {
        let address = trigger::address(n, d.address).unwrap_or_else(|| "(no address)".into());
        out.push_str(&format!("  {} {} {address}\n", d.verb, n.instance_id));
    }
    for n in &skipped {
        out.push_str(&format!("  skip {}: {}\n", n.instance_id, n.skipped.as_deref().unwrap_or("")));
    }
    let lock = fleet_lock::read(s3, &d.lock).await?;
    match &lock {
        None => out.push_str(&format!("the fleet lock {} is free", d.lock)),
        Some((info, _)) => out.push_str(&format!("the fleet lock {} is held by {}", d.lock, info.describe())),
    }
    let busy = lock.is_some_and(|(info, _)| !info.expired());
    Ok((out, if busy { exit::BUSY } else { exit::OK }))
}

/// discover -> lock -> trigger -> collect -> report.
pub async fn run(d: Deploy, sdk: &aws_types::SdkConfig, s3: &S3Client) -> anyhow::Result<Ended> {
    let started = Instant::now();
    let started_ms = now_ms();
    d.transport.check(&d.call)?;
    let (targets, skipped) = targets(sdk, &d.asg, d.verb).await?;

    fleetsync::source::check_source(s3, &d.source).await?;
    let alarms = Alarms::new(sdk, d.alarms.clone());
    if !d.alarms.is_empty() {
        alarms.check().await?;
    }
    let info = fleet_lock::LockInfo::for_this_process(&d.command, d.lease);
    let held = match fleet_lock::acquire(s3, &d.lock, info, d.lease, d.lock_wait).await {
        Ok(h) => h,
        Err(fleet_lock::LockError::Held { holder, .. }) => return Ok(Ended::Busy(holder.describe())),
        Err(fleet_lock::LockError::Other(e)) => return Err(e.into()),
    };
    // Again once the lock is held: the wait for it may have been long,
    // and an alarm that fired meanwhile is not this deploy's doing.
    if !d.alarms.is_empty() {
        if let Err(e) = alarms.check().await {
            release(held).await;
            return Err(e);
        }
    }
    let mut target = match resolve_target(&d, s3).await {
        Ok(t) => t,
        Err(e) => {
            // Nothing was changed: the lock goes before the error does.
            release(held).await;
            return Err(e);
        }
    };
    let progress = Progress::new(targets.len());
    if let Some(prev) = &held.took_over {
        progress.note(&format!("took over an expired fleet lock from {}", prev.describe()));
    }
    let mut call = d.call.clone();
    if let Some(t) = &target {
        call = store_call(&d.source, &d.call, t, &pointer::Target { release: t.release.clone(), manifest: t.manifest });
        progress.note(&format!(
            "{} group {} to release {}{}",
            d.verb,
            d.asg,
            t.release,
            t.from.as_ref().filter(|f| **f != t.release).map_or(String::new(), |f| format!(" (from {f})"))
        ));
    }
    let what = What { verb: d.verb, asg: d.asg.clone(), source: d.source.clone(), command: d.command.clone() };
    let mut fleet = Fleet::new(d.transport, call, Some(&held), d.address, d.batch, d.max_errors, targets.len(), &progress);
    // A node that leaves the group while the deploy waits for it (a
    // scale-in) is failed at once, not waited for until SSM expires it.
    let watch = discover::watch(sdk, &d.asg, &targets);
    fleet.leaving = watch.leaving.clone();
    let alarm_watch = (!d.alarms.is_empty()).then(|| alarms.watch());
    fleet.alarm = alarm_watch.as_ref().map(alarms::Watch::fired);
    progress.note(&format!("{}: {} nodes of {} over {}", d.verb, targets.len(), d.asg, fleet.transport.name()));

    // Listening from here to the end: a signal during the switch back of a
    // failed deploy must cancel it too, not wait for the whole pass.
    let mut signals = Signals::listen();
    let phases = Phases { canary: d.canary, bake: d.bake, rejoin: d.rejoin && !held.lost() };
    let pass = trigger_and_collect(&fleet, sdk, &d.asg, &targets, phases, &progress);
    let Pass { results, joined, rejoin_error } = tokio::select! {
        done = pass => done,
        signal = signals.next() => {
            abandon(signal, &fleet, s3, target.as_mut(), &what, started_ms).await;
            release(held).await;
            return Ok(Ended::Interrupted);
        }
    };
    // One last read: a deploy shorter than a poll is watched too.
    let alarm = match alarm_watch {
        Some(w) => w.read_now().await,
        None => None,
    };
    if let Some(a) = &alarm {
        progress.note(&format!("the deploy failed: {a}"));
    }
    // The switch back is not stopped by the alarm that asked for it.
    fleet.alarm = None;
    let mut rolled_back = None;
    let mut pointer_error = None;
    if let Some(t) = target.as_mut().filter(|_| !held.lost()) {
        let failed = alarm.is_some() || results.iter().any(|r| !r.status.counts_as_done());
        let ended = if !failed {
            t.end(s3, DeployState::Done, false).await
        } else if t.settled_on.as_deref() == Some(t.release.as_str()) {
            // A deploy of the release the group was settled on: the group
            // still runs it (the nodes that failed are named in the
            // report), so the pointer stays `done` on it: a `failed` one
            // would send booting instances to the release before, which is
            // not what the fleet runs. Nor is there anything to switch
            // back to.
            if d.rollback_on_failure {
                progress.note(&format!("the deploy failed; the group was on {} already: nothing is switched back", t.release));
            }
            t.end(s3, DeployState::Done, false).await
        } else if let Some(prev) = t.previous.clone().filter(|_| d.rollback_on_failure) {
            // The fleet ends on one release: every node not known to run it
            // goes back (those that joined during the deploy included).
            let run: Vec<Node> = targets.iter().chain(&joined).cloned().collect();
            let settled = t.settled_on.as_deref() == Some(prev.release.as_str());
            let back: Vec<Node> = not_on(&run, &results, &prev.release, settled);
            progress.note(&format!("the deploy failed: switching {} nodes back to {}", back.len(), prev.release));
            fleet.call = store_call(&d.source, &d.call, t, &prev);
            // The switch back is not held to what failed the deploy: every
            // node asked is asked, whatever --max-errors let through.
            fleet.failures.store(0, std::sync::atomic::Ordering::SeqCst);
            fleet.max_errors = None;
            let back = tokio::select! {
                back = fleet.run(&back) => back,
                signal = signals.next() => {
                    abandon(signal, &fleet, s3, Some(t), &what, started_ms).await;
                    release(held).await;
                    return Ok(Ended::Interrupted);
                }
            };
            let failed: Vec<String> = back.iter().filter(|r| !r.status.counts_as_done()).map(|r| r.instance_id.clone()).collect();
            let switched = back.iter().filter(|r| r.status == NodeStatus::Ok && switched(r)).count();
            rolled_back = Some(FleetRollback { to: prev.release.clone(), nodes: switched, failed });
            if held.lost() {
                // Lost during the switch back: the group may be another
                // deploy's now, and its pointer is not this one's to write.
                Ok(())
            } else {
                t.end(s3, DeployState::Done, true).await
            }
        } else {
            t.end(s3, DeployState::Failed, false).await
        };
        // The nodes are done, but boots and timers follow the pointer: a
        // deploy whose pointer is not where the fleet is has not succeeded.
        pointer_error = ended.err().map(|e| {
            format!(
                "{e:#}; instances that boot or pull on their own follow what it says now: run `fleetsync sync --releases --release {}` again",
                t.release
            )
        });
    }
    progress.finish();
    // Latched: lost during the pass or the switch back.
    let lock_lost = held.lost();
    if lock_lost {
        log("the fleet lock was lost during the deploy (broken, taken over, or its lease ran out unrenewed); nodes not yet started were skipped");
    }

    let mut report =
        FleetReport::new(d.asg.clone(), d.source.to_string(), d.dest.clone(), results, skipped, started.elapsed().as_millis() as u64);
    report.release = target.as_ref().map(|t| t.release.clone());
    report.deploy = target.as_ref().map(|t| t.deploy.clone());
    if lock_lost {
        // Another deploy may have run meanwhile: this one cannot vouch for
        // the fleet, whatever its nodes said.
        report.lock_lost = true;
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    if alarm.is_some() {
        report.alarm = alarm;
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    if let Some(e) = pointer_error {
        log(&format!("error: {e}"));
        report.pointer_error = Some(e);
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    if let Some(e) = rejoin_error {
        // Every node was changed already: a failure, not a configuration
        // error (which would promise that nothing changed).
        report.rejoin_error = Some(format!("{e:#}"));
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    let outcome = match (&rolled_back, report.exit_code) {
        (Some(_), _) => "rolled-back",
        (None, 0) => "ok",
        _ => "failed",
    };
    let to = rolled_back.as_ref().map(|r| r.to.clone());
    report.rolled_back = rolled_back;
    record(s3, &what, target.as_ref(), started_ms, outcome, to, &report.nodes).await;
    release(held).await;
    Ok(Ended::Report(Box::new(report)))
}

/// The release a deploy of a published source moves the group to (and its
/// pointer set to `deploying`); `None` for a plain prefix or in-place sync.
///
/// The release may be an old one no pointer names yet: from reading its
/// manifest to naming it in the group's pointer, the deploy stands as a
/// publish does, so that a prune neither runs meanwhile nor removes it
/// (see the library's `store::fence`).
async fn resolve_target(d: &Deploy, s3: &S3Client) -> anyhow::Result<Option<Target>> {
    if matches!(d.releases, Releases::None) {
        return Ok(None);
    }
    let store = fleetsync::store::Store::of(&d.source);
    let latest = pointer::read::<pointer::Latest>(s3, &store, &store.latest_key(), None).await?;
    if matches!(latest, pointer::Found::Absent) {
        // A plain prefix: each node builds its release from a listing.
        return Ok(None);
    }
    let marker = fence::Marker::put(s3, &store, fence::Side::Publishing).await?;
    let target = async {
        fence::wait_for_prunes(s3, &store, &marker).await?;
        let mut target = match &d.releases {
            Releases::Sync(requested) => target::for_sync(s3, &d.source, &d.asg, requested.as_deref()).await?,
            Releases::Rollback(to) => target::for_rollback(s3, &d.source, &d.asg, to.as_deref()).await?,
            Releases::None => None,
        };
        if let Some(t) = &mut target {
            // Naming a release no pointer names yet: only while the fence
            // still stands (see the library's `store::fence`).
            marker.check(s3, &store).await?;
            t.begin(s3).await?;
        }
        anyhow::Ok(target)
    }
    .await;
    marker.remove(s3, &store).await;
    target
}

/// The agent call that makes `release` live on a node of a published
/// source's group: a pull of that release (also for a rollback: a node
/// that never had it fetches it).
fn store_call(source: &S3Url, call: &AgentCall, t: &Target, release: &pointer::Target) -> AgentCall {
    AgentCall {
        action: Action::Pull,
        source: Some(source.to_string()),
        releases: true,
        release: Some(release.release.clone()),
        manifest: Some(release.manifest),
        group: Some(t.group.clone()),
        rollback_on_failure: call.rollback_on_failure && call.after_switch.is_some(),
        ..call.clone()
    }
}

/// The nodes not known to run `release` now: all but those whose agent's
/// report says so. Not only the nodes this deploy switched: a node that was
/// already on the failed release (a re-run of a failed deploy, a timer
/// that pulled it) reports it live without switching, and a node whose
/// report was lost may have switched. A pull of `release` on a node
/// already on it costs nothing, so asking too many is safe; too few is not.
/// When the group was `settled` on `release` before this deploy, the nodes
/// it never started (a canary failed, --max-errors) still run it and are
/// not asked: a failed canary does not cost a pass over the whole fleet.
fn not_on(nodes: &[Node], results: &[NodeResult], release: &str, settled: bool) -> Vec<Node> {
    let on: std::collections::HashSet<&str> = results
        .iter()
        .filter(|r| live_after(r) == Some(release) || (settled && r.status == NodeStatus::NotAttempted))
        .map(|r| r.instance_id.as_str())
        .collect();
    nodes.iter().filter(|n| !on.contains(n.instance_id.as_str())).cloned().collect()
}

/// The release a node's report says is live after its pull, when the
/// report says it for certain.
fn live_after(r: &NodeResult) -> Option<&str> {
    let rel = r.agent.as_ref()?.release.as_ref()?;
    if rel.rolled_back {
        // The agent switched back to what was live before.
        rel.previous.as_deref()
    } else if rel.switched || r.status == NodeStatus::Ok {
        Some(&rel.id)
    } else {
        // Failed before switching: what is live is not in the report.
        None
    }
}

/// The agent switched `current` in this pull (and did not switch back).
fn switched(r: &NodeResult) -> bool {
    r.agent.as_ref().and_then(|a| a.release.as_ref()).is_some_and(|rel| rel.switched && !rel.rolled_back)
}

/// What a history record says a deploy was.
struct What {
    verb: &'static str,
    asg: String,
    source: S3Url,
    command: String,
}

/// Writes the deploy's record to the store's history (a warning if it
/// cannot: the deploy itself is done).
async fn record(
    s3: &S3Client,
    d: &What,
    t: Option<&Target>,
    started_ms: u64,
    outcome: &str,
    rolled_back_to: Option<String>,
    nodes: &[NodeResult],
) {
    let store = fleetsync::store::Store::of(&d.source);
    let r = DeployRecord {
        id: t.map_or_else(|| fleetsync::store::history::new_id(&d.asg), |t| t.deploy.clone()),
        verb: d.verb.to_string(),
        group: d.asg.clone(),
        release: t.map(|t| t.release.clone()),
        previous: t.and_then(|t| t.from.clone()),
        by: fleetsync::fleet_lock::user_at_host(),
        command: d.command.clone(),
        started_at_ms: started_ms,
        finished_at_ms: now_ms(),
        outcome: outcome.to_string(),
        rolled_back_to,
        nodes: nodes
            .iter()
            .map(|n| NodeOutcome {
                instance_id: n.instance_id.clone(),
                status: serde_json::to_value(n.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                release: n.agent.as_ref().and_then(|a| a.release.as_ref()).map(|r| r.id.clone()),
                error: n.error.clone(),
            })
            .collect(),
    };
    if let Err(e) = fleetsync::store::history::record(s3, &store, &r).await {
        log(&format!("warning: the deploy's history record was not written: {e}"));
    }
}

fn warn(r: anyhow::Result<()>) {
    if let Err(e) = r {
        log(&format!("warning: {e:#}"));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// What one pass over the fleet gave.
struct Pass {
    results: Vec<NodeResult>,
    /// The instances that joined the group during the deploy, synced too.
    joined: Vec<Node>,
    /// Listing the group again failed: why.
    rejoin_error: Option<anyhow::Error>,
}

/// How many times, at most, the group is listed again after the pass. A
/// listing that finds instances runs them and, within this bound, lists
/// again (more may have joined while they ran); one that finds none ends
/// the deploy. Bounded so that a group scaling out for minutes cannot hold
/// the deploy (and its lock) open: what joins later boots with the group's
/// release on its own.
const JOIN_ROUNDS: usize = 3;

/// The first `n` nodes to deploy (the canaries) and the rest: one per
/// Availability Zone in turn (zones in name order, nodes in id order within
/// each), so that a release that fails in one zone only (its own subnet's
/// routes, a zonal endpoint) fails a canary. Nodes whose zone is unknown
/// count as one zone.
fn canaries(targets: &[Node], n: usize) -> (Vec<Node>, Vec<Node>) {
    let mut zones: std::collections::BTreeMap<Option<&str>, std::collections::VecDeque<&Node>> = Default::default();
    for node in targets {
        zones.entry(node.availability_zone.as_deref()).or_default().push_back(node);
    }
    let mut first = Vec::new();
    while first.len() < n.min(targets.len()) {
        for queue in zones.values_mut() {
            if first.len() < n {
                first.extend(queue.pop_front().cloned());
            }
        }
    }
    let chosen: std::collections::HashSet<&str> = first.iter().map(|c: &Node| c.instance_id.as_str()).collect();
    let rest = targets.iter().filter(|t| !chosen.contains(t.instance_id.as_str())).cloned().collect();
    (first, rest)
}

/// How the pass is split up.
struct Phases {
    canary: usize,
    bake: Duration,
    rejoin: bool,
}

/// Canaries first, then the rest; then the instances that joined during
/// the deploy. With a bake, the rest go in whole batches, each followed by
/// the bake.
///
/// The group is listed again only once the pass is over, never with a
/// listing started earlier: every instance InService when the last node
/// ended is then in the deploy. (A listing overlapped with the pass's
/// tail saved one AutoScaling call at the end, about 0.1 s, and missed
/// an instance that joined after it began.)
async fn trigger_and_collect(
    fleet: &Fleet<'_>,
    sdk: &aws_types::SdkConfig,
    asg: &str,
    targets: &[Node],
    phases: Phases,
    progress: &Progress,
) -> Pass {
    let Phases { canary, bake, rejoin } = phases;
    let (first, rest) = canaries(targets, canary);
    let mut results = fleet.run(&first).await;
    let mut joined = Vec::new();
    if !first.is_empty() && results.iter().any(|r| !r.status.counts_as_done()) {
        progress.note("a canary failed; no other node is started");
        results.extend(rest.iter().map(|n| fleet.not_attempted(n, "a canary failed")));
        return Pass { results, joined, rejoin_error: None };
    }
    if !first.is_empty() {
        bake_after(fleet, bake, "the canaries").await;
    }
    if bake.is_zero() {
        results.extend(fleet.run(&rest).await);
    } else {
        let batches: Vec<&[Node]> = rest.chunks(fleet.batch_size(rest.len())).collect();
        for (i, batch) in batches.iter().enumerate() {
            results.extend(fleet.run(batch).await);
            bake_after(fleet, bake, &format!("batch {} of {}", i + 1, batches.len())).await;
        }
    }
    if !rejoin {
        return Pass { results, joined, rejoin_error: None };
    }
    let mut known: std::collections::HashSet<String> = targets.iter().map(|n| n.instance_id.clone()).collect();
    for _ in 0..JOIN_ROUNDS {
        // Not once the lock is lost or --max-errors is spent: the nodes
        // would only be reported as not attempted.
        if fleet.stop_reason().is_some() {
            break;
        }
        let new: Vec<Node> = match discover::joined(sdk, asg, &known).await {
            Ok(now) => now.into_iter().filter(Node::is_target).collect(),
            Err(e) => {
                let e = e.context("listing the group again for instances that joined during the deploy");
                return Pass { results, joined, rejoin_error: Some(e) };
            }
        };
        if new.is_empty() || fleet.stop_reason().is_some() {
            break;
        }
        progress.note(&format!("{} instances joined the group during the deploy; syncing them too", new.len()));
        progress.add(new.len());
        results.extend(fleet.run(&new).await);
        known.extend(new.iter().map(|n| n.instance_id.clone()));
        joined.extend(new);
    }
    Pass { results, joined, rejoin_error: None }
}

/// `--bake`: the wait after a batch, ended early once the deploy stops
/// (an alarm, a lost lock, --max-errors). The alarms are watched all
/// along; what a bake adds is the time for a release's harm to show on
/// them before more nodes take it.
async fn bake_after(fleet: &Fleet<'_>, bake: Duration, batch: &str) {
    if bake.is_zero() || fleet.stop_reason().is_some() {
        return;
    }
    fleet.progress.note(&format!("{batch} done; baking {} s before going on", bake.as_secs()));
    let end = Instant::now() + bake;
    while fleet.stop_reason().is_none() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_millis(250))).await;
    }
}

/// An interrupted deploy stops: no more nodes, what was sent is cancelled,
/// the group's pointer says the deploy failed (some nodes may have
/// switched: boots take the release before it), and the history says so.
/// The caller then releases the fleet lock.
async fn abandon(signal: &str, fleet: &Fleet<'_>, s3: &S3Client, mut target: Option<&mut Target>, what: &What, started_ms: u64) {
    fleet.progress.finish();
    log(&format!("{signal}: starting no more nodes, cancelling what was sent, releasing the fleet lock"));
    fleet.transport.cancel(fleet.progress).await;
    if let Some(t) = target.as_deref_mut() {
        warn(t.end(s3, DeployState::Failed, false).await);
    }
    record(s3, what, target.as_deref(), started_ms, "interrupted", None, &[]).await;
}

/// Releases the fleet lock at the end of a deploy (a warning if it cannot:
/// the lease runs out on its own).
async fn release(held: fleet_lock::HeldLock) {
    if let Err(e) = held.release().await {
        log(&format!("warning: {e}"));
    }
}

/// SIGINT and SIGTERM, listened for from creation on: a signal that
/// arrives while nothing awaits it is kept for the next [`Signals::next`]
/// (tokio's handlers replace the default action for good, so a signal
/// nobody listens for would be lost, and the deploy would not stop).
struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    /// Starts listening (`None` inside when the handlers cannot be set:
    /// the default action, exit, then stays).
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals(signal(SignalKind::interrupt()).ok().zip(signal(SignalKind::terminate()).ok()))
    }

    /// Resolves on the next SIGINT or SIGTERM, naming it.
    async fn next(&mut self) -> &'static str {
        let Some((int, term)) = &mut self.0 else {
            // Without handlers the default action (exit) stays; never resolve.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, zone: Option<&str>) -> Node {
        Node {
            instance_id: id.into(),
            lifecycle: "InService".into(),
            health: "Healthy".into(),
            state: "running".into(),
            availability_zone: zone.map(str::to_string),
            private_ip: None,
            public_ip: None,
            private_dns: None,
            skipped: None,
        }
    }

    fn ids(nodes: &[Node]) -> Vec<&str> {
        nodes.iter().map(|n| n.instance_id.as_str()).collect()
    }

    #[test]
    fn canaries_take_one_node_per_zone_in_turn_and_the_rest_keep_their_order() {
        // Sorted by id, as discovery returns them: zone a holds the first three.
        let targets = [
            node("i-1", Some("eu-west-1a")),
            node("i-2", Some("eu-west-1a")),
            node("i-3", Some("eu-west-1a")),
            node("i-4", Some("eu-west-1b")),
            node("i-5", Some("eu-west-1c")),
            node("i-6", Some("eu-west-1b")),
        ];
        let (first, rest) = canaries(&targets, 3);
        assert_eq!(ids(&first), ["i-1", "i-4", "i-5"]);
        assert_eq!(ids(&rest), ["i-2", "i-3", "i-6"]);
        let (first, rest) = canaries(&targets, 4);
        assert_eq!(ids(&first), ["i-1", "i-4", "i-5", "i-2"]);
        assert_eq!(ids(&rest), ["i-3", "i-6"]);
        // More canaries than nodes, none, one zone, unknown zones.
        assert_eq!(canaries(&targets, 10).0.len(), 6);
        assert!(canaries(&targets, 0).0.is_empty());
        let one_zone = [node("i-1", None), node("i-2", None)];
        assert_eq!(ids(&canaries(&one_zone, 1).0), ["i-1"]);
    }
}
