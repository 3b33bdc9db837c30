//! EC2's DescribeInstances: the one EC2 call the bastion makes, for four
//! fields of each instance (state, private and public address, private
//! DNS name), over EC2's Query API through the library's
//! [`fleetsync::aws_query`] (the SDK's runtime, signing and retries; not
//! aws-sdk-ec2, whose one crate took 270 s alone at the end of a 9 min
//! 52 s cold dev build on two cores: BENCHMARKS.md, "Build cost").

use std::collections::HashMap;

use fleetsync::aws_query::{self, try_data, Document, ScopedDecoder, XmlDecodeError};

/// The part of an EC2 instance the bastion uses.
#[derive(Debug, Clone, Default)]
pub(crate) struct Instance {
    /// `pending`, `running`, `shutting-down`, ...
    pub state: Option<String>,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub private_dns: Option<String>,
}

/// One page of DescribeInstances.
#[derive(Debug, Default)]
struct Page {
    instances: Vec<(String, Instance)>,
    next_token: Option<String>,
}

/// A DescribeInstances client for one `SdkConfig`.
pub(crate) struct Client(aws_query::Client);

pub(crate) type Error = aws_query::Error;

impl Client {
    pub(crate) fn new(sdk: &aws_types::SdkConfig) -> Client {
        Client(aws_query::Client::new(sdk, &aws_query::EC2))
    }

    /// DescribeInstances of `ids`, every page; the instances by id.
    pub(crate) async fn describe_instances(&self, ids: &[String]) -> Result<HashMap<String, Instance>, Error> {
        let mut found = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            let numbered: Vec<(String, &str)> =
                ids.iter().enumerate().map(|(i, id)| (format!("InstanceId.{}", i + 1), id.as_str())).collect();
            let mut params: Vec<(&str, &str)> = numbered.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            if let Some(t) = &token {
                params.push(("NextToken", t));
            }
            let text = self.0.call("DescribeInstances", &params).await?;
            let page = parse_page(&text).map_err(|e| aws_query::unreadable(format!("reading EC2's DescribeInstances answer: {e}")))?;
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

/// `<DescribeInstancesResponse><reservationSet><item><instancesSet><item>`
/// and `<nextToken>`.
fn parse_page(text: &str) -> Result<Page, XmlDecodeError> {
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

fn parse_instance(item: &mut ScopedDecoder<'_, '_>) -> Result<Option<(String, Instance)>, XmlDecodeError> {
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
}
