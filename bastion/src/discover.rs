//! DISCOVER: which instances of the group to sync, and why the others are
//! skipped.
//!
//! DescribeAutoScalingGroups says which instances belong to the group and
//! where they are in their lifecycle; DescribeInstances adds addresses and
//! the EC2 state. A node is a target only when it is InService, Healthy and
//! running: a Pending instance is not ready (issue 3's "new instances" pass
//! catches it later), a Terminating or Standby one is leaving, an Unhealthy
//! one is about to be replaced.

use std::collections::HashMap;

use fleetsync::source::ApiFailure;
use futures::StreamExt as _;
use serde::Serialize;

use crate::api::api_error;

/// The permissions discovery uses, named in its errors.
const NEEDS: &str = "autoscaling:DescribeAutoScalingGroups and ec2:DescribeInstances";

/// One instance of the group, as discovered.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub instance_id: String,
    /// AutoScaling lifecycle state: InService, Pending, Standby, ...
    pub lifecycle: String,
    /// AutoScaling health: Healthy or Unhealthy.
    pub health: String,
    /// EC2 state: running, stopped, ...; "unknown" when EC2 does not list it.
    pub state: String,
    /// Where the instance runs (AutoScaling's view): canaries are spread
    /// across zones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub private_dns: Option<String>,
    /// Why the node is not synced; `None` for targets.
    pub skipped: Option<String>,
}

impl Node {
    pub fn is_target(&self) -> bool {
        self.skipped.is_none()
    }
}

/// Instance IDs per DescribeInstances call: well under the API's limit, so
/// one huge group is several small calls.
const IDS_PER_CALL: usize = 200;
/// DescribeInstances calls in flight at once (a 2,000-instance group is 10).
const CALLS_AT_ONCE: usize = 4;
/// Calls made for IDs EC2 does not show yet, and the first pause between
/// them (doubled each time): about 6 s in all.
const NOT_FOUND_TRIES: u32 = 5;
const NOT_FOUND_PAUSE: std::time::Duration = std::time::Duration::from_millis(400);

/// How often a deploy lists its group's members while it runs, to find
/// instances that left (a scale-in): one DescribeAutoScalingGroups call.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The instances that left the group, or are leaving it, while a deploy
/// runs, by id, with why. A terminated instance's SSM invocation can stay
/// InProgress until its command expires (delivery + execution timeouts,
/// half an hour by default), holding the deploy and its lock that long:
/// the transport fails such a node at once instead. Shared with the
/// background listing of the [`Watch`] that fills it.
#[derive(Clone, Default)]
pub struct Leaving(std::sync::Arc<std::sync::Mutex<Members>>);

/// What the watch knows of the group.
#[derive(Default)]
struct Members {
    /// The last listing: instance -> lifecycle state; `None` before one.
    now: Option<HashMap<String, String>>,
    /// Every instance seen a member (the deploy's first discovery, then each
    /// listing): only those can have left. An instance a later discovery
    /// found after the last listing is not taken for gone.
    seen: std::collections::HashSet<String>,
}

impl Leaving {
    /// Why `instance_id` is no longer a node of the deploy, if it is not:
    /// gone from the group's last listing after it was seen a member, or in
    /// a lifecycle state that ends outside it. `None` before the first
    /// listing.
    pub fn why(&self, instance_id: &str) -> Option<String> {
        let members = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let lifecycle = match members.now.as_ref()?.get(instance_id) {
            None if members.seen.contains(instance_id) => return Some("left the Auto Scaling Group".to_string()),
            None => return None,
            Some(l) => l,
        };
        let leaving = ["Terminating", "Terminated", "Detaching", "Detached"];
        leaving.iter().any(|l| lifecycle.starts_with(l)).then(|| format!("is leaving the Auto Scaling Group (lifecycle {lifecycle})"))
    }
}

/// Lists the group every [`WATCH_EVERY`] while it lives, filling
/// [`Watch::leaving`]; dropping it stops the listing. A listing that fails
/// keeps the last one (the deploy then waits for SSM, as without a watch).
pub struct Watch {
    pub leaving: Leaving,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `asg`'s members; `members` are those discovered.
pub fn watch<'a>(sdk: &aws_types::SdkConfig, asg: &str, members: impl IntoIterator<Item = &'a Node>) -> Watch {
    let leaving = Leaving::default();
    leaving.0.lock().unwrap_or_else(|p| p.into_inner()).seen.extend(members.into_iter().map(|n| n.instance_id.clone()));
    let (autoscaling, asg, shared) = (aws_sdk_autoscaling::Client::new(sdk), asg.to_string(), leaving.clone());
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let listed = autoscaling.describe_auto_scaling_groups().auto_scaling_group_names(&asg).send().await;
            let Ok(out) = listed else { continue };
            let Some(group) = out.auto_scaling_groups().iter().find(|g| g.auto_scaling_group_name() == Some(asg.as_str())) else {
                continue;
            };
            let members: HashMap<String, String> = group
                .instances()
                .iter()
                .filter_map(|m| Some((m.instance_id()?.to_string(), m.lifecycle_state().map_or("", |l| l.as_str()).to_string())))
                .collect();
            let mut known = shared.0.lock().unwrap_or_else(|p| p.into_inner());
            known.seen.extend(members.keys().cloned());
            known.now = Some(members);
        }
    });
    Watch { leaving, task }
}

/// Lists the group's instances, targets first.
pub async fn discover(sdk: &aws_types::SdkConfig, asg: &str) -> anyhow::Result<Vec<Node>> {
    list(sdk, asg, &std::collections::HashSet::new()).await
}

/// The group's instances that are not in `known`: one DescribeAutoScalingGroups,
/// and DescribeInstances only for the new ones (a deploy looking for
/// instances that joined meanwhile need not describe the whole fleet again).
pub async fn joined(sdk: &aws_types::SdkConfig, asg: &str, known: &std::collections::HashSet<String>) -> anyhow::Result<Vec<Node>> {
    list(sdk, asg, known).await
}

async fn list(sdk: &aws_types::SdkConfig, asg: &str, known: &std::collections::HashSet<String>) -> anyhow::Result<Vec<Node>> {
    let autoscaling = aws_sdk_autoscaling::Client::new(sdk);
    let ec2 = crate::ec2::Client::new(sdk);
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();

    let mut members = Vec::new();
    let mut found = false;
    let mut pages = autoscaling.describe_auto_scaling_groups().auto_scaling_group_names(asg).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| api_error("DescribeAutoScalingGroups", &ApiFailure::from_sdk(&e), NEEDS))?;
        for group in page.auto_scaling_groups().iter().filter(|g| g.auto_scaling_group_name() == Some(asg)) {
            found = true;
            members.extend(group.instances().iter().cloned());
        }
    }
    if !found {
        return Err(fleetsync::Error::Config(format!(
            "Auto Scaling Group {asg:?} not found in region {region} (check --group and --region)"
        ))
        .into());
    }
    if members.is_empty() && known.is_empty() {
        return Err(fleetsync::Error::Config(format!("Auto Scaling Group {asg:?} has no instances; nothing to sync")).into());
    }
    members.retain(|m| m.instance_id().is_some_and(|id| !known.contains(id)));

    let ids: Vec<String> = members.iter().filter_map(|m| m.instance_id().map(str::to_string)).collect();
    let mut ec2_view: HashMap<String, crate::ec2::Instance> = HashMap::new();
    let described: Vec<_> = futures::stream::iter(ids.chunks(IDS_PER_CALL))
        .map(|chunk| describe_instances(&ec2, chunk))
        .buffer_unordered(CALLS_AT_ONCE)
        .collect()
        .await;
    for d in described {
        ec2_view.extend(d?);
    }

    let mut nodes: Vec<Node> = members
        .iter()
        .map(|m| {
            let id = m.instance_id().unwrap_or_default().to_string();
            let lifecycle = m.lifecycle_state().map(|l| l.as_str().to_string()).unwrap_or_else(|| "unknown".into());
            let health = m.health_status().unwrap_or("unknown").to_string();
            let ec2 = ec2_view.get(&id);
            let state = ec2.and_then(|i| i.state.clone()).unwrap_or_else(|| "unknown".into());
            let skipped = if lifecycle != "InService" {
                Some(format!("lifecycle state is {lifecycle}"))
            } else if health != "Healthy" {
                Some(format!("health is {health}"))
            } else if state != "running" {
                Some(format!("EC2 state is {state}"))
            } else {
                None
            };
            Node {
                instance_id: id,
                lifecycle,
                health,
                state,
                availability_zone: m.availability_zone().map(str::to_string),
                private_ip: ec2.and_then(|i| i.private_ip.clone()),
                public_ip: ec2.and_then(|i| i.public_ip.clone()),
                private_dns: ec2.and_then(|i| i.private_dns.clone()).filter(|d| !d.is_empty()),
                skipped,
            }
        })
        .collect();
    nodes.sort_by(|a, b| (a.skipped.is_some(), &a.instance_id).cmp(&(b.skipped.is_some(), &b.instance_id)));
    Ok(nodes)
}

/// DescribeInstances of `ids`. EC2 is eventually consistent: an instance
/// the group has just launched can be unknown to DescribeInstances for a
/// moment, and one unknown ID fails the whole call with
/// InvalidInstanceID.NotFound, naming it. Those IDs are set aside and asked
/// for again after a pause; the others are described at once. An ID still
/// unknown after the last try is left out (the node is then skipped with
/// EC2 state "unknown", and a later deploy or its own boot catches it up).
async fn describe_instances(ec2: &crate::ec2::Client, ids: &[String]) -> anyhow::Result<HashMap<String, crate::ec2::Instance>> {
    let mut found = HashMap::new();
    let mut ask: Vec<String> = ids.to_vec();
    let mut later: Vec<String> = Vec::new();
    let mut pause = NOT_FOUND_PAUSE;
    for attempt in 1..=NOT_FOUND_TRIES {
        while !ask.is_empty() {
            match describe_page(ec2, &ask).await {
                Ok(instances) => {
                    found.extend(instances);
                    ask.clear();
                }
                Err(DescribeError::NotFound(missing)) if !missing.is_empty() && missing.iter().all(|m| ask.contains(m)) => {
                    ask.retain(|id| !missing.contains(id));
                    later.extend(missing);
                }
                Err(DescribeError::NotFound(_)) => {
                    // Not told which: ask for each alone next time.
                    later.append(&mut ask);
                }
                Err(DescribeError::Other(e)) => return Err(e),
            }
        }
        if later.is_empty() || attempt == NOT_FOUND_TRIES {
            break;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        // One at a time from now on: one still unknown must not hide the rest.
        let retry = std::mem::take(&mut later);
        for id in retry {
            match describe_page(ec2, std::slice::from_ref(&id)).await {
                Ok(instances) => found.extend(instances),
                Err(DescribeError::NotFound(_)) => later.push(id),
                Err(DescribeError::Other(e)) => return Err(e),
            }
        }
        if later.is_empty() {
            break;
        }
    }
    Ok(found)
}

enum DescribeError {
    /// InvalidInstanceID.NotFound, with the IDs its message names.
    NotFound(Vec<String>),
    Other(anyhow::Error),
}

async fn describe_page(ec2: &crate::ec2::Client, ids: &[String]) -> Result<HashMap<String, crate::ec2::Instance>, DescribeError> {
    ec2.describe_instances(ids).await.map_err(|e| {
        let f = ApiFailure::from_sdk(&e);
        if f.code.as_deref() == Some("InvalidInstanceID.NotFound") {
            DescribeError::NotFound(instance_ids_in(&f.message))
        } else {
            DescribeError::Other(api_error("DescribeInstances", &f, NEEDS))
        }
    })
}

/// The instance IDs an EC2 error message names ("The instance IDs 'i-1,
/// i-2' do not exist").
fn instance_ids_in(message: &str) -> Vec<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.strip_prefix("i-").is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_read_out_of_not_found_messages() {
        assert_eq!(instance_ids_in("The instance ID 'i-0abc1' does not exist"), ["i-0abc1"]);
        assert_eq!(instance_ids_in("The instance IDs 'i-1f, i-2e' do not exist (HTTP 400)"), ["i-1f", "i-2e"]);
        assert!(instance_ids_in("no ids here, i- or i-xyz").is_empty());
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;

    #[test]
    fn only_an_instance_seen_a_member_can_have_left() {
        let leaving = Leaving::default();
        assert_eq!(leaving.why("i-a"), None, "no listing yet");
        {
            let mut m = leaving.0.lock().unwrap();
            m.seen.extend(["i-a".to_string(), "i-b".to_string()]);
            m.now =
                Some(HashMap::from([("i-b".to_string(), "Terminating:Wait".to_string()), ("i-c".to_string(), "InService".to_string())]));
        }
        assert_eq!(leaving.why("i-a").as_deref(), Some("left the Auto Scaling Group"));
        assert_eq!(leaving.why("i-b").as_deref(), Some("is leaving the Auto Scaling Group (lifecycle Terminating:Wait)"));
        assert_eq!(leaving.why("i-c"), None);
        assert_eq!(leaving.why("i-new"), None, "found by a later discovery, not in the last listing: not gone");
    }
}
