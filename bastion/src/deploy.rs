//! DEPLOY: the flow of every command that changes the fleet (`sync`,
//! `rollback`): discover -> lock -> trigger -> collect -> report.
//!
//! - discover: the group's InService, Healthy, running instances;
//! - lock: the fleet lock, so two deploys of one group never overlap (the
//!   source is checked first: a misspelt bucket must not get a lock object);
//! - trigger and collect: canaries first, then the rest in `--batch`es,
//!   each node's agent report turned into a result; while the last nodes
//!   run, the group is listed again, and instances that joined during the
//!   deploy are synced too;
//! - report: the per-node results, for the caller to print.
//!
//! An interrupt (Ctrl-C, or SIGTERM from a cancelled CI job) stops starting
//! nodes, cancels what SSM was sent, and releases the lock at once rather
//! than leaving it to block the next deploy for a lease.

use std::time::{Duration, Instant};

use fleetsync::fleet_lock::{self, LockObject};
use fleetsync::source::S3Client;
use fleetsync::{exit, S3Url};

use crate::collect::{NodeResult, NodeStatus};
use crate::discover::{self, Node};
use crate::progress::{log, Progress};
use crate::report::FleetReport;
use crate::trigger::{self, AddressChoice, AgentCall, Fleet, Transport};
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
}

/// How a deploy ended, for the caller to print.
pub enum Ended {
    /// The per-node report (its exit code says how it went).
    Report(FleetReport),
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
    let mut out = format!("would run on {} nodes over {}: {}\n", targets.len(), d.transport.name(), d.call.command_line());
    for n in &targets {
        let address = trigger::address(n, d.address).unwrap_or_else(|| "(no address)".into());
        out.push_str(&format!("  sync {} {address}\n", n.instance_id));
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
    d.transport.check(&d.call)?;
    let (targets, skipped) = targets(sdk, &d.asg, d.verb).await?;

    fleetsync::source::check_source(s3, &d.source).await?;
    let info = fleet_lock::LockInfo::for_this_process(&d.command, d.lease);
    let held = match fleet_lock::acquire(s3, &d.lock, info, d.lease, d.lock_wait).await {
        Ok(h) => h,
        Err(fleet_lock::LockError::Held { holder, .. }) => return Ok(Ended::Busy(holder.describe())),
        Err(fleet_lock::LockError::Other(e)) => return Err(e.into()),
    };
    let progress = Progress::new(targets.len());
    if let Some(prev) = &held.took_over {
        progress.note(&format!("took over an expired fleet lock from {}", prev.describe()));
    }
    let fleet = Fleet::new(d.transport, d.call, Some(&held), d.address, d.batch, d.max_errors, targets.len(), &progress);
    progress.note(&format!("{}: {} nodes of {} over {}", d.verb, targets.len(), d.asg, fleet.transport.name()));

    let pass = trigger_and_collect(&fleet, sdk, &d.asg, &targets, d.canary, d.rejoin && !held.lost(), &progress);
    let (results, rejoin_error) = tokio::select! {
        done = pass => done,
        signal = interrupted() => {
            progress.finish();
            log(&format!("{signal}: starting no more nodes, cancelling what was sent, releasing the fleet lock"));
            fleet.transport.cancel(&progress).await;
            if let Err(e) = held.release().await {
                log(&format!("warning: {e}"));
            }
            return Ok(Ended::Interrupted);
        }
    };
    progress.finish();
    let lock_lost = held.lost();
    if lock_lost {
        log("the fleet lock was lost during the deploy (broken, taken over, or its lease ran out unrenewed); nodes not yet started were skipped");
    }
    if let Err(e) = held.release().await {
        log(&format!("warning: {e}"));
    }

    let mut report = FleetReport::new(d.asg, d.source.to_string(), d.dest, results, skipped, started.elapsed().as_millis() as u64);
    if lock_lost {
        // Another deploy may have run meanwhile: this one cannot vouch for
        // the fleet, whatever its nodes said.
        report.lock_lost = true;
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    if let Some(e) = rejoin_error {
        // Every node was changed already: a failure, not a configuration
        // error (which would promise that nothing changed).
        report.rejoin_error = Some(format!("{e:#}"));
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    Ok(Ended::Report(report))
}

/// Canaries first, then the rest; then the instances that joined during
/// the deploy (listed again while the last nodes run). Returns the results
/// and, when listing the group again failed, why.
async fn trigger_and_collect(
    fleet: &Fleet<'_>,
    sdk: &aws_types::SdkConfig,
    asg: &str,
    targets: &[Node],
    canary: usize,
    rejoin: bool,
    progress: &Progress,
) -> (Vec<NodeResult>, Option<anyhow::Error>) {
    let canaries = canary.min(targets.len());
    let (first, rest) = targets.split_at(canaries);
    let mut results = fleet.run(first).await;
    if canaries > 0 && results.iter().any(|r| r.status != NodeStatus::Ok) {
        progress.note("a canary failed; no other node is started");
        results.extend(rest.iter().map(|n| fleet.not_attempted(n, "a canary failed")));
        return (results, None);
    }
    if !rejoin {
        results.extend(fleet.run(rest).await);
        return (results, None);
    }
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let pass = async {
        let results = fleet.run(rest).await;
        done.send_replace(true);
        results
    };
    let known: std::collections::HashSet<String> = targets.iter().map(|n| n.instance_id.clone()).collect();
    let (rest_results, now) = tokio::join!(pass, relist(fleet, sdk, asg, &known, &mut finished));
    results.extend(rest_results);
    let now = match now {
        Ok(now) => now,
        Err(e) => return (results, Some(e.context("listing the group again for instances that joined during the deploy"))),
    };
    if fleet.lock_lost() {
        return (results, None);
    }
    let joined: Vec<Node> = now.into_iter().filter(Node::is_target).collect();
    if !joined.is_empty() {
        progress.note(&format!("{} instances joined the group during the deploy; syncing them too", joined.len()));
        progress.add(joined.len());
        results.extend(fleet.run(&joined).await);
    }
    (results, None)
}

/// Lists the group again (the instances not in `known`) while the pass's
/// last nodes run, so that the
/// listing adds nothing to the deploy's end: from the moment every node
/// has been started, again and again (after 1 s, then 2, 4, ... at most
/// 30 s apart, so a straggler does not cost an AutoScaling call a second)
/// until the pass is over. The last listing finished is the answer; only
/// when none has finished yet is the one under way waited for. An instance
/// that joins after it is missed here and converges on its own (its boot
/// pull, the agent's timer).
async fn relist(
    fleet: &Fleet<'_>,
    sdk: &aws_types::SdkConfig,
    asg: &str,
    known: &std::collections::HashSet<String>,
    finished: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<Node>> {
    fleet.all_started().await;
    let mut pause = Duration::from_secs(1);
    let mut done: Option<anyhow::Result<Vec<Node>>> = None;
    loop {
        let listing = discover::joined(sdk, asg, known);
        tokio::pin!(listing);
        let listing = match done.take() {
            // A listing finished already: a new one is only worth its wait
            // while the pass goes on.
            Some(previous) => tokio::select! {
                l = &mut listing => l,
                _ = finished.wait_for(|f| *f) => return previous,
            },
            None => listing.await,
        };
        if *finished.borrow() {
            return listing;
        }
        done = Some(listing);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = finished.wait_for(|f| *f) => return done.expect("just set"),
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Resolves on the first SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        // Without handlers the default action (exit) stays; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "interrupted",
        _ = term.recv() => "terminated",
    }
}
