//! REPORT: the fleet's result, as a table for people and one JSON object
//! for CI.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::collect::{NodeResult, NodeStatus};
use crate::discover::Node;

/// The `--json` report's format: its JSON Schema is
/// `docs/fleet-report.schema.json`, and this changes when a field changes
/// meaning or a required one is added.
pub const FLEET_REPORT_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct FleetReport {
    /// [`FLEET_REPORT_FORMAT`].
    pub format: u32,
    pub asg: String,
    pub source: String,
    pub dest: String,
    /// 0 every node ok; 1 a node failed or was not attempted, or the fleet
    /// lock was lost during the run.
    pub exit_code: i32,
    /// The fleet lock was broken, taken over or ran out during the run.
    pub lock_lost: bool,
    /// Listing the group again at the end failed (instances that joined
    /// during the deploy may not have been synced): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejoin_error: Option<String>,
    /// The group's deployed pointer could not be set at the end: why, and
    /// what to run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer_error: Option<String>,
    /// A watched alarm (`--alarm`) went into ALARM, or could not be read,
    /// during the deploy or its bake: which, and CloudWatch's reason. The
    /// deploy failed on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alarm: Option<String>,
    /// A deploy of a published source: the release the group was moved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The deploy failed and the fleet was switched back to the previous
    /// release (`--rollback-on-failure`): it is on one release again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<FleetRollback>,
    /// The deploy's record in the store's history (`fleetsync history`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deploy: Option<String>,
    pub nodes: Vec<NodeResult>,
    /// Instances that were not targets, with the reason.
    pub skipped: Vec<Node>,
    /// How many nodes answered with each agent version: more than one
    /// means an upgrade is half done (see [`versions_warning`]).
    pub agent_versions: BTreeMap<String, usize>,
    pub totals: Totals,
    pub duration_ms: u64,
}

/// A fleet rollback after a failed deploy.
#[derive(Debug, Serialize)]
pub struct FleetRollback {
    /// The release the fleet went back to.
    pub to: String,
    /// Nodes switched back (those asked that were on it already are not
    /// counted), and those whose switch back failed.
    pub nodes: usize,
    pub failed: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub ok: usize,
    pub failed: usize,
    pub not_attempted: usize,
    /// Nodes that left the group during the deploy (not failures).
    pub left: usize,
    pub downloaded: u64,
    pub deleted: u64,
    pub bytes: u64,
}

impl FleetReport {
    pub fn new(asg: String, source: String, dest: String, nodes: Vec<NodeResult>, skipped: Vec<Node>, duration_ms: u64) -> FleetReport {
        let mut t = Totals::default();
        for n in &nodes {
            match n.status {
                NodeStatus::Ok => t.ok += 1,
                NodeStatus::Failed => t.failed += 1,
                NodeStatus::NotAttempted => t.not_attempted += 1,
                NodeStatus::Left => t.left += 1,
            }
            if let Some(a) = &n.agent {
                t.downloaded += a.counts.downloaded;
                t.deleted += a.counts.deleted;
                t.bytes += a.bytes_downloaded;
            }
        }
        let exit_code = if t.failed + t.not_attempted > 0 { fleetsync::exit::PARTIAL } else { fleetsync::exit::OK };
        FleetReport {
            format: FLEET_REPORT_FORMAT,
            asg,
            source,
            dest,
            exit_code,
            lock_lost: false,
            rejoin_error: None,
            pointer_error: None,
            alarm: None,
            release: None,
            rolled_back: None,
            deploy: None,
            agent_versions: agent_versions(&nodes),
            nodes,
            skipped,
            totals: t,
            duration_ms,
        }
    }

    /// A Markdown summary for CI (GitHub's job summary): the release, the
    /// totals, every node that did not end ok, and the time taken.
    pub fn markdown(&self, verb: &str) -> String {
        let t = &self.totals;
        let outcome = if self.exit_code == 0 { "succeeded" } else { "FAILED" };
        let mut out = format!("### fleetsync {verb} of `{}` {outcome}\n\n", self.asg);
        if let Some(r) = &self.release {
            out.push_str(&format!("Release **{r}** from `{}`", self.source));
        } else {
            out.push_str(&format!("From `{}`", self.source));
        }
        out.push_str(&format!(
            " in {:.1} s: {} ok, {} failed, {} not attempted, {} left the group; {} files downloaded ({}).\n",
            self.duration_ms as f64 / 1000.0,
            t.ok,
            t.failed,
            t.not_attempted,
            t.left,
            t.downloaded,
            fleetsync::report::human_bytes(t.bytes)
        ));
        if let Some(a) = &self.alarm {
            out.push_str(&format!("\nThe deploy failed on an alarm: {a}.\n"));
        }
        if let Some(r) = &self.rolled_back {
            out.push_str(&format!("\nThe fleet was switched back to **{}** ({} nodes).\n", r.to, r.nodes));
        }
        let trouble: Vec<&NodeResult> = self.nodes.iter().filter(|n| n.status != NodeStatus::Ok).collect();
        if !trouble.is_empty() {
            out.push_str("\n| instance | status | why |\n|---|---|---|\n");
            for n in trouble {
                let why = n.error.as_deref().unwrap_or("").replace('|', "\\|").replace('\n', " ");
                out.push_str(&format!("| `{}` | {:?} | {why} |\n", n.instance_id, n.status));
            }
        }
        if let Some(d) = &self.deploy {
            out.push_str(&format!("\nRecorded as `{d}` (`fleetsync history`).\n"));
        }
        out
    }

    /// One row per node, then the skipped instances and the totals.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 9]> = self
            .nodes
            .iter()
            .map(|n| {
                let (down, del, bytes) = n.agent.as_ref().map_or((String::from("-"), String::from("-"), String::from("-")), |a| {
                    (a.counts.downloaded.to_string(), a.counts.deleted.to_string(), fleetsync::report::human_bytes(a.bytes_downloaded))
                });
                let status = match n.status {
                    NodeStatus::Ok => "ok",
                    NodeStatus::Failed => "FAILED",
                    NodeStatus::NotAttempted => "not attempted",
                    NodeStatus::Left => "left the group",
                };
                [
                    n.instance_id.clone(),
                    n.address.clone(),
                    status.to_string(),
                    release_of(n).unwrap_or_else(|| "-".into()),
                    down,
                    del,
                    bytes,
                    format!("{:.1}s", n.duration_ms as f64 / 1000.0),
                    n.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut out = table(&["INSTANCE", "ADDRESS", "STATUS", "RELEASE", "DOWNLOADED", "DELETED", "BYTES", "TIME", "ERROR"], &rows);
        for s in &self.skipped {
            out.push_str(&format!("\nskipped {}: {}", s.instance_id, s.skipped.as_deref().unwrap_or("")));
        }
        if let Some(e) = &self.rejoin_error {
            out.push_str(&format!("\nwarning: {e}"));
        }
        if let Some(a) = &self.alarm {
            out.push_str(&format!("\nthe deploy failed on an alarm: {a}"));
        }
        if let Some(r) = &self.rolled_back {
            out.push_str(&format!("\nthe deploy failed: the fleet was switched back to {} ({} nodes switched)", r.to, r.nodes));
            if !r.failed.is_empty() {
                out.push_str(&format!(" ({} could not be: {})", r.failed.len(), r.failed.join(", ")));
            }
        }
        let t = &self.totals;
        out.push_str(&format!(
            "\n{} ok, {} failed, {} not attempted{}; {} files downloaded ({}), {} deleted in {:.1} s",
            t.ok,
            t.failed,
            t.not_attempted,
            if t.left > 0 { format!(", {} left the group", t.left) } else { String::new() },
            t.downloaded,
            fleetsync::report::human_bytes(t.bytes),
            t.deleted,
            self.duration_ms as f64 / 1000.0
        ));
        out
    }
}

/// How many nodes answered with each agent version.
fn agent_versions(nodes: &[NodeResult]) -> BTreeMap<String, usize> {
    let mut versions = BTreeMap::new();
    for v in nodes.iter().filter_map(|n| n.agent_version.clone()) {
        *versions.entry(v).or_insert(0) += 1;
    }
    versions
}

/// A warning when the fleet runs more than one agent version: a node that
/// missed an agent upgrade behaves as the old agent does.
pub fn versions_warning(versions: &BTreeMap<String, usize>) -> Option<String> {
    if versions.len() < 2 {
        return None;
    }
    let each: Vec<String> = versions.iter().map(|(v, n)| format!("{v} on {n} node{}", if *n == 1 { "" } else { "s" })).collect();
    Some(format!(
        "the fleet runs {} agent versions: {} (install one version on every node: see docs/install.md, \"Upgrading the agent\")",
        versions.len(),
        each.join(", ")
    ))
}

/// Release mode: the node's release after the run, `A (was B)` when it
/// switched, with the after-switch rollback noted.
pub(crate) fn release_of(n: &NodeResult) -> Option<String> {
    let r = n.agent.as_ref()?.release.as_ref()?;
    let mut s = r.id.clone();
    if r.switched {
        if let Some(prev) = r.previous.as_ref().filter(|p| **p != r.id) {
            s.push_str(&format!(" (was {prev})"));
        }
    }
    if r.rolled_back {
        s.push_str(", rolled back: after-switch failed");
    }
    Some(s)
}

/// Left-aligned columns, two spaces apart.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `fleetsync status`: which release each node runs, and which nodes drift.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub asg: String,
    /// The release the fleet runs most (ties: the first seen).
    pub majority: Option<String>,
    /// The release the group is deployed on (its deploy done), when
    /// `--source` names a release store.
    pub deployed: Option<String>,
    /// The latest release published to the store (not necessarily deployed).
    pub published: Option<String>,
    /// 0 every node answered and none drifts; 1 otherwise.
    pub exit_code: i32,
    pub nodes: Vec<NodeStatusRow>,
    pub skipped: Vec<Node>,
    /// How many nodes answered with each agent version.
    pub agent_versions: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatusRow {
    pub instance_id: String,
    pub address: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    /// `fleetsync-agent --version` on the node.
    pub agent_version: Option<String>,
    /// The last pull's status and when it finished (ms since the epoch).
    pub last_pull: Option<String>,
    pub last_pull_at_ms: Option<u64>,
    /// Why this node stands out: not on the group's deployed release, not
    /// on the majority release, or no answer.
    pub drift: Option<String>,
}

impl StatusReport {
    pub fn new(
        asg: String,
        deployed: Option<String>,
        published: Option<String>,
        results: Vec<NodeResult>,
        skipped: Vec<Node>,
    ) -> StatusReport {
        let field = |r: &NodeResult, k: &str| r.release_status.as_ref().and_then(|s| s.get(k)).and_then(|v| v.as_str()).map(str::to_string);
        let mut counts: Vec<(String, usize)> = Vec::new();
        for r in &results {
            if let Some(c) = field(r, "current") {
                match counts.iter_mut().find(|(id, _)| *id == c) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((c, 1)),
                }
            }
        }
        let majority = counts
            .iter()
            .fold(None::<&(String, usize)>, |best, c| if best.is_none_or(|b| c.1 > b.1) { Some(c) } else { best })
            .map(|c| c.0.clone());
        let nodes: Vec<NodeStatusRow> = results
            .iter()
            .map(|r| {
                let current = field(r, "current");
                let last = r.release_status.as_ref().and_then(|s| s.get("last_pull"));
                let drift = match (&r.error, &current) {
                    (Some(e), _) => Some(format!("no answer: {e}")),
                    (None, None) => Some("no live release".to_string()),
                    (None, Some(c)) if deployed.as_ref().is_some_and(|p| p != c) => Some("not on the group's deployed release".to_string()),
                    (None, Some(c)) if majority.as_ref().is_some_and(|m| m != c) => Some("not on the fleet's release".to_string()),
                    _ => None,
                };
                NodeStatusRow {
                    instance_id: r.instance_id.clone(),
                    address: r.address.clone(),
                    current,
                    previous: field(r, "previous"),
                    agent_version: r.agent_version.clone(),
                    last_pull: last.and_then(|l| l.get("status")).and_then(|v| v.as_str()).map(str::to_string),
                    last_pull_at_ms: last.and_then(|l| l.get("finished_at_ms")).and_then(|v| v.as_u64()),
                    drift,
                }
            })
            .collect();
        let exit_code = if nodes.iter().any(|n| n.drift.is_some()) { fleetsync::exit::PARTIAL } else { fleetsync::exit::OK };
        let agent_versions = agent_versions(&results);
        StatusReport { asg, majority, deployed, published, exit_code, nodes, skipped, agent_versions }
    }

    pub fn table(&self) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let rows: Vec<[String; 7]> = self
            .nodes
            .iter()
            .map(|n| {
                let last = match (&n.last_pull, n.last_pull_at_ms) {
                    (Some(s), Some(at)) => format!("{s}, {} s ago", now.saturating_sub(at) / 1000),
                    _ => "-".into(),
                };
                [
                    n.instance_id.clone(),
                    n.address.clone(),
                    n.current.clone().unwrap_or_else(|| "-".into()),
                    n.previous.clone().unwrap_or_else(|| "-".into()),
                    n.agent_version.clone().unwrap_or_else(|| "-".into()),
                    last,
                    n.drift.as_ref().map_or(String::new(), |d| format!("DRIFT: {d}")),
                ]
            })
            .collect();
        let mut out = table(&["INSTANCE", "ADDRESS", "CURRENT", "PREVIOUS", "AGENT", "LAST PULL", "DRIFT"], &rows);
        for s in &self.skipped {
            out.push_str(&format!("\nskipped {}: {}", s.instance_id, s.skipped.as_deref().unwrap_or("")));
        }
        let drifting = self.nodes.iter().filter(|n| n.drift.is_some()).count();
        out.push_str(&format!(
            "\n{} nodes; fleet release {}; deployed {}; latest published {}; {drifting} drifting",
            self.nodes.len(),
            self.majority.as_deref().unwrap_or("-"),
            self.deployed.as_deref().unwrap_or("-"),
            self.published.as_deref().unwrap_or("-")
        ));
        out
    }
}

/// `fleetsync releases`: one row per release, oldest first.
pub fn releases_table(c: &fleetsync::store::catalog::Catalog) -> String {
    let rows: Vec<[String; 6]> = c
        .releases
        .iter()
        .map(|r| {
            let mut marks = Vec::new();
            if r.latest {
                marks.push("latest".to_string());
            }
            marks.extend(r.deployed.iter().map(|g| format!("deployed: {g}")));
            [
                r.id.clone(),
                when(r.created_at_ms),
                r.publisher.clone(),
                r.files.to_string(),
                fleetsync::report::human_bytes(r.bytes),
                marks.join(", "),
            ]
        })
        .collect();
    let mut out = table(&["RELEASE", "PUBLISHED", "BY", "FILES", "BYTES", "POINTERS"], &rows);
    out.push_str(&format!("\n{} releases in {}", c.releases.len(), c.store));
    out
}

/// `fleetsync history`: one row per deploy, oldest first.
pub fn history_table(records: &[fleetsync::store::history::DeployRecord]) -> String {
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            let ok = r.nodes.iter().filter(|n| n.status == "ok").count();
            let mut outcome = r.outcome.clone();
            if let Some(to) = &r.rolled_back_to {
                outcome.push_str(&format!(" (back to {to})"));
            }
            [
                when(r.started_at_ms),
                r.verb.clone(),
                r.group.clone(),
                match (&r.release, &r.previous) {
                    (Some(to), Some(from)) if from != to => format!("{to} (was {from})"),
                    (Some(to), _) => to.clone(),
                    (None, _) => "-".into(),
                },
                format!("{ok}/{} ok", r.nodes.len()),
                outcome,
                r.by.clone(),
            ]
        })
        .collect();
    table(&["STARTED (UTC)", "VERB", "GROUP", "RELEASE", "NODES", "OUTCOME", "BY"], &rows)
}

/// A time as `YYYY-MM-DD HH:MM:SS` UTC.
fn when(ms: u64) -> String {
    use aws_sdk_ssm::primitives::{DateTime, DateTimeFormat};
    let t = DateTime::from_secs((ms / 1000) as i64).fmt(DateTimeFormat::DateTime).unwrap_or_default();
    t.trim_end_matches('Z').replace('T', " ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc() {
        assert_eq!(super::when(1_796_040_413_461), "2026-11-30 12:06:53");
    }
}
