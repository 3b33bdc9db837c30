//! Release mode across a fleet: `fleetsync publish`, `sync --releases`,
//! `status` with drift, and `rollback` under the fleet lock, on the local
//! world (moto, SSM emulator, sshd nodes, SeaweedFS).

mod common;

use std::path::Path;
use std::process::Command;

use common::{read_tree, Bucket, Nodes};

fn fleetsync(args: &[&str], nodes: &Nodes) -> (i32, serde_json::Value, String) {
    common::run_report(Command::new(common::bin("fleetsync-bastion", "fleetsync")).args(args).args([
        "--ssh-config",
        &nodes.ssh_config(),
        "--json",
    ]))
}

fn publish(dir: &Path, target: &str, id: &str) {
    let (code, _, stderr) = common::publish(dir, target, &["--release-id", id]);
    assert_eq!(code, 0, "{stderr}");
}

fn live(root: &Path) -> String {
    std::fs::read_link(root.join("www/current")).unwrap().display().to_string()
}

#[tokio::test]
async fn publish_sync_status_and_rollback_across_the_fleet() {
    let b = Bucket::new("fleetrel").await;
    let (v1, v2) = (common::build_dir(10, "v1"), common::build_dir(10, "v2"));
    let (asg, nodes) = Nodes::group("rel", 3);
    let source = b.url("app");
    let base = ["--asg", asg.as_str(), "--source", source.as_str(), "--dest", "/srv/www"];

    publish(v1.path(), &source, "r1");
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{r}");
    publish(v2.path(), &source, "r2");
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases", "--via", "ssh"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{r}");
    for (_, root) in nodes.list() {
        assert_eq!(live(&root), "releases/r2");
        assert_eq!(read_tree(&root.join("www/current")), read_tree(v2.path()));
    }

    let (code, st, stderr) = fleetsync(&[&["status"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{st}");
    assert_eq!((st["majority"].as_str(), st["published"].as_str()), (Some("r2"), Some("r2")), "{st}");
    for n in st["nodes"].as_array().unwrap() {
        assert_eq!((n["current"].as_str(), n["previous"].as_str(), n["drift"].is_null()), (Some("r2"), Some("r1"), true), "{n}");
    }

    let (code, r, stderr) = fleetsync(&[&["rollback"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(r["totals"]["ok"], 3, "{r}");
    for (_, root) in nodes.list() {
        assert_eq!(live(&root), "releases/r1");
        assert_eq!(read_tree(&root.join("www/current")), read_tree(v1.path()), "byte-identical to r1");
    }
    // The fleet now runs r1 while r2 is published: every node drifts.
    let (code, st, _) = fleetsync(&[&["status"][..], &base].concat(), &nodes);
    assert_eq!(code, 1, "{st}");
    assert!(st["nodes"].as_array().unwrap().iter().all(|n| n["drift"] == "not on the published release"), "{st}");
}
