//! HOOKS: the operator's commands around a switch. `--before-switch` runs
//! in the new release's directory once it is complete on disk (shared
//! links made) and before `current` moves: a failure or a timeout and
//! nothing switches. `--after-switch` runs once it is live (a reload, a
//! restart). Both get the release in their environment
//! (FLEETSYNC_RELEASE, FLEETSYNC_RELEASE_DIR, FLEETSYNC_PREVIOUS_RELEASE,
//! FLEETSYNC_DEST), run in a process group of their own, and are killed
//! with all they started when they outlive `--hook-timeout`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::layout::Layout;
use crate::report::HookReport;

/// `--hook-timeout` when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// How much of a command's output the report keeps (its end).
const TAIL: usize = 2_000;
/// How much of it is held while it runs: the end of it, whatever a
/// command prints (a chatty build step must not grow the agent's memory).
const HELD: usize = 64 * 1024;

/// Runs `cmd` with `sh -c` in release `id`'s directory.
pub(super) async fn run(cmd: &str, layout: &Layout, id: &str, previous: Option<&str>, timeout: Duration) -> HookReport {
    let failed = |why: String| HookReport { command: cmd.to_string(), exit_code: None, ok: false, stderr: why };
    let mut command = tokio::process::Command::new("sh");
    crate::priority::as_started(&mut command);
    let mut child = match command
        .arg("-c")
        .arg(cmd)
        .current_dir(layout.dir(id))
        .env("FLEETSYNC_RELEASE", id)
        .env("FLEETSYNC_RELEASE_DIR", layout.dir(id))
        .env("FLEETSYNC_PREVIOUS_RELEASE", previous.unwrap_or(""))
        .env("FLEETSYNC_DEST", &layout.dest)
        .stdin(std::process::Stdio::null())
        // Never onto the agent's stdout: the bastion reads the report there.
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            let why = crate::priority::why_not_started(&e).map_or_else(|| e.to_string(), str::to_string);
            return failed(format!("could not run sh: {why}"));
        }
    };
    // Both streams into one buffer, in the order they arrive.
    let output = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    .map(|mut stream| {
        let output = output.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut held = output.lock().unwrap_or_else(|p| p.into_inner());
                held.extend_from_slice(&buf[..n]);
                if held.len() > 2 * HELD {
                    let cut = held.len() - HELD;
                    held.drain(..cut);
                }
            }
        })
    })
    .collect();
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status.ok(), false),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            (child.wait().await.ok(), true)
        }
    };
    // A process that left the group may hold the pipes open: wait a
    // little, not for it.
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    }
    let text = String::from_utf8_lossy(&output.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let mut tail: String = text.chars().rev().take(TAIL).collect::<Vec<_>>().into_iter().rev().collect();
    tail = tail.trim().to_string();
    if timed_out {
        tail.push_str(&format!("\nkilled with its process group after {} s (--hook-timeout)", timeout.as_secs()));
    }
    let ok = !timed_out && status.is_some_and(|s| s.success());
    HookReport { command: cmd.to_string(), exit_code: status.and_then(|s| s.code()), ok, stderr: tail.trim().to_string() }
}
