//! Config files (`fleetsync.toml` for the bastion, `/etc/fleetsync/agent.toml`
//! for the agent): the one reader both binaries use, so that a file is
//! found, read and refused the same way whichever command reads it. Each
//! binary owns its own keys (a serde struct); this module owns the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Where a binary's config file lives and how its errors explain it.
pub struct ConfigFile<'a> {
    /// Read when it exists and no file was named.
    pub default: &'a str,
    /// The variable that names a file, for the error message.
    pub env: &'a str,
    /// A key = value line to show in parse errors.
    pub example: &'a str,
}

impl ConfigFile<'_> {
    /// Reads the config: `explicit` (from `--config` or the variable) must
    /// exist; the default file may not, which gives `T::default()`.
    pub fn load<T: DeserializeOwned + Default>(&self, explicit: Option<&Path>) -> Result<T> {
        let path = match explicit {
            Some(p) => p,
            None if Path::new(self.default).is_file() => Path::new(self.default),
            None => return Ok(T::default()),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read the config file {}: {e} (check --config / {})", path.display(), self.env)))?;
        self.parse(&text, path)
    }

    /// Parses `text` read from `origin`. An error is one line: toml's own
    /// message spans lines (with a source excerpt).
    pub fn parse<T: DeserializeOwned>(&self, text: &str, origin: &Path) -> Result<T> {
        toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| format!(" at line {}", text[..s.start].lines().count().max(1))).unwrap_or_default();
            Error::Config(format!(
                "{}{at}: {} (keys are the long flag names, e.g. {})",
                origin.display(),
                e.message().replace('\n', " "),
                self.example
            ))
        })
    }
}
