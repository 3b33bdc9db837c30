//! A release's manifest: every path in the release with its size, mode,
//! SHA-256 and where its bytes are. Written once by `publish`, read by the
//! agent, which verifies every file against it.
//!
//! The format is JSON Lines compressed with zstd as a whole: a header line,
//! then one line per entry, sorted by path (so two manifests diff in one
//! pass, and a path appears once):
//!
//! ```text
//! {"fleetsync_manifest":1,"id":"r42","created_at_ms":..,"publisher":"ci@runner","files":2,"bytes":9,"tree":"<sha256>","packs":["<sha256>"]}
//! {"p":"app/index.php","s":5,"m":"644","h":"<sha256>","k":0,"o":0,"l":5,"z":0}     a file in pack 0 at offset 0, 5 bytes stored raw
//! {"p":"media/big.mp4","s":4,"m":"644","h":"<sha256>","b":1,"l":4,"z":0}           a file stored as blobs/<sha256>
//! {"p":"public/storage","t":"../storage/public"}                                   a symlink
//! {"p":"storage/cache","d":1}                                                      an empty directory
//! ```
//!
//! It comes from the network, so parsing trusts nothing: every path goes
//! through the same key rules as a listed key ([`map_key`]), a symlink's
//! target must be relative and stay inside the release, paths must be
//! strictly sorted and never both a file and a directory, a line longer
//! than [`MAX_LINE`], more than [`MAX_ENTRIES`] entries or more than
//! [`MAX_NAME_BYTES`] of paths and targets are refused before they are held
//! in memory, and the header's counts and tree digest must match the
//! entries.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};

use serde::{Deserialize, Serialize};

use super::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::keypath::{map_key, Entry as KeyEntry, RelPath};

/// The newest manifest format this agent reads. Format 2 adds the shared
/// paths a release declares ([`SharedPaths`]) and group-writable
/// directories ([`Entry::WritableDir`]); a publish writes it only for a
/// release that has either, so older agents (which read format 1 alone)
/// refuse such a release, naming the upgrade, rather than place its content
/// over what must outlive it or without its modes. Every other release
/// stays format 1.
pub const FORMAT: u32 = 2;
/// The format of a manifest that declares no shared paths.
const FORMAT_PLAIN: u32 = 1;
/// Most shared paths a release may declare (a Magento site shares five):
/// each is checked against every other on every pull that lays one out.
pub const MAX_SHARED: usize = 64;
/// Longest line accepted: a path and a target of at most 4,096 bytes each,
/// JSON escapes and the other fields.
pub const MAX_LINE: usize = 64 * 1024;
/// Most entries accepted (a hostile manifest cannot make the agent hold
/// more than this many entries' worth of memory, about 150 bytes each).
pub const MAX_ENTRIES: usize = 2_000_000;
/// Most bytes of paths and symlink targets accepted, all entries together:
/// the part of an entry's memory its line decides. Long, near-identical
/// paths compress to a few bytes a line, so the count of entries alone
/// would let a 60 MB manifest expand to gigabytes. A million files with
/// 128-byte paths hold 128 MiB.
pub const MAX_NAME_BYTES: usize = 256 << 20;
/// zstd level for manifests: they are hashes and paths, so little changes
/// between levels except the time taken.
const LEVEL: i32 = 3;

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    #[serde(rename = "fleetsync_manifest")]
    pub format: u32,
    pub id: String,
    pub created_at_ms: u64,
    /// user@host of the publisher.
    pub publisher: String,
    /// Regular files in the release.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The release's content, whoever published it (see [`tree_digest`]):
    /// two publishes of identical trees have the same tree digest.
    pub tree: Digest,
    /// The packs the entries' `k` indexes name.
    pub packs: Vec<Digest>,
    /// Which files keep the group write bit ([`modes_digest`]); absent when
    /// none does, and in manifests from before the bit was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modes: Option<Digest>,
    /// Paths every node keeps outside its releases (format 2).
    #[serde(default, skip_serializing_if = "SharedPaths::is_empty")]
    pub shared: SharedPaths,
}

/// The paths a release declares shared (`fleetsync publish --shared`,
/// `--shared-file`): part of the application's layout, so they travel with
/// the build and a fleet needs no per-node setting. A node lays them out as
/// if its agent.toml named them; its own setting for the same path (a
/// TARGET such as an EFS mount) wins. Relative paths only: a TARGET is the
/// node's to choose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPaths {
    /// Directories (`storage`, `public/uploads`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<String>,
    /// Files (`.env`, `wp-config.php`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

impl SharedPaths {
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.files.is_empty()
    }

    /// Each path, and whether it is a file.
    pub fn iter(&self) -> impl Iterator<Item = (&str, bool)> {
        self.dirs.iter().map(|p| (p.as_str(), false)).chain(self.files.iter().map(|p| (p.as_str(), true)))
    }
}

/// One path of the release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File(FileEntry),
    Symlink {
        path: RelPath,
        target: String,
    },
    /// An empty directory (directories with content are implied).
    Dir {
        path: RelPath,
    },
    /// A directory, empty or not, that keeps the group write bit (a
    /// `storage/` the application's group writes into): made, and given
    /// the bit. Format 2.
    WritableDir {
        path: RelPath,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: RelPath,
    pub size: u64,
    /// 0o644 or 0o755, with the group write bit when the build had it
    /// ([`file_mode`]).
    pub mode: u32,
    pub hash: Digest,
    pub at: Location,
}

/// Where a file's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// In `packs[pack]`, `len` bytes from `offset`, zstd-compressed on its
    /// own when `compressed`.
    Pack { pack: u32, offset: u64, len: u64, compressed: bool },
    /// The object `blobs/<hash>`, as is.
    Blob { len: u64 },
}

impl Entry {
    pub fn path(&self) -> &RelPath {
        match self {
            Entry::File(f) => &f.path,
            Entry::Symlink { path, .. } | Entry::Dir { path } | Entry::WritableDir { path } => path,
        }
    }

    /// Its path when it is a directory.
    pub fn dir_path(&self) -> Option<&str> {
        match self {
            Entry::Dir { path } | Entry::WritableDir { path } => Some(path.as_str()),
            _ => None,
        }
    }
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: Header,
    /// Sorted by path.
    pub entries: Vec<Entry>,
}

/// One line as it is on the wire: every field optional, checked by
/// [`Line::into_entry`].
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    /// Borrowed from the line when it has no escapes (every field that
    /// is text): a hundred thousand lines are read before a deploy's switch.
    #[serde(borrow)]
    p: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<u64>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    m: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    h: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    z: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<u8>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    t: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<u8>,
}

impl<'a> Line<'a> {
    fn of(entry: &'a Entry) -> Line<'a> {
        match entry {
            Entry::File(f) => {
                let mut l = Line {
                    p: f.path.as_str().into(),
                    s: Some(f.size),
                    m: Some(format!("{:o}", f.mode).into()),
                    h: Some(f.hash),
                    ..Line::default()
                };
                match f.at {
                    Location::Pack { pack, offset, len, compressed } => {
                        (l.k, l.o, l.l, l.z) = (Some(pack), Some(offset), Some(len), Some(compressed as u8));
                    }
                    Location::Blob { len } => (l.b, l.l, l.z) = (Some(1), Some(len), Some(0)),
                }
                l
            }
            Entry::Symlink { path, target } => Line { p: path.as_str().into(), t: Some(target.as_str().into()), ..Line::default() },
            Entry::Dir { path } => Line { p: path.as_str().into(), d: Some(1), ..Line::default() },
            Entry::WritableDir { path } => Line { p: path.as_str().into(), d: Some(2), ..Line::default() },
        }
    }

    fn into_entry(self, packs: usize) -> std::result::Result<Entry, String> {
        let path = || match map_key(&self.p, "") {
            Ok(Some(KeyEntry::File(p))) => Ok(p),
            Ok(_) => Err("an empty path".to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Some(target) = &self.t {
            if self.s.is_some() || self.h.is_some() || self.d.is_some() {
                return Err("a symlink with file or directory fields".into());
            }
            let path = path()?;
            check_symlink_target(&path, target)?;
            return Ok(Entry::Symlink { path, target: target.to_string() });
        }
        if let Some(d) = self.d {
            if self.s.is_some() || self.h.is_some() {
                return Err("a directory with file fields".into());
            }
            return match d {
                1 => Ok(Entry::Dir { path: path()? }),
                2 => Ok(Entry::WritableDir { path: path()? }),
                _ => Err(format!("a directory of kind {d}")),
            };
        }
        let (Some(size), Some(mode), Some(hash), Some(len)) = (self.s, self.m.as_deref(), self.h, self.l) else {
            return Err("a file without its size, mode, hash or stored length".into());
        };
        let mode = u32::from_str_radix(mode, 8).map_err(|_| format!("mode {mode:?} is not octal"))?;
        let at = match (self.b, self.k, self.o, self.z) {
            (Some(1), None, None, Some(0) | None) => {
                if len != size {
                    return Err("a blob whose stored length is not its size".into());
                }
                Location::Blob { len }
            }
            (None, Some(pack), Some(offset), Some(z @ (0 | 1))) => {
                if pack as usize >= packs {
                    return Err(format!("pack {pack} of {packs}"));
                }
                // A packed file is small, and compressed only when that made
                // it smaller: so a hostile entry cannot make a node hold
                // more than this much for one file.
                if size >= super::pack::BLOB_THRESHOLD || len > size {
                    return Err(format!(
                        "a packed file of {size} bytes stored in {len}: packs hold files under {} bytes, never grown",
                        super::pack::BLOB_THRESHOLD
                    ));
                }
                if z == 0 && len != size {
                    return Err("a file stored raw whose stored length is not its size".into());
                }
                offset.checked_add(len).ok_or("an offset past the end")?;
                Location::Pack { pack, offset, len, compressed: z == 1 }
            }
            _ => return Err("a file that is neither in a pack nor a blob".into()),
        };
        Ok(Entry::File(FileEntry { path: path()?, size, mode: file_mode(mode), hash, at }))
    }
}

/// The mode a file of the build keeps in a release: executable or not,
/// and writable by its group or not (a `storage/` an application's group
/// writes), nothing else. Never writable by others: any local user could
/// change the site's code.
pub fn file_mode(mode: u32) -> u32 {
    let base = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
    base | (mode & GROUP_WRITE)
}

/// The group write bit, which [`tree_digest`] leaves out: agents before it
/// was kept read it as 0o644 or 0o755, and must still find the digest.
/// [`modes_digest`] covers it instead.
const GROUP_WRITE: u32 = 0o020;

/// The digest of which files and directories keep the group write bit,
/// or `None` when none does. Beside [`tree_digest`], which leaves the bit out, it makes a
/// build that only changes the bit another content for `publish` (a new
/// release, not "unchanged"); agents before it ignore the header field.
pub fn modes_digest(entries: &[Entry]) -> Option<Digest> {
    let mut h = Hasher::new();
    let mut any = false;
    for e in entries {
        match e {
            Entry::File(f) if f.mode & GROUP_WRITE != 0 => h.update(format!("W\0{}\n", f.path).as_bytes()),
            Entry::WritableDir { path } => h.update(format!("G\0{path}\n").as_bytes()),
            _ => continue,
        }
        any = true;
    }
    any.then(|| h.finish())
}

/// Checks that a symlink at `path` pointing at `target` stays inside the
/// release, whatever else the release holds: the target is relative, its
/// `..` components come first (they climb through the link's own parent
/// directories, which are real directories), and there are no more of them
/// than the link is deep. Capistrano's `public/storage ->
/// ../storage/app/public` passes; `/etc`, `../../x` from one level down, and
/// `a/../../x` (whose `..` could climb out through a symlink `a`) do not.
pub fn check_symlink_target(path: &RelPath, target: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| Err(format!("symlink {path} -> {target:?}: {why}; only relative links that stay inside the release are kept"));
    if target.is_empty() || target.len() > 4096 || target.contains('\0') {
        return bad("an empty, over-long or NUL-bearing target");
    }
    if target.starts_with('/') {
        return bad("an absolute target");
    }
    let depth = path.components().count() - 1;
    let mut climbing = true;
    let mut ups = 0;
    for c in target.split('/') {
        match c {
            ".." if climbing => ups += 1,
            ".." => return bad("a `..` after a name (it could climb out through another link)"),
            "" | "." => {}
            _ => climbing = false,
        }
    }
    if ups > depth {
        return bad("more `..` than the link is deep");
    }
    if climbing {
        return bad("a target that is a parent directory of the link");
    }
    Ok(())
}

/// The digest of a release's content: each entry's path, kind, mode, size
/// and hash (or target), in path order. Not where the bytes are: two
/// publishes of one tree have the same tree digest however they packed it.
pub fn tree_digest(entries: &[Entry]) -> Digest {
    // The lines go through one buffer, hashed a batch at a time: a deploy
    // waits for this over every entry of the release.
    let mut h = Hasher::new();
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH + 8192);
    for (i, e) in entries.iter().enumerate() {
        match e {
            Entry::File(f) => {
                buf.extend_from_slice(b"F\0");
                buf.extend_from_slice(f.path.as_str().as_bytes());
                write!(buf, "\0{:o}\0{}\0", f.mode & !GROUP_WRITE, f.size).expect("writing to a Vec");
                buf.extend_from_slice(&f.hash.hex());
            }
            Entry::Symlink { path, target } => write!(buf, "L\0{path}\0{target}").expect("writing to a Vec"),
            Entry::Dir { path } => write!(buf, "D\0{path}").expect("writing to a Vec"),
            // A directory's group write bit is [`modes_digest`]'s, as a
            // file's is; an empty one is a directory of the tree as
            // `Dir` is.
            Entry::WritableDir { path } => {
                if first_below(entries, i).is_some() {
                    continue;
                }
                write!(buf, "D\0{path}").expect("writing to a Vec")
            }
        }
        buf.push(b'\n');
        if buf.len() >= BATCH {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    h.finish()
}

/// Bytes of [`tree_digest`]'s text hashed at once.
const BATCH: usize = 64 * 1024;

impl Manifest {
    /// A manifest for `entries` (sorted here), with the header's counts and
    /// tree digest filled in.
    pub fn new(id: String, publisher: String, packs: Vec<Digest>, mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        let files = entries.iter().filter_map(|e| if let Entry::File(f) = e { Some(f.size) } else { None });
        let (count, bytes) = files.fold((0, 0), |(n, b), s| (n + 1, b + s));
        let header = Header {
            format: FORMAT_PLAIN, // set below
            id,
            created_at_ms: super::now_ms(),
            publisher,
            files: count,
            bytes,
            tree: tree_digest(&entries),
            packs,
            modes: modes_digest(&entries),
            shared: SharedPaths::default(),
        };
        let mut m = Manifest { header, entries };
        m.header.format = m.format_needed();
        m
    }

    /// Declares `shared` ([`SharedPaths`]).
    pub fn with_shared(mut self, shared: SharedPaths) -> Manifest {
        self.header.shared = shared;
        self.header.format = self.format_needed();
        self
    }

    /// Format 2 for what format 1 cannot say (see [`FORMAT`]), else 1.
    fn format_needed(&self) -> u32 {
        let writable = self.entries.iter().any(|e| matches!(e, Entry::WritableDir { .. }));
        if writable || !self.header.shared.is_empty() {
            FORMAT
        } else {
            FORMAT_PLAIN
        }
    }

    /// The compressed bytes to upload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), LEVEL).expect("a zstd encoder for a Vec");
        let header = serde_json::to_vec(&self.header).expect("a header serializes");
        enc.write_all(&header).and_then(|()| enc.write_all(b"\n")).expect("writing to a Vec");
        for e in &self.entries {
            let line = serde_json::to_vec(&Line::of(e)).expect("an entry serializes");
            enc.write_all(&line).and_then(|()| enc.write_all(b"\n")).expect("writing to a Vec");
        }
        enc.finish().expect("writing to a Vec")
    }

    /// Parses compressed manifest bytes (`what` names them in errors).
    pub fn parse(compressed: &[u8], what: &str) -> Result<Manifest> {
        let decoder = zstd::stream::Decoder::new(compressed).map_err(|e| bad(what, &format!("not zstd: {e}")))?;
        Manifest::parse_stream(decoder, what)
    }

    /// The header of a manifest from the start of its compressed bytes.
    pub fn parse_header(compressed_start: &[u8], what: &str) -> Result<Header> {
        let decoder = zstd::stream::Decoder::new(compressed_start).map_err(|e| bad(what, &format!("not zstd: {e}")))?;
        let mut lines = Lines { r: BufReader::with_capacity(64 * 1024, decoder), buf: Vec::new() };
        // A cut frame is an error only if the first line was not whole.
        let first = match lines.next() {
            Ok(Some(line)) => line,
            Ok(None) => return Err(bad(what, "it is empty")),
            Err(e) => return Err(bad(what, e.as_str())),
        };
        parse_header(first).map_err(|e| bad(what, &e))
    }

    /// Parses a decompressed stream, line by line (the whole text is never
    /// held in memory).
    pub fn parse_stream(r: impl Read, what: &str) -> Result<Manifest> {
        Self::parse_bounded(r, what, MAX_NAME_BYTES)
    }

    /// [`Manifest::parse_stream`] with a bound on the bytes of paths and
    /// targets (tests lower it).
    fn parse_bounded(r: impl Read, what: &str, max_names: usize) -> Result<Manifest> {
        let mut lines = Lines { r: BufReader::with_capacity(256 * 1024, r), buf: Vec::new() };
        let first = lines.next().map_err(|e| bad(what, &e))?.ok_or_else(|| bad(what, "it is empty"))?;
        let header = parse_header(first).map_err(|e| bad(what, &e))?;
        let packs = header.packs.len();
        // This thread decompresses and splits lines into batches; parsers
        // on threads of their own turn them into entries (a deploy waits for
        // a hundred thousand). At most two batches wait, and the bytes of
        // names parsed so far are counted as they are parsed, so a hostile
        // manifest is refused before it is held.
        let names = std::sync::atomic::AtomicUsize::new(0);
        // Set by a parser that refused a line: reading stops there.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (to_parse, batches) = std::sync::mpsc::sync_channel::<Batch>(2);
        let (to_join, parsed) = std::sync::mpsc::channel();
        let (names, stop) = (&names, &stop);
        let entries = std::thread::scope(move |scope| -> Result<Vec<Entry>> {
            // Owned by the parsers alone: were they all gone (a panic), a
            // send would fail instead of waiting for them forever.
            let batches = std::sync::Arc::new(std::sync::Mutex::new(batches));
            for _ in 0..PARSERS {
                let (to_join, batches) = (to_join.clone(), batches.clone());
                scope.spawn(move || loop {
                    let Ok(batch) = batches.lock().unwrap_or_else(|p| p.into_inner()).recv() else { return };
                    let parsed = batch.parse(packs, names, max_names);
                    stop.fetch_or(parsed.is_err(), std::sync::atomic::Ordering::Relaxed);
                    if to_join.send((batch.first_line, parsed)).is_err() {
                        return;
                    }
                });
            }
            drop((to_join, batches));
            let (mut count, mut batch, mut refused) = (0usize, Batch::starting_at(2), None);
            loop {
                let line = match lines.next() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(e) => {
                        refused = Some(bad(what, &e));
                        break;
                    }
                };
                count += 1;
                if count > MAX_ENTRIES {
                    refused = Some(bad(what, &format!("it has more than {MAX_ENTRIES} entries")));
                    break;
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break; // the parser that refused a line says why
                }
                batch.push(line);
                if batch.text.len() >= BATCH_BYTES {
                    let next = Batch::starting_at(batch.first_line + batch.ends.len());
                    if to_parse.send(std::mem::replace(&mut batch, next)).is_err() {
                        break; // no parser left: the scope's join says why
                    }
                }
            }
            if !batch.ends.is_empty() {
                let _ = to_parse.send(batch);
            }
            drop(to_parse);
            // The first line refused is named, as when lines were parsed
            // one after the other: batches in order, each checked inside
            // and at its join with the one before; this thread's own
            // refusal is of a line after all of them.
            let mut parts: Vec<(usize, Parsed)> = parsed.iter().collect();
            parts.sort_unstable_by_key(|(first, _)| *first);
            let mut entries: Vec<Entry> = Vec::with_capacity(count);
            for (first, part) in parts {
                let part = part.map_err(|(n, e)| bad(what, &if n == 0 { e } else { format!("line {n}: {e}") }))?;
                if let (Some(prev), Some(next)) = (entries.last(), part.first()) {
                    if prev.path() >= next.path() {
                        return Err(bad(what, &format!("line {first}: {}", out_of_order(next.path()))));
                    }
                }
                entries.extend(part);
            }
            refused.map_or(Ok(entries), Err)
        })?;
        let m = Manifest { header, entries };
        // The header's sums and tree digest (a hash over every entry) on a
        // thread of their own beside the check of what is below what: both
        // read every entry, and a deploy waits for them.
        let (header, below) = std::thread::scope(|scope| {
            let header = scope.spawn(|| m.check_header());
            let below = nothing_below_leaves(&m.entries);
            (header.join().expect("checking a header does not panic"), below)
        });
        below.and(header).map_err(|e| bad(what, &e))?;
        Ok(m)
    }

    fn check_header(&self) -> std::result::Result<(), String> {
        let (files, bytes) = self
            .entries
            .iter()
            .filter_map(|e| if let Entry::File(f) = e { Some(f.size) } else { None })
            .fold((0u64, 0u64), |(n, b), s| (n + 1, b.saturating_add(s)));
        if (files, bytes) != (self.header.files, self.header.bytes) {
            return Err(format!(
                "its header says {} files and {} bytes, its entries {files} and {bytes}",
                self.header.files, self.header.bytes
            ));
        }
        if tree_digest(&self.entries) != self.header.tree {
            return Err("its tree digest does not match its entries".into());
        }
        if modes_digest(&self.entries) != self.header.modes {
            return Err("its modes digest does not match its entries".into());
        }
        if self.header.format < self.format_needed() {
            return Err(format!(
                "it is format {} but needs format {} (shared paths or group-writable directories)",
                self.header.format, FORMAT
            ));
        }
        Ok(())
    }

    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        self.entries.iter().filter_map(|e| if let Entry::File(f) = e { Some(f) } else { None })
    }
}

/// Nothing may be below a file, a symlink or an empty directory (see
/// [`first_below`]).
fn nothing_below_leaves(entries: &[Entry]) -> std::result::Result<(), String> {
    for (i, e) in entries.iter().enumerate() {
        if matches!(e, Entry::WritableDir { .. }) {
            continue;
        }
        if let Some(child) = first_below(entries, i) {
            return Err(match e {
                Entry::Dir { path } => format!("{path} is listed as an empty directory but has entries below it ({child})"),
                _ => format!("{child} is below {}, which is not a directory", e.path()),
            });
        }
    }
    Ok(())
}

/// The first of the sorted `entries` below entry `i`, if any. What is below
/// `a` (every path starting `a/`) starts where `a/` would be, and every
/// entry between `a` and it starts with `a` (`a-b`, `a.c` sort first):
/// when the next entry does not, nothing is below `a`. Else one binary
/// search.
fn first_below(entries: &[Entry], i: usize) -> Option<&RelPath> {
    let path = entries[i].path().as_str();
    if entries.get(i + 1).is_none_or(|next| !next.path().as_str().starts_with(path)) {
        return None;
    }
    let below = format!("{path}/");
    let at = entries.partition_point(|x| x.path().as_str() < below.as_str());
    entries.get(at).map(Entry::path).filter(|c| c.as_str().starts_with(&below))
}

fn parse_header(line: &[u8]) -> std::result::Result<Header, String> {
    // The format first, so a newer manifest is named as such rather than
    // failing on a field this agent does not know.
    #[derive(Deserialize)]
    struct Format {
        fleetsync_manifest: Option<u32>,
    }
    let format: Format = serde_json::from_slice(line).map_err(|e| format!("the header is not JSON: {e}"))?;
    match format.fleetsync_manifest {
        Some(FORMAT_PLAIN..=FORMAT) => {}
        Some(v) => {
            return Err(format!(
                "it is format {v}, this fleetsync reads formats up to {FORMAT}: upgrade it (fleetsync-agent on the nodes, fleetsync where you publish)"
            ))
        }
        None => return Err("its first line is not a fleetsync manifest header".into()),
    }
    let header: Header = serde_json::from_slice(line).map_err(|e| format!("the header: {e}"))?;
    super::check_release_id(&header.id).map_err(|e| e.to_string())?;
    if header.format < FORMAT && !header.shared.is_empty() {
        return Err(format!("it is format {} but needs format {FORMAT} (shared paths)", header.format));
    }
    let count = header.shared.dirs.len() + header.shared.files.len();
    if count > MAX_SHARED {
        return Err(format!("it declares {count} shared paths, more than {MAX_SHARED}"));
    }
    for (path, _) in header.shared.iter() {
        if path.contains('=') || RelPath::from_stored(path).is_none_or(|p| p.as_str() != path) {
            return Err(format!("shared path {path:?} is not a relative path inside the release"));
        }
    }
    Ok(header)
}

fn bad(what: &str, why: &str) -> Error {
    Error::S3(format!("the manifest {what} is not valid: {why}"))
}

/// Why a path that does not sort after the one before it is refused.
fn out_of_order(path: &RelPath) -> String {
    format!("{path} is out of order or repeated")
}

/// Threads that parse a manifest's lines beside the one that reads them.
const PARSERS: usize = 2;
/// Bytes of lines a parser takes at once.
const BATCH_BYTES: usize = 256 * 1024;

/// A batch's entries, or the number of the line that is not one and why
/// (0 when no line is to blame).
type Parsed = std::result::Result<Vec<Entry>, (usize, String)>;

/// Consecutive lines of a manifest, parsed together.
struct Batch {
    /// The number of its first line in the manifest (the header is 1).
    first_line: usize,
    text: Vec<u8>,
    /// Where each line ends in `text`.
    ends: Vec<usize>,
}

impl Batch {
    fn starting_at(first_line: usize) -> Batch {
        Batch { first_line, text: Vec::with_capacity(BATCH_BYTES + MAX_LINE), ends: Vec::new() }
    }

    fn push(&mut self, line: &[u8]) {
        self.text.extend_from_slice(line);
        self.ends.push(self.text.len());
    }

    /// Its entries. Adds the bytes of their names to `names`, and fails
    /// once that passes `max_names`.
    fn parse(&self, packs: usize, names: &std::sync::atomic::AtomicUsize, max_names: usize) -> Parsed {
        let mut entries = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for (i, &end) in self.ends.iter().enumerate() {
            let n = self.first_line + i;
            let raw: Line = serde_json::from_slice(&self.text[start..end]).map_err(|e| (n, e.to_string()))?;
            let entry = raw.into_entry(packs).map_err(|e| (n, e))?;
            if entries.last().is_some_and(|prev: &Entry| prev.path() >= entry.path()) {
                return Err((n, out_of_order(entry.path())));
            }
            let len = entry.path().as_str().len() + if let Entry::Symlink { target, .. } = &entry { target.len() } else { 0 };
            if names.fetch_add(len, std::sync::atomic::Ordering::Relaxed) + len > max_names {
                return Err((0, format!("its paths and targets hold more than {max_names} bytes")));
            }
            entries.push(entry);
            start = end;
        }
        Ok(entries)
    }
}

/// Lines of at most [`MAX_LINE`] bytes, refused before a longer one is
/// buffered.
struct Lines<R> {
    r: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: Read> Lines<R> {
    fn next(&mut self) -> std::result::Result<Option<&[u8]>, String> {
        self.buf.clear();
        loop {
            let chunk = self.r.fill_buf().map_err(|e| format!("reading it failed: {e}"))?;
            if chunk.is_empty() {
                return Ok((!self.buf.is_empty()).then_some(&self.buf[..]));
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if self.buf.len() + i > MAX_LINE {
                        return Err(format!("a line is longer than {MAX_LINE} bytes"));
                    }
                    self.buf.extend_from_slice(&chunk[..i]);
                    self.r.consume(i + 1);
                    return Ok(Some(&self.buf[..]));
                }
                None => {
                    let n = chunk.len();
                    if self.buf.len() + n > MAX_LINE {
                        return Err(format!("a line is longer than {MAX_LINE} bytes"));
                    }
                    self.buf.extend_from_slice(chunk);
                    self.r.consume(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::from_stored(s).unwrap()
    }

    fn file(p: &str, data: &[u8], k: u32, o: u64) -> Entry {
        Entry::File(FileEntry {
            path: rel(p),
            size: data.len() as u64,
            mode: 0o644,
            hash: Digest::of(data),
            at: Location::Pack { pack: k, offset: o, len: data.len() as u64, compressed: false },
        })
    }

    fn sample() -> Manifest {
        Manifest::new(
            "r1".into(),
            "ci@host".into(),
            vec![Digest::of(b"pack")],
            vec![
                file("b/two.php", b"two", 0, 3),
                file("a.php", b"one", 0, 0),
                Entry::Symlink { path: rel("b/link"), target: "../a.php".into() },
                Entry::Dir { path: rel("empty") },
                Entry::File(FileEntry {
                    path: rel("big.bin"),
                    size: 4,
                    mode: 0o755,
                    hash: Digest::of(b"big!"),
                    at: Location::Blob { len: 4 },
                }),
            ],
        )
    }

    #[test]
    fn round_trips_sorted_with_counts_and_tree() {
        let m = sample();
        assert_eq!(m.entries.iter().map(|e| e.path().as_str()).collect::<Vec<_>>(), ["a.php", "b/link", "b/two.php", "big.bin", "empty"]);
        assert_eq!((m.header.files, m.header.bytes), (3, 10));
        let back = Manifest::parse(&m.to_bytes(), "test").unwrap();
        assert_eq!(back, m);
        // The tree digest is about content, not where it is stored.
        let mut moved = m.entries.clone();
        if let Entry::File(f) = &mut moved[0] {
            f.at = Location::Pack { pack: 0, offset: 99, len: 3, compressed: false };
        }
        assert_eq!(tree_digest(&moved), m.header.tree);
    }

    /// A group-writable directory is an entry of its own, with entries
    /// below it or not: its bit changes the modes digest, not the tree
    /// digest (as a file's does), and only format 2 may carry it.
    #[test]
    fn a_group_writable_directory_needs_format_2_and_changes_only_the_modes_digest() {
        let mut entries = sample().entries;
        let plain = Manifest::new("r1".into(), "ci".into(), vec![Digest::of(b"pack")], entries.clone());
        entries.push(Entry::WritableDir { path: rel("b") });
        let m = Manifest::new("r1".into(), "ci".into(), vec![Digest::of(b"pack")], entries);
        assert_eq!((plain.header.format, m.header.format), (1, 2));
        assert_eq!(m.header.tree, plain.header.tree);
        assert_ne!(m.header.modes, plain.header.modes);
        assert_eq!(Manifest::parse(&m.to_bytes(), "test").unwrap(), m, "b/two.php below it is no error");
        // An empty one is a directory of the tree, as an empty `Dir` is.
        let with = |e: Option<Entry>| Manifest::new("r1".into(), "ci".into(), vec![], e.into_iter().collect()).header;
        let (writable, dir, none) =
            (with(Some(Entry::WritableDir { path: rel("logs") })), with(Some(Entry::Dir { path: rel("logs") })), with(None));
        assert_eq!(writable.tree, dir.tree);
        assert_ne!(writable.tree, none.tree);
        assert_ne!(writable.modes, dir.modes);
        // Not empty though `logs-old` sorts between it and what is below.
        let tree_of = |entries: Vec<Entry>| Manifest::new("r1".into(), "ci".into(), vec![Digest::of(b"pack")], entries).header.tree;
        let below = vec![file("logs-old", b"x", 0, 0), file("logs/today", b"y", 0, 1)];
        assert_eq!(tree_of([below.clone(), vec![Entry::WritableDir { path: rel("logs") }]].concat()), tree_of(below));
        let mut text = String::new();
        zstd::stream::Decoder::new(&m.to_bytes()[..]).unwrap().read_to_string(&mut text).unwrap();
        let as_format_1: Vec<String> = text.lines().map(|l| l.replace("\"fleetsync_manifest\":2", "\"fleetsync_manifest\":1")).collect();
        let e = parse_text(&as_format_1.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err();
        assert!(e.contains("it is format 1 but needs format 2"), "{e}");
    }

    /// Format 2 only for a release that declares shared paths: older
    /// agents, which read format 1 alone, refuse it rather than place
    /// content over what must outlive a release; every other release
    /// stays readable by them.
    #[test]
    fn shared_paths_make_format_2_and_a_header_that_disagrees_is_refused() {
        assert_eq!(sample().header.format, 1);
        let shared = SharedPaths { dirs: vec!["storage".into()], files: vec![".env".into()] };
        let m = sample().with_shared(shared.clone());
        assert_eq!(m.header.format, 2);
        let back = Manifest::parse(&m.to_bytes(), "test").unwrap();
        assert_eq!(back.header.shared, shared);
        let mut lines: Vec<String> = {
            let mut text = String::new();
            zstd::stream::Decoder::new(&m.to_bytes()[..]).unwrap().read_to_string(&mut text).unwrap();
            text.lines().map(str::to_string).collect()
        };
        let header = lines[0].clone();
        for (from, to, why) in [
            ("\"fleetsync_manifest\":2", "\"fleetsync_manifest\":1", "it is format 1 but needs format 2"),
            ("\"fleetsync_manifest\":2", "\"fleetsync_manifest\":3", "reads formats up to 2: upgrade it"),
            ("\"storage\"", "\"../up\"", "shared path \"../up\""),
            ("\"storage\"", "\"storage/\"", "shared path \"storage/\""),
        ] {
            assert!(header.contains(from), "{header}");
            lines[0] = header.replace(from, to);
            let e = parse_text(&lines.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err();
            assert!(e.contains(why), "{to}: {e}");
        }
    }

    #[test]
    fn a_manifest_of_many_batches_parses_in_order_and_errors_name_their_line() {
        // 30,000 entries: about twenty batches for the parsers.
        let entries: Vec<Entry> = (0..30_000u64).map(|i| file(&format!("d{}/f{i:05}.php", i % 7), &i.to_le_bytes(), 0, i * 8)).collect();
        let m = Manifest::new("r1".into(), "ci@host".into(), vec![Digest::of(b"pack")], entries);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes, "test").unwrap(), m);
        let mut decoded = String::new();
        zstd::stream::Decoder::new(&bytes[..]).unwrap().read_to_string(&mut decoded).unwrap();
        let lines: Vec<String> = decoded.lines().map(str::to_string).collect();
        // A line that is not an entry, deep in the manifest.
        let mut broken = lines.clone();
        broken[25_001] = "{\"p\":\"x\"".into();
        let e = parse_text(&broken.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err();
        assert!(e.contains("line 25002: "), "{e}");
        // Two entries swapped across batches: the first line found lower
        // than the one before it is named.
        let mut swapped = lines.clone();
        swapped.swap(3, 20_000);
        let e = parse_text(&swapped.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err();
        assert!(e.contains("line 5: ") && e.contains("out of order"), "{e}");
        // Both: the first is named.
        swapped[25_001] = broken[25_001].clone();
        let e = parse_text(&swapped.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err();
        assert!(e.contains("line 5: ") && e.contains("out of order"), "{e}");
    }

    fn text(lines: &[&str]) -> Vec<u8> {
        lines.join("\n").into_bytes()
    }

    fn parse_text(lines: &[&str]) -> std::result::Result<Manifest, String> {
        Manifest::parse_stream(&text(lines)[..], "test").map_err(|e| e.to_string())
    }

    #[test]
    fn hostile_manifests_are_refused_naming_why() {
        let m = sample();
        let header = serde_json::to_string(&m.header).unwrap();
        let h = Digest::of(b"x");
        let cases: Vec<(Vec<String>, &str)> = vec![
            (vec![r#"{"fleetsync_manifest":3,"id":"r1"}"#.into()], "format 3"),
            (vec![header.clone(), format!(r#"{{"p":"../etc/passwd","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#)], "'..'"),
            (vec![header.clone(), r#"{"p":"x","t":"/etc"}"#.into()], "absolute"),
            (vec![header.clone(), r#"{"p":"a/x","t":"../../etc"}"#.into()], "more `..`"),
            (vec![header.clone(), r#"{"p":"x","t":"up/../../etc"}"#.into()], "after a name"),
            (vec![header.clone(), format!(r#"{{"p":"x","s":1,"m":"644","h":"{h}","k":7,"o":0,"l":1,"z":0}}"#)], "pack 7 of 1"),
            (vec![header.clone(), format!(r#"{{"p":"x","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0,"q":1}}"#)], "unknown field"),
            (
                vec![
                    header.clone(),
                    format!(r#"{{"p":"b","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                    format!(r#"{{"p":"a","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                ],
                "out of order",
            ),
            (
                vec![
                    header.clone(),
                    format!(r#"{{"p":"a","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                    format!(r#"{{"p":"a/b","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                ],
                "not a directory",
            ),
            (
                // Siblings between a file and what is below it.
                vec![
                    header.clone(),
                    format!(r#"{{"p":"a","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                    format!(r#"{{"p":"a-b","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                    format!(r#"{{"p":"a.c","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                    format!(r#"{{"p":"a/b","s":1,"m":"644","h":"{h}","k":0,"o":0,"l":1,"z":0}}"#),
                ],
                "a/b is below a, which is not a directory",
            ),
            (vec![header.clone()], "header says 3 files"),
            (vec![header.clone(), "x".repeat(MAX_LINE + 10)], "longer than"),
        ];
        for (lines, needle) in cases {
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            let e = parse_text(&lines).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn the_tree_digest_is_the_published_formula() {
        // Manifests already in stores were published with this text per
        // entry: a faster digest must hash the same bytes.
        let formula = |entries: &[Entry]| {
            let mut h = Hasher::new();
            for e in entries {
                let line = match e {
                    Entry::File(f) => format!("F\0{}\0{:o}\0{}\0{}\n", f.path, f.mode & !GROUP_WRITE, f.size, f.hash),
                    Entry::Symlink { path, target } => format!("L\0{path}\0{target}\n"),
                    Entry::Dir { path } => format!("D\0{path}\n"),
                    Entry::WritableDir { .. } => unreachable!("not in this test's entries"),
                };
                h.update(line.as_bytes());
            }
            h.finish()
        };
        let at = Location::Pack { pack: 0, offset: 0, len: 1, compressed: false };
        let mut entries: Vec<Entry> = (0..20_000u64)
            .map(|i| match i % 3 {
                0 => Entry::File(FileEntry {
                    path: rel(&format!("d{}/f{i}.php", i % 97)),
                    size: i * 7919,
                    mode: [0o644, 0o755, 0o664][i as usize % 3],
                    hash: Digest::of(&i.to_le_bytes()),
                    at,
                }),
                1 => Entry::Symlink { path: rel(&format!("l{i}")), target: format!("d{}/f{}.php", i % 97, i - 1) },
                _ => Entry::Dir { path: rel(&format!("e{i}")) },
            })
            .collect();
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        assert_eq!(tree_digest(&entries), formula(&entries));
        assert_eq!(tree_digest(&[]), formula(&[]));
    }

    #[test]
    fn symlink_targets_must_stay_inside() {
        let ok = [("public/storage", "../storage/app/public"), ("a/b/c", "../../x"), ("l", "x/y"), ("l", "./x")];
        for (p, t) in ok {
            assert!(check_symlink_target(&rel(p), t).is_ok(), "{p} -> {t}");
        }
        let bad = [("l", "../x"), ("a/l", "../../x"), ("l", "/etc/passwd"), ("a/l", "x/../../y"), ("a/l", ".."), ("l", "")];
        for (p, t) in bad {
            assert!(check_symlink_target(&rel(p), t).is_err(), "{p} -> {t}");
        }
    }

    #[test]
    fn a_million_entries_parse_line_by_line() {
        // Generated straight into the zstd stream, as publish would.
        let hash = Digest::of(b"same");
        let entries: Vec<Entry> = (0..1_000_000)
            .map(|i| {
                Entry::File(FileEntry {
                    path: rel(&format!("d{:03}/f{i:07}.php", i % 1000)),
                    size: 4,
                    mode: 0o644,
                    hash,
                    at: Location::Pack { pack: 0, offset: i * 4, len: 4, compressed: false },
                })
            })
            .collect();
        let m = Manifest::new("big".into(), "ci".into(), vec![hash], entries);
        let bytes = m.to_bytes();
        drop(m);
        let back = Manifest::parse(&bytes, "big").unwrap();
        assert_eq!(back.header.files, 1_000_000);
        assert_eq!(back.entries.len(), 1_000_000);
        drop(back);
        // The same manifest, refused before its paths (24 MB of them) are
        // held, when they are more than the bound allows.
        let e = Manifest::parse_bounded(zstd::stream::Decoder::new(&*bytes).unwrap(), "big", 1 << 20).unwrap_err().to_string();
        assert!(e.contains("paths and targets hold more than 1048576 bytes"), "{e}");
    }
}
