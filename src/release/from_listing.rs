//! A release from a plain prefix (written by `aws s3 sync`, another CI job,
//! anything but `fleetsync publish`): the prefix is listed once, and the
//! release is named by `--release-id` or by a hash of its keys and ETags,
//! so identical content is one release.
//!
//! A plain prefix can change while a node builds from it. Every GET carries
//! the listed ETag (`If-Match`), and in release mode an object replaced
//! (412) or deleted (404) during the build fails the build: nothing goes
//! live, the live release stays, and the next pull lists again. (In-place
//! mode fetches the new version instead; a release must be one listing.)

use std::collections::HashMap;
use std::path::Path;

use super::{Ctx, ReleaseInfo, Step};
use crate::error::{Error, Result};
use crate::keypath::{map_key, Entry, RelPath};
use crate::list::{self, RemoteObject};
use crate::pull::{self, PullOptions};
use crate::report::PullReport;
use crate::safe_fs::DestDir;
use crate::state::{Placed, StateStore};

/// The release id of a listing: a hash of its sorted (key, ETag) pairs,
/// keys relative to the prefix.
pub(crate) fn content_id(objects: &[RemoteObject], prefix: &str) -> String {
    use md5::{Digest, Md5};
    let mut pairs: Vec<(&str, &str)> = objects.iter().map(|o| (o.key.strip_prefix(prefix).unwrap_or(&o.key), o.etag.as_str())).collect();
    pairs.sort_unstable();
    let mut h = Md5::new();
    for (k, e) in pairs {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(e.as_bytes());
        h.update([b'\n']);
    }
    format!("c{}", &hex::encode(h.finalize())[..15])
}

/// Lists the prefix and makes its release live (or says it is).
pub(super) async fn run(ctx: &Ctx<'_>) -> Result<Step> {
    if !ctx.opts.shared.is_empty() || !ctx.opts.keep_assets.is_empty() {
        return Err(Error::Config(format!(
            "--shared and --keep-assets need a release store: publish the build with `fleetsync publish DIR --source {}` (a plain prefix's releases support neither)",
            ctx.opts.pull.source
        )));
    }
    let p = &ctx.opts.pull;
    let listing = list::collect(ctx.client.clone(), p.source.clone()).await?;
    let content = content_id(&listing, &p.source.prefix);
    let id = ctx.opts.release_id.clone().unwrap_or_else(|| content.clone());
    ctx.check_content(&id, &content)?;
    // "Empty" counts files: S3-compatible servers may still list a
    // directory marker for the prefix itself.
    let files = listing.iter().filter(|o| matches!(map_key(&o.key, &p.source.prefix), Ok(Some(Entry::File(_))))).count();
    ctx.check_not_empty(files as u64)?;

    if ctx.current.as_deref() == Some(id.as_str()) {
        // Live already: the pull of the live tree repairs drift.
        let live = PullOptions { dest: ctx.layout.dir(&id), ..p.clone() };
        let report =
            pull::place(&live, ctx.releases.build(&id)?, ctx.client.clone(), Some(listing), ctx.observer.clone(), ctx.t0, true).await?;
        // A registry rebuilt after a crash does not know it: the pull just
        // checked every file against the listing.
        let register = ctx.registry.get(&id).is_none().then(|| ReleaseInfo {
            id: id.clone(),
            content,
            created_at_ms: crate::store::now_ms(),
            files: report.counts.downloaded + report.counts.unchanged,
            rolled_back: false,
            manifest: None,
        });
        return Ok(Step::Live { report, id, register });
    }
    if let Some(info) = ctx.registry.get(&id).cloned() {
        // An older complete release: live again, nothing to download.
        let mut report = PullReport::new(p.source.to_string(), p.dest.display().to_string(), false);
        report.counts.listed = files as u64;
        report.counts.unchanged = files as u64;
        return Ok(Step::Existing { report, info });
    }
    let (report, linked) = build(ctx, &id, listing).await?;
    if report.exit_code != crate::exit::OK {
        return Ok(Step::Incomplete { report, id, linked });
    }
    let files = report.counts.downloaded + report.counts.unchanged;
    let info = ReleaseInfo { id, content, created_at_ms: crate::store::now_ms(), files, rolled_back: false, manifest: None };
    Ok(Step::Built { report, info, linked, copied: 0 })
}

/// Builds release `id` beside the live one: hard links for what did not
/// change, the pull for the rest. Returns the pull's report and how many
/// files were linked.
async fn build(ctx: &Ctx<'_>, id: &str, listing: Vec<RemoteObject>) -> Result<(PullReport, u64)> {
    let p = &ctx.opts.pull;
    let dir = ctx.layout.dir(id);
    let mut dst = ctx.releases.build(id)?;
    let mut linked = 0;
    if let Some(src) = ctx.current.as_deref().map(|cur| ctx.releases.read(cur)).transpose()?.flatten() {
        let wanted: HashMap<String, String> = listing
            .iter()
            .filter_map(|o| match map_key(&o.key, &p.source.prefix) {
                Ok(Some(Entry::File(path))) => Some((path.as_str().to_string(), o.etag.clone())),
                _ => None,
            })
            .collect();
        let (state_dir, from) = (p.state_dir.clone(), ctx.layout.dir(ctx.current.as_deref().expect("a source release is the live one")));
        let to = dir.clone();
        let seeded = tokio::task::spawn_blocking(move || seed(&state_dir, &from, &src, &to, &dst, &wanted).map(|n| (n, dst)));
        (linked, dst) = seeded.await.expect("seeding does not panic")?;
    }
    let target = PullOptions { dest: dir, ..p.clone() };
    match pull::place(&target, dst, ctx.client.clone(), Some(listing), ctx.observer.clone(), ctx.t0, true).await {
        Ok(report) => Ok((report, linked)),
        Err(e) => {
            // The pull failed as a whole (a hostile key, say): the partial
            // release goes, the live one was never touched.
            ctx.releases.remove(id)?;
            ctx.layout.forget(id);
            Err(e)
        }
    }
}

/// Hard-links into `dst` (release `to`) every file of `src` (release
/// `from`) whose ETag is still wanted, and records them in `to`'s state
/// store as placed.
fn seed(state_dir: &Path, from: &Path, src: &DestDir, to: &Path, dst: &DestDir, wanted: &HashMap<String, String>) -> Result<u64> {
    let placed = StateStore::load_read_only(state_dir, from)?;
    let mut seeded: HashMap<RelPath, Placed> = HashMap::new();
    for (path, record) in placed {
        if wanted.get(path.as_str()) != Some(&record.etag) {
            continue;
        }
        // A file that cannot be linked (gone, drifted into a directory) is
        // simply downloaded by the pull.
        if dst.link_from(src, &path).is_ok() {
            seeded.insert(path, record);
        }
    }
    let (store, _) = StateStore::open(state_dir, to).map_err(|e| Error::S3(e.to_string()))?;
    store.seed(&seeded)?;
    Ok(seeded.len() as u64)
}
