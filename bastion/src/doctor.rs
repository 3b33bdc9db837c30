//! DOCTOR: `fleetsync doctor`, the checks between "my fleet" and "a first
//! deploy", in the order a deploy depends on them: credentials -> the group
//! -> the SSM document -> each node online with an agent -> the store ->
//! the node role reading it (a dry-run pull on one node) -> the launch hook.
//! Each check is a line with, when it fails, the fix. Read-only: no lock is
//! taken, nothing is written anywhere, and the only commands the nodes run
//! are `fleetsync-agent status` and `pull --dry-run`.
//!
//! A check whose prerequisite failed is skipped (saying which), rather than
//! failing again for the same reason.

use aws_credential_types::provider::ProvideCredentials;
use fleetsync::source::ApiFailure;
use fleetsync::store::pointer::{self, Deployed, Found, Latest};
use fleetsync::store::Store;
use fleetsync::S3Url;
use serde::Serialize;

use crate::collect::{NodeResult, NodeStatus};
use crate::discover::{self, Node};
use crate::progress::Progress;
use crate::trigger::{Action, AddressChoice, AgentCall, Fleet, Transport};

/// What `doctor` needs, resolved from flags and fleetsync.toml.
pub struct Doctor {
    pub asg: String,
    /// The store, when given: its pointers, its bucket's versioning and a
    /// node's reading of it are checked too.
    pub source: Option<S3Url>,
    pub transport: Transport,
    /// `status`, as `fleetsync status` sends it (with --dest, --state-dir).
    pub call: AgentCall,
    pub address: AddressChoice,
}

/// One check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Ok,
    /// Worth fixing; a deploy works without it.
    Warning,
    Failed,
    /// Not checked: an earlier check it depends on failed, or it needs a
    /// flag that was not given.
    Skipped,
}

#[derive(Debug, Serialize)]
pub struct Check {
    /// Short and stable (`group`, `ssm-document`, ...): what CI matches on.
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do, for a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// `doctor --json`: every check, in order.
#[derive(Debug, Serialize)]
pub struct DoctorReport {
    /// Bumped when a field changes meaning.
    pub format: u32,
    pub asg: String,
    pub checks: Vec<Check>,
    /// 0 when no check failed, else 1.
    #[serde(skip)]
    pub exit_code: i32,
}

impl DoctorReport {
    /// One line per check, and its fix under it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let mark = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warning => "WARN",
                Verdict::Failed => "FAIL",
                Verdict::Skipped => "skip",
            };
            out.push_str(&format!("{mark}  {:<18} {}\n", c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("      {:<18} fix: {fix}\n", ""));
            }
        }
        let failed = self.checks.iter().filter(|c| c.verdict == Verdict::Failed).count();
        out.push_str(&match failed {
            0 => format!("{}: ready to deploy", self.asg),
            n => format!("{}: {n} check{} failed", self.asg, if n == 1 { "" } else { "s" }),
        });
        out
    }
}

/// The checks so far; later ones ask whether a prerequisite passed.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.0.push(Check { name, verdict: Verdict::Ok, detail: detail.into(), fix: None });
    }

    fn bad(&mut self, name: &'static str, verdict: Verdict, detail: impl Into<String>, fix: impl Into<String>) {
        self.0.push(Check { name, verdict, detail: detail.into(), fix: Some(fix.into()) });
    }

    fn skip(&mut self, name: &'static str, why: impl Into<String>) {
        self.0.push(Check { name, verdict: Verdict::Skipped, detail: why.into(), fix: None });
    }

    fn passed(&self, name: &str) -> bool {
        self.0.iter().any(|c| c.name == name && matches!(c.verdict, Verdict::Ok | Verdict::Warning))
    }
}

pub async fn run(d: Doctor, sdk: &aws_types::SdkConfig, s3: &fleetsync::source::S3Client) -> DoctorReport {
    let Doctor { asg, source, transport, call, address } = d;
    let mut checks = Checks::default();
    credentials(&mut checks, sdk).await;
    let targets = if checks.passed("credentials") {
        group(&mut checks, sdk, &asg).await
    } else {
        checks.skip("group", "needs credentials");
        Vec::new()
    };
    match &transport {
        Transport::Ssm(ssm) if checks.passed("credentials") => document(&mut checks, &ssm.client, &ssm.document).await,
        Transport::Ssm(_) => checks.skip("ssm-document", "needs credentials"),
        Transport::Ssh(_) => checks.skip("ssm-document", "--via ssh: no SSM document is used"),
    }
    let progress = Progress::new(targets.len());
    let reachable = !targets.is_empty() && (matches!(transport, Transport::Ssh(_)) || checks.passed("ssm-document"));
    let mut fleet = Fleet::new(transport, call, None, address, None, None, targets.len(), &progress);
    let answered = if reachable {
        nodes(&mut checks, &fleet, &targets).await
    } else {
        checks.skip("nodes", "needs a group with instances in service and, over SSM, the document");
        Vec::new()
    };
    match &source {
        None => {
            checks.skip("store", "give --source to check the release store");
            checks.skip("node-reads-store", "give --source");
        }
        Some(source) if checks.passed("credentials") => {
            store(&mut checks, s3, source, &asg).await;
            match answered.first() {
                Some(node) => node_reads_store(&mut checks, &mut fleet, &asg, source, node).await,
                None => checks.skip("node-reads-store", "needs a node whose agent answered"),
            }
        }
        Some(_) => {
            checks.skip("store", "needs credentials");
            checks.skip("node-reads-store", "needs credentials");
        }
    }
    progress.finish();
    if checks.passed("group") {
        launch_hook(&mut checks, sdk, &asg).await;
    } else {
        checks.skip("launch-hook", "needs the group");
    }
    let exit_code = i32::from(checks.0.iter().any(|c| c.verdict == Verdict::Failed));
    DoctorReport { format: 1, asg, checks: checks.0, exit_code }
}

/// Credentials from the standard chain, and the region they are used in.
async fn credentials(checks: &mut Checks, sdk: &aws_types::SdkConfig) {
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_else(|| "none".into());
    let Some(provider) = sdk.credentials_provider() else {
        return checks.bad(
            "credentials",
            Verdict::Failed,
            "no credentials provider",
            "set AWS_PROFILE, run `aws sso login`, or run where an instance role applies",
        );
    };
    match provider.provide_credentials().await {
        Ok(c) => {
            let key = c.access_key_id();
            checks.ok("credentials", format!("found (access key {}...), region {region}", &key[..key.len().min(4)]));
        }
        Err(e) => checks.bad(
            "credentials",
            Verdict::Failed,
            // The chain's message goes on to list every provider it tried.
            format!("none found ({})", fleetsync::source::error_chain(&e).split(". Attempted:").next().unwrap_or_default()),
            "set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), run `aws sso login`, or run where an instance role applies",
        ),
    }
}

/// The group exists and has instances in service; returns them.
async fn group(checks: &mut Checks, sdk: &aws_types::SdkConfig, asg: &str) -> Vec<Node> {
    match discover::discover(sdk, asg).await {
        Ok(nodes) => {
            let targets: Vec<Node> = nodes.iter().filter(|n| n.is_target()).cloned().collect();
            if targets.is_empty() {
                checks.bad(
                    "group",
                    Verdict::Failed,
                    format!("{asg} has {} instances, none InService, Healthy and running", nodes.len()),
                    "raise the group's desired capacity, or wait for its instances to enter service (`fleetsync list` says why each is skipped)",
                );
            } else {
                checks.ok("group", format!("{asg}: {} instances, {} in service", nodes.len(), targets.len()));
            }
            targets
        }
        Err(e) => {
            checks.bad(
                "group",
                Verdict::Failed,
                format!("{e:#}"),
                "check --group and --region (`aws autoscaling describe-auto-scaling-groups`), and that the role may call autoscaling:DescribeAutoScalingGroups and ec2:DescribeInstances",
            );
            Vec::new()
        }
    }
}

/// The SSM document exists, and takes the parameters this fleetsync sends.
async fn document(checks: &mut Checks, ssm: &aws_sdk_ssm::Client, name: &str) {
    if name == crate::trigger::RUN_SHELL_SCRIPT {
        return checks.ok("ssm-document", format!("{name} (AWS's own)"));
    }
    match ssm.describe_document().name(name).document_version("$LATEST").send().await {
        Ok(out) => {
            let doc = out.document();
            let version = doc.and_then(|d| d.document_version()).unwrap_or("?");
            let default = doc.and_then(|d| d.default_version()).unwrap_or("?");
            let params: Vec<&str> = doc.map(|d| d.parameters().iter().filter_map(|p| p.name()).collect()).unwrap_or_default();
            // Every parameter this bastion may send (an older document
            // refuses a command that names one it lacks).
            let lacking: Vec<&str> =
                ["manifest", "dryRun", "healthUrl", "healthTimeout"].into_iter().filter(|p| !params.contains(p)).collect();
            let detail = format!("{name}, version {version} (the bastion sends $LATEST; default {default})");
            if lacking.is_empty() {
                checks.ok("ssm-document", detail);
            } else {
                checks.bad(
                    "ssm-document",
                    Verdict::Warning,
                    format!("{detail}: older than this fleetsync, no parameter {}", lacking.join(", ")),
                    "update the stack with this release's template (infra/aws/fleetsync.yaml or fleetsync-existing-group.yaml)",
                );
            }
        }
        Err(e) => {
            let failure = ApiFailure::from_sdk(&e);
            let fix = match failure.code.as_deref() {
                Some("InvalidDocument") => "deploy infra/aws/fleetsync.yaml (a new group) or infra/aws/fleetsync-existing-group.yaml (yours): either creates fleetsync-agent-GROUP; or name yours with --ssm-document",
                _ => "the bastion needs ssm:DescribeDocument on the document (or check --region and AWS_ENDPOINT_URL_SSM)",
            };
            checks.bad("ssm-document", Verdict::Failed, format!("{name}: {}", failure.message), fix);
        }
    }
}

/// The oldest agent this bastion drives: the first that reports its
/// version and takes the manifest digest from the environment.
const OLDEST_AGENT: [u64; 3] = [0, 1, 0];

/// Whether this bastion drives an agent that says it is `version`
/// (`0.1.0 (abc1234)`): not older than [`OLDEST_AGENT`], and not of a
/// newer minor (or major) version than the bastion itself, whose reports
/// and flags it may not know.
fn agent_supported(version: &str) -> bool {
    let parse = |v: &str| -> Option<[u64; 3]> {
        // 0.2.0, 0.2.0 (abc1234), 0.2.0-rc.1: a pre-release is its version.
        let core = v.split_whitespace().next()?.split(['-', '+']).next()?;
        let mut parts = core.splitn(3, '.').map(|p| p.parse::<u64>().ok());
        Some([parts.next()??, parts.next()??, parts.next()??])
    };
    match (parse(version), parse(fleetsync::VERSION)) {
        (Some(agent), Some(ours)) => agent >= OLDEST_AGENT && agent[..2] <= ours[..2],
        _ => false,
    }
}

/// Every node reachable (online in SSM, or over SSH) with an agent that
/// answers `status` and that this bastion drives; returns those that
/// answered.
async fn nodes(checks: &mut Checks, fleet: &Fleet<'_>, targets: &[Node]) -> Vec<Node> {
    let results = fleet.run(targets).await;
    let mut versions = std::collections::BTreeMap::<String, usize>::new();
    let (mut answered, mut bad) = (Vec::new(), Vec::new());
    for (node, r) in targets.iter().zip(&results) {
        let version = r.agent_version.clone().unwrap_or_else(|| "unknown".into());
        if !agent_answered(r) {
            bad.push(format!("{}: {}", r.instance_id, r.error.as_deref().unwrap_or("no answer")));
        } else if !agent_supported(&version) {
            bad.push(format!(
                "{}: agent {version} is not one this fleetsync ({}) drives (from {} to {}.x)",
                r.instance_id,
                fleetsync::VERSION,
                OLDEST_AGENT.map(|n| n.to_string()).join("."),
                fleetsync::VERSION.rsplit_once('.').map_or(fleetsync::VERSION, |(minor, _)| minor)
            ));
        } else {
            *versions.entry(version).or_default() += 1;
            answered.push(node.clone());
        }
    }
    let versions: Vec<String> = versions.iter().map(|(v, n)| format!("{v} on {n}")).collect();
    if bad.is_empty() {
        let detail = format!("{} nodes answered; agent {}", answered.len(), versions.join(", "));
        match versions.len() {
            1 => checks.ok("nodes", detail),
            _ => checks.bad(
                "nodes",
                Verdict::Warning,
                detail,
                "install one agent version on every node (docs/install.md, \"Upgrading the agent\")",
            ),
        }
    } else {
        checks.bad(
            "nodes",
            Verdict::Failed,
            format!("{} of {} nodes did not answer: {}", bad.len(), targets.len(), bad.join("; ")),
            "SSM agent offline: start it, and give the instance role AmazonSSMManagedInstanceCore (or GrantSsm=true) and a route to ssm, ssmmessages and ec2messages; agent not installed: docs/existing-group.md, step 3; an agent of another version: install this fleetsync's (docs/install.md, \"Upgrading the agent\")",
        );
    }
    answered
}

/// Whether a node's agent ran `status`: it printed a status, or said that
/// DEST holds no release yet (a node not cut over, which is not a fault).
fn agent_answered(r: &NodeResult) -> bool {
    r.status == NodeStatus::Ok || r.release_status.is_some() || r.error.as_deref().is_some_and(|e| e.contains("holds no release"))
}

/// The store's pointers (something published; the group's deploy state)
/// and its bucket's versioning.
async fn store(checks: &mut Checks, s3: &fleetsync::source::S3Client, source: &S3Url, asg: &str) {
    if let Err(e) = fleetsync::source::check_source(s3, source).await {
        checks.bad(
            "store",
            Verdict::Failed,
            e.to_string(),
            "check --source (bucket and prefix); the bastion needs s3:ListBucket under it (the stacks' DeployPolicy)",
        );
        return checks.skip("bucket-versioning", "needs the bucket");
    }
    let store = Store::of(source);
    let latest = pointer::read::<Latest>(s3, &store, &store.latest_key(), None).await;
    let deployed = pointer::read::<Deployed>(s3, &store, &store.deployed_key(asg), None).await;
    match (latest, deployed) {
        (Ok(Found::Value { value: latest, .. }), Ok(deployed)) => {
            let deployed = match deployed {
                Found::Value { value, .. } => format!("{asg} on {} ({:?})", value.release, value.state).to_lowercase(),
                _ => format!("{asg} not deployed yet (instances boot the latest)"),
            };
            checks.ok("store", format!("{source}: latest {}, {deployed}", latest.release));
        }
        (Ok(_), Ok(_)) => checks.bad(
            "store",
            Verdict::Failed,
            format!("{source}: nothing published yet (no {})", store.latest_key()),
            format!("publish a build: fleetsync publish BUILD_DIR --source {source} --release-id ID"),
        ),
        (Err(e), _) | (_, Err(e)) => checks.bad(
            "store",
            Verdict::Failed,
            format!("{e}"),
            "check --source; the bastion needs s3:GetObject and s3:ListBucket under it (the stacks' DeployPolicy)",
        ),
    }
    match s3.get_bucket_versioning().bucket(&source.bucket).send().await {
        Ok(v) if v.status().is_some_and(|s| s.as_str() == "Enabled") => {
            checks.ok("bucket-versioning", format!("{} is versioned", source.bucket))
        }
        Ok(_) => checks.bad(
            "bucket-versioning",
            Verdict::Warning,
            format!("{} is not versioned: an object deleted or overwritten by mistake cannot be recovered", source.bucket),
            format!("aws s3api put-bucket-versioning --bucket {} --versioning-configuration Status=Enabled", source.bucket),
        ),
        Err(e) => checks.bad(
            "bucket-versioning",
            Verdict::Warning,
            format!("cannot read {}'s versioning: {}", source.bucket, ApiFailure::from_sdk(&e).message),
            "grant s3:GetBucketVersioning to check it, or check it in the console",
        ),
    }
}

/// One node reads the store with its own role: `pull --dry-run` there.
async fn node_reads_store(checks: &mut Checks, fleet: &mut Fleet<'_>, asg: &str, source: &S3Url, node: &Node) {
    fleet.call = AgentCall {
        action: Action::Pull,
        source: Some(source.to_string()),
        releases: true,
        group: Some(asg.to_string()),
        dry_run: true,
        ..fleet.call.clone()
    };
    let result = fleet.run(std::slice::from_ref(node)).await.pop();
    match result {
        Some(r) if r.status == NodeStatus::Ok => checks.ok("node-reads-store", format!("{} read {source} (a dry-run pull)", r.instance_id)),
        Some(r) => checks.bad(
            "node-reads-store",
            Verdict::Failed,
            format!("{}: {}", r.instance_id, r.error.as_deref().unwrap_or("the dry-run pull failed")),
            "the instance role needs s3:GetObject and s3:ListBucket under the source and dist/ (the stacks' node policy); a refused dryRun parameter means an older SSM document: update the stack",
        ),
        None => checks.skip("node-reads-store", "no result"),
    }
}

/// The launch hook the templates make and the bootstrap completes.
const LAUNCH_HOOK: &str = "fleetsync-first-pull";

/// The launch hook that keeps an instance out of service until its first
/// pull: without it, a scale-out serves an empty DEST.
async fn launch_hook(checks: &mut Checks, sdk: &aws_types::SdkConfig, asg: &str) {
    let client = aws_sdk_autoscaling::Client::new(sdk);
    match client.describe_lifecycle_hooks().auto_scaling_group_name(asg).send().await {
        Ok(out) => {
            let launching: Vec<_> =
                out.lifecycle_hooks().iter().filter(|h| h.lifecycle_transition() == Some("autoscaling:EC2_INSTANCE_LAUNCHING")).collect();
            let ours = launching.iter().find(|h| h.lifecycle_hook_name() == Some(LAUNCH_HOOK));
            let describe = |h: &aws_sdk_autoscaling::types::LifecycleHook| {
                format!(
                    "{} ({} after {} s)",
                    h.lifecycle_hook_name().unwrap_or("?"),
                    h.default_result().unwrap_or("?"),
                    h.heartbeat_timeout().unwrap_or_default()
                )
            };
            match ours {
                Some(h) if h.default_result() == Some("ABANDON") => checks.ok("launch-hook", describe(h)),
                Some(h) => checks.bad(
                    "launch-hook",
                    Verdict::Warning,
                    format!("{}: an instance whose first pull never answers enters service anyway", describe(h)),
                    "set the hook's DefaultResult to ABANDON (the templates do)",
                ),
                None => checks.bad(
                    "launch-hook",
                    Verdict::Failed,
                    match launching.len() {
                        0 => format!("{asg} has no launch lifecycle hook: a new instance enters service before its first pull"),
                        _ => format!(
                            "{asg} has no {LAUNCH_HOOK} hook (the bootstrap completes that one; it has {})",
                            launching.iter().map(|h| h.lifecycle_hook_name().unwrap_or("?")).collect::<Vec<_>>().join(", ")
                        ),
                    },
                    "once the launch template runs the bootstrap, update the existing-group stack with LaunchHook=true (docs/existing-group.md, step 5)",
                ),
            }
        }
        Err(e) => checks.bad(
            "launch-hook",
            Verdict::Failed,
            format!("DescribeLifecycleHooks: {}", ApiFailure::from_sdk(&e).message),
            "the bastion needs autoscaling:DescribeLifecycleHooks (the stacks' DeployPolicy grants it)",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn agents_from_the_oldest_supported_to_this_minor_version_are_driven() {
        let ours = fleetsync::VERSION;
        assert!(super::agent_supported(&format!("{ours} (abc1234)")));
        assert!(super::agent_supported("0.1.0"));
        assert!(super::agent_supported("0.1.1-rc.1 (abc1234)"));
        for old in ["0.0.9 (old)", "unknown", "", "1", "x.y.z"] {
            assert!(!super::agent_supported(old), "{old}");
        }
        assert!(!super::agent_supported("99.0.0 (future)"), "a newer agent than the bastion knows");
    }
}
