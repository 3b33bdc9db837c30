//! `fleetsync`: the operator's and CI's command for a whole Auto Scaling
//! Group. Parsing and printing only; the work is in the library.
//!
//! `sync` is the product's data flow, one module per step: discover ->
//! lock -> trigger -> collect -> report (`progress` draws it live). `list`
//! is the discover step alone; `lock show|break` manage the fleet lock.
//! Flags may come from `fleetsync.toml` (`config`).

mod api;
mod collect;
mod config;
mod discover;
mod progress;
mod report;
mod trigger;
mod values;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetsync::fleet_lock::{self, LockObject};
use fleetsync::source::S3Client;
use fleetsync::{exit, ClientOptions, S3Url};

use crate::config::FileConfig;
use crate::progress::{log, Progress};
use crate::trigger::{AddressChoice, Via};
use crate::values::{Limit, Seconds};

const EXIT_CODES: &str = "\
Exit codes:
  0  ok (sync, rollback: every target node is done; status: no node drifts)
  1  a node failed or was not attempted (see the report), the fleet lock was lost
     during the run, status found drifting nodes, or the operation failed
  2  usage or configuration error (flags, credentials, group, bucket, endpoint)
  3  the fleet lock is held by another deploy (the message names it)
  130  interrupted (SIGINT/SIGTERM): no new node is started, the fleet lock is released";

#[derive(Parser)]
#[command(name = "fleetsync", version, about = "Keeps every instance of an Auto Scaling Group on the same codebase from S3.", after_help = EXIT_CODES)]
struct Cli {
    /// A config file with the flags' values (keys are the long flag names);
    /// default ./fleetsync.toml when it exists. Flags override it.
    #[arg(long, global = true, env = "FLEETSYNC_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sync every InService instance of the group from the source, through SSM or SSH.
    Sync(SyncArgs),
    /// Make an earlier release live again on every node, under the fleet lock.
    Rollback(RollbackArgs),
    /// Ask every node which release is live; flag nodes that drift from the fleet or the release pointer.
    Status(StatusArgs),
    /// List the group's instances: which would be synced, and why the others are skipped.
    List(ListArgs),
    /// Upload a build directory to the source (only what changed), then write the release pointer.
    Publish(PublishArgs),
    /// Inspect or break the fleet lock that keeps two deploys of a group apart.
    #[command(subcommand)]
    Lock(LockCommand),
}

/// The flags every fleet command shares (sync, rollback, status). Those
/// that `fleetsync.toml` may supply are optional here; `apply` fills them
/// from the file and then the defaults.
#[derive(Args)]
struct FleetArgs {
    /// The Auto Scaling Group.
    #[arg(long)]
    asg: Option<String>,
    /// The source, s3://BUCKET[/PREFIX].
    #[arg(long)]
    source: Option<String>,
    /// The directory on each node (default: `dest` in each node's agent.toml).
    #[arg(long)]
    dest: Option<String>,
    /// The agent's state dir on each node (default: the agent's own).
    #[arg(long)]
    state_dir: Option<String>,
    /// How to reach the nodes [default: ssm].
    #[arg(long, value_enum)]
    via: Option<Via>,
    /// Nodes synced at once: a count or a share of the fleet like 25% [default: all].
    #[arg(long, value_name = "N|N%")]
    batch: Option<Limit>,
    /// Stop starting nodes once more than this many have failed: a count or
    /// a share like 10% [default: never stop].
    #[arg(long, value_name = "N|N%")]
    max_errors: Option<Limit>,
    /// Sync this many nodes first, and stop if any of them fails [default: 0].
    #[arg(long)]
    canary: Option<usize>,
    /// How long one node's agent may run before it is stopped and the node
    /// reported failed: 90, 90s, 5m, 1h [default: 30m].
    #[arg(long, value_name = "DURATION")]
    timeout: Option<Seconds>,
    /// The fleet lock (default: s3://SOURCE_BUCKET/.fleetsync/locks/ASG.json).
    #[arg(long)]
    lock: Option<String>,
    /// How long to wait for another deploy's lock before giving up with exit
    /// code 3 [default: 0, do not wait].
    #[arg(long, value_name = "DURATION")]
    lock_wait: Option<Seconds>,
    /// How long the fleet lock lasts unless renewed (it is renewed every
    /// third of it); a crashed deploy's lock is taken over after this [default: 60s].
    #[arg(long, value_name = "DURATION")]
    lock_lease: Option<Seconds>,
    /// Which address to reach nodes at over SSH [default: private-ip].
    #[arg(long, value_enum)]
    address: Option<AddressChoice>,
    /// The user to log in as (default: ssh's own choice, e.g. from ssh_config).
    #[arg(long)]
    ssh_user: Option<String>,
    /// An ssh_config file (ssh -F).
    #[arg(long)]
    ssh_config: Option<String>,
    /// An ssh option KEY=VALUE, passed as `ssh -o`; repeatable.
    #[arg(long)]
    ssh_option: Vec<String>,
    /// Accept and remember the host keys of new nodes instead of refusing them.
    #[arg(long)]
    ssh_accept_new_host_keys: bool,
    /// Print one JSON report on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Args)]
struct SyncArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Discover, check the lock, and print what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Release mode on the nodes (recommended): each node builds the release
    /// beside the live one and switches DEST/current atomically.
    #[arg(long)]
    releases: bool,
    /// Release mode: the release's name (default: the release pointer's, else a content hash).
    #[arg(long)]
    release_id: Option<String>,
    /// Release mode: releases kept on each node besides the live one and the one before it.
    #[arg(long)]
    keep: Option<usize>,
    /// Release mode: a command each node runs after its switch (e.g. a php-fpm reload).
    #[arg(long, value_name = "CMD")]
    after_switch: Option<String>,
    /// Release mode: a node whose after-switch command fails switches back.
    #[arg(long)]
    rollback_on_failure: bool,
    /// Let an empty source wipe the nodes' trees (refused by default: it is
    /// usually a wrong prefix or a build not yet published).
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Args)]
struct RollbackArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// The release to make live on every node (default: each node's previous one).
    #[arg(long)]
    to: Option<String>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct ListArgs {
    /// The Auto Scaling Group.
    #[arg(long)]
    asg: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Args)]
struct PublishArgs {
    /// The build directory.
    dir: PathBuf,
    /// Where to publish it, s3://BUCKET[/PREFIX] (the deploy's --source).
    target: String,
    /// The release's name (a CI build number or git sha); default: a hash of the content.
    #[arg(long)]
    release_id: Option<String>,
    /// Upload what symlinks in the build point to, instead of refusing them.
    #[arg(long)]
    follow_symlinks: bool,
    /// Print what would be uploaded and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON report on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Subcommand)]
enum LockCommand {
    /// Print who holds the lock, since when, and until when.
    Show(LockArgs),
    /// Delete the lock whoever holds it, and print what was broken. The
    /// holder notices at its next renewal and stops starting nodes.
    Break(LockArgs),
}

#[derive(Args)]
struct LockArgs {
    /// The Auto Scaling Group.
    #[arg(long)]
    asg: Option<String>,
    /// The deploy's source; the lock lives in its bucket by default.
    #[arg(long)]
    source: Option<String>,
    /// The lock object, when not the default s3://SOURCE_BUCKET/.fleetsync/locks/ASG.json.
    #[arg(long)]
    lock: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

/// How to reach the AWS APIs, beyond the standard chain (credentials and
/// `AWS_ENDPOINT_URL*` come from the environment, as for the AWS CLI).
#[derive(Args)]
struct AwsArgs {
    /// AWS region (default: the standard AWS chain, then us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Path-style S3 addressing, for S3-compatible servers.
    #[arg(long, env = "FLEETSYNC_S3_PATH_STYLE")]
    path_style: bool,
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

/// A required value missing from both the flags and the config file.
fn missing(flag: &str) -> anyhow::Error {
    fleetsync::Error::Config(format!("missing --{flag}: give it as a flag or as `{flag} = ...` in fleetsync.toml")).into()
}

impl FleetArgs {
    /// Fills what the flags left out from the config file, then checks that
    /// the required values are there (`--source` names the fleet lock, so
    /// every command that takes the lock needs it).
    fn apply(&mut self, file: &FileConfig, need_source: bool) -> anyhow::Result<()> {
        self.aws.apply(file);
        self.asg = self.asg.take().or(file.asg.clone());
        self.source = self.source.take().or(file.source.clone());
        self.dest = self.dest.take().or(file.dest.clone());
        self.state_dir = self.state_dir.take().or(file.state_dir.clone());
        self.via = self.via.or(file.via);
        self.batch = self.batch.or(file.batch);
        self.max_errors = self.max_errors.or(file.max_errors);
        self.canary = self.canary.or(file.canary);
        self.timeout = self.timeout.or(file.timeout);
        self.lock = self.lock.take().or(file.lock.clone());
        self.lock_wait = self.lock_wait.or(file.lock_wait);
        self.lock_lease = self.lock_lease.or(file.lock_lease);
        self.address = self.address.or(file.address);
        self.ssh_user = self.ssh_user.take().or(file.ssh_user.clone());
        self.ssh_config = self.ssh_config.take().or(file.ssh_config.clone());
        if self.ssh_option.is_empty() {
            self.ssh_option = file.ssh_options.clone().unwrap_or_default();
        }
        self.ssh_accept_new_host_keys |= file.ssh_accept_new_host_keys.unwrap_or(false);
        if self.asg.is_none() {
            return Err(missing("asg"));
        }
        if need_source && self.source.is_none() {
            return Err(missing("source"));
        }
        if self.lock_lease.is_some_and(|l| l.0 < Duration::from_secs(3)) {
            return Err(fleetsync::Error::Config("--lock-lease must be at least 3s (it is renewed every third of it)".into()).into());
        }
        Ok(())
    }

    fn asg(&self) -> &str {
        self.asg.as_deref().expect("checked by apply")
    }

    fn source(&self) -> &str {
        self.source.as_deref().expect("checked by apply")
    }

    fn via(&self) -> Via {
        self.via.unwrap_or(Via::Ssm)
    }

    fn timeout(&self) -> Duration {
        self.timeout.map_or(Duration::from_secs(30 * 60), |t| t.0)
    }

    fn lease(&self) -> Duration {
        self.lock_lease.map_or(Duration::from_secs(60), |t| t.0)
    }

    /// `--dest` and `--state-dir` for the agent, when given.
    fn node_paths(&self) -> Vec<String> {
        let mut words = Vec::new();
        if let Some(d) = &self.dest {
            words.extend(["--dest".to_string(), d.clone()]);
        }
        if let Some(s) = &self.state_dir {
            words.extend(["--state-dir".to_string(), s.clone()]);
        }
        words
    }

    /// How to reach the nodes.
    fn transport(&self, sdk: &aws_types::SdkConfig, verb: &str) -> trigger::Transport {
        match self.via() {
            Via::Ssm => trigger::Transport::Ssm(trigger::Ssm {
                client: aws_sdk_ssm::Client::new(sdk),
                timeout: self.timeout(),
                comment: format!("fleetsync {verb} --asg {}", self.asg()),
                sent: Default::default(),
            }),
            Via::Ssh => trigger::Transport::Ssh(trigger::Ssh {
                user: self.ssh_user.clone(),
                config: self.ssh_config.clone(),
                options: self.ssh_option.clone(),
                accept_new_host_keys: self.ssh_accept_new_host_keys,
                connect_timeout: Duration::from_secs(10),
                timeout: self.timeout(),
            }),
        }
    }
}

impl SyncArgs {
    fn apply(&mut self, file: &FileConfig) -> anyhow::Result<()> {
        self.fleet.apply(file, true)?;
        self.releases |= file.releases.unwrap_or(false);
        self.keep = self.keep.or(file.keep);
        self.after_switch = self.after_switch.take().or(file.after_switch.clone());
        self.rollback_on_failure |= file.rollback_on_failure.unwrap_or(false);
        let release_only = [self.release_id.is_some(), self.keep.is_some(), self.after_switch.is_some(), self.rollback_on_failure];
        if !self.releases && release_only.iter().any(|set| *set) {
            return Err(fleetsync::Error::Config(
                "--release-id, --keep, --after-switch and --rollback-on-failure apply to release mode: add --releases".into(),
            )
            .into());
        }
        Ok(())
    }

    /// What every node's agent is asked to do.
    fn agent_call(&self) -> trigger::AgentCall {
        let mut words = vec!["pull".to_string(), self.fleet.source().to_string()];
        words.extend(self.fleet.node_paths());
        if self.releases {
            words.push("--releases".into());
        }
        if let Some(id) = &self.release_id {
            words.extend(["--release-id".into(), id.clone()]);
        }
        if let Some(k) = self.keep {
            words.extend(["--keep".into(), k.to_string()]);
        }
        if let Some(cmd) = &self.after_switch {
            words.extend(["--after-switch".into(), cmd.clone()]);
        }
        if self.rollback_on_failure {
            words.push("--rollback-on-failure".into());
        }
        if self.allow_empty {
            words.push("--allow-empty".into());
        }
        trigger::AgentCall::new(trigger::Expect::Pull, words)
    }
}

impl AwsArgs {
    fn apply(&mut self, file: &FileConfig) {
        self.region = self.region.take().or(file.region.clone());
        self.path_style |= file.path_style.unwrap_or(false);
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions { region: self.region.clone(), path_style: self.path_style, read_timeout: None }
    }
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("fleetsync: {e:#}");
            let code = e.downcast_ref::<fleetsync::Error>().map_or(exit::PARTIAL, fleetsync::Error::exit_code);
            ExitCode::from(code as u8)
        }
    }
}

fn try_main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    let file: FileConfig = config::FILE.load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    match cli.command {
        Command::Sync(mut args) => {
            args.apply(&file)?;
            runtime.block_on(sync(args))
        }
        Command::Rollback(mut args) => {
            args.fleet.apply(&file, true)?;
            runtime.block_on(rollback(args))
        }
        Command::Status(mut args) => {
            args.fleet.apply(&file, false)?;
            runtime.block_on(status(args))
        }
        Command::List(mut args) => {
            args.aws.apply(&file);
            args.asg = args.asg.or(file.asg);
            runtime.block_on(list(args))
        }
        Command::Publish(mut args) => {
            args.aws.apply(&file);
            runtime.block_on(publish(args))
        }
        Command::Lock(LockCommand::Show(mut args)) => {
            args.apply(file);
            runtime.block_on(lock_show(args))
        }
        Command::Lock(LockCommand::Break(mut args)) => {
            args.apply(file);
            runtime.block_on(lock_break(args))
        }
    }
}

/// `sync --dry-run`: what would be synced, how, and whether the lock is free.
async fn dry_run(
    args: &FleetArgs,
    call: &trigger::AgentCall,
    targets: &[discover::Node],
    skipped: &[discover::Node],
    s3: &S3Client,
    object: &LockObject,
) -> anyhow::Result<i32> {
    let via = match args.via() {
        Via::Ssm => "ssm",
        Via::Ssh => "ssh",
    };
    let mut out = format!("would run on {} nodes over {via}: {}\n", targets.len(), call.command_line());
    for n in targets {
        let address = trigger::address(n, args.address.unwrap_or(AddressChoice::PrivateIp)).unwrap_or_else(|| "(no address)".into());
        out.push_str(&format!("  sync {} {address}\n", n.instance_id));
    }
    for n in skipped {
        out.push_str(&format!("  skip {}: {}\n", n.instance_id, n.skipped.as_deref().unwrap_or("")));
    }
    let lock = fleet_lock::read(s3, object).await?;
    match &lock {
        None => out.push_str(&format!("the fleet lock {object} is free")),
        Some((info, _)) => out.push_str(&format!("the fleet lock {object} is held by {}", info.describe())),
    }
    print_stdout(&out);
    Ok(if lock.is_some_and(|(info, _)| !info.expired()) { exit::BUSY } else { exit::OK })
}

/// `sync`: discover -> lock -> trigger -> collect -> report.
async fn sync(args: SyncArgs) -> anyhow::Result<i32> {
    let call = args.agent_call();
    deploy(&args.fleet, call, Deploy { verb: "sync", dry_run: args.dry_run, rejoin: true }).await
}

/// `rollback`: the same flow as `sync`, each node's agent asked to make an
/// earlier release live again.
async fn rollback(args: RollbackArgs) -> anyhow::Result<i32> {
    let mut words = vec!["rollback".to_string()];
    words.extend(args.fleet.node_paths());
    if let Some(to) = &args.to {
        words.extend(["--to".to_string(), to.clone()]);
    }
    let call = trigger::AgentCall::new(trigger::Expect::Pull, words);
    // An instance that joins mid-rollback booted on the published release:
    // it has nothing to roll back, so there is no second pass.
    deploy(&args.fleet, call, Deploy { verb: "rollback", dry_run: false, rejoin: false }).await
}

/// What differs between the commands that change the fleet.
struct Deploy {
    /// For messages and the SSM comment.
    verb: &'static str,
    dry_run: bool,
    /// List the group again at the end and run the new instances too.
    rejoin: bool,
}

/// discover -> lock -> trigger -> collect -> report, for `call` on every node.
async fn deploy(args: &FleetArgs, call: trigger::AgentCall, how: Deploy) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let source = S3Url::parse(args.source())?;
    let client_opts = args.aws.client_options();
    let sdk = fleetsync::source::sdk_config(&client_opts).await;

    // Discover.
    let (targets, skipped): (Vec<_>, Vec<_>) = discover::discover(&sdk, args.asg()).await?.into_iter().partition(|n| n.is_target());
    if targets.is_empty() {
        return Err(fleetsync::Error::Config(format!(
            "no instance of {:?} is InService, Healthy and running; nothing to {}",
            args.asg(),
            how.verb
        ))
        .into());
    }

    // Lock.
    let object = match &args.lock {
        Some(l) => LockObject::parse(l)?,
        None => LockObject::for_group(&source, args.asg())?,
    };
    let s3 = fleetsync::source::s3_client(&client_opts).await;
    fleetsync::source::check_source(&s3, &source).await?;
    if how.dry_run {
        return dry_run(args, &call, &targets, &skipped, &s3, &object).await;
    }
    let command: Vec<String> = std::env::args().collect();
    let info = fleet_lock::LockInfo::for_this_process(&command.join(" "), args.lease());
    let wait = args.lock_wait.map_or(Duration::ZERO, |w| w.0);
    let held = match fleet_lock::acquire(&s3, &object, info, args.lease(), wait).await {
        Ok(h) => h,
        Err(fleet_lock::LockError::Held { object, holder }) => {
            eprintln!("fleetsync: another deploy holds the fleet lock {object}: {} (wait with --lock-wait, or break it with `fleetsync lock break`)", holder.describe());
            return Ok(exit::BUSY);
        }
        Err(fleet_lock::LockError::Other(e)) => return Err(e.into()),
    };
    let progress = Progress::new(targets.len());
    if let Some(prev) = &held.took_over {
        progress.note(&format!("took over an expired fleet lock from {}", prev.describe()));
    }

    // Trigger and collect: canaries first, then the rest, then any instance
    // that joined the group while we were busy.
    let fleet = trigger::Fleet {
        transport: args.transport(&sdk, how.verb),
        call,
        held: Some(&held),
        address: args.address.unwrap_or(AddressChoice::PrivateIp),
        batch: args.batch,
        max_errors: args.max_errors,
        fleet_size: targets.len(),
        progress: &progress,
        failures: Default::default(),
    };
    progress.note(&format!("{}: {} nodes of {} over {}", how.verb, targets.len(), args.asg(), fleet.transport.name()));
    // The deploy proper runs until it is done or the operator interrupts it
    // (Ctrl-C, or SIGTERM from a cancelled CI job); either way the lock is
    // released below, not left to block the next deploy for a lease.
    let deploy = async {
        // Set when the group could not be listed again for instances that
        // joined: reported as the command's error once the lock is released.
        let mut rediscover_error = None;
        let canaries = args.canary.unwrap_or(0).min(targets.len());
        let (first, rest) = targets.split_at(canaries);
        let mut results = fleet.run(first).await;
        if canaries > 0 && results.iter().any(|r| r.status != collect::NodeStatus::Ok) {
            progress.note("a canary failed; no other node is started");
            results.extend(rest.iter().map(|n| fleet.not_attempted(n, "a canary failed")));
        } else {
            results.extend(fleet.run(rest).await);
            if how.rejoin && !held.lost() {
                // The lock is held here: a failure must not return early (`?`)
                // and leave it to block every deploy until its lease runs out.
                match discover::discover(&sdk, args.asg()).await {
                    Ok(now) => {
                        let known: std::collections::HashSet<&str> = targets.iter().map(|n| n.instance_id.as_str()).collect();
                        let joined: Vec<_> = now.into_iter().filter(|n| n.is_target() && !known.contains(n.instance_id.as_str())).collect();
                        if !joined.is_empty() {
                            progress.note(&format!("{} instances joined the group during the deploy; syncing them too", joined.len()));
                            progress.add(joined.len());
                            results.extend(fleet.run(&joined).await);
                        }
                    }
                    Err(e) => rediscover_error = Some(e.context("listing the group again for instances that joined during the deploy")),
                }
            }
        }
        (results, rediscover_error)
    };
    let (results, rediscover_error) = tokio::select! {
        done = deploy => done,
        signal = interrupted() => {
            progress.finish();
            log(&format!("{signal}: starting no more nodes, cancelling what was sent, releasing the fleet lock"));
            fleet.transport.cancel(&progress).await;
            if let Err(e) = held.release().await {
                log(&format!("warning: {e}"));
            }
            return Ok(exit::INTERRUPTED);
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

    // Report.
    let (asg, source, dest) = (args.asg().to_string(), args.source().to_string(), args.dest.clone().unwrap_or_default());
    let mut report = report::FleetReport::new(asg, source, dest, results, skipped, started.elapsed().as_millis() as u64);
    if lock_lost {
        // Another deploy may have run meanwhile: this one cannot vouch for
        // the fleet, whatever its nodes said.
        report.lock_lost = true;
        report.exit_code = report.exit_code.max(exit::PARTIAL);
    }
    if args.json {
        print_stdout(&serde_json::to_string(&report)?);
    } else {
        print_stdout(&report.table());
    }
    match rediscover_error {
        Some(e) => Err(e),
        None => Ok(report.exit_code),
    }
}

/// `status`: discover -> ask every node's agent for its release status ->
/// a table with drift flagged. Takes no lock: it changes nothing.
async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let f = &args.fleet;
    let client_opts = f.aws.client_options();
    let sdk = fleetsync::source::sdk_config(&client_opts).await;
    let (targets, skipped): (Vec<_>, Vec<_>) = discover::discover(&sdk, f.asg()).await?.into_iter().partition(|n| n.is_target());
    // The release last published, when the source has a pointer.
    let published = match &f.source {
        Some(source) => {
            let s3 = fleetsync::source::s3_client(&client_opts).await;
            fleetsync::publish::read_pointer(&s3, &S3Url::parse(source)?).await?.map(|p| p.release_id)
        }
        None => None,
    };
    let mut words = vec!["status".to_string()];
    words.extend(f.node_paths());
    let progress = Progress::new(targets.len());
    let fleet = trigger::Fleet {
        transport: f.transport(&sdk, "status"),
        call: trigger::AgentCall::new(trigger::Expect::Status, words),
        held: None,
        address: f.address.unwrap_or(AddressChoice::PrivateIp),
        batch: f.batch,
        max_errors: None,
        fleet_size: targets.len(),
        progress: &progress,
        failures: Default::default(),
    };
    let results = fleet.run(&targets).await;
    progress.finish();
    let report = report::StatusReport::new(f.asg().to_string(), published, results, skipped);
    if f.json {
        print_stdout(&serde_json::to_string(&report)?);
    } else {
        print_stdout(&report.table());
    }
    Ok(report.exit_code)
}

/// `list`: the discover step on its own, as a table or JSON.
async fn list(args: ListArgs) -> anyhow::Result<i32> {
    let asg = args.asg.as_deref().ok_or_else(|| missing("asg"))?;
    let sdk = fleetsync::source::sdk_config(&args.aws.client_options()).await;
    let nodes = discover::discover(&sdk, asg).await?;
    if args.json {
        print_stdout(&serde_json::to_string(&nodes)?);
        return Ok(exit::OK);
    }
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|n| {
            [
                n.instance_id.clone(),
                n.private_ip.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{}/{}", n.lifecycle, n.health, n.state),
                if n.is_target() { "sync".into() } else { "skip".into() },
                n.skipped.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = report::table(&["INSTANCE", "ADDRESS", "STATE", "ACTION", "REASON"], &rows);
    let targets = nodes.iter().filter(|n| n.is_target()).count();
    out.push_str(&format!("\n{targets} of {} instances would be synced", nodes.len()));
    print_stdout(&out);
    Ok(exit::OK)
}

impl LockArgs {
    fn apply(&mut self, file: FileConfig) {
        self.aws.apply(&file);
        self.asg = self.asg.take().or(file.asg);
        self.source = self.source.take().or(file.source);
        self.lock = self.lock.take().or(file.lock);
    }
}

/// `publish`: walk -> diff -> upload -> delete -> pointer (see the library's
/// `publish` module).
async fn publish(args: PublishArgs) -> anyhow::Result<i32> {
    let opts = fleetsync::publish::PublishOptions {
        dir: args.dir.clone(),
        dest: S3Url::parse(&args.target)?,
        release_id: args.release_id.clone(),
        follow_symlinks: args.follow_symlinks,
        dry_run: args.dry_run,
        client: args.aws.client_options(),
    };
    let report = fleetsync::publish::publish(&opts).await?;
    for e in &report.errors {
        eprintln!("fleetsync: upload failed: {e}");
    }
    if args.json {
        print_stdout(&serde_json::to_string(&report)?);
    } else {
        let verb = if report.dry_run { "would publish" } else { "published" };
        print_stdout(&format!(
            "{verb} {} as release {} to {}: {} files uploaded ({}), {} unchanged, {} deleted{}",
            report.source,
            report.release_id,
            report.dest,
            report.uploaded,
            fleetsync::report::human_bytes(report.bytes_uploaded),
            report.unchanged,
            report.deleted,
            if report.errors.is_empty() {
                String::new()
            } else {
                format!("; {} FAILED, nothing deleted, pointer not written", report.errors.len())
            }
        ));
    }
    Ok(report.exit_code)
}

/// `lock show`: the holder of the group's fleet lock, if any.
async fn lock_show(args: LockArgs) -> anyhow::Result<i32> {
    let (client, object) = lock_target(&args).await?;
    let held = fleet_lock::read(&client, &object).await?;
    if args.json {
        let info = held.as_ref().map(|(info, _)| info);
        print_stdout(&serde_json::json!({ "lock": object.to_string(), "held": info.is_some(), "holder": info }).to_string());
    } else {
        match held {
            None => print_stdout(&format!("{object}: not held")),
            Some((info, _)) => {
                let state = if info.expired() { "lease expired; the next deploy takes it over" } else { "held" };
                print_stdout(&format!("{object}: {state} by {}", info.describe()));
            }
        }
    }
    Ok(exit::OK)
}

/// `lock break`: deletes the group's fleet lock and says whose it was.
async fn lock_break(args: LockArgs) -> anyhow::Result<i32> {
    let (client, object) = lock_target(&args).await?;
    let broken = fleet_lock::break_lock(&client, &object).await?;
    if args.json {
        print_stdout(&serde_json::json!({ "lock": object.to_string(), "broken": broken }).to_string());
    } else {
        match broken {
            None => print_stdout(&format!("{object}: not held; nothing to break")),
            Some(info) => print_stdout(&format!("{object}: broke the lock of {}", info.describe())),
        }
    }
    Ok(exit::OK)
}

async fn lock_target(args: &LockArgs) -> anyhow::Result<(S3Client, LockObject)> {
    let object = match (&args.lock, &args.asg, &args.source) {
        (Some(lock), _, _) => LockObject::parse(lock)?,
        (None, Some(asg), Some(source)) => LockObject::for_group(&S3Url::parse(source)?, asg)?,
        (None, None, _) => return Err(missing("asg")),
        (None, Some(_), None) => return Err(missing("source")),
    };
    let client = fleetsync::source::s3_client(&args.aws.client_options()).await;
    Ok((client, object))
}

/// Writes a line to stdout; a closed pipe is a normal end.
fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}").and_then(|()| out.flush());
}
