//! The release store across a fleet: `fleetsync publish` adds a release,
//! `sync --releases` deploys it under the fleet lock and moves the group's
//! deployed pointer, `status` compares the nodes with it, `rollback` moves
//! the group back (or `--to` any release), `--rollback-on-failure` ends a
//! failed deploy on one release, and `history`/`releases` tell what
//! happened; on the local world (moto, SSM emulator, sshd nodes, SeaweedFS).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_tree, Bucket, Node, Nodes};

fn fleetsync_command(args: &[&str], nodes: &Nodes) -> Command {
    let mut c = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
    c.args(args).args(["--ssh-config", &nodes.ssh_config(), "--json"]);
    c
}

fn fleetsync(args: &[&str], nodes: &Nodes) -> (i32, serde_json::Value, String) {
    common::run_report(&mut fleetsync_command(args, nodes))
}

/// A store command (`releases`, `history`): its JSON.
fn store_command(args: &[&str]) -> serde_json::Value {
    let (code, v, stderr) = common::run_report(Command::new(common::bin("fleetsync-bastion", "fleetsync")).args(args).arg("--json"));
    assert_eq!(code, 0, "{args:?}: {stderr}");
    v
}

fn publish(dir: &Path, target: &str, id: &str) {
    let (code, _, stderr) = common::publish(dir, target, &["--release-id", id]);
    assert_eq!(code, 0, "{stderr}");
}

fn live(root: &Path) -> String {
    std::fs::read_link(root.join("www/current")).unwrap().display().to_string()
}

/// The group's deployed pointer as stored, if any.
async fn deployed(b: &Bucket, asg: &str) -> Option<serde_json::Value> {
    let key = format!("app/.fleetsync/deployed/{asg}.json");
    let out = b.client.get_object().bucket(&b.name).key(key).send().await.ok()?;
    Some(serde_json::from_slice(&out.body.collect().await.unwrap().into_bytes()).unwrap())
}

#[tokio::test]
async fn publishing_is_not_deploying_and_rollback_moves_the_group_between_releases() {
    let b = Bucket::new("fleetrel").await;
    let (v1, v2) = (common::build_dir(10, "v1"), common::build_dir(10, "v2"));
    let (asg, nodes) = Nodes::group("rel", 3);
    let source = b.url("app");
    let base = ["--group", asg.as_str(), "--source", source.as_str(), "--dest", "/srv/www"];
    let on_every_node = |release: &str, tree: &Path| {
        for (_, root) in nodes.list() {
            assert_eq!(live(&root), format!("releases/{release}"));
            assert_eq!(read_tree(&root.join("www/current")), read_tree(tree), "byte-identical to {release}");
        }
    };

    publish(v1.path(), &source, "r1");
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases"][..], &base].concat(), &nodes);
    assert_eq!((code, r["release"].as_str()), (0, Some("r1")), "{stderr}\n{r}");
    on_every_node("r1", v1.path());

    // A publish changes no node: the group stays on its deployed release,
    // even when a node's own timer pulls meanwhile.
    publish(v2.path(), &source, "r2");
    let (code, st, stderr) = fleetsync(&[&["status"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{st}");
    assert_eq!((st["deployed"].as_str(), st["published"].as_str()), (Some("r1"), Some("r2")), "{st}");
    // The version handshake: every node names its agent.
    assert!(st["nodes"].as_array().unwrap().iter().all(|n| n["agent_version"] == fleetsync::VERSION), "{st}");
    let (ip, _) = &nodes.list()[0];
    let timer = format!("fleetsync-agent pull {source} --dest /srv/www --releases --group {asg} --json");
    let out = nodes.ssh(ip, &timer, &[]);
    let pulled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        (out.status.code(), pulled["release"]["id"].as_str()),
        (Some(0), Some("r1")),
        "{pulled}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    on_every_node("r1", v1.path());

    let (code, r, stderr) = fleetsync(&[&["sync", "--releases", "--via", "ssh"][..], &base].concat(), &nodes);
    assert_eq!((code, r["release"].as_str()), (0, Some("r2")), "{stderr}\n{r}");
    on_every_node("r2", v2.path());

    // Back to the release deployed before, then no further back without --to.
    let (code, r, stderr) = fleetsync(&[&["rollback"][..], &base].concat(), &nodes);
    assert_eq!((code, r["release"].as_str(), r["totals"]["ok"].as_u64()), (0, Some("r1"), Some(3)), "{stderr}\n{r}");
    on_every_node("r1", v1.path());
    let (code, st, _) = fleetsync(&[&["status"][..], &base].concat(), &nodes);
    assert_eq!((code, st["deployed"].as_str(), st["published"].as_str()), (0, Some("r1"), Some("r2")), "no node drifts: {st}");
    let (code, _, stderr) = fleetsync(&[&["rollback"][..], &base].concat(), &nodes);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nothing to roll group") && stderr.contains("--to"), "{stderr}");

    // Any stored release by name, also to a node that never had it.
    let wiped = &nodes.list()[2].1;
    std::fs::remove_dir_all(wiped.join("www")).unwrap();
    std::fs::remove_dir_all(wiped.join("state")).unwrap();
    let (code, r, stderr) = fleetsync(&[&["rollback", "--to", "r2"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{r}");
    on_every_node("r2", v2.path());
    let (code, _, stderr) = fleetsync(&[&["rollback", "--to", "r9"][..], &base].concat(), &nodes);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("release r9 is not in the release store"), "{stderr}");

    // What happened, oldest first; and the store's catalogue.
    let history = store_command(&["history", "--source", &source, "--group", &asg]);
    let rows: Vec<(&str, &str, &str)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["verb"].as_str().unwrap(), h["release"].as_str().unwrap_or("-"), h["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(rows, [("sync", "r1", "ok"), ("sync", "r2", "ok"), ("rollback", "r1", "ok"), ("rollback", "r2", "ok")], "{history}");
    assert_eq!((history[2]["previous"].as_str(), history[3]["nodes"].as_array().unwrap().len()), (Some("r2"), 3), "{history}");
    let catalog = store_command(&["releases", "--source", &source]);
    let r2 = catalog["releases"].as_array().unwrap().iter().find(|r| r["id"] == "r2").unwrap_or_else(|| panic!("{catalog}"));
    assert_eq!((r2["latest"].as_bool(), r2["deployed"][0].as_str()), (Some(true), Some(asg.as_str())), "{catalog}");
}

#[tokio::test]
async fn boots_and_timers_follow_the_deployed_release_and_a_failed_deploy_rolls_the_fleet_back_to_one() {
    let b = Bucket::new("fleetrob").await;
    let (v1, v2) = (common::build_dir(10, "v1"), common::build_dir(10, "v2"));
    let (asg, nodes) = Nodes::group("rob", 3);
    let source = b.url("app");
    let base = ["--group", asg.as_str(), "--source", source.as_str(), "--dest", "/srv/www", "--via", "ssh"];
    let pull = |node: &Node| common::run_json(node.agent(&source).args(["--releases", "--group", &asg]));

    // Before the group's first deploy, an instance with no release boots
    // the latest published; one that runs a release keeps it.
    publish(v1.path(), &source, "r1");
    let early = Node::new();
    let (code, pulled, stderr) = pull(&early);
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("r1")), "{stderr}\n{pulled}");
    publish(v2.path(), &source, "r2");
    let (code, pulled, stderr) = pull(&early);
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("r1")), "{stderr}\n{pulled}");
    assert!(pulled["release"]["held"].as_str().is_some_and(|h| h.contains("no deployed release yet")), "{pulled}");
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases", "--release", "r1"][..], &base].concat(), &nodes);
    assert_eq!((code, r["release"].as_str()), (0, Some("r1")), "{stderr}\n{r}");

    // The third node's after-switch command fails; the first node's agent
    // waits for its node lock, so the deploy stays under way for a while.
    let roots: Vec<_> = nodes.list().into_iter().map(|(_, root)| root).collect();
    std::fs::write(roots[2].join("fail"), b"").unwrap();
    let held = Nodes::hold_agent_lock(&roots[0]);
    let args = [&["sync", "--releases", "--rollback-on-failure", "--after-switch", "test ! -e /srv/fail"][..], &base].concat();
    let child = fleetsync_command(&args, &nodes).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    let started = Instant::now();
    while deployed(&b, &asg).await.is_none_or(|d| d["state"] != "deploying") {
        assert!(started.elapsed() < Duration::from_secs(20), "the pointer never said deploying: {:?}", deployed(&b, &asg).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An instance booting now takes the release deployed before, not the
    // one being tried.
    let booting = Node::new();
    let (code, pulled, stderr) = pull(&booting);
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("r1")), "{stderr}\n{pulled}");
    // Its timer (which remembers the group) keeps what it runs meanwhile.
    let (code, pulled, stderr) = common::run_json(booting.agent(&source).arg("--releases"));
    assert_eq!(
        (code, pulled["release"]["id"].as_str(), pulled["release"]["switched"].as_bool()),
        (0, Some("r1"), Some(false)),
        "{stderr}\n{pulled}"
    );
    assert!(pulled["release"]["held"].as_str().is_some_and(|h| h.contains("under way")), "{pulled}");
    drop(held);

    let out = child.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(out.status.code(), Some(1), "{}\n{r}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((r["rolled_back"]["to"].as_str(), r["rolled_back"]["nodes"].as_u64()), (Some("r1"), Some(2)), "{r}");
    for root in &roots {
        assert_eq!(live(root), "releases/r1", "the fleet ends on one release");
        assert_eq!(read_tree(&root.join("www/current")), read_tree(v1.path()));
    }
    let pointer = deployed(&b, &asg).await.unwrap();
    assert_eq!((pointer["release"].as_str(), pointer["state"].as_str()), (Some("r1"), Some("done")), "{pointer}");
    let history = store_command(&["history", "--source", &source, "--group", &asg, "-n", "1"]);
    assert_eq!((history[0]["outcome"].as_str(), history[0]["rolled_back_to"].as_str()), (Some("rolled-back"), Some("r1")), "{history}");

    // A booting instance now takes r1 too; after a good deploy, r2.
    let (code, st, _) = fleetsync(&[&["status"][..], &base].concat(), &nodes);
    assert_eq!((code, st["deployed"].as_str()), (0, Some("r1")), "{st}");
    std::fs::remove_file(roots[2].join("fail")).unwrap();
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases"][..], &base].concat(), &nodes);
    assert_eq!(code, 0, "{stderr}\n{r}");
    let (code, pulled, _) = pull(&booting);
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("r2")), "{pulled}");

    // Every node switched, but the pointer could not be set at the end
    // (the writes after the first conflict, again and again): not a success.
    let conflict = common::FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", "409:/deployed/:1:20"]);
    let args = [&["sync", "--releases", "--release", "r1"][..], &base].concat();
    let (code, r, stderr) = common::run_report(fleetsync_command(&args, &nodes).env("AWS_ENDPOINT_URL_S3", &conflict.url));
    assert_eq!(code, 1, "{stderr}\n{r}");
    assert_eq!(r["totals"]["ok"], 3, "{r}");
    assert!(r["pointer_error"].as_str().is_some_and(|e| e.contains("sync --releases --release r1")), "{r}");
}

#[tokio::test]
async fn a_failed_rerun_switches_back_the_nodes_an_earlier_run_left_on_its_release() {
    let g = OnR1::new("rerun", 3).await;
    let (b, v1, asg, nodes, base) = (&g.b, &g.v1, g.asg.as_str(), &g.nodes, g.base());
    let roots: Vec<_> = nodes.list().into_iter().map(|(_, root)| root).collect();

    // The first run of r2 fails on the third node's after-switch command
    // (which accepts r1), without --rollback-on-failure: every node is left
    // on r2.
    std::fs::write(roots[2].join("fail"), b"").unwrap();
    let hook = ["--after-switch", "[ \"$FLEETSYNC_RELEASE\" = r1 ] || test ! -e /srv/fail"];
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases"][..], &hook, &base].concat(), nodes);
    assert_eq!(code, 1, "{stderr}\n{r}");
    for root in &roots {
        assert_eq!(live(root), "releases/r2");
    }

    // The third node is replaced by a fresh one that fails the same way;
    // the re-run asks to roll the fleet back on failure. The first two
    // nodes only report r2 live (they switch nothing), yet they go back too.
    std::fs::remove_dir_all(roots[2].join("www")).unwrap();
    std::fs::remove_dir_all(roots[2].join("state")).unwrap();
    let args = [&["sync", "--releases", "--release", "r2", "--rollback-on-failure"][..], &hook, &base].concat();
    let (code, r, stderr) = fleetsync(&args, nodes);
    assert_eq!(code, 1, "{stderr}\n{r}");
    assert_eq!((r["rolled_back"]["to"].as_str(), r["rolled_back"]["nodes"].as_u64()), (Some("r1"), Some(3)), "{r}");
    for root in &roots {
        assert_eq!(live(root), "releases/r1", "the fleet ends on one release");
        assert_eq!(read_tree(&root.join("www/current")), read_tree(v1.path()));
    }
    let pointer = deployed(b, asg).await.unwrap();
    assert_eq!((pointer["release"].as_str(), pointer["state"].as_str()), (Some("r1"), Some("done")), "{pointer}");
}

#[tokio::test]
async fn an_interrupt_during_the_switch_back_stops_the_deploy_at_once() {
    use std::io::BufRead as _;
    let g = OnR1::new("backint", 2).await;
    let (b, asg, nodes, source, base) = (&g.b, g.asg.as_str(), &g.nodes, g.source.as_str(), g.base());

    // The second node fails on r2; switching the first back to r1 then
    // takes 30 s (its after-switch command): the interrupt comes meanwhile.
    std::fs::write(nodes.list()[1].1.join("fail"), b"").unwrap();
    let hook = r#"if [ "$FLEETSYNC_RELEASE" = r1 ]; then sleep 30; else test ! -e /srv/fail; fi"#;
    let args = [&["sync", "--releases", "--rollback-on-failure", "--after-switch", hook][..], &base].concat();
    let mut child = fleetsync_command(&args, nodes).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("switching 1 nodes back to r1") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500)); // the switch back is under way
    let interrupted = Instant::now();
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    seen.extend(lines.map_while(Result::ok));
    assert_eq!(status.code(), Some(130), "{}", seen.join("\n"));
    assert!(interrupted.elapsed() < Duration::from_secs(10), "stopped at once, not after the switch back: {:?}", interrupted.elapsed());
    let pointer = deployed(b, asg).await.unwrap();
    assert_eq!(pointer["state"].as_str(), Some("failed"), "{pointer}");
    let lock = store_command(&["lock", "show", "--group", asg, "--source", source]);
    assert_eq!(lock["held"], false, "the fleet lock was released: {lock}");
}

#[tokio::test]
async fn a_deploy_stopped_by_max_errors_still_switches_the_fleet_back() {
    let g = OnR1::new("maxback", 3).await;
    let (nodes, base) = (&g.nodes, g.base());
    // The nodes in the order the bastion starts them: by instance ID.
    let mut roots: Vec<(String, std::path::PathBuf)> = nodes.info["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), std::path::PathBuf::from(n["root"].as_str().unwrap())))
        .collect();
    roots.sort();

    // One node at a time, no failure allowed: the first switches to r2, the
    // second fails (its agent switches itself back), the third is never
    // started. The switch back must not be held to the spent --max-errors.
    std::fs::write(roots[1].1.join("fail"), b"").unwrap();
    let hook = ["--after-switch", "[ \"$FLEETSYNC_RELEASE\" = r1 ] || test ! -e /srv/fail"];
    let args = [&["sync", "--releases", "--rollback-on-failure", "--batch", "1", "--max-errors", "0"][..], &hook, &base].concat();
    let (code, r, stderr) = fleetsync(&args, nodes);
    assert_eq!(code, 1, "{stderr}\n{r}");
    assert_eq!(r["totals"]["not_attempted"], 1, "{r}");
    // Only the first node is asked: the group was settled on r1, so the
    // node never started still runs it.
    assert!(stderr.contains("switching 1 nodes back to r1"), "{stderr}");
    assert_eq!(
        (r["rolled_back"]["to"].as_str(), r["rolled_back"]["nodes"].as_u64(), r["rolled_back"]["failed"].as_array().map(Vec::len)),
        (Some("r1"), Some(1), Some(0)),
        "{r}"
    );
    for (_, root) in &roots {
        assert_eq!(live(root), "releases/r1", "the fleet ends on one release");
    }
}

/// A group of SSH nodes deployed to release r1 (`v1`), with r2 published
/// and not deployed: where the fleet-rollback tests start.
struct OnR1 {
    b: Bucket,
    v1: tempfile::TempDir,
    asg: String,
    nodes: Nodes,
    source: String,
}

impl OnR1 {
    async fn new(name: &str, size: u32) -> OnR1 {
        let b = Bucket::new(&format!("fleet{name}")).await;
        let (v1, v2) = (common::build_dir(10, "v1"), common::build_dir(10, "v2"));
        let (asg, nodes) = Nodes::group(name, size);
        let source = b.url("app");
        let g = OnR1 { b, v1, asg, nodes, source };
        publish(g.v1.path(), &g.source, "r1");
        let (code, r, stderr) = fleetsync(&[&["sync", "--releases"][..], &g.base()].concat(), &g.nodes);
        assert_eq!(code, 0, "{stderr}\n{r}");
        publish(v2.path(), &g.source, "r2");
        g
    }

    /// The group, source and transport arguments of every command.
    fn base(&self) -> [&str; 8] {
        ["--group", &self.asg, "--source", &self.source, "--dest", "/srv/www", "--via", "ssh"]
    }
}

#[tokio::test]
async fn a_failed_redeploy_of_the_release_the_group_runs_switches_nothing_back() {
    let g = OnR1::new("redeploy", 2).await;
    let (nodes, base) = (&g.nodes, g.base());
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases"][..], &base].concat(), nodes);
    assert_eq!(code, 0, "{stderr}\n{r}");
    // The group runs r2 (its deploy ended whole). A node replaced by a
    // fresh one fails r2's after-switch command when r2 is deployed again:
    // r1, the release before, is not what the fleet ran, and nothing goes
    // back to it.
    let root = &nodes.list()[0].1;
    std::fs::remove_dir_all(root.join("www")).unwrap();
    std::fs::remove_dir_all(root.join("state")).unwrap();
    std::fs::write(root.join("fail"), b"").unwrap();
    let args =
        [&["sync", "--releases", "--release", "r2", "--rollback-on-failure", "--after-switch", "test ! -e /srv/fail"][..], &base].concat();
    let (code, r, stderr) = fleetsync(&args, nodes);
    assert_eq!(code, 1, "{stderr}\n{r}");
    assert!(r["rolled_back"].is_null() && stderr.contains("nothing is switched back"), "{stderr}\n{r}");
    for (_, root) in nodes.list() {
        assert_eq!(live(&root), "releases/r2");
    }
    // The group still runs r2: an instance booting now takes it, not r1.
    let pointer = deployed(&g.b, &g.asg).await.unwrap();
    assert_eq!((pointer["release"].as_str(), pointer["state"].as_str()), (Some("r2"), Some("done")), "{pointer}");
    let (code, pulled, stderr) = common::run_json(Node::new().agent(&g.source).args(["--releases", "--group", &g.asg]));
    assert_eq!((code, pulled["release"]["id"].as_str()), (0, Some("r2")), "{stderr}\n{pulled}");
}

/// `sync --health-url` through the SSM document (its healthUrl and
/// healthTimeout parameters, run by the emulator as SSM runs them): a
/// release whose nodes do not answer fails every node with the health
/// check's reason, and `--rollback-on-failure` ends the fleet on r1;
/// `rollback --health-url` fails its nodes the same way.
#[tokio::test]
async fn a_release_that_fails_its_health_check_fails_its_nodes_and_the_fleet_goes_back() {
    let g = OnR1::new("health", 2).await;
    let base = g.base();
    let ssm = [&base[..6], &["--via", "ssm"]].concat();
    let check = ["--health-url", "http://127.0.0.1:9/health", "--health-timeout", "1s"];
    let (code, r, stderr) = fleetsync(&[&["sync", "--releases", "--rollback-on-failure"][..], &check, &ssm].concat(), &g.nodes);
    assert_eq!(code, 1, "{stderr}\n{r}");
    for n in r["nodes"].as_array().unwrap() {
        let e = n["error"].as_str().unwrap_or_default();
        assert!(n["status"] == "failed" && e.contains("health check of http://127.0.0.1:9/health failed"), "{n}");
    }
    assert_eq!(r["rolled_back"]["to"], "r1", "{r}");
    for (_, root) in g.nodes.list() {
        assert_eq!(live(&root), "releases/r1", "the fleet ends on one release");
    }
    // `rollback --health-url` asks too, through the same document: a
    // release rolled back to that does not answer fails every node.
    let (code, r, stderr) = fleetsync(&[&["rollback", "--to", "r2"][..], &check, &ssm].concat(), &g.nodes);
    assert_eq!(code, 1, "{stderr}\n{r}");
    for n in r["nodes"].as_array().unwrap() {
        let e = n["error"].as_str().unwrap_or_default();
        assert!(n["status"] == "failed" && e.contains("health check of http://127.0.0.1:9/health failed"), "{n}");
    }
    // A URL the document would refuse (a quote) is one line before anything is sent.
    let (code, _, stderr) = fleetsync(&[&["sync", "--releases", "--health-url", "http://127.0.0.1/it's"][..], &ssm].concat(), &g.nodes);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--health-url") && stderr.lines().count() == 1, "{stderr}");
}

/// CloudWatch (moto's) through the library's Query API client: what the
/// alarm test needs to make an alarm and move its state.
async fn cloudwatch(action: &str, params: &[(&str, &str)]) {
    let sdk = fleetsync::source::sdk_config(&fleetsync::ClientOptions::default()).await;
    let client = fleetsync::aws_query::Client::new(&sdk, &fleetsync::aws_query::CLOUDWATCH);
    client.call(action, params).await.unwrap_or_else(|e| panic!("{action}: {e:?}"));
}

/// `sync --batch 1 --bake 30s --alarm NAME --rollback-on-failure`: an alarm
/// that goes into ALARM once the first node runs r2 ends the bake early,
/// no other node starts, the report names the alarm, and the fleet ends on
/// r1. An unknown alarm, one already in ALARM, and a bake with no batch
/// are each refused before anything is locked.
#[tokio::test]
async fn an_alarm_that_fires_during_the_bake_stops_the_deploy_and_the_fleet_goes_back() {
    let g = OnR1::new("alarm", 2).await;
    let base = g.base();
    let alarm = format!("{}-5xx", g.asg);
    cloudwatch(
        "PutMetricAlarm",
        &[
            ("AlarmName", &alarm),
            ("MetricName", "HTTPCode_Target_5XX_Count"),
            ("Namespace", "AWS/ApplicationELB"),
            ("Statistic", "Sum"),
            ("Period", "60"),
            ("EvaluationPeriods", "1"),
            ("Threshold", "1"),
            ("ComparisonOperator", "GreaterThanThreshold"),
        ],
    )
    .await;
    cloudwatch("SetAlarmState", &[("AlarmName", &alarm), ("StateValue", "OK"), ("StateReason", "quiet")]).await;

    // Refused at start, each in one line, nothing locked or deployed.
    for (extra, says) in [
        (vec!["--alarm", "no-such-alarm"], "no alarm named no-such-alarm"),
        (vec!["--bake", "5s", "--alarm", &alarm], "--bake waits between batches"),
    ] {
        let (code, _, stderr) = fleetsync(&[&["sync", "--releases"][..], &extra, &base].concat(), &g.nodes);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(says) && stderr.trim().lines().count() == 1, "{stderr}");
    }

    // The alarm fires as soon as a node runs r2 (the site's 5xx rose).
    let roots: Vec<std::path::PathBuf> = g.nodes.list().into_iter().map(|(_, root)| root).collect();
    let fire = tokio::spawn({
        let (roots, alarm) = (roots.clone(), alarm.clone());
        async move {
            while !roots.iter().any(|r| std::fs::read_link(r.join("www/current")).is_ok_and(|l| l.ends_with("r2"))) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cloudwatch("SetAlarmState", &[("AlarmName", &alarm), ("StateValue", "ALARM"), ("StateReason", "5xx above 1")]).await;
        }
    });
    let args = [&["sync", "--releases", "--rollback-on-failure", "--batch", "1", "--bake", "30s", "--alarm", &alarm][..], &base].concat();
    let started = Instant::now();
    let mut deploy = fleetsync_command(&args, &g.nodes);
    let (code, r, stderr) = tokio::task::spawn_blocking(move || common::run_report(&mut deploy)).await.unwrap();
    fire.await.unwrap();
    assert_eq!(code, 1, "{stderr}\n{r}");
    assert!(stderr.contains("batch 1 of 2 done; baking 30 s"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(25), "the bake ended when the alarm fired: {:?}", started.elapsed());
    let said = r["alarm"].as_str().unwrap_or_default();
    assert!(said.contains(&format!("alarm {alarm} is in ALARM: 5xx above 1")), "{r}");
    assert_eq!(r["totals"]["ok"], 1, "{r}");
    assert_eq!(r["totals"]["not_attempted"], 1, "the second batch never started: {r}");
    assert_eq!((r["rolled_back"]["to"].as_str(), r["rolled_back"]["nodes"].as_u64()), (Some("r1"), Some(1)), "{r}");
    for root in &roots {
        assert_eq!(live(root), "releases/r1", "the fleet ends on one release");
    }
    common::check_fleet_schema(&r);

    // Still in ALARM: the next deploy that watches it does not start.
    let (code, _, stderr) = fleetsync(&[&["sync", "--releases", "--alarm", &alarm][..], &base].concat(), &g.nodes);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is in ALARM: 5xx above 1") && stderr.contains("wait until it is OK"), "{stderr}");
    for root in &roots {
        assert_eq!(live(root), "releases/r1");
    }
}
