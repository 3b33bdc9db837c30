//! TRIGGER: runs the agent on each node, over SSH (the system OpenSSH
//! client, so the user's ssh_config, ProxyJump, agent and known_hosts work
//! as usual). SSM Run Command is issue 3's next transport.

use std::time::{Duration, Instant};

use crate::discover::Node;

/// How to reach nodes over SSH.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub user: Option<String>,
    /// `ssh -F FILE`.
    pub config: Option<String>,
    /// `ssh -o KEY=VALUE`, passed through.
    pub options: Vec<String>,
    /// Accept and remember unknown host keys (`StrictHostKeyChecking=accept-new`)
    /// instead of refusing them.
    pub accept_new_host_keys: bool,
    pub connect_timeout: Duration,
}

/// What the agent on a node is asked to do.
#[derive(Debug, Clone)]
pub struct AgentCall {
    pub source: String,
    pub dest: String,
    pub state_dir: Option<String>,
}

impl AgentCall {
    /// The command line sent to the node's shell. Every argument is quoted,
    /// so no string the user typed can become a second command.
    pub fn command_line(&self) -> String {
        let mut words = vec!["fleetsync-agent", "pull", self.source.as_str(), "--dest", self.dest.as_str()];
        if let Some(s) = &self.state_dir {
            words.extend(["--state-dir", s.as_str()]);
        }
        words.push("--json");
        shlex::try_join(words).expect("arguments contain no NUL (clap refuses them)")
    }
}

/// What running the agent on one node gave.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    /// The remote command's exit status; 255 is ssh's own failure.
    pub exit_code: Option<i32>,
    pub elapsed: Duration,
}

impl Ssh {
    /// Runs `call` on `node` at `address` and waits for it.
    pub async fn run(&self, address: &str, call: &AgentCall) -> Outcome {
        let start = Instant::now();
        let mut cmd = tokio::process::Command::new("ssh");
        if let Some(cfg) = &self.config {
            cmd.arg("-F").arg(cfg);
        }
        cmd.args(["-o", "BatchMode=yes"]);
        cmd.arg("-o").arg(format!("ConnectTimeout={}", self.connect_timeout.as_secs().max(1)));
        if self.accept_new_host_keys {
            cmd.args(["-o", "StrictHostKeyChecking=accept-new"]);
        }
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        if let Some(u) = &self.user {
            cmd.arg("-l").arg(u);
        }
        cmd.arg("--").arg(address).arg(call.command_line());
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        match cmd.output().await {
            Ok(out) => Outcome {
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                exit_code: out.status.code(),
                elapsed: start.elapsed(),
            },
            Err(e) => Outcome {
                stdout: String::new(),
                stderr: format!("could not run ssh: {e} (install the OpenSSH client)"),
                exit_code: None,
                elapsed: start.elapsed(),
            },
        }
    }
}

/// The address to reach `node` at, by the user's choice.
pub fn address(node: &Node, choice: AddressChoice) -> Option<String> {
    match choice {
        AddressChoice::PrivateIp => node.private_ip.clone(),
        AddressChoice::PublicIp => node.public_ip.clone(),
        AddressChoice::PrivateDns => node.private_dns.clone(),
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AddressChoice {
    PrivateIp,
    PublicIp,
    PrivateDns,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_arguments_stay_one_word_each() {
        let call = AgentCall {
            source: "s3://b/a b'; rm -rf / #".into(),
            dest: "/srv/$(reboot)/`id`\nx".into(),
            state_dir: Some("/var/lib/fs \"q\"".into()),
        };
        let line = call.command_line();
        let words = shlex::split(&line).unwrap();
        assert_eq!(
            words,
            [
                "fleetsync-agent",
                "pull",
                "s3://b/a b'; rm -rf / #",
                "--dest",
                "/srv/$(reboot)/`id`\nx",
                "--state-dir",
                "/var/lib/fs \"q\"",
                "--json"
            ]
        );
    }
}
