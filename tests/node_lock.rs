//! The node lock, with real processes: pulls never overlap, piled-up
//! requests coalesce, and `--if-busy fail` exits 3.

mod common;

use std::fs::OpenOptions;
use std::process::Stdio;
use std::time::Duration;

use common::{assert_tree, run_json, sample_tree, Bucket, Node};

#[tokio::test]
async fn concurrent_pulls_never_overlap_and_piled_up_requests_coalesce() {
    let b = Bucket::new("pileup").await;
    let tree = sample_tree(3000, 8);
    b.put_tree("", &tree).await;
    let node = Node::new();

    let first = node.agent(&b.url("")).stderr(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let waiters: Vec<_> = (0..5).map(|_| node.agent(&b.url("")).stderr(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap()).collect();

    let parse = |c: std::process::Child| {
        let out = c.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = parse(first);
    assert_eq!(first["coalesced"], false);
    assert!(first["counts"]["downloaded"].as_u64().unwrap() > 0);
    let reports: Vec<_> = waiters.into_iter().map(parse).collect();
    for r in &reports {
        assert!(r["durations"]["lock_wait_ms"].as_u64().unwrap() > 0, "every waiter waited: {r}");
    }

    // However many piled up, at most one more pull ran after the first.
    let ran: Vec<_> = reports.iter().filter(|r| r["coalesced"] == false).collect();
    assert_eq!(ran.len(), 1, "exactly one waiter pulls; the others coalesce with it");
    let second = ran[0];
    for r in reports.iter().filter(|r| r["coalesced"] == true) {
        assert_eq!(r["started_at_ms"], second["started_at_ms"], "coalesced onto the second pull");
    }
    // No overlap: the second began after the first ended.
    assert!(second["started_at_ms"].as_u64() >= first["finished_at_ms"].as_u64(), "{first}\n{second}");
    assert_tree(&node.dest, &tree);
}

#[tokio::test]
async fn if_busy_fail_exits_3_while_the_lock_is_held() {
    let b = Bucket::new("busy").await;
    b.put("a.txt", b"a").await;
    let node = Node::new();
    std::fs::create_dir_all(&node.state).unwrap();
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(node.state.join("node.lock")).unwrap();
    lock.lock().unwrap();

    let (code, json, stderr) = run_json(node.agent(&b.url("")).args(["--if-busy", "fail"]));
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(json["status"], "busy");
    assert!(stderr.contains("node lock"), "{stderr}");
    assert!(!node.dest.join("a.txt").exists());

    drop(lock);
    let (code, _, _) = run_json(node.agent(&b.url("")).args(["--if-busy", "fail"]));
    assert_eq!(code, 0);
    assert!(node.dest.join("a.txt").exists());
}
