//! COLLECT: turns what each node's agent printed into a per-node result.
//!
//! The agent prints one JSON report on stdout, also when it fails as a
//! whole; its absence means the node never ran the agent (unreachable,
//! agent not installed), and the message says which.

use fleetsync::PullReport;
use serde::Serialize;

use crate::trigger::{last_line, Expect, Outcome};

/// How the SSM agent ends an output it cut at 24,000 bytes.
const SSM_TRUNCATED: &str = "--output truncated--";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeStatus {
    Ok,
    Failed,
    /// Not started: `--max-errors` was reached or the fleet lock was lost.
    NotAttempted,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeResult {
    pub instance_id: String,
    pub address: String,
    pub status: NodeStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
    /// The agent's own report, when it printed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<PullReport>,
    /// `fleetsync status`: the node's release status as its agent printed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_status: Option<serde_json::Value>,
}

/// The result of one node from what its run gave: the agent's report when
/// it printed one, else the most specific reason it did not.
pub fn collect(instance_id: &str, address: &str, outcome: Outcome, expects: Expect) -> NodeResult {
    let last = outcome.stdout.lines().rev().find(|l| !l.trim().is_empty());
    if expects == Expect::Status {
        return collect_status(instance_id, address, outcome.exit_code, last, &outcome);
    }
    let agent: Option<PullReport> = last.and_then(|l| serde_json::from_str(l).ok());
    let last_stderr = last_line(&outcome.stderr);
    let (status, error) = match (&agent, outcome.exit_code, &outcome.unreached) {
        (Some(r), Some(0), _) if r.exit_code == 0 => (NodeStatus::Ok, None),
        (Some(r), _, _) => (NodeStatus::Failed, Some(r.error.clone().unwrap_or_else(|| agent_failures(r)))),
        (None, _, Some(why)) => (NodeStatus::Failed, Some(why.clone())),
        (None, code, None) if outcome.stdout.trim_end().ends_with(SSM_TRUNCATED) => (
            NodeStatus::Failed,
            Some(format!(
                "the agent's report was truncated (SSM keeps the first 24,000 characters of output; exit code {})",
                code.map_or("none".into(), |c| c.to_string())
            )),
        ),
        (None, Some(127), _) => (NodeStatus::Failed, Some(format!("fleetsync-agent is not installed on {instance_id} ({last_stderr})"))),
        (None, code, None) => (
            NodeStatus::Failed,
            Some(format!("the agent printed no report (exit code {}): {last_stderr}", code.map_or("none".into(), |c| c.to_string()))),
        ),
    };
    NodeResult {
        instance_id: instance_id.to_string(),
        address: address.to_string(),
        status,
        error,
        duration_ms: outcome.elapsed.as_millis() as u64,
        agent,
        release_status: None,
    }
}

/// A node's answer to `fleetsync-agent status --json`.
fn collect_status(instance_id: &str, address: &str, code: Option<i32>, last: Option<&str>, outcome: &Outcome) -> NodeResult {
    let status: Option<serde_json::Value> =
        last.and_then(|l| serde_json::from_str(l).ok()).filter(|v: &serde_json::Value| v.get("dest").is_some());
    let error = match (&status, code, &outcome.unreached) {
        (Some(_), Some(0), _) => None,
        (_, _, Some(why)) => Some(why.clone()),
        (_, Some(127), _) => Some(format!("fleetsync-agent is not installed on {instance_id} ({})", last_line(&outcome.stderr))),
        _ => Some(format!("the agent gave no status: {}", last_line(&outcome.stderr))),
    };
    NodeResult {
        instance_id: instance_id.to_string(),
        address: address.to_string(),
        status: if error.is_none() { NodeStatus::Ok } else { NodeStatus::Failed },
        error,
        duration_ms: outcome.elapsed.as_millis() as u64,
        agent: None,
        release_status: status,
    }
}

fn agent_failures(r: &PullReport) -> String {
    match r.errors.first() {
        Some(e) => format!("{} files failed, first {}: {}", r.counts.failed, e.key, e.error),
        None => format!("the agent exited with code {}", r.exit_code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(stdout: &str, stderr: &str, code: i32) -> Outcome {
        Outcome { stdout: stdout.into(), stderr: stderr.into(), exit_code: Some(code), elapsed: Duration::from_millis(5), unreached: None }
    }

    #[test]
    fn unreachable_and_missing_agent_are_named() {
        let unreached = Outcome { unreached: Some("ssh to 10.0.0.1 failed: Connection refused".into()), ..outcome("", "", 255) };
        let r = collect("i-1", "10.0.0.1", unreached, Expect::Pull);
        assert_eq!(r.status, NodeStatus::Failed);
        assert!(r.error.unwrap().contains("Connection refused"));
        let r = collect("i-2", "10.0.0.2", outcome("", "bash: line 1: fleetsync-agent: command not found\n", 127), Expect::Pull);
        let e = r.error.unwrap();
        assert!(e.contains("not installed on i-2") && e.contains("command not found"), "{e}");
        let cut = format!("{{\"status\":\"partial\",\"errors\":[{}--output truncated--", "x".repeat(23_000));
        let e = collect("i-3", "10.0.0.3", outcome(&cut, "", 1), Expect::Pull).error.unwrap();
        assert!(e.contains("report was truncated"), "{e}");
    }
}
