//! `fleetsync`: the operator's and CI's command for a whole Auto Scaling
//! Group. Parsing and printing only: the flows are in `deploy` (sync,
//! rollback) and `status`, their steps in one module each (discover ->
//! lock -> trigger -> collect -> report; `progress` draws it live), and the
//! rest in the library. `list` is the discover step alone; `lock
//! show|break` manage the fleet lock. Flags may come from `fleetsync.toml`
//! (`config`).

mod agent_dist;
mod alarms;
mod api;
mod collect;
mod config;
mod deploy;
mod deprecated;
mod discover;
mod doctor;
mod ec2;
mod progress;
mod report;
mod status;
mod target;
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
use crate::deploy::{Deploy, Ended, Releases};
use crate::progress::log;
use crate::trigger::{Action, AddressChoice, AgentCall, Via};
use crate::values::{Limit, Seconds};
use fleetsync::man::Extra;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok (sync, rollback: every target node is done; status: no node drifts)
  1  a node failed or was not attempted (see the report), the fleet lock was lost
     during the run, status found drifting nodes, doctor found a failed check, or the
     operation failed
  2  usage or configuration error (flags, credentials, group, bucket, endpoint)
  3  the fleet lock is held by another deploy (the message names it)
  130  interrupted (SIGINT/SIGTERM): no new node is started, SSM commands are cancelled,
       the fleet lock is released";

#[derive(Parser)]
#[command(name = "fleetsync", version = fleetsync::VERSION, about = "Keeps every instance of an Auto Scaling Group on the same codebase from S3.", after_help = EXIT_CODES)]
struct Cli {
    /// A config file with the flags' values (keys are the long flag names);
    /// default ./fleetsync.toml when it exists. Flags override it.
    #[arg(long, global = true, env = "FLEETSYNC_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (-v info, -vv debug). RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Sync every InService instance of the group from the source, through SSM or SSH.
    Sync(SyncArgs),
    /// Make an earlier release live again on every node, under the fleet lock.
    Rollback(RollbackArgs),
    /// Ask every node which release is live; flag nodes that drift from the fleet or the release pointer.
    Status(StatusArgs),
    /// Check what a deploy needs, read-only, with a fix for each failure: credentials, the group,
    /// the SSM document, each node's agent, the store and the node's access to it, the launch hook.
    Doctor(StatusArgs),
    /// List the group's instances: which would be synced, and why the others are skipped.
    List(ListArgs),
    /// Add a build to the release store: upload what the store lacks, write its manifest, mark it latest.
    Publish(PublishArgs),
    /// List the releases in the store: id, when, by whom, files, bytes, latest, deployed to which groups.
    Releases(StoreArgs),
    /// Remove releases beyond the newest N (never one a pointer names), then content no kept release names.
    Prune(PruneArgs),
    /// Show the last deploys and rollbacks: who, from where, which release, each node's result.
    History(HistoryArgs),
    /// Inspect or break the fleet lock that keeps two deploys of a group apart.
    #[command(subcommand)]
    Lock(LockCommand),
    /// Put the agent where instances install it from (the CloudFormation user-data).
    #[command(subcommand)]
    AgentDist(AgentDistCommand),
    /// Print the shell completion script, e.g. `fleetsync completions bash > /etc/bash_completion.d/fleetsync`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (fleetsync.1, one per command) into DIR; the packages ship them.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// The flags every fleet command shares (sync, rollback, status). Those
/// that `fleetsync.toml` may supply are optional here; `apply` fills them
/// from the file and then the defaults.
#[derive(Args)]
struct FleetArgs {
    /// The Auto Scaling Group (`group` in fleetsync.toml).
    #[arg(long = "group", value_name = "GROUP")]
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
    /// Sync this many nodes first, one per Availability Zone in turn, and
    /// stop if any of them fails [default: 0].
    #[arg(long)]
    canary: Option<usize>,
    /// How long one node's agent may run before it is stopped and the node
    /// reported failed: 90, 90s, 5m, 1h; at most 48h [default: 30m].
    #[arg(long, value_name = "DURATION")]
    timeout: Option<Seconds>,
    /// The SSM Command document to send [default: fleetsync-agent-ASG, which
    /// infra/aws/fleetsync.yaml creates; AWS-RunShellScript sends a shell
    /// command line instead].
    #[arg(long, value_name = "NAME")]
    ssm_document: Option<String>,
    /// How long SSM may take to deliver the command to a node's SSM agent
    /// before it gives up (SendCommand's TimeoutSeconds, 30s..30 days) [default: 5m].
    #[arg(long, value_name = "DURATION")]
    ssm_delivery_timeout: Option<Seconds>,
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

impl FleetArgs {
    /// Refuses, for a command that starts no deploy (`status`: it takes no
    /// lock and changes nothing), the flags that only steer one.
    fn refuse_deploy_flags(&self, command: &str) -> fleetsync::Result<()> {
        let given = [
            ("--canary", self.canary.is_some()),
            ("--max-errors", self.max_errors.is_some()),
            ("--lock", self.lock.is_some()),
            ("--lock-wait", self.lock_wait.is_some()),
            ("--lock-lease", self.lock_lease.is_some()),
        ];
        match given.iter().filter(|(_, set)| *set).map(|(flag, _)| *flag).collect::<Vec<_>>() {
            flags if flags.is_empty() => Ok(()),
            flags => Err(fleetsync::Error::Config(format!(
                "fleetsync {command} takes no lock and deploys nothing: {} mean nothing to it; drop them",
                flags.join(", ")
            ))),
        }
    }
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
    /// Release mode (implies --releases): the release to deploy, any one in
    /// the store (`fleetsync releases` lists them); default: the latest
    /// published (for a plain prefix: the name of its release, default a
    /// content hash).
    #[arg(long, visible_alias = "release", value_name = "ID")]
    release_id: Option<String>,
    /// Release mode: releases kept on each node besides the live one and the one before it.
    #[arg(long)]
    keep: Option<usize>,
    /// Release mode: a command each node runs after its switch (e.g. a
    /// restart of a Node app; PHP behind the nginx recipe needs none).
    #[arg(long, value_name = "CMD")]
    after_switch: Option<String>,
    /// Release mode: after its switch each node GETs this URL itself (e.g.
    /// http://127.0.0.1/health) until it answers 2xx; when it does
    /// not within --health-timeout, the node failed.
    #[arg(long, value_name = "URL")]
    health_url: Option<String>,
    /// How long a node's release has to answer --health-url, e.g. 30s, 2m [default: 30s].
    #[arg(long, value_name = "DURATION")]
    health_timeout: Option<Seconds>,
    /// Release mode: when the deploy fails (a canary, --max-errors, a node's
    /// after-switch command or health check), every node not known to run
    /// the previous release is switched back to it, so the fleet ends on one
    /// release.
    #[arg(long)]
    rollback_on_failure: bool,
    /// After each batch (the canaries too), wait this long before the next,
    /// watching the --alarms: 90s, 5m. Batches then go one whole batch at a
    /// time. Needs --batch or --canary.
    #[arg(long, value_name = "DURATION")]
    bake: Option<Seconds>,
    /// A CloudWatch alarm that fails the deploy when it goes into ALARM
    /// during the deploy or a bake (no more nodes start; with
    /// --rollback-on-failure the fleet goes back); repeatable. Each must
    /// exist and not be in ALARM when the deploy starts.
    #[arg(long, value_name = "NAME")]
    alarm: Vec<String>,
    /// Let an empty source wipe the nodes' trees (refused by default: it is
    /// usually a wrong prefix or a build not yet published).
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Args)]
struct RollbackArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Discover, check the lock, and print what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The release to make live on every node (default: each node's previous one).
    #[arg(long)]
    to: Option<String>,
    /// A URL each node asks the release it made live for (on the node, as
    /// after a sync): a node whose release does not answer 2xx failed.
    #[arg(long, value_name = "URL")]
    health_url: Option<String>,
    /// How long each node's release has to answer --health-url [default: 30s].
    #[arg(long, value_name = "DURATION")]
    health_timeout: Option<fleetsync::duration::Seconds>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct ListArgs {
    /// The Auto Scaling Group (`group` in fleetsync.toml).
    #[arg(long = "group", value_name = "GROUP")]
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
    /// Where to publish it, s3://BUCKET[/PREFIX]: the deploy's --source
    /// (default: `source` in fleetsync.toml).
    #[arg(long = "source", value_name = "SOURCE")]
    target: Option<String>,
    /// Deprecated: the source after DIR (give --source).
    #[arg(value_name = "SOURCE", conflicts_with = "target", hide = true)]
    source_arg: Option<String>,
    /// The release's name (a CI build number or git sha); default: a hash of the content.
    #[arg(long)]
    release_id: Option<String>,
    /// Upload what symlinks in the build point to, instead of refusing them.
    #[arg(long)]
    follow_symlinks: bool,
    /// A directory every node keeps outside its releases (storage,
    /// public/uploads), declared in the release: each node links it to
    /// DEST/shared/PATH, or to the TARGET its agent.toml gives. Repeatable
    /// (default: `shared` in fleetsync.toml). What the latest release
    /// declares stays declared.
    #[arg(long, value_name = "PATH")]
    shared: Vec<String>,
    /// A file every node keeps outside its releases (.env), declared in the
    /// release as --shared is. Repeatable (default: `shared-files`).
    #[arg(long, value_name = "PATH")]
    shared_file: Vec<String>,
    /// Stop declaring PATH, which the latest release declares shared: the
    /// new release lays it out from its own content. Repeatable.
    #[arg(long, value_name = "PATH")]
    unshare: Vec<String>,
    /// Print what would be uploaded and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON report on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

/// A release store (a published source).
#[derive(Args)]
struct StoreArgs {
    /// The store, s3://BUCKET[/PREFIX]: the deploy's --source (default:
    /// `source` in fleetsync.toml).
    #[arg(long = "source", value_name = "SOURCE")]
    source: Option<String>,
    /// Deprecated: the source as an argument (give --source).
    #[arg(value_name = "SOURCE", conflicts_with = "source", hide = true)]
    source_arg: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Args)]
struct PruneArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Releases kept besides those a pointer names (latest, each group's deployed and previous release).
    #[arg(long)]
    keep: usize,
    /// Nothing younger than this is removed, so an in-flight publish's uploads survive [default: 1h].
    #[arg(long, value_name = "DURATION")]
    grace: Option<Seconds>,
    /// Deploy records kept for each group (what `fleetsync history` shows): the newest N.
    #[arg(long, value_name = "N", default_value_t = 500)]
    keep_history: usize,
    /// Print what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct HistoryArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only this group's deploys (default: `group` in fleetsync.toml, else every group's).
    #[arg(long = "group", value_name = "GROUP")]
    asg: Option<String>,
    /// How many deploys [default: 10].
    #[arg(short = 'n', long)]
    last: Option<usize>,
}

#[derive(Subcommand)]
enum LockCommand {
    /// Print who holds the lock, since when, and until when.
    Show(LockArgs),
    /// Delete the lock whoever holds it, and print what was broken. The
    /// holder notices at its next renewal and stops starting nodes.
    Break(LockArgs),
}

#[derive(Subcommand)]
enum AgentDistCommand {
    /// Upload the agent binaries, its systemd units and SHA256SUMS from DIR
    /// (the output of infra/dist/build) to s3://BUCKET/dist, each file
    /// checked against DIR's sums first; the remote sums are merged, so
    /// uploads from x86_64 and arm64 hosts add up.
    Upload(AgentDistArgs),
}

#[derive(Args)]
struct AgentDistArgs {
    /// The output directory of infra/dist/build.
    dir: PathBuf,
    /// Where instances install from: the template's `DistUrl` output, s3://BUCKET/dist.
    dest: String,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    aws: AwsArgs,
}

#[derive(Args)]
struct LockArgs {
    /// The Auto Scaling Group (`group` in fleetsync.toml).
    #[arg(long = "group", value_name = "GROUP")]
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
        self.asg = self.asg.take().or(file.group.clone());
        self.source = self.source.take().or(file.source.clone());
        self.dest = self.dest.take().or(file.dest.clone());
        self.state_dir = self.state_dir.take().or(file.state_dir.clone());
        self.via = self.via.or(file.via);
        self.batch = self.batch.or(file.batch);
        self.max_errors = self.max_errors.or(file.max_errors);
        self.canary = self.canary.or(file.canary);
        self.timeout = self.timeout.or(file.timeout);
        self.ssm_document = self.ssm_document.take().or(file.ssm_document.clone());
        self.ssm_delivery_timeout = self.ssm_delivery_timeout.or(file.ssm_delivery_timeout);
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
            return Err(missing("group"));
        }
        if need_source && self.source.is_none() {
            return Err(missing("source"));
        }
        if self.lock_lease.is_some_and(|l| l.0 < Duration::from_secs(3)) {
            return Err(fleetsync::Error::Config("--lock-lease must be at least 3s (it is renewed every third of it)".into()).into());
        }
        if self.timeout() > trigger::MAX_EXECUTION_TIMEOUT {
            // SSM's documents take at most 48 h (and the SSM agent quietly
            // runs a larger value with one hour instead).
            return Err(fleetsync::Error::Config(format!(
                "--timeout {} s is more than SSM allows (48h, 172800 s): give at most --timeout 48h",
                self.timeout().as_secs()
            ))
            .into());
        }
        let (low, high) = trigger::DELIVERY_TIMEOUT_RANGE;
        if !(low..=high).contains(&self.delivery_timeout().as_secs()) {
            return Err(fleetsync::Error::Config(format!(
                "--ssm-delivery-timeout must be between {low} s and {high} s (30 days), SendCommand's range"
            ))
            .into());
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

    fn delivery_timeout(&self) -> Duration {
        self.ssm_delivery_timeout.map_or(Duration::from_secs(300), |t| t.0)
    }

    /// The agent call for `action`, with `--dest` and `--state-dir` when given.
    fn agent_call(&self, action: Action) -> AgentCall {
        AgentCall { dest: self.dest.clone(), state_dir: self.state_dir.clone(), ..AgentCall::new(action) }
    }

    /// The AWS configuration (read once) and an S3 client on it.
    async fn clients(&self) -> (aws_types::SdkConfig, fleetsync::source::S3Client) {
        let opts = self.aws.client_options();
        let sdk = fleetsync::source::sdk_config(&opts).await;
        let s3 = fleetsync::source::s3_client_with(&sdk, opts.path_style);
        (sdk, s3)
    }

    /// How to reach the nodes.
    fn transport(&self, sdk: &aws_types::SdkConfig, verb: &str) -> trigger::Transport {
        match self.via() {
            Via::Ssm => trigger::Transport::Ssm(trigger::Ssm {
                client: aws_sdk_ssm::Client::new(sdk),
                document: self.ssm_document.clone().unwrap_or_else(|| format!("fleetsync-agent-{}", self.asg())),
                timeout: self.timeout(),
                delivery_timeout: self.delivery_timeout(),
                comment: format!("fleetsync {verb} --group {}", self.asg()),
                sent: Default::default(),
                sending: Default::default(),
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
        // A release id means release mode: `--release ID` without the
        // `--releases` one letter away is not an error.
        self.releases |= file.mode == Some(config::Mode::Releases) || self.release_id.is_some();
        self.keep = self.keep.or(file.keep);
        self.after_switch = self.after_switch.take().or(file.after_switch.clone());
        self.health_url = self.health_url.take().or(file.health_url.clone());
        self.health_timeout = self.health_timeout.or(file.health_timeout);
        self.rollback_on_failure |= file.rollback_on_failure.unwrap_or(false);
        self.bake = self.bake.or(file.bake);
        if self.alarm.is_empty() {
            self.alarm = file.alarms.clone().unwrap_or_default();
        }
        if self.bake.is_some() && self.fleet.batch.is_none() && self.fleet.canary.unwrap_or(0) == 0 {
            return Err(fleetsync::Error::Config(
                "--bake waits between batches, and this deploy has one: give --batch N|N% (or --canary N) too".into(),
            )
            .into());
        }
        if let Some(bad) = self.alarm.iter().find(|a| a.trim().is_empty() || a.len() > 255) {
            return Err(fleetsync::Error::Config(format!("--alarm {bad:?}: give a CloudWatch alarm's name (1 to 255 characters)")).into());
        }
        let release_only = [
            self.release_id.is_some(),
            self.keep.is_some(),
            self.after_switch.is_some(),
            self.health_url.is_some(),
            self.rollback_on_failure,
        ];
        if !self.releases && release_only.iter().any(|set| *set) {
            return Err(fleetsync::Error::Config(
                "--release-id, --keep, --after-switch, --health-url and --rollback-on-failure apply to release mode: add --releases".into(),
            )
            .into());
        }
        if let Some(url) = &self.health_url {
            fleetsync::release::health::parse(url)?;
        }
        if self.health_timeout.is_some() && self.health_url.is_none() {
            return Err(fleetsync::Error::Config("--health-timeout needs --health-url URL".into()).into());
        }
        Ok(())
    }

    /// What every node's agent is asked to do.
    fn agent_call(&self) -> AgentCall {
        AgentCall {
            source: Some(self.fleet.source().to_string()),
            releases: self.releases,
            release: self.release_id.clone(),
            keep: self.keep,
            after_switch: self.after_switch.clone(),
            health_url: self.health_url.clone(),
            health_timeout: self.health_timeout.map(|t| t.0),
            // The agent's own switch-back (when its after-switch command
            // fails); the fleet-level one is the deploy's.
            rollback_on_failure: self.rollback_on_failure && self.after_switch.is_some(),
            allow_empty: self.allow_empty,
            ..self.fleet.agent_call(Action::Pull)
        }
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
    let cli = Cli::parse_from(deprecated::args(std::env::args_os()));
    fleetsync::logging::init(cli.verbose, "fleetsync");
    // Before the config file: a broken fleetsync.toml must not stop these.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Man { dir } => return man(dir),
        _ => {}
    }
    let file = config::FILE.load::<FileConfig>(cli.config.as_deref())?.upgrade();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    match cli.command {
        Command::Sync(mut args) => {
            args.apply(&file)?;
            runtime.block_on(sync(args))
        }
        Command::Rollback(mut args) => {
            args.fleet.apply(&file, true)?;
            args.health_url = args.health_url.take().or(file.health_url.clone());
            args.health_timeout = args.health_timeout.or(file.health_timeout);
            if let Some(url) = &args.health_url {
                fleetsync::release::health::parse(url)?;
            }
            runtime.block_on(rollback(args))
        }
        Command::Status(mut args) => {
            // Before fleetsync.toml fills them in: only what was typed.
            args.fleet.refuse_deploy_flags("status")?;
            args.fleet.apply(&file, false)?;
            runtime.block_on(status(args))
        }
        Command::Doctor(mut args) => {
            args.fleet.refuse_deploy_flags("doctor")?;
            args.fleet.apply(&file, false)?;
            runtime.block_on(doctor(args))
        }
        Command::List(mut args) => {
            args.aws.apply(&file);
            args.asg = args.asg.or(file.group);
            runtime.block_on(list(args))
        }
        Command::Publish(mut args) => {
            args.aws.apply(&file);
            args.target = deprecated::source(args.target.take(), args.source_arg.take(), "the source after DIR").or(file.source.clone());
            if args.shared.is_empty() {
                args.shared = file.shared.clone().unwrap_or_default();
            }
            if args.shared_file.is_empty() {
                args.shared_file = file.shared_files.clone().unwrap_or_default();
            }
            runtime.block_on(publish(args))
        }
        Command::Releases(mut args) => {
            args.apply(&file);
            runtime.block_on(releases(args))
        }
        Command::Prune(mut args) => {
            args.store.apply(&file);
            runtime.block_on(prune(args))
        }
        Command::History(mut args) => {
            args.store.apply(&file);
            args.asg = args.asg.take().or(file.group.clone());
            runtime.block_on(history(args))
        }
        Command::Lock(LockCommand::Show(mut args)) => {
            args.apply(file);
            runtime.block_on(lock_show(args))
        }
        Command::Lock(LockCommand::Break(mut args)) => {
            args.apply(file);
            runtime.block_on(lock_break(args))
        }
        Command::AgentDist(AgentDistCommand::Upload(mut args)) => {
            args.aws.apply(&file);
            runtime.block_on(agent_dist_upload(args))
        }
        Command::Completions { .. } | Command::Man { .. } => unreachable!("answered before the config file is read"),
    }
}

/// `agent-dist upload`: see `agent_dist`.
async fn agent_dist_upload(args: AgentDistArgs) -> anyhow::Result<i32> {
    let dest = S3Url::parse(&args.dest)?;
    let s3 = fleetsync::source::s3_client(&args.aws.client_options()).await;
    let up = agent_dist::upload(&s3, &args.dir, &dest).await?;
    if args.json {
        print_stdout(&serde_json::to_string(&up)?);
    } else {
        let lines: Vec<String> = up.files.iter().map(|(name, hex)| format!("{hex}  {name}")).collect();
        print_stdout(&format!(
            "{}
uploaded to {}: instances launched from now on install this agent",
            lines.join("\n"),
            up.dest
        ));
    }
    Ok(exit::OK)
}

/// `completions SHELL`: the completion script, from the clap definitions.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<i32> {
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "fleetsync", &mut std::io::stdout());
    Ok(exit::OK)
}

/// `man DIR`: fleetsync.1 and a page per command.
/// The man page's EXAMPLES: a first deploy, as the README shows it.
const MAN_EXAMPLES: &str = "\
Check what a deploy needs, publish a build, deploy it a canary first, look, roll back:

  fleetsync doctor --group web --source s3://code/app
  fleetsync publish build/ --source s3://code/app --release-id \"$GIT_SHA\"
  fleetsync sync --group web --source s3://code/app --releases --canary 1 --batch 25% --rollback-on-failure
  fleetsync status --group web --source s3://code/app
  fleetsync rollback --group web --source s3://code/app

From CI, with the settings in ./fleetsync.toml and a report for the job:

  fleetsync sync --release \"$GIT_SHA\" --lock-wait 10m --json > deploy-report.json";

/// The man page's FILES.
const MAN_FILES: &str = "\
./fleetsync.toml (or --config FILE, FLEETSYNC_CONFIG): any sync flag by its long name, e.g. group, source, mode, batch; flags override it.

s3://BUCKET/.fleetsync/locks/GROUP.json: the fleet lock (fleetsync lock show).

SOURCE/.fleetsync/: the release store: manifests, packs, the latest and deployed pointers, the deploy history.";

fn man(dir: &std::path::Path) -> anyhow::Result<i32> {
    let extra = Extra {
        examples: MAN_EXAMPLES,
        files: MAN_FILES,
        exit_codes: EXIT_CODES,
        see_also: "fleetsync-agent(1), fleetsync-sync(1), fleetsync-doctor(1); docs/ in the repository.",
    };
    fleetsync::man::write(dir, "fleetsync.1", &extra, |dir| clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir))
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    Ok(exit::OK)
}

/// `sync`: the deploy flow (see `deploy`), or with `--dry-run` what it would do.
async fn sync(args: SyncArgs) -> anyhow::Result<i32> {
    let how = How {
        verb: "sync",
        rejoin: true,
        dry_run: args.dry_run,
        releases: if args.releases { Releases::Sync(args.release_id.clone()) } else { Releases::None },
        rollback_on_failure: args.rollback_on_failure,
        bake: args.bake.map_or(Duration::ZERO, |b| b.0),
        alarms: args.alarm.clone(),
    };
    deploy_and_print(&args.fleet, args.agent_call(), how).await
}

/// `rollback`: the same flow as `sync`. With a release store, the group
/// moves to `--to` or its previous release (a node that never had it
/// fetches it); for a plain prefix, each node's agent makes its own
/// previous release live again (an instance that joins meanwhile booted on
/// the source: it has nothing to roll back, so there is no second pass).
async fn rollback(args: RollbackArgs) -> anyhow::Result<i32> {
    let call = AgentCall {
        release: args.to.clone(),
        health_url: args.health_url.clone(),
        health_timeout: args.health_timeout.map(|t| t.0),
        ..args.fleet.agent_call(Action::Rollback)
    };
    let how = How {
        verb: "rollback",
        rejoin: false,
        dry_run: args.dry_run,
        releases: Releases::Rollback(args.to.clone()),
        rollback_on_failure: false,
        bake: Duration::ZERO,
        alarms: Vec::new(),
    };
    deploy_and_print(&args.fleet, call, how).await
}

/// What differs between the commands that change the fleet.
struct How {
    verb: &'static str,
    rejoin: bool,
    dry_run: bool,
    releases: Releases,
    rollback_on_failure: bool,
    bake: Duration,
    alarms: Vec<String>,
}

/// Runs a deploy (or its dry run) and prints what it gave.
async fn deploy_and_print(args: &FleetArgs, call: AgentCall, how: How) -> anyhow::Result<i32> {
    let How { verb, rejoin, dry_run, releases, rollback_on_failure, bake, alarms } = how;
    let source = S3Url::parse(args.source())?;
    let (sdk, s3) = args.clients().await;
    let d = Deploy {
        verb,
        asg: args.asg().to_string(),
        lock: match &args.lock {
            Some(l) => LockObject::parse(l)?,
            None => LockObject::for_group(&source, args.asg())?,
        },
        source,
        dest: args.dest.clone().unwrap_or_default(),
        lease: args.lease(),
        lock_wait: args.lock_wait.map_or(Duration::ZERO, |w| w.0),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        transport: args.transport(&sdk, verb),
        call,
        address: args.address.unwrap_or(AddressChoice::PrivateIp),
        batch: args.batch,
        max_errors: args.max_errors,
        canary: args.canary.unwrap_or(0),
        rejoin,
        releases,
        rollback_on_failure,
        bake,
        alarms,
    };
    if dry_run {
        let (text, code) = deploy::dry_run(&d, &sdk, &s3).await?;
        print_stdout(&text);
        return Ok(code);
    }
    let lock = d.lock.to_string();
    match deploy::run(d, &sdk, &s3).await? {
        Ended::Busy(holder) => {
            eprintln!("fleetsync: another deploy holds the fleet lock {lock}: {holder} (wait with --lock-wait, or break it with `fleetsync lock break`)");
            Ok(exit::BUSY)
        }
        Ended::Interrupted => Ok(exit::INTERRUPTED),
        Ended::Report(report) => {
            if let Some(e) = &report.rejoin_error {
                log(&format!("error: {e}"));
            }
            if let Some(w) = report::versions_warning(&report.agent_versions) {
                log(&format!("warning: {w}"));
            }
            // GitHub Actions: the job's summary page gets the result too.
            if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
                let appended = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, report.markdown(verb).as_bytes()));
                if let Err(e) = appended {
                    log(&format!("warning: could not write the job summary {}: {e}", std::path::Path::new(&path).display()));
                }
            }
            if args.json {
                print_stdout(&serde_json::to_string(&report)?);
            } else {
                print_stdout(&report.table());
            }
            Ok(report.exit_code)
        }
    }
}

/// `status`: every node's live release, drift flagged (see `status`).
async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let f = &args.fleet;
    let (sdk, s3) = f.clients().await;
    let st = status::Status {
        asg: f.asg().to_string(),
        source: f.source.as_deref().map(S3Url::parse).transpose()?,
        transport: f.transport(&sdk, "status"),
        call: f.agent_call(Action::Status),
        address: f.address.unwrap_or(AddressChoice::PrivateIp),
        batch: f.batch,
    };
    let report = status::run(st, &sdk, &s3).await?;
    if let Some(w) = report::versions_warning(&report.agent_versions) {
        log(&format!("warning: {w}"));
    }
    if f.json {
        print_stdout(&serde_json::to_string(&report)?);
    } else {
        print_stdout(&report.table());
    }
    Ok(report.exit_code)
}

/// `doctor`: what a deploy needs, checked (see `doctor`). Exit 1 when a
/// check failed.
async fn doctor(args: StatusArgs) -> anyhow::Result<i32> {
    let f = &args.fleet;
    let (sdk, s3) = f.clients().await;
    let d = doctor::Doctor {
        asg: f.asg().to_string(),
        source: f.source.as_deref().map(S3Url::parse).transpose()?,
        transport: f.transport(&sdk, "doctor"),
        call: f.agent_call(Action::Status),
        address: f.address.unwrap_or(AddressChoice::PrivateIp),
    };
    let report = doctor::run(d, &sdk, &s3).await;
    if f.json {
        print_stdout(&serde_json::to_string(&report)?);
    } else {
        print_stdout(&report.text());
    }
    Ok(report.exit_code)
}

/// `list`: the discover step on its own, as a table or JSON.
async fn list(args: ListArgs) -> anyhow::Result<i32> {
    let asg = args.asg.as_deref().ok_or_else(|| missing("group"))?;
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
        self.asg = self.asg.take().or(file.group);
        self.source = self.source.take().or(file.source);
        self.lock = self.lock.take().or(file.lock);
    }
}

/// `publish`: walk -> diff -> upload -> delete -> pointer (see the library's
/// `publish` module).
async fn publish(args: PublishArgs) -> anyhow::Result<i32> {
    let opts = fleetsync::publish::PublishOptions {
        dir: args.dir.clone(),
        dest: S3Url::parse(args.target.as_deref().ok_or_else(|| {
            fleetsync::Error::Config(
                "missing where to publish: give --source s3://BUCKET[/PREFIX], or `source = ...` in fleetsync.toml".into(),
            )
        })?)?,
        release_id: args.release_id.clone(),
        follow_symlinks: args.follow_symlinks,
        dry_run: args.dry_run,
        client: args.aws.client_options(),
        shared: fleetsync::store::manifest::SharedPaths { dirs: args.shared.clone(), files: args.shared_file.clone() },
        unshare: args.unshare.clone(),
    };
    let r = fleetsync::publish::publish(&opts).await?;
    if args.json {
        print_stdout(&serde_json::to_string(&r)?);
        return Ok(r.exit_code);
    }
    let human = fleetsync::report::human_bytes;
    let what = format!("{} files ({}) as release {} to {}", r.files, human(r.bytes), r.release_id, r.dest);
    if r.unchanged {
        print_stdout(&format!("{what}: unchanged, release {} already holds this content; nothing uploaded", r.latest));
    } else if r.dry_run {
        print_stdout(&format!(
            "would publish {what}: {} files new to the store ({}), {} stored already",
            r.uploaded_files,
            human(r.uploaded_bytes),
            r.reused_files
        ));
    } else {
        print_stdout(&format!(
            "published {what}: {} files new to the store ({} uploaded in {} packs and {} blobs), {} stored already; latest is {} (not deployed: `fleetsync sync --releases` deploys it)",
            r.uploaded_files,
            human(r.uploaded_bytes),
            r.packs_uploaded,
            r.blobs_uploaded,
            r.reused_files,
            r.latest
        ));
    }
    Ok(r.exit_code)
}

impl StoreArgs {
    fn apply(&mut self, file: &FileConfig) {
        self.aws.apply(file);
        self.source = deprecated::source(self.source.take(), self.source_arg.take(), "the source as an argument").or(file.source.clone());
    }

    /// The store's source URL and an S3 client.
    async fn open(&self) -> anyhow::Result<(S3Url, S3Client)> {
        let given = self.source.as_deref().ok_or_else(|| {
            fleetsync::Error::Config("missing the source: give --source s3://BUCKET[/PREFIX], or `source = ...` in fleetsync.toml".into())
        })?;
        let source = S3Url::parse(given)?;
        Ok((source, fleetsync::source::s3_client(&self.aws.client_options()).await))
    }
}

/// `releases`: the store's catalogue.
async fn releases(args: StoreArgs) -> anyhow::Result<i32> {
    let (source, s3) = args.open().await?;
    let catalog = fleetsync::store::catalog::catalog(&s3, &fleetsync::store::Store::of(&source)).await?;
    if args.json {
        print_stdout(&serde_json::to_string(&catalog)?);
    } else {
        print_stdout(&report::releases_table(&catalog));
    }
    Ok(exit::OK)
}

/// `prune`: mark and sweep the store (see the library's `prune`).
async fn prune(args: PruneArgs) -> anyhow::Result<i32> {
    let (source, _) = args.store.open().await?;
    let opts = fleetsync::prune::PruneOptions {
        source,
        keep: args.keep,
        grace: args.grace.map_or(Duration::from_secs(3600), |g| g.0),
        keep_history: args.keep_history,
        dry_run: args.dry_run,
        client: args.store.aws.client_options(),
    };
    let r = fleetsync::prune::prune(&opts).await?;
    if args.store.json {
        print_stdout(&serde_json::to_string(&r)?);
    } else {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        let mut out = format!(
            "{verb} {} releases ({}), {} packs and {} blobs ({}), {} deploy records; kept {} releases",
            r.deleted_releases.len(),
            if r.deleted_releases.is_empty() { "none".to_string() } else { r.deleted_releases.join(", ") },
            r.deleted_packs,
            r.deleted_blobs,
            fleetsync::report::human_bytes(r.freed_bytes),
            r.deleted_history,
            r.kept.len()
        );
        if let Some(why) = &r.content_skipped {
            out.push_str(&format!("\ncontent left alone: {why}"));
        }
        print_stdout(&out);
    }
    Ok(exit::OK)
}

/// `history`: the last deploys and rollbacks.
async fn history(args: HistoryArgs) -> anyhow::Result<i32> {
    let (source, s3) = args.store.open().await?;
    let store = fleetsync::store::Store::of(&source);
    let records = fleetsync::store::history::last(&s3, &store, args.asg.as_deref(), args.last.unwrap_or(10)).await?;
    if args.store.json {
        print_stdout(&serde_json::to_string(&records)?);
    } else {
        print_stdout(&report::history_table(&records));
    }
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
        (None, None, _) => return Err(missing("group")),
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
