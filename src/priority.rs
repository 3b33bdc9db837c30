//! A pull's share of the server: its CPU and I/O priority, lowered by
//! default, because the node it runs on is serving the site (PHP-FPM
//! competes with its downloads, decompression and hashing for the same
//! cores and disk).
//!
//! Set on the process before its threads start (Linux keeps both per
//! thread, and new threads inherit them), so every worker, the blocking
//! pool and the hooks it runs get it. The systemd unit sets the same with
//! `Nice=` and `IOSchedulingClass=`; this covers the pulls `fleetsync sync`
//! starts through SSM or SSH, which run outside the unit. Never raised: a
//! process started nicer than this stays as it was.

use crate::error::{Error, Result};

/// The nice value of a low-priority pull (the CPU scheduler gives a
/// process at nice 10 about a tenth of the share of one at 0 when both
/// want the core).
pub const LOW_NICE: i32 = 10;
/// Its I/O priority: best-effort (never starved, unlike idle), lowest level.
const IOPRIO_CLASS_BE: i32 = 2;
const IOPRIO_LOWEST: i32 = 7;

/// `--priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    /// Nice 10 and best-effort I/O at its lowest level.
    #[default]
    Low,
    /// As started.
    Normal,
}

/// The nice value the process was started with, before [`apply`].
static STARTED_AT: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// Applies `p` to this process (call it before any thread starts).
pub fn apply(p: Priority) -> Result<()> {
    let now =
        rustix::process::getpriority_process(None).map_err(|e| Error::io("reading the agent's nice value", std::io::Error::from(e)))?;
    let _ = STARTED_AT.set(now);
    if p == Priority::Normal {
        return Ok(());
    }
    if now < LOW_NICE {
        rustix::process::setpriority_process(None, LOW_NICE)
            .map_err(|e| Error::io("lowering the agent's CPU priority", std::io::Error::from(e)))?;
    }
    // ioprio_set(IOPRIO_WHO_PROCESS, 0 = this one, class << 13 | level): no
    // wrapper in libc or rustix.
    let prio = (IOPRIO_CLASS_BE << 13) | IOPRIO_LOWEST;
    // SAFETY: a plain system call with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, 1, 0, prio) };
    if r != 0 {
        // Not fatal: some kernels and sandboxes refuse it.
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the agent's I/O priority");
    }
    Ok(())
}

/// Has `cmd` start at the priority the agent was started with, not the
/// pull's: a hook may start or restart a long-running process (a PM2
/// daemon, an application server) that must not inherit nice 10.
pub fn as_started(cmd: &mut tokio::process::Command) {
    let Some(&nice) = STARTED_AT.get() else { return };
    // SAFETY: between fork and exec only system calls run, which is what
    // pre_exec allows.
    unsafe {
        cmd.pre_exec(move || {
            let _ = rustix::process::setpriority_process(None, nice);
            // IOPRIO_CLASS_NONE: the I/O priority follows the nice value again.
            libc::syscall(libc::SYS_ioprio_set, 1, 0, 0);
            Ok(())
        });
    }
}
