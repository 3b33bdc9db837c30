//! The fleet lock against the real S3 server: conditional writes decide the
//! winner of every race.

mod common;

use std::time::{Duration, Instant};

use std::process::Command;

use common::{Bucket, FaultProxy, Nodes};
use fleetsync::fleet_lock::{self, LockError, LockInfo, LockObject};

fn object(b: &Bucket) -> LockObject {
    LockObject { bucket: b.name.clone(), key: ".fleetsync/locks/web.json".into() }
}

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn concurrent_acquirers_have_exactly_one_winner_every_round() {
    let b = Bucket::new("lockrace").await;
    let obj = object(&b);
    // SeaweedFS serializes conditional writes to one key and answers the
    // queued losers in one-second steps, so a round takes a few seconds.
    for round in 0..10 {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let obj = obj.clone();
                tokio::spawn(async move {
                    // A client each, as separate bastions would have.
                    let client = common::client().await;
                    let info = LockInfo::for_this_process(&format!("deploy {round}.{i}"), LEASE);
                    fleet_lock::acquire(&client, &obj, info, LEASE, Duration::ZERO).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(held) => winners.push(held),
                Err(LockError::Held { holder, .. }) => {
                    assert!(holder.command.starts_with(&format!("deploy {round}.")));
                    losers += 1;
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!((winners.len(), losers), (1, 9), "round {round}");
        winners.pop().unwrap().release().await.unwrap();
        assert!(fleet_lock::read(&b.client, &obj).await.unwrap().is_none(), "released");
    }
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_a_live_one_is_waited_for() {
    let b = Bucket::new("lockexpiry").await;
    let obj = object(&b);
    let short = Duration::from_millis(900);
    let crashed =
        fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("crashed deploy", short), short, Duration::ZERO).await.unwrap();
    drop(crashed); // stops renewing without releasing, as a crash would

    // While the lease runs, a second deploy is refused, naming the holder.
    let e = fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("second", LEASE), LEASE, Duration::ZERO).await;
    match e {
        Err(LockError::Held { holder, .. }) => assert_eq!(holder.command, "crashed deploy"),
        other => panic!("{:?}", other.map(|h| h.info().clone())),
    }
    // Waiting past the lease: taken over, and the report says from whom.
    let held =
        fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("second", LEASE), LEASE, Duration::from_secs(5)).await.unwrap();
    assert_eq!(held.took_over.as_ref().unwrap().command, "crashed deploy");
    held.release().await.unwrap();
}

#[tokio::test]
async fn a_holder_notices_on_renewal_that_its_lock_was_broken() {
    let b = Bucket::new("lockstolen").await;
    let obj = object(&b);
    let lease = Duration::from_millis(600);
    let held = fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("victim", lease), lease, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.lost(), "renewals keep a live lock");
    let broken = fleet_lock::break_lock(&b.client, &obj).await.unwrap().unwrap();
    assert_eq!(broken.command, "victim");
    let thief = fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("thief", LEASE), LEASE, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.lost(), "the next renewal finds the lock changed");
    // Releasing a lock that is no longer ours deletes nothing.
    assert!(held.release().await.is_err());
    assert_eq!(fleet_lock::read(&b.client, &obj).await.unwrap().unwrap().0.command, "thief");
    thief.release().await.unwrap();
}

#[tokio::test]
async fn a_retried_acquisition_finds_its_own_token() {
    let b = Bucket::new("lockretry").await;
    let obj = object(&b);
    let info = LockInfo::for_this_process("retrying deploy", LEASE);
    let first = fleet_lock::acquire(&b.client, &obj, info.clone(), LEASE, Duration::ZERO).await.unwrap();
    drop(first); // as if the PUT's answer had been lost
    let again = fleet_lock::acquire(&b.client, &obj, info.clone(), LEASE, Duration::ZERO).await.unwrap();
    assert_eq!(again.info().owner, info.owner);
    // A different deploy is still refused.
    assert!(fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("other", LEASE), LEASE, Duration::ZERO).await.is_err());
    again.release().await.unwrap();
    assert!(fleet_lock::break_lock(&b.client, &obj).await.unwrap().is_none(), "nothing left to break");
}

/// `fleetsync lock show` and `lock break`, through the real binary.
#[tokio::test]
async fn the_bastion_shows_and_breaks_the_lock() {
    let b = Bucket::new("lockcli").await;
    let source = b.url("app");
    let obj = LockObject::for_group(&fleetsync::S3Url::parse(&source).unwrap(), "web").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::bin("fleetsync-bastion", "fleetsync")).args(args).output().unwrap();
        (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (code, out, _) = run(&["lock", "show", "--group", "web", "--source", &source]);
    assert_eq!((code, out.trim()), (0, format!("{obj}: not held").as_str()));

    let held = fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("fleetsync sync --group web", LEASE), LEASE, Duration::ZERO)
        .await
        .unwrap();
    let (code, out, _) = run(&["lock", "show", "--group", "web", "--source", &source, "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["held"], true);
    assert_eq!(json["holder"]["command"], "fleetsync sync --group web");
    assert_eq!(json["holder"]["pid"], std::process::id());

    let (code, out, _) = run(&["lock", "break", "--lock", &obj.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("broke the lock of") && out.contains("fleetsync sync --group web"), "{out}");
    assert!(fleet_lock::read(&b.client, &obj).await.unwrap().is_none());
    tokio::time::sleep(LEASE / 3 + Duration::from_millis(500)).await;
    assert!(held.lost(), "the holder notices at its next renewal");

    let (code, _, err) = run(&["lock", "show", "--group", "a/b", "--source", &source]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--lock"), "{err}");
}

#[tokio::test]
async fn renewal_rides_out_a_conflicting_write_and_a_lost_answer_and_release_waits_for_a_renewal_in_flight() {
    let b = Bucket::new("lockrenew").await;
    let obj = object(&b);
    let lease = Duration::from_secs(3); // renewed every second
                                        // After the PUT that takes the lock: two renewal writes answered 409
                                        // ConditionalRequestConflict (a contender's write racing ours), then
                                        // one that reaches S3 but whose answer is lost (S3 then says 412 to the
                                        // retry: the object changed, by our own hand).
    let proxy = FaultProxy::start(
        &common::endpoint(),
        &["--rate", "0", "--put-fault", "409:locks/web.json:1:2", "--put-fault", "lost:locks/web.json:3:1"],
    );
    let client = common::client_via(&proxy.url).await;
    let held =
        fleet_lock::acquire(&client, &obj, LockInfo::for_this_process("renewing deploy", lease), lease, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stats = proxy.stats();
    assert_eq!((stats["409"].as_u64(), stats["lost"].as_u64()), (Some(2), Some(1)), "{stats}");
    assert!(!held.lost(), "a 409 and a lost answer are not a lost lock");
    let (info, _) = fleet_lock::read(&b.client, &obj).await.unwrap().unwrap();
    assert_eq!(info.owner, held.info().owner);
    assert!(info.expires_at_ms > now_ms() + 1000, "the lease is still being renewed");
    held.release().await.unwrap();
    assert!(fleet_lock::read(&b.client, &obj).await.unwrap().is_none(), "released");

    // A renewal whose answer takes 2 s is in flight when release() is
    // called: release waits for it and deletes the lock at its new ETag,
    // rather than leaving it behind for a whole lease.
    let slow = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", "slow:locks/web.json:1:1", "--slow", "2"]);
    let client = common::client_via(&slow.url).await;
    let held = fleet_lock::acquire(&client, &obj, LockInfo::for_this_process("slow renewal", lease), lease, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the first renewal is in flight
    assert_eq!(slow.stats()["slow"], 1);
    held.release().await.unwrap();
    assert!(fleet_lock::read(&b.client, &obj).await.unwrap().is_none(), "released, not left for the lease to run out");
}

#[tokio::test]
async fn a_renewal_that_fails_once_is_tried_again_at_once_and_the_lock_is_never_seen_lost() {
    let b = Bucket::new("lockagain").await;
    let obj = object(&b);
    // Renewed every 4 s; counted lost once less than 4 s of the lease is
    // left (at 8 s unless renewed). The first renewal fails for good: S3
    // sheds load (503 SlowDown) for all 6 of the SDK's attempts; the next
    // comes within a second, not a period later (at 8 s: lost).
    let lease = Duration::from_secs(12);
    let proxy = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--put-fault", "503:locks/web.json:1:6"]);
    let client = common::client_via(&proxy.url).await;
    let held = fleet_lock::acquire(&client, &obj, LockInfo::for_this_process("shed deploy", lease), lease, Duration::ZERO).await.unwrap();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert!(!held.lost(), "one failed renewal lost the lock: {}", proxy.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.stats()["503"], 6);
    let (info, _) = fleet_lock::read(&b.client, &obj).await.unwrap().unwrap();
    assert!(info.expires_at_ms > now_ms() + 6000, "the lease is still being renewed");
    held.release().await.unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn a_deploy_role_restricted_as_the_template_restricts_it_reads_a_free_lock_and_deploys() {
    // The bucket's name gives the world's "deployer" identity (see
    // infra/local/lib.sh) the template DeployPolicy's object permissions
    // on it; the proxy answers 403 for a missing object outside what the
    // policy grants s3:ListBucket for, as S3 does.
    let b = Bucket::new("leastpriv").await;
    b.put("app/index.php", b"<?php").await;
    let (asg, nodes) = Nodes::group("leastpriv", 1);
    let template = concat!(env!("CARGO_MANIFEST_DIR"), "/infra/aws/fleetsync.yaml");
    let group = format!("GroupName={asg}");
    let as_template = FaultProxy::start(
        &common::endpoint(),
        &["--rate", "0", "--list-prefixes-from", template, "--template-param", "SourcePrefix=app", "--template-param", &group],
    );
    let deployer = |proxy: &FaultProxy, args: &[&str]| {
        let mut c = Command::new(common::bin("fleetsync-bastion", "fleetsync"));
        c.args(args)
            .env("AWS_ENDPOINT_URL_S3", &proxy.url)
            .env("AWS_ACCESS_KEY_ID", "fleetsync-deployer")
            .env("AWS_SECRET_ACCESS_KEY", "fleetsync-deployer-secret");
        c
    };
    let source = b.url("app");
    let lock_args = ["--group", asg.as_str(), "--source", source.as_str()];

    let out = deployer(&as_template, &[&["lock", "show"][..], &lock_args].concat()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not held"));
    let out = deployer(&as_template, &[&["lock", "break"][..], &lock_args].concat()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, _, stderr) = common::run_report(
        deployer(&as_template, &["sync", "--via", "ssh", "--group", &asg, "--source", &source, "--dest", "/srv/www", "--dry-run"])
            .args(["--ssh-config", &nodes.ssh_config()]),
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, report, stderr) = common::run_report(
        deployer(&as_template, &["sync", "--via", "ssh", "--group", &asg, "--source", &source, "--dest", "/srv/www", "--json"])
            .args(["--ssh-config", &nodes.ssh_config()]),
    );
    assert_eq!(code, 0, "{stderr}\n{report}");
    assert!(as_template.stats()["denied"].as_u64().unwrap_or(0) == 0, "{}", as_template.stats());

    // Without s3:ListBucket on the lock's key, a free lock reads as 403:
    // one line that names the permission and the key.
    let source_only = FaultProxy::start(&common::endpoint(), &["--rate", "0", "--list-prefixes", "app/"]);
    let out = deployer(&source_only, &[&["lock", "show"][..], &lock_args].concat()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("s3:ListBucket") && stderr.contains(&format!(".fleetsync/locks/{asg}.json")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
