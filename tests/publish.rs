//! `fleetsync publish` then `fleetsync-agent pull --releases`, against the
//! local S3 server: only content the store lacks is uploaded (large files
//! as blobs included), modes, deletions, symlinks, and a plain prefix that
//! changes under a release build.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{publish, read_tree, run_json, Bucket, FaultProxy, Node};

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
    // A group-writable file keeps its group write bit; a world-writable
    // one does not (any local user could change the site's code).
    write(build.path(), "storage/cache.json", b"{}", 0o664);
    write(build.path(), "public/open.txt", b"open", 0o666);
    let big: Vec<u8> = (0..9 * 1024 * 1024 + 17).map(|i| (i % 253) as u8).collect();
    write(build.path(), "public/video.mp4", &big, 0o644);

    let (code, r, stderr) = publish(build.path(), &b.url("app"), &["--release-id", "build-7"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["uploaded_files"].as_u64(), r["files"].as_u64(), r["blobs_uploaded"].as_u64()), (Some(34), Some(34), Some(1)), "{r}");

    let node = Node::new();
    let (code, pulled, stderr) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(pulled["release"]["id"], "build-7", "the agent follows the latest release");
    let live = node.dest.join("current");
    assert_eq!(read_tree(&live), read_tree(build.path()), "byte-identical, and the pointer is not part of the tree");
    let mode = std::fs::metadata(live.join("bin/console")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "the script stays executable");
    let mode = |rel: &str| std::fs::metadata(live.join(rel)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("storage/cache.json"), mode("public/open.txt")), (0o664, 0o664), "others' write bit dropped");

    // The same tree again under another id: nothing to upload (the blob included).
    let (code, r, _) = publish(build.path(), &b.url("app"), &[]);
    assert_eq!(code, 0);
    assert_eq!((r["uploaded_files"].as_u64(), r["reused_files"].as_u64()), (Some(0), Some(34)), "{r}");

    // A change and a deletion: one upload, and the node follows.
    write(build.path(), "app/src/f0.php", b"<?php // changed", 0o644);
    std::fs::remove_file(build.path().join("app/src/f1.php")).unwrap();
    let (code, r, _) = publish(build.path(), &b.url("app"), &["--release-id", "build-8"]);
    assert_eq!(code, 0);
    assert_eq!((r["uploaded_files"].as_u64(), r["files"].as_u64()), (Some(1), Some(33)), "{r}");
    let (code, pulled, _) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("build-8")), "{pulled}");
    assert_eq!(pulled["counts"]["downloaded"], 1, "{pulled}");
    assert_eq!(read_tree(&live), read_tree(build.path()));

    // Only a file's group write bit changes: another release (not
    // "unchanged"), and the node makes it live with the bit.
    std::fs::set_permissions(build.path().join("app/src/f2.php"), std::fs::Permissions::from_mode(0o664)).unwrap();
    let (code, r, _) = publish(build.path(), &b.url("app"), &[]);
    assert_eq!((code, r["unchanged"].as_bool()), (0, Some(false)), "{r}");
    let (code, pulled, _) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, r["release_id"].as_str()), "{pulled}");
    assert_eq!(std::fs::metadata(live.join("app/src/f2.php")).unwrap().permissions().mode() & 0o777, 0o664);
}

#[tokio::test]
async fn symlinks_inside_the_release_are_kept_and_others_refused_unless_followed() {
    let b = Bucket::new("publink").await;
    let build = tempfile::tempdir().unwrap();
    write(build.path(), "index.php", b"<?php", 0o644);
    write(build.path(), "storage/app/public/logo.svg", b"<svg/>", 0o644);
    std::os::unix::fs::symlink("/etc/hostname", build.path().join("leak")).unwrap();
    let (code, _, stderr) = publish(build.path(), &b.url("app"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("leak") && stderr.contains("absolute target") && stderr.contains("--follow-symlinks"), "{stderr}");
    let listed = b.client.list_objects_v2().bucket(&b.name).send().await.unwrap();
    assert_eq!(listed.contents().len(), 0, "nothing was uploaded");
    std::fs::remove_file(build.path().join("leak")).unwrap();
    std::os::unix::fs::symlink("../../etc", build.path().join("storage/up")).unwrap();
    let (code, _, stderr) = publish(build.path(), &b.url("app"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("more `..` than the link is deep"), "{stderr}");

    // Capistrano's kind of link, relative and inside: kept as a symlink.
    std::fs::remove_file(build.path().join("storage/up")).unwrap();
    std::fs::create_dir_all(build.path().join("web")).unwrap();
    std::os::unix::fs::symlink("../storage/app/public", build.path().join("web/storage")).unwrap();
    let (code, r, stderr) = publish(build.path(), &b.url("app"), &["--release-id", "links"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["files"], 2, "{r}");
    let node = Node::new();
    let (code, _, stderr) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 0, "{stderr}");
    let link = node.dest.join("current/web/storage");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../storage/app/public"));
    assert_eq!(std::fs::read(link.join("logo.svg")).unwrap(), b"<svg/>", "it resolves inside the release");

    // --follow-symlinks uploads what the link points to instead.
    let (code, r, stderr) = publish(build.path(), &b.url("app"), &["--follow-symlinks"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["files"], 3, "{r}");
}

#[tokio::test]
async fn a_plain_prefix_changing_under_a_release_build_fails_the_build_and_nothing_goes_live() {
    // A prefix written by something else (aws s3 sync here): listed, then
    // fetched with If-Match. An object replaced in between fails the build.
    let b = Bucket::new("pubplain").await;
    for k in ["a.php", "b.php", "c.php"] {
        b.put(&format!("app/{k}"), b"v1").await;
    }
    let node = Node::new();
    let (code, r1, stderr) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 0, "{stderr}");
    let v1 = r1["release"]["id"].as_str().unwrap().to_string();
    b.put("app/a.php", b"v2").await;
    // Every object GET stalls 2 s once: b.php is replaced meanwhile.
    let stall = FaultProxy::start(
        &common::endpoint(),
        &["--rate", "1", "--kinds", "stall", "--stall", "2", "--max-faults", "1", "--only", "/app/"],
    );
    let mut agent = node.agent(&b.url("app"));
    let child = agent.arg("--releases").env("AWS_ENDPOINT_URL_S3", &stall.url).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    b.put("app/b.php", b"v3").await;
    b.put("app/a.php", b"v3").await;
    let out = child.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert!(r["errors"].to_string().contains("replaced after it was listed"), "{r}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases").join(&v1), "the live release stays");
    // The next pull lists again and goes live whole.
    let (code, _, stderr) = run_json(node.agent(&b.url("app")).arg("--releases"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(node.dest.join("current/a.php")).unwrap(), b"v3");
    assert_eq!(std::fs::read(node.dest.join("current/b.php")).unwrap(), b"v3");

    // In-place mode never copies fleetsync's own objects into DEST.
    let plain = Node::new();
    assert_eq!(run_json(&mut plain.agent(&b.url("app"))).0, 0);
    assert!(!plain.dest.join(".fleetsync").exists());
}

#[tokio::test]
async fn an_in_place_pull_of_a_published_prefix_says_to_use_release_mode() {
    // Everything a publish writes is under .fleetsync/, which a listing
    // skips: an in-place pull would find nothing and report ok.
    let b = Bucket::new("pubinplace").await;
    let build = common::build_dir(3, "v1");
    assert_eq!(publish(build.path(), &b.url("app"), &[]).0, 0);
    let node = Node::new();
    for dry_run in [false, true] {
        let mut agent = node.agent(&b.url("app"));
        if dry_run {
            agent.arg("--dry-run");
        }
        let (code, _, stderr) = run_json(&mut agent);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("holds a release store") && stderr.contains("--releases"), "{stderr}");
    }
    assert_eq!(std::fs::read_dir(&node.dest).unwrap().count(), 0, "nothing was written");
}
