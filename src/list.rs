//! LIST: streams the source's objects, page by page, as they arrive.
//!
//! The lister is its own task so that the first GETs start while later pages
//! are still being listed: a 100,000-key prefix is 100 ListObjectsV2 pages,
//! and nothing downstream needs the last page to act on the first.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::source::{S3Failure, S3Url};

/// One object as LIST reports it.
#[derive(Debug, Clone)]
pub(crate) struct RemoteObject {
    pub key: String,
    pub etag: String,
    pub size: u64,
}

/// A running lister. Dropping it stops the listing.
pub(crate) struct Lister {
    pub pages: mpsc::Receiver<Result<Vec<RemoteObject>>>,
    task: JoinHandle<()>,
}

impl Drop for Lister {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Pages buffered ahead of the planner: enough to keep it busy, few enough
/// that a slow consumer does not hold 100,000 keys twice in memory.
const PAGES_AHEAD: usize = 4;

pub(crate) fn start(client: aws_sdk_s3::Client, source: S3Url) -> Lister {
    let (tx, rx) = mpsc::channel(PAGES_AHEAD);
    let task = tokio::spawn(async move {
        let mut pages = client
            .list_objects_v2()
            .bucket(&source.bucket)
            .prefix(&source.prefix)
            .into_paginator()
            .page_size(1000)
            .send();
        while let Some(page) = pages.next().await {
            let item = match page {
                Ok(page) => Ok(page
                    .contents()
                    .iter()
                    .filter_map(|o| {
                        Some(RemoteObject {
                            key: o.key()?.to_string(),
                            etag: o.e_tag().unwrap_or_default().to_string(),
                            size: o.size().unwrap_or(0).max(0) as u64,
                        })
                    })
                    .collect()),
                Err(e) => Err(list_error(&source, &S3Failure::from_sdk(&e))),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    Lister { pages: rx, task }
}

fn list_error(source: &S3Url, f: &S3Failure) -> Error {
    let what = format!("listing {source} failed: {}", f.message);
    if f.is_configuration() {
        Error::Config(format!("{what} ({})", f.hint()))
    } else {
        Error::S3(what)
    }
}
