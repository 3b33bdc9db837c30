//! How a pull tells its caller what is happening while it runs.
//!
//! The library never draws: the agent binary turns these calls into an
//! indicatif bar on a TTY or plain lines in a log. Calls come from many
//! download tasks at once, hence `Send + Sync` and `&self`.

/// Receives progress from a running pull. Every method has a no-op default.
pub trait Observer: Send + Sync {
    /// `files` more files were listed (running total is the caller's).
    fn listed(&self, _files: u64) {}
    /// One more file will be downloaded, of `bytes`.
    fn planned(&self, _bytes: u64) {}
    /// The listing is complete and valid; files now switch into place.
    fn listing_done(&self, _files: u64) {}
    /// `bytes` more arrived.
    fn downloaded(&self, _bytes: u64) {}
    /// A file is now in place.
    fn placed(&self) {}
    /// A file failed.
    fn failed(&self, _key: &str, _error: &str) {}
}

/// An observer that ignores everything (tests, library users who don't care).
pub struct Quiet;

impl Observer for Quiet {}
