//! `/etc/fleetsync/agent.toml`: the node's standing orders (source, DEST,
//! mode, ...), so that the boot unit runs `fleetsync-agent pull` and the
//! bastion's remote command stays short. Keys are the long flag names; a
//! flag overrides the file. The file is `--config FILE` (or
//! `FLEETSYNC_AGENT_CONFIG`), else `/etc/fleetsync/agent.toml` when it exists.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default file.
pub const DEFAULT_FILE: &str = "/etc/fleetsync/agent.toml";

/// How DEST is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// DEST/releases/ID and an atomic DEST/current (recommended).
    Releases,
    /// DEST itself is the tree, file by file.
    InPlace,
}

/// The file's keys, every one optional; unknown keys are an error so that
/// a typo does not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    pub source: Option<String>,
    pub dest: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub mode: Option<Mode>,
    pub keep: Option<usize>,
    pub after_switch: Option<String>,
    pub rollback_on_failure: Option<bool>,
    pub concurrency: Option<usize>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
}

/// Reads the config: `explicit` must exist; the default file may not.
pub fn load(explicit: Option<&Path>) -> anyhow::Result<AgentConfig> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_FILE).is_file() => PathBuf::from(DEFAULT_FILE),
        None => return Ok(AgentConfig::default()),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        fleetsync::Error::Config(format!("cannot read the config file {}: {e} (check --config / FLEETSYNC_AGENT_CONFIG)", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|s| format!(" at line {}", text[..s.start].lines().count().max(1))).unwrap_or_default();
        fleetsync::Error::Config(format!(
            "{}{at}: {} (keys are the long flag names, e.g. state-dir = \"/var/lib/fleetsync\")",
            path.display(),
            e.message().replace('\n', " ")
        ))
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_keys_and_refuses_others() {
        let c: AgentConfig = toml::from_str(
            "source = 's3://code/app'\ndest = '/var/www/app'\nmode = 'releases'\nkeep = 3\nafter-switch = 'systemctl reload php-fpm'\nrollback-on-failure = true",
        )
        .unwrap();
        assert_eq!(c.mode, Some(Mode::Releases));
        assert_eq!(c.keep, Some(3));
        assert!(toml::from_str::<AgentConfig>("mode = 'blue-green'").is_err());
        assert!(toml::from_str::<AgentConfig>("dst = '/x'").is_err());
    }
}
