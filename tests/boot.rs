//! Boot-time convergence on the local world: an instance the Auto Scaling
//! Group launches after a publish comes up on the published release by
//! running what the systemd unit runs (`infra/systemd/fleetsync-agent.service`)
//! with its /etc/fleetsync/agent.toml.

mod common;

use std::path::Path;

use common::{fleet, ids, read_tree, Nodes};

/// The unit's ExecStart arguments (the program is found on the node's PATH:
/// the simulated node has no /usr/local/bin of its own).
fn unit_command() -> String {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/systemd/fleetsync-agent.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has an ExecStart");
    let (program, args) = exec.split_once(' ').unwrap_or((exec, ""));
    assert!(program.ends_with("/fleetsync-agent"), "{program}");
    format!("fleetsync-agent {args}")
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
