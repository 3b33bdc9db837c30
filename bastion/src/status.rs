//! STATUS: `fleetsync status`, discover -> ask every node's agent which
//! release is live -> a report with drift flagged. It takes no lock: it
//! changes nothing.

use fleetsync::S3Url;

use crate::discover::{self, Node};
use crate::progress::Progress;
use crate::report::StatusReport;
use crate::trigger::{AddressChoice, AgentCall, Fleet, Transport};
use crate::values::Limit;

/// What `status` needs, resolved from flags and fleetsync.toml.
pub struct Status {
    pub asg: String,
    /// The source, when given: its release pointer is the "published" one.
    pub source: Option<S3Url>,
    pub transport: Transport,
    pub call: AgentCall,
    pub address: AddressChoice,
    pub batch: Option<Limit>,
}

pub async fn run(st: Status, sdk: &aws_types::SdkConfig, s3: &fleetsync::source::S3Client) -> anyhow::Result<StatusReport> {
    let (targets, skipped): (Vec<_>, Vec<_>) = discover::discover(sdk, &st.asg).await?.into_iter().partition(Node::is_target);
    let published = match &st.source {
        Some(source) => fleetsync::publish::read_pointer(s3, source).await?.map(|p| p.release_id),
        None => None,
    };
    let progress = Progress::new(targets.len());
    let fleet = Fleet::new(st.transport, st.call, None, st.address, st.batch, None, targets.len(), &progress);
    let results = fleet.run(&targets).await;
    progress.finish();
    Ok(StatusReport::new(st.asg, published, results, skipped))
}
