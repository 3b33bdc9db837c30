//! Boot-time convergence on the local world: an instance the Auto Scaling
//! Group launches after a publish comes up on the published release by
//! running what the systemd unit runs (`infra/systemd/fleetsync-agent.service`)
//! with its /etc/fleetsync/agent.toml; and the user-data's install step,
//! which puts the agent on the instance in the first place.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fleet, ids, read_tree, Nodes};

/// The unit's ExecStart, run as systemd runs it: `env` finds the agent on
/// the PATH (the node's, here).
fn unit_command() -> String {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/systemd/fleetsync-agent.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has an ExecStart");
    assert!(exec.starts_with("/usr/bin/env fleetsync-agent "), "{exec}");
    exec.to_string()
}

#[tokio::test]
async fn an_instance_launched_after_a_publish_boots_onto_the_published_release() {
    let b = common::Bucket::new("boot").await;
    let build = common::build_dir(12, "boot");
    let (code, _, stderr) = common::publish(build.path(), &b.url("app"), &["--release-id", "boot-1"]);
    assert_eq!(code, 0, "{stderr}");

    let (asg, nodes) = Nodes::group("boot", 1);
    let before = ids(&asg);
    fleet(&["scale", &asg, "2"]);
    let new = ids(&asg).into_iter().find(|i| !before.contains(i)).expect("the group launched an instance");
    Nodes::up_in(&asg, &nodes);
    let root = nodes.dir.path().join(&new).join("srv");
    std::fs::write(
        root.join("etc/fleetsync/agent.toml"),
        format!("source = \"{}\"\ndest = \"/srv/www\"\nmode = \"releases\"\n", b.url("app")),
    )
    .unwrap();

    let ip = common::fleet(&["describe", &asg])["instances"].as_array().unwrap().iter().find(|i| i["id"] == new.as_str()).unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let out = nodes.ssh(&ip, &unit_command(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["release"]["id"], "boot-1", "{report}");
    assert_eq!(std::fs::read_link(root.join("www/current")).unwrap(), Path::new("releases/boot-1"));
    assert_eq!(read_tree(&root.join("www/current")), read_tree(build.path()));
}

/// The agent binary, its units and their SHA256SUMS, as `infra/dist/build`
/// leaves them, in a new directory; and the binary's bytes.
fn dist_dir() -> (tempfile::TempDir, Vec<u8>) {
    let arch = std::env::consts::ARCH;
    let dist = tempfile::tempdir().unwrap();
    let agent = std::fs::read(common::agent_bin()).unwrap();
    std::fs::write(dist.path().join(format!("fleetsync-agent-{arch}")), &agent).unwrap();
    for unit in ["fleetsync-agent.service", "fleetsync-agent.timer"] {
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/systemd").join(unit), dist.path().join(unit)).unwrap();
    }
    let sums = Command::new("sh")
        .arg("-c")
        .arg(format!("sha256sum fleetsync-agent-{arch} fleetsync-agent.service fleetsync-agent.timer > SHA256SUMS"))
        .current_dir(dist.path())
        .status()
        .unwrap();
    assert!(sums.success());
    (dist, agent)
}

/// `fleetsync agent-dist upload DIR s3://BUCKET/dist`.
fn upload(b: &common::Bucket, dir: &Path) -> std::process::Output {
    upload_via(b, dir, &common::endpoint())
}

/// [`upload`] with S3 reached at `endpoint`.
fn upload_via(b: &common::Bucket, dir: &Path, endpoint: &str) -> std::process::Output {
    Command::new(common::bin("fleetsync-bastion", "fleetsync"))
        .arg("agent-dist")
        .arg("upload")
        .arg(dir)
        .arg(b.url("dist"))
        .env("AWS_ENDPOINT_URL_S3", endpoint)
        .output()
        .unwrap()
}

/// The template's user-data as an instance runs it, with S3 reached
/// through `proxy` (which refuses a request without the payload hash
/// header, as S3 does) and files installed under `root`.
fn user_data(b: &common::Bucket, proxy: &common::FaultProxy, root: &Path) -> Command {
    let mut c = Command::new("bash");
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/aws/user-data.sh"))
        .env("FLEETSYNC_BUCKET", &b.name)
        .env("FLEETSYNC_PREFIX", "app")
        .env("FLEETSYNC_DEST", "/var/www/app")
        .env("FLEETSYNC_GROUP", "web")
        .env("FLEETSYNC_HOOK", "fleetsync-first-pull")
        .env("FLEETSYNC_INSTANCE_ID", "i-0123456789abcdef0")
        .env("FLEETSYNC_S3_URL", format!("{}/{}", proxy.url, b.name))
        .env("FLEETSYNC_AUTOSCALING_URL", std::env::var("AWS_ENDPOINT_URL_AUTO_SCALING").unwrap())
        .env("FLEETSYNC_INSTALL_ROOT", root)
        .env("FLEETSYNC_RETRY_PAUSE", "0");
    c
}

/// The Auto Scaling API's lifecycle calls, as infra/local/lifecycle_standin.py
/// answers them (checking each SigV4 signature); stopped on drop.
struct Lifecycle {
    child: std::process::Child,
    url: String,
    log: tempfile::NamedTempFile,
}

impl Lifecycle {
    fn start() -> Lifecycle {
        use std::io::BufRead;
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/local/lifecycle_standin.py"))
            .arg("--log")
            .arg(log.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut port).unwrap();
        let url = format!("http://127.0.0.1:{}", port.trim());
        Lifecycle { child, url, log }
    }

    /// Every call it was sent, in order.
    fn calls(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.log.path()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fleetsync agent-dist upload`, then the user-data's install step as an
/// instance runs it (FLEETSYNC_STEP=install; python3 signs the requests,
/// or the AWS CLI): the agent it installs is the one uploaded, byte for
/// byte. A binary that does not match SHA256SUMS is never installed and
/// the launch is abandoned; so is an instance whose architecture has no
/// binary.
#[tokio::test]
async fn the_user_data_installs_the_uploaded_agent_and_refuses_a_corrupted_one() {
    let b = common::Bucket::new("dist").await;
    let arch = std::env::consts::ARCH;
    let (dist, agent) = dist_dir();

    // A damaged local copy never leaves the bastion.
    let damaged = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dist.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), damaged.path().join(e.file_name())).unwrap();
    }
    std::fs::write(damaged.path().join(format!("fleetsync-agent-{arch}")), &agent[..agent.len() - 1]).unwrap();
    let out = upload(&b, damaged.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is damaged") && stderr.lines().count() == 1, "{stderr}");

    // The first upload, by a caller that may list only the source prefix:
    // S3 answers the read of the SHA256SUMS not there yet 403, not 404.
    let listing_app_only = common::FaultProxy::start(&common::endpoint(), &["--rate", "0", "--list-prefixes", "app/"]);
    let out = upload_via(&b, dist.path(), &listing_app_only.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(listing_app_only.stats()["denied"], 1, "the missing SHA256SUMS was answered 403");

    let proxy = common::FaultProxy::start(&common::endpoint(), &["--rate", "0"]);
    let install = |root: &Path, extra: &[(&str, &str)]| {
        let out = user_data(&b, &proxy, root).env("FLEETSYNC_STEP", "install").envs(extra.iter().copied()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(proxy.stats()["no-content-sha256"].as_u64().unwrap_or(0), 0, "a request S3 would refuse");
    assert_eq!(std::fs::read(root.path().join("usr/local/bin/fleetsync-agent")).unwrap(), agent);
    assert!(root.path().join("etc/systemd/system/fleetsync-agent.timer").is_file());
    assert!(stderr.contains(&format!("installed fleetsync-agent {}", fleetsync::VERSION)), "{stderr}");
    // The same with the AWS CLI, which the user-data uses where there is no
    // python3.
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[("FLEETSYNC_CLIENT", "aws")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read(root.path().join("usr/local/bin/fleetsync-agent")).unwrap(), agent);

    // Sums that name the binary but not the units: nothing is installed
    // unchecked. A new upload merges the units back in.
    let sums = std::fs::read_to_string(dist.path().join("SHA256SUMS")).unwrap();
    let binary_only: String = sums.lines().filter(|l| l.ends_with(&format!("fleetsync-agent-{arch}"))).map(|l| format!("{l}\n")).collect();
    b.put("dist/SHA256SUMS", binary_only.as_bytes()).await;
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!root.path().join("usr/local/bin/fleetsync-agent").exists(), "installed with unchecked units");
    assert!(upload(&b, dist.path()).status.success());

    // The binary in the bucket replaced behind the sums' back.
    b.put(&format!("dist/fleetsync-agent-{arch}"), b"#!/bin/sh\necho pwned\n").await;
    let root = tempfile::tempdir().unwrap();
    let (code, stderr) = install(root.path(), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("does not match") && stderr.contains("abandoning the launch"), "{stderr}");
    assert!(!root.path().join("usr/local/bin/fleetsync-agent").exists(), "a corrupted agent was installed");

    // An architecture with no binary uploaded.
    let other = if arch == "x86_64" { "aarch64" } else { "x86_64" };
    let (code, stderr) = install(root.path(), &[("FLEETSYNC_ARCH", other)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("has no fleetsync-agent-{other}")), "{stderr}");
}

/// A whole boot on an image with no AWS CLI and a curl too old to sign
/// (Ubuntu 22.04's 7.81; here a stand-in that refuses --aws-sigv4):
/// python3 signs the install's requests, the agent its heartbeats during a
/// slow first pull and the CONTINUE that ends the launch, each signature
/// checked by the lifecycle stand-in; a launch whose install fails is
/// abandoned by python3's signature. systemctl is a stand-in that runs the
/// unit's pull in the foreground.
#[tokio::test]
async fn an_image_without_the_aws_cli_or_a_signing_curl_boots_and_answers_its_launch_hook() {
    let b = common::Bucket::new("bootpy").await;
    let build = common::build_dir(8, "bootpy");
    assert_eq!(common::publish(build.path(), &b.url("app"), &["--release-id", "first"]).0, 0);
    let (dist, _) = dist_dir();
    assert!(upload(&b, dist.path()).status.success());
    let proxy = common::FaultProxy::start(&common::endpoint(), &["--rate", "0"]);
    let hooks = Lifecycle::start();

    let shims = tempfile::tempdir().unwrap();
    let shim = |name: &str, body: &str| {
        let path = shims.path().join(name);
        std::fs::write(&path, format!("#!/bin/bash\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    shim(
        "curl",
        "for a in \"$@\"; do [[ $a != --aws-sigv4 ]] || { echo 'curl: option --aws-sigv4: is unknown' >&2; exit 2; }; done\n\
         [[ ${1:-} != --version ]] || { echo 'curl 7.81.0 (x86_64-pc-linux-gnu) libcurl/7.81.0'; exit 0; }\n\
         exec /usr/bin/curl \"$@\"\n",
    );
    shim(
        "systemctl",
        "echo \"$*\" >> \"$FLEETSYNC_INSTALL_ROOT/systemctl.log\"\n\
         [[ $* == 'start fleetsync-agent.service' ]] || exit 0\n\
         sleep 2.5\n\
         exec \"$FLEETSYNC_INSTALL_ROOT/usr/local/bin/fleetsync-agent\" --config \"$FLEETSYNC_INSTALL_ROOT/etc/fleetsync/agent.toml\" pull\n",
    );
    let path = format!("{}:/usr/bin:/bin", shims.path().display());
    let found = Command::new("bash").arg("-c").arg("command -v aws || true").env("PATH", &path).output().unwrap();
    assert!(found.stdout.is_empty(), "no AWS CLI on the image's PATH");

    // The template's HealthUrl: a web server on the node that records
    // what it was asked.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health_url = format!("http://{}/health", web.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = asked.clone();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for mut conn in web.incoming().flatten() {
            let mut line = String::new();
            let _ = std::io::BufReader::new(&conn).read_line(&mut line);
            seen.lock().unwrap().push(line.trim().to_string());
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });

    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("var/www/app");
    let out = user_data(&b, &proxy, root.path())
        .env("PATH", &path)
        .env("FLEETSYNC_DEST", &dest)
        .env("FLEETSYNC_AUTOSCALING_URL", &hooks.url)
        .env("FLEETSYNC_HEARTBEAT_SECONDS", "1")
        .env("FLEETSYNC_STATE_DIR", root.path().join("var/lib/fleetsync"))
        .env("FLEETSYNC_METRICS_FILE", "")
        // The template's SharedPaths and BeforeSwitch, as its exports line
        // passes them (a command with double quotes and a backslash).
        .env("FLEETSYNC_SHARED", "storage,cache")
        .env("FLEETSYNC_BEFORE_SWITCH", r#"printf '%s\n' "warmed \o/" > "$FLEETSYNC_RELEASE_DIR/warmed""#)
        .env("FLEETSYNC_HEALTH_URL", &health_url)
        .env("FLEETSYNC_KEEP_ASSETS", "public/build/**,*.css")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let config = std::fs::read_to_string(root.path().join("etc/fleetsync/agent.toml")).unwrap();
    assert!(config.contains(r#"keep-assets = ["public/build/**", "*.css"]"#), "{config}");
    assert_eq!(*asked.lock().unwrap(), ["GET /health HTTP/1.1"], "the first pull asks the release's health URL once");
    let current = dest.join("current");
    assert_eq!(std::fs::read_link(current.join("storage")).unwrap(), Path::new("../../shared/storage"));
    assert_eq!(std::fs::read_link(current.join("cache")).unwrap(), Path::new("../../shared/cache"));
    assert_eq!(std::fs::read_to_string(current.join("warmed")).unwrap(), "warmed \\o/\n");
    assert_eq!(proxy.stats()["no-content-sha256"].as_u64().unwrap_or(0), 0, "a request S3 would refuse");
    assert_eq!(std::fs::read_link(dest.join("current")).unwrap(), Path::new("releases/first"));
    let mut expected = read_tree(build.path());
    expected.insert("warmed".into(), b"warmed \\o/\n".to_vec());
    for link in ["storage", "cache"] {
        expected.insert(link.into(), b"<symlink>".to_vec());
    }
    assert_eq!(read_tree(&dest.join("current")), expected);
    let calls = hooks.calls();
    assert!(calls.iter().all(|c| c["signed"] == true && c["instance"] == "i-0123456789abcdef0" && c["group"] == "web"), "{calls:?}");
    let actions: Vec<&str> = calls.iter().map(|c| c["action"].as_str().unwrap()).collect();
    assert!(actions.len() >= 2 && actions[..actions.len() - 1].iter().all(|a| *a == "RecordLifecycleActionHeartbeat"), "{actions:?}");
    let last = calls.last().unwrap();
    assert_eq!((last["action"].as_str(), last["result"].as_str()), (Some("CompleteLifecycleAction"), Some("CONTINUE")), "{calls:?}");
    let by_python = |c: &serde_json::Value| c["user_agent"].as_str().unwrap_or_default().starts_with("Python-urllib");
    assert!(calls.iter().all(|c| !by_python(c)), "the installed agent made these: {calls:?}");
    let systemctl = std::fs::read_to_string(root.path().join("systemctl.log")).unwrap();
    assert!(systemctl.contains("start fleetsync-agent.service") && systemctl.contains("start fleetsync-agent.timer"), "{systemctl}");

    // An install that fails (no binary for this architecture): python3
    // signs the ABANDON.
    let other = if std::env::consts::ARCH == "x86_64" { "aarch64" } else { "x86_64" };
    let root = tempfile::tempdir().unwrap();
    let out = user_data(&b, &proxy, root.path())
        .env("PATH", &path)
        .env("FLEETSYNC_AUTOSCALING_URL", &hooks.url)
        .env("FLEETSYNC_ARCH", other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let last = hooks.calls().pop().unwrap();
    assert_eq!(
        (last["action"].as_str(), last["result"].as_str(), last["signed"].as_bool()),
        (Some("CompleteLifecycleAction"), Some("ABANDON"), Some(true))
    );
    assert!(by_python(&last), "{last}");

    // The stand-in refuses what AWS would: a signature made with the wrong key.
    let out = Command::new(common::agent_bin())
        .args(["lifecycle", "heartbeat", "--group", "web", "--hook", "fleetsync-first-pull", "--instance-id", "i-0123456789abcdef0"])
        .env("AWS_ENDPOINT_URL_AUTO_SCALING", &hooks.url)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-key")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("RecordLifecycleActionHeartbeat") && stderr.contains(&hooks.url), "names the call and the endpoint: {stderr}");
    assert_eq!(hooks.calls().pop().unwrap()["signed"], false);
}
