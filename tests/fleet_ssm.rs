//! `fleetsync sync --via ssm` end to end: moto's group, the repository's
//! executing SSM emulator (infra/local/ssm_emulator.py) running the agent in
//! each instance's own root, SeaweedFS as the source. The emulator logs
//! every SendCommand and every invocation's start and end, which is how
//! batching and concurrency are checked.

mod common;

use std::collections::HashSet;

use common::{assert_tree, deploy, ids, node_in, sample_tree, Bucket, Nodes};

/// `fleetsync sync --via ssm` for `asg`: (exit code, JSON report or Null, stderr).
fn sync(asg: &str, source: &str, nodes: &Nodes, extra: &[&str]) -> (i32, serde_json::Value, String) {
    deploy(asg, source, "/srv/www", nodes, "ssm", extra)
}

/// What the emulator recorded about the instances in `ids`.
fn ssm_calls(ids: &[String]) -> Vec<serde_json::Value> {
    let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let path = std::path::Path::new(&std::env::var("FLEETSYNC_SSM_DIR").expect("run the tests with infra/local/test")).join("calls.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|c| match c["op"].as_str() {
            Some("SendCommand") => c["instance_ids"].as_array().unwrap().iter().any(|i| ids.contains(i.as_str().unwrap())),
            Some("invocation") => ids.contains(c["instance_id"].as_str().unwrap()),
            _ => false,
        })
        .collect()
}

/// The most invocations that ran at the same moment.
fn peak_overlap(invocations: &[&serde_json::Value]) -> usize {
    let mut edges: Vec<(f64, i32)> =
        invocations.iter().flat_map(|i| [(i["start"].as_f64().unwrap(), 1), (i["end"].as_f64().unwrap(), -1)]).collect();
    // At equal times an end comes before a start: touching is not overlapping.
    edges.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut now, mut peak) = (0, 0);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

#[tokio::test]
async fn every_node_converges_over_ssm_and_a_second_sync_downloads_nothing() {
    let b = Bucket::new("ssmsync").await;
    let tree = sample_tree(60, 51);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group("ssm", 3);

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 3, "{report}");
    assert_eq!(report["totals"]["downloaded"], 3 * tree.len() as u64);
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &tree);
    }
    let (code, report, _) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!(code, 0);
    assert_eq!(report["totals"]["downloaded"], 0, "{report}");
    // The same nodes over SSH agree: nothing to do either.
    let (code, report, _) = deploy(&asg, &b.url("app"), "/srv/www", &nodes, "ssh", &[]);
    assert_eq!((code, report["totals"]["downloaded"].as_u64()), (0, Some(0)), "{report}");
}

#[tokio::test]
async fn sixty_instances_go_out_in_commands_of_at_most_fifty_within_the_batch() {
    let b = Bucket::new("ssmsixty").await;
    let tree = sample_tree(20, 52);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group_ssm("ssm60", 60, 2);
    let ids = ids(&asg);
    assert_eq!(ids.len(), 60);

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--batch", "20"]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 60, "{report}");
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &tree);
    }
    let calls = ssm_calls(&ids);
    let sends: Vec<_> = calls.iter().filter(|c| c["op"] == "SendCommand").collect();
    let sizes: Vec<usize> = sends.iter().map(|c| c["instance_ids"].as_array().unwrap().len()).collect();
    assert_eq!(sizes, [50, 10], "{sends:?}");
    let concurrency: Vec<&str> = sends.iter().map(|c| c["max_concurrency"].as_str().unwrap()).collect();
    assert_eq!(concurrency, ["20", "10"]);
    let runs: Vec<_> = calls.iter().filter(|c| c["op"] == "invocation").collect();
    assert_eq!(runs.len(), 60);
    let peak = peak_overlap(&runs);
    assert!(peak <= 20 && peak > 1, "at most --batch nodes ran at once, and more than one: {peak}");

    // A batch covering the fleet sends both commands at once.
    let (code, report, _) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!((code, report["totals"]["downloaded"].as_u64()), (0, Some(0)), "{report}");
    let sends: Vec<_> = ssm_calls(&ids).into_iter().filter(|c| c["op"] == "SendCommand").skip(2).collect();
    let mut concurrency: Vec<&str> = sends.iter().map(|c| c["max_concurrency"].as_str().unwrap()).collect();
    concurrency.sort();
    assert_eq!(concurrency, ["10", "50"]);
}

#[tokio::test]
async fn failed_timed_out_and_unmanaged_nodes_are_reported_with_the_reason() {
    let b = Bucket::new("ssmfail").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("ssmfail", 4);
    let ids = ids(&asg);
    let root = |id: &str| nodes.dir.path().join(id).join("srv");

    // ids[0]: the agent is not installed (not on the PATH SSM runs with).
    let node_json = nodes.dir.path().join(&ids[0]).join("node.json");
    let mut info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&node_json).unwrap()).unwrap();
    info["env"]["PATH"] = "/usr/bin:/bin".into();
    std::fs::write(&node_json, info.to_string()).unwrap();
    // ids[1]: hangs (another pull holds its node lock) past --timeout.
    let _held = Nodes::hold_agent_lock(&root(&ids[1]));
    // ids[2]: its SSM agent is gone.
    common::fleet(&["ssm-deregister", &ids[2]]);

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--timeout", "3"]);
    assert_eq!(code, 1, "{stderr}\n{report}");
    let missing = node_in(&report, &ids[0]);
    assert_eq!(missing["status"], "failed");
    let e = missing["error"].as_str().unwrap();
    assert!(e.contains("not installed") && e.contains("fleetsync-agent: not found"), "the node's stderr is in the report: {e}");
    let hung = node_in(&report, &ids[1]);
    let e = hung["error"].as_str().unwrap();
    assert!(e.contains("did not finish within 3 s") && e.contains("waiting"), "the agent's last stderr line is in the report: {e}");
    let unmanaged = node_in(&report, &ids[2]);
    assert!(unmanaged["error"].as_str().unwrap().contains("not managed by SSM"), "{unmanaged}");
    assert_eq!(node_in(&report, &ids[3])["status"], "ok");
    assert_eq!(std::fs::read(root(&ids[3]).join("www/index.php")).unwrap(), b"<?php");
}

#[tokio::test]
async fn max_errors_zero_stops_ssm_starting_nodes_after_the_first_failure() {
    let b = Bucket::new("ssmmaxerr").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmmaxerr", 4, 3);
    let ids = ids(&asg);
    // The first node SSM starts (instance-id order) fails: its DEST is a file.
    std::fs::write(nodes.dir.path().join(&ids[0]).join("srv/www"), b"not a directory").unwrap();

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--batch", "1", "--max-errors", "0"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(node_in(&report, &ids[0])["status"], "failed", "{report}");
    for id in &ids[1..] {
        assert_eq!(node_in(&report, id)["status"], "not-attempted", "{report}");
        assert!(!nodes.dir.path().join(id).join("srv/www").exists(), "{id} was not touched");
    }
    let sends: Vec<_> = ssm_calls(&ids).into_iter().filter(|c| c["op"] == "SendCommand").collect();
    assert_eq!((sends[0]["max_concurrency"].as_str(), sends[0]["max_errors"].as_str()), (Some("1"), Some("0")));
}

#[tokio::test]
async fn hostile_arguments_reach_the_agent_verbatim_over_ssm() {
    let b = Bucket::new("ssmquote").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmquote", 1, 3);
    let dest = "/srv/we ird; touch /srv/pwned1 $(touch /srv/pwned2) `touch /srv/pwned3` 'q\" x\nnext";
    let (code, report, stderr) = deploy(&asg, &b.url("app"), dest, &nodes, "ssm", &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    let (_, root) = &nodes.list()[0];
    assert_eq!(std::fs::read(root.join(dest.trim_start_matches("/srv/")).join("index.php")).unwrap(), b"<?php");
    for p in ["pwned1", "pwned2", "pwned3"] {
        assert!(!root.join(p).exists(), "{p} was created: the argument was run as a command");
    }
}
