//! AWS API failures as the bastion reports them: a configuration error
//! (exit code 2) with what to check and which permission is needed when the
//! user must act, a plain error otherwise.

use fleetsync::source::ApiFailure;

/// The error for a failed `call`; `needs` names the IAM actions involved.
pub(crate) fn api_error(call: &str, failure: &ApiFailure, needs: &str) -> anyhow::Error {
    let msg = format!("{call} failed: {}", failure.message);
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
