//! A pull's share of the server: its CPU and I/O priority, lowered by
//! default, because the node it runs on is serving the site (PHP-FPM
//! competes with its downloads, decompression and hashing for the same
//! cores and disk).
//!
//! Set on the process before its threads start (Linux keeps both per
//! thread, and new threads inherit them), so every worker and the
//! blocking pool get it; the hooks it runs get the priority it was started
//! with back ([`as_started`]). The systemd unit sets the same with
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
    /// As [`Priority::Low`], and the CPU scheduler's idle policy
    /// (SCHED_IDLE): within its cgroup the pull gets a core's time only
    /// when nothing else wants it (a share of 3 against a normal
    /// process's 1024), and a request that wakes takes the core back as
    /// soon as the pull is out of the kernel rather than sharing it by
    /// weight. Measured on 2 cores with PHP-FPM using half of them, it
    /// took a cold pull's p99 cost from 3.2-4.3x to 1.9-2.2x for a pull
    /// 1.15-1.19x longer than at normal priority (BENCHMARKS.md). Not the
    /// default: on a node whose cores stay busy the pull can be starved,
    /// and a deploy (a hotfix for the code keeping them busy) runs into
    /// its timeout.
    Idle,
    /// As started.
    Normal,
}

/// How the process was started, before [`apply`], given back to the
/// commands it runs.
#[derive(Clone, Copy)]
struct Started {
    nice: i32,
    /// Its CPU scheduling policy (with SCHED_RESET_ON_FORK when set) and
    /// that policy's priority (0 but for the realtime ones).
    policy: i32,
    rt_priority: i32,
    /// Whether [`apply`] changed the policy (to SCHED_IDLE): a command
    /// that cannot be given the started one back must then not run.
    changed_policy: bool,
}

static STARTED: std::sync::OnceLock<Started> = std::sync::OnceLock::new();

/// Applies `p` to this process (call it before the threads that work
/// start: each inherits it).
pub fn apply(p: Priority) -> Result<()> {
    let nice =
        rustix::process::getpriority_process(None).map_err(|e| Error::io("reading the agent's nice value", std::io::Error::from(e)))?;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on this thread; `param` outlives them.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 || unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return Err(Error::io("reading the agent's CPU scheduling policy", std::io::Error::last_os_error()));
    }
    let reset_on_fork = policy & libc::SCHED_RESET_ON_FORK;
    let changed_policy = p == Priority::Idle && policy & !libc::SCHED_RESET_ON_FORK != libc::SCHED_IDLE;
    let _ = STARTED.set(Started { nice, policy, rt_priority: param.sched_priority, changed_policy });
    if p == Priority::Normal {
        return Ok(());
    }
    if changed_policy {
        // On this thread, which every later thread inherits it from; no
        // privilege needed to lower a policy (keeping SCHED_RESET_ON_FORK,
        // which only a privileged process may clear).
        let idle = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain system call; `idle` outlives it.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE | reset_on_fork, &idle) } != 0 {
            return Err(Error::io("giving the agent the idle CPU policy (--priority idle)", std::io::Error::last_os_error()));
        }
    }
    if nice < LOW_NICE {
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
/// daemon, an application server) that must not inherit nice 10 or the
/// idle policy. Both need a privilege to undo (CAP_SYS_NICE, or an
/// RLIMIT_NICE that allows it) that an agent not run as root may lack:
/// a hook then stays at nice 10, but never idle: it fails to start
/// instead, and [`why_not_started`] says why.
pub fn as_started(cmd: &mut tokio::process::Command) {
    let Some(&Started { nice, policy, rt_priority, changed_policy }) = STARTED.get() else { return };
    // SAFETY: between fork and exec only system calls run, which is what
    // pre_exec allows.
    unsafe {
        cmd.pre_exec(move || {
            if changed_policy {
                let param = libc::sched_param { sched_priority: rt_priority };
                if libc::sched_setscheduler(0, policy, &param) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let _ = rustix::process::setpriority_process(None, nice);
            // IOPRIO_CLASS_NONE: the I/O priority follows the nice value again.
            libc::syscall(libc::SYS_ioprio_set, 1, 0, 0);
            Ok(())
        });
    }
}

/// Why a command [`as_started`] prepared could not start, when the reason
/// is this module's: the idle policy could not be left (EPERM).
pub fn why_not_started(e: &std::io::Error) -> Option<&'static str> {
    let changed = STARTED.get().is_some_and(|s| s.changed_policy);
    (changed && e.raw_os_error() == Some(libc::EPERM)).then_some(
        "leaving the idle CPU policy of --priority idle needs root or CAP_SYS_NICE: run the agent as root, or use --priority low",
    )
}
