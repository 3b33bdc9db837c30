//! A fleet lock object as S3 returns it (anyone with write access to the
//! bucket can write one): parsing and describing it never panics.
#![no_main]

use fleetsync::fleet_lock::LockInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = serde_json::from_slice::<LockInfo>(data) {
        let _ = info.describe();
        let _ = info.expired();
    }
});
