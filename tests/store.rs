//! The release store end to end against the local S3 server: `fleetsync
//! publish` writes immutable releases, `fleetsync-agent pull --releases`
//! builds exactly one of them, whatever runs concurrently, is killed, or
//! flips bytes on the wire.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{publish, read_tree, run_json, sample_tree, Bucket, FaultProxy, Node};
use fleetsync::store::manifest::{Entry, Location, Manifest};
use fleetsync::store::pointer::{self, Found, Latest};
use fleetsync::store::{Digest, Store};

/// Writes `tree` into a new build directory.
fn build(tree: &BTreeMap<String, Vec<u8>>) -> tempfile::TempDir {
    common::tree_dir(tree)
}

/// A tree of `files` files whose every byte depends on `version`.
fn versioned(files: usize, version: u64) -> BTreeMap<String, Vec<u8>> {
    sample_tree(files, 7)
        .into_iter()
        .map(|(k, v)| {
            let mut body = format!("version {version:06}\n").into_bytes();
            body.extend(v);
            (k, body)
        })
        .collect()
}

fn store_of(b: &Bucket, prefix: &str) -> Store {
    Store::of(&fleetsync::S3Url::parse(&b.url(prefix)).unwrap())
}

/// The latest release's id and manifest.
async fn latest(b: &Bucket, prefix: &str) -> Option<(Latest, Manifest)> {
    let store = store_of(b, prefix);
    match pointer::read::<Latest>(&b.client, &store, &store.latest_key(), None).await.unwrap() {
        Found::Value { value, .. } => {
            let m = fleetsync::store::fetch_manifest(&b.client, &store, &value.release, Some(&value.manifest)).await.unwrap();
            Some((value, m))
        }
        _ => None,
    }
}

/// Every pack and blob a manifest names is in the store.
async fn complete(b: &Bucket, prefix: &str, m: &Manifest) -> bool {
    let store = store_of(b, prefix);
    let mut keys: HashSet<String> = m.header.packs.iter().map(|p| store.pack_key(p)).collect();
    keys.extend(m.files().filter(|f| matches!(f.at, Location::Blob { .. })).map(|f| store.blob_key(&f.hash)));
    for key in keys {
        if b.client.head_object().bucket(&b.name).key(&key).send().await.is_err() {
            return false;
        }
    }
    true
}

/// Checks the live release on `node` file by file against its manifest:
/// every path, mode and SHA-256, and nothing else.
async fn assert_live_is(b: &Bucket, prefix: &str, node: &Node, id: &str) {
    let store = store_of(b, prefix);
    let m = fleetsync::store::fetch_manifest(&b.client, &store, id, None).await.unwrap();
    let live = node.dest.join("current");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases").join(id));
    let on_disk = read_tree(&live);
    let mut files = 0;
    for e in &m.entries {
        if let Entry::File(f) = e {
            files += 1;
            let body = on_disk.get(f.path.as_str()).unwrap_or_else(|| panic!("{} missing from release {id}", f.path));
            assert_eq!(Digest::of(body), f.hash, "{}: the live file is the manifest's", f.path);
            let mode = std::fs::metadata(live.join(f.path.as_str())).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, f.mode, "{}", f.path);
        }
    }
    assert_eq!(on_disk.len(), files, "nothing but the manifest's files");
}

/// Publishes `tree` as release `id` with S3 reached through `proxy`.
fn publish_through(proxy: &FaultProxy, tree: &BTreeMap<String, Vec<u8>>, target: &str, id: &str) -> (i32, serde_json::Value, String) {
    let dir = build(tree);
    common::run_report(
        Command::new(common::bin("fleetsync-bastion", "fleetsync"))
            .arg("publish")
            .arg(dir.path())
            .arg("--source")
            .arg(target)
            .args(["--release-id", id, "--json"])
            .env("AWS_ENDPOINT_URL_S3", &proxy.url),
    )
}

fn pull(node: &Node, source: &str) -> (i32, serde_json::Value, String) {
    run_json(node.agent(source).arg("--releases"))
}

/// A pull that checks the live release in full, however recent the last
/// check (`--verify-every 0`): what the drift tests run.
fn pull_checked(node: &Node, source: &str) -> (i32, serde_json::Value, String) {
    run_json(node.agent(source).args(["--releases", "--verify-every", "0"]))
}

#[tokio::test]
async fn a_no_op_pull_is_one_request_and_a_small_change_a_few() {
    let b = Bucket::new("storeops").await;
    let mut tree = sample_tree(400, 3);
    let dir = build(&tree);
    let (code, r, stderr) = publish(dir.path(), &b.url("app"), &["--release-id", "r1"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["uploaded_files"].as_u64(), r["files"].as_u64()), (Some(401), Some(401)), "{r}");
    let node = Node::new();
    let (code, _, stderr) = pull(&node, &b.url("app"));
    assert_eq!(code, 0, "{stderr}");
    assert_live_is(&b, "app", &node, "r1").await;

    // Nothing changed: one conditional GET of the pointer (a 304).
    let before = b.requests();
    let (code, r, _) = pull(&node, &b.url("app"));
    let after = b.requests();
    assert_eq!(code, 0);
    assert_eq!((r["counts"]["downloaded"].as_u64(), r["release"]["switched"].as_bool()), (Some(0), Some(false)), "{r}");
    assert_eq!(
        (after.get + after.list + after.head + after.other) - (before.get + before.list + before.head + before.other),
        1,
        "{before:?} {after:?}"
    );

    // Five files change: publish puts a marker, one pack, the manifest and
    // the pointer; the pull reads the pointer, the manifest, and one range.
    let changed: Vec<String> = tree.keys().take(5).cloned().collect();
    for k in &changed {
        tree.get_mut(k).unwrap().extend_from_slice(b" changed");
        std::fs::write(dir.path().join(k), &tree[k]).unwrap();
    }
    let before = b.requests();
    let (code, r, stderr) = publish(dir.path(), &b.url("app"), &["--release-id", "r2"]);
    let after = b.requests();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["uploaded_files"].as_u64(), r["reused_files"].as_u64()), (Some(5), Some(396)), "{r}");
    assert!(after.put - before.put <= 5 + 3, "PUTs {} for 5 changed files", after.put - before.put);
    let before = b.requests();
    let (code, r, stderr) = pull(&node, &b.url("app"));
    let after = b.requests();
    assert_eq!(code, 0, "{stderr}");
    // The 396 others were staged by the no-op (hard links made then): this
    // pull wrote the 5 alone.
    let (down, kept, staged) = (r["counts"]["downloaded"].as_u64(), r["counts"]["unchanged"].as_u64(), r["release"]["staged"].as_bool());
    assert_eq!((down, kept, staged), (Some(5), Some(396), Some(true)), "{r}");
    let requests = (after.get + after.list + after.head) - (before.get + before.list + before.head);
    assert!(requests <= 5 + 3, "{requests} requests for 5 changed files");
    assert_eq!(after.list, before.list, "a store pull lists nothing");
    assert_live_is(&b, "app", &node, "r2").await;

    // The same content again: publish says so, writes nothing.
    let before = b.requests();
    let (code, r, _) = publish(dir.path(), &b.url("app"), &["--release-id", "r2"]);
    let after = b.requests();
    assert_eq!((code, r["unchanged"].as_bool()), (0, Some(true)), "{r}");
    assert_eq!(after.put, before.put);
    assert!((after.get + after.head) - (before.get + before.head) <= 2);
}

#[tokio::test]
async fn a_mode_only_change_reaches_the_node_and_the_previous_release_keeps_its_mode() {
    let b = Bucket::new("storechmod").await;
    let tree = sample_tree(20, 4);
    let dir = build(&tree);
    assert_eq!(publish(dir.path(), &b.url("app"), &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    assert_eq!(pull(&node, &b.url("app")).0, 0);
    let script = tree.keys().next().unwrap().clone();
    std::fs::set_permissions(dir.path().join(&script), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, r, stderr) = publish(dir.path(), &b.url("app"), &["--release-id", "r2"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["uploaded_files"], 0, "the content was stored already: {r}");
    let (code, r, stderr) = pull(&node, &b.url("app"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["release"]["copied"].as_u64(), r["counts"]["downloaded"].as_u64()), (Some(1), Some(0)), "{r}");
    let mode = |rel: &str| std::fs::metadata(node.dest.join(rel).join(&script)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("releases/r2"), 0o755, "the new mode is live");
    assert_eq!(mode("releases/r1"), 0o644, "the previous release keeps its mode (its inode was not chmod-ed)");
    assert_live_is(&b, "app", &node, "r2").await;
}

/// A build's group-writable directories (a `storage/` the application's
/// group writes into) keep the bit on every node, empty or not, through a
/// build from the staged copy too, and a shared path seeded from the
/// release keeps it; the write bit for others never. Such a release is
/// manifest format 2.
#[tokio::test]
async fn group_writable_directories_keep_their_bit_on_the_node() {
    let b = Bucket::new("storedirmode").await;
    let source = b.url("app");
    let tree = |v: &str| {
        let dir = build(&BTreeMap::from([
            ("index.php".to_string(), v.as_bytes().to_vec()),
            ("storage/app/.gitignore".to_string(), b"*".to_vec()),
            ("public/app.css".to_string(), b"body{}".to_vec()),
        ]));
        std::fs::create_dir_all(dir.path().join("storage/logs")).unwrap();
        for (p, mode) in [("storage", 0o775), ("storage/logs", 0o775), ("storage/app", 0o755), ("public", 0o777)] {
            std::fs::set_permissions(dir.path().join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        dir
    };
    let (code, _, stderr) = publish(tree("v1").path(), &source, &["--release-id", "r1"]);
    assert_eq!(code, 0, "{stderr}");
    // Three of its four directories: said, as a build made under umask 002 would be.
    assert!(stderr.contains("3 of the build's 4 directories are group-writable"), "{stderr}");
    let m = fleetsync::store::fetch_manifest(&b.client, &store_of(&b, "app"), "r1", None).await.unwrap();
    assert_eq!(m.header.format, 2);
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    let expect = |root: &Path| {
        for (p, want) in [("storage", 0o775), ("storage/logs", 0o775), ("storage/app", 0o755), ("public", 0o775)] {
            assert_eq!(mode(&root.join(p)), want, "{p} in {}", root.display());
        }
    };

    let node = Node::new();
    for _ in 0..2 {
        let (code, _, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", "r1"]));
        assert_eq!(code, 0, "{stderr}");
    }
    expect(&node.dest.join("current"));
    // r2 is built from the copy of r1 staged by the second pull.
    assert_eq!(publish(tree("v2").path(), &source, &["--release-id", "r2"]).0, 0);
    let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", "r2"]));
    assert_eq!((code, &r["release"]["staged"]), (0, &true.into()), "{stderr}\n{r}");
    expect(&node.dest.join("current"));

    let shared = Node::new();
    let (code, _, stderr) = run_json(shared.agent(&source).args(["--releases", "--release-id", "r2", "--shared", "storage"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(mode(&shared.dest.join("shared/storage")), 0o775, "seeded from the release with its bit");
    assert_eq!(mode(&shared.dest.join("shared/storage/logs")), 0o775);
}

#[tokio::test]
async fn a_dry_run_names_the_release_and_what_its_build_would_fetch_and_writes_nothing() {
    let b = Bucket::new("storedry").await;
    let v1 = sample_tree(20, 7);
    let dir = build(&v1);
    assert_eq!(publish(dir.path(), &b.url("app"), &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    assert_eq!(pull(&node, &b.url("app")).0, 0);
    // r2: two files rewritten, one made executable, one removed.
    let keys: Vec<&String> = v1.keys().collect();
    for k in &keys[..2] {
        std::fs::write(dir.path().join(k), b"v2").unwrap();
    }
    std::fs::set_permissions(dir.path().join(keys[2]), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(dir.path().join(keys[3])).unwrap();
    assert_eq!(publish(dir.path(), &b.url("app"), &["--release-id", "r2"]).0, 0);

    let before = snapshot(node.tmp.path());
    let (code, r, stderr) = run_json(node.agent(&b.url("app")).args(["--releases", "--dry-run"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        (r["dry_run"].as_bool(), r["release"]["id"].as_str(), r["release"]["previous"].as_str()),
        (Some(true), Some("r2"), Some("r1")),
        "{r}"
    );
    assert_eq!(
        (r["counts"]["downloaded"].as_u64(), r["release"]["copied"].as_u64(), r["counts"]["deleted"].as_u64()),
        (Some(2), Some(1), Some(1)),
        "{r}"
    );
    let mut fetch: Vec<&str> = r["plan"]["fetch"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    fetch.sort();
    assert_eq!(fetch, [keys[0].as_str(), keys[1].as_str()], "{r}");
    assert_eq!(r["plan"]["delete"][0].as_str(), Some(keys[3].as_str()), "{r}");
    assert_eq!(snapshot(node.tmp.path()), before, "a dry run writes nothing");

    // The pull itself does what the dry run said.
    let (code, r, stderr) = pull(&node, &b.url("app"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["counts"]["downloaded"].as_u64(), r["release"]["copied"].as_u64()), (Some(2), Some(1)), "{r}");

    // A release the node has (r1, kept): checked against its own records,
    // as going live again would check it; nothing to fetch.
    let (code, r, stderr) = run_json(node.agent(&b.url("app")).args(["--releases", "--dry-run", "--release-id", "r1"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        (r["release"]["id"].as_str(), r["counts"]["downloaded"].as_u64(), r["counts"]["unchanged"].as_u64()),
        (Some("r1"), Some(0), Some(v1.len() as u64)),
        "{r}"
    );
}

/// Every path below `root` with its size and mtime.
fn snapshot(root: &Path) -> BTreeMap<String, (u64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            out.insert(e.path().display().to_string(), (m.len(), m.mtime_nsec() + m.mtime() * 1_000_000_000));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_release_already_on_the_node_is_checked_and_repaired_before_it_goes_live_again() {
    let b = Bucket::new("storeagain").await;
    let v1 = sample_tree(20, 5);
    let mut v2 = v1.clone();
    let changed = v2.keys().next().unwrap().clone();
    v2.insert(changed.clone(), b"v2".to_vec());
    assert_eq!(publish(build(&v1).path(), &b.url("app"), &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    assert_eq!(pull(&node, &b.url("app")).0, 0);
    assert_eq!(publish(build(&v2).path(), &b.url("app"), &["--release-id", "r2"]).0, 0);
    assert_eq!(pull(&node, &b.url("app")).0, 0);

    // Something wrote into the kept release r1 (a file r2 does not share),
    // and a shared file's inode is written through the live release r2.
    std::fs::write(node.dest.join("releases/r1").join(&changed), b"tampered").unwrap();
    let shared = v1.keys().nth(1).unwrap();
    std::fs::write(node.dest.join("current").join(shared), b"written by the app").unwrap();
    let (code, r, stderr) = run_json(node.agent(&b.url("app")).args(["--releases", "--release-id", "r1"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["counts"]["downloaded"], 2, "both files were fetched again before r1 went live: {r}");
    assert_live_is(&b, "app", &node, "r1").await;

    // A release of that name built from a listing is not the store's.
    let plain = Bucket::new("storeagainplain").await;
    plain.put_tree("app/", &v1).await;
    let other = Node::new();
    let (code, _, stderr) = run_json(other.agent(&plain.url("app")).args(["--releases", "--release-id", "r1"]));
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_json(other.agent(&b.url("app")).args(["--releases", "--release-id", "r1"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("built from a listing") && stderr.contains("new --release-id"), "{stderr}");
}

#[tokio::test]
async fn pulls_racing_publishes_that_rewrite_every_file_only_ever_go_live_on_one_whole_release() {
    let b = Bucket::new("storerace").await;
    assert_eq!(publish(build(&versioned(60, 0)).path(), &b.url("app"), &[]).0, 0);
    let publisher = {
        let url = b.url("app");
        std::thread::spawn(move || {
            for v in 1..=10 {
                let dir = build(&versioned(60, v));
                let (code, _, stderr) = publish(dir.path(), &url, &[]);
                assert_eq!(code, 0, "{stderr}");
            }
        })
    };
    let node = Node::new();
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let (code, r, stderr) = pull(&node, &b.url("app"));
        assert_eq!(code, 0, "{stderr}");
        let id = r["release"]["id"].as_str().unwrap().to_string();
        // Exactly one manifest: every file's hash, mode, and nothing else.
        assert_live_is(&b, "app", &node, &id).await;
        let versions: HashSet<Vec<u8>> = read_tree(&node.dest.join("current")).values().map(|v| v[..15].to_vec()).collect();
        assert_eq!(versions.len(), 1, "one build, not a mix: {versions:?}");
        seen.insert(id);
    }
    publisher.join().unwrap();
    println!("20 pulls racing 10 publishes: {} releases went live, each exactly one manifest", seen.len());
}

#[tokio::test]
async fn a_publish_killed_at_any_moment_leaves_a_complete_latest_release_and_is_not_uploaded_twice() {
    let b = Bucket::new("storekill").await;
    let fleetsync = common::bin("fleetsync-bastion", "fleetsync");
    assert_eq!(publish(build(&versioned(1000, 0)).path(), &b.url("app"), &[]).0, 0);
    // How long a whole publish of new content takes here: kills land within it.
    let timed = build(&versioned(1000, 1000));
    let t = std::time::Instant::now();
    let out = Command::new(&fleetsync).arg("publish").arg(timed.path()).arg("--source").arg(b.url("app")).output().unwrap();
    assert!(out.status.success());
    let whole = t.elapsed().as_millis() as u64;
    let mut rng = 0x5EED_u64;
    let mut kills = 0;
    for v in 1..=30u64 {
        if kills == 20 {
            break;
        }
        let dir = build(&versioned(1000, v));
        let mut child = Command::new(&fleetsync)
            .arg("publish")
            .arg(dir.path())
            .arg("--source")
            .arg(b.url("app"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % (whole * 9 / 10)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        kills += (!status.success()) as u32;
        // Whatever the moment: the pointer names a complete release, and a
        // node booting now gets it whole.
        let (l, m) = latest(&b, "app").await.expect("a pointer");
        assert!(complete(&b, "app", &m).await, "latest {} names content that is not all stored", l.release);
        let node = Node::new();
        let (code, r, stderr) = pull(&node, &b.url("app"));
        assert_eq!(code, 0, "{stderr}");
        assert_live_is(&b, "app", &node, r["release"]["id"].as_str().unwrap()).await;

        // Run again: what the killed run stored is not uploaded twice.
        let store = store_of(&b, "app");
        let before: HashSet<String> =
            fleetsync::store::list_objects(&b.client, &store, &store.root).await.unwrap().into_iter().map(|o| o.key).collect();
        let (code, r, stderr) = publish(dir.path(), &b.url("app"), &[]);
        assert_eq!(code, 0, "{stderr}");
        let after: HashSet<String> =
            fleetsync::store::list_objects(&b.client, &store, &store.root).await.unwrap().into_iter().map(|o| o.key).collect();
        let content = |k: &&String| k.contains("/packs/") || k.contains("/blobs/");
        let new_content = after.difference(&before).filter(content).count() as u64;
        let uploaded = r["packs_uploaded"].as_u64().unwrap() + r["blobs_uploaded"].as_u64().unwrap();
        assert_eq!(uploaded, new_content, "only content not stored yet was uploaded: {r}");
    }
    println!("publish SIGKILLed {kills} times at random moments: the pointer always named a complete release, a node booting then got it whole, and the next publish uploaded nothing twice");
    assert_eq!(kills, 20, "20 runs were killed mid-way");
}

#[tokio::test]
async fn of_two_concurrent_publishes_exactly_one_pointer_write_wins() {
    let b = Bucket::new("storetwo").await;
    assert_eq!(publish(build(&versioned(30, 0)).path(), &b.url("app"), &[]).0, 0);
    for round in 0..3 {
        let (a, c) = (build(&versioned(30, 100 + round)), build(&versioned(30, 200 + round)));
        let spawn = |dir: &Path, id: &str| {
            Command::new(common::bin("fleetsync-bastion", "fleetsync"))
                .arg("publish")
                .arg(dir)
                .arg("--source")
                .arg(b.url("app"))
                .args(["--release-id", id, "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (ida, idc) = (format!("a{round}"), format!("c{round}"));
        let (pa, pc) = (spawn(a.path(), &ida), spawn(c.path(), &idc));
        let (oa, oc) = (pa.wait_with_output().unwrap(), pc.wait_with_output().unwrap());
        let codes = (oa.status.code().unwrap(), oc.status.code().unwrap());
        let (l, _) = latest(&b, "app").await.unwrap();
        match codes {
            (0, 0) => {
                // They did not overlap: each won in turn.
                assert!(l.release == ida || l.release == idc);
            }
            (0, 1) | (1, 0) => {
                let (winner, loser) = if codes.0 == 0 { (&ida, &oc) } else { (&idc, &oa) };
                assert_eq!(&l.release, winner, "the pointer names the winner");
                let e = String::from_utf8_lossy(&loser.stderr);
                assert!(e.contains("another publish wrote") && e.contains(winner.as_str()), "the loser names the winner: {e}");
            }
            other => panic!("round {round}: {other:?}"),
        }
    }

    // Forced: the first publish's answer to one PUT is held back 10 s by the
    // proxy (the write itself lands) while the second publishes whole.
    // Held at its fence marker, right after it read `latest`: it stops
    // before writing a manifest (a prune may have run meanwhile). Held at
    // its manifest: it loses the pointer's compare-and-swap.
    for (held, id) in [("/publishing/", "held-at-marker"), ("/manifests/", "held-at-manifest")] {
        let slow = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", &format!("slow:{held}:0:1"), "--slow", "10"]);
        let (dir, other) = (build(&versioned(30, 300)), build(&versioned(30, 400)));
        let mut first = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
            .arg("publish")
            .arg(dir.path())
            .arg("--source")
            .arg(b.url("app"))
            .args(["--release-id", id, "--json"])
            .env("AWS_ENDPOINT_URL_S3", &slow.url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while slow.stats()["slow"] != 1 {
            assert!(first.try_wait().unwrap().is_none(), "{held}: the first publish ended before its held write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let second = format!("after-{id}");
        let (code, _, stderr) = publish(other.path(), &b.url("app"), &["--release-id", &second]);
        assert_eq!(code, 0, "{stderr}");
        let out = first.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(e.contains("another publish wrote") && e.contains(&second), "the loser names the winner: {e}");
        assert_eq!(latest(&b, "app").await.unwrap().0.release, second);
        let manifest = b.client.head_object().bucket(&b.name).key(store_of(&b, "app").manifest_key(id)).send().await;
        assert_eq!(manifest.is_ok(), held == "/manifests/", "a manifest is written only past the fence: {e}");
    }
}

#[tokio::test]
async fn a_pointer_write_that_landed_but_whose_answer_was_lost_is_known_as_ours() {
    // The proxy forwards the write of latest.json and drops its answer; the
    // SDK sends it again and S3 refuses it (the ETag changed: the first
    // write's). That refusal is this publish's own write, not a rival's.
    let b = Bucket::new("storelost").await;
    assert_eq!(publish(build(&versioned(5, 0)).path(), &b.url("app"), &[]).0, 0);
    let lost = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", "lost:latest.json:0:1"]);
    let dir = build(&versioned(5, 1));
    let mut cmd = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
    cmd.arg("publish").arg(dir.path()).arg("--source").arg(b.url("app")).args(["--release-id", "mine", "--json"]);
    let (code, r, stderr) = common::run_report(cmd.env("AWS_ENDPOINT_URL_S3", &lost.url));
    assert_eq!((code, r["latest"].as_str()), (0, Some("mine")), "{stderr}");
    assert_eq!(lost.stats()["lost"], 1, "the answer was lost once");
    assert_eq!(latest(&b, "app").await.unwrap().0.release, "mine");
}

#[tokio::test]
async fn releases_under_sse_kms_whose_etags_are_not_md5s_publish_and_pull() {
    let b = Bucket::new("storekms").await;
    let tree = sample_tree(50, 5);
    let dir = build(&tree);
    let kms = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--kms"]);
    let via = |cmd: &mut Command| {
        cmd.env("AWS_ENDPOINT_URL_S3", &kms.url);
    };
    let mut p = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
    p.arg("publish").arg(dir.path()).arg("--source").arg(b.url("app")).args(["--release-id", "k1", "--json"]);
    via(&mut p);
    let (code, _, stderr) = common::run_report(&mut p);
    assert_eq!(code, 0, "{stderr}");
    let node = Node::new();
    let mut a = node.agent(&b.url("app"));
    a.arg("--releases");
    via(&mut a);
    let (code, _, stderr) = run_json(&mut a);
    assert_eq!(code, 0, "{stderr}");
    assert_live_is(&b, "app", &node, "k1").await;
    // What the client saw was no MD5 of the content.
    let seen = common::client_via(&kms.url).await;
    let store = store_of(&b, "app");
    let out = seen.get_object().bucket(&b.name).key(store.manifest_key("k1")).send().await.unwrap();
    let etag = out.e_tag().unwrap().trim_matches('"').to_string();
    let body = out.body.collect().await.unwrap().into_bytes();
    assert_ne!(etag, hex::encode(md5::Digest::finalize(<md5::Md5 as md5::Digest>::new_with_prefix(&body))), "opaque ETags");
    // A second publish swaps the pointer with If-Match on an opaque ETag.
    std::fs::write(dir.path().join("index.php"), b"<?php // k2").unwrap();
    let mut p = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
    p.arg("publish").arg(dir.path()).arg("--source").arg(b.url("app")).args(["--release-id", "k2", "--json"]);
    via(&mut p);
    let (code, r, stderr) = common::run_report(&mut p);
    assert_eq!((code, r["uploaded_files"].as_u64()), (0, Some(1)), "{stderr}");
    let mut a = node.agent(&b.url("app"));
    a.arg("--releases");
    via(&mut a);
    let (code, r, stderr) = run_json(&mut a);
    assert_eq!((code, r["counts"]["downloaded"].as_u64()), (0, Some(1)), "{stderr}\n{r}");
    assert_live_is(&b, "app", &node, "k2").await;
}

#[tokio::test]
async fn flipped_bytes_in_a_pack_range_are_caught_by_the_hash_and_fetched_again() {
    let b = Bucket::new("storeflip").await;
    let tree = sample_tree(100, 6);
    assert_eq!(publish(build(&tree).path(), &b.url("app"), &["--release-id", "f1"]).0, 0);
    // The first three ranged GETs of packs come back with one byte flipped;
    // the release must go live only with every hash right.
    let flip = FaultProxy::start(&common::endpoint(), &["--rate", "1", "--kinds", "flip", "--max-faults", "3", "--only", "/packs/"]);
    let node = Node::new();
    let (code, r, stderr) = run_json(node.agent(&b.url("app")).arg("--releases").env("AWS_ENDPOINT_URL_S3", &flip.url));
    let stats = flip.stats();
    assert_eq!(stats["flip"], 3, "{stats}");
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert!(r["counts"]["retries"].as_u64().unwrap() >= 1, "a range was fetched again: {r}");
    assert_live_is(&b, "app", &node, "f1").await;

    // Flipped every time: the build fails, nothing goes live.
    let always = FaultProxy::start(&common::endpoint(), &["--rate", "1", "--kinds", "flip", "--only", "/packs/"]);
    let fresh = Node::new();
    let (code, r, _) =
        run_json(fresh.agent(&b.url("app")).args(["--releases", "--release-id", "f1"]).env("AWS_ENDPOINT_URL_S3", &always.url));
    assert_ne!(code, 0, "{r}");
    assert!(!fresh.dest.join("current").exists(), "nothing went live");
}

#[tokio::test]
async fn prune_racing_publishes_deletes_nothing_a_remaining_release_needs() {
    let b = Bucket::new("storeprune").await;
    let base = sample_tree(200, 8);
    assert_eq!(publish(build(&base).path(), &b.url("app"), &["--release-id", "p0"]).0, 0);
    let prune = |grace: &str| {
        let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
            .args(["prune", "--source", &b.url("app"), "--keep", "1", "--grace", grace, "--json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut swept = 0;
    for round in 1..=4u64 {
        // What earlier rounds stored ages past the grace period.
        std::thread::sleep(Duration::from_millis(2500));
        // Each release keeps most files and rewrites a few.
        let mut tree = base.clone();
        for (i, v) in tree.values_mut().enumerate() {
            if i as u64 % 20 == round {
                v.extend_from_slice(format!("round {round}").as_bytes());
            }
        }
        let dir = build(&tree);
        // The publish's pack is stored at once but its answer is held for
        // 3 s: prune runs while the pack is there and no manifest names it.
        let slow = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", "slow:/packs/:0:1", "--slow", "3"]);
        let publisher = {
            let (url, proxy) = (b.url("app"), slow.url.clone());
            std::thread::spawn(move || {
                common::run_report(
                    Command::new(common::bin("fleetsync-bastion", "fleetsync"))
                        .arg("publish")
                        .arg(dir.path())
                        .arg("--source")
                        .arg(&url)
                        .args(["--release-id", &format!("p{round}"), "--json"])
                        .env("AWS_ENDPOINT_URL_S3", &proxy),
                )
            })
        };
        // Until the publish reaches its pack (a fixed sleep raced a slow
        // start on a loaded machine: the prune then ran before the pack).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while slow.stats()["slow"] != 1 {
            assert!(std::time::Instant::now() < deadline, "the publish never reached its pack: {}", slow.stats());
            std::thread::sleep(Duration::from_millis(50));
        }
        swept += prune("2s")["deleted_packs"].as_u64().unwrap();
        let (code, _, stderr) = publisher.join().unwrap();
        assert_eq!(code, 0, "{stderr}");
        // Every release the store still lists is complete, and the latest
        // one goes live on a fresh node.
        let store = store_of(&b, "app");
        for o in fleetsync::store::list_objects(&b.client, &store, &store.manifests_prefix()).await.unwrap() {
            let id = o.key.trim_start_matches(&store.manifests_prefix()).trim_end_matches(fleetsync::store::MANIFEST_SUFFIX).to_string();
            let m = fleetsync::store::fetch_manifest(&b.client, &store, &id, None).await.unwrap();
            assert!(complete(&b, "app", &m).await, "round {round}: release {id} lost content to prune");
        }
        let node = Node::new();
        let (code, r, stderr) = pull(&node, &b.url("app"));
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(r["release"]["id"], format!("p{round}"));
    }
    // Nothing in flight now: prune keeps the latest (and the one before
    // it, which a publish that started then could still name).
    let r = prune("0");
    let mut kept: Vec<&str> = r["kept"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    kept.sort();
    assert_eq!(kept, ["p3", "p4"], "{r}");
    swept += r["deleted_packs"].as_u64().unwrap();
    assert!(swept > 0, "content only older releases named was swept: {r}");
    println!(
        "prune raced 4 publishes, each held between storing its pack and naming it: {swept} packs swept, every remaining release complete"
    );
}

#[tokio::test]
async fn a_publish_waits_for_a_prune_under_way_and_a_prune_removes_nothing_while_a_publish_is() {
    // A large file leaves the tree and comes back: its blob is still
    // stored, named by no kept release, and old. A prune under way (its
    // marker written, its listing done) is about to delete it; a publish
    // that trusted the HEAD finding it would name a blob that is then gone.
    let b = Bucket::new("storefence").await;
    let big: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut tree = sample_tree(20, 3);
    tree.insert("media/big.bin".into(), big);
    assert_eq!(publish(build(&tree).path(), &b.url("app"), &["--release-id", "with-big"]).0, 0);
    let without: BTreeMap<String, Vec<u8>> =
        tree.iter().filter(|(k, _)| !k.starts_with("media/")).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(publish(build(&without).path(), &b.url("app"), &["--release-id", "without"]).0, 0);
    let store = store_of(&b, "app");
    let blob = fleetsync::store::list_objects(&b.client, &store, &store.blobs_prefix()).await.unwrap().remove(0).key;

    let pruning = format!("{}pruning/test.json", store.root);
    b.put(&pruning, b"{}").await;
    let dir = build(&tree);
    let mut publisher = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .arg("publish")
        .arg(dir.path())
        .arg("--source")
        .arg(b.url("app"))
        .args(["--release-id", "big-again", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(publisher.try_wait().unwrap().is_none(), "the publish waits for the prune");
    b.delete(&blob).await; // the prune's delete
    b.delete(&pruning).await; // and its end
    let out = publisher.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("a prune of") && stderr.contains("is under way"), "{stderr}");
    assert_eq!(r["blobs_uploaded"], 1, "the blob was uploaded again, not trusted: {r}");
    let (l, m) = latest(&b, "app").await.unwrap();
    assert_eq!(l.release, "big-again");
    assert!(complete(&b, "app", &m).await, "the latest release is whole");

    // The other way round: a publish's marker stops a prune from removing anything.
    let prune_all = || {
        common::run_report(Command::new(common::bin("fleetsync-bastion", "fleetsync")).args([
            "prune",
            &b.url("app"),
            "--keep",
            "0",
            "--grace",
            "0",
            "--json",
        ]))
    };
    let publishing = format!("{}publishing/test.json", store.root);
    b.put(&publishing, b"{}").await;
    let before = fleetsync::store::list_objects(&b.client, &store, &store.root).await.unwrap().len();
    let (code, r, stderr) = prune_all();
    assert_eq!(code, 0, "{stderr}");
    assert!(r["content_skipped"].as_str().is_some_and(|s| s.contains("a publish is under way")), "{r}");
    let after = fleetsync::store::list_objects(&b.client, &store, &store.root).await.unwrap().len();
    assert_eq!(before, after, "nothing was removed: {r}");
    b.delete(&publishing).await;
    let (code, r, stderr) = prune_all();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["deleted_releases"], serde_json::json!(["with-big"]), "{r}");
}

#[tokio::test]
async fn a_tampered_or_hostile_manifest_never_goes_live() {
    let b = Bucket::new("storehostile").await;
    assert_eq!(publish(build(&sample_tree(10, 9)).path(), &b.url("app"), &["--release-id", "good"]).0, 0);
    let node = Node::new();
    assert_eq!(pull(&node, &b.url("app")).0, 0);
    let store = store_of(&b, "app");
    let h = Digest::of(b"x");
    let lines = |entry: &str| {
        let header = format!(
            r#"{{"fleetsync_manifest":1,"id":"evil","created_at_ms":1,"publisher":"x","files":1,"bytes":1,"tree":"{h}","packs":["{h}"]}}"#
        );
        zstd::encode_all(format!("{header}\n{entry}\n").as_bytes(), 3).unwrap()
    };
    // A path out of DEST, then a symlink out of the release.
    for (entry, why) in [
        (format!(r#"{{"p":"../../etc/cron.d/x","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#), "'..'"),
        (r#"{"p":"public/x","t":"../../../etc"}"#.to_string(), "stay inside"),
    ] {
        b.put(&store.manifest_key("evil"), &lines(&entry)).await;
        let (code, r, stderr) = run_json(node.agent(&b.url("app")).args(["--releases", "--release-id", "evil"]));
        assert_ne!(code, 0, "{stderr}");
        assert!(r["error"].as_str().unwrap().contains(why), "{r}");
        assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/good"), "the live release stays");
    }
    // A manifest changed after it was published: its pointer's digest says so.
    let good = fleetsync::store::fetch_bytes(&b.client, &store, &store.manifest_key("good")).await.unwrap();
    let (l, _) = latest(&b, "app").await.unwrap();
    let mut m = Manifest::parse(&good, "good").unwrap();
    m.header.publisher = "someone else".into();
    b.put(&store.manifest_key("good"), &m.to_bytes()).await;
    let fresh = Node::new();
    let (code, r, _) = pull(&fresh, &b.url("app"));
    assert_ne!(code, 0, "{r}");
    assert!(r["error"].as_str().unwrap().contains("does not match the digest"), "{r}");
    assert!(!fresh.dest.join("current").exists());
    assert_eq!(l.release, "good");
}

/// The state dir's files after a power loss that came before their writes
/// were durable: empty, or cut short. The next pull never fails for it,
/// never follows `latest` because the node's group was lost, and ends on
/// the release the node should run, registered again.
#[tokio::test]
async fn state_files_emptied_or_cut_short_by_a_power_loss_never_stop_the_next_pull_nor_deploy_a_publish() {
    let b = Bucket::new("storetorn").await;
    let source = b.url("app");
    let (v1, v2) = (versioned(12, 1), versioned(12, 2));
    assert_eq!(publish(build(&v1).path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    // A group never deployed: the node boots the latest (r1) and
    // remembers its group; a later publish (r2) is not a deploy.
    let (code, _, stderr) = run_json(node.agent(&source).args(["--releases", "--group", "torn-web"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(publish(build(&v2).path(), &source, &["--release-id", "r2"]).0, 0);
    let state = std::fs::read_dir(&node.state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("releases.json").exists())
        .expect("the DEST's state dir");
    for name in ["group", "pointer.json", "releases.json"] {
        assert!(state.join(name).exists(), "{name} is written by a pull");
    }

    for (name, torn) in [("group", &b""[..]), ("group", b"\0\0\0\0"), ("pointer.json", b""), ("pointer.json", b"{\"key\":\"app/")] {
        std::fs::write(state.join(name), torn).unwrap();
        let (code, _, stderr) = pull(&node, &source);
        if name == "group" {
            // Which group the node is in is unknown: it says so and keeps
            // what it runs, rather than take the latest publish.
            assert_eq!(code, 2, "{stderr}");
            assert!(stderr.contains("group file") && stderr.contains("--group"), "{stderr}");
            std::fs::write(state.join(name), "torn-web").unwrap();
        } else {
            assert_eq!(code, 0, "{name} {torn:?}: {stderr}");
        }
        assert_live_is(&b, "app", &node, "r1").await;
    }

    for torn in [&b""[..], b"{\"releases\":[{\"id\":\"r1\",\"con"] {
        // Drift in the live release too: with its registry entry lost it
        // is not trusted as intact, but checked and repaired.
        let live = node.dest.join("current");
        let edited = v1.keys().next().unwrap();
        std::fs::remove_file(live.join(edited)).unwrap();
        std::fs::write(live.join(edited), b"written over").unwrap();
        std::fs::write(live.join("extra.php"), b"<?php // not published").unwrap();
        std::fs::write(state.join("releases.json"), torn).unwrap();
        let (code, r, stderr) = pull(&node, &source);
        assert_eq!(code, 0, "an unreadable registry is rebuilt, never fatal: {stderr}");
        assert_eq!(r["release"]["switched"], false, "{r}");
        assert!(state.join("releases.json.damaged").exists(), "the damaged registry is kept for a person to read");
        assert_live_is(&b, "app", &node, "r1").await;
        let status = Command::new(common::agent_bin())
            .args(["status", "--json", "--dest"])
            .arg(&node.dest)
            .arg("--state-dir")
            .arg(&node.state)
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(status["current"], "r1", "{status}");
        assert_eq!(status["releases"][0]["id"], "r1", "the live release is registered again: {status}");
    }

    // A deploy then moves the node on as usual, and can roll back to r1.
    let (code, _, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", "r2"]));
    assert_eq!(code, 0, "{stderr}");
    assert_live_is(&b, "app", &node, "r2").await;
    let (code, _, stderr) = run_json(
        Command::new(common::agent_bin()).args(["rollback", "--json", "--dest"]).arg(&node.dest).arg("--state-dir").arg(&node.state),
    );
    assert_eq!(code, 0, "{stderr}");
    assert_live_is(&b, "app", &node, "r1").await;
}

/// Two publishes sharing a large blob complete its multipart upload at
/// once; S3 may answer one of them 409 ConditionalRequestConflict. The
/// publish completes again (or finds the blob there) instead of failing.
#[tokio::test]
async fn a_multipart_blob_whose_completion_is_answered_409_is_completed_again() {
    let b = Bucket::new("storeconflict").await;
    let mut tree = sample_tree(3, 21);
    let mut big = vec![0u8; 17 * 1024 * 1024];
    let mut x = 0x2545f4914f6cdd1du64;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    tree.insert("media/big.bin".into(), big);
    let conflict = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", "409:POST /blobs/:0:2"]);
    let (code, _, stderr) = publish_through(&conflict, &tree, &b.url("app"), "r1");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(conflict.stats()["409"], 2, "{}", conflict.stats());
    let node = Node::new();
    let (code, _, stderr) = pull(&node, &b.url("app"));
    assert_eq!(code, 0, "{stderr}");
    assert_live_is(&b, "app", &node, "r1").await;
}

/// Prune retires the ids it removes: a later publish may bring the same
/// content back under one (a re-run) but never other content, which nodes
/// still holding the old release would keep while the pointers name it.
#[tokio::test]
async fn a_pruned_release_id_is_never_given_other_content() {
    let b = Bucket::new("storetomb").await;
    let source = b.url("app");
    // Every release declares `storage` shared (r1 does, the rest inherit);
    // the node holds r1 and r2.
    let node = Node::new();
    for v in 1..=4u64 {
        let declare: &[&str] = if v == 1 { &["--shared", "storage"] } else { &[] };
        assert_eq!(publish(build(&versioned(6, v)).path(), &source, &[&["--release-id", &format!("r{v}")][..], declare].concat()).0, 0);
        if v <= 2 {
            let (code, _, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", &format!("r{v}")]));
            assert_eq!(code, 0, "{stderr}");
        }
    }
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["prune", "--source", &source, "--keep", "1", "--grace", "0s", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["deleted_releases"].as_array().unwrap().iter().any(|r| r == "r1"), "{report}");

    let (code, _, stderr) = publish(build(&versioned(6, 9)).path(), &source, &["--release-id", "r1"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("r1 was pruned") && stderr.contains("new --release-id"), "{stderr}");
    assert!(b.client.head_object().bucket(&b.name).key("app/.fleetsync/manifests/r1.jsonl.zst").send().await.is_err(), "nothing written");

    // The same content under its old id is a re-run: published again.
    let (code, _, stderr) = publish(build(&versioned(6, 1)).path(), &source, &["--release-id", "r1"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", "r1"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/r1"));

    // The same tree declaring other shared paths is other content: the
    // node's r2 (laid out with storage shared) is not the store's r2.
    let (code, _, stderr) = publish(build(&versioned(6, 2)).path(), &source, &["--release-id", "r2", "--unshare", "storage"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, r, _) = run_json(node.agent(&source).args(["--releases", "--release-id", "r2"]));
    assert_ne!(code, 0, "{r}");
    assert!(r["error"].as_str().unwrap_or_default().contains("the id was published twice"), "{r}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/r1"), "nothing switched");
}

/// A prune deletes the doomed manifests first, in requests of their own,
/// and checks every key's answer: when S3 refuses to delete a manifest
/// (a DeleteObjects answered 200 with a per-key error), the prune fails
/// naming it and deletes no content, so no manifest is left naming packs
/// that are gone. Run again with the right to delete, it finishes.
#[tokio::test]
async fn a_manifest_the_prune_cannot_delete_fails_the_prune_before_any_content_goes() {
    let b = Bucket::new("storedelerr").await;
    let source = three_releases(&b).await;
    let before = keys_under(&b, "app").await;
    let proxy = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--delete-fault", "manifests/"]);
    let out = prune_keeping_one(&source, &proxy.url, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("manifests/r1.jsonl.zst") && stderr.contains("Access Denied"), "{stderr}");
    let stats = proxy.stats();
    assert_eq!((&stats["delete"], &stats["delete-others"]), (&1.into(), &0.into()), "one request of manifests alone, refused: {stats}");
    let after = keys_under(&b, "app").await;
    assert_eq!(packs(&after), packs(&before), "no content deleted: {after:?}");
    assert!(after.iter().any(|k| k.ends_with("manifests/r1.jsonl.zst")));

    let out = prune_keeping_one(&source, &common::endpoint(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let done = keys_under(&b, "app").await;
    assert!(!done.iter().any(|k| k.ends_with("manifests/r1.jsonl.zst")) && packs(&done) < packs(&before), "{done:?}");
}

/// Releases r1, r2 and r3 of six files each, published to `b`'s `app`.
async fn three_releases(b: &Bucket) -> String {
    let source = b.url("app");
    for v in 1..=3u64 {
        assert_eq!(publish(build(&versioned(6, v)).path(), &source, &["--release-id", &format!("r{v}")]).0, 0);
    }
    source
}

/// Every key under the store at `prefix`.
async fn keys_under(b: &Bucket, prefix: &str) -> Vec<String> {
    let store = store_of(b, prefix);
    fleetsync::store::list_objects(&b.client, &store, &store.root).await.unwrap().into_iter().map(|o| o.key).collect()
}

fn packs(keys: &[String]) -> usize {
    keys.iter().filter(|k| k.contains("/packs/")).count()
}

/// `fleetsync prune --keep 1 --grace 0s` of `source` through `endpoint`.
fn prune_keeping_one(source: &str, endpoint: &str, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["prune", "--source", source, "--keep", "1", "--grace", "0s", "--json"])
        .env("AWS_ENDPOINT_URL_S3", endpoint)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The tests' prune lease (dev builds read it; see `store::fence`): 20 s
/// instead of 10 minutes, so a prune's budget is 10 s (its marker, plan
/// and tombstones take well under that on a loaded machine).
const SHORT_LEASE: (&str, &str) = ("FLEETSYNC_TEST_PRUNE_LEASE_MS", "20000");

/// A killed prune leaves its `pruning/` marker behind. Once that marker is
/// older than a prune's lease on S3's clock, the next prune removes it; the
/// marker of a prune still under way stays.
#[tokio::test]
async fn a_killed_prunes_marker_is_removed_once_stale_and_a_live_prunes_is_kept() {
    let b = Bucket::new("storestale").await;
    let source = three_releases(&b).await;
    let stale = "app/.fleetsync/pruning/00000000000000000000000000000001.json";
    b.put(stale, br#"{"by":"a prune that was killed"}"#).await;
    // S3 keeps whole seconds: 22 s is past the 20 s lease whatever the rounding.
    tokio::time::sleep(Duration::from_secs(22)).await;
    let live = "app/.fleetsync/pruning/00000000000000000000000000000002.json";
    b.put(live, br#"{"by":"a prune under way"}"#).await;

    let out = prune_keeping_one(&source, &common::endpoint(), &[SHORT_LEASE]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let after = keys_under(&b, "app").await;
    assert!(!after.iter().any(|k| k == stale), "the stale marker is gone: {after:?}");
    assert!(after.iter().any(|k| k == live), "the live marker stays: {after:?}");
}

/// Every DeleteObjects call is bounded by what is left of the prune's
/// budget (half its lease): a call that hangs (the SDK's retries can go on
/// for minutes) stops the prune at the budget, naming it, and nothing after
/// it is deleted, so a publish that waits out the lease never races it.
#[tokio::test]
async fn a_delete_call_that_hangs_stops_the_prune_at_its_budget() {
    let b = Bucket::new("storehang").await;
    let source = three_releases(&b).await;
    let before = keys_under(&b, "app").await;
    let proxy = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--delete-slow", "manifests/", "--slow", "120"]);
    let started = std::time::Instant::now();
    let out = prune_keeping_one(&source, &proxy.url, &[SHORT_LEASE]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ran longer than 10 s and stopped before its lease ran out"), "{stderr}");
    // Not a speed figure: the call is held 120 s, the budget is 10 s.
    assert!(took < Duration::from_secs(60), "the prune waited for the held call: {took:?}");
    let stats = proxy.stats();
    assert_eq!(stats["delete-slow"], 1, "one call held, none after it: {stats}");
    assert_eq!(packs(&keys_under(&b, "app").await), packs(&before), "no content deleted");
}

/// A node that holds its release (its group's deploy is under way, failed,
/// or has not happened) still has drift in that release repaired: a hold
/// keeps the release, not what was written over it.
#[tokio::test]
async fn a_held_node_still_has_drift_in_the_release_it_keeps_repaired() {
    let b = Bucket::new("storeheld").await;
    let source = b.url("app");
    let v1 = versioned(8, 1);
    assert_eq!(publish(build(&v1).path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    let (code, _, stderr) = run_json(node.agent(&source).args(["--releases", "--group", "held-web"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(publish(build(&versioned(8, 2)).path(), &source, &["--release-id", "r2"]).0, 0);
    let victim = v1.keys().next().unwrap();
    std::fs::write(node.dest.join("current").join(victim), b"written over").unwrap();

    let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--group", "held-web"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(r["release"]["held"].is_string(), "the group has no deploy: the node holds r1: {r}");
    assert_eq!(r["counts"]["downloaded"], 1, "the drifted file was fetched again: {r}");
    assert_live_is(&b, "app", &node, "r1").await;

    // Once no pointer names r1, a prune removes it from the store: the node
    // still holds it (and says its files cannot be checked), never fails.
    for v in 3..=4u64 {
        assert_eq!(publish(build(&versioned(8, v)).path(), &source, &["--release-id", &format!("r{v}")]).0, 0);
    }
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["prune", "--source", &source, "--keep", "1", "--grace", "0s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(node.dest.join("current").join(victim), b"written over again").unwrap();
    let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--group", "held-web"]));
    assert_eq!(code, 0, "{stderr}");
    let held = r["release"]["held"].as_str().unwrap_or_default();
    assert!(held.contains("cannot be checked"), "{r}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/r1"));
}

/// The publish/prune fence ages markers on S3's clock: a publisher whose
/// own clock is 11 minutes fast (more than a prune's 10-minute lease)
/// still sees a prune marker written a moment ago as a prune under way,
/// and waits for it instead of trusting content the prune may delete.
#[tokio::test]
async fn a_publisher_with_a_fast_clock_still_waits_for_a_prune_under_way() {
    let b = Bucket::new("storeclock").await;
    let source = b.url("app");
    assert_eq!(publish(build(&versioned(5, 1)).path(), &source, &["--release-id", "r1"]).0, 0);
    let marker = "app/.fleetsync/pruning/0123456789abcdef0123456789abcdef.json";
    b.put(marker, br#"{"by":"a prune under way"}"#).await;

    let dir = build(&versioned(5, 2));
    let mut publisher = Command::new("faketime")
        .args(["-f", "+11m"])
        .arg(common::bin("fleetsync-bastion", "fleetsync"))
        .arg("publish")
        .arg(dir.path())
        .arg("--source")
        .arg(&source)
        .args(["--release-id", "r2", "--json"])
        // tokio's timers keep the real monotonic clock.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let waited = publisher.try_wait().unwrap().is_none();
    b.client.delete_object().bucket(&b.name).key(marker).send().await.unwrap();
    let out = publisher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(waited, "the publish did not wait for the prune: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("is under way; waiting"), "{stderr}");
}

/// A hostile manifest may give a blob any size: the node neither lists
/// every range of it nor asks for each one; the first that fails stops it.
#[tokio::test]
async fn a_blob_of_hostile_size_costs_the_node_a_few_requests_not_one_per_range() {
    let b = Bucket::new("storehuge").await;
    assert_eq!(publish(build(&sample_tree(4, 2)).path(), &b.url("app"), &["--release-id", "good"]).0, 0);
    let store = store_of(&b, "app");
    let h = Digest::of(b"never stored");
    let size = 4u64 << 40; // 4 TiB: 524,288 ranges of 8 MiB, sparse on ext4
                           // Well formed, its tree digest right: only the size is hostile.
    let entry = fleetsync::store::manifest::FileEntry {
        path: fleetsync::RelPath::from_stored("big.bin").unwrap(),
        size,
        mode: 0o644,
        hash: h,
        at: Location::Blob { len: size },
    };
    let m = Manifest::new("huge".into(), "x".into(), Vec::new(), vec![Entry::File(entry)]);
    b.put(&store.manifest_key("huge"), &m.to_bytes()).await;
    let counted = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--count"]);
    let node = Node::new();
    let (code, r, stderr) =
        run_json(node.agent(&b.url("app")).args(["--releases", "--release-id", "huge"]).env("AWS_ENDPOINT_URL_S3", &counted.url));
    assert_ne!(code, 0, "{stderr}");
    assert!(r["error"].as_str().unwrap_or_default().contains("not switched"), "{r}");
    let requests = counted.stats()["requests"].as_u64().unwrap();
    assert!(requests < 200, "{requests} requests for one blob: {r}");
    assert!(!node.dest.join("current").exists());
}

/// The deploy history is pruned with the store: the newest records stay.
#[tokio::test]
async fn prune_keeps_the_newest_deploy_records_and_removes_the_rest() {
    let b = Bucket::new("storehistory").await;
    let source = b.url("app");
    assert_eq!(publish(build(&versioned(3, 1)).path(), &source, &["--release-id", "r1"]).0, 0);
    let key = |t: u64| format!("app/.fleetsync/deploys/{t:013}-web-0000000{t}.json");
    for t in 1..=5u64 {
        b.put(&key(t), b"{}").await;
    }
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["prune", "--source", &source, "--keep", "1", "--keep-history", "2", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["deleted_history"], 3, "{report}");
    let store = store_of(&b, "app");
    let left: Vec<String> =
        fleetsync::store::list_objects(&b.client, &store, &store.deploys_prefix()).await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(left, [key(4), key(5)]);
}

/// A caller whose s3:ListBucket is limited to a prefix may get 403, not
/// 404, for a key that does not exist (AWS documents 404 only with
/// ListBucket on the bucket). The first publish (no `latest.json`, no
/// tombstone) and a first boot (no `deployed/GROUP.json`) then still work:
/// a 403 is followed by a one-key listing, and an empty one means absent.
#[tokio::test]
async fn a_missing_pointer_answered_403_reads_as_absent_when_a_listing_finds_nothing() {
    let b = Bucket::new("store403").await;
    let strict = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--list-prefixes", ""]);
    let (code, _, stderr) = publish_through(&strict, &versioned(6, 1), &b.url("app"), "r1");
    assert_eq!(code, 0, "the first publish reads latest.json and the tombstone, both missing: {stderr}");
    let node = Node::new();
    let (code, _, stderr) =
        run_json(node.agent(&b.url("app")).args(["--releases", "--group", "strict-web"]).env("AWS_ENDPOINT_URL_S3", &strict.url));
    assert_eq!(code, 0, "a first boot reads its group's missing pointer: {stderr}");
    assert!(strict.stats()["denied"].as_u64().unwrap() >= 3, "{}", strict.stats());
    assert_live_is(&b, "app", &node, "r1").await;
}

/// An id published twice (reused after a prune made before prunes left
/// tombstones): a node that holds the first publish never reports the
/// second as live. The pointer's manifest digest differs from the one the
/// node recorded, so its copy is checked against the store's and refused,
/// on the timer's path (the pointer) and on the bastion's (`--release-id`
/// with `--manifest-digest`).
#[tokio::test]
async fn a_node_holding_an_id_published_again_with_other_content_refuses_it() {
    let b = Bucket::new("storereuse").await;
    let source = b.url("app");
    assert_eq!(publish(build(&versioned(6, 1)).path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    let (code, _, stderr) = pull(&node, &source);
    assert_eq!(code, 0, "{stderr}");
    assert_live_is(&b, "app", &node, "r1").await;

    // What a prune made before tombstones left: r1's manifest gone (r2 is
    // the latest), the id free.
    assert_eq!(publish(build(&versioned(6, 3)).path(), &source, &["--release-id", "r2"]).0, 0);
    let store = store_of(&b, "app");
    b.client.delete_object().bucket(&b.name).key(store.manifest_key("r1")).send().await.unwrap();
    let (code, _, stderr) = publish(build(&versioned(6, 2)).path(), &source, &["--release-id", "r1"]);
    assert_eq!(code, 0, "{stderr}");
    let (latest, _) = latest(&b, "app").await.unwrap();

    let (code, _, stderr) = pull(&node, &source);
    assert_ne!(code, 0, "the node's r1 is not the store's r1: {stderr}");
    assert!(stderr.contains("published twice") && stderr.contains("new id"), "{stderr}");
    let (code, _, stderr) =
        run_json(node.agent(&source).args(["--releases", "--release-id", "r1", "--manifest-digest", &latest.manifest.to_string()]));
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("published twice"), "{stderr}");
    // The node's own copy stays live and whole.
    assert_eq!(read_tree(&node.dest.join("current")), versioned(6, 1).into_iter().collect());
}

/// Drift beyond files' content: a file and a directory written into the
/// live release, an empty directory of the release removed, a symlink
/// pointed elsewhere. The pull's walk of the live tree finds each (no
/// request but the pointer's), and the repair puts the release back as
/// published.
#[tokio::test]
async fn extra_files_a_removed_empty_directory_and_a_changed_symlink_in_the_live_release_are_repaired() {
    let b = Bucket::new("storeshape").await;
    let source = b.url("app");
    let tree = versioned(6, 1);
    let first = tree.keys().next().unwrap().clone();
    let dir = build(&tree);
    std::fs::create_dir_all(dir.path().join("cache/empty")).unwrap();
    std::os::unix::fs::symlink(&first, dir.path().join("link")).unwrap();
    assert_eq!(publish(dir.path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    let (code, _, stderr) = pull(&node, &source);
    assert_eq!(code, 0, "{stderr}");
    let live = node.dest.join("current");
    assert!(live.join("cache/empty").is_dir());
    assert_eq!(std::fs::read_link(live.join("link")).unwrap(), Path::new(&first));

    std::fs::write(live.join("planted.php"), b"<?php system($_GET['c']);").unwrap();
    std::fs::create_dir_all(live.join("junk/deeper")).unwrap();
    std::fs::write(live.join("junk/deeper/file"), b"x").unwrap();
    std::fs::create_dir_all(live.join("junk2/a/b")).unwrap();
    std::fs::write(live.join("junk2/a/b/file"), b"y").unwrap();
    std::fs::remove_dir(live.join("cache/empty")).unwrap();
    std::fs::remove_file(live.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", live.join("link")).unwrap();

    let (code, r, stderr) = pull_checked(&node, &source);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["counts"]["deleted"], 3, "the planted file and two directories, each once: {r}");
    assert!(!live.join("planted.php").exists() && !live.join("junk").exists() && !live.join("junk2").exists());
    assert!(live.join("cache/empty").is_dir());
    assert_eq!(std::fs::read_link(live.join("link")).unwrap(), Path::new(&first));
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"));

    // Whole again: the next pull finds nothing to do.
    let (code, r, stderr) = pull_checked(&node, &source);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["counts"]["deleted"].as_u64(), r["counts"]["downloaded"].as_u64()), (Some(0), Some(0)), "{r}");

    // A name that is not UTF-8 cannot be named safely: reported, never
    // counted as removed.
    use std::os::unix::ffi::OsStrExt;
    let odd = live.join(std::ffi::OsStr::from_bytes(b"odd-\xff.php"));
    std::fs::write(&odd, b"?").unwrap();
    let (code, r, _) = pull_checked(&node, &source);
    assert_eq!((code, r["counts"]["deleted"].as_u64()), (1, Some(0)), "{r}");
    assert!(r["errors"][0]["error"].as_str().unwrap_or_default().contains("not UTF-8"), "{r}");
    std::fs::remove_file(&odd).unwrap();
}

/// A publish's marker is renewed only while it is the one the publish
/// wrote: one a prune deleted is never written again, one replaced is not
/// overwritten, and either way the publish learns it lost its fence
/// before it names anything in a manifest.
#[tokio::test]
async fn a_publish_whose_marker_was_taken_learns_it_from_the_renewal_and_never_recreates_it() {
    use fleetsync::store::fence::{Marker, Side};
    let b = Bucket::new("storefence").await;
    let store = store_of(&b, "app");
    let prefix = format!("{}publishing/", store.root);
    let markers = || async {
        let out = b.client.list_objects_v2().bucket(&b.name).prefix(&prefix).send().await.unwrap();
        out.contents().iter().filter_map(|o| o.key().map(str::to_string)).collect::<Vec<_>>()
    };
    for replaced in [false, true] {
        let marker = Marker::put_renewing(&b.client, &store, Side::Publishing, Duration::from_millis(200)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        marker.check(&b.client, &store).await.expect("renewed, still ours");
        let key = markers().await.pop().expect("the marker");
        if replaced {
            b.put(&key, b"{\"by\":\"someone else\"}").await;
        } else {
            b.client.delete_object().bucket(&b.name).key(&key).send().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let e = marker.check(&b.client, &store).await.expect_err("the fence is lost").to_string();
        assert!(e.contains("was removed or replaced") && e.contains("nothing was named"), "{e}");
        if replaced {
            let body = b.client.get_object().bucket(&b.name).key(&key).send().await.unwrap().body.collect().await.unwrap().into_bytes();
            assert_eq!(&body[..], b"{\"by\":\"someone else\"}", "not overwritten");
        } else {
            assert!(markers().await.is_empty(), "a deleted marker is never written again");
        }
        marker.remove(&b.client, &store).await;
    }
}

/// Everything under `root` as a listing: each file with its mode and
/// content, each directory (empty ones too), each symlink with its target;
/// nothing followed.
fn listing(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let what = if md.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if md.is_dir() {
                todo.push(p.clone());
                "dir".to_string()
            } else {
                format!("file {:o} {}", md.mode() & 0o7777, String::from_utf8_lossy(&std::fs::read(&p).unwrap()))
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Work proportional to the change: after a switch the live release is
/// checked and copied (hard links) into `releases/.next`, and the next
/// release is built from that copy, writing only what changed: here every
/// kind of change at once (content, mode, a file deleted, a directory
/// gone, an empty directory gone, a symlink retargeted, a file that
/// becomes a directory and a directory that becomes a file). The new
/// release is exactly what was published, and the release before it keeps
/// every byte and mode it had.
#[tokio::test]
async fn a_release_built_from_the_staged_copy_is_exactly_the_new_one_and_leaves_the_old_one_whole() {
    let b = Bucket::new("storestaged").await;
    let source = b.url("app");
    let v1 = tempfile::tempdir().unwrap();
    let w = |rel: &str, body: &str| {
        let p = v1.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    for (rel, body) in [
        ("same.php", "same"),
        ("changed.php", "old body"),
        ("chmod.sh", "#!/bin/sh"),
        ("deleted.php", "gone next"),
        ("dir/inner.php", "inner"),
        ("x", "a file, then a directory"),
        ("z/under.php", "a directory, then a file"),
        ("moved-from.php", "content that moves"),
    ] {
        w(rel, body);
    }
    std::fs::create_dir_all(v1.path().join("empty")).unwrap();
    std::os::unix::fs::symlink("same.php", v1.path().join("link")).unwrap();
    let before = listing(v1.path());
    assert_eq!(publish(v1.path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    let (code, r, stderr) = pull(&node, &source);
    assert_eq!((code, r["release"]["switched"].as_bool()), (0, Some(true)), "{stderr}");
    assert!(!node.dest.join("releases/.next").exists(), "not staged by the deploy");
    let (code, _, stderr) = pull(&node, &source);
    assert_eq!(code, 0, "{stderr}");
    assert!(node.dest.join("releases/.next").is_dir(), "r1 was staged by the (timer's) pull that found it live");

    let v2 = tempfile::tempdir().unwrap();
    for (rel, body) in [
        ("same.php", "same"),
        ("changed.php", "new body"),
        ("chmod.sh", "#!/bin/sh"),
        ("x/y.php", "now under a directory"),
        ("z", "now a file"),
        ("moved-to.php", "content that moves"),
    ] {
        let p = v2.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    std::fs::set_permissions(v2.path().join("chmod.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("changed.php", v2.path().join("link")).unwrap();
    assert_eq!(publish(v2.path(), &source, &["--release-id", "r2"]).0, 0);
    let (code, r, stderr) = pull(&node, &source);
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(r["release"]["staged"], true, "built from the staged copy: {r}");
    // Kept as staged: same.php; linked from r1: the moved content; copied
    // (a new inode for the new mode): chmod.sh; fetched: changed.php,
    // x/y.php and z; deleted: the five files r2 lacks.
    let counts = |k: &str| r["counts"][k].as_u64().unwrap();
    assert_eq!((counts("unchanged"), counts("downloaded"), counts("deleted")), (3, 3, 5), "{r}");
    assert_eq!((r["release"]["linked"].as_u64(), r["release"]["copied"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!(listing(&node.dest.join("current")), listing(v2.path()), "r2 is exactly what was published");
    assert_eq!(listing(&node.dest.join("releases/r1")), before, "r1 keeps every byte and mode it had");
    // And r2 is staged in turn, for the deploy after it, once checked.
    assert_eq!(pull(&node, &source).0, 0);
    assert!(node.dest.join("releases/.next/x/y.php").is_file());
}

/// The drift check on a schedule: a no-op within --verify-every of the
/// last full check trusts the live release (a file rewritten under it
/// stays as it is), the first pull after it checks and repairs. A change
/// made under the live release after it was staged reaches the release
/// built from the staged copy (the files share inodes); the first pull
/// after that switch checks it and repairs it, within --verify-every.
#[tokio::test]
async fn drift_is_repaired_by_the_first_pull_after_verify_every_and_after_a_staged_switch() {
    let b = Bucket::new("storeverify").await;
    let source = b.url("app");
    let mut tree = versioned(20, 1);
    let (first, last) = (tree.keys().next().unwrap().clone(), tree.keys().last().unwrap().clone());
    assert_eq!(publish(build(&tree).path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    let every = ["--releases", "--verify-every", "3s"];
    assert_eq!(run_json(node.agent(&source).args(every)).0, 0);
    let live = node.dest.join("current");

    std::fs::write(live.join(&first), "tampered").unwrap();
    let (code, r, _) = run_json(node.agent(&source).args(every));
    assert_eq!((code, r["counts"]["downloaded"].as_u64()), (0, Some(0)), "trusted within --verify-every: {r}");
    assert_eq!(std::fs::read(live.join(&first)).unwrap(), b"tampered");
    std::thread::sleep(Duration::from_secs(3));
    let (code, r, _) = run_json(node.agent(&source).args(every));
    assert_eq!((code, r["counts"]["downloaded"].as_u64()), (0, Some(1)), "checked and repaired: {r}");
    assert_eq!(std::fs::read(live.join(&first)).unwrap(), tree[&first]);

    // Staged again by the pull that found r1 whole; then a file is
    // rewritten in place under r1, and r2 changes another one.
    let (code, _, _) = run_json(node.agent(&source).args(["--releases", "--verify-every", "0"]));
    assert_eq!(code, 0);
    assert!(node.dest.join("releases/.next").is_dir());
    std::fs::OpenOptions::new().append(true).open(live.join(&first)).unwrap().write_all(b" and more").unwrap();
    tree.insert(last.clone(), b"r2".to_vec());
    assert_eq!(publish(build(&tree).path(), &source, &["--release-id", "r2"]).0, 0);
    let (code, r, stderr) = run_json(node.agent(&source).args(every));
    assert_eq!((code, r["release"]["staged"].as_bool()), (0, Some(true)), "{stderr}\n{r}");
    assert!(std::fs::read(live.join(&first)).unwrap().ends_with(b" and more"), "carried into r2 by the shared inode");
    let (code, r, _) = run_json(node.agent(&source).args(every));
    assert_eq!((code, r["counts"]["downloaded"].as_u64()), (0, Some(1)), "repaired by the next pull: {r}");
    assert_eq!(read_tree(&live), tree);
}
