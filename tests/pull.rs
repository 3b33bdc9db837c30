//! The pull itself, end to end against the local S3 server: correctness of
//! the mirror and the cost of each kind of pull in requests.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{assert_tree, run_json, sample_tree, Bucket, Node};

#[tokio::test]
async fn cold_pull_is_byte_identical_and_a_second_pull_only_lists() {
    let b = Bucket::new("cold").await;
    let mut tree = sample_tree(300, 1);
    // One object large enough for parallel ranged GETs (plain MD5 ETag) and
    // one multipart object (md5-N ETag): both verified paths run.
    let big: Vec<u8> = (0..(65 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    tree.insert("assets/big.bin".into(), big.clone());
    let multi: Vec<u8> = big[..(12 << 20)].iter().rev().cloned().collect();
    b.put_tree("app/", &tree).await;
    b.put_multipart("app/assets/multi.bin", &multi, 5 << 20).await;
    tree.insert("assets/multi.bin".into(), multi);
    let node = Node::new();
    let n = tree.len() as u64;

    let before = b.requests();
    let r = node.pull(&b.url("app")).await;
    assert_eq!((r.counts.listed, r.counts.downloaded, r.counts.failed), (n, n, 0), "{r:?}");
    assert_tree(&node.dest, &tree);
    let cold = b.requests();
    // One GET per small object (the multipart one included) + 5 ranges of
    // the 65 MiB object.
    assert_eq!(cold.get - before.get, (n - 1) + 5, "{cold:?}");

    let r = node.pull(&b.url("app")).await;
    assert_eq!((r.counts.downloaded, r.counts.unchanged, r.counts.deleted), (0, n, 0), "{r:?}");
    let noop = b.requests();
    assert_eq!(noop.get, cold.get, "a no-op pull must not GET: {noop:?}");
    assert_eq!(noop.head, cold.head, "a no-op pull must not HEAD: {noop:?}");
    // The listing is sharded: one LIST of the top level, one per top-level
    // directory (each under 1,000 keys here).
    let top_dirs: std::collections::HashSet<_> = tree.keys().filter_map(|k| k.split_once('/').map(|(d, _)| d)).collect();
    assert_eq!(noop.list - cold.list, 1 + top_dirs.len() as u64, "{noop:?}");
    assert_eq!(noop.other, cold.other);
    assert_tree(&node.dest, &tree);
}

#[tokio::test]
async fn same_size_change_is_caught() {
    let b = Bucket::new("samesize").await;
    let mut tree = sample_tree(50, 2);
    b.put_tree("", &tree).await;
    let node = Node::new();
    node.pull(&b.url("")).await;

    // Same length, different bytes: what `aws s3 sync` misses.
    let key = tree.keys().nth(10).unwrap().clone();
    let mut body = tree[&key].clone();
    body[0] ^= 0xff;
    b.put(&key, &body).await;
    tree.insert(key, body);

    let r = node.pull(&b.url("")).await;
    assert_eq!((r.counts.downloaded, r.counts.unchanged), (1, tree.len() as u64 - 1), "{r:?}");
    assert_tree(&node.dest, &tree);
}

#[tokio::test]
async fn remote_deletes_propagate_and_foreign_files_are_left_alone() {
    let b = Bucket::new("delete").await;
    let mut tree = sample_tree(40, 3);
    tree.insert("old/deep/gone.txt".into(), b"bye".to_vec());
    b.put_tree("p/", &tree).await;
    let node = Node::new();
    node.pull(&b.url("p")).await;
    std::fs::write(node.dest.join("local-only.txt"), b"mine").unwrap();

    b.delete("p/old/deep/gone.txt").await;
    tree.remove("old/deep/gone.txt");
    let r = node.pull(&b.url("p")).await;
    assert_eq!(r.counts.deleted, 1, "{r:?}");
    // The directories it emptied are gone; the operator's own file stays.
    assert!(!node.dest.join("old").exists());
    assert_eq!(std::fs::read(node.dest.join("local-only.txt")).unwrap(), b"mine");
    tree.insert("local-only.txt".into(), b"mine".to_vec());
    assert_tree(&node.dest, &tree);
}

#[tokio::test]
async fn no_delete_keeps_removed_files() {
    let b = Bucket::new("nodelete").await;
    b.put("a.txt", b"a").await;
    b.put("b.txt", b"b").await;
    let node = Node::new();
    node.pull(&b.url("")).await;
    b.delete("b.txt").await;
    let mut opts = node.options(&b.url(""));
    opts.delete = false;
    let r = fleetsync::pull(&opts, std::sync::Arc::new(fleetsync::progress::Quiet)).await.unwrap();
    assert_eq!(r.counts.deleted, 0);
    assert!(node.dest.join("b.txt").exists());
}

#[tokio::test]
async fn local_drift_is_repaired() {
    let b = Bucket::new("drift").await;
    let tree = sample_tree(30, 4);
    b.put_tree("", &tree).await;
    let node = Node::new();
    node.pull(&b.url("")).await;

    let (k1, k2, k3) = (tree.keys().next().unwrap(), tree.keys().nth(1).unwrap(), tree.keys().nth(2).unwrap());
    std::fs::write(node.dest.join(k1), b"edited on the box").unwrap();
    std::fs::remove_file(node.dest.join(k2)).unwrap();
    // Same size, new mtime: still drift.
    let len = tree[k3].len();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(node.dest.join(k3), vec![b'x'; len]).unwrap();

    let before = b.requests();
    let r = node.pull(&b.url("")).await;
    assert_eq!((r.counts.downloaded, r.counts.repaired), (3, 3), "{r:?}");
    assert_eq!(b.requests().get - before.get, 3);
    assert_tree(&node.dest, &tree);
}

#[tokio::test]
async fn modes_markers_and_dry_run() {
    let b = Bucket::new("modes").await;
    b.put_with_meta("bin/run.sh", b"#!/bin/sh\necho hi\n", Some("0755")).await;
    b.put_with_meta("bin/evil", b"x", Some("4777")).await;
    b.put_with_meta("conf.ini", b"a=1", Some("0666")).await;
    b.put("plain.txt", b"p").await;
    b.put("empty-dir/", b"").await;
    let node = Node::new();

    // Dry run first: prints a plan and touches nothing, not even DEST.
    let mut opts = node.options(&b.url(""));
    opts.dry_run = true;
    let r = fleetsync::pull(&opts, std::sync::Arc::new(fleetsync::progress::Quiet)).await.unwrap();
    assert_eq!(r.counts.downloaded, 4);
    assert_eq!(r.plan.as_ref().unwrap().fetch.len(), 4);
    assert!(!node.dest.exists() && !node.state.exists(), "a dry run wrote something");

    node.pull(&b.url("")).await;
    let mode = |p: &str| std::fs::metadata(node.dest.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin/run.sh"), 0o755);
    assert_eq!(mode("bin/evil"), 0o755, "setuid and world-write must never come from the bucket");
    assert_eq!(mode("conf.ini"), 0o644);
    assert_eq!(mode("plain.txt"), 0o644);
    assert!(node.dest.join("empty-dir").is_dir());
}

#[tokio::test]
async fn an_empty_source_is_refused_rather_than_wiping_dest() {
    let b = Bucket::new("emptysrc").await;
    b.put("app/index.php", b"<?php").await;
    b.put("app/lib/a.php", b"a").await;
    let node = Node::new();
    assert_eq!(run_json(&mut node.agent(&b.url("app"))).0, 0);

    // The build was removed (or the prefix is a typo): nothing is listed.
    b.delete("app/index.php").await;
    b.delete("app/lib/a.php").await;
    let (code, r, _) = run_json(&mut node.agent(&b.url("app")));
    assert_eq!(code, 2, "{r}");
    assert!(r["error"].as_str().unwrap().contains("lists no objects") && r["error"].as_str().unwrap().contains("--allow-empty"), "{r}");
    assert_eq!(std::fs::read(node.dest.join("index.php")).unwrap(), b"<?php", "nothing was deleted");

    // Release mode keeps the live release the same way, also when the
    // server still lists a marker for the emptied prefix.
    let rel = Node::new();
    b.put("app/index.php", b"<?php").await;
    b.put("app/", b"").await;
    assert_eq!(run_json(rel.agent(&b.url("app")).arg("--releases")).0, 0);
    b.delete("app/index.php").await;
    let (code, _, _) = run_json(rel.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 2);
    assert_eq!(std::fs::read(rel.dest.join("current/index.php")).unwrap(), b"<?php");

    // When it is meant: --allow-empty.
    let (code, r, _) = run_json(node.agent(&b.url("app")).arg("--allow-empty"));
    assert_eq!((code, r["counts"]["deleted"].as_u64()), (0, Some(2)), "{r}");
    assert!(!node.dest.join("index.php").exists());
}
