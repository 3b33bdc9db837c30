//! STATUS: `fleetsync status`, discover -> ask every node's agent which
//! release is live -> a report with drift flagged: a node not on the
//! group's deployed release (a published source), or not on the fleet's
//! majority release. It takes no lock: it changes nothing.

use fleetsync::store::pointer::{self, DeployState, Deployed, Found, Latest};
use fleetsync::store::Store;
use fleetsync::S3Url;

use crate::discover::{self, Node};
use crate::progress::Progress;
use crate::report::StatusReport;
use crate::trigger::{AddressChoice, AgentCall, Fleet, Transport};
use crate::values::Limit;

/// What `status` needs, resolved from flags and fleetsync.toml.
pub struct Status {
    pub asg: String,
    /// The source, when given: its store's pointers name the group's
    /// deployed release and the latest published one.
    pub source: Option<S3Url>,
    pub transport: Transport,
    pub call: AgentCall,
    pub address: AddressChoice,
    pub batch: Option<Limit>,
}

pub async fn run(st: Status, sdk: &aws_types::SdkConfig, s3: &fleetsync::source::S3Client) -> anyhow::Result<StatusReport> {
    let (targets, skipped): (Vec<_>, Vec<_>) = discover::discover(sdk, &st.asg).await?.into_iter().partition(Node::is_target);
    let (mut published, mut deployed) = (None, None);
    if let Some(source) = &st.source {
        let store = Store::of(source);
        if let Found::Value { value, .. } = pointer::read::<Latest>(s3, &store, &store.latest_key(), None).await? {
            published = Some(value.release);
        }
        if let Found::Value { value, .. } = pointer::read::<Deployed>(s3, &store, &store.deployed_key(&st.asg), None).await? {
            deployed = Some(value).filter(|d: &Deployed| d.state == DeployState::Done).map(|d| d.release);
        }
    }
    let progress = Progress::new(targets.len());
    let fleet = Fleet::new(st.transport, st.call, None, st.address, st.batch, None, targets.len(), &progress);
    let results = fleet.run(&targets).await;
    progress.finish();
    Ok(StatusReport::new(st.asg, deployed, published, results, skipped))
}
