//! Faults injected between the agent and S3 (infra/local/faultproxy.py on
//! loopback, seeded): HTTP 500 and 503 SlowDown, connections reset
//! mid-body, bodies truncated under their original Content-Length, flipped
//! bytes, and stalls longer than the read timeout. A 10,000-file pull
//! through at least 5% faulted requests must converge with every file
//! byte-identical to its object and no partial file anywhere. A large
//! object fetched as parallel ranges with flipped bytes must be caught by
//! its whole-object MD5 and fetched again.

mod common;

use std::path::Path;

use common::{assert_tree, read_tree, run_json, sample_tree, Bucket, FaultProxy, Node};

/// Files under `dir` whose names only fleetsync's temporary files carry.
fn partial_files(dir: &Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".fleetsync") {
            n += 1;
        } else if entry.file_type().unwrap().is_dir() {
            n += partial_files(&entry.path());
        }
    }
    n
}

#[tokio::test]
async fn a_pull_through_injected_faults_converges_with_nothing_corrupt_or_partial() {
    let b = Bucket::new("faults").await;
    let tree = sample_tree(10_000, 71);
    b.put_tree("app/", &tree).await;
    let proxy = FaultProxy::start(&common::endpoint(), &["--rate", "0.06", "--seed", "7", "--stall", "4"]);
    let node = Node::new();

    let (code, report, stderr) = run_json(node.agent(&b.url("app")).args(["--read-timeout", "2s"]).env("AWS_ENDPOINT_URL_S3", &proxy.url));
    assert_eq!(code, 0, "{stderr}\n{report}");
    let stats = proxy.stats();
    let (faults, requests) = (stats["faults"].as_u64().unwrap(), stats["requests"].as_u64().unwrap());
    assert!(faults * 100 >= requests * 5, "at least 5% of requests faulted: {stats}");
    for kind in ["500", "503", "reset", "truncate", "flip", "stall"] {
        assert!(stats[kind].as_u64().unwrap() > 0, "{kind} was injected: {stats}");
    }
    assert!(report["counts"]["retries"].as_u64().unwrap() > 0, "the report counts the retries: {report}");

    // Every file is its object's bytes; nothing half-written is left.
    let got = read_tree(&node.dest);
    let corrupt = tree.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).count();
    let partial = partial_files(&node.dest);
    println!("faults injected: {faults} of {requests} requests, corrupt files: {corrupt}, partial files: {partial}");
    assert_eq!((corrupt, partial), (0, 0));
    assert_tree(&node.dest, &tree);
}

#[tokio::test]
async fn a_large_object_whose_ranges_are_corrupted_is_verified_whole_and_retried() {
    // 65 MiB: five parallel ranged GETs, hashed in order as they land.
    let b = Bucket::new("faultsbig").await;
    let big: Vec<u8> = (0..(65u32 << 20)).map(|i| (i.wrapping_mul(2246822519) >> 24) as u8).collect();
    b.put("app/big.bin", &big).await;
    // The first range GETs (three, or all that are in flight together) get
    // one flipped byte each: the bodies are complete, so only the whole
    // object's MD5 can tell. The first attempt must fail on it; the next is
    // clean.
    let proxy = FaultProxy::start(&common::endpoint(), &["--rate", "1", "--max-faults", "3", "--kinds", "flip"]);
    let node = Node::new();

    let (code, report, stderr) = run_json(node.agent(&b.url("app")).env("AWS_ENDPOINT_URL_S3", &proxy.url));
    let stats = proxy.stats();
    println!("ranged: {} flipped ranges served of the first attempt's 5, retries {}", stats["flip"], report["counts"]["retries"]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    // At least three: ranges in flight together may all pass the check.
    assert!(stats["flip"].as_u64().unwrap() >= 3, "flipped ranges were served: {stats}");
    assert!(report["counts"]["retries"].as_u64().unwrap() > 0, "{report}");
    assert!(std::fs::read(node.dest.join("big.bin")).unwrap() == big, "big.bin is its object's bytes");
    assert_eq!(partial_files(&node.dest), 0);
}
