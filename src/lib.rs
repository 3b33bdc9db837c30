//! fleetsync: keep every instance of an Auto Scaling Group on the same
//! codebase, pulled from S3.
//!
//! Both binaries are thin wrappers over this library. The agent's pull is
//! a pipeline whose steps each have a module:
//!
//! - [`list`]: ListObjectsV2, streamed page by page;
//! - [`plan`]: each key validated ([`keypath`]) and diffed against the
//!   [`state`] store and the disk;
//! - [`fetch`]: concurrent, verified downloads into a staging directory;
//! - [`switch`]: atomic renames into place, deletions;
//! - [`report`]: the summary and JSON the bastion reads;
//!
//! run by [`pull`] under the [`node_lock`]. In release mode, [`release`]
//! builds each release beside the live one and switches `current`, from
//! the [`store`] (a published source) or from a listing.
//!
//! The [`store`] is the concept both sides share: releases as immutable,
//! content-addressed snapshots (manifests, packs, blobs) and the pointers
//! to them. [`publish`] writes it, [`prune`] sweeps it, and for the bastion
//! [`fleet_lock`] keeps two deploys of one group apart.

pub mod aws_query;
pub mod config_file;
pub mod duration;
mod error;
mod fetch;
pub mod fleet_lock;
mod keypath;
pub mod lifecycle;
mod list;
pub mod logging;
pub mod man;
pub mod node_lock;
pub mod owner;
mod plan;
pub mod priority;
pub mod progress;
pub mod prune;
pub mod publish;
pub mod pull;
pub mod release;
pub mod report;
mod safe_fs;
pub mod source;
mod state;
pub mod store;
mod switch;

pub use error::{exit, Error, Result};
pub use keypath::{map_key, Entry, RelPath};
pub use node_lock::IfBusy;
pub use owner::Owner;
pub use progress::Observer;
pub use pull::{pull, PullOptions};
pub use release::{pull_release, ReleaseOptions};
pub use report::{PullReport, PullStatus};
pub use source::{ClientOptions, S3Url};

/// The version both binaries print and every agent report carries: the
/// package version and the git commit it was built from (see `build.rs`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FLEETSYNC_COMMIT"), ")");
