//! `fleetsync sync --via ssh` end to end: moto's group, one real sshd per
//! instance with its own /srv, the agent on each, the fleet lock in S3.

mod common;

use std::process::Command;

use common::{assert_tree, fleet, sample_tree, unique, Bucket, Nodes};

/// Runs `fleetsync sync` for `asg` and returns (exit code, JSON report or Null, stderr).
fn sync(asg: &str, source: &str, dest: &str, nodes: &Nodes, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["sync", "--asg", asg, "--source", source, "--dest", dest, "--state-dir", "/srv/state", "--json"])
        .args(["--ssh-config", &nodes.ssh_config()])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap(), json, stderr)
}

fn ids(asg: &str) -> Vec<String> {
    let mut ids: Vec<String> = fleet(&["describe", asg])["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn every_node_converges_and_a_second_sync_downloads_nothing() {
    let b = Bucket::new("fleetsync").await;
    let tree = sample_tree(60, 31);
    b.put_tree("app/", &tree).await;
    let asg = unique("web");
    fleet(&["create", &asg, "--size", "3"]);
    let nodes = Nodes::up(&asg);

    let (code, report, stderr) = sync(&asg, &b.url("app"), "/srv/www", &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 3, "{report}");
    assert_eq!(report["totals"]["downloaded"], 3 * tree.len() as u64);
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &tree);
    }
    // The lock was released.
    let lock = fleetsync::fleet_lock::LockObject::for_group(&fleetsync::S3Url::parse(&b.url("app")).unwrap(), &asg).unwrap();
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
    let asg = unique("down");
    fleet(&["create", &asg, "--size", "3"]);
    let nodes = Nodes::up(&asg);
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
    let asg = unique("held");
    fleet(&["create", &asg, "--size", "2"]);
    let nodes = Nodes::up(&asg);
    let lock = fleetsync::fleet_lock::LockObject::for_group(&fleetsync::S3Url::parse(&b.url("app")).unwrap(), &asg).unwrap();
    let lease = std::time::Duration::from_secs(60);
    let held = fleetsync::fleet_lock::acquire(&b.client, &lock, fleetsync::fleet_lock::LockInfo::for_this_process("ci deploy 42", lease), lease, std::time::Duration::ZERO)
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
    let asg = unique("quote");
    fleet(&["create", &asg, "--size", "1"]);
    let nodes = Nodes::up(&asg);
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
