//! Live progress of a deploy on stderr: an indicatif MultiProgress on a
//! terminal (an overall bar, a spinner per running node, a line per
//! finished node), plain timestamped lines otherwise, so CI logs keep one
//! line per node and per event.
//!
//! Only running nodes get a spinner: a thousand-node deploy must not draw a
//! thousand lines. Finished nodes print their result above the bars, where
//! it scrolls like a log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::collect::{NodeResult, NodeStatus};
use crate::discover::Node;

pub struct Progress {
    /// `None`: plain lines.
    tty: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    /// Running nodes' spinners by instance ID. A std Mutex: held for a map
    /// operation only, never across an await.
    nodes: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new(total: usize) -> Progress {
        use std::io::IsTerminal as _;
        if !std::io::stderr().is_terminal() {
            return Progress { tty: None };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} nodes done {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        overall.enable_steady_tick(Duration::from_millis(200));
        Progress { tty: Some(Bars { multi, overall, nodes: Mutex::new(HashMap::new()) }) }
    }

    /// More nodes to do (instances that joined during the deploy).
    pub fn add(&self, nodes: usize) {
        if let Some(b) = &self.tty {
            b.overall.inc_length(nodes as u64);
        }
    }

    /// A node's agent was started.
    pub fn started(&self, node: &Node, address: &str) {
        let Some(b) = &self.tty else { return };
        let bar = b.multi.insert_before(&b.overall, ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("  {spinner} {prefix}  running {elapsed}").expect("a valid template"));
        bar.set_prefix(format!("{} {address}", node.instance_id));
        bar.enable_steady_tick(Duration::from_millis(120));
        b.nodes.lock().unwrap_or_else(|p| p.into_inner()).insert(node.instance_id.clone(), bar);
    }

    /// A node has its result (also a node that was never started).
    pub fn finished(&self, r: &NodeResult) {
        let line = result_line(r);
        match &self.tty {
            None => log(&line),
            Some(b) => {
                if let Some(bar) = b.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.instance_id) {
                    bar.finish_and_clear();
                    b.multi.remove(&bar);
                }
                b.overall.inc(1);
                let _ = b.multi.println(line);
            }
        }
    }

    /// Something the operator should see (lock taken over, command sent).
    pub fn note(&self, msg: &str) {
        match &self.tty {
            None => log(msg),
            Some(b) => {
                let _ = b.multi.println(msg);
            }
        }
    }

    /// Removes the bars; the final table follows on stdout.
    pub fn finish(&self) {
        if let Some(b) = &self.tty {
            b.overall.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

/// One line per node: what it did, or why it failed.
fn result_line(r: &NodeResult) -> String {
    let what = match (r.status, &r.agent) {
        (NodeStatus::Ok, Some(a)) => format!(
            "ok: {}{} downloaded ({}), {} deleted",
            crate::report::release_of(r).map_or(String::new(), |rel| format!("release {rel}, ")),
            a.counts.downloaded,
            fleetsync::report::human_bytes(a.bytes_downloaded),
            a.counts.deleted
        ),
        (NodeStatus::Ok, None) => "ok".to_string(),
        (NodeStatus::Failed, _) => format!("FAILED: {}", r.error.as_deref().unwrap_or("")),
        (NodeStatus::NotAttempted, _) => {
            format!("not attempted: {}", r.error.as_deref().unwrap_or(""))
        }
        (NodeStatus::Left, _) => format!("left: {}", r.error.as_deref().unwrap_or("")),
    };
    format!("{} {} {what} in {:.1} s", r.instance_id, r.address, r.duration_ms as f64 / 1000.0)
}

/// A timestamped line on stderr (CI logs keep them).
pub fn log(msg: &str) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    eprintln!("[{:02}:{:02}:{:02}] {msg}", (t / 3600) % 24, (t / 60) % 60, t % 60);
}
