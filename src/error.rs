//! The library's error type, and the exit code each kind of failure maps to.
//!
//! Exit codes are part of the interface (CI jobs and the bastion branch on
//! them), so they are defined once here and documented in each binary's
//! `--help`.

use std::path::PathBuf;

/// Exit codes shared by `fleetsync-agent` and `fleetsync`.
pub mod exit {
    /// Everything asked for was done.
    pub const OK: i32 = 0;
    /// The run finished but some objects (or nodes) failed; see the report.
    pub const PARTIAL: i32 = 1;
    /// Usage or configuration error: flags, credentials, bucket, endpoint,
    /// permissions on DEST. Nothing was changed.
    pub const CONFIG: i32 = 2;
    /// Busy: another run holds the lock and `--if-busy fail` was given.
    pub const BUSY: i32 = 3;
    /// Stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report it);
    /// locks were released on the way out.
    pub const INTERRUPTED: i32 = 130;
}

/// Everything that can stop a pull as a whole. Per-object failures are not
/// errors of this type: they are counted in the report and the pull goes on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user must change a flag, a credential, a bucket name or a
    /// permission. The message names the thing and, where we know it, the fix.
    #[error("{0}")]
    Config(String),

    /// A key in the source cannot be mapped safely inside DEST. The whole
    /// pull is refused before anything is written.
    #[error("refusing to pull: unsafe key {key:?} in the source ({reason}); rename or delete that object")]
    HostileKey { key: String, reason: String },

    /// A local file-system operation failed; `context` says which path.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// An object the release store should hold is not there: a release id
    /// never published (or pruned). The caller named it: a configuration
    /// error.
    #[error("{0}")]
    NotInStore(String),

    /// An S3 call failed in a way that is not the user's configuration.
    #[error("{0}")]
    S3(String),

    /// Another pull holds the node lock and the caller asked not to wait.
    #[error("busy: another fleetsync-agent pull holds the node lock {}", path.display())]
    Busy { path: PathBuf },
}

impl Error {
    /// The exit code a binary should end with for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::NotInStore(_) => exit::CONFIG,
            Error::Busy { .. } => exit::BUSY,
            Error::HostileKey { .. } | Error::Io { .. } | Error::S3(_) => exit::PARTIAL,
        }
    }

    /// Wraps an I/O error with the operation and path it concerns. Permission
    /// problems and read-only file systems under DEST or the state dir are
    /// configuration errors: the fix is on the user's side and nothing was
    /// changed.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        let context = context.into();
        match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                return Error::Config(format!(
                    "{context}: permission denied (run as a user that may write there, or choose another directory)"
                ))
            }
            std::io::ErrorKind::ReadOnlyFilesystem => {
                return Error::Config(format!("{context}: read-only file system (choose a writable directory)"))
            }
            _ => {}
        }
        Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
