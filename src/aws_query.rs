//! AWS Query API calls (a form POSTed to `/`, XML back) through the AWS
//! SDK's own runtime (aws-smithy-runtime's `Operation`), with what the
//! generated clients use from an `SdkConfig`: its HTTP client, credentials
//! chain and identity cache, the SigV4 auth scheme, timeouts, the standard
//! retry mode (throttling codes, 5xx and transient errors) and clock-skew
//! correction. Only the request's form, the endpoint's name and the
//! answer's error XML are written here; callers read their answer's XML.
//! Not carried over: the SDK's user-agent and invocation-id headers.
//!
//! Three callers, each with one or two operations of a huge generated SDK
//! crate: the bastion's EC2 DescribeInstances and CloudWatch DescribeAlarms (aws-sdk-ec2 alone compiled
//! for 270 s at the end of a 9 min 52 s cold build; BENCHMARKS.md, "Build
//! cost"), and the agent's launch lifecycle calls, so that an instance
//! boots without the AWS CLI (aws-sdk-autoscaling must stay out of the
//! agent).

use std::fmt;

use aws_runtime::auth::sigv4::{SigV4AuthScheme, SCHEME_ID as SIGV4};
use aws_runtime::auth::{SigV4OperationSigningConfig, SigningOptions};
use aws_runtime::retries::classifiers::AwsErrorCodeClassifier;
use aws_runtime::service_clock_skew::{ServiceClockSkewClassifier, ServiceClockSkewInterceptor};
use aws_smithy_runtime::client::identity::IdentityCache;
use aws_smithy_runtime::client::orchestrator::operation::Operation;
use aws_smithy_runtime::client::retries::classifiers::{HttpStatusCodeClassifier, TransientErrorClassifier};
use aws_smithy_runtime_api::client::auth::static_resolver::StaticAuthSchemeOptionResolver;
use aws_smithy_runtime_api::client::auth::{AuthSchemeOptionResolverParams, SharedAuthScheme, SharedAuthSchemeOptionResolver};
use aws_smithy_runtime_api::client::identity::SharedIdentityResolver;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse, OrchestratorError};
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponentsBuilder;
use aws_smithy_runtime_api::client::runtime_plugin::StaticRuntimePlugin;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::Layer;
use aws_smithy_types::error::metadata::{ErrorMetadata, ProvideErrorMetadata};
pub use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder, XmlDecodeError};
use aws_types::region::SigningRegion;
use aws_types::SigningName;

/// A Query API service: how it is named and which API version it speaks.
pub struct Service {
    /// The SDK's service id, which names its endpoint setting
    /// (`AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL_AUTO_SCALING`).
    pub id: &'static str,
    /// SigV4's service name, also the endpoint's first label.
    pub signing_name: &'static str,
    /// The `Version` every request names.
    pub version: &'static str,
}

/// EC2 (the version every current SDK speaks).
pub const EC2: Service = Service { id: "EC2", signing_name: "ec2", version: "2016-11-15" };
/// Amazon EC2 Auto Scaling.
pub const AUTOSCALING: Service = Service { id: "Auto Scaling", signing_name: "autoscaling", version: "2011-01-01" };
/// CloudWatch (its alarms, which a deploy watches).
pub const CLOUDWATCH: Service = Service { id: "CloudWatch", signing_name: "monitoring", version: "2010-08-01" };

/// A service's answer to a failed call: its code (`Throttling`,
/// `ValidationError`, `InvalidInstanceID.NotFound`, ...) and message, as
/// the SDK's modeled errors carry them, so that `ApiFailure::from_sdk` and
/// the retry classifiers read it like any other service's.
#[derive(Debug)]
pub struct QueryError(ErrorMetadata);

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.code().unwrap_or("Unknown"), self.0.message().unwrap_or("no message"))
    }
}

impl std::error::Error for QueryError {}

impl ProvideErrorMetadata for QueryError {
    fn meta(&self) -> &ErrorMetadata {
        &self.0
    }
}

pub type Error = SdkError<QueryError, HttpResponse>;

/// Calls one service's Query API with one `SdkConfig`.
pub struct Client {
    op: Operation<String, String, QueryError>,
    service: &'static Service,
    endpoint: String,
}

impl Client {
    pub fn new(sdk: &aws_types::SdkConfig, service: &'static Service) -> Client {
        let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
        let endpoint = endpoint(sdk, service, &region);
        let mut op = Operation::builder()
            .service_name(service.id)
            .operation_name("Query")
            .endpoint_url(&endpoint)
            .standard_retry(&sdk.retry_config().cloned().unwrap_or_else(aws_smithy_types::retry::RetryConfig::standard))
            .retry_classifier(AwsErrorCodeClassifier::<QueryError>::new())
            .retry_classifier(HttpStatusCodeClassifier::default())
            .retry_classifier(TransientErrorClassifier::<QueryError>::new())
            .retry_classifier(ServiceClockSkewClassifier::<QueryError>::new())
            .interceptor(ServiceClockSkewInterceptor::new())
            .with_connection_poisoning();
        if let Some(client) = sdk.http_client() {
            op = op.http_client(client);
        }
        if let Some(timeouts) = sdk.timeout_config() {
            op = op.timeout_config(timeouts.clone());
        }
        if let Some(sleep) = sdk.sleep_impl() {
            op = op.sleep_impl(sleep);
        }
        if let Some(time) = sdk.time_source() {
            op = op.time_source(time);
        }
        if let Some(version) = sdk.behavior_version() {
            op = op.behavior_version(version);
        }
        let op = op.runtime_plugin(signing(sdk, service, region)).serializer(request).deserializer(answer).build();
        Client { op, service, endpoint }
    }

    /// Where the calls go (for messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `Action` with `params`; the answer's XML.
    pub async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<String, Error> {
        let mut pairs = vec![("Action", action), ("Version", self.service.version)];
        pairs.extend_from_slice(params);
        self.op.invoke(form_urlencoded(&pairs)).await
    }
}

/// An answer that came back but cannot be read (`what` says why), as the
/// SDK reports one.
pub fn unreadable(what: String) -> Error {
    let raw = HttpResponse::new(aws_smithy_runtime_api::http::StatusCode::try_from(200).expect("a valid status"), SdkBody::empty());
    SdkError::response_error(what, raw)
}

/// Where the service is: `AWS_ENDPOINT_URL_<ID>` (or `endpoint_url` in the
/// profile's section for it), else `AWS_ENDPOINT_URL`, else the region's
/// public endpoint, as the SDK's clients resolve it.
fn endpoint(sdk: &aws_types::SdkConfig, service: &Service, region: &str) -> String {
    let key = aws_types::service_config::ServiceConfigKey::builder()
        .service_id(service.id)
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .expect("every field is set");
    let configured =
        if sdk.get_origin("endpoint_url").is_client_config() { None } else { sdk.service_config().and_then(|c| c.load_config(key)) };
    configured.or_else(|| sdk.endpoint_url().map(str::to_string)).unwrap_or_else(|| {
        let (fips, dual) = (sdk.use_fips() == Some(true), sdk.use_dual_stack() == Some(true));
        regional_endpoint(service.signing_name, region, fips, dual)
    })
}

/// A service's public endpoint in `region`, by partition (as the SDK's
/// endpoint rules name them).
fn regional_endpoint(name: &str, region: &str, fips: bool, dual_stack: bool) -> String {
    let service = if fips { format!("{name}-fips") } else { name.to_string() };
    let suffix = match region {
        r if r.starts_with("cn-") => {
            if dual_stack {
                "api.amazonwebservices.com.cn"
            } else {
                "amazonaws.com.cn"
            }
        }
        r if r.starts_with("us-isob-") => "sc2s.sgov.gov",
        r if r.starts_with("us-iso-") => "c2s.ic.gov",
        _ if dual_stack => "api.aws",
        _ => "amazonaws.com",
    };
    format!("https://{service}.{region}.{suffix}")
}

/// SigV4 for the service in the client's region, with the config's
/// credentials chain behind an identity cache (as the SDK's clients do).
fn signing(sdk: &aws_types::SdkConfig, service: &Service, region: String) -> StaticRuntimePlugin {
    let mut layer = Layer::new("fleetsync-query");
    layer.store_put(AuthSchemeOptionResolverParams::new(()));
    layer.store_put(SigV4OperationSigningConfig {
        region: Some(SigningRegion::from(aws_types::region::Region::new(region))),
        region_set: None,
        name: Some(SigningName::from_static(service.signing_name)),
        signing_options: SigningOptions::default(),
    });
    let mut components = RuntimeComponentsBuilder::new("fleetsync-query")
        .with_auth_scheme_option_resolver(Some(SharedAuthSchemeOptionResolver::new(StaticAuthSchemeOptionResolver::new(vec![SIGV4]))))
        .with_auth_scheme(SharedAuthScheme::new(SigV4AuthScheme::new()))
        .with_identity_cache(Some(sdk.identity_cache().unwrap_or_else(|| IdentityCache::lazy().build())));
    if let Some(credentials) = sdk.credentials_provider() {
        components = components.with_identity_resolver(SIGV4, SharedIdentityResolver::new(credentials));
    }
    StaticRuntimePlugin::new().with_config(layer.freeze()).with_runtime_components(components)
}

/// The Query request: a form POSTed to `/`.
fn request(form: String) -> Result<HttpRequest, aws_smithy_runtime_api::box_error::BoxError> {
    let mut req = HttpRequest::new(SdkBody::from(form));
    req.set_method("POST")?;
    req.set_uri("/")?;
    req.headers_mut().insert("content-type", "application/x-www-form-urlencoded; charset=utf-8");
    Ok(req)
}

/// The answer's text, or the service's error.
fn answer(response: &HttpResponse) -> Result<String, OrchestratorError<QueryError>> {
    let body = response.body().bytes().unwrap_or_default();
    let text = std::str::from_utf8(body).map_err(|e| OrchestratorError::other(format!("the service answered with no UTF-8 text: {e}")))?;
    if !response.status().is_success() {
        return Err(OrchestratorError::operation(error(text, response.status().as_u16())));
    }
    Ok(text.to_string())
}

/// EC2's `<Response><Errors><Error><Code>…</Code><Message>…</Message>`, or
/// the other Query services' `<ErrorResponse><Error><Code>…`.
fn error(text: &str, status: u16) -> QueryError {
    fn fields(
        error: &mut ScopedDecoder<'_, '_>,
        mut meta: aws_smithy_types::error::metadata::Builder,
    ) -> aws_smithy_types::error::metadata::Builder {
        while let Some(mut field) = error.next_tag() {
            let name = field.start_el().local().to_string();
            let value = try_data(&mut field).map(|v| v.to_string()).unwrap_or_default();
            match name.as_str() {
                "Code" => meta = meta.code(value),
                "Message" => meta = meta.message(value),
                _ => {}
            }
        }
        meta
    }
    let mut meta = ErrorMetadata::builder();
    let mut doc = Document::new(text);
    if let Ok(mut root) = doc.root_element() {
        while let Some(mut tag) = root.next_tag() {
            if tag.start_el().matches("Errors") {
                while let Some(mut error) = tag.next_tag() {
                    meta = fields(&mut error, meta);
                }
            } else if tag.start_el().matches("Error") {
                meta = fields(&mut tag, meta);
            }
        }
    }
    let meta = meta.build();
    if meta.code().is_none() {
        return QueryError(ErrorMetadata::builder().message(format!("HTTP {status}")).build());
    }
    QueryError(meta)
}

/// `k=v&k=v`, each part percent-encoded.
fn form_urlencoded(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

/// Percent-encoding for a form value: everything but RFC 3986's unreserved
/// characters (what SigV4 and the Query services expect).
fn encode(s: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_partition_and_the_fips_and_dual_stack_settings() {
        assert_eq!(regional_endpoint("ec2", "eu-west-1", false, false), "https://ec2.eu-west-1.amazonaws.com");
        assert_eq!(regional_endpoint("ec2", "us-gov-west-1", true, false), "https://ec2-fips.us-gov-west-1.amazonaws.com");
        assert_eq!(regional_endpoint("ec2", "cn-north-1", false, false), "https://ec2.cn-north-1.amazonaws.com.cn");
        assert_eq!(regional_endpoint("ec2", "us-east-1", false, true), "https://ec2.us-east-1.api.aws");
        assert_eq!(regional_endpoint("ec2", "us-iso-east-1", false, false), "https://ec2.us-iso-east-1.c2s.ic.gov");
        assert_eq!(regional_endpoint("autoscaling", "eu-west-1", false, false), "https://autoscaling.eu-west-1.amazonaws.com");
    }

    #[test]
    fn an_error_answer_gives_its_code_and_message_in_either_shape() {
        let ec2 = "<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-1' does not exist</Message></Error></Errors><RequestID>x</RequestID></Response>";
        let e = error(ec2, 400);
        assert_eq!(e.code(), Some("InvalidInstanceID.NotFound"));
        assert_eq!(e.message(), Some("The instance ID 'i-1' does not exist"));
        let autoscaling = "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type><Code>ValidationError</Code><Message>No active Lifecycle Action found with instance ID i-1</Message></Error><RequestId>r</RequestId></ErrorResponse>";
        let e = error(autoscaling, 400);
        assert_eq!((e.code(), e.message()), (Some("ValidationError"), Some("No active Lifecycle Action found with instance ID i-1")));
        assert_eq!(error("<html>bad gateway</html>", 502).message(), Some("HTTP 502"));
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(
            form_urlencoded(&[("Action", "DescribeInstances"), ("NextToken", "a+b/c=")]),
            "Action=DescribeInstances&NextToken=a%2Bb%2Fc%3D"
        );
    }
}
