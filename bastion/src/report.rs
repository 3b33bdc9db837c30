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
    /// 0 every node ok; 1 a node failed or was not attempted.
    pub exit_code: i32,
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
        FleetReport { asg, source, dest, exit_code, nodes, skipped, totals: t, duration_ms }
    }

    /// One row per node, then the skipped instances and the totals.
    pub fn table(&self) -> String {
        let rows: Vec<[String; 8]> = self
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
                    down,
                    del,
                    bytes,
                    format!("{:.1}s", n.duration_ms as f64 / 1000.0),
                    n.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut out = table(&["INSTANCE", "ADDRESS", "STATUS", "DOWNLOADED", "DELETED", "BYTES", "TIME", "ERROR"], &rows);
        for s in &self.skipped {
            out.push_str(&format!("\nskipped {}: {}", s.instance_id, s.skipped.as_deref().unwrap_or("")));
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
