//! A release manifest as the network delivers it (decompressed): parsing
//! never panics, and whatever parses names only safe paths, in order, with
//! symlinks that stay inside the release.
#![no_main]

use fleetsync::store::manifest::{check_symlink_target, Entry, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse_stream(data, "fuzz") {
        let mut last: Option<&str> = None;
        for e in &m.entries {
            let p = e.path().as_str();
            assert!(!p.is_empty() && !p.starts_with('/') && !p.split('/').any(|c| c.is_empty() || c == "." || c == ".."), "{p:?}");
            assert!(last.is_none_or(|l| l < p), "sorted and unique: {last:?} {p:?}");
            last = Some(p);
            if let Entry::Symlink { path, target } = e {
                assert!(check_symlink_target(path, target).is_ok());
            }
        }
    }
});
