//! The simulated fleet's instances: one real sshd per instance at its own
//! loopback address, each with its own /srv, reached with host keys
//! verified; the agent pulls on each of them over SSH.

mod common;

use common::{assert_tree, sample_tree, Bucket, Nodes};

#[tokio::test]
async fn every_instance_has_its_own_sshd_and_root_and_the_agent_pulls_over_ssh() {
    let b = Bucket::new("nodes").await;
    let tree = sample_tree(100, 21);
    b.put_tree("app/", &tree).await;
    let (_, nodes) = Nodes::group("ssh", 3);
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
    let (_, nodes) = Nodes::group("hostkey", 1);
    let (ip, _) = &nodes.list()[0];
    assert!(nodes.ssh(ip, "true", &[]).status.success());
    let empty = nodes.dir.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let out = nodes.ssh(ip, "true", &["-o", &format!("UserKnownHostsFile={}", empty.display())]);
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"), "{}", String::from_utf8_lossy(&out.stderr));
}
