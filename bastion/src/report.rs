//! REPORT: the fleet's result, as a table for people and one JSON object
//! for CI.

use serde::Serialize;

use crate::collect::{NodeResult, NodeStatus};
use crate::discover::Node;

#[derive(Debug, Serialize)]
pub struct FleetReport {
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
    pub nodes: Vec<NodeResult>,
    /// Instances that were not targets, with the reason.
    pub skipped: Vec<Node>,
    pub totals: Totals,
    pub duration_ms: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub ok: usize,
    pub failed: usize,
    pub not_attempted: usize,
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
            }
            if let Some(a) = &n.agent {
                t.downloaded += a.counts.downloaded;
                t.deleted += a.counts.deleted;
                t.bytes += a.bytes_downloaded;
            }
        }
        let exit_code = if t.failed + t.not_attempted > 0 { fleetsync::exit::PARTIAL } else { fleetsync::exit::OK };
        FleetReport { asg, source, dest, exit_code, lock_lost: false, rejoin_error: None, nodes, skipped, totals: t, duration_ms }
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
        let t = &self.totals;
        out.push_str(&format!(
            "\n{} ok, {} failed, {} not attempted; {} files downloaded ({}), {} deleted in {:.1} s",
            t.ok,
            t.failed,
            t.not_attempted,
            t.downloaded,
            fleetsync::report::human_bytes(t.bytes),
            t.deleted,
            self.duration_ms as f64 / 1000.0
        ));
        out
    }
}

/// Release mode: the node's release after the run, `A (was B)` when it
/// switched, with the after-switch rollback noted.
pub fn release_of(n: &NodeResult) -> Option<String> {
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
    /// The release in the source's pointer, when `--source` was given and
    /// something was published.
    pub published: Option<String>,
    /// 0 every node answered and none drifts; 1 otherwise.
    pub exit_code: i32,
    pub nodes: Vec<NodeStatusRow>,
    pub skipped: Vec<Node>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatusRow {
    pub instance_id: String,
    pub address: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    /// The last pull's status and when it finished (ms since the epoch).
    pub last_pull: Option<String>,
    pub last_pull_at_ms: Option<u64>,
    /// Why this node stands out: not on the majority release, not on the
    /// published one, or no answer.
    pub drift: Option<String>,
}

impl StatusReport {
    pub fn new(asg: String, published: Option<String>, results: Vec<NodeResult>, skipped: Vec<Node>) -> StatusReport {
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
                    (None, Some(c)) if published.as_ref().is_some_and(|p| p != c) => Some("not on the published release".to_string()),
                    (None, Some(c)) if majority.as_ref().is_some_and(|m| m != c) => Some("not on the fleet's release".to_string()),
                    _ => None,
                };
                NodeStatusRow {
                    instance_id: r.instance_id.clone(),
                    address: r.address.clone(),
                    current,
                    previous: field(r, "previous"),
                    last_pull: last.and_then(|l| l.get("status")).and_then(|v| v.as_str()).map(str::to_string),
                    last_pull_at_ms: last.and_then(|l| l.get("finished_at_ms")).and_then(|v| v.as_u64()),
                    drift,
                }
            })
            .collect();
        let exit_code = if nodes.iter().any(|n| n.drift.is_some()) { fleetsync::exit::PARTIAL } else { fleetsync::exit::OK };
        StatusReport { asg, majority, published, exit_code, nodes, skipped }
    }

    pub fn table(&self) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let rows: Vec<[String; 6]> = self
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
                    last,
                    n.drift.as_ref().map_or(String::new(), |d| format!("DRIFT: {d}")),
                ]
            })
            .collect();
        let mut out = table(&["INSTANCE", "ADDRESS", "CURRENT", "PREVIOUS", "LAST PULL", "DRIFT"], &rows);
        for s in &self.skipped {
            out.push_str(&format!("\nskipped {}: {}", s.instance_id, s.skipped.as_deref().unwrap_or("")));
        }
        let drifting = self.nodes.iter().filter(|n| n.drift.is_some()).count();
        out.push_str(&format!(
            "\n{} nodes; fleet release {}; published {}; {drifting} drifting",
            self.nodes.len(),
            self.majority.as_deref().unwrap_or("-"),
            self.published.as_deref().unwrap_or("-")
        ));
        out
    }
}
