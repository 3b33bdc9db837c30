//! AWS API failures as the bastion reports them: a configuration error
//! (exit code 2) with what to check and which permission is needed when the
//! user must act, a plain error otherwise.

use fleetsync::source::ApiFailure;

/// The error for a failed `call`; `needs` names the IAM actions involved.
pub(crate) fn api_error(call: &str, failure: &ApiFailure, needs: &str) -> anyhow::Error {
    let msg = format!("{call} failed: {}", failure.message);
    if failure.cannot_connect() {
        let (env, host) = service_of(call);
        return fleetsync::Error::Config(format!(
            "{call} failed: cannot connect to {}: {} (check the endpoint, AWS_ENDPOINT_URL_{env} or AWS_ENDPOINT_URL, --region, and the network)",
            fleetsync::source::endpoint_for(env, host),
            failure.message
        ))
        .into();
    }
    if failure.is_throttled() {
        anyhow::anyhow!("{msg} (still throttled after the SDK's retries: retry later, or deploy with a smaller --batch)")
    } else if failure.is_credentials() {
        fleetsync::Error::Config(format!("{msg} ({})", failure.hint())).into()
    } else if failure.is_configuration() {
        fleetsync::Error::Config(format!("{msg} (check the AWS credentials, --region and AWS_ENDPOINT_URL; the bastion needs {needs})"))
            .into()
    } else {
        anyhow::anyhow!(msg)
    }
}

/// The service a call goes to: its endpoint setting's suffix and its
/// endpoint's first label.
fn service_of(call: &str) -> (&'static str, &'static str) {
    if call.starts_with("SSM") || call == "DescribeInstanceInformation" {
        ("SSM", "ssm")
    } else if call == "DescribeInstances" {
        ("EC2", "ec2")
    } else if call == "DescribeAlarms" {
        ("CLOUDWATCH", "monitoring")
    } else {
        ("AUTO_SCALING", "autoscaling")
    }
}
