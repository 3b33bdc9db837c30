//! Packs: small files stored together, each compressed on its own, so that
//! a whole pack is one GET and any one file is one ranged GET.
//!
//! A pack is the files' stored bytes end to end, nothing else: the manifest
//! says where each file is (`offset`, `len`) and whether it is compressed,
//! so a pack needs no header. It is named by the SHA-256 of its bytes, and
//! a publish fills its packs in path order from a fixed split, so a publish
//! run again after being killed builds the same packs and finds them
//! already stored.
//!
//! Reading coalesces: the files a pull needs are sorted by pack and offset,
//! and neighbours less than [`GAP`] apart share one ranged GET of at most
//! [`MAX_RANGE`] (Amazon S3 serves one range per GET). A cold pull of a pack
//! is a few large GETs that run in parallel; a 1% change is about one GET
//! per changed file.

use super::Digest;

/// A pack is closed once its files' raw bytes reach this.
pub const PACK_TARGET: u64 = 32 * 1024 * 1024;
/// Files of this size and more are blobs (objects of their own, fetched
/// with parallel ranged GETs), not pack members.
pub const BLOB_THRESHOLD: u64 = 4 * 1024 * 1024;
/// Bytes between two wanted files that one GET reads through rather than
/// making two requests (a request costs more than this on S3).
pub const GAP: u64 = 256 * 1024;
/// Largest coalesced range: a cold pull of a 32 MiB pack is four GETs in
/// parallel, and each is held in memory while it is decoded.
pub const MAX_RANGE: u64 = 8 * 1024 * 1024;
/// zstd level for files: fast to write, and decompression speed hardly
/// depends on it.
pub const LEVEL: i32 = 3;

/// A file's bytes as a pack stores them: zstd-compressed, or as they are
/// when compression would not make them smaller. `true` when compressed.
pub fn encode(data: &[u8]) -> (std::borrow::Cow<'_, [u8]>, bool) {
    match zstd::bulk::compress(data, LEVEL) {
        Ok(z) if z.len() < data.len() => (z.into(), true),
        _ => (data.into(), false),
    }
}

/// A file's bytes back from what a pack stores, checked to be `size`
/// bytes with digest `hash`. An error says what did not match.
pub fn decode(stored: &[u8], compressed: bool, size: u64, hash: &Digest) -> Result<Vec<u8>, String> {
    let data = if compressed {
        // The capacity is the manifest's size: a frame that would inflate
        // past it fails instead of allocating what a hostile pack asks for.
        zstd::bulk::decompress(stored, size as usize).map_err(|e| format!("decompressing failed: {e}"))?
    } else {
        stored.to_vec()
    };
    if data.len() as u64 != size {
        return Err(format!("{} bytes, the manifest says {size}", data.len()));
    }
    if Digest::of(&data) != *hash {
        return Err("its SHA-256 does not match the manifest".into());
    }
    Ok(data)
}

/// Packs being filled, in order: one publish's new small files.
#[derive(Default)]
pub struct PackWriter {
    buf: Vec<u8>,
}

impl PackWriter {
    /// Appends a file's stored bytes; returns their offset.
    pub fn push(&mut self, stored: &[u8]) -> u64 {
        let at = self.buf.len() as u64;
        self.buf.extend_from_slice(stored);
        at
    }

    pub fn finish(self) -> (Digest, Vec<u8>) {
        (Digest::of(&self.buf), self.buf)
    }
}

/// One file a pull needs from a pack: the caller's `index` for it, and
/// where its stored bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub index: usize,
    pub offset: u64,
    pub len: u64,
}

/// One ranged GET: bytes `start..end` of pack `pack`, and the files in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub pack: u32,
    pub start: u64,
    pub end: u64,
    pub items: Vec<Wanted>,
}

/// Coalesces the wanted files into ranged GETs (see the module doc).
pub fn plan(mut wanted: Vec<(u32, Wanted)>) -> Vec<Range> {
    wanted.sort_by_key(|(pack, w)| (*pack, w.offset));
    let mut ranges: Vec<Range> = Vec::new();
    for (pack, w) in wanted {
        let end = w.offset + w.len;
        match ranges.last_mut() {
            Some(r) if r.pack == pack && w.offset <= r.end + GAP && end - r.start <= MAX_RANGE => {
                r.end = r.end.max(end);
                r.items.push(w);
            }
            _ => ranges.push(Range { pack, start: w.offset, end, items: vec![w] }),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(index: usize, offset: u64, len: u64) -> Wanted {
        Wanted { index, offset, len }
    }

    #[test]
    fn neighbours_share_a_range_and_far_or_large_ones_do_not() {
        let r = plan(vec![
            (0, w(2, 1000, 10)),
            (0, w(1, 0, 100)),
            (0, w(3, 1000 + 10 + GAP + 1, 5)),
            (1, w(4, 0, 5)),
            (0, w(5, 2 * MAX_RANGE, MAX_RANGE)),
            (0, w(6, 3 * MAX_RANGE, 1)),
        ]);
        let shape: Vec<(u32, u64, u64, Vec<usize>)> =
            r.iter().map(|r| (r.pack, r.start, r.end, r.items.iter().map(|i| i.index).collect())).collect();
        assert_eq!(
            shape,
            [
                (0, 0, 1010, vec![1, 2]),
                (0, 1010 + GAP + 1, 1010 + GAP + 6, vec![3]),
                (0, 2 * MAX_RANGE, 3 * MAX_RANGE, vec![5]),
                (0, 3 * MAX_RANGE, 3 * MAX_RANGE + 1, vec![6]),
                (1, 0, 5, vec![4]),
            ]
        );
    }

    #[test]
    fn stored_bytes_decode_only_to_what_the_manifest_says() {
        let text = b"<?php echo 'hello'; ".repeat(100);
        let (z, compressed) = encode(&text);
        assert!(compressed && z.len() < text.len());
        let h = Digest::of(&text);
        assert_eq!(decode(&z, true, text.len() as u64, &h).unwrap(), text);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (raw, compressed) = encode(&random);
        assert!(!compressed && raw.len() == random.len());
        // A flipped byte, a wrong size, a bomb larger than the manifest says.
        let mut flipped = z.to_vec();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(decode(&flipped, true, text.len() as u64, &h).is_err());
        assert!(decode(&z, true, text.len() as u64 - 1, &h).is_err());
        let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 3).unwrap();
        assert!(decode(&bomb, true, 100, &h).is_err());
    }
}
