//! Property tests of the key-to-path mapping, the one place that decides
//! where an object key may land: over generated keys built from the
//! characters that make paths dangerous, no accepted key maps outside DEST,
//! and no two keys map to one file.

use std::collections::HashMap;
use std::path::{Component, Path};

use fleetsync::{map_key, Entry};
use proptest::prelude::*;

/// A key component: often ordinary, often hostile.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{1,8}",
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("a\\..\\b".to_string()),
        Just("x\0y".to_string()),
        Just("\u{202e}rtl".to_string()),
        Just("tab\tname".to_string()),
        Just(".fleetsync.tmp".to_string()),
        Just(".fleetsync-tmp-1".to_string()),
        "[a-z./\\\\]{1,6}",
        "\\PC{1,4}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    (proptest::collection::vec(component(), 1..6), any::<bool>(), any::<bool>()).prop_map(|(parts, leading, trailing)| {
        let mut k = parts.join("/");
        if leading {
            k.insert(0, '/');
        }
        if trailing {
            k.push('/');
        }
        format!("app/{k}")
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn an_accepted_key_never_leaves_dest(k in key()) {
        if let Ok(Some(Entry::File(p) | Entry::Dir(p))) = map_key(&k, "app/") {
            let joined = Path::new("/srv/dest").join(p.as_str());
            prop_assert!(joined.starts_with("/srv/dest"), "{k:?} -> {}", joined.display());
            for c in Path::new(p.as_str()).components() {
                prop_assert!(matches!(c, Component::Normal(_)), "{k:?} has a {c:?} component");
            }
            prop_assert!(!p.as_str().contains(['\0', '\\']), "{k:?}");
            prop_assert!(!p.as_str().chars().any(char::is_control), "{k:?}");
        }
    }

    #[test]
    fn no_two_keys_map_to_one_file(keys in proptest::collection::vec(key(), 1..40)) {
        let mut seen: HashMap<String, &str> = HashMap::new();
        for k in &keys {
            if let Ok(Some(Entry::File(p))) = map_key(k, "app/") {
                if let Some(other) = seen.insert(p.as_str().to_string(), k) {
                    prop_assert_eq!(other, k.as_str(), "two keys land on {}", p.as_str());
                }
            }
        }
    }
}
