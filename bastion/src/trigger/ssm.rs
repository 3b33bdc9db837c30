//! The SSM Run Command transport: SSM does the fan-out to the instances
//! and the rate control (MaxConcurrency, MaxErrors); the bastion sends
//! commands and polls for their results.
//!
//! - Only instances whose SSM agent is online are sent anything
//!   (DescribeInstanceInformation): one node without the agent must not
//!   fail the SendCommand of 49 others, and its error can say what is wrong.
//! - SendCommand takes at most 50 instance IDs, so a fleet is sent as
//!   chunks of 50. `--batch` is one budget across all chunks: a chunk takes
//!   `min(len, batch)` permits of a semaphore before it is sent and passes
//!   that number as MaxConcurrency, so at most `batch` nodes run at once
//!   and a batch covering the fleet sends every chunk at once.
//! - `--max-errors` becomes each chunk's MaxErrors: what is left of the
//!   budget when the chunk is sent (SSM counts per command). No limit is
//!   `100%`, since SSM's default (0) would stop at the first failure.
//! - Polling is one ListCommandInvocations per chunk per round, with
//!   backoff; a node's output is read once, with GetCommandInvocation, when
//!   it reaches a final state. InvocationDoesNotExist right after
//!   SendCommand is normal and retried.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter, PingStatus};
use fleetsync::source::ApiFailure;
use futures::StreamExt as _;
use tokio::sync::Semaphore;

use super::{last_line, Fleet, Outcome};
use crate::api::api_error;
use crate::collect::NodeResult;
use crate::discover::Node;
use crate::progress::Progress;

/// SendCommand's limit on InstanceIds per call.
const IDS_PER_COMMAND: usize = 50;
/// How long SSM may take to hand a command to an instance's agent before it
/// gives up on it (SendCommand's TimeoutSeconds; its default is an hour).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);
/// Polling starts fast (small fleets finish in seconds) and backs off to
/// this: one ListCommandInvocations per command of 50 nodes a second keeps
/// even a thousand-node deploy (20 commands) within SSM's API rates.
const MAX_POLL: Duration = Duration::from_secs(1);
/// GetCommandInvocation calls in flight when many nodes finish at once.
const OUTPUTS_AT_ONCE: usize = 8;
/// The permissions the SSM path uses, named in its errors.
const NEEDS: &str = "ssm:SendCommand on AWS-RunShellScript and the instances, ssm:ListCommandInvocations, \
                     ssm:GetCommandInvocation, ssm:CancelCommand and ssm:DescribeInstanceInformation";

/// How to run the agent through SSM.
pub struct Ssm {
    pub client: aws_sdk_ssm::Client,
    /// AWS-RunShellScript's executionTimeout: SSM stops the agent after this.
    pub timeout: Duration,
    /// Shown in the SSM console and in ListCommands, to tell deploys apart.
    pub comment: String,
    /// Commands sent so far, to cancel them if the deploy is interrupted. A
    /// std Mutex: held only to push or copy, never across an await.
    pub sent: std::sync::Mutex<Vec<String>>,
}

impl Ssm {
    /// Runs the agent on `nodes`; one result per node, in their order.
    pub(super) async fn run(&self, fleet: &Fleet<'_>, nodes: &[Node]) -> Vec<NodeResult> {
        let mut results: HashMap<String, NodeResult> = HashMap::new();
        let online = match self.online(nodes).await {
            Ok(online) => online,
            Err(e) => {
                let why = format!("{e:#}");
                return nodes.iter().map(|n| fleet.failed(n, why.clone())).collect();
            }
        };
        let mut managed = Vec::new();
        for n in nodes {
            match online.get(&n.instance_id) {
                Some(None) => managed.push(n),
                Some(Some(ping)) => {
                    let why =
                        format!("the SSM agent on {} is not online (ping status {ping}); check the instance and its agent", n.instance_id);
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
        let batch = fleet.batch_size(managed.len());
        let permits = Semaphore::new(batch);
        let chunks = managed.chunks(IDS_PER_COMMAND).map(|chunk| self.run_chunk(fleet, chunk, &permits, batch));
        for r in futures::future::join_all(chunks).await.into_iter().flatten() {
            results.insert(r.instance_id.clone(), r);
        }
        nodes.iter().filter_map(|n| results.remove(&n.instance_id)).collect()
    }

    /// Which of `nodes` SSM manages: `None` for an online agent, the ping
    /// status otherwise; absent when SSM does not know the instance.
    async fn online(&self, nodes: &[Node]) -> anyhow::Result<HashMap<String, Option<String>>> {
        let mut found = HashMap::new();
        for chunk in nodes.chunks(IDS_PER_COMMAND) {
            let filter = InstanceInformationStringFilter::builder()
                .key("InstanceIds")
                .set_values(Some(chunk.iter().map(|n| n.instance_id.clone()).collect()))
                .build()?;
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
        }
        Ok(found)
    }

    /// Sends one command to up to 50 nodes and waits for all of them.
    async fn run_chunk(&self, fleet: &Fleet<'_>, chunk: &[&Node], permits: &Semaphore, batch: usize) -> Vec<NodeResult> {
        let concurrency = chunk.len().min(batch);
        let _permits = permits.acquire_many(concurrency as u32).await.expect("the semaphore is never closed");
        if let Some(why) = fleet.stop_reason() {
            return chunk.iter().map(|n| fleet.not_attempted(n, why)).collect();
        }
        let max_errors = match fleet.error_budget() {
            None => "100%".to_string(),
            Some(m) => m.saturating_sub(fleet.failures.load(std::sync::atomic::Ordering::SeqCst)).to_string(),
        };
        let sent = self
            .client
            .send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(chunk.iter().map(|n| n.instance_id.clone()).collect()))
            .parameters("commands", vec![fleet.call.command_line()])
            .parameters("executionTimeout", vec![self.timeout.as_secs().max(1).to_string()])
            .timeout_seconds(DELIVERY_TIMEOUT.as_secs() as i32)
            .max_concurrency(concurrency.to_string())
            .max_errors(max_errors)
            .comment(self.comment.chars().take(100).collect::<String>())
            .send()
            .await;
        let command_id = match sent {
            Ok(out) => out.command().and_then(|c| c.command_id()).unwrap_or_default().to_string(),
            Err(e) => {
                let why = format!("{:#}", api_error("SSM SendCommand", &ApiFailure::from_sdk(&e), NEEDS));
                return chunk.iter().map(|n| fleet.failed(n, why.clone())).collect();
            }
        };
        fleet.progress.note(&format!("sent SSM command {command_id} to {} nodes", chunk.len()));
        self.wait(fleet, &command_id, chunk).await
    }

    /// Polls the command until every node of the chunk has a result.
    async fn wait(&self, fleet: &Fleet<'_>, command_id: &str, chunk: &[&Node]) -> Vec<NodeResult> {
        let started_at = Instant::now();
        // SSM itself gives up after delivery + execution timeouts; a minute
        // more covers its own lag before the bastion stops waiting.
        let deadline = started_at + DELIVERY_TIMEOUT + self.timeout + Duration::from_secs(60);
        let mut waiting: HashMap<&str, &Node> = chunk.iter().map(|n| (n.instance_id.as_str(), *n)).collect();
        let mut running: HashMap<String, Instant> = HashMap::new();
        let mut results = Vec::new();
        let mut pause = Duration::from_millis(100);
        let mut cancelled = false;
        let mut last_error = None;
        while !waiting.is_empty() {
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(MAX_POLL);
            if fleet.lock_lost() && !cancelled {
                // Stop SSM from starting the rest; nodes already running may
                // be stopped too, which the agent is built to survive.
                cancelled = true;
                fleet.progress.note(&format!("the fleet lock was lost; cancelling SSM command {command_id}"));
                if let Err(e) = self.client.cancel_command().command_id(command_id).send().await {
                    fleet.progress.note(&format!("warning: CancelCommand {command_id} failed: {}", ApiFailure::from_sdk(&e).message));
                }
            }
            if Instant::now() > deadline {
                let why =
                    format!("SSM gave no final status for command {command_id} within {} s", deadline.duration_since(started_at).as_secs());
                results.extend(waiting.drain().map(|(_, n)| fleet.failed(n, why.clone())));
                break;
            }
            let states = match self.statuses(command_id).await {
                Ok(s) => s,
                Err(e) => {
                    // The SDK already retried; keep polling until the deadline.
                    last_error = Some(e);
                    continue;
                }
            };
            let mut done = Vec::new();
            for (id, status) in states {
                let Some(node) = waiting.get(id.as_str()).copied() else {
                    continue;
                };
                match status {
                    CommandInvocationStatus::Pending | CommandInvocationStatus::Delayed => {}
                    CommandInvocationStatus::InProgress | CommandInvocationStatus::Cancelling => {
                        if !running.contains_key(&id) {
                            running.insert(id.clone(), Instant::now());
                            fleet.progress.started(node, &fleet.address_of(node));
                        }
                    }
                    CommandInvocationStatus::Cancelled if !running.contains_key(&id) => {
                        let why = fleet.stop_reason().unwrap_or("SSM cancelled the command before it started (--max-errors)");
                        results.push(fleet.not_attempted(node, why));
                        waiting.remove(id.as_str());
                    }
                    _ => {
                        waiting.remove(id.as_str());
                        done.push((node, running.get(&id).copied().unwrap_or(started_at)));
                    }
                }
            }
            // Outputs of the nodes that finished in this round, a few at a
            // time: one slow answer must not hold up the others.
            let outputs: Vec<_> = futures::stream::iter(done)
                .map(|(node, since)| async move { (node, self.outcome(command_id, &node.instance_id, since).await) })
                .buffer_unordered(OUTPUTS_AT_ONCE)
                .collect()
                .await;
            results.extend(outputs.into_iter().map(|(node, outcome)| fleet.finish(node, outcome)));
        }
        if let Some(e) = last_error.filter(|_| results.is_empty()) {
            fleet.progress.note(&format!("warning: polling SSM command {command_id}: {e:#}"));
        }
        results
    }

    /// Cancels every command sent (the deploy was interrupted).
    pub async fn cancel_all(&self, progress: &Progress) {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for id in sent {
            self.cancel(&id, progress).await;
        }
    }

    async fn cancel(&self, command_id: &str, progress: &Progress) {
        if let Err(e) = self.client.cancel_command().command_id(command_id).send().await {
            progress.note(&format!("warning: CancelCommand {command_id} failed: {}", ApiFailure::from_sdk(&e).message));
        }
    }

    /// Every invocation of the command and its status (absent ones are not
    /// visible yet).
    async fn statuses(&self, command_id: &str) -> anyhow::Result<Vec<(String, CommandInvocationStatus)>> {
        let mut out = Vec::new();
        let mut pages = self.client.list_command_invocations().command_id(command_id).max_results(50).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("SSM ListCommandInvocations", &ApiFailure::from_sdk(&e), NEEDS))?;
            for inv in page.command_invocations() {
                if let (Some(id), Some(status)) = (inv.instance_id(), inv.status()) {
                    out.push((id.to_string(), status.clone()));
                }
            }
        }
        Ok(out)
    }

    /// What the node's command gave: output (the first 24,000 characters of
    /// stdout, which the agent's report is built to fit) and exit status.
    async fn outcome(&self, command_id: &str, instance_id: &str, since: Instant) -> Outcome {
        let mut tries = 0;
        let out = loop {
            match self.client.get_command_invocation().command_id(command_id).instance_id(instance_id).send().await {
                Ok(out) => break out,
                Err(e) if tries < 20 && e.as_service_error().is_some_and(|s| s.is_invocation_does_not_exist()) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    let why = format!("{:#}", api_error("SSM GetCommandInvocation", &ApiFailure::from_sdk(&e), NEEDS));
                    return Outcome { unreached: Some(why), elapsed: since.elapsed(), ..Outcome::default() };
                }
            }
        };
        let stderr = out.standard_error_content().unwrap_or_default().to_string();
        let details = out.status_details().unwrap_or_default();
        let unreached = match out.status() {
            Some(CommandInvocationStatus::TimedOut) => Some(format!(
                "the agent did not finish within {} s (--timeout; SSM status {details}): {}",
                self.timeout.as_secs(),
                last_line(&stderr)
            )),
            Some(CommandInvocationStatus::Cancelled) => Some(format!("SSM cancelled the command while it ran: {}", last_line(&stderr))),
            Some(CommandInvocationStatus::Failed) if details != "Failed" => {
                Some(format!("SSM could not run the command ({details}): {}", last_line(&stderr)))
            }
            _ => None,
        };
        Outcome {
            stdout: out.standard_output_content().unwrap_or_default().to_string(),
            exit_code: Some(out.response_code()),
            stderr,
            elapsed: since.elapsed(),
            unreached,
        }
    }
}
