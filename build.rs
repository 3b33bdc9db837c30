//! Names the git commit the binaries are built from: `--version` prints it
//! and every agent report carries it, so that "which build runs on this
//! node" has an answer. `FLEETSYNC_COMMIT` overrides it (a build from a
//! source tarball, which has no `.git`); without either it is "unknown".
//!
//! The script re-runs only when HEAD moves (a checkout or a commit), never
//! on a source edit: the version costs no rebuild during development, and
//! so it cannot say whether the tree was dirty. `infra/dist/build` sets
//! FLEETSYNC_COMMIT itself, from `git describe --dirty`, so a release built
//! from uncommitted changes says so.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=FLEETSYNC_COMMIT");
    let commit = std::env::var("FLEETSYNC_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=FLEETSYNC_COMMIT={}", commit.as_deref().unwrap_or("unknown commit"));
}

/// The short hash of HEAD, watching the files that change when it moves.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let git_dir = git(&["rev-parse", "--absolute-git-dir"])?;
    // HEAD changes on a checkout; the branch it names on a commit (as a
    // loose ref under refs/heads, or in packed-refs); logs/HEAD on either.
    // A watched directory is scanned whole; watching a file that does not
    // exist would re-run the script on every build, so only existing paths
    // are named.
    for path in ["HEAD", "logs/HEAD", "packed-refs", "refs/heads"] {
        let path = Path::new(&git_dir).join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}
