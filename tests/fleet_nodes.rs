//! The simulated fleet's instances: one real sshd per instance at its own
//! loopback address, each with its own /srv, reached with host keys
//! verified; the agent pulls on each of them over SSH.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{assert_tree, fleet, fleet_with_env, sample_tree, unique, Bucket};

/// The sshd of one group's instances, stopped when dropped.
struct Nodes {
    dir: tempfile::TempDir,
    info: serde_json::Value,
}

impl Nodes {
    fn up(asg: &str) -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        let agent_dir = common::agent_bin().parent().unwrap().display().to_string();
        let info = fleet_with_env(&["nodes-up", asg, "--dir", &dir.path().display().to_string()], &[("FLEETSYNC_AGENT_DIR", &agent_dir)]);
        Nodes { dir, info }
    }

    fn ssh(&self, ip: &str, command: &str, extra: &[&str]) -> std::process::Output {
        Command::new("ssh").arg("-F").arg(self.info["ssh_config"].as_str().unwrap()).args(extra).arg(ip).arg(command).output().unwrap()
    }

    fn list(&self) -> Vec<(String, PathBuf)> {
        self.info["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["ip"].as_str().unwrap().to_string(), PathBuf::from(n["root"].as_str().unwrap())))
            .collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        fleet(&["nodes-down", "--dir", &self.dir.path().display().to_string()]);
    }
}

#[tokio::test]
async fn every_instance_has_its_own_sshd_and_root_and_the_agent_pulls_over_ssh() {
    let b = Bucket::new("nodes").await;
    let tree = sample_tree(100, 21);
    b.put_tree("app/", &tree).await;
    let asg = unique("ssh");
    fleet(&["create", &asg, "--size", "3"]);
    let nodes = Nodes::up(&asg);
    assert_eq!(nodes.list().len(), 3);

    let pull = format!("fleetsync-agent pull {} --dest /srv/www --state-dir /srv/state --json", b.url("app"));
    for (ip, root) in nodes.list() {
        let out = nodes.ssh(&ip, &pull, &[]);
        assert!(out.status.success(), "{ip}: {}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["counts"]["downloaded"], tree.len() as u64, "{ip}: {report}");
        // The node wrote into its own /srv, nowhere else.
        assert_tree(&root.join("www"), &tree);
    }
    assert!(!std::path::Path::new("/srv/www").exists(), "the host's /srv is untouched");
    // Each node keeps its own state: a second pull downloads nothing.
    let (ip, _) = &nodes.list()[0];
    let report: serde_json::Value = serde_json::from_slice(&nodes.ssh(ip, &pull, &[]).stdout).unwrap();
    assert_eq!(report["counts"]["downloaded"], 0, "{report}");
}

#[tokio::test]
async fn an_unknown_host_key_is_refused() {
    let asg = unique("hostkey");
    fleet(&["create", &asg, "--size", "1"]);
    let nodes = Nodes::up(&asg);
    let (ip, _) = &nodes.list()[0];
    assert!(nodes.ssh(ip, "true", &[]).status.success());
    let empty = nodes.dir.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let out = nodes.ssh(ip, "true", &["-o", &format!("UserKnownHostsFile={}", empty.display())]);
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"), "{}", String::from_utf8_lossy(&out.stderr));
}
