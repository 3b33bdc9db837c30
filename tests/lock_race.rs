//! The fleet lock under a stampede: 20 bastions started at once on one
//! group, 20 rounds. Each round exactly one deploys and the other 19 exit 3;
//! across all rounds no two deploys ever ran on a node at the same time, by
//! the timestamps each node's agent reported and by the SSM emulator's log
//! of every invocation (which would also show a loser that reached a node).

mod common;

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{deploy_command, ids, Bucket, Nodes};

const BASTIONS: usize = 20;

/// Rounds (default 20); `FLEETSYNC_LOCK_RACE_ROUNDS` for a longer soak.
fn rounds() -> usize {
    std::env::var("FLEETSYNC_LOCK_RACE_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20)
}

/// Every intervals list sorted by start has each start at or after the
/// previous end; returns the first overlap found.
fn first_overlap(intervals: &mut [(u64, u64)]) -> Option<((u64, u64), (u64, u64))> {
    intervals.sort();
    intervals.windows(2).find(|w| w[1].0 < w[0].1).map(|w| (w[0], w[1]))
}

#[tokio::test]
async fn twenty_bastions_at_once_twenty_times_one_holder_per_round_and_no_deploys_overlap() {
    let b = Bucket::new("race").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("race", 2);
    let instance_ids = ids(&asg);
    let first_root = nodes.dir.path().join(&instance_ids[0]).join("srv");
    let started = Instant::now();

    // Per node, the (start, end) of each pull its agent reported.
    let mut pulls: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for round in 0..rounds() {
        // The winner's first node waits on this until every loser has
        // given up, so no second bastion can win the same round by arriving
        // after the winner finished.
        let busy = Nodes::hold_agent_lock(&first_root);
        let mut pending: Vec<_> = (0..BASTIONS)
            .map(|_| {
                deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut done: Vec<Output> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.len() < BASTIONS - 1 && Instant::now() < deadline {
            let mut still = Vec::new();
            for mut c in pending {
                match c.try_wait().unwrap() {
                    Some(_) => done.push(c.wait_with_output().unwrap()),
                    None => still.push(c),
                }
            }
            pending = still;
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(busy);
        done.extend(pending.into_iter().map(|c| c.wait_with_output().unwrap()));

        let (winners, losers): (Vec<_>, Vec<_>) = done.iter().partition(|o| o.status.code() == Some(0));
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one holder; exit codes {:?}",
            done.iter().map(|o| o.status.code()).collect::<Vec<_>>()
        );
        for out in &losers {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "round {round}: {stderr}");
            assert!(stderr.contains("holds the fleet lock"), "round {round}: {stderr}");
        }
        let report: serde_json::Value = serde_json::from_slice(&winners[0].stdout).unwrap();
        assert_eq!(report["totals"]["ok"], 2, "round {round}: {report}");
        for node in report["nodes"].as_array().unwrap() {
            let agent = &node["agent"];
            let span = (agent["started_at_ms"].as_u64().unwrap(), agent["finished_at_ms"].as_u64().unwrap());
            pulls.entry(node["instance_id"].as_str().unwrap().to_string()).or_default().push(span);
        }
    }

    // What each node's agent reported, and what the SSM emulator ran.
    let calls = std::fs::read_to_string(std::path::Path::new(&std::env::var("FLEETSYNC_SSM_DIR").unwrap()).join("calls.jsonl")).unwrap();
    let mut invocations: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for c in calls.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        if c["op"] == "invocation" && instance_ids.iter().any(|i| c["instance_id"] == i.as_str()) {
            let ms = |k: &str| (c[k].as_f64().unwrap() * 1000.0) as u64;
            invocations.entry(c["instance_id"].as_str().unwrap().to_string()).or_default().push((ms("start"), ms("end")));
        }
    }
    for id in &instance_ids {
        let reported = pulls.get_mut(id).unwrap();
        assert_eq!(reported.len(), rounds(), "{id}: one pull per round");
        assert_eq!(first_overlap(reported), None, "{id}: two deploys' pulls overlapped");
        let ran = invocations.get_mut(id).unwrap();
        assert_eq!(ran.len(), rounds(), "{id}: the emulator ran exactly one command per round (a loser reached no node)");
        assert_eq!(first_overlap(ran), None, "{id}: two invocations overlapped");
    }
    println!(
        "lock race: {} rounds x {BASTIONS} bastions in {:.0} s: 1 holder and {} exits 3 per round; pulls per node {}, overlapping 0",
        rounds(),
        started.elapsed().as_secs_f64(),
        BASTIONS - 1,
        rounds()
    );
}
