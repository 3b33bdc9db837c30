//! `fleetsync sync --via ssm` end to end: moto's group, the repository's
//! executing SSM emulator (infra/local/ssm_emulator.py) running the agent in
//! each instance's own root, SeaweedFS as the source. The emulator logs
//! every SendCommand and every invocation's start and end, which is how
//! batching and concurrency are checked.

mod common;

use std::collections::HashSet;

use common::{assert_tree, deploy, ids, node_in, sample_tree, Bucket, Nodes};

/// `fleetsync sync --via ssm` for `asg`: (exit code, JSON report or Null, stderr).
fn sync(asg: &str, source: &str, nodes: &Nodes, extra: &[&str]) -> (i32, serde_json::Value, String) {
    deploy(asg, source, "/srv/www", nodes, "ssm", extra)
}

/// Everything the emulator recorded (infra/local/ssm_emulator.py's calls.jsonl).
fn all_ssm_calls() -> Vec<serde_json::Value> {
    let path = std::path::Path::new(&std::env::var("FLEETSYNC_SSM_DIR").expect("run the tests with infra/local/test")).join("calls.jsonl");
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect()
}

/// What the emulator recorded about the instances in `ids`.
fn ssm_calls(ids: &[String]) -> Vec<serde_json::Value> {
    let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
    all_ssm_calls()
        .into_iter()
        .filter(|c| match c["op"].as_str() {
            Some("SendCommand") => c["instance_ids"].as_array().unwrap().iter().any(|i| ids.contains(i.as_str().unwrap())),
            Some("invocation") => ids.contains(c["instance_id"].as_str().unwrap()),
            _ => false,
        })
        .collect()
}

/// The most invocations that ran at the same moment.
fn peak_overlap(invocations: &[&serde_json::Value]) -> usize {
    let mut edges: Vec<(f64, i32)> =
        invocations.iter().flat_map(|i| [(i["start"].as_f64().unwrap(), 1), (i["end"].as_f64().unwrap(), -1)]).collect();
    // At equal times an end comes before a start: touching is not overlapping.
    edges.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut now, mut peak) = (0, 0);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

#[tokio::test]
async fn every_node_converges_over_ssm_and_a_second_sync_downloads_nothing() {
    let b = Bucket::new("ssmsync").await;
    let tree = sample_tree(60, 51);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group("ssm", 3);

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 3, "{report}");
    assert_eq!(report["totals"]["downloaded"], 3 * tree.len() as u64);
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &tree);
    }
    let (code, report, _) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!(code, 0);
    assert_eq!(report["totals"]["downloaded"], 0, "{report}");
    // The same nodes over SSH agree: nothing to do either.
    let (code, report, _) = deploy(&asg, &b.url("app"), "/srv/www", &nodes, "ssh", &[]);
    assert_eq!((code, report["totals"]["downloaded"].as_u64()), (0, Some(0)), "{report}");
}

/// The SendCommands the emulator saw for `ids` (skipping the first `skip`).
fn sends(ids: &[String], skip: usize) -> Vec<serde_json::Value> {
    ssm_calls(ids).into_iter().filter(|c| c["op"] == "SendCommand").skip(skip).collect()
}

#[tokio::test]
async fn sixty_instances_go_out_in_commands_of_at_most_fifty_never_queued_inside_ssm() {
    let b = Bucket::new("ssmsixty").await;
    let tree = sample_tree(20, 52);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group_ssm("ssm60", 60, 2);
    let ids = ids(&asg);
    assert_eq!(ids.len(), 60);

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--batch", "20"]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(report["totals"]["ok"], 60, "{report}");
    for (_, root) in nodes.list() {
        assert_tree(&root.join("www"), &tree);
    }
    // SSM expires a command TimeoutSeconds + executionTimeout after it was
    // sent, so nodes queued behind a smaller MaxConcurrency could expire
    // unrun: every command runs all its nodes at once, within the batch,
    // and the next one goes as places free up.
    let first = sends(&ids, 0);
    let sizes: Vec<usize> = first.iter().map(|c| c["instance_ids"].as_array().unwrap().len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 60, "{first:?}");
    for c in &first {
        let size = c["instance_ids"].as_array().unwrap().len();
        assert!(size <= 20, "no command is larger than --batch: {c}");
        assert_eq!(c["max_concurrency"], size.to_string(), "a command's nodes all run at once: {c}");
    }
    let runs: Vec<serde_json::Value> = ssm_calls(&ids).into_iter().filter(|c| c["op"] == "invocation").collect();
    assert_eq!(runs.len(), 60);
    let peak = peak_overlap(&runs.iter().collect::<Vec<_>>());
    assert!(peak <= 20 && peak > 1, "at most --batch nodes ran at once, and more than one: {peak}");

    // A batch covering the fleet sends both commands at once.
    let (code, report, _) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!((code, report["totals"]["downloaded"].as_u64()), (0, Some(0)), "{report}");
    let second = sends(&ids, first.len());
    let mut concurrency: Vec<&str> = second.iter().map(|c| c["max_concurrency"].as_str().unwrap()).collect();
    concurrency.sort();
    assert_eq!(concurrency, ["10", "50"]);

    // One DescribeInstanceInformation call refused (the checks run at once,
    // so whichever reaches SSM first: the 50 IDs or the 10): its nodes fail
    // with the reason; the others are checked and synced.
    let refusing = common::FaultProxy::start(
        &std::env::var("AWS_ENDPOINT_URL_SSM").unwrap(),
        &["--api", "--rate", "0", "--fail-op", "DescribeInstanceInformation", "--fail-code", "AccessDeniedException"],
    );
    let (code, report, stderr) = common::run_report(
        common::deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm").env("AWS_ENDPOINT_URL_SSM", &refusing.url),
    );
    assert_eq!(code, 1, "{stderr}");
    let (failed, ok) = (report["totals"]["failed"].as_u64().unwrap(), report["totals"]["ok"].as_u64().unwrap());
    assert!(matches!((failed, ok), (50, 10) | (10, 50)), "one call's nodes failed, the others synced: {report}");
    let failed = report["nodes"].as_array().unwrap().iter().find(|n| n["status"] == "failed").unwrap();
    let e = failed["error"].as_str().unwrap();
    assert!(e.contains("could not check that the SSM agent is online") && e.contains("AccessDeniedException"), "{e}");
}

#[tokio::test]
async fn failed_timed_out_and_unmanaged_nodes_are_reported_with_the_reason() {
    let b = Bucket::new("ssmfail").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("ssmfail", 4);
    let ids = ids(&asg);
    let root = |id: &str| nodes.dir.path().join(id).join("srv");

    // ids[0]: the agent is not installed (not on the PATH SSM runs with).
    let node_json = nodes.dir.path().join(&ids[0]).join("node.json");
    let mut info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&node_json).unwrap()).unwrap();
    info["env"]["PATH"] = "/usr/bin:/bin".into();
    std::fs::write(&node_json, info.to_string()).unwrap();
    // ids[1]: hangs (another pull holds its node lock) past --timeout.
    let _held = Nodes::hold_agent_lock(&root(&ids[1]));
    // ids[2]: its SSM agent is gone.
    common::fleet(&["ssm-deregister", &ids[2]]);

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--timeout", "3"]);
    assert_eq!(code, 1, "{stderr}\n{report}");
    let missing = node_in(&report, &ids[0]);
    assert_eq!(missing["status"], "failed");
    let e = missing["error"].as_str().unwrap();
    assert!(e.contains("not installed") && e.contains("fleetsync-agent: not found"), "the node's stderr is in the report: {e}");
    let hung = node_in(&report, &ids[1]);
    let e = hung["error"].as_str().unwrap();
    assert!(e.contains("did not finish within 3 s") && e.contains("waiting"), "the agent's last stderr line is in the report: {e}");
    let unmanaged = node_in(&report, &ids[2]);
    assert!(unmanaged["error"].as_str().unwrap().contains("not managed by SSM"), "{unmanaged}");
    assert_eq!(node_in(&report, &ids[3])["status"], "ok");
    assert_eq!(std::fs::read(root(&ids[3]).join("www/index.php")).unwrap(), b"<?php");
}

#[tokio::test]
async fn max_errors_zero_stops_ssm_starting_nodes_after_the_first_failure() {
    let b = Bucket::new("ssmmaxerr").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmmaxerr", 4, 3);
    let ids = ids(&asg);
    // The first node SSM starts (instance-id order) fails: its DEST is a file.
    std::fs::write(nodes.dir.path().join(&ids[0]).join("srv/www"), b"not a directory").unwrap();

    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--batch", "1", "--max-errors", "0"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(node_in(&report, &ids[0])["status"], "failed", "{report}");
    for id in &ids[1..] {
        assert_eq!(node_in(&report, id)["status"], "not-attempted", "{report}");
        assert!(!nodes.dir.path().join(id).join("srv/www").exists(), "{id} was not touched");
    }
    let sends: Vec<_> = ssm_calls(&ids).into_iter().filter(|c| c["op"] == "SendCommand").collect();
    assert_eq!((sends[0]["max_concurrency"].as_str(), sends[0]["max_errors"].as_str()), (Some("1"), Some("0")));
}

#[tokio::test]
async fn hostile_arguments_reach_the_agent_verbatim_over_ssm() {
    let b = Bucket::new("ssmquote").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmquote", 1, 3);
    let dest = "/srv/we ird; touch /srv/pwned1 $(touch /srv/pwned2) `touch /srv/pwned3` 'q\" x\nnext";
    // The group's fleetsync document takes no such value: refused before
    // anything is sent, naming it.
    let (code, _, stderr) = deploy(&asg, &b.url("app"), dest, &nodes, "ssm", &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--dest") && stderr.contains("is not sent through the SSM document"), "{stderr}");
    assert!(sends(&ids(&asg), 0).is_empty(), "nothing was sent");
    // AWS-RunShellScript takes a command line, every argument quoted.
    let (code, report, stderr) = deploy(&asg, &b.url("app"), dest, &nodes, "ssm", &["--ssm-document", "AWS-RunShellScript"]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    let (_, root) = &nodes.list()[0];
    assert_eq!(std::fs::read(root.join(dest.trim_start_matches("/srv/")).join("index.php")).unwrap(), b"<?php");
    for p in ["pwned1", "pwned2", "pwned3"] {
        assert!(!root.join(p).exists(), "{p} was created: the argument was run as a command");
    }
}

#[tokio::test]
async fn an_interrupted_deploy_cancels_every_command_it_sent_and_no_agent_of_it_runs_on() {
    let b = Bucket::new("ssmcancel").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmcancel", 3, 4);
    let ids = ids(&asg);
    // Every node's pull waits on its node lock, so the deploy is mid-flight.
    let held: Vec<_> = ids.iter().map(|id| Nodes::hold_agent_lock(&nodes.dir.path().join(id).join("srv"))).collect();
    let child = common::deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
        .args(["--batch", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while sends(&ids, 0).is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await; // the agent is running
    interrupt_and_check_nothing_runs(child, &ids, &nodes, held).await;
}

#[tokio::test]
async fn an_interrupt_while_ssm_has_not_yet_answered_a_send_command_cancels_that_command_too() {
    let b = Bucket::new("ssmsendcancel").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmsendcancel", 2, 4);
    let ids = ids(&asg);
    let held: Vec<_> = ids.iter().map(|id| Nodes::hold_agent_lock(&nodes.dir.path().join(id).join("srv"))).collect();
    // SSM accepts the command at once but its answer (the command ID) takes
    // 0.3 s to reach the bastion: the interrupt comes in between, and the
    // cancel then finds the command not listed yet (SSM lists invocations
    // only after a moment), which is not the same as ended.
    let slow = common::FaultProxy::start(
        &std::env::var("AWS_ENDPOINT_URL_SSM").unwrap(),
        &["--api", "--rate", "0", "--slow-op", "SendCommand", "--slow", "0.3"],
    );
    let child = common::deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
        .env("AWS_ENDPOINT_URL_SSM", &slow.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The proxy counts the call once SSM has answered it (the emulator
    // logs the SendCommand before that), while it holds the answer back.
    while slow.stats()["slow"] != 1 || sends(&ids, 0).is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    interrupt_and_check_nothing_runs(child, &ids, &nodes, held).await;
}

#[tokio::test]
async fn a_command_ssm_refuses_for_an_instance_it_no_longer_manages_is_sent_again_to_the_others() {
    let b = Bucket::new("ssmleft").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmleft", 3, 7);
    let ids = ids(&asg);
    // Between the bastion's ping check and its send, an instance left SSM
    // (a scale-in): SSM refuses the whole command, InvalidInstanceId. Here
    // the refusal is injected once and every instance is still online, so
    // every node is sent again and syncs.
    let refusing = common::FaultProxy::start(
        &std::env::var("AWS_ENDPOINT_URL_SSM").unwrap(),
        &["--api", "--rate", "0", "--fail-op", "SendCommand", "--fail-count", "1", "--fail-code", "InvalidInstanceId"],
    );
    let (code, report, stderr) = common::run_report(
        common::deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm").env("AWS_ENDPOINT_URL_SSM", &refusing.url),
    );
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert_eq!(refusing.stats()["fail-op"], 1);
    assert!(stderr.contains("sending again to the 3 of 3 nodes still online"), "{stderr}");
    for id in &ids {
        assert_eq!(node_in(&report, id)["status"], "ok", "{report}");
        assert!(nodes.dir.path().join(id).join("srv/www/index.php").exists());
    }
}

#[tokio::test]
async fn offline_and_dead_ssm_agents_are_named_and_do_not_hold_back_the_other_nodes() {
    let b = Bucket::new("ssmdead").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group_ssm("ssmdead", 5, 5);
    let ids = ids(&asg);
    // ids[0]: its SSM agent lost its connection (SSM says so: ConnectionLost).
    common::fleet(&["ssm-agent", &ids[0], "connection-lost"]);
    // ids[1]: its SSM agent died but the instance still shows Online: its
    // command is never run, and SSM expires it.
    common::fleet(&["ssm-agent", &ids[1], "dead"]);

    let started = std::time::Instant::now();
    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--batch", "2", "--timeout", "5", "--ssm-delivery-timeout", "30"]);
    assert_eq!(code, 1, "{stderr}\n{report}");
    let offline = node_in(&report, &ids[0]);
    assert!(offline["error"].as_str().unwrap().contains("ping status ConnectionLost"), "{offline}");
    assert_eq!(offline["duration_ms"], 0, "reported at once, never sent");
    let dead = node_in(&report, &ids[1]);
    let e = dead["error"].as_str().unwrap();
    assert!(e.contains("SSM never ran the command") && e.contains("30 s to deliver + 5 s to run"), "{e}");
    // The other three ran through the other place of the batch meanwhile.
    for id in &ids[2..] {
        assert_eq!(node_in(&report, id)["status"], "ok", "{report}");
        assert_eq!(std::fs::read(nodes.dir.path().join(id).join("srv/www/index.php")).unwrap(), b"<?php");
    }
    let runs: Vec<serde_json::Value> = ssm_calls(&ids).into_iter().filter(|c| c["op"] == "invocation").collect();
    let end = |id: &str| runs.iter().find(|r| r["instance_id"] == id).map(|r| r["end"].as_f64().unwrap()).unwrap();
    let dead_end = end(&ids[1]);
    for id in &ids[2..] {
        assert!(end(id) < dead_end - 20.0, "{id} did not wait for the dead node");
    }
    assert!(started.elapsed().as_secs() >= 35, "the dead node's command expired after 30 + 5 s");
    assert!(runs.iter().any(|r| r["instance_id"] == ids[1].as_str() && r["details"] == "DeliveryTimedOut"), "{runs:?}");
}

#[tokio::test]
async fn a_report_with_long_failures_reaches_the_bastion_whole_over_ssm() {
    let b = Bucket::new("ssmlong").await;
    let (asg, nodes) = Nodes::group_ssm("ssmlong", 1, 6);
    let root = nodes.list()[0].1.clone();
    // 25 files with keys near S3's limit of 1,024 bytes, each of which fails
    // to be placed: a directory stands where each must go.
    let deep = ["d".repeat(200), "e".repeat(200), "f".repeat(200), "g".repeat(200)].join("/");
    for i in 0..25 {
        let rel = format!("{deep}/{i:02}-{}", "h".repeat(150));
        b.put(&format!("app/{rel}"), b"x").await;
        std::fs::create_dir_all(root.join("www").join(&rel).join("in-the-way")).unwrap();
    }
    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!(code, 1, "{stderr}");
    let node = &report["nodes"][0];
    let agent = &node["agent"];
    assert_eq!(agent["counts"]["failed"], 25, "the agent's own report arrived: {node}");
    assert!(agent["errors_omitted"].as_u64().unwrap() > 0, "{node}");
    let e = node["error"].as_str().unwrap();
    assert!(e.starts_with("25 files failed, first app/") && e.contains(": placing "), "{e}");
}

/// Interrupts a deploy whose nodes' agents wait on their node locks
/// (`held`), then checks that every command it sent was cancelled and
/// that, with the locks free again, no agent of it pulls.
async fn interrupt_and_check_nothing_runs(child: std::process::Child, ids: &[String], nodes: &Nodes, held: Vec<std::fs::File>) {
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let sent: Vec<String> = sends(ids, 0).iter().map(|c| c["command_id"].as_str().unwrap().to_string()).collect();
    let cancelled: HashSet<String> =
        all_ssm_calls().into_iter().filter(|c| c["op"] == "CancelCommand").map(|c| c["command_id"].as_str().unwrap().to_string()).collect();
    assert!(!sent.is_empty());
    for id in &sent {
        assert!(cancelled.contains(id), "CancelCommand {id} was sent: {stderr}");
    }
    // With the node locks free again, an agent still running would pull now.
    drop(held);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for id in ids {
        assert!(!nodes.dir.path().join(id).join("srv/www/index.php").exists(), "no agent of the interrupted deploy ran on {id}");
    }
}

/// The agent processes that hold `lock` open (a pull waiting for it).
fn agents_waiting_on(lock: &std::path::Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(lock) else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("fleetsync-agent") {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == (want.dev(), want.ino())));
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// An agent killed on its node long before --timeout (the OOM killer's
/// SIGKILL: exit 137, which SSM's agent also reports for a command it
/// stopped) is reported as killed, not as timed out.
#[tokio::test]
async fn an_agent_killed_on_its_node_is_reported_killed_not_timed_out() {
    let b = Bucket::new("ssmkilled").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("ssmkilled", 1);
    let id = ids(&asg).remove(0);
    let root = nodes.dir.path().join(&id).join("srv");
    let held = Nodes::hold_agent_lock(&root);
    let deploy = common::deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
        .args(["--timeout", "120"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let pids = loop {
        let pids = agents_waiting_on(&root.join("state/node.lock"));
        if !pids.is_empty() {
            break pids;
        }
        assert!(std::time::Instant::now() < deadline, "the agent never started on {id}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for pid in pids {
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL).unwrap();
    }
    let out = deploy.wait_with_output().unwrap();
    drop(held);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = node_in(&report, &id)["error"].as_str().unwrap().to_string();
    assert!(e.contains("killed (exit 137)") && !e.contains("did not finish"), "{e}");
}

/// A stack update adds a version of the group's SSM document and leaves
/// its default version where it was: the deploy runs the latest version
/// (SendCommand's DocumentVersion `$LATEST`), not the default.
#[tokio::test]
async fn a_deploy_runs_the_latest_version_of_an_updated_document() {
    let b = Bucket::new("ssmdocversion").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("ssmdocv", 1);
    let id = ids(&asg).remove(0);
    let described = common::fleet(&["document-update", &asg]);
    assert_eq!((described["LatestVersion"].as_str(), described["DefaultVersion"].as_str()), (Some("2"), Some("1")), "{described}");
    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &[]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert!(nodes.dir.path().join(&id).join("srv/.ssm-document-version-2").exists(), "version 2 of the document ran");
}

/// A scale-in during a deploy: a terminated instance's invocation can stay
/// InProgress until its command expires (delivery + execution timeouts,
/// half an hour by default), which held the deploy and its fleet lock that
/// long. The deploy lists its group while it waits and stops waiting for
/// such a node at once, naming why; the fleet that remains is all on the
/// release, so the deploy succeeds.
#[tokio::test]
async fn an_instance_terminated_during_the_deploy_is_failed_at_once_not_waited_for() {
    let b = Bucket::new("ssmscalein").await;
    let tree = sample_tree(5, 43);
    b.put_tree("app/", &tree).await;
    let (asg, nodes) = Nodes::group_ssm("ssmscalein", 2, 8);
    let ids = ids(&asg);
    let roots: Vec<std::path::PathBuf> = ids.iter().map(|id| nodes.dir.path().join(id).join("srv")).collect();
    // The second node's pull waits for its node lock: its invocation is
    // InProgress, its script running, when the instance goes.
    let lock = Nodes::hold_agent_lock(&roots[1]);
    let child = common::deploy_command(&asg, &b.url("app"), "/srv/www", &nodes, "ssm")
        .args(["--timeout", "10m"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Sent to both (one command) once the first node has its tree.
    let first = roots[0].join("www").join(tree.keys().next().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !first.exists() {
        assert!(std::time::Instant::now() < deadline, "the deploy never synced {}", first.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Terminated: gone from the group, and its SSM agent with it (the
    // emulator then never ends the invocation, as AWS shows it).
    common::fleet(&["ssm-agent", &ids[1], "dead"]);
    common::fleet(&["terminate", &ids[1]]);
    let out = child.wait_with_output().unwrap();
    drop(lock);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(node_in(&report, &ids[0])["status"], "ok", "{report}");
    assert_eq!(report["totals"]["left"], 1, "{report}");
    let gone = node_in(&report, &ids[1]);
    assert_eq!(gone["status"], "left", "{report}");
    let e = gone["error"].as_str().unwrap();
    assert!(e.contains("Auto Scaling Group") && e.contains("during the deploy") && e.contains(ids[1].as_str()), "{e}");
    // SSM still shows it running: the deploy did not wait for an end.
    let ended: Vec<serde_json::Value> =
        ssm_calls(&ids[1..]).into_iter().filter(|c| c["op"] == "invocation" && c["instance_id"] == ids[1].as_str()).collect();
    assert!(ended.is_empty(), "{ended:?}");
}

/// A bastion newer than its group's SSM document: the document has no
/// `manifest` parameter yet (a stack not updated since), SSM refuses the
/// command for it, and the bastion sends it again without, saying so; the
/// release still goes live.
#[tokio::test]
async fn a_document_from_before_the_manifest_parameter_still_deploys_a_release() {
    let b = Bucket::new("ssmolddoc").await;
    let build = common::build_dir(6, "olddoc");
    assert_eq!(common::publish(build.path(), &b.url("app"), &["--release-id", "r1"]).0, 0);
    let (asg, nodes) = Nodes::group("ssmolddoc", 1);
    let id = ids(&asg).remove(0);
    common::fleet(&["document-update", &asg, "--drop-parameter", "manifest"]);
    let (code, report, stderr) = sync(&asg, &b.url("app"), &nodes, &["--releases"]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert!(stderr.contains("takes no manifest parameter"), "{stderr}");
    assert!(nodes.dir.path().join(&id).join("srv/.ssm-document-version-2").exists(), "the older document ran");
    assert_eq!(std::fs::read_link(nodes.dir.path().join(&id).join("srv/www/current")).unwrap(), std::path::Path::new("releases/r1"));
}
