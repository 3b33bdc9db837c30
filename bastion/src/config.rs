//! `fleetsync.toml`: the flags of a deploy kept in a file, so that a CI
//! step is `fleetsync sync`. Keys are the long flag names (`max-errors`,
//! `ssh-option` as `ssh-options = [...]`); a flag on the command line
//! overrides the file. The file is `--config FILE` (or `FLEETSYNC_CONFIG`),
//! else `./fleetsync.toml` when it exists.

use serde::Deserialize;

use crate::trigger::{AddressChoice, Via};
use crate::values::{Limit, Seconds};

/// How the nodes keep DEST (agent.toml's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Releases,
    InPlace,
}

/// The file's keys; every one optional. Unknown keys are an error, so a
/// typo does not silently deploy with a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// The Auto Scaling Group, as agent.toml names it.
    pub group: Option<String>,
    /// Deprecated: `group` (see `upgrade`).
    asg: Option<String>,
    pub source: Option<String>,
    pub dest: Option<String>,
    pub state_dir: Option<String>,
    pub via: Option<Via>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub batch: Option<Limit>,
    pub max_errors: Option<Limit>,
    pub canary: Option<usize>,
    pub timeout: Option<Seconds>,
    pub ssm_document: Option<String>,
    pub ssm_delivery_timeout: Option<Seconds>,
    pub lock: Option<String>,
    pub lock_wait: Option<Seconds>,
    pub lock_lease: Option<Seconds>,
    pub address: Option<AddressChoice>,
    pub ssh_user: Option<String>,
    pub ssh_config: Option<String>,
    #[serde(alias = "ssh-option")]
    pub ssh_options: Option<Vec<String>>,
    pub ssh_accept_new_host_keys: Option<bool>,
    /// Deprecated: `mode = "releases"` (see `upgrade`).
    releases: Option<bool>,
    /// `releases` or `in-place`, as agent.toml says it.
    pub mode: Option<Mode>,
    pub keep: Option<usize>,
    pub after_switch: Option<String>,
    pub health_url: Option<String>,
    pub health_timeout: Option<fleetsync::duration::Seconds>,
    pub rollback_on_failure: Option<bool>,
    pub bake: Option<Seconds>,
    /// `--alarm`, repeatable: `alarms = ["web-5xx"]` (`alarm` too).
    #[serde(alias = "alarm")]
    pub alarms: Option<Vec<String>>,
    /// `publish --shared`, repeatable: `shared = ["storage"]`.
    pub shared: Option<Vec<String>>,
    /// `publish --shared-file`, repeatable: `shared-files = [".env"]`.
    pub shared_files: Option<Vec<String>>,
}

impl FileConfig {
    /// The deprecated keys' values under their new names, with a line on
    /// stderr for each (a new key wins over its old spelling).
    pub fn upgrade(mut self) -> FileConfig {
        if let Some(group) = self.asg.take() {
            crate::deprecated::warn("`asg` in fleetsync.toml", "`group`");
            self.group = self.group.or(Some(group));
        }
        if let Some(releases) = self.releases.take() {
            crate::deprecated::warn("`releases = true|false` in fleetsync.toml", "`mode = \"releases\"|\"in-place\"`");
            self.mode = self.mode.or(Some(if releases { Mode::Releases } else { Mode::InPlace }));
        }
        self
    }
}

/// The bastion's config file, looked for in the working directory.
pub const FILE: fleetsync::config_file::ConfigFile<'static> =
    fleetsync::config_file::ConfigFile { default: "fleetsync.toml", env: "FLEETSYNC_CONFIG", example: "max-errors = 2" };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_value_type_and_refuses_unknown_keys() {
        let parse = |text: &str| FILE.parse::<FileConfig>(text, std::path::Path::new("fleetsync.toml"));
        let c = parse(
            "group = 'web'\nsource = 's3://b/app'\nvia = 'ssh'\nbatch = '25%'\nmax-errors = 2\nlock-wait = '5m'\naddress = 'private-dns'\nssh-options = ['Port=2222']",
        )
        .unwrap();
        assert_eq!(c.group.as_deref(), Some("web"));
        assert_eq!(c.batch, Some(Limit::Percent(25)));
        assert_eq!(c.max_errors, Some(Limit::Count(2)));
        assert_eq!(c.lock_wait, Some(Seconds(std::time::Duration::from_secs(300))));
        assert!(matches!(c.via, Some(Via::Ssh)));
        assert!(parse("max_errors = 2").is_err(), "a misspelt key is refused");
        assert!(parse("batch = '150%'").is_err());
    }

    #[test]
    fn old_keys_still_work_under_their_new_names() {
        let parse = |text: &str| FILE.parse::<FileConfig>(text, std::path::Path::new("fleetsync.toml")).unwrap().upgrade();
        let c = parse("asg = 'web'\nreleases = true");
        assert_eq!((c.group.as_deref(), c.mode), (Some("web"), Some(Mode::Releases)));
        let c = parse("asg = 'old'\ngroup = 'new'\nreleases = true\nmode = 'in-place'");
        assert_eq!((c.group.as_deref(), c.mode), (Some("new"), Some(Mode::InPlace)), "the new key wins");
    }
}
