//! Boot-time convergence on the local world: an instance the Auto Scaling
//! Group launches after a publish comes up on the published release by
//! running what the systemd unit runs (`infra/systemd/fleetsync-agent.service`)
//! with its /etc/fleetsync/agent.toml; and the user-data's install step,
//! which puts the agent on the instance in the first place.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fleet, ids, read_tree, Nodes};

/// The unit's ExecStart, run as systemd runs it: `env` finds the agent on
/// the PATH (the node's, here).
fn unit_command() -> String {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/systemd/fleetsync-agent.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has an ExecStart");
    assert!(exec.starts_with("/usr/bin/env fleetsync-agent "), "{exec}");
    exec.to_string()
}

#[tokio::test]
async fn an_instance_launched_after_a_publish_boots_onto_the_published_release() {
    let b = common::Bucket::new("boot").await;
    let build = common::build_dir(12, "boot");
    let (code, _, stderr) = common::publish(build.path(), &b.url("app"), &["--release-id", "boot-1"]);
    assert_eq!(code, 0, "{stderr}");

    let (asg, nodes) = Nodes::group("boot", 1);
    let before = ids(&asg);
    fleet(&["scale", &asg, "2"]);
    let new = ids(&asg).into_iter().find(|i| !before.contains(i)).expect("the group launched an instance");
    Nodes::up_in(&asg, &nodes);
    let root = nodes.dir.path().join(&new).join("srv");
    std::fs::write(
        root.join("etc/fleetsync/agent.toml"),
        format!("source = \"{}\"\ndest = \"/srv/www\"\nmode = \"releases\"\n", b.url("app")),
    )
    .unwrap();

    let ip = common::fleet(&["describe", &asg])["instances"].as_array().unwrap().iter().find(|i| i["id"] == new.as_str()).unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let out = nodes.ssh(&ip, &unit_command(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["release"]["id"], "boot-1", "{report}");
    assert_eq!(std::fs::read_link(root.join("www/current")).unwrap(), Path::new("releases/boot-1"));
    assert_eq!(read_tree(&root.join("www/current")), read_tree(build.path()));
}

/// `fleetsync agent-dist upload`, then the user-data's install step as an
/// instance runs it (`infra/aws/user-data.sh` with FLEETSYNC_STEP=install:
/// curl --aws-sigv4 against the local S3 server, through the fault proxy,
/// which refuses a request without the payload hash header as S3 does;
/// files under a scratch root): the agent it installs is the one uploaded,
/// byte for byte. A
/// binary that does not match SHA256SUMS is never installed and the launch
/// is abandoned; so is an instance whose architecture has no binary.
#[tokio::test]
async fn the_user_data_installs_the_uploaded_agent_and_refuses_a_corrupted_one() {
    let b = common::Bucket::new("dist").await;
    let arch = std::env::consts::ARCH;
    let dist = tempfile::tempdir().unwrap();
    let agent = std::fs::read(common::agent_bin()).unwrap();
    std::fs::write(dist.path().join(format!("fleetsync-agent-{arch}")), &agent).unwrap();
    for unit in ["fleetsync-agent.service", "fleetsync-agent.timer"] {
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/systemd").join(unit), dist.path().join(unit)).unwrap();
    }
    let sums = Command::new("sh")
        .arg("-c")
        .arg(format!("sha256sum fleetsync-agent-{arch} fleetsync-agent.service fleetsync-agent.timer > SHA256SUMS"))
        .current_dir(dist.path())
        .status()
        .unwrap();
    assert!(sums.success());
    let fleetsync = common::bin("fleetsync-bastion", "fleetsync");
    let upload = |dir: &Path| Command::new(&fleetsync).arg("agent-dist").arg("upload").arg(dir).arg(b.url("dist")).output().unwrap();

    // A damaged local copy never leaves the bastion.
    let damaged = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dist.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), damaged.path().join(e.file_name())).unwrap();
    }
    std::fs::write(damaged.path().join(format!("fleetsync-agent-{arch}")), &agent[..agent.len() - 1]).unwrap();
    let out = upload(damaged.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is damaged") && stderr.lines().count() == 1, "{stderr}");

    let out = upload(dist.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let proxy = common::FaultProxy::start(&common::endpoint(), &["--rate", "0"]);
    let install = |root: &Path, extra: &[(&str, &str)]| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/aws/user-data.sh"))
            .env("FLEETSYNC_STEP", "install")
            .env("FLEETSYNC_BUCKET", &b.name)
            .env("FLEETSYNC_PREFIX", "app")
            .env("FLEETSYNC_DEST", "/var/www/app")
            .env("FLEETSYNC_GROUP", "web")
            .env("FLEETSYNC_HOOK", "fleetsync-first-pull")
            .env("FLEETSYNC_INSTANCE_ID", "i-0123456789abcdef0")
            .env("FLEETSYNC_S3_URL", format!("{}/{}", proxy.url, b.name))
            .env("FLEETSYNC_AUTOSCALING_URL", std::env::var("AWS_ENDPOINT_URL_AUTO_SCALING").unwrap())
            .env("FLEETSYNC_INSTALL_ROOT", root)
            .env("FLEETSYNC_RETRY_PAUSE", "0")
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(proxy.stats()["no-content-sha256"].as_u64().unwrap_or(0), 0, "a request S3 would refuse");
    assert_eq!(std::fs::read(root.path().join("usr/local/bin/fleetsync-agent")).unwrap(), agent);
    assert!(root.path().join("etc/systemd/system/fleetsync-agent.timer").is_file());
    assert!(stderr.contains(&format!("installed fleetsync-agent {}", fleetsync::VERSION)), "{stderr}");
    // The same with the AWS CLI, which the user-data uses where curl is too
    // old to sign S3 requests.
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[("FLEETSYNC_CLIENT", "aws")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read(root.path().join("usr/local/bin/fleetsync-agent")).unwrap(), agent);

    // Sums that name the binary but not the units: nothing is installed
    // unchecked. A new upload merges the units back in.
    let sums = std::fs::read_to_string(dist.path().join("SHA256SUMS")).unwrap();
    let binary_only: String = sums.lines().filter(|l| l.ends_with(&format!("fleetsync-agent-{arch}"))).map(|l| format!("{l}\n")).collect();
    b.put("dist/SHA256SUMS", binary_only.as_bytes()).await;
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!root.path().join("usr/local/bin/fleetsync-agent").exists(), "installed with unchecked units");
    assert!(upload(dist.path()).status.success());

    // The binary in the bucket replaced behind the sums' back.
    b.put(&format!("dist/fleetsync-agent-{arch}"), b"#!/bin/sh\necho pwned\n").await;
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not match") && stderr.contains("abandoning the launch"), "{stderr}");
    assert!(!root.path().join("usr/local/bin/fleetsync-agent").exists(), "a corrupted agent was installed");

    // An architecture with no binary uploaded.
    let other = if arch == "x86_64" { "aarch64" } else { "x86_64" };
    let (code, stderr) = install(root.path(), &[("FLEETSYNC_ARCH", other)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("has no fleetsync-agent-{other}")), "{stderr}");
}
