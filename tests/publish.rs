//! `fleetsync publish` then `fleetsync-agent pull --releases`, against the
//! local S3 server: ETag-diffed uploads (multipart-sized files included),
//! modes, deletions, symlinks, and the release pointer that agents follow.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{publish, read_tree, run_json, Bucket, Node};

fn write(root: &Path, rel: &str, body: &[u8], mode: u32) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_published_build_reaches_nodes_whole_with_modes_and_a_second_publish_uploads_nothing() {
    let b = Bucket::new("pubround").await;
    let build = tempfile::tempdir().unwrap();
    for i in 0..30 {
        write(build.path(), &format!("app/src/f{i}.php"), format!("<?php // {i}").as_bytes(), 0o644);
    }
    write(build.path(), "bin/console", b"#!/bin/sh\necho hi\n", 0o755);
    let big: Vec<u8> = (0..9 * 1024 * 1024 + 17).map(|i| (i % 253) as u8).collect();
    write(build.path(), "public/video.mp4", &big, 0o644);

    let (code, r, stderr) = publish(build.path(), &b.url("app"), &["--release-id", "build-7"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["uploaded"].as_u64(), r["files"].as_u64()), (Some(32), Some(32)), "{r}");

    let node = Node::new();
    let (code, pulled, stderr) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(pulled["release"]["id"], "build-7", "the agent names the release after the pointer");
    let live = node.dest.join("current");
    assert_eq!(read_tree(&live), read_tree(build.path()), "byte-identical, and the pointer is not part of the tree");
    let mode = std::fs::metadata(live.join("bin/console")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "the script stays executable");

    // The same tree again: nothing to upload (the multipart file included).
    let (code, r, _) = publish(build.path(), &b.url("app"), &[]);
    assert_eq!(code, 0);
    assert_eq!((r["uploaded"].as_u64(), r["unchanged"].as_u64()), (Some(0), Some(32)), "{r}");

    // A change and a deletion: one upload, one delete, and the node follows.
    write(build.path(), "app/src/f0.php", b"<?php // changed", 0o644);
    std::fs::remove_file(build.path().join("app/src/f1.php")).unwrap();
    let (code, r, _) = publish(build.path(), &b.url("app"), &["--release-id", "build-8"]);
    assert_eq!(code, 0);
    assert_eq!((r["uploaded"].as_u64(), r["deleted"].as_u64()), (Some(1), Some(1)), "{r}");
    let (code, pulled, _) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("build-8")), "{pulled}");
    assert_eq!(pulled["counts"]["downloaded"], 1, "{pulled}");
    assert_eq!(read_tree(&live), read_tree(build.path()));
}

#[tokio::test]
async fn symlinks_are_refused_unless_followed_and_nothing_is_uploaded() {
    let b = Bucket::new("publink").await;
    let build = tempfile::tempdir().unwrap();
    write(build.path(), "index.php", b"<?php", 0o644);
    std::os::unix::fs::symlink("/etc/hostname", build.path().join("leak")).unwrap();
    let (code, _, stderr) = publish(build.path(), &b.url("app"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("leak is a symlink") && stderr.contains("--follow-symlinks"), "{stderr}");
    let listed = b.client.list_objects_v2().bucket(&b.name).send().await.unwrap();
    assert_eq!(listed.contents().len(), 0, "nothing was uploaded");

    std::fs::remove_file(build.path().join("leak")).unwrap();
    std::os::unix::fs::symlink("index.php", build.path().join("alias.php")).unwrap();
    let (code, r, stderr) = publish(build.path(), &b.url("app"), &["--follow-symlinks"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["uploaded"], 2);
}

#[tokio::test]
async fn an_agent_refuses_a_source_that_does_not_match_its_pointer() {
    let b = Bucket::new("pubmid").await;
    let build = tempfile::tempdir().unwrap();
    write(build.path(), "index.php", b"v1", 0o644);
    assert_eq!(publish(build.path(), &b.url("app"), &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    assert_eq!(run_json(node.agent(&b.url("app")).arg("--releases")).0, 0);

    // An upload the pointer does not describe: a publish in progress.
    b.put("app/half-published.php", b"?").await;
    let (code, r, _) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 1, "{r}");
    assert!(r["error"].as_str().unwrap().contains("does not match its release pointer"), "{r}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/r1"));
    assert!(!node.dest.join("current/half-published.php").exists());

    // In-place mode never copies fleetsync's own objects into DEST.
    let plain = Node::new();
    assert_eq!(run_json(&mut plain.agent(&b.url("app"))).0, 0);
    assert!(!plain.dest.join(".fleetsync").exists());
}
