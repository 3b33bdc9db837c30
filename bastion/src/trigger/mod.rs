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

use fleetsync::fleet_lock::HeldLock;

pub use ssh::Ssh;
pub use ssm::{Ssm, DELIVERY_TIMEOUT_RANGE, MAX_EXECUTION_TIMEOUT, RUN_SHELL_SCRIPT};

use crate::collect::{self, Expect, NodeResult, NodeStatus, Outcome};
use crate::discover::Node;
use crate::progress::Progress;
use crate::values::Limit;

/// What the agent on a node is asked to do. Kept as named values, not as
/// a command line, because SSM's fleetsync document takes them as typed
/// parameters while SSH (and AWS-RunShellScript) take a quoted command line.
#[derive(Debug, Clone, Default)]
pub struct AgentCall {
    pub action: Action,
    /// `pull`: the source (else the node's agent.toml).
    pub source: Option<String>,
    pub dest: Option<String>,
    pub state_dir: Option<String>,
    /// `pull --releases`.
    pub releases: bool,
    /// `pull --release-id`, or `rollback --to`.
    pub release: Option<String>,
    /// The release's manifest digest as the deploy read it, so that a
    /// node's copy of another publish of that id is found: passed in the
    /// agent's environment (`FLEETSYNC_MANIFEST_DIGEST`), never as a flag.
    pub manifest: Option<fleetsync::store::Digest>,
    /// `--group`: the group whose deployed release the node follows.
    pub group: Option<String>,
    pub keep: Option<usize>,
    pub after_switch: Option<String>,
    /// `pull --health-url`: the node asks its release for it after the switch.
    pub health_url: Option<String>,
    pub health_timeout: Option<std::time::Duration>,
    pub rollback_on_failure: bool,
    pub allow_empty: bool,
    /// `pull --dry-run`: the plan, nothing changed (`fleetsync doctor`).
    pub dry_run: bool,
    /// SSH only: the agent stops when its stdin closes (the bastion holds
    /// it open), so a killed ssh session does not leave it running.
    pub exit_with_stdin: bool,
}

/// The agent subcommand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Action {
    #[default]
    Pull,
    Rollback,
    Status,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Rollback => "rollback",
            Action::Status => "status",
        }
    }
}

impl AgentCall {
    pub fn new(action: Action) -> AgentCall {
        AgentCall { action, ..AgentCall::default() }
    }

    /// What the agent prints on stdout for this call.
    pub fn expects(&self) -> Expect {
        match self.action {
            Action::Status => Expect::Status,
            Action::Pull | Action::Rollback => Expect::Pull,
        }
    }

    /// The agent's arguments, subcommand first, `--json` last.
    pub fn words(&self) -> Vec<String> {
        let mut w = vec![self.action.as_str().to_string()];
        let mut flag = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                w.extend([name.to_string(), v.clone()]);
            }
        };
        flag("--dest", &self.dest);
        flag("--state-dir", &self.state_dir);
        flag("--group", &self.group);
        flag(if self.action == Action::Rollback { "--to" } else { "--release-id" }, &self.release);
        flag("--keep", &self.keep.map(|k| k.to_string()));
        flag("--after-switch", &self.after_switch);
        flag("--health-url", &self.health_url);
        flag("--health-timeout", &self.health_timeout.map(|t| format!("{}s", t.as_secs())));
        if let Some(s) = &self.source {
            w.insert(1, s.clone());
        }
        let switches = [
            (self.releases, "--releases"),
            (self.rollback_on_failure, "--rollback-on-failure"),
            (self.allow_empty, "--allow-empty"),
            (self.dry_run, "--dry-run"),
            (self.exit_with_stdin, "--exit-with-stdin"),
        ];
        w.extend(switches.iter().filter(|(on, _)| *on).map(|(_, f)| f.to_string()));
        w.push("--json".into());
        w
    }

    /// The command line sent to the node's shell (SSH's remote command,
    /// AWS-RunShellScript's script). Every argument is quoted, so no string
    /// the user typed can become a second command.
    ///
    /// The manifest digest goes in the environment
    /// (`FLEETSYNC_MANIFEST_DIGEST=... fleetsync-agent ...`): an agent that
    /// predates it ignores it, where an unknown flag would fail the pull.
    pub fn command_line(&self) -> String {
        let words = std::iter::once("fleetsync-agent".to_string()).chain(self.words());
        let line =
            shlex::try_join(words.collect::<Vec<_>>().iter().map(String::as_str)).expect("arguments contain no NUL (clap refuses them)");
        // Unquoted, or the shell would take it for a command's name: hex
        // digits need no quoting.
        match self.manifest {
            Some(d) => format!("FLEETSYNC_MANIFEST_DIGEST={d} {line}"),
            None => line,
        }
    }
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

    /// Whether `call` can be sent this way at all (SSM's fleetsync document
    /// takes checked values only): a configuration error before anything
    /// is discovered, locked or sent.
    pub fn check(&self, call: &AgentCall) -> fleetsync::Result<()> {
        match self {
            Transport::Ssm(ssm) => ssm.parameters(call).map(drop).map_err(fleetsync::Error::Config),
            Transport::Ssh(_) => Ok(()),
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
    /// Instances that left the group during the deploy: the transport
    /// stops waiting for them (empty unless a deploy watches its group).
    pub leaving: crate::discover::Leaving,
    /// Set once a watched alarm is in ALARM (`--alarm`): no further node
    /// starts. `None` when no alarm is watched, and for the switch back of
    /// a failed deploy, which the alarm must not stop.
    pub alarm: Option<crate::alarms::Fired>,
}

impl<'a> Fleet<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transport: Transport,
        call: AgentCall,
        held: Option<&'a HeldLock>,
        address: AddressChoice,
        batch: Option<Limit>,
        max_errors: Option<Limit>,
        fleet_size: usize,
        progress: &'a Progress,
    ) -> Fleet<'a> {
        Fleet {
            transport,
            call,
            held,
            address,
            batch,
            max_errors,
            fleet_size,
            progress,
            failures: AtomicUsize::new(0),
            leaving: crate::discover::Leaving::default(),
            alarm: None,
        }
    }
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
        } else if self.alarm.as_ref().is_some_and(|a| a.get().is_some()) {
            Some("a watched alarm went into ALARM or could not be read (see the report's alarm); no new nodes are started")
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
        let result = collect::collect(&node.instance_id, &self.address_of(node), outcome, self.call.expects());
        self.record(result)
    }

    /// A node that was never started.
    pub fn not_attempted(&self, node: &Node, why: &str) -> NodeResult {
        self.record(self.unrun(node, NodeStatus::NotAttempted, why.to_string()))
    }

    /// A node that left the group while the deploy waited for it.
    pub fn left(&self, node: &Node, why: String) -> NodeResult {
        self.record(self.unrun(node, NodeStatus::Left, why))
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
            agent_version: None,
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
        let call = AgentCall {
            source: Some(hostile[0].into()),
            dest: Some(hostile[1].into()),
            state_dir: Some(hostile[2].into()),
            ..AgentCall::new(Action::Pull)
        };
        let words = shlex::split(&call.command_line()).unwrap();
        assert_eq!(words, ["fleetsync-agent", "pull", hostile[0], "--dest", hostile[1], "--state-dir", hostile[2], "--json"]);
        let rollback = AgentCall { release: Some("r1".into()), ..AgentCall::new(Action::Rollback) };
        assert_eq!(rollback.words(), ["rollback", "--to", "r1", "--json"]);
        let checked = AgentCall { health_url: Some("http://127.0.0.1/up".into()), ..rollback };
        assert_eq!(checked.words(), ["rollback", "--to", "r1", "--health-url", "http://127.0.0.1/up", "--json"]);
    }

    #[test]
    fn the_manifest_digest_goes_in_the_environment_as_an_assignment_the_shell_sees() {
        let digest = fleetsync::store::Digest::of(b"m");
        let call = AgentCall { release: Some("r2".into()), manifest: Some(digest), ..AgentCall::new(Action::Pull) };
        let line = call.command_line();
        assert!(line.starts_with(&format!("FLEETSYNC_MANIFEST_DIGEST={digest} fleetsync-agent pull")), "{line}");
        assert!(!call.words().iter().any(|w| w.contains("manifest")), "never a flag an older agent would refuse");
    }
}
