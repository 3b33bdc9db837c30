//! ALARMS: the CloudWatch alarms a deploy watches (`sync --alarm NAME`),
//! as CodeDeploy watches a deployment group's alarms.
//!
//! - before anything is locked, each alarm must exist (a misspelt name
//!   would watch nothing) and none may be in ALARM already: the deploy
//!   could not tell the harm it does from what was there;
//! - from the first node to the end of the last bake, a background task
//!   reads them every [`POLL`]; the first one found in ALARM stops the
//!   deploy as a lost lock does (no new node starts) and fails it, and with
//!   `--rollback-on-failure` the fleet goes back. One more read ends the
//!   pass, so a deploy shorter than a poll is watched too;
//! - alarms that cannot be read fail the deploy too once [`UNREAD_LIMIT`]
//!   reads in a row have failed (CodeDeploy's default): a deploy that cannot
//!   see its alarms is not watched.
//!
//! One call, DescribeAlarms, through [`fleetsync::aws_query`] rather than
//! aws-sdk-cloudwatch: the generated crate would add a minute to the cold
//! build for one operation (BENCHMARKS.md, "Build cost").

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fleetsync::aws_query::{self, try_data, Document, ScopedDecoder, XmlDecodeError, CLOUDWATCH};
use fleetsync::source::ApiFailure;

use crate::api::api_error;
use crate::progress::log;

/// The permission the watch needs.
const NEEDS: &str = "cloudwatch:DescribeAlarms";

/// How often the alarms are read during a deploy. CloudWatch evaluates a
/// metric alarm once per period (a minute at best), so reading more often
/// would only cost calls.
const POLL: Duration = Duration::from_secs(5);

/// Failed reads in a row after which the deploy fails.
const UNREAD_LIMIT: u32 = 3;

/// One alarm as DescribeAlarms gives it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Alarm {
    pub name: String,
    /// `OK`, `ALARM` or `INSUFFICIENT_DATA` (which does not stop a deploy:
    /// a new alarm or a quiet metric has it).
    pub state: String,
    /// CloudWatch's words for why it is in that state.
    pub reason: String,
}

impl Alarm {
    fn firing(&self) -> bool {
        self.state == "ALARM"
    }

    /// How a deploy names the alarm that stopped it.
    fn describe(&self) -> String {
        format!("alarm {} is in ALARM: {}", self.name, self.reason)
    }
}

/// The alarms one deploy watches.
pub(crate) struct Alarms {
    client: aws_query::Client,
    names: Vec<String>,
    /// Failed reads in a row (of the watch's polls and the last read alike).
    unread: AtomicU32,
}

impl Alarms {
    pub(crate) fn new(sdk: &aws_types::SdkConfig, names: Vec<String>) -> Alarms {
        Alarms { client: aws_query::Client::new(sdk, &CLOUDWATCH), names, unread: AtomicU32::new(0) }
    }

    /// Each named alarm's state (metric and composite alarms alike), in the
    /// order the names were given; an alarm CloudWatch does not know is
    /// absent.
    async fn read(&self) -> anyhow::Result<Vec<Alarm>> {
        let numbered: Vec<(String, &str)> =
            self.names.iter().enumerate().map(|(i, n)| (format!("AlarmNames.member.{}", i + 1), n.as_str())).collect();
        let mut params: Vec<(&str, &str)> = numbered.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        params.extend([("AlarmTypes.member.1", "MetricAlarm"), ("AlarmTypes.member.2", "CompositeAlarm")]);
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut page_params = params.clone();
            if let Some(t) = &token {
                page_params.push(("NextToken", t));
            }
            let text = self
                .client
                .call("DescribeAlarms", &page_params)
                .await
                .map_err(|e| api_error("DescribeAlarms", &ApiFailure::from_sdk(&e), NEEDS))?;
            let (alarms, next) = parse(&text)
                .map_err(|e| anyhow::anyhow!("reading CloudWatch's DescribeAlarms answer from {}: {e}", self.client.endpoint()))?;
            found.extend(alarms);
            match next.filter(|t| !t.is_empty() && Some(t) != token.as_ref()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(self.names.iter().filter_map(|n| found.iter().find(|a| &a.name == n).cloned()).collect())
    }

    /// The check before a deploy: every alarm exists and none is in ALARM.
    pub(crate) async fn check(&self) -> anyhow::Result<()> {
        let alarms = self.read().await?;
        let missing: Vec<&str> = self.names.iter().filter(|n| !alarms.iter().any(|a| &a.name == *n)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Err(fleetsync::Error::Config(format!(
                "--alarm: CloudWatch at {} has no alarm named {} in this region; give the alarm's exact name (aws cloudwatch describe-alarms)",
                self.client.endpoint(),
                missing.join(", ")
            ))
            .into());
        }
        if let Some(a) = alarms.iter().find(|a| a.firing()) {
            return Err(fleetsync::Error::Config(format!(
                "--alarm: {}; a deploy watching it would fail at once: wait until it is OK, or deploy without --alarm {}",
                a.describe(),
                a.name
            ))
            .into());
        }
        Ok(())
    }

    /// Starts watching: the alarms are read every [`POLL`] until the guard
    /// is dropped.
    pub(crate) fn watch(self) -> Watch {
        let fired: Fired = Arc::default();
        let alarms = Arc::new(self);
        let task = tokio::spawn({
            let (alarms, fired) = (alarms.clone(), fired.clone());
            async move {
                loop {
                    tokio::time::sleep(POLL).await;
                    alarms.read_into(&fired).await;
                    if fired.get().is_some() {
                        return;
                    }
                }
            }
        });
        Watch { alarms, fired, task }
    }

    /// One read: the first alarm in ALARM, or the last of too many failed
    /// reads, goes into `fired`.
    async fn read_into(&self, fired: &Fired) {
        match self.read().await {
            Ok(alarms) => {
                self.unread.store(0, SeqCst);
                if let Some(a) = alarms.iter().find(|a| a.firing()) {
                    let _ = fired.set(a.describe());
                }
            }
            Err(e) => {
                let unread = self.unread.fetch_add(1, SeqCst) + 1;
                log(&format!("warning: reading the alarms failed ({unread} of {UNREAD_LIMIT} failures in a row allowed): {e:#}"));
                if unread >= UNREAD_LIMIT {
                    let _ = fired.set(format!("the alarms could not be read {UNREAD_LIMIT} times in a row: {e:#}"));
                }
            }
        }
    }
}

/// Why the alarms stopped the deploy, once they have. Shared with the
/// fleet, whose `stop_reason` reads it before each node starts.
pub(crate) type Fired = Arc<OnceLock<String>>;

/// The background watch; dropping it stops the polling.
pub(crate) struct Watch {
    alarms: Arc<Alarms>,
    fired: Fired,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    /// The flag the fleet checks.
    pub(crate) fn fired(&self) -> Fired {
        self.fired.clone()
    }

    /// Reads the alarms at once (the end of a pass), and says why the
    /// deploy failed on them, if it did.
    pub(crate) async fn read_now(&self) -> Option<String> {
        if self.fired.get().is_none() {
            self.alarms.read_into(&self.fired).await;
        }
        self.fired.get().cloned()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `<DescribeAlarmsResponse><DescribeAlarmsResult>`: its
/// `<MetricAlarms>` and `<CompositeAlarms>` members and `<NextToken>`.
fn parse(text: &str) -> Result<(Vec<Alarm>, Option<String>), XmlDecodeError> {
    let mut alarms = Vec::new();
    let mut next = None;
    let mut doc = Document::new(text);
    let mut root = doc.root_element()?;
    while let Some(mut result) = root.next_tag() {
        if !result.start_el().matches("DescribeAlarmsResult") {
            continue;
        }
        while let Some(mut field) = result.next_tag() {
            if field.start_el().matches("NextToken") {
                next = Some(try_data(&mut field)?.to_string());
            } else if field.start_el().matches("MetricAlarms") || field.start_el().matches("CompositeAlarms") {
                while let Some(mut member) = field.next_tag() {
                    alarms.push(parse_alarm(&mut member)?);
                }
            }
        }
    }
    Ok((alarms, next))
}

fn parse_alarm(member: &mut ScopedDecoder) -> Result<Alarm, XmlDecodeError> {
    let mut alarm = Alarm::default();
    while let Some(mut field) = member.next_tag() {
        let el = field.start_el();
        let slot = if el.matches("AlarmName") {
            &mut alarm.name
        } else if el.matches("StateValue") {
            &mut alarm.state
        } else if el.matches("StateReason") {
            &mut alarm.reason
        } else {
            continue;
        };
        *slot = try_data(&mut field)?.to_string();
    }
    Ok(alarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_and_composite_alarms_and_the_next_token_are_read() {
        let xml = r#"<DescribeAlarmsResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/"><DescribeAlarmsResult>
            <CompositeAlarms><member><AlarmName>site</AlarmName><StateValue>ALARM</StateValue><StateReason>children &amp; more</StateReason></member></CompositeAlarms>
            <MetricAlarms><member><AlarmName>5xx</AlarmName><Dimensions><member><Name>x</Name></member></Dimensions><StateValue>OK</StateValue><StateReason>fine</StateReason></member></MetricAlarms>
            <NextToken>t2</NextToken></DescribeAlarmsResult></DescribeAlarmsResponse>"#;
        let (alarms, next) = parse(xml).unwrap();
        let site = Alarm { name: "site".into(), state: "ALARM".into(), reason: "children & more".into() };
        let five = Alarm { name: "5xx".into(), state: "OK".into(), reason: "fine".into() };
        assert_eq!(alarms, [site, five]);
        assert_eq!(next.as_deref(), Some("t2"));
        assert!(alarms[0].firing() && !alarms[1].firing());
    }
}
