//! The fleet lock against the real S3 server: conditional writes decide the
//! winner of every race.

mod common;

use std::time::Duration;

use common::Bucket;
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

    let (code, out, _) = run(&["lock", "show", "--asg", "web", "--source", &source]);
    assert_eq!((code, out.trim()), (0, format!("{obj}: not held").as_str()));

    let held = fleet_lock::acquire(&b.client, &obj, LockInfo::for_this_process("fleetsync sync --asg web", LEASE), LEASE, Duration::ZERO)
        .await
        .unwrap();
    let (code, out, _) = run(&["lock", "show", "--asg", "web", "--source", &source, "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["held"], true);
    assert_eq!(json["holder"]["command"], "fleetsync sync --asg web");
    assert_eq!(json["holder"]["pid"], std::process::id());

    let (code, out, _) = run(&["lock", "break", "--lock", &obj.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("broke the lock of") && out.contains("fleetsync sync --asg web"), "{out}");
    assert!(fleet_lock::read(&b.client, &obj).await.unwrap().is_none());
    tokio::time::sleep(LEASE / 3 + Duration::from_millis(500)).await;
    assert!(held.lost(), "the holder notices at its next renewal");

    let (code, _, err) = run(&["lock", "show", "--asg", "a/b", "--source", &source]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--lock"), "{err}");
}
