//! Release mode (`fleetsync-agent pull --releases`) end to end against the
//! local S3 server: atomic switches under a reading load, hard links for
//! unchanged files, `--keep`, rollback, status, and the after-switch hook.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::{agent_bin, assert_tree, run_json, sample_tree, Bucket, Node};

/// `fleetsync-agent pull --releases` into `node`, plus `extra`.
fn pull(node: &Node, source: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    run_json(node.agent(source).arg("--releases").args(extra))
}

fn agent(node: &Node, args: &[&str]) -> Command {
    let mut c = Command::new(agent_bin());
    c.args(args).arg("--dest").arg(&node.dest).arg("--state-dir").arg(&node.state);
    c
}

fn releases(node: &Node) -> BTreeSet<String> {
    std::fs::read_dir(node.dest.join("releases")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

fn live(node: &Node) -> String {
    std::fs::read_link(node.dest.join("current")).unwrap().strip_prefix("releases").unwrap().display().to_string()
}

#[tokio::test]
async fn unchanged_files_are_hard_links_a_no_op_creates_nothing_and_keep_is_honoured() {
    let b = Bucket::new("relbasic").await;
    let mut tree = sample_tree(40, 61);
    b.put_tree("app/", &tree).await;
    let node = Node::new();

    let (code, r1, stderr) = pull(&node, &b.url("app"), &[]);
    assert_eq!(code, 0, "{stderr}");
    let id1 = r1["release"]["id"].as_str().unwrap().to_string();
    assert_eq!((r1["release"]["created"].as_bool(), r1["release"]["switched"].as_bool()), (Some(true), Some(true)));
    assert_eq!(live(&node), id1);
    assert_tree(&node.dest.join("current"), &tree);

    // Identical content is the same release: nothing is created or switched.
    let (code, r, _) = pull(&node, &b.url("app"), &[]);
    assert_eq!(code, 0);
    assert_eq!((r["release"]["id"].as_str(), r["release"]["switched"].as_bool()), (Some(id1.as_str()), Some(false)), "{r}");
    assert_eq!(r["counts"]["downloaded"], 0);
    assert_eq!(releases(&node), BTreeSet::from([id1.clone()]));

    // One same-size change: one download, every other file shared.
    let (changed, body) = tree.iter().next().map(|(k, v)| (k.clone(), v.iter().map(|b| b ^ 0x55).collect::<Vec<u8>>())).unwrap();
    b.put(&format!("app/{changed}"), &body).await;
    tree.insert(changed.clone(), body);
    let (code, r2, _) = pull(&node, &b.url("app"), &[]);
    assert_eq!(code, 0, "{r2}");
    let id2 = r2["release"]["id"].as_str().unwrap().to_string();
    assert_ne!(id1, id2);
    let files = r2["counts"]["listed"].as_u64().unwrap();
    assert_eq!((r2["counts"]["downloaded"].as_u64(), r2["release"]["linked"].as_u64()), (Some(1), Some(files - 1)), "{r2}");
    assert_tree(&node.dest.join("current"), &tree);
    let (old, new) = (node.dest.join("releases").join(&id1), node.dest.join("releases").join(&id2));
    for key in tree.keys() {
        let same = std::fs::metadata(old.join(key)).unwrap().ino() == std::fs::metadata(new.join(key)).unwrap().ino();
        assert_eq!(same, *key != changed, "{key}: shared by hard link exactly when unchanged");
    }

    // --keep 1: older releases go, but never the live one or the one before.
    for i in 0..3 {
        b.put("app/version.txt", format!("v{i}").as_bytes()).await;
        let (code, _, stderr) = pull(&node, &b.url("app"), &["--keep", "1"]);
        assert_eq!(code, 0, "{stderr}");
    }
    // The deploys set the older ones aside; the pull after them (the
    // timer's, which switches nothing) removes them.
    assert_eq!(pull(&node, &b.url("app"), &["--keep", "1"]).0, 0);
    let kept = releases(&node);
    assert_eq!(kept.len(), 2, "the live release and the one before it: {kept:?}");
    assert!(kept.contains(&live(&node)));
    assert!(!kept.contains(&id1) && !kept.contains(&id2));
}

#[tokio::test]
async fn rollback_is_byte_identical_and_status_names_live_and_previous() {
    let b = Bucket::new("relroll").await;
    let v1 = sample_tree(25, 62);
    b.put_tree("app/", &v1).await;
    let node = Node::new();
    let (_, r1, _) = pull(&node, &b.url("app"), &["--release-id", "build-1"]);
    assert_eq!(r1["release"]["id"], "build-1");
    let mut v2 = v1.clone();
    v2.insert("new.php".into(), b"<?php // v2".to_vec());
    b.put("app/new.php", b"<?php // v2").await;
    let (code, _, stderr) = pull(&node, &b.url("app"), &["--release-id", "build-2"]);
    assert_eq!(code, 0, "{stderr}");
    assert_tree(&node.dest.join("current"), &v2);

    // Nothing live yet on a new node: exit 1, and it says so.
    let fresh = Node::new();
    let (code, st, stderr) = run_json(&mut agent(&fresh, &["status", "--json"]));
    assert_eq!((code, st["current"].is_null()), (1, true), "{stderr}\n{st}");
    assert!(stderr.contains("holds no release yet"), "{stderr}");

    let (code, st, _) = run_json(&mut agent(&node, &["status", "--json"]));
    assert_eq!(code, 0);
    assert_eq!((st["current"].as_str(), st["previous"].as_str()), (Some("build-2"), Some("build-1")), "{st}");
    assert_eq!(st["last_pull"]["release"]["id"], "build-2");

    let (code, r, stderr) = run_json(&mut agent(&node, &["rollback", "--json"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["release"]["id"].as_str(), r["release"]["previous"].as_str()), (Some("build-1"), Some("build-2")));
    assert_tree(&node.dest.join("current"), &v1);
    let (_, st, _) = run_json(&mut agent(&node, &["status", "--json"]));
    assert_eq!((st["current"].as_str(), st["previous"].as_str()), (Some("build-1"), None), "build-2 was rolled back: {st}");

    let (code, _, _) = run_json(&mut agent(&node, &["rollback", "--to", "build-2", "--json"]));
    assert_eq!(code, 0);
    assert_tree(&node.dest.join("current"), &v2);
    let out = agent(&node, &["rollback", "--to", "build-9"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no complete release build-9"));

    // A reused --release-id with other content is refused; nothing changes.
    b.put("app/new.php", b"<?php // v3").await;
    let (code, r, _) = pull(&node, &b.url("app"), &["--release-id", "build-1"]);
    assert_eq!(code, 2, "{r}");
    assert!(r["error"].as_str().unwrap().contains("already exists with other content"), "{r}");
    assert_eq!(live(&node), "build-2");
}

#[tokio::test]
async fn a_failed_after_switch_rolls_back_when_asked_and_a_failed_build_never_goes_live() {
    let b = Bucket::new("relhook").await;
    b.put("app/index.php", b"v1").await;
    let node = Node::new();
    let marker = node.tmp.path().join("hook-ran");
    let hook = format!("echo \"$FLEETSYNC_RELEASE $FLEETSYNC_PREVIOUS_RELEASE\" > {}", marker.display());
    let (code, r1, _) = pull(&node, &b.url("app"), &["--after-switch", &hook]);
    assert_eq!(code, 0);
    let id1 = r1["release"]["id"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), id1, "the hook ran with the release in its environment");

    b.put("app/index.php", b"v2").await;
    let (code, r, _) = pull(&node, &b.url("app"), &["--after-switch", "echo reload failed >&2; exit 7", "--rollback-on-failure"]);
    assert_eq!(code, 1, "{r}");
    assert_eq!((r["release"]["rolled_back"].as_bool(), r["release"]["after_switch"]["exit_code"].as_i64()), (Some(true), Some(7)), "{r}");
    assert_eq!(r["release"]["after_switch"]["stderr"], "reload failed");
    assert_eq!(live(&node), id1);
    assert_eq!(std::fs::read(node.dest.join("current/index.php")).unwrap(), b"v1");

    // Without --rollback-on-failure the new release stays live; exit 1.
    let (code, r, _) = pull(&node, &b.url("app"), &["--after-switch", "exit 3"]);
    assert_eq!(code, 1);
    assert_eq!(live(&node), r["release"]["id"].as_str().unwrap());
    assert_eq!(std::fs::read(node.dest.join("current/index.php")).unwrap(), b"v2");
    let live_before = live(&node);

    // A build that fails as a whole (a key that is a file and a directory)
    // is removed; the live release is untouched.
    b.put("app/conflict", b"file").await;
    b.put("app/conflict/inner", b"file below").await;
    let (code, r, _) = pull(&node, &b.url("app"), &[]);
    assert_ne!(code, 0, "{r}");
    assert_eq!(live(&node), live_before);
    assert_eq!(releases(&node).len(), 2, "no partial release left: {:?}", releases(&node));
}

#[tokio::test]
async fn readers_never_see_a_mix_of_releases_or_a_missing_file_across_20_switches() {
    let b = Bucket::new("relatomic").await;
    let node = Node::new();
    let version = |v: u32| -> BTreeMap<String, Vec<u8>> {
        (0..20).map(|i| (format!("d{}/f{i}.php", i % 4), format!("v{v} {i}").into_bytes())).collect()
    };
    b.put_tree("app/", &version(0)).await;
    assert_eq!(pull(&node, &b.url("app"), &["--keep", "5"]).0, 0);

    // A reader process, looping until told to stop: a request through the
    // symlink always finds its file, and a reader that pins the tree (resolves
    // `current` once, as a web server resolving its document root does) sees
    // one release, whole.
    let stop = node.tmp.path().join("stop-reading");
    let reader = Command::new("python3")
        .args(["-c", READER])
        .arg(&node.dest)
        .arg(&stop)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for v in 1..=20 {
        b.put_tree("app/", &version(v)).await;
        let (code, r, _) = pull(&node, &b.url("app"), &["--keep", "5"]);
        assert_eq!((code, r["release"]["switched"].as_bool()), (0, Some(true)), "{r}");
    }
    std::fs::write(&stop, b"").unwrap();
    let out = reader.wait_with_output().unwrap();
    assert!(out.status.success(), "the reader saw a broken tree: {}", String::from_utf8_lossy(&out.stderr));
    let reads: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(reads > 20, "the reader ran throughout: {reads} reads");
    assert_tree(&node.dest.join("current"), &version(20));
}

/// The reader: exits 1 (with the reason on stderr) on a missing file or a
/// mix of releases; prints how many whole-tree reads it made.
const READER: &str = r#"
import os, sys
dest, stop = sys.argv[1], sys.argv[2]
reads = 0
while not os.path.exists(stop):
    open(os.path.join(dest, "current/d1/f1.php"), "rb").read()
    root = os.path.realpath(os.path.join(dest, "current"))
    versions = {open(os.path.join(root, f"d{i % 4}/f{i}.php")).read().split(" ")[0] for i in range(20)}
    if len(versions) != 1:
        sys.exit(f"a mix of releases in {root}: {versions}")
    reads += 1
print(reads)
"#;

#[tokio::test]
async fn a_release_build_killed_half_way_never_goes_live_and_is_swept_by_the_next_pull() {
    let b = Bucket::new("relkill").await;
    b.put("app/index.php", b"v1").await;
    let node = Node::new();
    let (code, r1, _) = pull(&node, &b.url("app"), &[]);
    assert_eq!(code, 0);
    let id1 = r1["release"]["id"].as_str().unwrap().to_string();

    let tree = sample_tree(2500, 63);
    b.put_tree("app/", &tree).await;
    let mut child = node
        .agent(&b.url("app"))
        .arg("--releases")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert!(child.try_wait().unwrap().is_none(), "the build was still running when killed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(live(&node), id1, "the half-built release never went live");
    assert_eq!(std::fs::read(node.dest.join("current/index.php")).unwrap(), b"v1");

    let (code, r2, stderr) = pull(&node, &b.url("app"), &[]);
    assert_eq!(code, 0, "{stderr}");
    let id2 = r2["release"]["id"].as_str().unwrap().to_string();
    assert_eq!(live(&node), id2);
    assert_eq!(releases(&node), BTreeSet::from([id1, id2]), "only complete releases remain");
    let mut want = tree.clone();
    want.entry("index.php".into()).or_insert(b"v1".to_vec());
    assert_tree(&node.dest.join("current"), &want);
}

#[tokio::test]
async fn the_release_is_on_disk_before_current_switches_to_it() {
    // After a power loss, `current` must not name a release whose files
    // were still only in the page cache: the file system is synced before
    // the rename that switches it. strace shows the order of the calls.
    let b = Bucket::new("relsync").await;
    b.put_tree("app/", &sample_tree(30, 64)).await;
    let node = Node::new();
    let trace = node.tmp.path().join("strace.out");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-y", "-e", "trace=syncfs,fsync,renameat,renameat2,rename", "-o"]).arg(&trace).arg(agent_bin());
    cmd.args(["pull", &b.url("app"), "--releases", "--json", "--dest"]).arg(&node.dest).arg("--state-dir").arg(&node.state);
    let (code, _, stderr) = run_json(&mut cmd);
    assert_eq!(code, 0, "{stderr}");
    let calls = std::fs::read_to_string(&trace).unwrap();
    let switch =
        calls.lines().position(|l| l.contains("rename") && l.contains("\"current\"")).expect("the switch is a rename onto current");
    let synced = calls.lines().position(|l| l.contains("syncfs(")).expect("the file system is synced");
    assert!(synced < switch, "synced before the switch:\n{calls}");

    // The registry (like every state file) survives a power loss too: its
    // data is on disk before the rename that replaces it, and the rename
    // is on disk (its directory synced) before the pull goes on.
    let lines: Vec<&str> = calls.lines().collect();
    let replaced = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains("releases.json\""))
        .unwrap_or_else(|| panic!("the registry is replaced by a rename:\n{calls}"));
    assert!(
        lines[..replaced].iter().any(|l| l.contains("fsync(") && l.contains("releases.tmp>")),
        "the registry's data is synced before its rename:\n{calls}"
    );
    let state_dir = lines[replaced].split('"').nth(1).and_then(|tmp| std::path::Path::new(tmp).parent()).unwrap().display().to_string();
    assert!(
        lines[replaced..].iter().any(|l| l.contains("fsync(") && l.contains(&format!("<{state_dir}>"))),
        "the state directory is synced after the rename ({state_dir}):\n{calls}"
    );
}

/// `--metrics-file`: node_exporter's textfile, rewritten after every pull
/// (a failed one too) by rename, never written through a symlink; and the
/// report's version handshake.
#[tokio::test]
async fn the_metrics_file_records_each_pull_and_is_replaced_never_written_through() {
    let b = Bucket::new("relmetrics").await;
    b.put_tree("app/", &sample_tree(12, 7)).await;
    let node = Node::new();
    let dir = node.tmp.path().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let prom = dir.join("fleetsync.prom");
    let elsewhere = node.tmp.path().join("elsewhere");
    std::fs::write(&elsewhere, "keep").unwrap();
    std::os::unix::fs::symlink(&elsewhere, &prom).unwrap();
    let metrics = ["--metrics-file", prom.to_str().unwrap()];
    let sample = |name: &str| -> f64 {
        let text = std::fs::read_to_string(&prom).unwrap();
        let line = text.lines().find(|l| l.starts_with(&format!("fleetsync_{name}{{"))).unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };

    let (code, r, stderr) = pull(&node, &b.url("app"), &metrics);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep", "written through the planted symlink");
    assert!(std::fs::symlink_metadata(&prom).unwrap().is_file());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "a temporary file was left behind");
    assert_eq!(sample("last_pull_success"), 1.0);
    assert_eq!(sample("last_pull_downloaded_files"), r["counts"]["downloaded"].as_f64().unwrap());
    assert_eq!(sample("last_pull_downloaded_bytes"), r["bytes_downloaded"].as_f64().unwrap());
    assert_eq!(sample("last_pull_end_timestamp_seconds"), r["finished_at_ms"].as_f64().unwrap() / 1000.0);
    let live =
        format!("fleetsync_live_release_info{{dest=\"{}\",release=\"{}\"}} 1", node.dest.display(), r["release"]["id"].as_str().unwrap());
    assert!(std::fs::read_to_string(&prom).unwrap().contains(&live), "{live}");

    // A pull that fails as a whole is recorded too; the live release stays.
    let (code, _, _) = pull(&node, "s3://fleetsync-no-such-bucket/app", &metrics);
    assert_eq!(code, 2);
    assert_eq!((sample("last_pull_success"), sample("last_pull_exit_code")), (0.0, 2.0));
    assert!(std::fs::read_to_string(&prom).unwrap().contains(&live));

    // The handshake: the report names its format and the agent's version,
    // the one `--version` prints.
    let version = Command::new(agent_bin()).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("fleetsync-agent {}", r["agent_version"].as_str().unwrap()));
    assert_eq!((r["format"].as_u64(), r["agent_version"].as_str()), (Some(1), Some(fleetsync::VERSION)));
}

/// Every entry below `dir` (not following symlinks), with its owner.
fn owners(dir: &std::path::Path) -> BTreeSet<(u32, u32)> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        out.insert((m.uid(), m.gid()));
        if m.is_dir() {
            out.extend(owners(&e.path()));
        }
    }
    out
}

/// `--owner`: every file and directory a pull places belongs to it, in
/// place and in a release. A release built after the owner changed copies
/// what it would have linked (a link shares the inode, so the old owner,
/// and a chown would reach the previous release), and the previous release
/// keeps its owner. A user the node does not have is a configuration error.
#[tokio::test]
async fn the_owner_is_applied_at_placement_and_a_changed_one_never_reaches_the_previous_release() {
    let b = Bucket::new("relowner").await;
    let tree = sample_tree(20, 9);
    b.put_tree("app/", &tree).await;
    let node = Node::new();
    let (code, r1, stderr) = pull(&node, &b.url("app"), &["--owner", "4242:4343"]);
    assert_eq!(code, 0, "{stderr}");
    let first = node.dest.join("releases").join(r1["release"]["id"].as_str().unwrap());
    assert_eq!(owners(&first), BTreeSet::from([(4242, 4343)]));
    let m = std::fs::metadata(&first).unwrap();
    assert_eq!((m.uid(), m.gid()), (4242, 4343), "the release directory itself");

    let changed = tree.keys().next().unwrap().clone();
    b.put(&format!("app/{changed}"), b"changed").await;
    let nobody = fleetsync::Owner::parse("nobody").unwrap();
    let (code, r2, stderr) = pull(&node, &b.url("app"), &["--owner", "nobody"]);
    assert_eq!(code, 0, "{stderr}");
    let second = node.dest.join("releases").join(r2["release"]["id"].as_str().unwrap());
    assert_eq!(owners(&second), BTreeSet::from([(nobody.uid, nobody.gid)]));
    assert_eq!(owners(&first), BTreeSet::from([(4242, 4343)]), "the previous release's files changed owner");

    // Without --owner again: the files are the agent's again, copied rather
    // than linked from the release owned otherwise.
    b.put(&format!("app/{changed}"), b"changed again").await;
    let (code, r3, stderr) = pull(&node, &b.url("app"), &[]);
    assert_eq!(code, 0, "{stderr}");
    let third = node.dest.join("releases").join(r3["release"]["id"].as_str().unwrap());
    assert_eq!(owners(&third), BTreeSet::from([(0, 0)]));
    assert_eq!(owners(&second), BTreeSet::from([(nobody.uid, nobody.gid)]));

    // An agent that is not root cannot give files away: refused before
    // anything is fetched.
    let unprivileged = Node::new();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(agent_bin());
    cmd.args(["pull", &b.url("app"), "--releases", "--json", "--owner", "4242:4343", "--dest"]).arg(&unprivileged.dest);
    cmd.arg("--state-dir").arg(&unprivileged.state);
    let (code, r, _) = run_json(&mut cmd);
    assert_eq!(code, 2, "{r}");
    assert!(r["error"].as_str().unwrap().contains("only root may give files"), "{r}");
    assert!(!unprivileged.dest.exists());

    let (code, r, _) = pull(&node, &b.url("app"), &["--owner", "no-such-user-fleetsync"]);
    assert_eq!(code, 2, "{r}");
    assert!(r["error"].as_str().unwrap().contains("no user no-such-user-fleetsync"), "{r}");

    // In place: DEST's contents (DEST itself is the operator's).
    let in_place = Node::new();
    let (code, _, stderr) = run_json(in_place.agent(&b.url("app")).args(["--owner", "4242:4343"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(owners(&in_place.dest), BTreeSet::from([(4242, 4343)]));
}
