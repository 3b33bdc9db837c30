//! A release pointer as S3 returns it: parsing never panics, and a release
//! id the agent accepts is one safe directory name.
#![no_main]

use fleetsync::publish::Pointer;
use fleetsync::release::check_release_id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<Pointer>(data) {
        if check_release_id(&p.release_id).is_ok() {
            let id = p.release_id.as_str();
            assert!(!id.is_empty() && !id.starts_with('.') && !id.contains(['/', '\0', '\\']), "{id:?}");
            assert_eq!(std::path::Path::new(id).components().count(), 1);
        }
    }
});
