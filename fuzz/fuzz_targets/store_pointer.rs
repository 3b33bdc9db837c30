//! The release store's pointers (`latest.json`, `deployed/GROUP.json`) as
//! S3 returns them: parsing never panics, and a release id the agent
//! accepts is one safe directory name.
#![no_main]

use fleetsync::release::check_release_id;
use fleetsync::store::pointer::{Deployed, Latest};
use libfuzzer_sys::fuzz_target;

fn safe(id: &str) {
    if check_release_id(id).is_ok() {
        assert!(!id.is_empty() && !id.starts_with(['.', '-']) && !id.contains(['/', '\0', '\\']), "{id:?}");
        assert_eq!(std::path::Path::new(id).components().count(), 1);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<Latest>(data) {
        safe(&p.release);
    }
    if let Ok(d) = serde_json::from_slice::<Deployed>(data) {
        safe(&d.release);
        safe(&d.for_boot().release);
    }
});
