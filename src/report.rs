//! REPORT: what a pull did, for people (one summary line) and for machines
//! (one JSON object, which the bastion parses out of SSM or SSH output).
//!
//! The JSON stays small whatever the sync's size, counted in bytes: counts,
//! plus the first errors up to [`MAX_ERRORS`] and [`ERRORS_BUDGET`] bytes,
//! each key and message cut to a bounded length, and the first
//! [`MAX_PLAN`] planned paths. SSM returns only the first 24,000 bytes of a
//! command's output, and a report cut in half is a report lost.

use serde::{Deserialize, Serialize};

use crate::error::exit;

/// Errors kept in the report; the rest are counted in `errors_omitted`.
pub const MAX_ERRORS: usize = 20;
/// Bytes the kept errors may take in the JSON (escapes included): 20 keys
/// of S3's maximum 1,024 bytes with long messages would not fit SSM's
/// 24,000 otherwise.
pub const ERRORS_BUDGET: usize = 10_000;
/// Longest key and message kept in an error, and the pull's own error
/// (longer ones are cut, ending in `...`).
const MAX_KEY: usize = 1_100;
const MAX_MESSAGE: usize = 600;
const MAX_PULL_ERROR: usize = 2_000;
/// Paths kept per list in a dry run's plan.
pub const MAX_PLAN: usize = 50;

/// The JSON report's format. It changes when a field changes meaning or a
/// required one is added, so that a bastion older than its fleet's agents
/// says "upgrade fleetsync" instead of misreading a report. Reports from
/// agents built before the format was named have none and are format 1.
pub const REPORT_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullStatus {
    /// Everything listed is in place.
    Ok,
    /// The pull ran, but some files failed (see `errors`).
    Partial,
    /// The pull as a whole failed (see `error`); DEST is as it was, except
    /// for files already switched before the failure.
    Failed,
    /// Another pull holds the node lock and `--if-busy fail` was given.
    Busy,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Files (not directory markers) under the prefix.
    pub listed: u64,
    /// Files downloaded and switched into place.
    pub downloaded: u64,
    /// Files we had placed earlier and removed because the source dropped them.
    pub deleted: u64,
    /// Files left alone: same ETag, and unchanged on disk since we wrote them.
    pub unchanged: u64,
    /// Files that could not be downloaded or placed.
    pub failed: u64,
    /// Of `downloaded`: files whose local copy had drifted and was repaired.
    pub repaired: u64,
    /// Objects deleted between LIST and GET (left for the next pull).
    pub vanished: u64,
    /// Objects replaced between LIST and GET, fetched again at their new ETag.
    pub replanned: u64,
    /// Download attempts beyond the first.
    pub retries: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durations {
    pub lock_wait_ms: u64,
    pub total_ms: u64,
    /// Release mode: from the pull's start to the switch of `current`
    /// (what a deploy's visitors wait for); what follows it (the hooks, the
    /// drift check of the new release, staging the next one) is not in it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub live_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyError {
    pub key: String,
    pub error: String,
}

/// A dry run's plan, truncated to [`MAX_PLAN`] paths per list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub fetch: Vec<String>,
    pub delete: Vec<String>,
    pub fetch_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullReport {
    /// [`REPORT_FORMAT`] of the agent that wrote it.
    #[serde(default = "first_format")]
    pub format: u32,
    /// `fleetsync-agent --version` of the agent that wrote it.
    #[serde(default)]
    pub agent_version: String,
    pub status: PullStatus,
    /// The exit code the agent ends with for this report.
    pub exit_code: i32,
    pub source: String,
    pub dest: String,
    pub dry_run: bool,
    /// This request was answered by a pull that started after it was made.
    pub coalesced: bool,
    /// When the pull (not the request) started, in ms since the epoch.
    pub started_at_ms: u64,
    /// When it finished, in ms since the epoch.
    pub finished_at_ms: u64,
    pub counts: Counts,
    pub bytes_downloaded: u64,
    pub durations: Durations,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<KeyError>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub errors_omitted: u64,
    /// Why the pull failed as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// Release mode: which release, whether it went live, the hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseReport>,
    /// Bytes `errors` takes in the JSON (kept under [`ERRORS_BUDGET`]).
    #[serde(skip)]
    errors_bytes: usize,
}

pub(crate) fn first_format() -> u32 {
    1
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PullReport {
    pub(crate) fn new(source: String, dest: String, dry_run: bool) -> PullReport {
        PullReport {
            format: REPORT_FORMAT,
            agent_version: crate::VERSION.to_string(),
            status: PullStatus::Ok,
            exit_code: exit::OK,
            source,
            dest,
            dry_run,
            coalesced: false,
            started_at_ms: 0,
            finished_at_ms: 0,
            counts: Counts::default(),
            bytes_downloaded: 0,
            durations: Durations::default(),
            errors: Vec::new(),
            errors_omitted: 0,
            error: None,
            plan: None,
            release: None,
            errors_bytes: 0,
        }
    }

    /// The report for a pull that failed as a whole.
    pub fn failed(source: String, dest: String, err: &crate::Error) -> PullReport {
        let mut r = PullReport::new(source, dest, false);
        r.status = if matches!(err, crate::Error::Busy { .. }) { PullStatus::Busy } else { PullStatus::Failed };
        r.exit_code = err.exit_code();
        r.set_error(err.to_string());
        r
    }

    /// Sets why the pull failed as a whole, cut to a bounded length.
    pub(crate) fn set_error(&mut self, error: String) {
        self.error = Some(cut(error, MAX_PULL_ERROR));
    }

    /// Records a per-file failure, keeping the report small: at most
    /// [`MAX_ERRORS`] errors of at most [`ERRORS_BUDGET`] bytes in all.
    pub(crate) fn push_error(&mut self, key: String, error: String) {
        self.counts.failed += 1;
        let e = KeyError { key: cut(key, MAX_KEY), error: cut(error, MAX_MESSAGE) };
        let size = serde_json::to_string(&e).map_or(usize::MAX, |s| s.len() + 1);
        if self.errors.len() < MAX_ERRORS && self.errors_bytes + size <= ERRORS_BUDGET {
            self.errors_bytes += size;
            self.errors.push(e);
        } else {
            self.errors_omitted += 1;
        }
    }

    /// Sets status and exit code from the counts.
    pub(crate) fn settle(&mut self) {
        if self.counts.failed > 0 {
            self.status = PullStatus::Partial;
            self.exit_code = exit::PARTIAL;
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let verb = if self.dry_run { "would pull" } else { "pulled" };
        let mut s = format!(
            "{verb} {} into {}: {} downloaded ({}), {} deleted, {} unchanged, {} failed of {} listed in {:.2} s",
            self.source,
            self.dest,
            c.downloaded,
            human_bytes(self.bytes_downloaded),
            c.deleted,
            c.unchanged,
            c.failed,
            c.listed,
            self.durations.total_ms as f64 / 1000.0
        );
        if self.coalesced {
            s.push_str(" (coalesced with a pull that started after this request)");
        }
        if c.retries > 0 || c.replanned > 0 {
            s.push_str(&format!("; {} retries, {} objects changed mid-pull", c.retries, c.replanned));
        }
        s
    }
}

/// `s` cut to at most `max` bytes (on a character boundary), ending in
/// `...` when it was cut.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max - 3;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// What a release pull did, inside its [`PullReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// The release the source's content is (live now unless the pull failed
    /// or was rolled back).
    pub id: String,
    /// What was live before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// This pull built the release directory.
    pub created: bool,
    /// `current` was switched by this pull.
    pub switched: bool,
    /// Files shared with the previous release by hard link (not downloaded).
    pub linked: u64,
    /// Files whose content was live already but whose mode changed: copied,
    /// so that the older release keeps its mode.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copied: u64,
    /// The release came from the release store (not a listing).
    #[serde(default)]
    pub store: bool,
    /// Nothing switched because a deploy of the node's group is under way
    /// or failed: why. The node keeps its live release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// The before-switch command, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_switch: Option<HookReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_switch: Option<HookReport>,
    /// The health check after the switch (`--health-url`), when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// The after-switch command or the health check failed and the
    /// previous release is live again.
    pub rolled_back: bool,
    /// Old releases removed (`--keep`): unregistered and set aside by a
    /// deploy's pull, their files unlinked after it (see
    /// `release::layout`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Files the release publishes under its shared paths (`--shared`),
    /// not placed: what is shared stays.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_skipped: u64,
    /// Assets of the release before carried into this one (`--keep-assets`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kept_assets: u64,
    /// Built from the copy of the live release staged after its switch:
    /// only what changed was written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub staged: bool,
}

/// How the health check after a switch went (`--health-url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub url: String,
    pub ok: bool,
    /// The last answer's HTTP status, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub attempts: u32,
    pub duration_ms: u64,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a hook command went (`--before-switch`, `--after-switch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub command: String,
    pub exit_code: Option<i32>,
    pub ok: bool,
    /// The end of its stderr (at most 2,000 characters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_failure_list_stays_small() {
        let mut r = PullReport::new("s3://b/p/".into(), "/srv".into(), false);
        for i in 0..100_000 {
            r.push_error(format!("p/{}/{i}", "d".repeat(200)), "x".repeat(300));
        }
        r.settle();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.len() < 20_000, "{}", json.len());
        assert_eq!(r.counts.failed, 100_000);
        assert_eq!(r.errors.len() as u64 + r.errors_omitted, 100_000);
        assert!(r.errors.len() <= MAX_ERRORS);
        assert_eq!(r.exit_code, exit::PARTIAL);
        let back: PullReport = serde_json::from_str(&json).unwrap();
        assert_eq!((back.errors, back.counts), (r.errors.clone(), r.counts.clone()));
    }

    #[test]
    fn long_keys_control_characters_and_long_messages_stay_under_ssms_cap_in_bytes() {
        let mut r = PullReport::new("s3://b/p/".into(), "/srv".into(), false);
        for i in 0..25 {
            // S3's longest key (1,024 bytes), each control character six
            // bytes once escaped, and a message naming it twice.
            let key = format!("p/{i}/{}", "\u{1}é".repeat(340));
            r.push_error(key.clone(), format!("placing {key} in /srv: {}", "a directory is in the way ".repeat(40)));
        }
        r.set_error(format!("refusing to pull: {}", "x".repeat(50_000)));
        r.settle();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.len() < 20_000, "{} bytes", json.len());
        assert!(!r.errors.is_empty() && r.errors_omitted > 0, "{} kept, {} omitted", r.errors.len(), r.errors_omitted);
        assert_eq!(r.errors.len() as u64 + r.errors_omitted, 25);
        assert!(r.errors[0].error.ends_with("...") && r.error.as_ref().unwrap().ends_with("..."));
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(361 * 1024 * 1024), "361.0 MiB");
    }
}
