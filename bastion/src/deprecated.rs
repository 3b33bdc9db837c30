//! Old spellings that still work for one release, each with a line on
//! stderr that names the new one, so that a CI script keeps deploying
//! while it tells its owner what to change: `--asg` (now `--group`, as the
//! agent and the template name it), the store's URL as an argument (now
//! `--source`, as every command takes it), and in fleetsync.toml `asg`
//! and `releases = true` (now `group` and `mode = "releases"`, as
//! agent.toml says them).

use std::ffi::OsString;

/// One line on stderr: `old` still works, `new` is the spelling to use.
pub(crate) fn warn(old: &str, new: &str) {
    eprintln!("fleetsync: {old} is deprecated, use {new} (the old spelling goes in the next release)");
}

/// The store's URL: `flag` (`--source`), or the one given the old way, as
/// an argument (`old` says where), with a line. Clap lets only one be
/// given.
pub(crate) fn source(flag: Option<String>, argument: Option<String>, old: &str) -> Option<String> {
    match argument {
        Some(given) => {
            warn(old, "--source");
            Some(given)
        }
        None => flag,
    }
}

/// The command line with `--asg` spelled `--group`. Only whole words
/// before a `--` are flags: a value that looks like one is given as
/// `--flag=VALUE`, which this leaves alone.
pub(crate) fn args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut warned = false;
    let mut flags = true;
    args.into_iter()
        .map(|arg| {
            let text = arg.to_str().unwrap_or_default();
            if text == "--" {
                flags = false;
            }
            let value = text.strip_prefix("--asg").filter(|v| flags && (v.is_empty() || v.starts_with('=')));
            let Some(new) = value.map(|v| OsString::from(format!("--group{v}"))) else {
                return arg;
            };
            if !std::mem::replace(&mut warned, true) {
                warn("--asg", "--group");
            }
            new
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn asg_becomes_group_until_a_double_dash() {
        let got = super::args(["fleetsync", "sync", "--asg", "web", "--asg=x", "--asgard", "--", "--asg"].map(Into::into));
        let want: Vec<std::ffi::OsString> =
            ["fleetsync", "sync", "--group", "web", "--group=x", "--asgard", "--", "--asg"].map(Into::into).to_vec();
        assert_eq!(got, want);
    }
}
