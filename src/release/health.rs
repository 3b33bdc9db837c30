//! The health check after a switch (`--health-url`): the node asks its own
//! web server for a URL until it answers, so that "the agent exited 0" is
//! not all a deploy knows. A release that goes live but does not serve
//! (a fatal error in its bootstrap, a missing extension, a config cache
//! pointing at the old release) fails the pull, and with
//! `--rollback-on-failure` the previous release is live again.
//!
//! Healthy is a 2xx answer. A redirect is not followed and does not count:
//! nginx's usual redirect of http:// to https:// answers 301 whether PHP
//! works or not, so the URL must name the page itself. Each request may take
//! [`REQUEST_TIMEOUT`]; failures are retried every [`PAUSE`] until the
//! check's own timeout (`--health-timeout`) is spent, since a web server
//! may need a moment after a switch (PHP-FPM compiling the new release, an
//! app restarted by `--after-switch`).

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::report::HealthReport;

/// Default for `--health-timeout`: how long a release has to answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// One request's limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Between a failed request and the next.
const PAUSE: Duration = Duration::from_secs(1);

/// Checks `url` once, at start: an http:// or https:// URL with a host
/// (usually the node's own web server, e.g. http://127.0.0.1/health).
pub fn parse(url: &str) -> Result<hyper::Uri> {
    let refuse = |why: &str| {
        Error::Config(format!(
            "--health-url {url:?} {why}: give an http:// or https:// URL the node can reach, e.g. http://127.0.0.1/health"
        ))
    };
    let uri: hyper::Uri = url.parse().map_err(|_| refuse("is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(uri),
        Some("http" | "https") => Err(refuse("has no host")),
        _ => Err(refuse("is not http(s)")),
    }
}

/// Requests `url` until it answers 2xx or `within` is spent.
pub async fn check(url: &str, within: Duration) -> HealthReport {
    let t0 = Instant::now();
    let mut report = HealthReport { url: url.to_string(), ok: false, status: None, attempts: 0, duration_ms: 0, error: None };
    let uri = match parse(url) {
        Ok(uri) => uri,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    let client = match client() {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    loop {
        report.attempts += 1;
        let request = hyper::Request::get(uri.clone())
            .header(hyper::header::USER_AGENT, concat!("fleetsync-agent/", env!("CARGO_PKG_VERSION"), " health-check"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("a GET of a parsed URI is a valid request");
        let left = within.saturating_sub(t0.elapsed()).max(Duration::from_millis(100));
        match tokio::time::timeout(REQUEST_TIMEOUT.min(left), client.request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status();
                report.status = Some(status.as_u16());
                if status.is_success() {
                    report.ok = true;
                    report.error = None;
                    break;
                }
                report.error = Some(format!("HTTP {}", status.as_u16()));
            }
            Ok(Err(e)) => report.error = Some(crate::source::error_chain(&e)),
            Err(_) => report.error = Some(format!("no answer within {} ms", REQUEST_TIMEOUT.min(left).as_millis())),
        }
        if t0.elapsed() + PAUSE >= within {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    report.duration_ms = t0.elapsed().as_millis() as u64;
    report
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// An HTTP/1.1 client for http:// and https:// (the system's CA roots,
/// aws-lc-rs as rustls's provider: what the S3 client already links).
fn client() -> Result<Client> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS for the health check: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_with_a_host_are_taken() {
        assert!(parse("http://127.0.0.1/health").is_ok());
        assert!(parse("https://localhost:8443/up?x=1").is_ok());
        for bad in ["ftp://127.0.0.1/", "127.0.0.1/health", "/health", "http:///x", "not a url"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("--health-url") && e.contains("http://127.0.0.1/health"), "{bad}: {e}");
        }
    }
}
