//! AGENT-DIST: `fleetsync agent-dist upload DIR s3://BUCKET/dist` puts the
//! agent where the CloudFormation user-data installs it from: each
//! architecture's binary (`fleetsync-agent-x86_64`, `fleetsync-agent-aarch64`),
//! the systemd units, and `SHA256SUMS`, which the user-data checks the
//! binary against before it installs it.
//!
//! DIR is what `infra/dist/build` wrote. Every file is checked against DIR's
//! own SHA256SUMS before anything is uploaded, so a copy corrupted on the
//! way to the bastion never reaches a node. The remote SHA256SUMS is merged,
//! not replaced (an arm64 agent uploaded from an arm64 host keeps the x86_64
//! line), and written last: a boot that reads the new sums finds the new
//! files; one that read the old sums and then got a new binary retries (the
//! user-data does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetsync::source::ApiFailure;
use fleetsync::store::digest::Digest;
use fleetsync::S3Url;
use serde::Serialize;

/// The sums file, in DIR and beside the uploads.
pub const SUMS: &str = "SHA256SUMS";

/// Largest remote SHA256SUMS read back (a few lines per architecture).
const MAX_SUMS_BYTES: usize = 64 * 1024;

/// Tries at the merged sums' conditional write: another upload (say, the
/// other architecture's) writing them at the same moment makes ours re-read
/// and merge again instead of dropping its lines.
const SUMS_TRIES: usize = 5;

/// What was uploaded.
#[derive(Debug, Serialize)]
pub struct Uploaded {
    pub dest: String,
    /// File name -> SHA-256, as the remote SHA256SUMS now says.
    pub files: BTreeMap<String, String>,
}

/// Uploads the agent files of `dir` under `dest`, then the merged sums.
pub async fn upload(client: &aws_sdk_s3::Client, dir: &Path, dest: &S3Url) -> anyhow::Result<Uploaded> {
    let local = checked_files(dir)?;
    for (name, (path, _)) in &local {
        let body = aws_sdk_s3::primitives::ByteStream::from_path(path).await.with_context(|| format!("reading {}", path.display()))?;
        put(client, dest, name, body, None).await?;
    }
    for _ in 0..SUMS_TRIES {
        let (mut sums, etag) = remote_sums(client, dest).await?;
        sums.extend(local.iter().map(|(name, (_, digest))| (name.clone(), digest.to_string())));
        let text: String = sums.iter().map(|(name, hex)| format!("{hex}  {name}\n")).collect();
        if put(client, dest, SUMS, text.into_bytes().into(), Some(etag)).await? {
            return Ok(Uploaded { dest: dest.to_string(), files: sums });
        }
    }
    bail!("s3://{}/{}: other uploads kept changing it; run agent-dist upload again", dest.bucket, key_of(dest, SUMS))
}

/// The agent's files named in DIR/SHA256SUMS (not the CLI's binary: nodes
/// do not run it), each checked against its sum.
fn checked_files(dir: &Path) -> anyhow::Result<BTreeMap<String, (PathBuf, Digest)>> {
    let sums_path = dir.join(SUMS);
    let text = std::fs::read_to_string(&sums_path)
        .map_err(|e| bad(format!("reading {}: {e} (DIR is the output directory of infra/dist/build)", sums_path.display())))?;
    let mut files = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let Some((hex, name)) = line.split_once("  ") else {
            return Err(bad(format!("{} line {}: not `SHA256  NAME`", sums_path.display(), n + 1)));
        };
        if !name.starts_with("fleetsync-agent") {
            continue;
        }
        if name.contains('/') || name.starts_with('.') {
            return Err(bad(format!("{} line {}: {name:?} is not a file name in DIR", sums_path.display(), n + 1)));
        }
        let want: Digest = hex.parse().map_err(|_| bad(format!("{} line {}: {hex:?} is not a SHA-256", sums_path.display(), n + 1)))?;
        let path = dir.join(name);
        let file = std::fs::File::open(&path).map_err(|e| bad(format!("opening {} (named in {SUMS}): {e}", path.display())))?;
        let got = Digest::of_reader(file).with_context(|| format!("reading {}", path.display()))?;
        if got != want {
            return Err(bad(format!(
                "{}: its SHA-256 is {got}, not {want} as {SUMS} says: the copy is damaged; build it again with infra/dist/build",
                path.display()
            )));
        }
        files.insert(name.to_string(), (path, got));
    }
    if !files.keys().any(|n| n.starts_with("fleetsync-agent-")) {
        return Err(bad(format!(
            "{} names no agent binary (fleetsync-agent-ARCH): is DIR the output of infra/dist/build?",
            sums_path.display()
        )));
    }
    Ok(files)
}

/// A problem with DIR: the user's to fix, so a configuration error (exit 2).
fn bad(message: String) -> anyhow::Error {
    fleetsync::Error::Config(message).into()
}

/// The remote SHA256SUMS as name -> hex (empty when there is none yet),
/// and its ETag (None when there is none).
async fn remote_sums(client: &aws_sdk_s3::Client, dest: &S3Url) -> anyhow::Result<(BTreeMap<String, String>, Option<String>)> {
    let key = key_of(dest, SUMS);
    let out = match client.get_object().bucket(&dest.bucket).key(&key).send().await {
        Ok(out) => out,
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            // None yet: 404, or 403 to a caller whose s3:ListBucket is
            // limited to a prefix (see `store::absent_by_listing`).
            if f.status == Some(404)
                || (f.status == Some(403) && !f.is_credentials() && fleetsync::store::absent_by_listing(client, &dest.bucket, &key).await)
            {
                return Ok((BTreeMap::new(), None));
            }
            bail!("reading s3://{}/{key} failed: {} ({})", dest.bucket, f.message, f.hint());
        }
    };
    let etag = out.e_tag().map(str::to_string);
    let body = fleetsync::store::collect_limited(out.body, MAX_SUMS_BYTES, &format!("s3://{}/{key}", dest.bucket)).await?;
    let text = String::from_utf8_lossy(&body);
    let sums = text.lines().filter_map(|l| l.split_once("  ")).map(|(hex, name)| (name.to_string(), hex.to_string())).collect();
    Ok((sums, etag))
}

/// Puts `name`; with `expect`, only over that ETag (`Some(None)`: only
/// when absent). False when the condition failed.
async fn put(
    client: &aws_sdk_s3::Client,
    dest: &S3Url,
    name: &str,
    body: aws_sdk_s3::primitives::ByteStream,
    expect: Option<Option<String>>,
) -> anyhow::Result<bool> {
    let key = key_of(dest, name);
    let conditional = expect.is_some();
    let mut request = client.put_object().bucket(&dest.bucket).key(&key).body(body);
    request = match expect {
        Some(Some(etag)) => request.if_match(etag),
        Some(None) => request.if_none_match("*"),
        None => request,
    };
    match request.send().await {
        Ok(_) => Ok(true),
        Err(e) => {
            let f = ApiFailure::from_sdk(&e);
            // 412: changed since we read it; 409: a conditional write racing ours.
            if conditional && matches!(f.status, Some(412 | 409)) {
                return Ok(false);
            }
            bail!("uploading s3://{}/{key} failed: {} ({})", dest.bucket, f.message, f.hint())
        }
    }
}

fn key_of(dest: &S3Url, name: &str) -> String {
    match dest.prefix.trim_end_matches('/') {
        "" => name.to_string(),
        p => format!("{p}/{name}"),
    }
}
