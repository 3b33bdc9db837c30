//! What a release is laid out with before it goes live, end to end: shared
//! paths (`--shared PATH[=TARGET]`: what the application writes there
//! outlives every release and a rollback, published content never lands on
//! it, the first use seeds it from the live release when that has the path,
//! bad input touches nothing) and the before-switch command.

mod common;

use std::path::Path;

use common::{publish, run_json, Bucket, Node, Web};

fn build(tree: &[(&str, &str)]) -> tempfile::TempDir {
    common::tree_dir(tree.iter().copied())
}

fn pull(node: &Node, source: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    run_json(node.agent(source).arg("--releases").args(extra))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test]
async fn shared_data_outlives_releases_and_rollbacks_and_published_content_never_lands_on_it() {
    let b = Bucket::new("shared").await;
    let source = b.url("app");
    let r1 = build(&[
        ("public/index.php", "<?php echo 'r1';"),
        ("public/uploads/logo.png", "published logo"),
        ("storage/app/.gitignore", "*\n"),
        ("storage/framework/views/.gitkeep", ""),
    ]);
    assert_eq!(publish(r1.path(), &source, &["--release-id", "r1"]).0, 0);
    let r2 = build(&[
        ("public/index.php", "<?php echo 'r2';"),
        ("public/uploads/logo.png", "another published logo"),
        ("storage/app/.gitignore", "* (r2)\n"),
        ("storage/new.txt", "published into storage"),
    ]);
    assert_eq!(publish(r2.path(), &source, &["--release-id", "r2"]).0, 0);

    let node = Node::new();
    let efs = tempfile::tempdir().unwrap();
    let uploads = format!("public/uploads={}", efs.path().display());
    let flags = ["--shared", "storage", "--shared", uploads.as_str()];
    let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "r1"][..], &flags].concat());
    assert_eq!(code, 0, "{stderr}");
    let live = node.dest.join("current");
    assert_eq!(std::fs::read_link(live.join("storage")).unwrap(), Path::new("../../shared/storage"));
    assert_eq!(std::fs::read_link(live.join("public/uploads")).unwrap(), efs.path());
    // Seeded from the release's own content (nothing was live).
    assert_eq!(read(&node.dest.join("shared/storage/app/.gitignore")), "*\n");
    assert!(node.dest.join("shared/storage/framework/views/.gitkeep").is_file());
    // A TARGET is never written into: the published logo is not placed.
    assert!(!efs.path().join("logo.png").exists());
    assert_eq!(r["release"]["shared_skipped"], 1, "{r}");

    // The application writes under both; nginx serves the site.
    std::fs::create_dir_all(live.join("storage/logs")).unwrap();
    std::fs::write(live.join("storage/logs/app.log"), "written by r1\n").unwrap();
    std::fs::write(live.join("public/uploads/photo.jpg"), "a visitor's upload").unwrap();
    let web = tempfile::tempdir().unwrap();
    let (server, ready) =
        Web::start(&["serve", "--dir", &web.path().display().to_string(), "--root", &live.join("public").display().to_string()]);
    let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}")).to_string();
    let served = || common::http_get(&port, "/uploads/photo.jpg");
    assert_eq!(served(), (200, b"a visitor's upload".to_vec()));

    let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "r2"][..], &flags].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r2"));
    assert_eq!(read(&live.join("storage/logs/app.log")), "written by r1\n");
    assert_eq!(read(&live.join("public/uploads/photo.jpg")), "a visitor's upload");
    assert_eq!(served(), (200, b"a visitor's upload".to_vec()), "served by nginx from release r2");
    assert_eq!(read(&live.join("storage/app/.gitignore")), "*\n", "published content never lands on what is shared");
    assert!(!live.join("storage/new.txt").exists());
    assert_eq!(r["release"]["shared_skipped"], 3, "{r}");

    // A no-op: the links are the release's shape, nothing to repair.
    let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "r2"][..], &flags].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["counts"]["downloaded"].as_u64(), r["counts"]["deleted"].as_u64()), (Some(0), Some(0)), "{r}");

    // A rollback sees the same data.
    let out = std::process::Command::new(common::agent_bin())
        .arg("rollback")
        .arg("--dest")
        .arg(&node.dest)
        .arg("--state-dir")
        .arg(&node.state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"));
    assert_eq!(read(&live.join("storage/logs/app.log")), "written by r1\n");
    assert_eq!(read(&live.join("public/uploads/photo.jpg")), "a visitor's upload");
    assert_eq!(served(), (200, b"a visitor's upload".to_vec()), "served after the rollback");
    server.stop();

    // A release that publishes a file where a shared directory is: nothing
    // goes live, and it says which path.
    let r3 = build(&[("public/index.php", "<?php echo 'r3';"), ("storage", "a file now")]);
    assert_eq!(publish(r3.path(), &source, &["--release-id", "r3"]).0, 0);
    let (code, _, stderr) = pull(&node, &source, &[&["--release-id", "r3"][..], &flags].concat());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("shared path storage is a directory") && stderr.contains("publishes a file"), "{stderr}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"));
    assert_eq!(read(&live.join("storage/logs/app.log")), "written by r1\n");
}

/// Adopting shared paths on a node that already serves: what the
/// application wrote into the live release's `storage/` is copied to
/// `DEST/shared/storage` (not the release's published skeleton), so the
/// next release sees it.
#[tokio::test]
async fn the_first_shared_pull_on_a_serving_node_keeps_what_the_application_wrote() {
    let b = Bucket::new("sharedadopt").await;
    let source = b.url("app");
    let tree = |v: &str| build(&[("public/index.php", v), ("storage/app/.gitignore", "*\n")]);
    assert_eq!(publish(tree("<?php echo 1;").path(), &source, &["--release-id", "r1"]).0, 0);
    assert_eq!(publish(tree("<?php echo 2;").path(), &source, &["--release-id", "r2"]).0, 0);
    let node = Node::new();
    assert_eq!(pull(&node, &source, &["--release-id", "r1"]).0, 0);
    let live = node.dest.join("current");
    std::fs::create_dir_all(live.join("storage/sessions")).unwrap();
    std::fs::write(live.join("storage/sessions/abc"), "a session").unwrap();
    // Written by the web server's user, in a directory only it may write.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::os::unix::fs::chown(live.join("storage/sessions"), Some(33), Some(33)).unwrap();
    std::os::unix::fs::chown(live.join("storage/sessions/abc"), Some(33), Some(33)).unwrap();
    std::fs::set_permissions(live.join("storage/sessions"), std::fs::Permissions::from_mode(0o770)).unwrap();

    // A first try that never goes live (its before-switch fails): the
    // application goes on writing into the live release meanwhile.
    let (code, _, stderr) = pull(&node, &source, &["--release-id", "r2", "--shared", "storage", "--before-switch", "exit 1"]);
    assert_eq!(code, 1, "{stderr}");
    std::fs::write(live.join("storage/sessions/def"), "a later session").unwrap();

    let (code, _, stderr) = pull(&node, &source, &["--release-id", "r2", "--shared", "storage"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&live.join("storage/sessions/def")), "a later session", "seeded again from the live release, not the first try's copy");
    let sessions = std::fs::metadata(node.dest.join("shared/storage/sessions")).unwrap();
    assert_eq!((sessions.uid(), sessions.mode() & 0o777), (33, 0o770), "owner and mode kept");
    assert_eq!(std::fs::metadata(node.dest.join("shared/storage/sessions/abc")).unwrap().uid(), 33);
    let aside: Vec<_> = std::fs::read_dir(node.dest.join("shared"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("storage.stale-"))
        .collect();
    assert_eq!(aside.len(), 1, "the first try's copy is set aside, never deleted");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r2"));
    assert_eq!(read(&live.join("storage/sessions/abc")), "a session");
    assert_eq!(read(&node.dest.join("shared/storage/app/.gitignore")), "*\n");
    // A copy: the old release's own file is not the shared one.
    let shared = std::fs::metadata(node.dest.join("shared/storage/app/.gitignore")).unwrap();
    let old = std::fs::metadata(node.dest.join("releases/r1/storage/app/.gitignore")).unwrap();
    assert_ne!(shared.ino(), old.ino());
}

/// Shared paths that escape the release, are absolute, have empty
/// components or overlap: refused at start, one line, exit 2, nothing
/// written.
#[tokio::test]
async fn bad_shared_paths_are_refused_before_anything_is_touched() {
    let b = Bucket::new("sharedbad").await;
    let source = b.url("app");
    assert_eq!(publish(build(&[("index.php", "x")]).path(), &source, &["--release-id", "r1"]).0, 0);
    let node = Node::new();
    for bad in [
        &["--shared", "../etc"][..],
        &["--shared", "/etc"],
        &["--shared", "a//b"],
        &["--shared", "x=relative/target"],
        &["--shared", "storage", "--shared", "storage/logs"],
    ] {
        let (code, r, stderr) = pull(&node, &source, bad);
        assert_eq!(code, 2, "{bad:?}: {stderr}");
        assert!(r["error"].as_str().unwrap_or_default().contains("--shared"), "{bad:?}: {r}");
        assert!(!node.dest.exists(), "{bad:?}: nothing written");
    }
}

/// `--shared-file`: a file that outlives releases (`.env`) is linked, never
/// made up: with no copy on the node and none published, the pull fails
/// naming it and nothing goes live; once the file is there, every release
/// links to it; a release that publishes the path as a directory is
/// refused and the live release keeps serving. A node with no copy takes
/// the first one a release publishes, and keeps it.
#[tokio::test]
async fn a_shared_file_is_linked_and_never_made_up() {
    let b = Bucket::new("sharedfile").await;
    let source = b.url("app");
    assert_eq!(publish(build(&[("index.php", "v1")]).path(), &source, &["--release-id", "r1"]).0, 0);
    assert_eq!(publish(build(&[("index.php", "v2"), (".env/x", "a directory")]).path(), &source, &["--release-id", "r2"]).0, 0);
    let node = Node::new();

    let (code, r, stderr) = pull(&node, &source, &["--shared-file", ".env", "--release-id", "r1"]);
    assert_eq!(code, 2, "{stderr}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("shared file .env") && error.contains("publishes none"), "{r}");
    assert!(!node.dest.join("current").exists(), "nothing went live");
    assert!(!node.dest.join("shared/.env").exists(), "no file was made up");

    std::fs::create_dir_all(node.dest.join("shared")).unwrap();
    std::fs::write(node.dest.join("shared/.env"), "APP_KEY=secret\n").unwrap();
    let (code, r, stderr) = pull(&node, &source, &["--shared-file", ".env", "--release-id", "r1"]);
    assert_eq!(code, 0, "{stderr}\n{r}");
    let live = node.dest.join("current");
    assert_eq!(std::fs::read_link(live.join(".env")).unwrap(), Path::new("../../shared/.env"));
    assert_eq!(read(&live.join(".env")), "APP_KEY=secret\n");

    let (code, r, stderr) = pull(&node, &source, &["--shared-file", ".env", "--release-id", "r2"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(r["error"].as_str().unwrap_or_default().contains("shared file .env is published as a directory in release r2"), "{r}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"), "the live release keeps serving");
    assert_eq!(read(&live.join(".env")), "APP_KEY=secret\n");

    // A release that publishes the file seeds a node that has none; a
    // later release's copy never replaces what the node has.
    assert_eq!(publish(build(&[("index.php", "v3"), (".env", "APP_KEY=from-build\n")]).path(), &source, &["--release-id", "r3"]).0, 0);
    assert_eq!(publish(build(&[("index.php", "v4"), (".env", "APP_KEY=newer-build\n")]).path(), &source, &["--release-id", "r4"]).0, 0);
    let fresh = Node::new();
    for id in ["r3", "r4"] {
        let (code, r, stderr) = pull(&fresh, &source, &["--shared-file", ".env", "--release-id", id]);
        assert_eq!(code, 0, "{stderr}\n{r}");
        let live = fresh.dest.join("current");
        assert_eq!(std::fs::read_link(live.join(".env")).unwrap(), Path::new("../../shared/.env"));
        assert_eq!(read(&live.join(".env")), "APP_KEY=from-build\n", "after {id}");
    }
}

/// `fleetsync publish --shared DIR --shared-file FILE`: the release
/// declares its shared paths, so a node with no shared setting of its own
/// lays them out (a fleet deploy needs no per-node flag). What the
/// application writes there outlives the next release and a rollback,
/// published content never lands on it, a no-op stays a no-op, and a
/// node's own setting for a declared path (its TARGET, or a path inside
/// it) wins. What the latest release declares stays declared until
/// `--unshare` names it. A TARGET or a path that escapes is refused at
/// publish, one line, nothing uploaded.
#[tokio::test]
async fn shared_paths_declared_at_publish_need_no_setting_on_the_node() {
    let b = Bucket::new("shareddecl").await;
    let source = b.url("app");
    let both = serde_json::json!({"dirs": ["storage"], "files": [".env"]});
    let r0 = build(&[("index.php", "v0"), ("storage/app/.gitignore", "*\n"), (".env", "APP_KEY=from-build\n")]);
    assert_eq!(publish(r0.path(), &source, &["--release-id", "r0"]).0, 0);
    let declare = ["--shared", "storage/", "--shared-file", ".env"];
    let r1 = build(&[("index.php", "v1"), ("storage/app/.gitignore", "*\n"), (".env", "APP_KEY=from-build\n")]);
    let (code, r, stderr) = publish(r1.path(), &source, &[&["--release-id", "r1"][..], &declare].concat());
    assert_eq!((code, &r["shared"]), (0, &both), "normalised: {stderr}\n{r}");
    // A hotfix published without the flags declares them still.
    let r2 = build(&[("index.php", "v2"), ("storage/app/.gitignore", "published over\n"), (".env", "APP_KEY=newer\n")]);
    let (code, r, stderr) = publish(r2.path(), &source, &["--release-id", "r2"]);
    assert_eq!((code, &r["shared"]), (0, &both), "inherited: {stderr}\n{r}");

    // The node runs r0, which declared nothing: storage is a directory of
    // the release, and the application has written into it. A timer's
    // pull stages the next release from it.
    let node = Node::new();
    let live = node.dest.join("current");
    for _ in 0..2 {
        let (code, r, stderr) = pull(&node, &source, &["--release-id", "r0"]);
        assert_eq!(code, 0, "{stderr}\n{r}");
    }
    assert!(live.join("storage").is_dir() && node.dest.join("releases/.next").is_dir(), "staged from r0");
    std::fs::write(live.join("storage/app/upload.txt"), "a visitor's upload").unwrap();

    // r1 declares storage and .env: built from the staged copy (where
    // they are r0's own), they become links, seeded from what r0 holds.
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r1"]);
    assert_eq!((code, &r["release"]["staged"]), (0, &true.into()), "{stderr}\n{r}");
    assert_eq!(std::fs::read_link(live.join("storage")).unwrap(), Path::new("../../shared/storage"));
    assert_eq!(std::fs::read_link(live.join(".env")).unwrap(), Path::new("../../shared/.env"));
    assert_eq!(read(&live.join("storage/app/upload.txt")), "a visitor's upload");

    for id in ["r2", "r1"] {
        let (code, r, stderr) = pull(&node, &source, &["--release-id", id]);
        assert_eq!(code, 0, "{stderr}\n{r}");
        assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases").join(id));
        assert_eq!(read(&live.join("storage/app/upload.txt")), "a visitor's upload", "after {id}");
        assert_eq!(read(&live.join("storage/app/.gitignore")), "*\n", "published content never lands on it ({id})");
        assert_eq!(read(&live.join(".env")), "APP_KEY=from-build\n", "after {id}");
    }
    // A no-op, its full check included: the release is found intact as
    // laid out, so no manifest is read.
    let before = b.requests();
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r1", "--verify-every", "0"]);
    let after = b.requests();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["release"]["switched"].as_bool(), r["counts"]["downloaded"].as_u64()), (Some(false), Some(0)), "a no-op: {r}");
    assert_eq!(after.get - before.get, 0, "{r}");

    // A release that declares nothing lays storage out as its own again
    // (from the staged copy of r1, where it is a link); the shared data
    // stays where it was.
    assert!(node.dest.join("releases/.next").is_dir(), "staged from r1");
    let unshare = ["--release-id", "r3", "--unshare", "storage", "--unshare", ".env"];
    let (code, r, stderr) = publish(r0.path(), &source, &unshare);
    assert_eq!((code, r.get("shared")), (0, None), "{stderr}\n{r}");
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r3"]);
    assert_eq!((code, &r["release"]["staged"]), (0, &true.into()), "{stderr}\n{r}");
    assert!(std::fs::symlink_metadata(live.join("storage")).unwrap().is_dir(), "{r}");
    assert_eq!(read(&live.join("storage/app/.gitignore")), "*\n");
    assert_eq!(read(&node.dest.join("shared/storage/app/upload.txt")), "a visitor's upload");

    // A node's own setting for a declared path wins: its TARGET.
    let other = Node::new();
    let efs = tempfile::tempdir().unwrap();
    let mine = format!("storage={}", efs.path().display());
    let (code, r, stderr) = pull(&other, &source, &["--release-id", "r2", "--shared", &mine]);
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(std::fs::read_link(other.dest.join("current/storage")).unwrap(), efs.path());
    // And a path of the node's inside a declared one: the node's alone.
    let third = Node::new();
    let (code, r, stderr) = pull(&third, &source, &["--release-id", "r2", "--shared", "storage/app"]);
    assert_eq!(code, 0, "{stderr}\n{r}");
    let live3 = third.dest.join("current");
    assert!(std::fs::symlink_metadata(live3.join("storage")).unwrap().is_dir());
    assert_eq!(std::fs::read_link(live3.join("storage/app")).unwrap(), Path::new("../../../shared/storage/app"));

    // The same tree declaring other shared paths is another release, not
    // "unchanged" (latest, r3, declares none); fleetsync.toml declares
    // them as the flags do.
    let config = tempfile::tempdir().unwrap();
    let toml = config.path().join("fleetsync.toml");
    std::fs::write(&toml, "shared = [\"storage\"]\nshared-files = [\".env\"]\n").unwrap();
    let (code, r, stderr) = common::run_report(
        std::process::Command::new(common::bin("fleetsync-bastion", "fleetsync"))
            .args(["publish", r0.path().to_str().unwrap(), "--source", &source, "--json"])
            .env("FLEETSYNC_CONFIG", &toml),
    );
    assert_eq!((code, &r["unchanged"]), (0, &false.into()), "{stderr}\n{r}");
    assert_ne!(r["release_id"], "r3", "{r}");
    assert_eq!(r["shared"], serde_json::json!({"dirs": ["storage"], "files": [".env"]}), "{r}");

    let refused = [
        (["--shared", "../up"], "--shared \"../up\""),
        (["--shared", "storage=/mnt/efs"], "TARGET"),
        (["--unshare", "public"], "--unshare public: the latest release does not declare it"),
    ];
    for (bad, named) in refused {
        let (code, _, stderr) = publish(r1.path(), &source, &[&["--release-id", "r9"][..], &bad].concat());
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(named) && stderr.trim().lines().count() == 1, "{stderr}");
    }
    let r9 = b.client.head_object().bucket(&b.name).key("app/.fleetsync/manifests/r9.jsonl.zst").send().await;
    assert!(r9.is_err(), "nothing published");
}

/// `--before-switch`: a command that fails leaves the live release serving,
/// untouched, and says why; one that succeeds ran in the new release's
/// directory, complete with its shared links, before `current` moved, and
/// what it wrote there stays (a no-op and a repair keep it); one that
/// hangs is killed at `--hook-timeout` with everything it started.
#[tokio::test]
async fn a_before_switch_command_gates_the_switch_and_what_it_writes_stays() {
    let b = Bucket::new("beforeswitch").await;
    let source = b.url("app");
    let tree = |v: &str| build(&[("public/index.php", v), ("storage/app/.gitignore", "*\n")]);
    assert_eq!(publish(tree("<?php echo 1;").path(), &source, &["--release-id", "r1"]).0, 0);
    assert_eq!(publish(tree("<?php echo 2;").path(), &source, &["--release-id", "r2"]).0, 0);
    let node = Node::new();
    assert_eq!(pull(&node, &source, &["--release-id", "r1", "--shared", "storage"]).0, 0);
    let live = node.dest.join("current");

    let failing = "echo warming up; echo 'cache: broken config' >&2; exit 3";
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r2", "--shared", "storage", "--before-switch", failing]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"), "nothing switched");
    assert_eq!(read(&live.join("public/index.php")), "<?php echo 1;");
    let hook = &r["release"]["before_switch"];
    assert_eq!((hook["ok"].as_bool(), hook["exit_code"].as_i64()), (Some(false), Some(3)), "{r}");
    assert!(hook["stderr"].as_str().unwrap().contains("cache: broken config"), "{r}");
    assert!(r["error"].as_str().unwrap().contains("release r1 is still live"), "{r}");
    assert!(!node.dest.join("releases/r2").exists(), "a release that failed its check is not kept");
    assert!(stderr.contains("exited 3") && stderr.contains("cache: broken config"), "the reason, on stderr too: {stderr}");

    // A command that rewrites a published file in place writes through
    // the hard link the new release shares with the live one: refused, and
    // the next pull repairs the live release.
    let (code, _, stderr) =
        pull(&node, &source, &["--release-id", "r2", "--shared", "storage", "--before-switch", "echo '// x' >> public/index.php"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("rewrote published files in place (public/index.php)"), "{stderr}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"));
    let (code, _, stderr) = pull(&node, &source, &["--release-id", "r1", "--shared", "storage"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(&live.join("public/index.php")), "<?php echo 1;", "repaired");

    let checks = "test \"$(pwd)\" = \"$FLEETSYNC_RELEASE_DIR\" && test -L storage && test -f storage/app/.gitignore \
                  && test \"$(readlink ../../current)\" = releases/$FLEETSYNC_PREVIOUS_RELEASE \
                  && mkdir -p bootstrap/cache && echo \"cached for $FLEETSYNC_RELEASE\" > bootstrap/cache/config.php";
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r2", "--shared", "storage", "--before-switch", checks]);
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r2"));
    assert_eq!(read(&live.join("bootstrap/cache/config.php")), "cached for r2\n");

    // What it wrote is part of the release: a no-op leaves it, and so does
    // the repair of drift elsewhere.
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r2", "--shared", "storage"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((r["counts"]["deleted"].as_u64(), r["counts"]["downloaded"].as_u64()), (Some(0), Some(0)), "{r}");
    std::fs::write(live.join("public/index.php"), "tampered").unwrap();
    // (A full check on this pull: the last was within --verify-every.)
    let (code, r, stderr) = pull(&node, &source, &["--release-id", "r2", "--shared", "storage", "--verify-every", "0"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["counts"]["downloaded"], 1, "{r}");
    assert_eq!(read(&live.join("public/index.php")), "<?php echo 2;");
    assert_eq!(read(&live.join("bootstrap/cache/config.php")), "cached for r2\n");

    // A command that hangs, with a child of its own.
    let started = std::time::Instant::now();
    let hang = "sleep 1007 & sleep 1007";
    let (code, r, stderr) =
        pull(&node, &source, &["--release-id", "r1", "--shared", "storage", "--before-switch", hang, "--hook-timeout", "2s"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(r["release"]["before_switch"]["stderr"].as_str().unwrap().contains("killed with its process group after 2 s"), "{r}");
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r2"));
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).lines().any(|l| l.trim() == "sleep 1007"), "the command's children were killed");
}

/// `--keep-assets`: the live release's hashed assets that the new release
/// lacks are linked into it, never over one it has, and only for one
/// deploy (what a release kept is not carried again); without the flag
/// they are gone. A no-op keeps them; a glob that overlaps a shared path
/// is refused.
#[tokio::test]
async fn kept_assets_outlive_one_deploy_and_never_replace_the_new_releases() {
    let b = Bucket::new("keepassets").await;
    let source = b.url("app");
    for (id, hash) in [("r1", "111"), ("r2", "222"), ("r3", "333")] {
        let js = format!("public/build/app-{hash}.js");
        let tree = build(&[("public/index.php", id), (js.as_str(), hash), ("public/build/manifest.json", id)]);
        assert_eq!(publish(tree.path(), &source, &["--release-id", id]).0, 0);
    }
    let node = Node::new();
    let keep = ["--keep-assets", "public/build/*"];
    assert_eq!(pull(&node, &source, &["--release-id", "r1"]).0, 0);
    let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "r2"][..], &keep].concat());
    assert_eq!(code, 0, "{stderr}");
    let live = node.dest.join("current");
    assert_eq!(read(&live.join("public/build/app-111.js")), "111", "r1's asset kept");
    assert_eq!(read(&live.join("public/build/app-222.js")), "222");
    assert_eq!(read(&live.join("public/build/manifest.json")), "r2", "never over the new release's own file");
    assert_eq!(r["release"]["kept_assets"], 1, "{r}");
    let (code, r, _) = pull(&node, &source, &[&["--release-id", "r2"][..], &keep].concat());
    assert_eq!((code, r["counts"]["deleted"].as_u64()), (0, Some(0)), "a no-op keeps them: {r}");
    assert!(live.join("public/build/app-111.js").exists());

    let (code, _, stderr) = pull(&node, &source, &[&["--release-id", "r3"][..], &keep].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(live.join("public/build/app-222.js").exists());
    assert!(!live.join("public/build/app-111.js").exists(), "kept for one deploy, not carried again");

    // Without the flag the last release's assets go.
    let (code, _, stderr) = pull(&node, &source, &["--release-id", "r1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!live.join("public/build/app-333.js").exists());

    for bad in [
        &["--keep-assets", "../x/*"][..],
        &["--keep-assets", "/abs/*"],
        &["--shared", "public/build", "--keep-assets", "public/**"],
        &["--shared", "storage", "--keep-assets", "storage/logs/*"],
    ] {
        let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "r2"][..], bad].concat());
        assert_eq!(code, 2, "{bad:?}: {stderr}");
        assert!(r["error"].as_str().unwrap_or_default().contains("--keep-assets"), "{bad:?}: {r}");
    }
    assert_eq!(std::fs::read_link(&live).unwrap(), Path::new("releases/r1"), "nothing touched");
}

/// A pull runs at low CPU and I/O priority by default (nice 10,
/// best-effort I/O at level 7; the before-switch command, a child of the
/// agent, reports what the agent runs at), and the commands it starts run
/// at the priority the agent was started with (a hook may start a daemon).
/// `--priority normal` leaves the agent as started; `--priority idle` adds
/// the idle CPU policy.
#[tokio::test]
async fn a_pull_runs_at_low_priority_unless_told_otherwise_and_its_hooks_as_started() {
    let b = Bucket::new("priority").await;
    let source = b.url("app");
    for id in ["r1", "r2"] {
        assert_eq!(publish(build(&[("index.php", id)]).path(), &source, &["--release-id", id]).0, 0);
    }
    let own = std::process::Command::new("nice").output().unwrap();
    let own: i32 = String::from_utf8_lossy(&own.stdout).trim().parse().unwrap();
    let node = Node::new();
    let report = "echo \"$(ps -o ni= -p $PPID | tr -d ' ') $(ionice -p $PPID) | $(nice)\" > priority.txt";
    let (code, _, stderr) = pull(&node, &source, &["--release-id", "r1", "--before-switch", report]);
    assert_eq!(code, 0, "{stderr}");
    let low = own.max(10);
    assert_eq!(read(&node.dest.join("current/priority.txt")).trim(), format!("{low} best-effort: prio 7 | {own}"));
    let (code, _, stderr) = pull(&node, &source, &["--release-id", "r2", "--before-switch", report, "--priority", "normal"]);
    assert_eq!(code, 0, "{stderr}");
    let got = read(&node.dest.join("current/priority.txt"));
    assert!(got.starts_with(&format!("{own} ")) && got.trim().ends_with(&format!("| {own}")), "as started (nice {own}): {got}");

    // --priority idle: the agent under the idle CPU policy as well (`ps`
    // names SCHED_IDLE `IDL`), its hooks as started (as this test runs:
    // `TS`, the usual policy, unless it was started otherwise).
    let ps = std::process::Command::new("ps").args(["-o", "cls=", "-p", &std::process::id().to_string()]).output().unwrap();
    let own_class = String::from_utf8_lossy(&ps.stdout).trim().to_string();
    let idle = Node::new();
    let report = "echo \"$(ps -o cls= -p $PPID) $(ionice -p $PPID) | $(ps -o ni=,cls= -p $$)\" > priority.txt";
    let (code, _, stderr) = pull(&idle, &source, &["--release-id", "r1", "--before-switch", report, "--priority", "idle"]);
    assert_eq!(code, 0, "{stderr}");
    let got = read(&idle.dest.join("current/priority.txt"));
    let got: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(got, ["IDL", "best-effort:", "prio", "7", "|", &*own.to_string(), &*own_class], "an idle pull, its hook as started");

    // An agent that is not root may not leave SCHED_IDLE (nor raise its
    // nice value back) for its hooks: rather than run the hook idle, the
    // pull fails naming why, and nothing goes live. Run as nobody, from a
    // copy of the binary it can reach.
    let nobody = Node::new();
    std::fs::set_permissions(nobody.tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bin = nobody.tmp.path().join("fleetsync-agent");
    std::fs::copy(common::agent_bin(), &bin).unwrap();
    let home = nobody.tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["pull", &source, "--releases", "--release-id", "r1", "--priority", "idle", "--before-switch", "true", "--dest"])
        .arg(home.join("www"))
        .arg("--state-dir")
        .arg(home.join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not run sh: leaving the idle CPU policy of --priority idle needs root or CAP_SYS_NICE"), "{stderr}");
    assert!(!home.join("www/current").exists(), "nothing went live");

    // One thread (a one-core node at low priority): the in-place planner
    // holds a blocking thread for the whole listing while the downloads
    // need more (a DNS lookup each, against a named endpoint; this world's
    // endpoints are addresses, so here it is the file writes); the pull
    // must still finish.
    b.put_tree("plain/", &common::sample_tree(300, 9)).await;
    let one = Node::new();
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(common::agent_bin())
        .args(["pull", &b.url("plain"), "--dest"])
        .arg(&one.dest)
        .arg("--state-dir")
        .arg(&one.state)
        .args(["--threads", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    common::assert_tree(&one.dest, &common::sample_tree(300, 9));
}

/// `--health-url`: after the switch the node asks the release it serves
/// (here a real nginx and PHP-FPM serving DEST/current) until it answers;
/// a release that answers 500 fails the pull, and with
/// `--rollback-on-failure` the previous release is live again. A URL that
/// is not http(s) is refused before anything is fetched.
#[tokio::test]
async fn a_release_that_fails_its_health_check_fails_the_pull_and_is_rolled_back() {
    let b = Bucket::new("health").await;
    let source = b.url("app");
    let healthy = build(&[("public/health.php", "<?php echo 'ok';")]);
    assert_eq!(publish(healthy.path(), &source, &["--release-id", "good"]).0, 0);
    let broken = build(&[("public/health.php", "<?php http_response_code(500); echo 'bootstrap failed';")]);
    assert_eq!(publish(broken.path(), &source, &["--release-id", "bad"]).0, 0);

    let node = Node::new();
    let web = tempfile::tempdir().unwrap();
    let root = node.dest.join("current/public");
    let (server, ready) = Web::start(&["serve", "--dir", &web.path().display().to_string(), "--root", &root.display().to_string()]);
    let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}")).to_string();
    let url = format!("http://127.0.0.1:{port}/health.php");
    let check = ["--health-url", url.as_str(), "--health-timeout", "3s", "--rollback-on-failure"];

    let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "good"][..], &check].concat());
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!((r["release"]["health"]["ok"].as_bool(), r["release"]["health"]["status"].as_u64()), (Some(true), Some(200)), "{r}");

    let (code, r, stderr) = pull(&node, &source, &[&["--release-id", "bad"][..], &check].concat());
    assert_eq!(code, 1, "{stderr}\n{r}");
    let health = &r["release"]["health"];
    assert_eq!((health["ok"].as_bool(), health["status"].as_u64()), (Some(false), Some(500)), "{r}");
    assert!(health["attempts"].as_u64().unwrap() >= 2, "retried until its timeout: {r}");
    assert_eq!(r["release"]["rolled_back"], true, "{r}");
    assert!(r["error"].as_str().unwrap().contains("health check") && r["error"].as_str().unwrap().contains("good is live again"), "{r}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/good"));
    assert_eq!(common::http_get(&port, "/health.php"), (200, b"ok".to_vec()), "the good release serves again");
    // A pull that finds its release live already asks it too: a re-run of
    // a failed deploy must not call the node healthy (a 404 is not).
    let missing = format!("http://127.0.0.1:{port}/no-such-page.php");
    let (code, r, _) = pull(&node, &source, &["--release-id", "good", "--health-url", &missing, "--health-timeout", "1s"]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["release"]["health"]["status"], 404, "{r}");
    assert!(r["error"].as_str().unwrap().contains("live already"), "{r}");
    assert_eq!(std::fs::read_link(node.dest.join("current")).unwrap(), Path::new("releases/good"), "nothing switched");

    // A rollback asks the release it makes live too: to the broken one,
    // which stays live (it was asked for) and is reported failing; back to
    // the good one, which answers.
    let rollback = |to: &str| {
        run_json(
            std::process::Command::new(common::agent_bin())
                .args(["rollback", "--to", to, "--health-url", &url, "--health-timeout", "1s", "--json", "--dest"])
                .arg(&node.dest)
                .arg("--state-dir")
                .arg(&node.state),
        )
    };
    let (code, r, stderr) = rollback("bad");
    assert_eq!(code, 1, "{stderr}\n{r}");
    assert_eq!((r["release"]["id"].as_str(), r["release"]["health"]["status"].as_u64()), (Some("bad"), Some(500)), "{r}");
    assert!(stderr.contains("release bad is live, but the health check"), "{stderr}");
    let (code, r, stderr) = rollback("good");
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(r["release"]["health"]["ok"], true, "{r}");
    server.stop();

    // Nothing answers at all: refused connections, named.
    let (code, r, _) = pull(&node, &source, &["--release-id", "bad", "--health-url", "http://127.0.0.1:9/", "--health-timeout", "1s"]);
    assert_eq!(code, 1, "{r}");
    assert!(r["release"]["health"]["error"].as_str().unwrap().to_lowercase().contains("refused"), "{r}");

    for bad in ["ftp://127.0.0.1/health", "/health"] {
        let (code, _, stderr) = pull(&node, &source, &["--release-id", "good", "--health-url", bad]);
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--health-url") && stderr.contains("http://127.0.0.1/health"), "{stderr}");
    }
}
