//! KEEP-ASSETS: a page of either release finds its assets on every node
//! while a rolling deploy runs (`--keep-assets GLOB`).
//!
//! Behind a load balancer a `--batch` deploy serves two releases at once:
//! a page from an upgraded node asks for `/build/app-3f9c.js`, which an old
//! node lacks, and a page from an old node asks upgraded nodes for assets
//! that left with the old release. Rails keeps previous compiled assets
//! for the same reason. Here, the files of the live release that match a
//! glob and that the new release does not have are hard-linked into the
//! new release before it goes live, never over a file it has. Only what
//! the live release itself published is carried: assets it kept from the
//! release before it are not, so old assets last one deploy, not forever.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::keypath::RelPath;
use crate::safe_fs::DestDir;
use crate::state::Placed;

use super::shared::Shared;

/// The `--keep-assets` globs (`*` and `?` stay within a path component,
/// `**` crosses them, `[...]` a set).
#[derive(Debug, Clone, Default)]
pub struct KeepAssets {
    specs: Vec<String>,
    patterns: Vec<glob::Pattern>,
}

impl KeepAssets {
    /// Parses the globs, relative to a release's root.
    pub fn parse(specs: &[String]) -> Result<KeepAssets> {
        let mut patterns = Vec::with_capacity(specs.len());
        for spec in specs {
            let bad = |why: &str| Error::Config(format!("--keep-assets {spec:?}: {why}"));
            if spec.is_empty() || spec.starts_with('/') || spec.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Err(bad("a glob relative to the release, without `.`, `..` or empty components (e.g. public/build/**)"));
            }
            patterns.push(glob::Pattern::new(spec).map_err(|e| bad(&e.to_string()))?);
        }
        Ok(KeepAssets { specs: specs.to_vec(), patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    fn matches(&self, path: &str) -> bool {
        let options = glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: false };
        self.patterns.iter().any(|p| p.matches_with(path, options))
    }

    /// Refuses a glob that reaches into a shared path, or covers one:
    /// what is shared is never a release's to carry.
    pub(crate) fn check(&self, shared: &[Shared]) -> Result<()> {
        let under = |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|rest| rest.starts_with('/'));
        for spec in &self.specs {
            // The glob's literal start, and the directory it names.
            let literal = spec.split(['*', '?', '[']).next().unwrap_or_default();
            let dir = literal.rsplit_once('/').map_or("", |(d, _)| d);
            for s in shared {
                let path = s.path.as_str();
                if under(literal.trim_end_matches('/'), path) || (!dir.is_empty() && under(path, dir)) {
                    return Err(Error::Config(format!(
                        "--keep-assets {spec:?} and {} {path} overlap: a path is either shared or kept",
                        s.flag()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Hard-links into `new` the files `live` published (its state records)
/// that match `keep`, that no shared path covers, and that `new` does not
/// have. The paths linked.
pub(super) fn carry(keep: &KeepAssets, live: &DestDir, published: &HashMap<RelPath, Placed>, new: &DestDir) -> Result<Vec<RelPath>> {
    let mut carried = Vec::new();
    let mut paths: Vec<&RelPath> = published.keys().filter(|p| keep.matches(p.as_str())).collect();
    paths.sort();
    for path in paths {
        match new.stat(path) {
            Ok(None) => {}
            // The new release has it (or something else is in the way).
            Ok(Some(_)) | Err(_) => continue,
        }
        match new.link_from(live, path) {
            Ok(()) => carried.push(path.clone()),
            // A file the live release no longer has whole (drift): not carried.
            Err(e) => tracing::warn!(path = %path, error = %e, "could not keep an asset of the live release"),
        }
    }
    Ok(carried)
}
