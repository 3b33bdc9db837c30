//! Test fixtures: the local world's S3 server (started by `infra/local/test`),
//! a fresh bucket per test, sample trees, and the agent binary.
#![allow(dead_code)] // each test binary uses a different part of this

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use futures::StreamExt;

/// The local world's S3 endpoint. Tests refuse to run anywhere else: they
/// create and fill buckets, which must never happen against a real account.
pub fn endpoint() -> String {
    let ep = std::env::var("FLEETSYNC_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("the integration tests need the local world: run them with `infra/local/test` (it starts a local S3 server)")
    });
    assert!(ep.starts_with("http://127."), "FLEETSYNC_TEST_S3_ENDPOINT must be a loopback address, got {ep}");
    assert_eq!(std::env::var("AWS_ENDPOINT_URL_S3").ok().as_deref(), Some(ep.as_str()), "AWS_ENDPOINT_URL_S3 must point at the test world");
    ep
}

pub async fn client() -> aws_sdk_s3::Client {
    endpoint();
    fleetsync::source::s3_client(&fleetsync::ClientOptions::default()).await
}

/// An S3 client that reaches the world's S3 server through `endpoint` (a
/// FaultProxy in front of it).
pub async fn client_via(endpoint: &str) -> aws_sdk_s3::Client {
    assert!(endpoint.starts_with("http://127."), "{endpoint}");
    let shared = fleetsync::source::sdk_config(&fleetsync::ClientOptions::default()).await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&shared).endpoint_url(endpoint).force_path_style(true).build())
}

/// A bucket of its own for one test, so tests can run in parallel and count
/// their own requests.
pub struct Bucket {
    pub name: String,
    pub client: aws_sdk_s3::Client,
}

/// Requests the server saw for one bucket, by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requests {
    pub list: u64,
    pub get: u64,
    pub put: u64,
    pub head: u64,
    pub other: u64,
}

impl Bucket {
    pub async fn new(test: &str) -> Bucket {
        let client = client().await;
        let name = format!("t-{}-{:08x}", test.replace('_', "-"), rand::random::<u32>());
        client.create_bucket().bucket(&name).send().await.expect("create bucket");
        Bucket { name, client }
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.name, prefix)
    }

    /// The fleet lock object of group `asg` deploying `s3://BUCKET/prefix`.
    pub fn fleet_lock(&self, prefix: &str, asg: &str) -> fleetsync::fleet_lock::LockObject {
        fleetsync::fleet_lock::LockObject::for_group(&fleetsync::S3Url::parse(&self.url(prefix)).unwrap(), asg).unwrap()
    }

    pub async fn put(&self, key: &str, body: &[u8]) -> String {
        self.put_with_meta(key, body, None).await
    }

    pub async fn put_with_meta(&self, key: &str, body: &[u8], mode: Option<&str>) -> String {
        let mut req = self.client.put_object().bucket(&self.name).key(key).body(body.to_vec().into());
        if let Some(m) = mode {
            req = req.metadata("mode", m);
        }
        req.send().await.unwrap_or_else(|e| panic!("put {key}: {e:?}")).e_tag().unwrap().to_string()
    }

    /// Uploads a whole tree under `prefix`, 32 PUTs at a time.
    pub async fn put_tree(&self, prefix: &str, tree: &BTreeMap<String, Vec<u8>>) {
        futures::stream::iter(tree.iter())
            .map(|(k, v)| async move { self.put(&format!("{prefix}{k}"), v).await })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    }

    pub async fn delete(&self, key: &str) {
        self.client.delete_object().bucket(&self.name).key(key).send().await.expect("delete");
    }

    /// Uploads `body` as a multipart object (ETag `md5-N`).
    pub async fn put_multipart(&self, key: &str, body: &[u8], part: usize) {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let up = self.client.create_multipart_upload().bucket(&self.name).key(key).send().await.unwrap();
        let id = up.upload_id().unwrap();
        let mut parts = Vec::new();
        for (i, chunk) in body.chunks(part).enumerate() {
            let n = i as i32 + 1;
            let r = self
                .client
                .upload_part()
                .bucket(&self.name)
                .key(key)
                .upload_id(id)
                .part_number(n)
                .body(chunk.to_vec().into())
                .send()
                .await
                .unwrap();
            parts.push(CompletedPart::builder().part_number(n).e_tag(r.e_tag().unwrap()).build());
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .unwrap();
    }

    /// What the server has counted for this bucket so far (its Prometheus
    /// metrics, so the count is the server's, not our own claim).
    pub fn requests(&self) -> Requests {
        let url = std::env::var("FLEETSYNC_S3_METRICS").expect("FLEETSYNC_S3_METRICS is set by infra/local/test");
        let out = Command::new("curl").args(["-sf", &url]).output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut r = Requests::default();
        let needle = format!("bucket=\"{}\"", self.name);
        for line in text.lines().filter(|l| l.starts_with("SeaweedFS_s3_request_total{") && l.contains(&needle)) {
            let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            let n = n as u64;
            match line.split("type=\"").nth(1).and_then(|t| t.split('"').next()) {
                Some("LIST") => r.list += n,
                Some("GET") => r.get += n,
                Some("PUT") => r.put += n,
                Some("HEAD") => r.head += n,
                _ => r.other += n,
            }
        }
        r
    }
}

/// A codebase-like tree: nested directories, small files, deterministic.
pub fn sample_tree(files: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut tree = BTreeMap::new();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..files {
        let dir = format!("src/mod{}/sub{}", next() % 8, next() % 4);
        let len = 16 + (next() % 4000) as usize;
        let body: Vec<u8> = (0..len).map(|_| (next() % 251) as u8).collect();
        tree.insert(format!("{dir}/file{i}.php"), body);
    }
    tree.insert("index.php".into(), b"<?php echo 'hello';".to_vec());
    tree
}

/// Every regular file under `dir` with its content (skipping nothing: a
/// stray staging file would show up and fail the comparison).
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(base, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(base).unwrap().to_string_lossy().into_owned();
                let body = if ft.is_symlink() { b"<symlink>".to_vec() } else { std::fs::read(e.path()).unwrap() };
                out.insert(rel, body);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Asserts DEST holds exactly `tree`, byte for byte.
pub fn assert_tree(dest: &Path, tree: &BTreeMap<String, Vec<u8>>) {
    let got = read_tree(dest);
    let missing: Vec<_> = tree.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = got.keys().filter(|k| !tree.contains_key(*k)).take(5).collect();
    let differ: Vec<_> = tree.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).map(|(k, _)| k).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "DEST differs: missing {missing:?}, extra {extra:?}, different {differ:?}"
    );
}

/// A DEST and a state dir in one temp dir (removed on drop).
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub dest: PathBuf,
    pub state: PathBuf,
}

impl Node {
    pub fn new() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("www");
        let state = tmp.path().join("state");
        Node { tmp, dest, state }
    }

    pub fn options(&self, source: &str) -> fleetsync::PullOptions {
        fleetsync::PullOptions {
            source: fleetsync::S3Url::parse(source).unwrap(),
            dest: self.dest.clone(),
            state_dir: self.state.clone(),
            concurrency: 16,
            delete: true,
            allow_empty: false,
            dry_run: false,
            if_busy: fleetsync::IfBusy::Wait,
            client: fleetsync::ClientOptions::default(),
            owner: None,
        }
    }

    /// Pulls in-process through the library.
    pub async fn pull(&self, source: &str) -> fleetsync::PullReport {
        fleetsync::pull(&self.options(source), Arc::new(fleetsync::progress::Quiet)).await.expect("pull succeeds")
    }

    /// The agent binary, set up to pull `source` into this node.
    pub fn agent(&self, source: &str) -> Command {
        let mut c = Command::new(agent_bin());
        c.args(["pull", source, "--dest"]).arg(&self.dest).arg("--state-dir").arg(&self.state).arg("--json");
        c
    }
}

/// Runs a command that may or may not print a report: (exit code, the JSON
/// report on stdout or Null when there is none, stderr).
pub fn run_report(cmd: &mut Command) -> (i32, serde_json::Value, String) {
    let out = cmd.output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap(), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Checks a fleet report against docs/fleet-report.schema.json (with
/// python's jsonschema, from the world's venv).
pub fn check_fleet_schema(report: &serde_json::Value) {
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/fleet-report.schema.json");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), report.to_string()).unwrap();
    let check = Command::new("python3")
        .args(["-c", "import json, sys, jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2])))"])
        .arg(file.path())
        .arg(schema)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}
{report}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Runs a command and parses the JSON report it printed on stdout.
pub fn run_json(cmd: &mut Command) -> (i32, serde_json::Value, String) {
    let out = cmd.output().expect("agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON report ({e}): {stdout}\nstderr: {stderr}"));
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// Path to a freshly built `fleetsync-agent` (built once per test binary,
/// so `cargo test` alone never runs a stale agent).
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| bin("fleetsync-agent", "fleetsync-agent")).clone()
}

/// Makes sure the workspace's binaries are built and returns the path of
/// `name`. Integration tests of the root package cannot use
/// `CARGO_BIN_EXE_*` for binaries of other workspace members. The build
/// selects the whole workspace, exactly as `infra/local/test` does before
/// testing, so it is a no-op there: building one package alone may resolve
/// features differently and recompile the SDK crates.
pub fn bin(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/debug
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--workspace"])
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {package} failed");
    profile_dir.join(name)
}

/// The local world's moto (AutoScaling, EC2), for a proxy in front of it.
pub fn moto() -> String {
    std::env::var("FLEETSYNC_MOTO").expect("run the tests with infra/local/test")
}

/// The local world's SSM emulator, for a proxy in front of it.
pub fn ssm() -> String {
    std::env::var("AWS_ENDPOINT_URL_SSM").expect("run the tests with infra/local/test")
}

/// Runs `infra/local/fleet.py` (moto's AutoScaling and EC2, and the
/// simulated instances' sshd) and parses the JSON it prints.
pub fn fleet(args: &[&str]) -> serde_json::Value {
    fleet_with_env(args, &[])
}

pub fn fleet_with_env(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    assert!(std::env::var("FLEETSYNC_MOTO").is_ok_and(|m| m.starts_with("http://127.")), "run the tests with infra/local/test");
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/local/fleet.py"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "fleet.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// A name no other test uses (groups live as long as the world).
pub fn unique(name: &str) -> String {
    format!("{name}-{:06x}", rand::random::<u32>() & 0xffffff)
}

/// One group's simulated instances (their roots, sshd and SSM
/// registration), stopped when dropped.
pub struct Nodes {
    pub dir: tempfile::TempDir,
    pub info: serde_json::Value,
}

impl Nodes {
    /// A new group of `size` instances named after `name`, each with its
    /// sshd and registered with the SSM emulator.
    pub fn group(name: &str, size: u32) -> (String, Nodes) {
        let asg = unique(name);
        fleet(&["create", &asg, "--size", &size.to_string()]);
        let nodes = Nodes::start(&asg, &[]);
        (asg, nodes)
    }

    /// A new group whose nodes' sessions get `env` besides the world's.
    pub fn group_with_env(name: &str, size: u32, env: &[(&str, &str)]) -> (String, Nodes) {
        let asg = unique(name);
        fleet(&["create", &asg, "--size", &size.to_string()]);
        let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let args: Vec<&str> = pairs.iter().flat_map(|p| ["--env", p.as_str()]).collect();
        let nodes = Nodes::start(&asg, &args);
        (asg, nodes)
    }

    /// A new group reached through SSM only (no sshd), in its own subnet
    /// 127.0.K.0/24 so that large groups leave the shared one its addresses.
    pub fn group_ssm(name: &str, size: u32, subnet: u32) -> (String, Nodes) {
        let asg = unique(name);
        fleet(&["create", &asg, "--size", &size.to_string(), "--subnet", &subnet.to_string()]);
        let nodes = Nodes::start(&asg, &["--no-sshd"]);
        (asg, nodes)
    }

    /// Holds the agent's node lock on the node at `root` until the file is
    /// dropped: a pull there waits, so a deploy stays busy as long as a test
    /// needs it to.
    pub fn hold_agent_lock(root: &std::path::Path) -> std::fs::File {
        std::fs::create_dir_all(root.join("state")).unwrap();
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(root.join("state/node.lock")).unwrap();
        file.lock().unwrap();
        file
    }

    /// Starts sshd for instances of `asg` that have none yet, in the same
    /// directory as `nodes` (same keys and known_hosts); returns that directory.
    pub fn up_in(asg: &str, nodes: &Nodes) -> PathBuf {
        let agent_dir = agent_bin().parent().unwrap().display().to_string();
        fleet_with_env(&["nodes-up", asg, "--dir", &nodes.dir.path().display().to_string()], &[("FLEETSYNC_AGENT_DIR", &agent_dir)]);
        nodes.dir.path().to_path_buf()
    }

    pub fn ssh_config(&self) -> String {
        self.info["ssh_config"].as_str().unwrap().to_string()
    }

    /// Stops one node's sshd, as if the instance were unreachable.
    pub fn stop(&self, instance_id: &str) {
        let pid: i32 = std::fs::read_to_string(self.dir.path().join(instance_id).join("sshd.pid")).unwrap().trim().parse().unwrap();
        Command::new("kill").arg(pid.to_string()).status().unwrap();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn start(asg: &str, extra: &[&str]) -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        let agent_dir = agent_bin().parent().unwrap().display().to_string();
        let mut args = vec!["nodes-up", asg, "--dir", dir.path().to_str().unwrap()];
        args.extend(extra);
        let info = fleet_with_env(&args, &[("FLEETSYNC_AGENT_DIR", &agent_dir)]);
        Nodes { dir, info }
    }

    pub fn ssh(&self, ip: &str, command: &str, extra: &[&str]) -> std::process::Output {
        Command::new("ssh").arg("-F").arg(self.info["ssh_config"].as_str().unwrap()).args(extra).arg(ip).arg(command).output().unwrap()
    }

    pub fn list(&self) -> Vec<(String, PathBuf)> {
        self.info["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["ip"].as_str().unwrap().to_string(), PathBuf::from(n["root"].as_str().unwrap())))
            .collect()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        fleet(&["nodes-down", "--dir", &self.dir.path().display().to_string()]);
    }
}

/// `fleetsync sync --via VIA ... --json` of `source` to `dest` on the
/// group's nodes (their state dir is /srv/state, inside each node's root).
pub fn deploy_command(asg: &str, source: &str, dest: &str, nodes: &Nodes, via: &str) -> Command {
    let mut c = Command::new(bin("fleetsync-bastion", "fleetsync"));
    c.args(["sync", "--via", via, "--group", asg, "--source", source, "--dest", dest, "--json"])
        .args(["--ssh-config", &nodes.ssh_config()]);
    c
}

/// Runs `deploy_command` plus `extra`: (exit code, JSON report or Null, stderr).
pub fn deploy(asg: &str, source: &str, dest: &str, nodes: &Nodes, via: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    run_report(deploy_command(asg, source, dest, nodes, via).args(extra))
}

/// The group's instance IDs, sorted (the order the bastion starts them in).
pub fn ids(asg: &str) -> Vec<String> {
    let mut ids: Vec<String> =
        fleet(&["describe", asg])["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

/// The report's entry for one node.
pub fn node_in<'a>(report: &'a serde_json::Value, instance_id: &str) -> &'a serde_json::Value {
    report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["instance_id"] == instance_id)
        .unwrap_or_else(|| panic!("{instance_id} not in {report}"))
}

/// A new directory holding `files` (relative path, content) as files.
pub fn tree_dir<K: AsRef<str>, V: AsRef<[u8]>>(files: impl IntoIterator<Item = (K, V)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (k, v) in files {
        let p = dir.path().join(k.as_ref());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    }
    dir
}

/// A build directory of `files` PHP files whose contents carry `tag`.
pub fn build_dir(files: usize, tag: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..files {
        let p = dir.path().join(format!("app/f{i}.php"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("<?php // {tag} {i}")).unwrap();
    }
    dir
}

/// `fleetsync publish DIR --source TARGET --json` plus `extra`: (exit code, JSON report or Null, stderr).
pub fn publish(dir: &Path, target: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    run_report(Command::new(bin("fleetsync-bastion", "fleetsync")).arg("publish").arg(dir).args(["--source", target, "--json"]).args(extra))
}

/// infra/local/faultproxy.py on a free loopback port in front of
/// `upstream`, stopped when dropped.
pub struct FaultProxy {
    child: std::process::Child,
    pub url: String,
    stats: tempfile::NamedTempFile,
}

impl FaultProxy {
    /// `args`: the proxy's options (`--rate`, `--seed`, `--api`, ...).
    pub fn start(upstream: &str, args: &[&str]) -> FaultProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let stats = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/local/faultproxy.py"))
            .args(["--port", &port.to_string(), "--upstream", upstream])
            .args(args)
            .arg("--stats")
            .arg(stats.path())
            .spawn()
            .unwrap();
        // Owned from here: if it never listens, the panic's drop stops it.
        let proxy = FaultProxy { child, url: format!("http://127.0.0.1:{port}"), stats };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the fault proxy did not start");
    }

    /// Its counts: requests, faults, and each kind of fault.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.stats.path()).unwrap_or_else(|_| "{}".into())).unwrap_or_default()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// infra/local/web.py (a real nginx and PHP-FPM, or visiting clients): a
/// child process of the test, stopped (stdin closed, then killed) on drop.
pub struct Web {
    child: std::process::Child,
}

impl Web {
    /// Starts `web.py ARGS` and waits for its first line; returns it too.
    pub fn start(args: &[&str]) -> (Web, String) {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/local/web.py"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        (Web { child }, line.trim().to_string())
    }

    /// Closes its stdin and waits for it to end.
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Web {
    /// Stdin closed, web.py stops nginx and PHP-FPM and exits; killed only
    /// if it has not within 15 s (its servers then die with it: they are
    /// started with PR_SET_PDEATHSIG).
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        for _ in 0..150 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET of `path` from the web server on 127.0.0.1:`port`: the status and
/// the body.
pub fn http_get(port: &str, path: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, raw[split + 4..].to_vec())
}
