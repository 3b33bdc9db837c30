//! The commands' vocabulary, as a user meets it in `--help` and errors:
//! flags that mean nothing to a command are refused, each command's help
//! lists its own exit codes, internal flags stay out of sight. No world
//! needed: nothing here reaches AWS.

mod common;

use std::process::Command;

fn run(bin: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn status_refuses_the_flags_that_only_steer_a_deploy() {
    let fleetsync = common::bin("fleetsync-bastion", "fleetsync");
    let (code, _, stderr) = run(&fleetsync, &["status", "--asg", "web", "--canary", "3", "--lock-wait", "5m", "--max-errors", "2"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--canary, --max-errors, --lock-wait mean nothing to it") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn each_agent_command_lists_its_own_exit_codes_and_hides_internal_flags() {
    let agent = common::agent_bin();
    let (_, rollback, _) = run(&agent, &["rollback", "--help"]);
    assert!(rollback.contains("nothing to roll back to") && !rollback.contains("some files failed"), "{rollback}");
    let (_, status, _) = run(&agent, &["status", "--help"]);
    assert!(status.contains("DEST holds no release yet"), "{status}");
    for args in [&["--help"][..], &["pull", "--help"], &["status", "--help"]] {
        let (_, help, _) = run(&agent, args);
        assert!(!help.contains("exit-with-stdin"), "{args:?}: {help}");
    }
}
