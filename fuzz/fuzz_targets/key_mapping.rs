//! Any key, any prefix: mapping never panics, and an accepted key lands
//! inside DEST on plain components only.
#![no_main]

use std::path::{Component, Path};

use fleetsync::{map_key, Entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (&str, &str)| {
    let (prefix, rest) = data;
    let key = format!("{prefix}{rest}");
    if let Ok(Some(Entry::File(p) | Entry::Dir(p))) = map_key(&key, prefix) {
        assert!(!p.as_str().is_empty());
        for c in Path::new(p.as_str()).components() {
            assert!(matches!(c, Component::Normal(_)), "{key:?} -> {c:?}");
        }
        assert!(!p.as_str().contains(['\0', '\\']));
        assert!(Path::new("/dest").join(p.as_str()).starts_with("/dest"));
    }
});
