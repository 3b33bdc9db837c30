//! Fleet faults end to end: AWS APIs that throttle (retried), credentials
//! that are missing or expired and a source bucket that does not exist (one
//! clear line, exit 2, nothing touched), and a bastion SIGKILLed mid-deploy
//! (its lease runs out, the next deploy takes over, the nodes converge).
//!
//! Throttling and expired credentials come from infra/local/faultproxy.py
//! `--api` in front of moto and the SSM emulator: the errors are the APIs'
//! own, in their own protocols, parsed by the unmodified SDK clients.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{assert_tree, deploy_command, ids, moto, run_report, sample_tree, ssm, Bucket, FaultProxy, Nodes};

#[tokio::test]
async fn throttled_api_calls_are_retried_and_the_deploy_converges() {
    let b = Bucket::new("throttle").await;
    let tree = sample_tree(40, 61);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group("throttle", 3);
    // 30% of calls throttled: AutoScaling `Throttling`, EC2
    // `RequestLimitExceeded` (both from moto's side), SSM
    // `ThrottlingException`. The seeds give at most 4 throttles in a row in
    // their first 400 draws, fewer than the SDK's 6 attempts: a call that
    // failed here would be a retry bug, not bad luck.
    let aws = FaultProxy::start(&moto(), &["--api", "--rate", "0.3", "--seed", "8"]);
    let run_command = FaultProxy::start(&ssm(), &["--api", "--rate", "0.3", "--seed", "13"]);
    let deploy = || {
        run_report(
            deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
                .env("AWS_ENDPOINT_URL_AUTO_SCALING", &aws.url)
                .env("AWS_ENDPOINT_URL_EC2", &aws.url)
                .env("AWS_ENDPOINT_URL_SSM", &run_command.url),
        )
    };

    // A cold deploy, then an update.
    let mut tree = tree;
    for round in 0..2 {
        if round == 1 {
            let k = tree.keys().next().unwrap().clone();
            tree.insert(k.clone(), b"updated".to_vec());
            b.put(&format!("app/{k}"), b"updated").await;
        }
        let (code, report, stderr) = deploy();
        assert_eq!(code, 0, "round {round}: {stderr}\n{report}");
        assert_eq!(report["totals"]["ok"], 3, "{report}");
        for (_, root) in nodes.list() {
            assert_tree(&root.join("www"), &tree);
        }
    }
    let (a, s) = (aws.stats(), run_command.stats());
    println!(
        "api throttles injected: AutoScaling/EC2 {} of {} requests, SSM {} of {}; both deploys exit 0",
        a["throttle"], a["requests"], s["throttle"], s["requests"]
    );
    assert!(a["throttle"].as_u64().unwrap() >= 2 && s["throttle"].as_u64().unwrap() >= 2, "both proxies throttled: {a} {s}");
}

#[tokio::test]
async fn missing_or_expired_credentials_and_a_missing_bucket_are_one_clear_line_and_touch_nothing() {
    let b = Bucket::new("creds").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("creds", 2);
    let untouched = || nodes.list().iter().all(|(_, root)| !root.join("www").exists());
    let one_line = |code: i32, stderr: &str, wanted: &[&str]| {
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        for w in wanted {
            assert!(stderr.contains(w), "{w:?} in {stderr}");
        }
    };

    // No credentials anywhere in the chain.
    let (code, _, stderr) = run_report(
        deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    one_line(code, &stderr, &["no AWS credentials found", "AWS_PROFILE"]);

    // Credentials that expired: the AutoScaling API refuses them.
    let expired = FaultProxy::start(&moto(), &["--api", "--always", "ExpiredToken"]);
    let (code, _, stderr) = run_report(
        deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
            .env("AWS_ENDPOINT_URL_AUTO_SCALING", &expired.url)
            .env("AWS_ENDPOINT_URL_EC2", &expired.url),
    );
    one_line(code, &stderr, &["DescribeAutoScalingGroups", "ExpiredToken", "have expired: refresh them"]);

    // Expired for SSM alone, so only after the fleet lock was taken: every
    // node fails with the reason (exit 1) and the lock is released, not
    // left to block the next deploy for a lease.
    let expired_ssm = FaultProxy::start(&ssm(), &["--api", "--always", "ExpiredTokenException"]);
    let (code, report, stderr) =
        run_report(deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm").env("AWS_ENDPOINT_URL_SSM", &expired_ssm.url));
    assert_eq!(code, 1, "{stderr}");
    for n in report["nodes"].as_array().unwrap() {
        assert_eq!(n["status"], "failed", "{n}");
        assert!(
            n["error"].as_str().unwrap().contains("ExpiredTokenException")
                && n["error"].as_str().unwrap().contains("have expired: refresh them"),
            "{n}"
        );
    }
    assert!(fleetsync::fleet_lock::read(&b.client, &b.fleet_lock("app", &asg)).await.unwrap().is_none(), "the lock was released");

    // The agent's side: S3 refusing expired credentials.
    let expired_s3 = FaultProxy::start(&common::endpoint(), &["--api", "--always", "ExpiredToken"]);
    let node = common::Node::new();
    let (code, _, stderr) = run_report(node.agent(&b.url("app")).env("AWS_ENDPOINT_URL_S3", &expired_s3.url));
    one_line(code, &stderr, &["ExpiredToken", "have expired: refresh them"]);

    // A source bucket that does not exist: refused before the lock is
    // written (SeaweedFS, unlike S3, would create the bucket to hold it).
    let missing = format!("s3://{}/app", common::unique("no-such-bucket"));
    let (code, _, stderr) = run_report(&mut deploy_command(&asg, &missing, "/srv/www", &nodes, "ssm"));
    one_line(code, &stderr, &["NoSuchBucket", "check the bucket name"]);
    let buckets = b.client.list_buckets().send().await.unwrap();
    assert!(!buckets.buckets().iter().any(|x| missing.contains(x.name().unwrap())), "no bucket was created for the lock");
    assert!(untouched(), "no node was touched");
}

#[tokio::test]
async fn credentials_that_expire_once_the_commands_are_sent_fail_the_nodes_at_once() {
    let b = Bucket::new("credsmid").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("credsmid", 2);
    // Expired once the commands were sent: polling is refused. The nodes
    // fail at once with the reason, not after the commands' timeouts
    // (here 30 s to deliver + 60 s to run + a minute).
    let expiring = FaultProxy::start(
        &ssm(),
        &["--api", "--rate", "0", "--fail-op", "ListCommandInvocations", "--fail-count", "1000", "--fail-code", "ExpiredTokenException"],
    );
    let started = std::time::Instant::now();
    let (code, report, stderr) = run_report(
        deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
            .args(["--timeout", "60", "--ssm-delivery-timeout", "30"])
            .env("AWS_ENDPOINT_URL_SSM", &expiring.url),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "failed at once, not after the timeouts: {:?}", started.elapsed());
    for n in report["nodes"].as_array().unwrap() {
        let e = n["error"].as_str().unwrap_or_default();
        assert!(e.contains("ListCommandInvocations") && e.contains("have expired: refresh them"), "{n}");
    }
    assert!(fleetsync::fleet_lock::read(&b.client, &b.fleet_lock("app", &asg)).await.unwrap().is_none(), "the lock was released");
}

#[tokio::test]
async fn a_bastion_killed_mid_deploy_is_taken_over_when_its_lease_runs_out_and_the_nodes_converge() {
    let b = Bucket::new("killed").await;
    let v1 = sample_tree(30, 71);
    b.put_tree("app/", &v1).await;
    let (asg, nodes) = Nodes::group("killed", 2);
    let lock = b.fleet_lock("app", &asg);
    // The first node's pull waits on this, so the deploy is mid-flight.
    let node_lock = Nodes::hold_agent_lock(&nodes.dir.path().join(&ids(&asg)[0]).join("srv"));

    let mut first = deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
        .args(["--lock-lease", "3s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await; // the command was sent
    first.kill().unwrap(); // SIGKILL: no cleanup, the lock stays behind
    first.wait().unwrap();
    assert!(fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_some(), "a killed bastion leaves its lock");

    // Within the lease, the next deploy is refused.
    let (code, _, stderr) = run_report(deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm").args(["--lock-wait", "0"]));
    assert_eq!(code, 3, "{stderr}");

    // The source moves on; a deploy that waits takes the lock over once the
    // lease has run out, and every node ends on the new tree.
    let mut v2 = v1.clone();
    let changed = v1.keys().next().unwrap().clone();
    v2.insert(changed.clone(), b"v2".to_vec());
    b.put(&format!("app/{changed}"), b"v2").await;
    let second = deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
        .args(["--lock-wait", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(node_lock); // the killed deploy's agent and then ours run on node 1
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("took over an expired fleet lock"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["totals"]["ok"], 2, "{report}");
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &v2);
    }
    assert!(fleetsync::fleet_lock::read(&b.client, &lock).await.unwrap().is_none(), "the new holder released the lock");
}

#[tokio::test]
async fn instances_ec2_does_not_show_yet_are_asked_for_again_and_the_deploy_converges() {
    let b = Bucket::new("notfound").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("notfound", 3);
    // EC2 is eventually consistent: an instance the group just launched can
    // be unknown to DescribeInstances, which then fails as a whole, naming
    // it. The first three calls that name instances are answered so.
    let ec2 = FaultProxy::start(&moto(), &["--api", "--rate", "0", "--not-found", "3"]);
    let (code, report, stderr) =
        run_report(deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm").env("AWS_ENDPOINT_URL_EC2", &ec2.url));
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 3, "{report}");
    assert_eq!(ec2.stats()["not-found"], 3, "{}", ec2.stats());
    for (_, root) in nodes.list() {
        assert_eq!(std::fs::read(root.join("www/index.php")).unwrap(), b"<?php");
    }
}

#[tokio::test]
async fn a_failed_relisting_at_the_end_is_exit_1_with_the_reason_not_a_configuration_error() {
    let b = Bucket::new("relistfail").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("relistfail", 2);
    // The first listing of the group works; every later one finds the
    // credentials expired (a long deploy outlived its session).
    let autoscaling = FaultProxy::start(
        &moto(),
        &[
            "--api",
            "--rate",
            "0",
            "--fail-op",
            "DescribeAutoScalingGroups",
            "--fail-skip",
            "1",
            "--fail-count",
            "1000",
            "--fail-code",
            "ExpiredToken",
        ],
    );
    let (code, report, stderr) =
        run_report(deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssh").env("AWS_ENDPOINT_URL_AUTO_SCALING", &autoscaling.url));
    assert_eq!(code, 1, "every node changed: not exit 2, which promises nothing changed: {stderr}");
    assert_eq!(report["totals"]["ok"], 2, "{report}");
    let why = report["rejoin_error"].as_str().unwrap();
    assert!(why.contains("listing the group again") && why.contains("ExpiredToken"), "{why}");
    assert!(stderr.contains("ExpiredToken"), "{stderr}");
}
