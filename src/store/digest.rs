//! SHA-256 digests: what the store names content by and verifies it with.
//!
//! aws-lc-rs (already linked through rustls) uses the CPU's SHA extensions:
//! hashing runs at GB/s per core, far ahead of the network and the disk.

use std::fmt;
use std::io::Read;
use std::str::FromStr;

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        let mut h = Hasher::new();
        h.update(data);
        h.finish()
    }

    /// The digest of everything `r` yields.
    pub fn of_reader(mut r: impl Read) -> std::io::Result<Digest> {
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(h.finish()),
                n => h.update(&buf[..n]),
            }
        }
    }
}

/// An incremental SHA-256.
pub struct Hasher(aws_lc_rs::digest::Context);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Digest {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Digest(out)
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Digest {
    /// The 64 hex digits, without allocating: what a manifest's tree digest
    /// hashes once per file.
    pub fn hex(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        hex::encode_to_slice(self.0, &mut out).expect("64 digits for 32 bytes");
        out
    }

    /// Parses 64 lowercase hex digits; `None` for anything else. A table
    /// lookup per digit: a manifest or a node's records hold one digest per
    /// file, a hundred thousand of them read before a deploy's switch.
    pub fn from_hex(s: &[u8]) -> Option<Digest> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        decode(s, &mut out)?;
        Some(Digest(out))
    }

    /// Its first 8 bytes, as a big-endian integer (see
    /// [`Digest::prefix_from_hex`]).
    pub fn prefix(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }

    /// [`Digest::prefix`] from a digest's first 16 hex digits: a cheap
    /// first match before a whole parse.
    pub fn prefix_from_hex(s: &[u8]) -> Option<u64> {
        let mut out = [0u8; 8];
        (s.len() == 16).then_some(())?;
        decode(s, &mut out)?;
        Some(u64::from_be_bytes(out))
    }
}

/// Lowercase hex digits into `out` (twice as many digits as bytes).
fn decode(s: &[u8], out: &mut [u8]) -> Option<()> {
    const fn table() -> [u8; 256] {
        let mut t = [0xff; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    }
    const VALUE: [u8; 256] = table();
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (VALUE[pair[0] as usize], VALUE[pair[1] as usize]);
        if (hi | lo) & 0xf0 != 0 {
            return None;
        }
        *o = hi << 4 | lo;
    }
    Some(())
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.hex()).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Digest, String> {
        Digest::from_hex(s.as_bytes()).ok_or_else(|| format!("{s:?} is not a SHA-256 digest (64 lowercase hex digits)"))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_values_and_hex_round_trips() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_string(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::of_reader(&b"abc"[..]).unwrap(), d);
        assert!("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD".parse::<Digest>().is_err());
        assert!("abc".parse::<Digest>().is_err());
        // Every byte that is not a lowercase hex digit, at either place of
        // a pair.
        for b in (0..=255u8).filter(|b| !b"0123456789abcdef".contains(b)) {
            for at in [0, 1, 63] {
                let mut s = *b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
                s[at] = b;
                assert_eq!(Digest::from_hex(&s), None, "byte {b} at {at}");
            }
        }
        assert_eq!(Digest::from_hex(&d.hex()), Some(d));
        assert_eq!(Digest::prefix_from_hex(&d.hex()[..16]), Some(d.prefix()));
        assert_eq!(d.prefix(), 0xba7816bf8f01cfea);
    }
}
