//! METRICS: the last pull as a Prometheus textfile-collector file, which
//! node_exporter (`--collector.textfile.directory`) serves with the node's
//! other metrics. Off unless `--metrics-file` (or `metrics-file` in
//! agent.toml) names the file; the packaged unit names
//! `/var/lib/prometheus/node-exporter/fleetsync.prom`, node_exporter's
//! conventional directory on Debian and Ubuntu.
//!
//! Gauges only, named `last_*`: the agent is a one-shot process, so a
//! counter would start from zero every run. No sample timestamps:
//! node_exporter refuses a file that has them. The file is written beside
//! its final name and renamed over it, so a scrape never reads half a file
//! (the temporary name does not end in `.prom`, so it is never scraped).

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use fleetsync::PullReport;

/// The file's text for one pull; `live` is the release live after it
/// (release mode).
pub fn render(report: &PullReport, live: Option<&str>) -> String {
    let dest = format!("dest=\"{}\"", escape(&report.dest));
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let ended_ms = if report.finished_at_ms > 0 { report.finished_at_ms } else { now_ms };
    let c = &report.counts;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, value: f64| {
        let _ = writeln!(out, "# HELP fleetsync_{name} {help}\n# TYPE fleetsync_{name} gauge\nfleetsync_{name}{{{labels}}} {value}");
    };
    gauge("agent_info", "The agent's version (the value is always 1).", &format!("version=\"{}\"", escape(fleetsync::VERSION)), 1.0);
    gauge("last_pull_end_timestamp_seconds", "Unix time the last pull ended.", &dest, ended_ms as f64 / 1000.0);
    let ok = if report.exit_code == 0 { 1.0 } else { 0.0 };
    gauge("last_pull_success", "1 if the last pull left DEST matching the source, else 0.", &dest, ok);
    gauge("last_pull_exit_code", "The last pull's exit code (see fleetsync-agent --help).", &dest, f64::from(report.exit_code));
    gauge("last_pull_duration_seconds", "Wall time of the last pull.", &dest, report.durations.total_ms as f64 / 1000.0);
    gauge(
        "last_pull_lock_wait_seconds",
        "Time the last pull waited for the node lock.",
        &dest,
        report.durations.lock_wait_ms as f64 / 1000.0,
    );
    gauge("last_pull_downloaded_bytes", "Bytes the last pull downloaded.", &dest, report.bytes_downloaded as f64);
    gauge("last_pull_downloaded_files", "Files the last pull downloaded and placed.", &dest, c.downloaded as f64);
    gauge("last_pull_deleted_files", "Files the last pull deleted.", &dest, c.deleted as f64);
    gauge("last_pull_failed_files", "Files the last pull could not place.", &dest, c.failed as f64);
    if let Some(id) = live {
        gauge("live_release_info", "The release live in DEST (the value is always 1).", &format!("{dest},release=\"{}\"", escape(id)), 1.0);
    }
    out
}

/// Writes `text` to `path` atomically: a new file beside it (never through
/// a symlink), flushed to disk, renamed over the old one.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the metrics file needs a file name"))?;
    let temp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&temp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// A label value as the exposition format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_the_file_ends_in_a_newline() {
        let mut r = PullReport::failed("s3://b/p".into(), "/srv/a \"b\"\\c".into(), &fleetsync::Error::Config("x".into()));
        r.finished_at_ms = 1_500;
        let text = render(&r, Some("r1"));
        assert!(text.contains("fleetsync_last_pull_success{dest=\"/srv/a \\\"b\\\"\\\\c\"} 0\n"), "{text}");
        assert!(text.contains("fleetsync_last_pull_end_timestamp_seconds{dest=\"/srv/a \\\"b\\\"\\\\c\"} 1.5\n"), "{text}");
        assert!(text.contains(",release=\"r1\"} 1\n") && text.ends_with('\n'));
    }
}
