//! `fleetsync doctor` against the local world: a group ready to deploy
//! passes every check; each thing a first deploy needs, taken away in turn,
//! fails its own check with a fix, and the checks that depend on it are
//! skipped. Doctor is read-only: nothing is written to the store and no
//! node's DEST is touched.

mod common;

use std::process::Command;

use common::{build_dir, ids, publish, Bucket, Nodes};

/// `fleetsync doctor --json` for `asg`: (exit code, check name -> (verdict, detail, fix)), stderr.
fn doctor(asg: &str, extra: &[&str], env: &[(&str, &str)]) -> (i32, serde_json::Value, String) {
    let mut c = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
    c.args(["doctor", "--group", asg, "--dest", "/srv/www", "--state-dir", "/srv/state", "--json"]).args(extra).envs(env.iter().copied());
    common::run_json(&mut c)
}

/// The check named `name` in a doctor report.
fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name} in {report}"))
}

fn verdicts(report: &serde_json::Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().into(), c["verdict"].as_str().unwrap().into()))
        .collect()
}

#[tokio::test]
async fn a_group_ready_to_deploy_passes_and_each_missing_piece_fails_its_own_check_with_a_fix() {
    let b = Bucket::new("doctor").await;
    let (asg, nodes) = Nodes::group_ssm("doctor", 2, 3);
    let ids = ids(&asg);
    let source = b.url("app");

    // Nothing published, no launch hook: two failures, each with its fix;
    // the nodes answer (they hold no release yet, which is not a fault).
    let (code, report, stderr) = doctor(&asg, &["--source", &source], &[]);
    assert_eq!(code, 1, "{stderr}\n{report}");
    for name in ["credentials", "group", "ssm-document", "nodes"] {
        assert_eq!(check(&report, name)["verdict"], "ok", "{name}: {report}");
    }
    assert!(check(&report, "nodes")["detail"].as_str().unwrap().contains(fleetsync::VERSION), "{report}");
    let store = check(&report, "store");
    assert_eq!(store["verdict"], "failed", "{report}");
    assert!(store["fix"].as_str().unwrap().contains("fleetsync publish"), "{store}");
    assert_eq!(check(&report, "launch-hook")["verdict"], "failed", "{report}");
    assert!(check(&report, "launch-hook")["fix"].as_str().unwrap().contains("LaunchHook=true"), "{report}");

    // Published, hooked: every check passes (versioning may only warn).
    let build = build_dir(20, "doctor");
    let (code, _, stderr) = publish(build.path(), &source, &["--release-id", "v1"]);
    assert_eq!(code, 0, "{stderr}");
    common::fleet(&["launch-hook", &asg]);
    let (code, report, stderr) = doctor(&asg, &["--source", &source], &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert!(verdicts(&report).iter().all(|(_, v)| v == "ok" || v == "warning"), "{report}");
    assert!(check(&report, "store")["detail"].as_str().unwrap().contains("latest v1"), "{report}");
    assert!(check(&report, "node-reads-store")["detail"].as_str().unwrap().contains("dry-run"), "{report}");
    // Read-only: the dry-run pull placed nothing, and no lock was taken.
    for id in &ids {
        assert!(!nodes.dir.path().join(id).join("srv/www").exists(), "{id}'s DEST was touched");
    }
    let written = b.client.list_objects_v2().bucket(&b.name).prefix(".fleetsync/locks/").send().await.unwrap();
    assert_eq!(written.key_count(), Some(0), "doctor took no fleet lock");
    // The text form: one line per check, and the verdict at the end.
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["doctor", "--group", &asg, "--source", &source, "--dest", "/srv/www", "--state-dir", "/srv/state"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok    launch-hook") && text.trim_end().ends_with("ready to deploy"), "{text}");

    // An agent older than this fleetsync drives, on one node (the node's
    // own install, /srv/bin, comes first on its PATH): failed, naming the
    // node and the version.
    let bin = nodes.dir.path().join(&ids[0]).join("srv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let old = bin.join("fleetsync-agent");
    std::fs::write(
        &old,
        format!(
            "#!/bin/bash\nset -o pipefail\n{:?} \"$@\" | sed 's/\"agent_version\":\"[^\"]*\"/\"agent_version\":\"0.0.9 (old)\"/'\n",
            common::agent_bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, report, _) = doctor(&asg, &["--source", &source], &[]);
    assert_eq!(code, 1, "{report}");
    let nodes_check = check(&report, "nodes");
    let detail = nodes_check["detail"].as_str().unwrap();
    assert!(nodes_check["verdict"] == "failed" && detail.contains(&ids[0]) && detail.contains("agent 0.0.9 (old) is not one"), "{report}");
    assert!(!detail.contains(&ids[1]), "the other node's agent is this one's: {report}");
    assert!(nodes_check["fix"].as_str().unwrap().contains("Upgrading the agent"), "{report}");
    std::fs::remove_file(&old).unwrap();

    // A node without the agent, and one SSM no longer manages: both named.
    let node_json = nodes.dir.path().join(&ids[0]).join("node.json");
    let mut info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&node_json).unwrap()).unwrap();
    let path = info["env"]["PATH"].clone();
    info["env"]["PATH"] = "/usr/bin:/bin".into();
    std::fs::write(&node_json, info.to_string()).unwrap();
    common::fleet(&["ssm-deregister", &ids[1]]);
    let (code, report, _) = doctor(&asg, &["--source", &source], &[]);
    assert_eq!(code, 1, "{report}");
    let nodes_check = check(&report, "nodes");
    let detail = nodes_check["detail"].as_str().unwrap();
    assert!(nodes_check["verdict"] == "failed" && detail.contains(&ids[0]) && detail.contains("not installed"), "{report}");
    assert!(detail.contains(&ids[1]) && detail.contains("not managed by SSM"), "{report}");
    assert_eq!(check(&report, "node-reads-store")["verdict"], "skipped", "{report}");
    info["env"]["PATH"] = path;
    std::fs::write(&node_json, info.to_string()).unwrap();

    // The node cannot read the store (its S3 endpoint refuses): the
    // dry-run pull fails, naming the node.
    info["env"]["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9".into();
    std::fs::write(&node_json, info.to_string()).unwrap();
    let (code, report, _) = doctor(&asg, &["--source", &source], &[]);
    assert_eq!(code, 1, "{report}");
    let reads = check(&report, "node-reads-store");
    assert!(reads["verdict"] == "failed" && reads["detail"].as_str().unwrap().contains(&ids[0]), "{report}");
    assert!(reads["fix"].as_str().unwrap().contains("s3:GetObject"), "{reads}");

    // An older SSM document (no dryRun parameter): a warning naming it.
    common::fleet(&["document-update", &asg, "--drop-parameter", "dryRun"]);
    let (_, report, _) = doctor(&asg, &[], &[]);
    let doc = check(&report, "ssm-document");
    assert!(doc["verdict"] == "warning" && doc["detail"].as_str().unwrap().contains("dryRun"), "{report}");
    // No such document: failed, and the nodes are not asked.
    let (code, report, _) = doctor(&asg, &["--ssm-document", "fleetsync-agent-nope"], &[]);
    assert_eq!(code, 1);
    assert!(check(&report, "ssm-document")["fix"].as_str().unwrap().contains("fleetsync-existing-group.yaml"), "{report}");
    assert_eq!(check(&report, "nodes")["verdict"], "skipped", "{report}");
}

#[test]
fn no_group_no_credentials_and_a_bucket_that_is_not_there_each_fail_with_one_clear_line() {
    // A group that does not exist: the group check fails, naming it; the
    // checks that need it are skipped. A bucket that is not there: the
    // store check names it.
    let (code, report, stderr) = doctor("no-such-group-doctor", &["--source", "s3://doctor-no-such-bucket/app"], &[]);
    assert_eq!(code, 1, "{stderr}");
    let group = check(&report, "group");
    assert!(group["verdict"] == "failed" && group["detail"].as_str().unwrap().contains("no-such-group-doctor"), "{report}");
    assert!(group["fix"].as_str().unwrap().contains("--group"), "{report}");
    assert_eq!(check(&report, "launch-hook")["verdict"], "skipped", "{report}");
    let store = check(&report, "store");
    assert!(store["verdict"] == "failed" && store["detail"].as_str().unwrap().contains("doctor-no-such-bucket"), "{report}");

    // No credentials anywhere: one failed check, everything else skipped.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("none").display().to_string();
    let env = [
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("AWS_SHARED_CREDENTIALS_FILE", nowhere.as_str()),
        ("AWS_CONFIG_FILE", nowhere.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let (code, report, _) = doctor("web", &["--source", "s3://doctor-nobucket/app"], &env);
    assert_eq!(code, 1);
    let creds = check(&report, "credentials");
    assert!(creds["verdict"] == "failed" && creds["fix"].as_str().unwrap().contains("AWS_PROFILE"), "{report}");
    assert!(verdicts(&report).iter().filter(|(n, _)| n != "credentials").all(|(_, v)| v == "skipped"), "{report}");
}
