//! The SSM Run Command transport: SSM runs the agent on the instances; the
//! bastion decides who runs when, and polls for the results.
//!
//! - The document is the group's own `fleetsync-agent-ASG` (the
//!   CloudFormation stack creates it): it runs fleetsync-agent and nothing
//!   else, with typed, pattern-checked parameters, so the deploy role needs
//!   no right to run a shell. `--ssm-document AWS-RunShellScript` sends the
//!   quoted command line instead (and allows `--after-switch`).
//! - Only instances whose SSM agent is online are sent anything
//!   (DescribeInstanceInformation, 50 IDs per call): one node without an
//!   agent must not fail the SendCommand of 49 others, and its error can
//!   say what is wrong. A failed check fails the nodes of that call only.
//! - Rolling, and never queued inside SSM: a command's total timeout
//!   (TimeoutSeconds + executionTimeout) counts from SendCommand, so nodes
//!   queued behind a small MaxConcurrency would expire unrun. A command is
//!   therefore sent only for as many nodes as `--batch` lets run right now
//!   (at most 50, SendCommand's limit), with MaxConcurrency equal to its
//!   size; as nodes finish, the next command takes their places. A node that
//!   never answers (its SSM agent died while the instance shows Online)
//!   holds one place until its command expires, not the whole fleet.
//! - `--max-errors` becomes each command's MaxErrors: what is left of the
//!   budget when it is sent (SSM counts per command); no limit is `100%`,
//!   since SSM's default (0) would stop at the first failure.
//! - Polling: one ListCommandInvocations per command per round, with
//!   Details, whose plugin Output carries the agent's report (a few hundred
//!   bytes; SSM keeps 2,500 characters there), so a node that finished costs
//!   no further call. Only a report that did not fit, or a node with no
//!   report, is read with GetCommandInvocation (24,000 characters of stdout),
//!   retried while it still lags the list. Polling restarts fast after every
//!   round in which a node finished, since a fleet's nodes finish close
//!   together, and backs off to a second while nothing happens; with many
//!   commands in flight it stays under [`POLLS_PER_SECOND`] calls, and it
//!   slows down further when SSM throttles it (the SDK retries each call).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::{CommandInvocation, CommandInvocationStatus, InstanceInformationStringFilter, PingStatus};
use fleetsync::source::ApiFailure;
use futures::stream::FuturesUnordered;
use futures::StreamExt as _;

use super::{Action, AgentCall, Fleet};
use crate::api::api_error;
use crate::collect::{last_line, NodeResult, Outcome};
use crate::discover::Node;
use crate::progress::Progress;

/// SendCommand's limit on InstanceIds per call (DescribeInstanceInformation
/// takes at most 50 results a page too).
const IDS_PER_COMMAND: usize = 50;
/// The document every account has; sends the quoted command line.
pub const RUN_SHELL_SCRIPT: &str = "AWS-RunShellScript";
/// AWS-RunShellScript's and the fleetsync document's limit on
/// executionTimeout (48 hours). SSM does not refuse a larger value: the
/// SSM agent runs it with its default of an hour.
pub const MAX_EXECUTION_TIMEOUT: Duration = Duration::from_secs(172_800);
/// SendCommand's range for TimeoutSeconds.
pub const DELIVERY_TIMEOUT_RANGE: (u64, u64) = (30, 2_592_000);
/// Polling starts fast and backs off to this while nothing finishes: one
/// ListCommandInvocations per command (of up to 50 nodes) a second keeps
/// even a thousand-node deploy within SSM's API rates.
const MAX_POLL: Duration = Duration::from_secs(1);
const MIN_POLL: Duration = Duration::from_millis(100);
/// ListCommandInvocations calls a second at most, whatever the number of
/// commands in flight (a 2,000-node deploy is 40 of them).
const POLLS_PER_SECOND: f64 = 40.0;
/// DescribeInstanceInformation and SendCommand calls in flight at once
/// (a 2,000-node fleet is 40 of each).
const CALLS_AT_ONCE: usize = 8;
/// How long GetCommandInvocation may lag ListCommandInvocations (or say
/// InvocationDoesNotExist) before the node is reported without its output.
const OUTPUT_PATIENCE: Duration = Duration::from_secs(30);
/// What the SSM agent appends to stderr when the script exits non-zero
/// (amazon-ssm-agent `runscript.go`): not the node's reason, so it is cut.
const SSM_EXIT_SUFFIX: &str = "failed to run commands: exit status ";
/// How the SSM agent joins stdout and stderr in a plugin's Output, and
/// marks a cut (amazon-ssm-agent `iohandler.go`).
const OUTPUT_ERROR_TITLE: &str = "\n----------ERROR-------\n";
const OUTPUT_TRUNCATED: &str = "\n---Output truncated---";
const ERROR_TRUNCATED: &str = "\n---Error truncated----";
/// The permissions the SSM path uses, named in its errors.
const NEEDS: &str = "ssm:SendCommand on the fleetsync document and the instances, ssm:ListCommandInvocations, \
                     ssm:GetCommandInvocation, ssm:CancelCommand and ssm:DescribeInstanceInformation";

/// How to run the agent through SSM.
pub struct Ssm {
    pub client: aws_sdk_ssm::Client,
    /// The Command document: the group's fleetsync document, or AWS-RunShellScript.
    pub document: String,
    /// executionTimeout: SSM stops the agent after this.
    pub timeout: Duration,
    /// SendCommand's TimeoutSeconds: how long SSM may take to hand a
    /// command to an instance's agent.
    pub delivery_timeout: Duration,
    /// Shown in the SSM console and in ListCommands, to tell deploys apart.
    pub comment: String,
    /// Commands sent so far, with how many instances each, to cancel them
    /// if the deploy is interrupted. A std Mutex: held only to push or
    /// copy, never across an await.
    pub sent: Arc<std::sync::Mutex<Vec<(String, usize)>>>,
    /// Held for reading by every SendCommand in flight (a task of its own,
    /// so that an interrupt, which drops the deploy's futures, never drops
    /// a request SSM may have accepted before its command ID is known);
    /// [`Ssm::cancel_all`] takes it for writing to wait for them.
    pub sending: Arc<tokio::sync::RwLock<()>>,
}

/// How long an interrupted deploy waits for the SendCommands in flight to
/// answer before it cancels what was sent (usually well under a second; a
/// stalled connection can hold one for the SDK's read timeout per attempt).
const SEND_PATIENCE: Duration = Duration::from_secs(60);
/// How long an interrupted deploy waits for SSM to end the invocations it
/// cancelled before it releases the fleet lock anyway, naming them.
const CANCEL_PATIENCE: Duration = Duration::from_secs(30);

/// SSM answered a polling or output call in a way waiting does not cure:
/// credentials expired or refused, or the permission missing. (Credentials
/// that could not be loaded for a moment, an instance role being renewed,
/// are not: SSM never answered.)
fn hopeless(f: &ApiFailure) -> bool {
    (f.is_credentials() && f.code.is_some()) || f.code.as_deref() == Some("AccessDeniedException")
}

/// Why a SendCommand was not sent.
struct NotSent {
    /// For the nodes' results.
    why: String,
    /// SSM refused instance IDs it no longer manages (InvalidInstanceId):
    /// the chunk's other nodes may be sent again.
    left: bool,
    /// SSM refused the parameters (InvalidParameters).
    refused_parameters: bool,
}

/// One command sent and not finished.
struct InFlight<'n> {
    id: String,
    /// Nodes without a final state yet, by instance ID.
    waiting: HashMap<String, &'n Node>,
    /// When each node was first seen running (its progress line started).
    running: HashMap<String, Instant>,
    sent_at: Instant,
    cancelled: bool,
}

impl Ssm {
    /// Runs the agent on `nodes`; one result per node, in their order.
    pub(super) async fn run(&self, fleet: &Fleet<'_>, nodes: &[Node]) -> Vec<NodeResult> {
        let mut results: HashMap<String, NodeResult> = HashMap::new();
        match self.parameters(&fleet.call) {
            Ok(parameters) => {
                let managed = self.reachable(fleet, nodes, &mut results).await;
                for r in self.roll(fleet, &managed, &parameters).await {
                    results.insert(r.instance_id.clone(), r);
                }
            }
            Err(why) => {
                for n in nodes {
                    results.insert(n.instance_id.clone(), fleet.failed(n, why.clone()));
                }
            }
        }
        nodes.iter().filter_map(|n| results.remove(&n.instance_id)).collect()
    }

    /// The document's parameters for `call`, checked as the fleetsync
    /// document's patterns check them (infra/aws/ssm-agent-document.yaml),
    /// so that a value SSM would refuse is one clear line, not a failed node.
    pub fn parameters(&self, call: &AgentCall) -> Result<HashMap<String, Vec<String>>, String> {
        let timeout = self.timeout.as_secs().max(1).to_string();
        if self.document == RUN_SHELL_SCRIPT {
            return Ok(HashMap::from([("commands".into(), vec![call.command_line()]), ("executionTimeout".into(), vec![timeout])]));
        }
        let not_sent = |what: &str| {
            format!(
                "{what} is not sent through the SSM document {} (it runs fleetsync-agent with checked values only): set it in each node's agent.toml, or pass --ssm-document {RUN_SHELL_SCRIPT}",
                self.document
            )
        };
        if call.after_switch.is_some() || call.rollback_on_failure {
            return Err(not_sent("--after-switch (a shell command)"));
        }
        let mut p =
            HashMap::from([("action".to_string(), vec![call.action.as_str().to_string()]), ("executionTimeout".into(), vec![timeout])]);
        let mut put = |name: &str, flag: &str, value: Option<String>, ok: fn(&str) -> bool| -> Result<(), String> {
            if let Some(v) = value {
                if !ok(&v) {
                    return Err(not_sent(&format!("{flag} {v:?} (allowed: letters, digits and . _ - /)")));
                }
                p.insert(name.to_string(), vec![v]);
            }
            Ok(())
        };
        let path = |v: &str| v.starts_with('/') && v.len() <= 1001 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        let word = |v: &str| {
            !v.is_empty()
                && v.len() <= 128
                && !v.starts_with(['.', '-'])
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        let source = |v: &str| {
            v.strip_prefix("s3://").is_some_and(|rest| {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
                    && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
            })
        };
        let group = |v: &str| !v.is_empty() && v.len() <= 255 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.@+-".contains(&b));
        put("source", "the source", call.source.clone(), source)?;
        put("dest", "--dest", call.dest.clone(), path)?;
        put("stateDir", "--state-dir", call.state_dir.clone(), path)?;
        put("release", if call.action == Action::Rollback { "--to" } else { "--release-id" }, call.release.clone(), word)?;
        put("group", "--group", call.group.clone(), group)?;
        put("manifest", "--manifest-digest", call.manifest.map(|d| d.to_string()), |v| v.len() == 64)?;
        put("keep", "--keep", call.keep.map(|k| k.to_string()), |v| v.len() <= 4)?;
        let url = |v: &str| {
            (v.starts_with("http://") || v.starts_with("https://"))
                && v.len() <= 500
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~:/?#@!$&*+,;=%-".contains(&b))
        };
        put("healthUrl", "--health-url", call.health_url.clone(), url)?;
        put("healthTimeout", "--health-timeout", call.health_timeout.map(|t| t.as_secs().to_string()), |v| v.len() <= 5)?;
        if call.releases {
            p.insert("mode".into(), vec!["releases".into()]);
        }
        if call.allow_empty {
            p.insert("allowEmpty".into(), vec!["yes".into()]);
        }
        if call.dry_run {
            p.insert("dryRun".into(), vec!["yes".into()]);
        }
        Ok(p)
    }

    /// Which of `nodes` can be sent a command. The others get their result
    /// now: not managed by SSM, or its agent not online.
    async fn reachable<'n>(&self, fleet: &Fleet<'_>, nodes: &'n [Node], results: &mut HashMap<String, NodeResult>) -> Vec<&'n Node> {
        let mut managed = Vec::new();
        let checked: Vec<_> = futures::stream::iter(nodes.chunks(IDS_PER_COMMAND))
            .map(|chunk| async move { (chunk, self.ping(chunk).await) })
            .buffered(CALLS_AT_ONCE)
            .collect()
            .await;
        for (chunk, pings) in checked {
            let pings = match pings {
                Ok(p) => p,
                Err(e) => {
                    // Only these nodes could not be checked.
                    let why = format!("could not check that the SSM agent is online: {e:#}");
                    results.extend(chunk.iter().map(|n| (n.instance_id.clone(), fleet.failed(n, why.clone()))));
                    continue;
                }
            };
            for n in chunk {
                match pings.get(&n.instance_id) {
                    Some(None) => managed.push(n),
                    Some(Some(ping)) => {
                        let why = format!(
                            "the SSM agent on {} is not online (ping status {ping}); check the instance and its agent",
                            n.instance_id
                        );
                        results.insert(n.instance_id.clone(), fleet.failed(n, why));
                    }
                    None => {
                        let why = format!(
                            "{} is not managed by SSM: install and start the SSM agent, and give the instance role AmazonSSMManagedInstanceCore (or use --via ssh)",
                            n.instance_id
                        );
                        results.insert(n.instance_id.clone(), fleet.failed(n, why));
                    }
                }
            }
        }
        managed
    }

    /// The SSM view of up to 50 instances: `None` for an online agent, the
    /// ping status otherwise; absent when SSM does not know the instance.
    async fn ping(&self, chunk: &[Node]) -> anyhow::Result<HashMap<String, Option<String>>> {
        let filter = InstanceInformationStringFilter::builder()
            .key("InstanceIds")
            .set_values(Some(chunk.iter().map(|n| n.instance_id.clone()).collect()))
            .build()?;
        let mut found = HashMap::new();
        let mut pages = self.client.describe_instance_information().filters(filter).max_results(50).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("DescribeInstanceInformation", &ApiFailure::from_sdk(&e), NEEDS))?;
            for info in page.instance_information_list() {
                if let Some(id) = info.instance_id() {
                    let ping = info.ping_status().filter(|p| **p != PingStatus::Online).map(|p| p.as_str().to_string());
                    found.insert(id.to_string(), ping);
                }
            }
        }
        Ok(found)
    }

    /// Sends commands as places free up (see the module doc) and collects
    /// every node's result.
    async fn roll<'n>(&self, fleet: &Fleet<'_>, managed: &[&'n Node], parameters: &HashMap<String, Vec<String>>) -> Vec<NodeResult> {
        let places = fleet.batch_size(managed.len());
        let mut queue: VecDeque<&Node> = managed.iter().copied().collect();
        let mut in_flight: Vec<InFlight<'n>> = Vec::new();
        // Nodes sent and without a result yet (their output may be being read).
        let mut busy = 0usize;
        let mut results = Vec::new();
        let mut reads = FuturesUnordered::new();
        let mut pause = MIN_POLL;
        // Nodes sent again after SSM refused a command for another node.
        let mut resent: HashSet<String> = HashSet::new();
        loop {
            if let Some(why) = fleet.stop_reason() {
                results.extend(queue.drain(..).map(|n| fleet.not_attempted(n, why)));
            }
            // As many commands as there are free places, sent together.
            let mut chunks: Vec<Vec<&'n Node>> = Vec::new();
            let mut free = places.saturating_sub(busy);
            while !queue.is_empty() && free > 0 {
                let take = free.min(IDS_PER_COMMAND).min(queue.len());
                chunks.push(queue.drain(..take).collect());
                free -= take;
            }
            let sent: Vec<_> = futures::stream::iter(chunks)
                .map(|chunk| async move {
                    let sent = self.send(fleet, &chunk, parameters).await;
                    (chunk, sent)
                })
                .buffered(CALLS_AT_ONCE)
                .collect()
                .await;
            for (chunk, sent) in sent {
                match sent {
                    Ok(id) => {
                        busy += chunk.len();
                        let waiting = chunk.iter().map(|n| (n.instance_id.clone(), *n)).collect();
                        in_flight.push(InFlight { id, waiting, running: HashMap::new(), sent_at: Instant::now(), cancelled: false });
                    }
                    // An instance left SSM between the check and the send (a
                    // scale-in, an agent stopped): SSM refuses the whole
                    // command for it. The others are checked again and go
                    // back to the front of the queue, once.
                    Err(NotSent { left: true, .. }) if chunk.iter().all(|n| !resent.contains(&n.instance_id)) => {
                        let owned: Vec<Node> = chunk.iter().map(|n| (*n).clone()).collect();
                        let mut gone = HashMap::new();
                        let still: HashSet<String> =
                            self.reachable(fleet, &owned, &mut gone).await.into_iter().map(|n| n.instance_id.clone()).collect();
                        fleet.progress.note(&format!(
                            "SSM refused a command naming an instance no longer managed: sending again to the {} of {} nodes still online",
                            still.len(),
                            chunk.len()
                        ));
                        for n in chunk.iter().rev() {
                            if still.contains(&n.instance_id) {
                                resent.insert(n.instance_id.clone());
                                queue.push_front(n);
                            } else if let Some(r) = gone.remove(&n.instance_id) {
                                results.push(r);
                            }
                        }
                    }
                    Err(NotSent { why, .. }) => results.extend(chunk.iter().map(|n| fleet.failed(n, why.clone()))),
                }
            }
            if in_flight.is_empty() && reads.is_empty() && queue.is_empty() {
                break;
            }
            // Wait for the next poll, taking output reads as they end.
            let wake = tokio::time::sleep(pause);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = &mut wake => break,
                    Some((node, outcome)) = reads.next(), if !reads.is_empty() => {
                        results.push(fleet.finish(node, outcome));
                        busy -= 1;
                    }
                }
            }
            let mut finished = false;
            let floor = MIN_POLL.max(Duration::from_secs_f64(in_flight.len() as f64 / POLLS_PER_SECOND));
            let rounds = futures::future::join_all(in_flight.iter_mut().map(|cmd| async {
                let id = cmd.id.clone();
                (id, self.poll(fleet, cmd).await)
            }))
            .await;
            let mut throttled = false;
            for (id, polled) in rounds {
                let done = match polled {
                    Ok(done) => done,
                    Err(e) => {
                        throttled |= e.is_throttled();
                        fleet.progress.note(&format!("warning: polling SSM command {id}: {}", e.message));
                        continue;
                    }
                };
                for (node, done) in done {
                    finished = true;
                    match done {
                        Done::Result(r) => {
                            results.push(*r);
                            busy -= 1;
                        }
                        Done::Read(since) => {
                            let id = id.clone();
                            reads.push(async move { (node, self.outcome(&id, &node.instance_id, since).await) });
                        }
                    }
                }
            }
            in_flight.retain(|c| !c.waiting.is_empty());
            pause = if throttled {
                (pause * 2).min(Duration::from_secs(10))
            } else if finished {
                floor
            } else {
                (pause * 3 / 2).clamp(floor, MAX_POLL.max(floor))
            };
        }
        results
    }

    /// Sends the agent to `chunk`, all at once; returns the command ID.
    /// A document from before the `manifest` parameter (a stack not yet
    /// updated) refuses it: the command goes again without it, and the
    /// nodes then trust a live copy of the release by its id, as before.
    async fn send(&self, fleet: &Fleet<'_>, chunk: &[&Node], parameters: &HashMap<String, Vec<String>>) -> Result<String, NotSent> {
        match self.send_with(fleet, chunk, parameters).await {
            Err(NotSent { refused_parameters: true, .. }) if parameters.contains_key("manifest") => {
                fleet.progress.note(&format!(
                    "SSM document {} takes no manifest parameter (a stack from before it): sent without; update the stack so that nodes check the release's digest",
                    self.document
                ));
                let mut older = parameters.clone();
                older.remove("manifest");
                self.send_with(fleet, chunk, &older).await
            }
            sent => sent,
        }
    }

    async fn send_with(&self, fleet: &Fleet<'_>, chunk: &[&Node], parameters: &HashMap<String, Vec<String>>) -> Result<String, NotSent> {
        let max_errors = match fleet.error_budget() {
            None => "100%".to_string(),
            Some(m) => m.saturating_sub(fleet.failures.load(std::sync::atomic::Ordering::SeqCst)).to_string(),
        };
        let request = self
            .client
            .send_command()
            .document_name(&self.document)
            // The latest version of fleetsync's own document, not its
            // default: a stack update (UpdateMethod: NewVersion) adds a
            // version and leaves the default where it was, so without this
            // an updated document would never run. AWS's own documents
            // are run at their default.
            .set_document_version((self.document != RUN_SHELL_SCRIPT).then(|| "$LATEST".to_string()))
            .set_instance_ids(Some(chunk.iter().map(|n| n.instance_id.clone()).collect()))
            .set_parameters(Some(parameters.clone()))
            .timeout_seconds(self.delivery_timeout.as_secs() as i32)
            .max_concurrency(chunk.len().to_string())
            .max_errors(max_errors)
            .comment(self.comment.chars().take(100).collect::<String>());
        let (in_flight, sent, n) = (self.sending.clone().read_owned().await, self.sent.clone(), chunk.len());
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let out = request.send().await?;
            let id = out.command().and_then(|c| c.command_id()).unwrap_or_default().to_string();
            sent.lock().unwrap_or_else(|p| p.into_inner()).push((id.clone(), n));
            Ok(id)
        });
        let sent = match task.await {
            Ok(sent) => sent,
            Err(e) => return Err(NotSent { why: format!("SSM SendCommand: {e}"), left: false, refused_parameters: false }),
        };
        match sent {
            Ok(id) => {
                fleet.progress.note(&format!("sent SSM command {id} to {} nodes", chunk.len()));
                Ok(id)
            }
            Err(e) => {
                let failure = ApiFailure::from_sdk(&e);
                let left = failure.code.as_deref() == Some("InvalidInstanceId");
                let why = match failure.code.as_deref() {
                    Some("InvalidDocument") => format!(
                        "SSM has no document {} in this account and region: deploy infra/aws/fleetsync.yaml for a new group or infra/aws/fleetsync-existing-group.yaml for yours (either creates fleetsync-agent-GROUP), name yours with --ssm-document, or use --ssm-document {RUN_SHELL_SCRIPT}",
                        self.document
                    ),
                    Some("InvalidParameters") => format!("SSM refused the document's parameters: {}", failure.message),
                    _ => format!("{:#}", api_error("SSM SendCommand", &failure, NEEDS)),
                };
                Err(NotSent { why, left, refused_parameters: failure.code.as_deref() == Some("InvalidParameters") })
            }
        }
    }

    /// One polling round of a command: the nodes that reached a final
    /// state, or why SSM could not be asked (already retried by the SDK;
    /// polling goes on until the command's time is up).
    async fn poll<'n>(&self, fleet: &Fleet<'_>, cmd: &mut InFlight<'n>) -> Result<Vec<(&'n Node, Done)>, ApiFailure> {
        let mut done = Vec::new();
        if fleet.lock_lost() && !cmd.cancelled {
            // Stop SSM from going on; nodes already running may be stopped
            // too, which the agent is built to survive.
            cmd.cancelled = true;
            fleet.progress.note(&format!("the fleet lock was lost; cancelling SSM command {}", cmd.id));
            self.cancel(&cmd.id, fleet.progress).await;
        }
        // An instance that left the group (a scale-in) may never answer:
        // its invocation can show InProgress until the command expires.
        let left: Vec<(String, String)> = cmd.waiting.keys().filter_map(|id| fleet.leaving.why(id).map(|why| (id.clone(), why))).collect();
        for (id, why) in left {
            let node = cmd.waiting.remove(&id).expect("listed from waiting");
            let why = format!("{id} {why} during the deploy; its SSM command {} is no longer waited for", cmd.id);
            done.push((node, Done::Result(Box::new(fleet.left(node, why)))));
        }
        // SSM gives up after the delivery and execution timeouts; a minute
        // more covers its own lag before the bastion stops waiting.
        let limit = self.delivery_timeout + self.timeout + Duration::from_secs(60);
        if cmd.sent_at.elapsed() > limit {
            let why = format!("SSM gave no final status for command {} within {} s", cmd.id, limit.as_secs());
            for (_, node) in cmd.waiting.drain() {
                done.push((node, Done::Result(Box::new(fleet.failed(node, why.clone())))));
            }
            return Ok(done);
        }
        let invocations = match self.invocations(&cmd.id, true).await {
            Ok(invocations) => invocations,
            // Expired or refused credentials do not come back by waiting
            // for the command's timeouts (half an hour by default): its
            // nodes fail now, with the reason.
            Err(e) if hopeless(&e) => {
                let why = format!(
                    "{:#}; SSM command {} may still run on the node (see the SSM console)",
                    api_error("SSM ListCommandInvocations", &e, NEEDS),
                    cmd.id
                );
                for (_, node) in cmd.waiting.drain() {
                    done.push((node, Done::Result(Box::new(fleet.failed(node, why.clone())))));
                }
                return Ok(done);
            }
            Err(e) => return Err(e),
        };
        for inv in invocations {
            let (Some(id), Some(status)) = (inv.instance_id(), inv.status()) else { continue };
            let Some(node) = cmd.waiting.get(id).copied() else { continue };
            match status {
                CommandInvocationStatus::Pending | CommandInvocationStatus::Delayed => {}
                CommandInvocationStatus::InProgress | CommandInvocationStatus::Cancelling => {
                    if !cmd.running.contains_key(id) {
                        cmd.running.insert(id.to_string(), Instant::now());
                        fleet.progress.started(node, &fleet.address_of(node));
                    }
                }
                CommandInvocationStatus::Cancelled if !cmd.running.contains_key(id) => {
                    cmd.waiting.remove(id);
                    let why = fleet.stop_reason().unwrap_or("SSM cancelled the command before it started (--max-errors)");
                    done.push((node, Done::Result(Box::new(fleet.not_attempted(node, why)))));
                }
                _ => {
                    cmd.waiting.remove(id);
                    let since = cmd.running.get(id).copied().unwrap_or(cmd.sent_at);
                    match self.outcome_from_list(&inv, since) {
                        Some(outcome) => done.push((node, Done::Result(Box::new(fleet.finish(node, outcome))))),
                        None => done.push((node, Done::Read(since))),
                    }
                }
            }
        }
        Ok(done)
    }

    /// Cancels every command sent (the deploy was interrupted).
    /// Waits for the SendCommands in flight first: SSM may have accepted
    /// them, and their commands would run on with nobody to cancel them.
    pub async fn cancel_all(&self, progress: &Progress) {
        if self.sending.try_write().is_err() {
            progress.note("waiting for the SendCommands in flight to answer, to cancel their commands too");
        }
        if tokio::time::timeout(SEND_PATIENCE, self.sending.write()).await.is_err() {
            progress.note(&format!(
                "warning: a SendCommand still unanswered after {} s may run on: look for commands \"{}\" in the SSM console",
                SEND_PATIENCE.as_secs(),
                self.comment
            ));
        }
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        futures::future::join_all(sent.iter().map(|(id, _)| self.cancel(id, progress))).await;
        // Cancelling is asynchronous in SSM (`Cancelling`, with no promise
        // that the process stops): wait, a while, for every invocation to
        // end, so that the lock is not released under a node still
        // running, and name those that did not. A command counts as ended
        // once its list shows all its instances final (a failed call, or a
        // list SSM has not filled yet, is not an answer), and is not asked
        // again.
        let started = Instant::now();
        let mut pending: Vec<(String, usize, Vec<String>)> = sent.into_iter().map(|(id, n)| (id, n, Vec::new())).collect();
        loop {
            pending = futures::stream::iter(pending)
                .map(|(id, n, running)| async move {
                    match self.invocations(&id, false).await {
                        Ok(invs) if invs.iter().filter(|inv| is_final(inv.status())).count() >= n => None,
                        Ok(invs) => {
                            let running =
                                invs.iter().filter(|inv| !is_final(inv.status())).filter_map(|inv| inv.instance_id()).map(str::to_string);
                            Some((id, n, running.collect()))
                        }
                        Err(_) => Some((id, n, running)),
                    }
                })
                .buffer_unordered(CALLS_AT_ONCE)
                .filter_map(|still| async move { still })
                .collect()
                .await;
            if pending.is_empty() {
                return;
            }
            if started.elapsed() > CANCEL_PATIENCE {
                let named: Vec<String> = pending
                    .iter()
                    .map(|(id, _, running)| if running.is_empty() { id.clone() } else { format!("{id} ({})", running.join(", ")) })
                    .collect();
                progress.note(&format!(
                    "warning: SSM had not ended the cancelled commands {} after {} s: an agent there may still switch a release",
                    named.join(", "),
                    CANCEL_PATIENCE.as_secs()
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn cancel(&self, command_id: &str, progress: &Progress) {
        if let Err(e) = self.client.cancel_command().command_id(command_id).send().await {
            progress.note(&format!("warning: CancelCommand {command_id} failed: {}", ApiFailure::from_sdk(&e).message));
        }
    }

    /// Every invocation of the command, with the plugin output when
    /// `details` (absent ones are not visible yet).
    async fn invocations(&self, command_id: &str, details: bool) -> Result<Vec<CommandInvocation>, ApiFailure> {
        let mut out = Vec::new();
        let mut pages =
            self.client.list_command_invocations().command_id(command_id).details(details).max_results(50).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| ApiFailure::from_sdk(&e))?;
            out.extend(page.command_invocations().iter().cloned());
        }
        Ok(out)
    }

    /// The node's outcome from the list's plugin output, when that holds
    /// all of the agent's stdout and a report in it; `None` sends the node
    /// to GetCommandInvocation.
    fn outcome_from_list(&self, inv: &CommandInvocation, since: Instant) -> Option<Outcome> {
        let plugin = inv.command_plugins().first()?;
        let output = plugin.output()?;
        let (stdout, stderr) = output.split_once(OUTPUT_ERROR_TITLE).unwrap_or((output, ""));
        let report = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
        if stdout.ends_with(OUTPUT_TRUNCATED) || serde_json::from_str::<serde_json::Value>(report).is_err() {
            return None;
        }
        let stderr = stderr.strip_suffix(ERROR_TRUNCATED).unwrap_or(stderr);
        Some(self.shape(inv.status(), inv.status_details().unwrap_or_default(), plugin.response_code(), stdout, stderr, since))
    }

    /// What the node's command gave, from GetCommandInvocation: the first
    /// 24,000 characters of stdout and 8,000 of stderr, and the exit status.
    /// Retried while the invocation is not visible yet or still lags the
    /// list's final status (SSM is eventually consistent there).
    async fn outcome(&self, command_id: &str, instance_id: &str, since: Instant) -> Outcome {
        let started = Instant::now();
        loop {
            let why = match self.client.get_command_invocation().command_id(command_id).instance_id(instance_id).send().await {
                Ok(out) if is_final(out.status()) => {
                    let (stdout, stderr) =
                        (out.standard_output_content().unwrap_or_default(), out.standard_error_content().unwrap_or_default());
                    return self.shape(out.status(), out.status_details().unwrap_or_default(), out.response_code(), stdout, stderr, since);
                }
                Ok(out) => format!("SSM still showed it {:?}", out.status().map(|s| s.as_str())),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_invocation_does_not_exist()) => "SSM did not show it yet".into(),
                Err(e) => {
                    let failure = ApiFailure::from_sdk(&e);
                    let why = format!("{:#}", api_error("SSM GetCommandInvocation", &failure, NEEDS));
                    if hopeless(&failure) {
                        return Outcome { unreached: Some(why), elapsed: since.elapsed(), ..Outcome::default() };
                    }
                    // Still throttled or failing after the SDK's retries: the
                    // node finished, so its output is worth asking for again.
                    why
                }
            };
            if started.elapsed() > OUTPUT_PATIENCE {
                let why = format!("the node finished but its output could not be read within {} s ({why})", OUTPUT_PATIENCE.as_secs());
                return Outcome { unreached: Some(why), elapsed: since.elapsed(), ..Outcome::default() };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An outcome from SSM's view of a finished invocation: what the agent
    /// printed (without the SSM agent's own "failed to run commands" line),
    /// its exit status, and why SSM did not run it to its end, if so.
    fn shape(
        &self,
        status: Option<&CommandInvocationStatus>,
        details: &str,
        code: i32,
        stdout: &str,
        stderr: &str,
        since: Instant,
    ) -> Outcome {
        let stderr = without_ssm_suffix(stderr);
        let reason = last_line(stderr);
        let unreached = match (status, details) {
            (Some(CommandInvocationStatus::TimedOut), "DeliveryTimedOut") => Some(format!(
                "SSM never ran the command on the node before it expired ({} s to deliver + {} s to run): the node's SSM agent is not answering",
                self.delivery_timeout.as_secs(),
                self.timeout.as_secs()
            )),
            // SSM's agent reports a command it stopped as 137, as the OOM
            // killer's victim is: a "timeout" well before --timeout is not
            // ours.
            (Some(CommandInvocationStatus::TimedOut), _) if since.elapsed() < self.timeout.mul_f64(0.9) => {
                Some(crate::collect::killed(since.elapsed(), (code >= 0).then_some(code), reason))
            }
            (Some(CommandInvocationStatus::TimedOut), _) => {
                Some(format!("the agent did not finish within {} s (--timeout): {reason}", self.timeout.as_secs()))
            }
            (Some(CommandInvocationStatus::Cancelled), _) => Some(format!("SSM cancelled the command while it ran: {reason}")),
            (Some(CommandInvocationStatus::Failed), "Undeliverable") => {
                Some("SSM could not deliver the command: the instance is stopped, terminated or not responding".into())
            }
            (Some(CommandInvocationStatus::Failed), "InvalidPlatform") => {
                Some("the instance's platform does not match the document (fleetsync runs on Linux)".into())
            }
            (Some(CommandInvocationStatus::Failed), "AccessDenied") => {
                Some("the deploy role may not send the document to this instance (check its tags and ssm:SendCommand's conditions)".into())
            }
            (Some(CommandInvocationStatus::Failed), "Failed") | (Some(CommandInvocationStatus::Success), _) => None,
            (status, details) => Some(format!("SSM ended the command as {:?}/{details}: {reason}", status.map(|s| s.as_str()))),
        };
        Outcome {
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            exit_code: (code >= 0).then_some(code),
            elapsed: since.elapsed(),
            unreached,
        }
    }
}

/// A node whose command reached a final state: its result, or its output to
/// read first (the list did not carry it whole).
enum Done {
    /// Boxed: results are few per round and the other variant is tiny.
    Result(Box<NodeResult>),
    Read(Instant),
}

fn is_final(status: Option<&CommandInvocationStatus>) -> bool {
    matches!(
        status,
        Some(
            CommandInvocationStatus::Success
                | CommandInvocationStatus::Failed
                | CommandInvocationStatus::TimedOut
                | CommandInvocationStatus::Cancelled
        )
    )
}

/// stderr without the SSM agent's `failed to run commands: exit status N`
/// (appended with no newline of its own).
fn without_ssm_suffix(stderr: &str) -> &str {
    match stderr.rfind(SSM_EXIT_SUFFIX) {
        Some(at) if stderr[at + SSM_EXIT_SUFFIX.len()..].trim().parse::<i64>().is_ok() => &stderr[..at],
        _ => stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssm_agents_exit_line_is_not_the_nodes_reason() {
        assert_eq!(without_ssm_suffix("fleetsync-agent: boom\nfailed to run commands: exit status 2"), "fleetsync-agent: boom\n");
        assert_eq!(without_ssm_suffix("failed to run commands: exit status 1"), "");
        assert_eq!(without_ssm_suffix("a failed to run commands: exit status x"), "a failed to run commands: exit status x");
        assert_eq!(last_line(without_ssm_suffix("line one\nthe reason\nfailed to run commands: exit status 1")), "the reason");
    }
}
