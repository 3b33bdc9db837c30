//! The SSH transport: the system OpenSSH client, so the user's ssh_config,
//! ProxyJump, agent and known_hosts work as usual. The bastion does the
//! fan-out itself: `--batch` nodes at a time.

use std::time::{Duration, Instant};

use super::{address, AgentCall, Fleet};
use crate::collect::{last_line, NodeResult, Outcome};
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
    /// How long one node's agent may run before ssh is killed.
    pub timeout: Duration,
}

/// Runs the agent on `nodes`, `--batch` at a time, in order.
pub(super) async fn run(ssh: &Ssh, fleet: &Fleet<'_>, nodes: &[Node]) -> Vec<NodeResult> {
    use futures::StreamExt as _;
    futures::stream::iter(nodes).map(|node| run_one(ssh, fleet, node)).buffered(fleet.batch_size(nodes.len())).collect().await
}

async fn run_one(ssh: &Ssh, fleet: &Fleet<'_>, node: &Node) -> NodeResult {
    if let Some(why) = fleet.stop_reason() {
        return fleet.not_attempted(node, why);
    }
    let Some(addr) = address(node, fleet.address) else {
        return fleet.failed(node, "the node has no address of the kind chosen with --address".into());
    };
    fleet.progress.started(node, &addr);
    let outcome = ssh.run(&addr, &fleet.call).await;
    fleet.finish(node, outcome)
}

impl Ssh {
    /// Runs `call` on the node at `address` and waits for it.
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
        // The agent stops when its stdin closes: a non-interactive session
        // has no terminal, so sshd sends it no SIGHUP when ssh goes away
        // (a timeout here, Ctrl-C, a lost bastion), but it does close the
        // session's stdin, which this process holds open until the end.
        let call = AgentCall { exit_with_stdin: true, ..call.clone() };
        cmd.arg("--").arg(address).arg(call.command_line());
        // Dropping the future (timeout) kills ssh, which ends the remote
        // session; the agent is safe to stop at any point.
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        cmd.kill_on_drop(true);
        let run = async {
            let mut child = cmd.spawn()?;
            let _stdin = child.stdin.take();
            child.wait_with_output().await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                // 255 is ssh's own failure; without a report the agent never ran.
                let unreached = (out.status.code() == Some(255) && out.stdout.is_empty())
                    .then(|| format!("ssh to {address} failed: {}", last_line(&stderr)));
                Outcome {
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr,
                    exit_code: out.status.code(),
                    elapsed: start.elapsed(),
                    unreached,
                }
            }
            Ok(Err(e)) => Outcome {
                unreached: Some(format!("could not run ssh: {e} (install the OpenSSH client)")),
                elapsed: start.elapsed(),
                ..Outcome::default()
            },
            Err(_) => Outcome {
                unreached: Some(format!("timed out after {} s (--timeout); ssh was stopped", self.timeout.as_secs())),
                elapsed: start.elapsed(),
                ..Outcome::default()
            },
        }
    }
}
