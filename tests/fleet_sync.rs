//! `fleetsync sync --via ssh` end to end (moto's group, one real sshd per
//! instance with its own /srv, the agent on each) and the fleet lock as
//! deploys see it.

mod common;

use std::process::Command;

use common::{assert_tree, deploy_command, fleet, ids, sample_tree, Bucket, FaultProxy, Nodes};

/// `fleetsync sync --via ssh` for `asg`: (exit code, JSON report or Null, stderr).
fn sync(asg: &str, source: &str, dest: &str, nodes: &Nodes, extra: &[&str]) -> (i32, serde_json::Value, String) {
    common::deploy(asg, source, dest, nodes, "ssh", extra)
}

#[tokio::test]
async fn every_node_converges_and_a_second_sync_downloads_nothing() {
    let b = Bucket::new("fleetsync").await;
    let tree = sample_tree(60, 31);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group("web", 3);

    let (code, report, stderr) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 3, "{report}");
    assert_eq!(report["totals"]["downloaded"], 3 * tree.len() as u64);
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &tree);
    }
    // The lock was released.
    let lock = b.fleet_lock("app", &asg);
    assert!(fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none());

    let (code, report, _) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 0);
    assert_eq!(report["totals"]["downloaded"], 0, "{report}");
    assert_eq!(report["nodes"][0]["agent"]["counts"]["unchanged"], tree.len() as u64);
}

#[tokio::test]
async fn an_unreachable_node_fails_with_the_reason_and_max_errors_stops_the_rest() {
    let b = Bucket::new("fleetdown").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("down", 3);
    let ids = ids(&asg);
    nodes.stop(&ids[0]);

    let (code, report, _) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 1, "{report}");
    let down = report["nodes"].as_array().unwrap().iter().find(|n| n["instance_id"] == ids[0].as_str()).unwrap();
    assert_eq!(down["status"], "failed");
    assert!(down["error"].as_str().unwrap().contains("Connection refused"), "{down}");
    assert_eq!(report["totals"]["ok"], 2);

    // Two nodes down, one at a time, no errors tolerated: after the first
    // failure nothing else is started.
    nodes.stop(&ids[1]);
    let (code, report, _) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &["--batch", "1", "--max-errors", "0"]);
    assert_eq!(code, 1);
    assert_eq!((report["totals"]["failed"].as_u64(), report["totals"]["not_attempted"].as_u64()), (Some(1), Some(2)), "{report}");
}

#[tokio::test]
async fn a_held_lock_exits_3_naming_the_holder_and_touches_no_node() {
    let b = Bucket::new("fleetheld").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("held", 2);
    let lock = b.fleet_lock("app", &asg);
    let lease = std::time::Duration::from_secs(60);
    let held = fleetsync::fleet_lock::acquire(
        &b.client,
        &lock,
        fleetsync::fleet_lock::LockInfo::for_this_process("ci deploy 42", lease),
        lease,
        std::time::Duration::ZERO,
    )
    .await
    .unwrap();

    let (code, _, stderr) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("ci deploy 42") && stderr.contains("lock"), "{stderr}");
    for (_, root) in nodes.list() {
        assert!(!root.join("www").exists());
    }
    held.release().await.unwrap();
}

#[tokio::test]
async fn hostile_arguments_reach_the_agent_verbatim() {
    let b = Bucket::new("fleetquote").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("quote", 1);
    let dest = "/srv/we ird; touch /srv/pwned1 $(touch /srv/pwned2) `touch /srv/pwned3` 'q\" x";
    let (code, report, stderr) = sync(&asg, &b.url("app"), dest, &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    let (_, root) = &nodes.list()[0];
    let dir = root.join(dest.trim_start_matches("/srv/"));
    assert_eq!(std::fs::read(dir.join("index.php")).unwrap(), b"<?php");
    for p in ["pwned1", "pwned2", "pwned3"] {
        assert!(!root.join(p).exists(), "{p} was created: the argument was run as a command");
    }
}

#[tokio::test]
async fn a_failed_canary_stops_the_deploy() {
    let b = Bucket::new("fleetcanary").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("canary", 3);
    let ids = ids(&asg);
    nodes.stop(&ids[0]); // targets go in instance-id order: this one is the canary

    let (code, report, _) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &["--canary", "1"]);
    assert_eq!(code, 1);
    assert_eq!((report["totals"]["failed"].as_u64(), report["totals"]["not_attempted"].as_u64()), (Some(1), Some(2)), "{report}");
    for (_, root) in nodes.list() {
        assert!(!root.join("www").exists(), "no node after the canary was touched");
    }
}

#[tokio::test]
async fn an_instance_that_joins_during_the_deploy_is_synced_before_the_command_exits() {
    let b = Bucket::new("fleetjoin").await;
    let tree = sample_tree(40, 41);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group("join", 2);
    let before = ids(&asg);

    // Hold one node's agent lock: its pull waits (--if-busy wait), so the
    // first pass cannot end before the new instance has its sshd.
    let node_lock = Nodes::hold_agent_lock(&nodes.list()[0].1);

    let child = deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssh")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first discovery is done once the other node has its tree (a
    // fixed sleep raced a slow start: the new instance was then in the
    // first listing, or in none).
    let other = nodes.list()[1].1.join("www").join(tree.keys().next().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !other.exists() {
        assert!(std::time::Instant::now() < deadline, "the deploy never synced {}", other.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    fleet(&["scale", &asg, "3"]);
    let joined: Vec<String> = ids(&asg).into_iter().filter(|i| !before.contains(i)).collect();
    assert_eq!(joined.len(), 1);
    let more = Nodes::up_in(&asg, &nodes);
    drop(node_lock);

    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("joined the group during the deploy"), "the second pass found it: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["totals"]["ok"], 3, "{report}");
    assert!(report["nodes"].as_array().unwrap().iter().any(|n| n["instance_id"] == joined[0].as_str()));
    assert_tree(&more.join(&joined[0]).join("srv/www"), &tree);
}

#[tokio::test]
async fn dry_run_names_the_nodes_the_command_and_the_lock_and_changes_nothing() {
    let b = Bucket::new("fleetdry").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("dry", 2);
    let dry_run = |verb: &str| {
        let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
            .args([verb, "--via", "ssh", "--group", &asg, "--source", &b.url("app"), "--dest", "/srv/www", "--dry-run"])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, stdout) = dry_run("sync");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("would run on 2 nodes over ssh: fleetsync-agent pull"), "{stdout}");
    assert!(stdout.contains("is free") && stdout.matches("\n  sync i-").count() == 2, "{stdout}");
    // A rollback's dry run says rollback, node by node.
    let (code, stdout) = dry_run("rollback");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("fleetsync-agent rollback") && stdout.matches("\n  rollback i-").count() == 2, "{stdout}");
    for (_, root) in nodes.list() {
        assert!(!root.join("www").exists());
    }
}

#[tokio::test]
async fn of_ten_deploys_started_at_once_exactly_one_syncs_and_nine_exit_3() {
    let b = Bucket::new("fleetten").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("ten", 2);
    // Whoever wins stays busy (a node's pull waits for this lock) until
    // every other deploy has given up.
    let node_lock = Nodes::hold_agent_lock(&nodes.list()[0].1);

    let children: Vec<_> = (0..10)
        .map(|_| {
            deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut pending: Vec<_> = children.into_iter().collect();
    let mut losers = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while losers.len() < 9 && std::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for mut c in pending {
            match c.try_wait().unwrap() {
                Some(_) => losers.push(c.wait_with_output().unwrap()),
                None => still.push(c),
            }
        }
        pending = still;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!((losers.len(), pending.len()), (9, 1), "nine gave up while one deploy holds the lock");
    for out in &losers {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("holds the fleet lock") && stderr.contains("pid"), "the holder is named: {stderr}");
    }
    drop(node_lock);
    let winner = pending.pop().unwrap().wait_with_output().unwrap();
    assert_eq!(winner.status.code(), Some(0), "{}", String::from_utf8_lossy(&winner.stderr));
    let report: serde_json::Value = serde_json::from_slice(&winner.stdout).unwrap();
    assert_eq!(report["totals"]["ok"], 2, "{report}");
}

#[tokio::test]
async fn a_deploy_whose_lock_is_broken_starts_no_more_nodes() {
    let b = Bucket::new("fleetlost").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("lost", 2);
    // The first node started (instance-id order) stays busy.
    let node_lock = Nodes::hold_agent_lock(&nodes.dir.path().join(&ids(&asg)[0]).join("srv"));

    // One node at a time, a 3 s lease renewed every second.
    let child = deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssh")
        .args(["--batch", "1", "--lock-lease", "3s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lock = b.fleet_lock("app", &asg);
    while fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["lock", "break", "--group", &asg, "--source", &b.url("app")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("broke the lock"), "{out:?}");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await; // past the next renewal
    drop(node_lock);

    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lock was lost"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = &report["nodes"][1];
    assert_eq!(second["status"], "not-attempted", "{report}");
    assert!(second["error"].as_str().unwrap().contains("fleet lock was lost"), "{second}");
}

#[tokio::test]
async fn fleetsync_toml_supplies_the_flags_and_flags_override_it() {
    let b = Bucket::new("fleetconf").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("conf", 1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fleetsync.toml"),
        format!(
            "group = '{asg}'\nsource = '{}'\ndest = '/srv/www'\nvia = 'ssh'\nbatch = '50%'\nssh-config = '{}'\n",
            b.url("app"),
            nodes.ssh_config()
        ),
    )
    .unwrap();
    let fleetsync = || {
        let mut c = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
        c.current_dir(dir.path());
        c
    };
    let out = fleetsync().args(["sync", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let root = &nodes.list()[0].1;
    assert_eq!(std::fs::read(root.join("www/index.php")).unwrap(), b"<?php");

    let out = fleetsync().args(["sync", "--dest", "/srv/other"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(root.join("other/index.php")).unwrap(), b"<?php", "--dest overrode the file");

    // SSM's documents run at most 48 hours (and the SSM agent would quietly
    // run a larger executionTimeout with one hour): refused up front.
    let out = fleetsync().args(["sync", "--via", "ssm", "--timeout", "49h"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--timeout") && stderr.contains("48h") && stderr.trim().lines().count() == 1, "{stderr}");

    // A misspelt key is a one-line configuration error naming the file.
    std::fs::write(dir.path().join("bad.toml"), "max_errors = 2\n").unwrap();
    let out = fleetsync().args(["--config", "bad.toml", "sync"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml") && stderr.contains("max_errors") && stderr.trim().lines().count() == 1, "{stderr}");
}

#[tokio::test]
async fn an_interrupted_deploy_releases_the_fleet_lock_at_once() {
    let b = Bucket::new("fleetint").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("int", 2);
    let _busy = Nodes::hold_agent_lock(&nodes.list()[0].1);
    let lock = b.fleet_lock("app", &asg);

    for (via, signal) in [("ssm", "-INT"), ("ssh", "-TERM")] {
        let child = deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, via)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await; // the nodes were started
        Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{via}: {stderr}");
        assert!(stderr.contains("releasing the fleet lock"), "{stderr}");
        assert!(fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none(), "{via}: the lock was released");
    }
}

#[tokio::test]
async fn an_agent_past_the_ssh_timeout_is_stopped_and_never_switches_afterwards() {
    let b = Bucket::new("sshgone").await;
    b.put("app/index.php", b"<?php").await;
    // The node's first object GET stalls for 5 s (then succeeds when
    // retried), past the bastion's --timeout of 2 s: the agent has printed
    // its listing and writes nothing more until after its switch. A
    // non-interactive ssh session has no terminal, so sshd sends no SIGHUP
    // when the bastion kills ssh: only the agent's watch on its stdin stops it.
    let stalling = FaultProxy::start(&common::endpoint(), &["--rate", "1", "--kinds", "stall", "--stall", "5", "--max-faults", "1"]);
    let (asg, nodes) = Nodes::group_with_env("sshgone", 1, &[("AWS_ENDPOINT_URL_S3", &stalling.url)]);
    let root = nodes.list()[0].1.clone();
    let state = format!("/srv/state-{}", common::unique("gone"));
    let (code, report, stderr) = sync(&asg, &b.url("app"), "/srv/rel", &nodes, &["--releases", "--state-dir", &state, "--timeout", "2"]);
    assert_eq!(code, 1, "{stderr}\n{report}");
    assert!(report["nodes"][0]["error"].as_str().unwrap().contains("timed out after 2 s"), "{report}");
    // An agent still running would go live once its retried GET succeeds.
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    assert_eq!(stalling.stats()["stall"], 1, "the GET was stalled");
    assert!(!root.join("rel/current").exists(), "no release went live after the bastion reported the node failed");
    let running = Command::new("pgrep").args(["-f", &state]).output().unwrap();
    assert!(running.stdout.is_empty(), "the agent is gone: {}", String::from_utf8_lossy(&running.stdout));
}

#[tokio::test]
async fn a_paused_holder_whose_lease_expired_is_taken_over_and_stops_when_it_resumes() {
    let b = Bucket::new("fleetpause").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("pause", 2);
    // The first node started (instance-id order) stays busy while we act.
    let node_lock = Nodes::hold_agent_lock(&nodes.dir.path().join(&ids(&asg)[0]).join("srv"));
    let lock = b.fleet_lock("app", &asg);
    let spawn = || {
        deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssh")
            .args(["--batch", "1", "--lock-lease", "3s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn();
    while fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Command::new("kill").args(["-STOP", &first.id().to_string()]).status().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await; // longer than the lease

    let second = spawn();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await; // it took the lock over
    drop(node_lock);
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "the new holder proceeds: {stderr}");
    assert!(stderr.contains("took over an expired fleet lock"), "{stderr}");

    Command::new("kill").args(["-CONT", &first.id().to_string()]).status().unwrap();
    let out = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the resumed holder fails: {stderr}");
    assert!(stderr.contains("lock was lost"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["nodes"][1]["status"], "not-attempted", "it started no node after resuming: {report}");
}

/// The version handshake: each node's agent version is in the report, a
/// fleet on two versions is warned about, and a report format this
/// bastion does not know is that node's error, not a parse failure. One
/// node runs its own agent from /srv/bin (first on the node's PATH, as
/// /usr/local/bin is on an instance): the real agent, its report rewritten
/// as an older or a newer agent would print it.
#[tokio::test]
async fn agent_versions_are_reported_mixed_fleets_warned_and_unknown_report_formats_named() {
    let b = Bucket::new("fleetver").await;
    b.put_tree("app/", &sample_tree(5, 3)).await;
    let (asg, nodes) = Nodes::group("ver", 3);
    let (odd_ip, odd_root) = nodes.list()[0].clone();
    let as_other_agent = |sed: &str| {
        let bin = odd_root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = format!("#!/bin/bash\nset -o pipefail\n'{}' \"$@\" | sed -e '{sed}'\n", common::agent_bin().display());
        std::fs::write(bin.join("fleetsync-agent"), script).unwrap();
        std::fs::set_permissions(bin.join("fleetsync-agent"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    let odd =
        |report: &serde_json::Value| report["nodes"].as_array().unwrap().iter().find(|n| n["address"] == odd_ip.as_str()).unwrap().clone();

    as_other_agent(r#"s/"agent_version":"[^"]*"/"agent_version":"0.0.9 (old)"/"#);
    let (code, report, stderr) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(odd(&report)["agent_version"], "0.0.9 (old)");
    let versions = report["agent_versions"].as_object().unwrap();
    assert_eq!((versions.len(), versions.get(fleetsync::VERSION).and_then(|n| n.as_u64())), (2, Some(2)), "{report}");
    let warning = format!("warning: the fleet runs 2 agent versions: 0.0.9 (old) on 1 node, {} on 2 nodes", fleetsync::VERSION);
    assert!(stderr.contains(&warning), "{stderr}");

    as_other_agent(r#"s/"format":1,/"format":2,/"#);
    let (code, report, stderr) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 1, "{stderr}\n{report}");
    let node = odd(&report);
    let error = node["error"].as_str().unwrap_or_default();
    assert_eq!(node["status"], "failed", "{node}");
    assert!(error.contains("writes report format 2") && error.contains("upgrade fleetsync"), "{error}");
    assert_eq!(report["totals"]["ok"], 2, "{report}");
}

/// `--json` reports, of a deploy that succeeds (one instance skipped as
/// Unhealthy) and of one that fails (an empty source, refused by every
/// agent), match docs/fleet-report.schema.json; under GitHub Actions
/// (GITHUB_STEP_SUMMARY) each deploy appends a Markdown summary.
#[tokio::test]
async fn json_reports_match_their_schema_and_ci_gets_a_job_summary() {
    let b = Bucket::new("schema").await;
    b.put_tree("app/", &sample_tree(10, 3)).await;
    let (asg, nodes) = Nodes::group("schema", 3);
    let ids = ids(&asg);
    fleet(&["health", &ids[2], "Unhealthy"]);
    let summary = tempfile::NamedTempFile::new().unwrap();
    for (source, want) in [(b.url("app"), 0), (b.url("nothing-here"), 1)] {
        let (code, report, stderr) =
            common::run_report(deploy_command(&asg, &source, "/srv/www", &nodes, "ssh").env("GITHUB_STEP_SUMMARY", summary.path()));
        assert_eq!(code, want, "{stderr}");
        common::check_fleet_schema(&report);
    }
    let md = std::fs::read_to_string(summary.path()).unwrap();
    assert!(md.contains(&format!("### fleetsync sync of `{asg}` succeeded")), "{md}");
    assert!(md.contains(&format!("### fleetsync sync of `{asg}` FAILED")), "{md}");
    assert!(md.contains(&format!("| `{}` | Failed |", ids[0])), "{md}");
}
