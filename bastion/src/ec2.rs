//! EC2's DescribeInstances: the one EC2 call the bastion makes, for four
//! fields of each instance (state, private and public address, private
//! DNS name).
//!
//! It goes over EC2's Query API through the AWS SDK's own runtime
//! (aws-smithy-runtime's `Operation`), with what the generated clients
//! use from the bastion's `SdkConfig`: its HTTP client, credentials chain
//! and identity cache, the SigV4 auth scheme, timeouts, the standard retry
//! mode (6 attempts; throttling codes such as `RequestLimitExceeded`,
//! 5xx and transient errors) and clock-skew correction. Only the request's
//! form, the endpoint's name and the answer's XML are written here. Not
//! carried over: the SDK's user-agent and invocation-id headers.
//!
//! Why not aws-sdk-ec2: that crate alone compiled for 270 s, alone at the
//! end of a 9 min 52 s cold dev build on two cores, for this one operation
//! (BENCHMARKS.md, "Build cost").

use std::collections::HashMap;
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
use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder};
use aws_types::region::SigningRegion;
use aws_types::SigningName;

/// The EC2 API version the Query requests name (the one every current SDK
/// speaks; its DescribeInstances answer has the fields read here).
const API_VERSION: &str = "2016-11-15";

/// The part of an EC2 instance the bastion uses.
#[derive(Debug, Clone, Default)]
pub(crate) struct Instance {
    /// `pending`, `running`, `shutting-down`, ...
    pub state: Option<String>,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub private_dns: Option<String>,
}

/// EC2's answer to a failed call: its code (`InvalidInstanceID.NotFound`,
/// `RequestLimitExceeded`, `UnauthorizedOperation`, ...) and message, as
/// the SDK's modeled errors carry them, so that `ApiFailure::from_sdk` and
/// the retry classifiers read it like any other service's.
#[derive(Debug)]
pub(crate) struct Ec2Error(ErrorMetadata);

impl fmt::Display for Ec2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.code().unwrap_or("Unknown"), self.0.message().unwrap_or("no message"))
    }
}

impl std::error::Error for Ec2Error {}

impl ProvideErrorMetadata for Ec2Error {
    fn meta(&self) -> &ErrorMetadata {
        &self.0
    }
}

/// One page of DescribeInstances.
#[derive(Debug, Default)]
struct Page {
    instances: Vec<(String, Instance)>,
    next_token: Option<String>,
}

/// A DescribeInstances client for one `SdkConfig`.
pub(crate) struct Client {
    op: Operation<String, Page, Ec2Error>,
}

pub(crate) type Error = SdkError<Ec2Error, HttpResponse>;

impl Client {
    pub(crate) fn new(sdk: &aws_types::SdkConfig) -> Client {
        let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
        let mut op = Operation::builder()
            .service_name("EC2")
            .operation_name("DescribeInstances")
            .endpoint_url(&endpoint(sdk, &region))
            .standard_retry(&sdk.retry_config().cloned().unwrap_or_else(aws_smithy_types::retry::RetryConfig::standard))
            .retry_classifier(AwsErrorCodeClassifier::<Ec2Error>::new())
            .retry_classifier(HttpStatusCodeClassifier::default())
            .retry_classifier(TransientErrorClassifier::<Ec2Error>::new())
            .retry_classifier(ServiceClockSkewClassifier::<Ec2Error>::new())
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
        let op = op.runtime_plugin(signing(sdk, region)).serializer(request).deserializer(page).build();
        Client { op }
    }

    /// DescribeInstances of `ids`, every page; the instances by id.
    pub(crate) async fn describe_instances(&self, ids: &[String]) -> Result<HashMap<String, Instance>, Error> {
        let mut found = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            let mut form = form_urlencoded(&[("Action", "DescribeInstances"), ("Version", API_VERSION)]);
            for (i, id) in ids.iter().enumerate() {
                form.push_str(&format!("&InstanceId.{}={}", i + 1, encode(id)));
            }
            if let Some(t) = &token {
                form.push_str(&format!("&NextToken={}", encode(t)));
            }
            let page = self.op.invoke(form).await?;
            found.extend(page.instances);
            // A token that comes back unchanged ends it too (as the SDK's
            // paginators do): never a loop on a server's mistake.
            match page.next_token.filter(|t| !t.is_empty() && Some(t) != token.as_ref()) {
                Some(t) => token = Some(t),
                None => return Ok(found),
            }
        }
    }
}

/// Where EC2 is: `AWS_ENDPOINT_URL_EC2` (or `endpoint_url` in the
/// profile's `ec2` section), else `AWS_ENDPOINT_URL`, else the region's
/// public endpoint, as the SDK's clients resolve it.
fn endpoint(sdk: &aws_types::SdkConfig, region: &str) -> String {
    let key = aws_types::service_config::ServiceConfigKey::builder()
        .service_id("EC2")
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .expect("every field is set");
    let configured = if sdk.get_origin("endpoint_url").is_client_config() {
        None
    } else {
        sdk.service_config().and_then(|c| c.load_config(key))
    };
    configured.or_else(|| sdk.endpoint_url().map(str::to_string)).unwrap_or_else(|| {
        let (fips, dual) = (sdk.use_fips() == Some(true), sdk.use_dual_stack() == Some(true));
        regional_endpoint(region, fips, dual)
    })
}

/// EC2's public endpoint in `region`, by partition (as the SDK's endpoint
/// rules name them).
fn regional_endpoint(region: &str, fips: bool, dual_stack: bool) -> String {
    let service = if fips { "ec2-fips" } else { "ec2" };
    let suffix = match region {
        r if r.starts_with("cn-") => if dual_stack { "api.amazonwebservices.com.cn" } else { "amazonaws.com.cn" },
        r if r.starts_with("us-isob-") => "sc2s.sgov.gov",
        r if r.starts_with("us-iso-") => "c2s.ic.gov",
        _ if dual_stack => "api.aws",
        _ => "amazonaws.com",
    };
    format!("https://{service}.{region}.{suffix}")
}

/// SigV4 for service `ec2` in the client's region, with the config's
/// credentials chain behind an identity cache (as the SDK's clients do).
fn signing(sdk: &aws_types::SdkConfig, region: String) -> StaticRuntimePlugin {
    let mut layer = Layer::new("fleetsync-ec2");
    layer.store_put(AuthSchemeOptionResolverParams::new(()));
    layer.store_put(SigV4OperationSigningConfig {
        region: Some(SigningRegion::from(aws_types::region::Region::new(region))),
        region_set: None,
        name: Some(SigningName::from_static("ec2")),
        signing_options: SigningOptions::default(),
    });
    let mut components = RuntimeComponentsBuilder::new("fleetsync-ec2")
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

/// A DescribeInstances answer, or EC2's error.
fn page(response: &HttpResponse) -> Result<Page, OrchestratorError<Ec2Error>> {
    let body = response.body().bytes().unwrap_or_default();
    let text = std::str::from_utf8(body).map_err(|e| OrchestratorError::other(format!("EC2 answered with no UTF-8 text: {e}")))?;
    if !response.status().is_success() {
        return Err(OrchestratorError::operation(error(text, response.status().as_u16())));
    }
    parse_page(text).map_err(|e| OrchestratorError::other(format!("reading EC2's DescribeInstances answer: {e}")))
}

/// `<Response><Errors><Error><Code>…</Code><Message>…</Message>`.
fn error(text: &str, status: u16) -> Ec2Error {
    let mut meta = ErrorMetadata::builder();
    let mut doc = Document::new(text);
    if let Ok(mut root) = doc.root_element() {
        while let Some(mut errors) = root.next_tag() {
            if !errors.start_el().matches("Errors") {
                continue;
            }
            while let Some(mut error) = errors.next_tag() {
                while let Some(mut field) = error.next_tag() {
                    let name = field.start_el().local().to_string();
                    let value = try_data(&mut field).map(|v| v.to_string()).unwrap_or_default();
                    match name.as_str() {
                        "Code" => meta = meta.code(value),
                        "Message" => meta = meta.message(value),
                        _ => {}
                    }
                }
            }
        }
    }
    let meta = meta.build();
    if meta.code().is_none() {
        return Ec2Error(ErrorMetadata::builder().message(format!("HTTP {status}")).build());
    }
    Ec2Error(meta)
}

/// `<DescribeInstancesResponse><reservationSet><item><instancesSet><item>`
/// and `<nextToken>`.
fn parse_page(text: &str) -> Result<Page, aws_smithy_xml::decode::XmlDecodeError> {
    let mut out = Page::default();
    let mut doc = Document::new(text);
    let mut root = doc.root_element()?;
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("nextToken") {
            out.next_token = Some(try_data(&mut tag)?.to_string());
        } else if tag.start_el().matches("reservationSet") {
            while let Some(mut reservation) = tag.next_tag() {
                while let Some(mut field) = reservation.next_tag() {
                    if field.start_el().matches("instancesSet") {
                        while let Some(mut item) = field.next_tag() {
                            if let Some(found) = parse_instance(&mut item)? {
                                out.instances.push(found);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

fn parse_instance(item: &mut ScopedDecoder<'_, '_>) -> Result<Option<(String, Instance)>, aws_smithy_xml::decode::XmlDecodeError> {
    let (mut id, mut instance) = (None, Instance::default());
    // An empty element (`<privateDnsName/>`) is no value.
    let text = |field: &mut ScopedDecoder<'_, '_>| try_data(field).map(|v| Some(v.to_string()).filter(|v| !v.is_empty()));
    while let Some(mut field) = item.next_tag() {
        let name = field.start_el().local().to_string();
        match name.as_str() {
            "instanceId" => id = text(&mut field)?,
            "privateIpAddress" => instance.private_ip = text(&mut field)?,
            "ipAddress" => instance.public_ip = text(&mut field)?,
            "privateDnsName" => instance.private_dns = text(&mut field)?,
            "instanceState" => {
                while let Some(mut s) = field.next_tag() {
                    if s.start_el().matches("name") {
                        instance.state = text(&mut s)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(id.map(|id| (id, instance)))
}

/// `k=v&k=v`, each part percent-encoded.
fn form_urlencoded(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

/// Percent-encoding for a form value: everything but RFC 3986's unreserved
/// characters (what SigV4 and EC2 expect).
fn encode(s: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_describe_instances_answer_is_read_with_its_next_token() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <reservationSet>
    <item>
      <reservationId>r-1</reservationId>
      <instancesSet>
        <item>
          <instanceId>i-0abc</instanceId>
          <instanceState><code>16</code><name>running</name></instanceState>
          <privateDnsName>ip-10-0-0-5.ec2.internal</privateDnsName>
          <privateIpAddress>10.0.0.5</privateIpAddress>
          <ipAddress>3.3.3.3</ipAddress>
          <networkInterfaceSet><item><privateIpAddress>10.9.9.9</privateIpAddress></item></networkInterfaceSet>
        </item>
        <item>
          <instanceId>i-0def</instanceId>
          <instanceState><code>0</code><name>pending</name></instanceState>
          <privateDnsName/>
        </item>
      </instancesSet>
    </item>
  </reservationSet>
  <nextToken>tok</nextToken>
</DescribeInstancesResponse>"#;
        let page = parse_page(xml).unwrap();
        assert_eq!(page.next_token.as_deref(), Some("tok"));
        let map: HashMap<_, _> = page.instances.into_iter().collect();
        let a = &map["i-0abc"];
        assert_eq!(
            (a.state.as_deref(), a.private_ip.as_deref(), a.public_ip.as_deref(), a.private_dns.as_deref()),
            (Some("running"), Some("10.0.0.5"), Some("3.3.3.3"), Some("ip-10-0-0-5.ec2.internal")),
            "the instance's own address, not a network interface's"
        );
        assert_eq!((map["i-0def"].state.as_deref(), map["i-0def"].private_ip.as_deref()), (Some("pending"), None));
        assert_eq!(map["i-0def"].private_dns, None, "an empty element is no value");
    }

    #[test]
    fn endpoints_follow_the_partition_and_the_fips_and_dual_stack_settings() {
        assert_eq!(regional_endpoint("eu-west-1", false, false), "https://ec2.eu-west-1.amazonaws.com");
        assert_eq!(regional_endpoint("us-gov-west-1", true, false), "https://ec2-fips.us-gov-west-1.amazonaws.com");
        assert_eq!(regional_endpoint("cn-north-1", false, false), "https://ec2.cn-north-1.amazonaws.com.cn");
        assert_eq!(regional_endpoint("us-east-1", false, true), "https://ec2.us-east-1.api.aws");
        assert_eq!(regional_endpoint("us-iso-east-1", false, false), "https://ec2.us-iso-east-1.c2s.ic.gov");
    }

    #[test]
    fn an_error_answer_gives_its_code_and_message() {
        let xml = "<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-1' does not exist</Message></Error></Errors><RequestID>x</RequestID></Response>";
        let e = error(xml, 400);
        assert_eq!(e.code(), Some("InvalidInstanceID.NotFound"));
        assert_eq!(e.message(), Some("The instance ID 'i-1' does not exist"));
        assert_eq!(error("<html>bad gateway</html>", 502).message(), Some("HTTP 502"));
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(form_urlencoded(&[("Action", "DescribeInstances"), ("NextToken", "a+b/c=")]), "Action=DescribeInstances&NextToken=a%2Bb%2Fc%3D");
    }
}
