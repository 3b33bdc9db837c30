//! The Auto Scaling launch lifecycle hook, answered by the instance itself:
//! `CompleteLifecycleAction` (CONTINUE once the first pull has made the
//! code live, ABANDON when the boot failed) and
//! `RecordLifecycleActionHeartbeat` (while a long first pull runs), signed
//! with the instance role's credentials (IMDSv2, through the SDK's
//! chain). The template's user-data calls these once the agent is
//! installed, so an AMI needs neither the AWS CLI nor a recent curl
//! (`fleetsync-agent lifecycle complete|heartbeat`).

use crate::aws_query::{self, AUTOSCALING};
use crate::error::{Error, Result};
use crate::source::ApiFailure;

/// Which launch hook, for which instance.
#[derive(Debug, Clone)]
pub struct Hook {
    pub group: String,
    pub hook: String,
    pub instance_id: String,
}

/// How the launch ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instance goes into service.
    Continue,
    /// The group terminates it (and launches another).
    Abandon,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Continue => "CONTINUE",
            Outcome::Abandon => "ABANDON",
        }
    }
}

/// Ends the launch hook with `outcome`.
pub async fn complete(sdk: &aws_types::SdkConfig, hook: &Hook, outcome: Outcome) -> Result<()> {
    call(sdk, "CompleteLifecycleAction", hook, &[("LifecycleActionResult", outcome.as_str())]).await
}

/// Keeps the launch hook open for another heartbeat timeout.
pub async fn heartbeat(sdk: &aws_types::SdkConfig, hook: &Hook) -> Result<()> {
    call(sdk, "RecordLifecycleActionHeartbeat", hook, &[]).await
}

/// This instance's id, from the instance metadata (IMDSv2).
pub async fn this_instance() -> Result<String> {
    aws_config::imds::Client::builder().build().get("/latest/meta-data/instance-id").await.map(|id| id.as_ref().to_string()).map_err(|e| {
        Error::Config(format!("reading this instance's id from the instance metadata (IMDSv2) failed: {e}; give --instance-id"))
    })
}

async fn call(sdk: &aws_types::SdkConfig, action: &str, hook: &Hook, extra: &[(&str, &str)]) -> Result<()> {
    let client = aws_query::Client::new(sdk, &AUTOSCALING);
    let mut params = vec![
        ("AutoScalingGroupName", hook.group.as_str()),
        ("LifecycleHookName", hook.hook.as_str()),
        ("InstanceId", hook.instance_id.as_str()),
    ];
    params.extend_from_slice(extra);
    match client.call(action, &params).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            let what = format!("{action} for {} (group {}, hook {}) at {}", hook.instance_id, hook.group, hook.hook, client.endpoint());
            let hint = if f.no_response {
                "cannot connect: does this subnet reach the Auto Scaling API (a NAT gateway or an autoscaling VPC endpoint)?"
            } else if f.is_credentials() {
                "the instance role's credentials (IMDSv2) were not found or were refused"
            } else if f.status == Some(403) || f.code.as_deref() == Some("AccessDenied") {
                "grant autoscaling:CompleteLifecycleAction and autoscaling:RecordLifecycleActionHeartbeat on the group to the instance role"
            } else if f.code.as_deref() == Some("ValidationError") {
                "no launch of this instance is waiting on that hook (already completed, timed out, or another hook name)"
            } else {
                "see the message"
            };
            let msg = format!("{what} failed: {} ({hint})", f.message);
            Err(if f.is_configuration() || f.code.as_deref() == Some("ValidationError") { Error::Config(msg) } else { Error::S3(msg) })
        }
    }
}
