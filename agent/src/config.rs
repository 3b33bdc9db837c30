//! `/etc/fleetsync/agent.toml`: the node's standing orders (source, DEST,
//! mode, ...), so that the boot unit runs `fleetsync-agent pull` and the
//! bastion's remote command stays short. Keys are the long flag names; a
//! flag overrides the file. The file is `--config FILE` (or
//! `FLEETSYNC_AGENT_CONFIG`), else `/etc/fleetsync/agent.toml` when it exists.

use std::path::PathBuf;

use serde::Deserialize;

/// The agent's config file.
pub const FILE: fleetsync::config_file::ConfigFile<'static> = fleetsync::config_file::ConfigFile {
    default: "/etc/fleetsync/agent.toml",
    env: "FLEETSYNC_AGENT_CONFIG",
    example: "state-dir = \"/var/lib/fleetsync\"",
};

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
    /// The Auto Scaling Group the node belongs to (release mode follows
    /// the release deployed to it).
    pub group: Option<String>,
    pub before_switch: Option<String>,
    pub after_switch: Option<String>,
    /// How long a hook may run: `90`, `90s`, `10m`.
    pub hook_timeout: Option<fleetsync::duration::Seconds>,
    pub rollback_on_failure: Option<bool>,
    /// Asked after each switch: the release must answer it (`--health-url`).
    pub health_url: Option<String>,
    pub health_timeout: Option<fleetsync::duration::Seconds>,
    pub concurrency: Option<usize>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    /// Prometheus textfile for node_exporter (see `metrics`).
    pub metrics_file: Option<PathBuf>,
    /// USER[:GROUP] owning what is placed in DEST.
    pub owner: Option<String>,
    /// Release mode: paths that outlive a release, `PATH` or `PATH=TARGET`
    /// (`--shared`, which adds to these).
    pub shared: Option<Vec<String>>,
    /// Release mode: files that outlive a release, `PATH` or `PATH=TARGET`
    /// (`--shared-file`, which adds to these).
    pub shared_files: Option<Vec<String>>,
    /// Release mode: globs of the live release's assets carried into the
    /// next (`--keep-assets`, which adds to these).
    pub keep_assets: Option<Vec<String>>,
    /// Release mode: how long a full drift check is trusted (`--verify-every`).
    pub verify_every: Option<fleetsync::duration::Seconds>,
    /// `low` (default), `idle` or `normal`: the pull's CPU and I/O priority.
    pub priority: Option<fleetsync::priority::Priority>,
    /// Threads for downloads, decompression and hashing (default: one per core).
    pub threads: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> fleetsync::Result<AgentConfig> {
        FILE.parse(text, std::path::Path::new("agent.toml"))
    }

    #[test]
    fn reads_the_documented_keys_and_refuses_others() {
        let c = parse(
            "source = 's3://code/app'\ndest = '/var/www/app'\nmode = 'releases'\nkeep = 3\nafter-switch = 'systemctl reload php-fpm'\nrollback-on-failure = true\nbefore-switch = 'php artisan config:cache'\nhook-timeout = '5m'\nshared = ['storage', 'public/uploads=/mnt/efs/uploads']",
        )
        .unwrap();
        assert_eq!(c.mode, Some(Mode::Releases));
        assert_eq!(c.keep, Some(3));
        assert_eq!(c.hook_timeout.map(|t| t.0.as_secs()), Some(300));
        assert_eq!(c.shared.as_deref(), Some(&["storage".to_string(), "public/uploads=/mnt/efs/uploads".to_string()][..]));
        assert!(parse("mode = 'blue-green'").is_err());
        let e = parse("dst = '/x'").unwrap_err().to_string();
        assert!(e.starts_with("agent.toml at line 1:") && !e.contains('\n'), "{e}");
    }
}
