//! LIST: streams the source's objects, page by page, as they arrive.
//!
//! The lister is its own task so that the first GETs start while later pages
//! are still being listed: a 100,000-key prefix is 100 ListObjectsV2 pages,
//! and nothing downstream needs the last page to act on the first.
//!
//! One ListObjectsV2 stream is sequential (each page needs the previous
//! page's continuation token), which caps a no-op pull of a big tree at
//! ~60 ms per 1,000 keys. So the listing is sharded: one LIST with
//! `delimiter=/` returns the top-level files and directories, then each
//! top-level directory is listed in full, [`PARALLEL_LISTS`] at a time. A
//! code tree has a handful of top-level directories (`app/`, `vendor/`,
//! `public/`...), so this costs a few extra requests and divides the
//! listing time by up to that many. Pages arrive out of key order; nothing
//! downstream needs order.
//!
//! Listings ask for `encoding-type=url`: XML 1.0 cannot carry some
//! characters a key may hold (`\x01`, say), and without it S3 sends a
//! response no parser accepts, so one such key would make the whole source
//! unlistable. Keys are decoded here, and the key rules then refuse such a
//! key by name.

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::source::{ApiFailure, S3Url};

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
const PAGES_AHEAD: usize = 8;
/// Top-level directories listed at once.
const PARALLEL_LISTS: usize = 8;

type Pages = mpsc::Sender<Result<Vec<RemoteObject>>>;

/// The directory under a source prefix that fleetsync keeps for itself
/// (the release pointer, and fleet locks when the prefix is the whole
/// bucket). It is never listed as part of the source.
pub const RESERVED_DIR: &str = ".fleetsync/";

pub(crate) fn start(client: aws_sdk_s3::Client, source: S3Url) -> Lister {
    let (tx, rx) = mpsc::channel(PAGES_AHEAD);
    let task = tokio::spawn(async move {
        let Some(dirs) = list_prefix(&client, &source, &source.prefix, true, &tx).await else {
            return;
        };
        futures::stream::iter(dirs)
            .map(|dir| {
                let (client, source, tx) = (&client, &source, &tx);
                async move { list_prefix(client, source, &dir, false, tx).await.is_some() }
            })
            .buffer_unordered(PARALLEL_LISTS)
            // Stop at the first failure: the planner has its error already.
            .take_while(|ok| std::future::ready(*ok))
            .for_each(|_| std::future::ready(()))
            .await;
    });
    Lister { pages: rx, task }
}

/// A lister that hands out a listing made earlier, in pages as LIST would.
pub(crate) fn given(objects: Vec<RemoteObject>) -> Lister {
    let (tx, rx) = mpsc::channel(PAGES_AHEAD);
    let task = tokio::spawn(async move {
        let mut objects = objects.into_iter().peekable();
        while objects.peek().is_some() {
            let page: Vec<RemoteObject> = objects.by_ref().take(1000).collect();
            if tx.send(Ok(page)).await.is_err() {
                return;
            }
        }
    });
    Lister { pages: rx, task }
}

/// The whole listing at once: every object under the source's prefix.
pub(crate) async fn collect(client: aws_sdk_s3::Client, source: S3Url) -> Result<Vec<RemoteObject>> {
    let mut lister = start(client, source);
    let mut all = Vec::new();
    while let Some(page) = lister.pages.recv().await {
        all.extend(page?);
    }
    Ok(all)
}

/// A key (or prefix) of a listing made with `encoding-type=url`. S3 encodes
/// a space as `+` (form encoding) and moto as `%20`; both decode here. A
/// key that is not UTF-8 once decoded keeps its replacement characters,
/// which the key rules then refuse by name.
pub(crate) fn url_decode(encoded: &str) -> String {
    let spaced = encoded.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// Lists every key under `prefix`, sending each page. With `shallow`, lists
/// one level (`delimiter=/`) and returns the sub-prefixes found. `None`
/// when listing failed (the error was sent) or the receiver is gone.
async fn list_prefix(client: &aws_sdk_s3::Client, source: &S3Url, prefix: &str, shallow: bool, tx: &Pages) -> Option<Vec<String>> {
    let mut pages = client
        .list_objects_v2()
        .bucket(&source.bucket)
        .prefix(prefix)
        .encoding_type(aws_sdk_s3::types::EncodingType::Url)
        .set_delimiter(shallow.then(|| "/".to_string()))
        .into_paginator()
        .page_size(1000)
        .send();
    let mut dirs = Vec::new();
    while let Some(page) = pages.next().await {
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                let _ = tx.send(Err(ApiFailure::from_sdk(&e).to_error(&format!("listing {source}")))).await;
                return None;
            }
        };
        let reserved = format!("{}{RESERVED_DIR}", source.prefix);
        dirs.extend(page.common_prefixes().iter().filter_map(|p| p.prefix().map(url_decode)).filter(|d| *d != reserved));
        let objects = page
            .contents()
            .iter()
            .filter_map(|o| {
                Some(RemoteObject {
                    key: url_decode(o.key()?),
                    etag: o.e_tag().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                })
            })
            .filter(|o| !o.key.starts_with(&reserved))
            .collect();
        tx.send(Ok(objects)).await.ok()?;
    }
    Some(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_keys_are_url_decoded_as_s3_and_moto_encode_them() {
        assert_eq!(url_decode("app/a+b%2Bc.php"), "app/a b+c.php");
        assert_eq!(url_decode("app/a%20b"), "app/a b");
        assert_eq!(url_decode("app/evil%01name"), "app/evil\u{1}name");
        assert_eq!(url_decode("app/caf%C3%A9"), "app/café");
    }
}
