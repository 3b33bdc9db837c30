//! Where a pull reads from: the `s3://bucket/prefix` URL and the S3 client.
//!
//! The client is built from the standard AWS chain (aws-config), so
//! credentials, region and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` behave
//! exactly as in the AWS CLI; there is no test-only code path.

use std::fmt;
use std::time::Duration;

use aws_config::{meta::region::RegionProviderChain, retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion};
use aws_credential_types::provider::error::CredentialsError;

use crate::error::{Error, Result};

/// The S3 client, re-exported so that the binaries need no direct
/// dependency on the SDK crate.
pub use aws_sdk_s3::Client as S3Client;

/// A parsed `s3://BUCKET[/PREFIX]`. The prefix is treated as a directory:
/// `s3://b/app` and `s3://b/app/` both mean the keys under `app/`, and a key's
/// path in DEST is the key with that prefix removed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3Url {
    pub bucket: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url> {
        let bad = |why: &str| Error::Config(format!("source {url:?} is not valid: {why} (expected s3://BUCKET[/PREFIX])"));
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("it must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket name is empty"));
        }
        if !bucket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_') {
            return Err(bad("the bucket name has characters S3 does not allow"));
        }
        let mut prefix = prefix.to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(S3Url { bucket: bucket.to_string(), prefix })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How to reach S3, beyond what the standard AWS chain provides.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Region override; otherwise the standard chain, then us-east-1.
    pub region: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`), for S3-compatible
    /// servers that do not serve virtual-hosted buckets.
    pub path_style: bool,
    /// How long a response may go silent before the request is retried
    /// (default 30 s): a stalled connection costs at most this.
    pub read_timeout: Option<Duration>,
}

/// The shared AWS configuration from the standard chain (credentials,
/// region, `AWS_ENDPOINT_URL*`), for every SDK client fleetsync builds.
///
/// Retries: the SDK's standard mode (which also backs off on throttling)
/// with more attempts than its default of 3, because a fleet pull makes
/// thousands of requests and one 503 SlowDown must not fail a file.
/// Timeouts: a stalled connection is abandoned and retried rather than
/// hanging a node's pull or a deploy forever.
pub async fn sdk_config(opts: &ClientOptions) -> aws_config::SdkConfig {
    let region =
        RegionProviderChain::first_try(opts.region.clone().map(aws_config::Region::new)).or_default_provider().or_else("us-east-1");
    aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .retry_config(RetryConfig::standard().with_max_attempts(6).with_initial_backoff(Duration::from_millis(50)))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(opts.read_timeout.unwrap_or(Duration::from_secs(30)))
                .build(),
        )
        .load()
        .await
}

/// Builds an S3 client from the standard AWS configuration chain.
pub async fn s3_client(opts: &ClientOptions) -> aws_sdk_s3::Client {
    s3_client_with(&sdk_config(opts).await, opts.path_style)
}

/// An S3 client on a configuration already loaded (the bastion's, which
/// its AutoScaling, EC2 and SSM clients share): the chain is read once.
pub fn s3_client_with(shared: &aws_config::SdkConfig, path_style: bool) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(shared).force_path_style(path_style).build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Checks that `url` can be listed, before anything depends on it: the
/// bastion calls it before taking the fleet lock (which lives in the same
/// bucket), so a misspelt or deleted bucket is one clear exit-2 line rather
/// than a lock written into a bucket some S3-compatible servers create on
/// demand, or a failure on every node.
pub async fn check_source(client: &S3Client, url: &S3Url) -> Result<()> {
    client
        .list_objects_v2()
        .bucket(&url.bucket)
        .prefix(&url.prefix)
        .encoding_type(aws_sdk_s3::types::EncodingType::Url)
        .max_keys(1)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| ApiFailure::from_sdk(&e).to_error(&format!("listing the source {url}")))
}

/// Error codes (across S3, STS-signed APIs, AutoScaling, EC2 and SSM) for
/// credentials that have expired.
const EXPIRED_CREDENTIALS: &[&str] = &["ExpiredToken", "ExpiredTokenException", "RequestExpired"];
/// Error codes for credentials that are wrong or unknown.
const REFUSED_CREDENTIALS: &[&str] =
    &["InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "UnrecognizedClientException", "InvalidClientTokenId"];
/// Error codes for a call refused for its rate.
const THROTTLED: &[&str] = &["Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "SlowDown"];

/// What went wrong with one AWS API call, reduced to what callers branch
/// on. Works for every SDK crate's errors (they share the smithy types).
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status, when the server answered.
    pub status: Option<u16>,
    /// S3 error code (`NoSuchBucket`, `AccessDenied`, ...), when it sent one.
    pub code: Option<String>,
    /// The whole error chain on one line.
    pub message: String,
    /// The request never got an answer (connection refused, DNS, timeout,
    /// credentials could not be loaded).
    pub no_response: bool,
    /// The request was never sent because no credentials could be loaded
    /// (none in the chain, or the provider failed).
    pub no_credentials: bool,
}

impl ApiFailure {
    pub fn from_sdk<E>(err: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> ApiFailure
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_string);
        let no_response = matches!(err, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ConstructionFailure(_));
        let credentials = credentials_error(err as &(dyn std::error::Error + 'static));
        let message = match (&code, status, credentials) {
            (Some(code), Some(status), _) => format!("{code}: {} (HTTP {status})", err.message().unwrap_or("no message")),
            (None, Some(status), _) => format!("HTTP {status}"),
            // The chain's own message lists every provider it tried, over
            // several lines; the hint says what to do instead.
            (_, _, Some(CredentialsError::CredentialsNotLoaded(_))) => "no AWS credentials found".to_string(),
            (_, _, Some(e)) => format!("loading the AWS credentials failed: {}", error_chain(e)),
            _ => error_chain(err),
        };
        ApiFailure { status, code, message, no_response, no_credentials: credentials.is_some() }
    }

    /// Whether the request never reached a server (refused, no route, DNS,
    /// a timeout), credentials aside: the endpoint is the thing to check.
    pub fn cannot_connect(&self) -> bool {
        self.no_response && !self.no_credentials && self.status.is_none()
    }

    /// Whether the user has to fix something (credentials, bucket name,
    /// endpoint, permissions) rather than the call being unlucky.
    pub fn is_configuration(&self) -> bool {
        !self.is_throttled()
            && (self.no_response
                || self.is_credentials()
                || matches!(self.status, Some(301 | 400 | 401 | 403 | 404))
                || matches!(
                    self.code.as_deref(),
                    Some("NoSuchBucket" | "AccessDenied" | "PermanentRedirect" | "AuthorizationHeaderMalformed")
                ))
    }

    /// Whether the API refused the call for its rate (after the SDK's
    /// retries): AutoScaling and SSM answer 400 for it, which must not
    /// read as a configuration error.
    pub fn is_throttled(&self) -> bool {
        self.code_in(THROTTLED)
    }

    fn code_in(&self, codes: &[&str]) -> bool {
        self.code.as_deref().is_some_and(|c| codes.contains(&c))
    }

    /// The library error for a failed `what` ("listing s3://b/p/"): a
    /// configuration error with its fix when the user must act, else an S3
    /// error.
    pub(crate) fn to_error(&self, what: &str) -> Error {
        if self.cannot_connect() {
            return Error::Config(format!(
                "{what} failed: cannot connect to {}: {} (check the endpoint, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, and the network)",
                endpoint_for("S3", "s3"),
                self.message
            ));
        }
        let msg = format!("{what} failed: {}", self.message);
        if self.is_configuration() {
            Error::Config(format!("{msg} ({})", self.hint()))
        } else {
            Error::S3(msg)
        }
    }

    /// Whether the credentials are the problem: none found, or refused as
    /// expired or invalid.
    pub fn is_credentials(&self) -> bool {
        self.no_credentials || self.code_in(EXPIRED_CREDENTIALS) || self.code_in(REFUSED_CREDENTIALS)
    }

    /// A short explanation with the fix, for the common configuration errors.
    pub fn hint(&self) -> &'static str {
        if self.no_credentials {
            return "set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, run `aws sso login`, or run where an instance role applies";
        }
        match (self.code.as_deref(), self.status) {
            (Some("NoSuchBucket"), _) => "check the bucket name in the source URL",
            _ if self.code_in(EXPIRED_CREDENTIALS) => {
                "the AWS credentials have expired: refresh them (a new session token, `aws sso login`) and retry"
            }
            _ if self.code_in(REFUSED_CREDENTIALS) || self.status == Some(401) => {
                "check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / instance role)"
            }
            (Some("AccessDenied"), _) | (_, Some(403)) => "grant s3:ListBucket and s3:GetObject on the source to this identity",
            (Some("PermanentRedirect" | "AuthorizationHeaderMalformed"), _) | (_, Some(301)) => "set the bucket's region with --region",
            _ if self.no_response => "check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, the network and the credentials chain",
            _ => "see the message",
        }
    }
}

/// Where a service's calls go, as the SDK resolves it from the
/// environment: `AWS_ENDPOINT_URL_<SERVICE>`, else `AWS_ENDPOINT_URL`, else
/// the region's public endpoint. For messages (a profile's `endpoint_url`
/// is not read here).
pub fn endpoint_for(service_env: &str, host_prefix: &str) -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    var(&format!("AWS_ENDPOINT_URL_{service_env}")).or_else(|| var("AWS_ENDPOINT_URL")).unwrap_or_else(|| {
        match var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")) {
            Some(region) => format!("https://{host_prefix}.{region}.amazonaws.com"),
            None => format!("{host_prefix} in the configured region"),
        }
    })
}

/// The error for a read of one object refused with 403. S3 answers 403
/// AccessDenied, not 404, for an object that does not exist when the caller
/// lacks s3:ListBucket on its key, so a missing lock or pointer reads as a
/// permission problem: say which permissions make it read as "absent".
pub(crate) fn read_denied(what: &str, bucket: &str, key: &str, failure: &ApiFailure) -> Error {
    Error::Config(format!(
        "reading {what} s3://{bucket}/{key} was refused ({}): S3 answers 403 instead of 404 for a missing object when the caller lacks s3:ListBucket; grant s3:ListBucket on arn:aws:s3:::{bucket} for the prefix {key:?}, and s3:GetObject on the object (infra/aws/fleetsync.yaml's policies do)",
        failure.message
    ))
}

/// The credentials error somewhere in `err`'s chain: the SDK reports a
/// failed credentials lookup as a dispatch failure wrapping it.
fn credentials_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a CredentialsError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// An error and its sources on one line: `dispatch failure: io error:
/// Connection refused`, without the Debug dumps the SDK's own context adds.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix_as_directory() {
        let u = S3Url::parse("s3://my-bucket/app/www").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "app/www/");
        assert_eq!(S3Url::parse("s3://b-1").unwrap().prefix, "");
        assert_eq!(S3Url::parse("s3://b-1/").unwrap().prefix, "");
        assert_eq!(u.to_string(), "s3://my-bucket/app/www/");
    }

    fn failure(status: u16, code: &str) -> ApiFailure {
        ApiFailure { status: Some(status), code: Some(code.into()), message: code.into(), no_response: false, no_credentials: false }
    }

    #[test]
    fn throttling_is_not_configuration_and_credentials_say_which_fix() {
        for (status, code) in [(400, "Throttling"), (400, "ThrottlingException"), (503, "RequestLimitExceeded"), (503, "SlowDown")] {
            let f = failure(status, code);
            assert!(f.is_throttled() && !f.is_configuration(), "{code}");
        }
        let expired = failure(400, "ExpiredToken");
        assert!(expired.is_credentials() && expired.is_configuration());
        assert!(expired.hint().contains("expired"), "{}", expired.hint());
        let bucket = failure(404, "NoSuchBucket");
        assert!(bucket.is_configuration() && !bucket.is_credentials());
        assert!(bucket.hint().contains("bucket name"));
        let none = ApiFailure { status: None, code: None, message: "x".into(), no_response: true, no_credentials: true };
        assert!(none.is_credentials() && none.hint().contains("AWS_PROFILE"));
        assert!(!failure(500, "InternalError").is_configuration());
    }

    #[test]
    fn rejects_non_s3_urls_with_a_hint() {
        for bad in ["http://b/x", "s3://", "s3:///x", "s3://b b/x", "bucket/x"] {
            let e = S3Url::parse(bad).unwrap_err().to_string();
            assert!(e.contains("s3://BUCKET"), "{bad}: {e}");
        }
    }
}
