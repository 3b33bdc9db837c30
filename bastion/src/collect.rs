//! COLLECT: turns what each node's agent printed into a per-node result.
//!
//! The agent prints one JSON report on stdout, also when it fails as a
//! whole; its absence means the node never ran the agent (unreachable,
//! agent not installed), and the message says which.
//!
//! Version handshake: a report (or status) names its format and the
//! agent's version. A format this bastion does not know is that node's
//! error ("upgrade fleetsync"), never a misread report; the versions are
//! kept so that the report can say when the fleet runs more than one.

use std::time::Duration;

use fleetsync::report::REPORT_FORMAT;
use fleetsync::PullReport;
use serde::Serialize;

/// How the SSM agent ends an output it cut at 24,000 bytes.
const SSM_TRUNCATED: &str = "--output truncated--";

/// The JSON an agent command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A pull report (`pull`, `rollback`).
    Pull,
    /// A release status (`status`).
    Status,
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

/// The last non-empty line of a command's stderr: where ssh, SSM and the
/// agent put their one-line reason.
pub fn last_line(s: &str) -> &str {
    s.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeStatus {
    Ok,
    Failed,
    /// Not started: `--max-errors` was reached or the fleet lock was lost.
    NotAttempted,
    /// Left the group while the deploy waited for it (a scale-in): the
    /// fleet that remains is what the deploy is about, so not a failure.
    Left,
}

impl NodeStatus {
    /// Whether the node does not hold the deploy back: it is done, or it
    /// left the group.
    pub fn counts_as_done(self) -> bool {
        matches!(self, NodeStatus::Ok | NodeStatus::Left)
    }
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
    /// `fleetsync-agent --version` on the node, when it answered ("unknown"
    /// for agents older than the handshake).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// What the last line of a node's output holds.
enum Answer<T> {
    /// A report (or status) in a format this bastion reads.
    Known(T),
    /// A report in a format it does not: the node's error says which, and
    /// the agent's version (so the fleet's versions still count it).
    Unknown { why: String, version: String },
    /// Nothing that parses.
    Missing,
}

/// Parses `line` as a `T` after checking its format: a newer agent's
/// report is named as such instead of failing to parse (or, worse,
/// parsing into something it does not mean).
fn answer<T: serde::de::DeserializeOwned>(instance_id: &str, line: Option<&str>) -> Answer<T> {
    let Some(value) = line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v.is_object()) else {
        return Answer::Missing;
    };
    let format = value.get("format").map_or(Some(1), |f| f.as_u64());
    if format != Some(u64::from(REPORT_FORMAT)) {
        let version = version_of(value.get("agent_version").and_then(|v| v.as_str()).unwrap_or(""));
        let format = value.get("format").map_or("?".to_string(), |f| f.to_string());
        let why = format!(
            "the agent on {instance_id} ({version}) writes report format {format}, which this fleetsync ({}) does not read \
             (it reads format {REPORT_FORMAT}): upgrade fleetsync on this host to the agents' version",
            fleetsync::VERSION
        );
        return Answer::Unknown { why, version };
    }
    serde_json::from_value(value).map_or(Answer::Missing, Answer::Known)
}

fn version_of(v: &str) -> String {
    if v.is_empty() {
        "unknown".into()
    } else {
        v.to_string()
    }
}

/// The exit status of a command killed with SIGKILL (128 + 9), as the
/// shell and SSM's agent report it.
pub const KILLED: i32 = 137;

/// Why a node whose agent was killed (exit status `code`, when known)
/// failed.
pub fn killed(after: std::time::Duration, code: Option<i32>, last_stderr: &str) -> String {
    format!(
        "the agent was killed ({}) after {:.1} s, before any timeout: out of memory (the kernel's OOM killer) or stopped on the node{}",
        code.map_or("no exit status".to_string(), |c| format!("exit {c}")),
        after.as_secs_f64(),
        if last_stderr.is_empty() { String::new() } else { format!(" ({last_stderr})") }
    )
}

/// The result of one node from what its run gave: the agent's report when
/// it printed one, else the most specific reason it did not.
pub fn collect(instance_id: &str, address: &str, outcome: Outcome, expects: Expect) -> NodeResult {
    let last = outcome.stdout.lines().rev().find(|l| !l.trim().is_empty());
    if expects == Expect::Status {
        return collect_status(instance_id, address, outcome.exit_code, last, &outcome);
    }
    let (agent, unknown, version) = match answer::<PullReport>(instance_id, last) {
        Answer::Known(r) => {
            let version = version_of(&r.agent_version);
            (Some(r), None, Some(version))
        }
        Answer::Unknown { why, version } => (None, Some(why), Some(version)),
        Answer::Missing => (None, None, None),
    };
    let last_stderr = last_line(&outcome.stderr);
    let (status, error) = match (&agent, outcome.exit_code, &outcome.unreached) {
        (None, _, _) if unknown.is_some() => (NodeStatus::Failed, unknown),
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
        // 128 + SIGKILL, before any timeout of ours (which reads as one):
        // the kernel's OOM killer, or a person or a unit on the node.
        (None, Some(KILLED), None) => (NodeStatus::Failed, Some(killed(outcome.elapsed, Some(KILLED), last_stderr))),
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
        agent_version: version,
        agent,
        release_status: None,
    }
}

/// A node's answer to `fleetsync-agent status --json`.
fn collect_status(instance_id: &str, address: &str, code: Option<i32>, last: Option<&str>, outcome: &Outcome) -> NodeResult {
    let (status, unknown, version) = match answer::<serde_json::Value>(instance_id, last) {
        Answer::Known(v) => {
            let version = version_of(v.get("agent_version").and_then(|v| v.as_str()).unwrap_or(""));
            (Some(v).filter(|v| v.get("dest").is_some()), None, Some(version))
        }
        Answer::Unknown { why, version } => (None, Some(why), Some(version)),
        Answer::Missing => (None, None, None),
    };
    let error = match (&status, code, &outcome.unreached) {
        _ if unknown.is_some() => unknown,
        (Some(_), Some(0), _) => None,
        (Some(v), Some(1), _) if v.get("current").is_some_and(serde_json::Value::is_null) => Some(format!(
            "{} on {instance_id} holds no release yet: deploy one with `fleetsync sync --releases`",
            v.get("dest").and_then(|d| d.as_str()).unwrap_or("DEST")
        )),
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
        agent_version: version,
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

    #[test]
    fn a_report_format_this_bastion_does_not_know_is_named_not_misread() {
        let newer = r#"{"format":2,"agent_version":"9.0.0 (abc)","status":"ok","exit_code":0,"shape":"changed"}"#;
        for expects in [Expect::Pull, Expect::Status] {
            let r = collect("i-9", "10.0.0.9", outcome(newer, "", 0), expects);
            assert_eq!(r.status, NodeStatus::Failed);
            let e = r.error.unwrap();
            assert!(e.contains("i-9 (9.0.0 (abc)) writes report format 2") && e.contains("upgrade fleetsync"), "{e}");
            assert_eq!(r.agent_version.as_deref(), Some("9.0.0 (abc)"));
        }
        // An agent from before the handshake: no format, no version.
        let old =
            serde_json::to_value(fleetsync::PullReport::failed("s3://b/p".into(), "/d".into(), &fleetsync::Error::Config("x".into())))
                .unwrap();
        let mut old = old.as_object().unwrap().clone();
        old.remove("format");
        old.remove("agent_version");
        let r = collect("i-8", "10.0.0.8", outcome(&serde_json::to_string(&old).unwrap(), "", 2), Expect::Pull);
        assert!(r.agent.is_some() && r.error.as_deref() == Some("x"), "{:?}", r.error);
        assert_eq!(r.agent_version.as_deref(), Some("unknown"));
    }
}
