//! TRIGGER: starts the agent on every node and waits for it, over SSM Run
//! Command (`ssm.rs`) or SSH (`ssh.rs`).
//!
//! This module owns what both transports share: the command the agent is
//! given, what a node's run gave back, and the rules for starting nodes:
//! `--batch` bounds how many run at once, `--max-errors` stops starting
//! new ones, and a lost fleet lock stops everything not yet started.

mod ssh;
mod ssm;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use fleetsync::fleet_lock::HeldLock;

pub use ssh::Ssh;
pub use ssm::Ssm;

use crate::collect::{self, NodeResult, NodeStatus};
use crate::discover::Node;
use crate::progress::Progress;
use crate::values::Limit;

/// What the agent on a node is asked to do: `fleetsync-agent WORDS...`.
#[derive(Debug, Clone)]
pub struct AgentCall {
    /// The agent's arguments (subcommand first); `--json` is added.
    words: Vec<String>,
    /// What the agent prints on stdout for it.
    pub expects: Expect,
}

/// The JSON an agent command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A pull report (`pull`, `rollback`).
    Pull,
    /// A release status (`status`).
    Status,
}

impl AgentCall {
    pub fn new(expects: Expect, words: Vec<String>) -> AgentCall {
        AgentCall { words, expects }
    }

    /// The command line sent to the node's shell (SSH's remote command,
    /// SSM's script). Every argument is quoted, so no string the user typed
    /// can become a second command.
    pub fn command_line(&self) -> String {
        let words = std::iter::once("fleetsync-agent").chain(self.words.iter().map(String::as_str)).chain(["--json"]);
        shlex::try_join(words).expect("arguments contain no NUL (clap refuses them)")
    }
}

/// What running the agent on one node gave.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    /// The remote command's exit status, when it ran to an end.
    pub exit_code: Option<i32>,
    pub elapsed: Duration,
    /// Why the transport could not run the command to its end (ssh could
    /// not connect, SSM timed it out); `None` when the command ran.
    pub unreached: Option<String>,
}

/// `--via`: which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// SSM Run Command: no inbound port, scales to thousands of instances.
    Ssm,
    /// The system OpenSSH client.
    Ssh,
}

/// How the bastion reaches nodes.
pub enum Transport {
    Ssm(Ssm),
    Ssh(Ssh),
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Ssm(_) => "ssm",
            Transport::Ssh(_) => "ssh",
        }
    }

    /// Stops what was started, when the deploy is interrupted. SSH sessions
    /// end when their `ssh` is killed (dropping the deploy does that); SSM
    /// commands run on until cancelled.
    pub async fn cancel(&self, progress: &Progress) {
        if let Transport::Ssm(ssm) = self {
            ssm.cancel_all(progress).await;
        }
    }
}

/// Runs the agent on sets of nodes (the fleet pass, then instances that
/// joined), sharing one error count and one lock across the passes.
pub struct Fleet<'a> {
    pub transport: Transport,
    pub call: AgentCall,
    /// The fleet lock, for the commands that take it (not `status`).
    pub held: Option<&'a HeldLock>,
    pub address: AddressChoice,
    /// Resolved against the size of the fleet pass.
    pub batch: Option<Limit>,
    pub max_errors: Option<Limit>,
    /// The size `N%` limits are shares of: the targets found by discovery.
    pub fleet_size: usize,
    pub progress: &'a Progress,
    /// Nodes failed so far, across passes; atomic because SSH nodes finish
    /// on many tasks at once.
    pub failures: AtomicUsize,
}

impl Fleet<'_> {
    /// Runs the agent on `nodes`; one result per node, in their order.
    pub async fn run(&self, nodes: &[Node]) -> Vec<NodeResult> {
        match &self.transport {
            Transport::Ssh(ssh) => ssh::run(ssh, self, nodes).await,
            Transport::Ssm(ssm) => ssm.run(self, nodes).await,
        }
    }

    /// How many nodes may run at once (at least one).
    pub fn batch_size(&self, nodes: usize) -> usize {
        self.batch.map_or(nodes, |b| b.of(self.fleet_size)).max(1)
    }

    /// Failures allowed before no more nodes are started; `None` is no limit.
    pub fn error_budget(&self) -> Option<usize> {
        self.max_errors.map(|m| m.of(self.fleet_size))
    }

    /// The fleet lock was broken or taken over during the run.
    pub fn lock_lost(&self) -> bool {
        self.held.is_some_and(HeldLock::lost)
    }

    /// Why no further node may start now, if so.
    pub fn stop_reason(&self) -> Option<&'static str> {
        if self.lock_lost() {
            Some("the fleet lock was lost; no new nodes are started")
        } else if self.error_budget().is_some_and(|m| self.failures.load(SeqCst) > m) {
            Some("--max-errors was reached")
        } else {
            None
        }
    }

    /// The node's address by `--address` ("-" when it has none).
    pub fn address_of(&self, node: &Node) -> String {
        address(node, self.address).unwrap_or_else(|| "-".into())
    }

    /// Turns what a node's run gave into its result, counts a failure, and
    /// shows it.
    pub fn finish(&self, node: &Node, outcome: Outcome) -> NodeResult {
        let result = collect::collect(&node.instance_id, &self.address_of(node), outcome, self.call.expects);
        self.record(result)
    }

    /// A node that was never started.
    pub fn not_attempted(&self, node: &Node, why: &str) -> NodeResult {
        self.record(self.unrun(node, NodeStatus::NotAttempted, why.to_string()))
    }

    /// A node that failed before its agent could be asked anything.
    pub fn failed(&self, node: &Node, why: String) -> NodeResult {
        self.record(self.unrun(node, NodeStatus::Failed, why))
    }

    /// The result of a node whose agent never ran.
    fn unrun(&self, node: &Node, status: NodeStatus, why: String) -> NodeResult {
        NodeResult {
            instance_id: node.instance_id.clone(),
            address: self.address_of(node),
            status,
            error: Some(why),
            duration_ms: 0,
            agent: None,
            release_status: None,
        }
    }

    fn record(&self, result: NodeResult) -> NodeResult {
        if result.status == NodeStatus::Failed {
            self.failures.fetch_add(1, SeqCst);
        }
        self.progress.finished(&result);
        result
    }
}

/// The last non-empty line of a command's stderr: where ssh, SSM and the
/// agent put their one-line reason.
pub fn last_line(s: &str) -> &str {
    s.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
}

/// The address to reach `node` at, by the user's choice.
pub fn address(node: &Node, choice: AddressChoice) -> Option<String> {
    match choice {
        AddressChoice::PrivateIp => node.private_ip.clone(),
        AddressChoice::PublicIp => node.public_ip.clone(),
        AddressChoice::PrivateDns => node.private_dns.clone(),
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressChoice {
    PrivateIp,
    PublicIp,
    PrivateDns,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_arguments_stay_one_word_each() {
        let hostile = ["s3://b/a b'; rm -rf / #", "/srv/$(reboot)/`id`\nx", "/var/lib/fs \"q\""];
        let call =
            AgentCall::new(Expect::Pull, ["pull", hostile[0], "--dest", hostile[1], "--state-dir", hostile[2]].map(String::from).to_vec());
        let words = shlex::split(&call.command_line()).unwrap();
        assert_eq!(words, ["fleetsync-agent", "pull", hostile[0], "--dest", hostile[1], "--state-dir", hostile[2], "--json"]);
    }
}
