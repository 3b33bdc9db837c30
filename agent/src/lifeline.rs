//! `--exit-with-stdin`: the agent stops when its stdin closes.
//!
//! Over SSH without a terminal, sshd sends the remote command no SIGHUP
//! when the session ends (the bastion's `--timeout`, Ctrl-C, a lost
//! bastion); it closes the command's stdin. The bastion keeps that stdin
//! open for as long as it waits, so end-of-file means nobody is waiting
//! any more, and a pull that went on could switch a release after the
//! bastion reported the node failed and released the fleet lock. Stopping
//! at any point is safe: the pull is built to survive SIGKILL (no file is
//! half-written under its final name, an unfinished release never goes
//! live, and the next pull cleans up).

use std::io::{Read, Write};

/// Watches stdin on a thread of its own; exits the process with `code`
/// once it reaches end-of-file (or fails).
pub fn exit_when_stdin_closes(code: i32) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        // Not eprintln!: its panic on a closed stderr (the session is gone,
        // so it usually is) would end this thread instead of the process.
        let _ = writeln!(std::io::stderr(), "fleetsync-agent: stdin closed (the bastion went away): stopping");
        std::process::exit(code);
    });
}
