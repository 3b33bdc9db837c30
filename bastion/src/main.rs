//! `fleetsync`: the operator's and CI's command for a whole Auto Scaling
//! Group. Parsing and printing only; the work is in the library.
//!
//! `sync` is the product's data flow, one module per step: discover ->
//! lock -> trigger -> collect -> report. `list` is the discover step alone;
//! `lock show|break` manage the fleet lock.

mod collect;
mod discover;
mod report;
mod trigger;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetsync::fleet_lock::{self, LockObject};
use fleetsync::source::S3Client;
use fleetsync::{exit, ClientOptions, S3Url};

const EXIT_CODES: &str = "\
Exit codes:
  0  ok (sync: every target node is in sync)
  1  a node failed or was not attempted (see the report), or the operation failed
  2  usage or configuration error (flags, credentials, group, bucket, endpoint)
  3  the fleet lock is held by another deploy (the message names it)";

#[derive(Parser)]
#[command(name = "fleetsync", version, about = "Keeps every instance of an Auto Scaling Group on the same codebase from S3.", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sync every InService instance of the group from the source (over SSH for now).
    Sync(SyncArgs),
    /// List the group's instances: which would be synced, and why the others are skipped.
    List(ListArgs),
    /// Inspect or break the fleet lock that keeps two deploys of a group apart.
    #[command(subcommand)]
    Lock(LockCommand),
}

#[derive(Args)]
struct SyncArgs {
    /// The Auto Scaling Group.
    #[arg(long)]
    asg: String,
    /// The source, s3://BUCKET[/PREFIX].
    #[arg(long)]
    source: String,
    /// The directory on each node.
    #[arg(long)]
    dest: String,
    /// The agent's state dir on each node (default: the agent's own).
    #[arg(long)]
    state_dir: Option<String>,
    /// How to reach the nodes. Only ssh is available yet (SSM is next).
    #[arg(long, value_enum, default_value = "ssh")]
    via: Via,
    /// Nodes synced at once (default: all).
    #[arg(long)]
    batch: Option<usize>,
    /// Stop starting nodes once more than this many have failed (default: never).
    #[arg(long)]
    max_errors: Option<usize>,
    /// Sync this many nodes first, and stop if any of them fails.
    #[arg(long, default_value_t = 0)]
    canary: usize,
    /// Discover, check the lock, and print what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The fleet lock (default: s3://SOURCE_BUCKET/.fleetsync/locks/ASG.json).
    #[arg(long)]
    lock: Option<String>,
    /// Seconds to wait for another deploy's lock before giving up (exit code 3).
    #[arg(long, default_value_t = 0)]
    lock_wait: u64,
    /// Which address to reach nodes at.
    #[arg(long, value_enum, default_value = "private-ip")]
    address: trigger::AddressChoice,
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Via {
    Ssh,
}

#[derive(Args)]
struct ListArgs {
    /// The Auto Scaling Group.
    #[arg(long)]
    asg: String,
    /// Print JSON on stdout.
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
    #[arg(long, required_unless_present = "lock")]
    asg: Option<String>,
    /// The deploy's source; the lock lives in its bucket by default.
    #[arg(long, required_unless_present = "lock")]
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

impl SyncArgs {
    /// What every node's agent is asked to do.
    fn agent_call(&self) -> trigger::AgentCall {
        trigger::AgentCall { source: self.source.clone(), dest: self.dest.clone(), state_dir: self.state_dir.clone() }
    }
}

impl AwsArgs {
    fn client_options(&self) -> ClientOptions {
        ClientOptions { region: self.region.clone(), path_style: self.path_style }
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
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    match cli.command {
        Command::Sync(args) => runtime.block_on(sync(args)),
        Command::List(args) => runtime.block_on(list(args)),
        Command::Lock(LockCommand::Show(args)) => runtime.block_on(lock_show(args)),
        Command::Lock(LockCommand::Break(args)) => runtime.block_on(lock_break(args)),
    }
}

/// `sync --dry-run`: what would be synced, how, and whether the lock is free.
async fn dry_run(
    args: &SyncArgs,
    targets: &[discover::Node],
    skipped: &[discover::Node],
    s3: &S3Client,
    object: &LockObject,
) -> anyhow::Result<i32> {
    let mut out = format!("would run on {} nodes over ssh: {}\n", targets.len(), args.agent_call().command_line());
    for n in targets {
        out.push_str(&format!("  sync {} {}\n", n.instance_id, trigger::address(n, args.address).unwrap_or_else(|| "(no address)".into())));
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

/// How long the fleet lock's lease lasts without renewal.
const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// `sync`: discover -> lock -> trigger -> collect -> report.
async fn sync(args: SyncArgs) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let source = S3Url::parse(&args.source)?;
    let client_opts = args.aws.client_options();
    let sdk = fleetsync::source::sdk_config(&client_opts).await;

    // Discover.
    let (targets, skipped): (Vec<_>, Vec<_>) = discover::discover(&sdk, &args.asg).await?.into_iter().partition(|n| n.is_target());
    if targets.is_empty() {
        return Err(fleetsync::Error::Config(format!("no instance of {:?} is InService, Healthy and running; nothing to sync", args.asg)).into());
    }

    // Lock.
    let object = match &args.lock {
        Some(l) => LockObject::parse(l)?,
        None => LockObject::for_group(&source, &args.asg)?,
    };
    let s3 = fleetsync::source::s3_client(&client_opts).await;
    if args.dry_run {
        return dry_run(&args, &targets, &skipped, &s3, &object).await;
    }
    let command: Vec<String> = std::env::args().collect();
    let info = fleet_lock::LockInfo::for_this_process(&command.join(" "), LEASE);
    let held = match fleet_lock::acquire(&s3, &object, info, LEASE, std::time::Duration::from_secs(args.lock_wait)).await {
        Ok(h) => h,
        Err(fleet_lock::LockError::Held { object, holder }) => {
            eprintln!("fleetsync: another deploy holds the fleet lock {object}: {} (wait with --lock-wait, or break it with `fleetsync lock break`)", holder.describe());
            return Ok(exit::BUSY);
        }
        Err(fleet_lock::LockError::Other(e)) => return Err(e.into()),
    };
    if let Some(prev) = &held.took_over {
        log(&format!("took over an expired fleet lock from {}", prev.describe()));
    }

    // Trigger and collect: canaries first, then the rest, then any instance
    // that joined the group while we were busy.
    let fleet = Fleet {
        ssh: trigger::Ssh {
            user: args.ssh_user.clone(),
            config: args.ssh_config.clone(),
            options: args.ssh_option.clone(),
            accept_new_host_keys: args.ssh_accept_new_host_keys,
            connect_timeout: std::time::Duration::from_secs(10),
        },
        call: args.agent_call(),
        failures: Default::default(),
        held: &held,
        address: args.address,
        max_errors: args.max_errors,
        batch: args.batch.unwrap_or(targets.len()).max(1),
    };
    // Set when the group could not be listed again for instances that
    // joined: reported as the command's error once the lock is released.
    let mut rediscover_error = None;
    let canaries = args.canary.min(targets.len());
    let (first, rest) = targets.split_at(canaries);
    let mut results = fleet.run(first).await;
    if canaries > 0 && results.iter().any(|r| r.status != collect::NodeStatus::Ok) {
        log("a canary failed; no other node is started");
        results.extend(rest.iter().map(|n| fleet.not_attempted(n, "a canary failed")));
    } else {
        results.extend(fleet.run(rest).await);
        if !held.lost() {
            // The lock is held here: a failure must not return early (`?`)
            // and leave it to block every deploy until its lease runs out.
            match discover::discover(&sdk, &args.asg).await {
                Ok(now) => {
                    let known: std::collections::HashSet<&str> = targets.iter().map(|n| n.instance_id.as_str()).collect();
                    let joined: Vec<_> = now.into_iter().filter(|n| n.is_target() && !known.contains(n.instance_id.as_str())).collect();
                    if !joined.is_empty() {
                        log(&format!("{} instances joined the group during the deploy; syncing them too", joined.len()));
                        results.extend(fleet.run(&joined).await);
                    }
                }
                Err(e) => rediscover_error = Some(e.context("listing the group again for instances that joined during the deploy")),
            }
        }
    }
    log(&format!("{} nodes done", results.len()));

    if let Err(e) = held.release().await {
        log(&format!("warning: {e}"));
    }

    // Report.
    let report = report::FleetReport::new(args.asg, args.source, args.dest, results, skipped, started.elapsed().as_millis() as u64);
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

/// Runs the agent on a set of nodes, `batch` at a time, honouring
/// `--max-errors` and the state of the fleet lock.
struct Fleet<'a> {
    ssh: trigger::Ssh,
    call: trigger::AgentCall,
    /// Nodes failed so far, across passes.
    failures: std::sync::atomic::AtomicUsize,
    held: &'a fleet_lock::HeldLock,
    address: trigger::AddressChoice,
    max_errors: Option<usize>,
    batch: usize,
}

impl Fleet<'_> {
    async fn run(&self, nodes: &[discover::Node]) -> Vec<collect::NodeResult> {
        use futures::StreamExt as _;
        futures::stream::iter(nodes).map(|n| self.run_one(n)).buffered(self.batch).collect().await
    }

    async fn run_one(&self, node: &discover::Node) -> collect::NodeResult {
        use std::sync::atomic::Ordering::SeqCst;
        if self.held.lost() {
            return self.not_attempted(node, "the fleet lock was lost; no new nodes are started");
        }
        if self.max_errors.is_some_and(|m| self.failures.load(SeqCst) > m) {
            return self.not_attempted(node, "--max-errors was reached");
        }
        let Some(address) = trigger::address(node, self.address) else {
            self.failures.fetch_add(1, SeqCst);
            let r = self.not_attempted(node, "the node has no address of the kind chosen with --address");
            return collect::NodeResult { status: collect::NodeStatus::Failed, ..r };
        };
        let result = collect::collect(&node.instance_id, &address, self.ssh.run(&address, &self.call).await);
        if result.status != collect::NodeStatus::Ok {
            self.failures.fetch_add(1, SeqCst);
        }
        let outcome = result.error.as_ref().map_or("ok".to_string(), |e| format!("FAILED: {e}"));
        log(&format!("{} {address} {outcome}", node.instance_id));
        result
    }

    fn not_attempted(&self, node: &discover::Node, why: &str) -> collect::NodeResult {
        collect::NodeResult {
            instance_id: node.instance_id.clone(),
            address: trigger::address(node, self.address).unwrap_or_default(),
            status: collect::NodeStatus::NotAttempted,
            error: Some(why.to_string()),
            duration_ms: 0,
            agent: None,
        }
    }
}

/// A timestamped progress line on stderr (CI logs keep them).
fn log(msg: &str) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    eprintln!("[{:02}:{:02}:{:02}] {msg}", (t / 3600) % 24, (t / 60) % 60, t % 60);
}

/// `list`: the discover step on its own, as a table or JSON.
async fn list(args: ListArgs) -> anyhow::Result<i32> {
    let sdk = fleetsync::source::sdk_config(&args.aws.client_options()).await;
    let nodes = discover::discover(&sdk, &args.asg).await?;
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
        _ => unreachable!("clap requires --lock or both --asg and --source"),
    };
    let client = fleetsync::source::s3_client(&args.aws.client_options()).await;
    Ok((client, object))
}

/// Writes a line to stdout; a closed pipe is a normal end.
fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}").and_then(|()| out.flush());
}
