//! The one place that decides where an S3 key may land inside DEST.
//!
//! Object keys are attacker-controlled strings as far as a node is concerned
//! (anyone who can write to the bucket can choose them), so a key becomes a
//! path only through [`map_key`], which accepts a deliberately narrow set:
//! `/`-separated components, each non-empty, not `.` or `..`, at most 255
//! bytes, without NUL, backslash or control characters. Nothing is
//! normalised or rewritten, so the mapping is injective by construction: two
//! different keys can never land on one path.

use std::fmt;

use crate::error::Error;

/// Name of the staging directory at the top of DEST where downloads are
/// written before being renamed into place. Reserved: no key may map onto it.
pub const STAGING_DIR: &str = ".fleetsync.tmp";

/// Prefix of the temporary files written beside their final path. Reserved:
/// no key may have a component starting with it.
pub const TEMP_PREFIX: &str = ".fleetsync-tmp-";

/// Longest file name Linux file systems accept.
const MAX_COMPONENT: usize = 255;
/// PATH_MAX; a longer relative path could not be opened anyway.
const MAX_PATH: usize = 4096;

/// A validated path relative to DEST: `/`-separated, no empty, `.` or `..`
/// components. Only [`map_key`] constructs one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RelPath(String);

impl RelPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, top first.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.split('/')
    }

    /// `(parent components, file name)`.
    pub fn split_parent(&self) -> (Vec<&str>, &str) {
        let mut parts: Vec<&str> = self.components().collect();
        let name = parts.pop().expect("a RelPath has at least one component");
        (parts, name)
    }

    /// Every proper ancestor, nearest last: `a/b/c` gives `a`, `a/b`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(move |(i, _)| &self.0[..i])
    }

    /// Re-validates a path read back from the state store, so a tampered
    /// state file cannot make us delete outside DEST either.
    pub fn from_stored(s: &str) -> Option<RelPath> {
        match map_key(s, "") {
            Ok(Some(Entry::File(p))) => Some(p),
            _ => None,
        }
    }
}

/// Lets sets of paths be probed with the `&str` of an ancestor.
impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a key under the prefix stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file at this path.
    File(RelPath),
    /// A directory marker (a key ending in `/`, as the S3 console creates).
    Dir(RelPath),
}

/// Maps `key` (which must start with `prefix`) to where it lands in DEST.
///
/// `Ok(None)` is the prefix's own directory marker, which stands for DEST
/// itself. An `Err` names the key and why it is refused.
pub fn map_key(key: &str, prefix: &str) -> Result<Option<Entry>, Error> {
    let hostile = |reason: &str| Error::HostileKey { key: key.to_string(), reason: reason.to_string() };
    let rel = key.strip_prefix(prefix).ok_or_else(|| hostile("it is not under the source prefix"))?;
    if rel.is_empty() {
        return Ok(None);
    }
    let (rel, is_dir) = match rel.strip_suffix('/') {
        Some(dir) => (dir, true),
        None => (rel, false),
    };
    if rel.is_empty() {
        return Err(hostile("it is an absolute path"));
    }
    if rel.len() > MAX_PATH {
        return Err(hostile("the path is longer than 4096 bytes"));
    }
    for (i, c) in rel.split('/').enumerate() {
        match c {
            "" if i == 0 => return Err(hostile("it is an absolute path")),
            "" => return Err(hostile("it has an empty path component (//)")),
            "." => return Err(hostile("it has a '.' path component")),
            ".." => return Err(hostile("it has a '..' path component")),
            STAGING_DIR if i == 0 => return Err(hostile("its name is reserved for fleetsync's staging directory")),
            _ if c.starts_with(TEMP_PREFIX) => return Err(hostile("its name is reserved for fleetsync's temporary files")),
            _ => {}
        }
        if c.len() > MAX_COMPONENT {
            return Err(hostile("a path component is longer than 255 bytes"));
        }
        if c.contains('\0') {
            return Err(hostile("it contains a NUL byte"));
        }
        if c.contains('\\') {
            return Err(hostile("it contains a backslash"));
        }
        if c.chars().any(char::is_control) {
            return Err(hostile("it contains a control character"));
        }
    }
    let path = RelPath(rel.to_string());
    Ok(Some(if is_dir { Entry::Dir(path) } else { Entry::File(path) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(key: &str) -> String {
        match map_key(key, "p/").unwrap() {
            Some(Entry::File(p)) => p.to_string(),
            other => panic!("{key}: {other:?}"),
        }
    }

    fn refused(key: &str) -> String {
        match map_key(key, "p/") {
            Err(Error::HostileKey { reason, .. }) => reason,
            other => panic!("{key:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn ordinary_keys_map_verbatim() {
        assert_eq!(file("p/index.php"), "index.php");
        assert_eq!(file("p/a/b c/ünï.txt"), "a/b c/ünï.txt");
        assert_eq!(file("p/..hidden"), "..hidden");
        assert_eq!(file("p/.env"), ".env");
    }

    #[test]
    fn markers_and_the_prefix_itself() {
        assert_eq!(map_key("p/", "p/").unwrap(), None);
        assert!(matches!(map_key("p/assets/", "p/").unwrap(), Some(Entry::Dir(_))));
    }

    #[test]
    fn hostile_keys_are_refused_with_a_reason() {
        assert!(refused("p/../etc/passwd").contains(".."));
        assert!(refused("p/a/../../x").contains(".."));
        assert!(refused("p//etc/passwd").contains("absolute"));
        assert!(refused("p/a//b").contains("empty"));
        assert!(refused("p/./a").contains("'.'"));
        assert!(refused("p/a/.").contains("'.'"));
        assert!(refused("p/a\0b").contains("NUL"));
        assert!(refused("p/a\\..\\b").contains("backslash"));
        assert!(refused("p/a\nb").contains("control"));
        assert!(refused(&format!("p/{}", "x".repeat(256))).contains("255"));
        assert!(refused("p/.fleetsync.tmp/x").contains("reserved"));
        assert!(refused("p/a/.fleetsync-tmp-1-2").contains("reserved"));
        assert!(refused("q/outside").contains("prefix"));
        assert!(refused("p/..").contains(".."));
        assert!(refused("p//").contains("absolute"));
    }

    #[test]
    fn a_component_of_exactly_255_bytes_is_fine() {
        assert_eq!(file(&format!("p/{}", "x".repeat(255))).len(), 255);
    }

    #[test]
    fn ancestors_and_parent() {
        let p = RelPath::from_stored("a/b/c").unwrap();
        assert_eq!(p.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(p.split_parent(), (vec!["a", "b"], "c"));
        assert!(RelPath::from_stored("../x").is_none());
        assert!(RelPath::from_stored("/x").is_none());
    }
}
