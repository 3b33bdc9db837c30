//! Objects that change between LIST and GET. The observer's `planned` call
//! comes after LIST has reported an object and before its GET is sent, so a
//! test can change the object at exactly that moment.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Bucket, Node};

/// Replaces or deletes one object the first time a download is planned.
struct Meddler {
    bucket: String,
    key: String,
    replace_with: Option<Vec<u8>>,
    done: AtomicBool,
}

impl fleetsync::Observer for Meddler {
    fn planned(&self, _bytes: u64) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let (bucket, key, body) = (self.bucket.clone(), self.key.clone(), self.replace_with.clone());
        // The pull's runtime is busy calling us: do the S3 call on a thread
        // of its own and wait for it, so the GET is sent only afterwards.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let c = common::client().await;
                match body {
                    Some(b) => drop(c.put_object().bucket(&bucket).key(&key).body(b.into()).send().await.unwrap()),
                    None => drop(c.delete_object().bucket(&bucket).key(&key).send().await.unwrap()),
                }
            })
        })
        .join()
        .unwrap();
    }
}

#[tokio::test]
async fn an_object_replaced_between_list_and_get_is_fetched_at_its_new_version() {
    let b = Bucket::new("replaced").await;
    b.put("only.txt", b"version one").await;
    let node = Node::new();
    let meddler = Arc::new(Meddler {
        bucket: b.name.clone(),
        key: "only.txt".into(),
        replace_with: Some(b"version two, longer".to_vec()),
        done: AtomicBool::new(false),
    });
    let r = fleetsync::pull(&node.options(&b.url("")), meddler.clone()).await.unwrap();
    assert!(meddler.done.load(Ordering::SeqCst));
    assert_eq!((r.counts.downloaded, r.counts.replanned, r.counts.failed), (1, 1, 0), "{r:?}");
    assert_eq!(std::fs::read(node.dest.join("only.txt")).unwrap(), b"version two, longer");
    // The state recorded the new ETag: nothing to do next time.
    let r = node.pull(&b.url("")).await;
    assert_eq!((r.counts.downloaded, r.counts.unchanged), (0, 1), "{r:?}");
}

#[tokio::test]
async fn an_object_deleted_between_list_and_get_is_skipped_not_failed() {
    let b = Bucket::new("vanished").await;
    b.put("a.txt", b"a").await;
    let node = Node::new();
    let meddler = Arc::new(Meddler { bucket: b.name.clone(), key: "a.txt".into(), replace_with: None, done: AtomicBool::new(false) });
    let r = fleetsync::pull(&node.options(&b.url("")), meddler).await.unwrap();
    assert_eq!((r.counts.downloaded, r.counts.vanished, r.counts.failed), (0, 1, 0), "{r:?}");
    assert!(!node.dest.join("a.txt").exists());
}
