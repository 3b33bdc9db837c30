//! The discover step, `fleetsync list`, against moto's AutoScaling and EC2.
//! Groups are shaped with `infra/local/fleet.py`, the same tool the demo uses.

mod common;

use std::process::Command;

use common::{fleet, unique};

fn list(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync")).arg("list").args(args).output().unwrap();
    (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn list_shows_the_targets_and_why_the_others_are_skipped() {
    let asg = unique("web");
    let group = fleet(&["create", &asg, "--size", "4"]);
    let ids: Vec<String> = group["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    fleet(&["health", &ids[0], "Unhealthy"]);
    fleet(&["standby", &asg, &ids[1]]);

    let (code, out, err) = list(&["--group", &asg, "--json"]);
    assert_eq!(code, 0, "{err}");
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes.len(), 4, "{out}");
    let by_id = |id: &str| nodes.iter().find(|n| n["instance_id"] == id).unwrap().clone();
    assert!(by_id(&ids[0])["skipped"].as_str().unwrap().contains("Unhealthy"));
    assert!(by_id(&ids[1])["skipped"].as_str().unwrap().contains("Standby"));
    for id in &ids[2..] {
        let n = by_id(id);
        assert!(n["skipped"].is_null(), "{n}");
        assert_eq!(n["state"], "running");
        assert!(n["private_ip"].as_str().unwrap().starts_with("127.0.1."), "{n}");
    }
    // Targets first.
    assert!(nodes[0]["skipped"].is_null() && nodes[1]["skipped"].is_null() && !nodes[2]["skipped"].is_null());

    let (code, table, _) = list(&["--group", &asg]);
    assert_eq!(code, 0);
    assert!(table.starts_with("INSTANCE"), "{table}");
    assert!(table.contains("2 of 4 instances would be synced"), "{table}");
    assert!(table.lines().any(|l| l.contains(&ids[1]) && l.contains("skip") && l.contains("Standby")), "{table}");
}

#[test]
fn an_unknown_or_empty_group_is_a_configuration_error() {
    let (code, out, err) = list(&["--group", "no-such-group"]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("\"no-such-group\" not found") && err.contains("--region"), "{err}");

    let asg = unique("empty");
    fleet(&["create", &asg, "--size", "0"]);
    let (code, _, err) = list(&["--group", &asg]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no instances"), "{err}");
}

#[test]
fn a_large_group_is_listed_whole() {
    let asg = unique("big");
    fleet(&["create", &asg, "--size", "60"]);
    let (code, out, err) = list(&["--group", &asg, "--json"]);
    assert_eq!(code, 0, "{err}");
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes.len(), 60);
    let ips: std::collections::HashSet<_> = nodes.iter().map(|n| n["private_ip"].as_str().unwrap().to_string()).collect();
    assert_eq!(ips.len(), 60, "each instance has its own loopback address");
    assert!(nodes.iter().all(|n| n["skipped"].is_null()));
}

#[test]
fn an_unreachable_api_is_a_configuration_error() {
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["list", "--group", "web"])
        .env("AWS_ENDPOINT_URL_AUTO_SCALING", "http://127.0.0.1:1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("DescribeAutoScalingGroups") && err.contains("AWS_ENDPOINT_URL"), "{err}");
}

/// moto checks no signature; AWS refuses a request whose SigV4 signature
/// is not the one it computes. The EC2 call is made without aws-sdk-ec2
/// (bastion/src/ec2.rs), so its signing is checked here against botocore's
/// signer, the AutoScaling SDK's beside it.
#[test]
fn the_group_and_its_instances_are_described_with_requests_signed_as_aws_checks_them() {
    let asg = unique("signed");
    fleet(&["create", &asg, "--size", "3"]);
    let aws = common::FaultProxy::start(&common::moto(), &["--api", "--rate", "0", "--verify-sigv4"]);
    let out = Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .args(["list", "--group", &asg, "--json"])
        .env("AWS_ENDPOINT_URL_AUTO_SCALING", &aws.url)
        .env("AWS_ENDPOINT_URL_EC2", &aws.url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr} {}", aws.stats());
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes.iter().all(|n| n["state"] == "running" && n["private_ip"].as_str().is_some_and(|ip| ip.starts_with("127.0.1."))),
        "{nodes:?}"
    );
    let stats = aws.stats();
    assert_eq!(stats["bad-signature"], 0, "{stats}");
    assert!(stats["signed"].as_u64().unwrap() >= 2, "both APIs went through the proxy: {stats}");
}
