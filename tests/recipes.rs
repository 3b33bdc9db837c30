//! The web server recipes of infra/web/ other than nginx + PHP-FPM (which
//! tests/visitors.rs runs under load), each run as shipped (only the lines
//! marked `fleetsync:` replaced) in front of a node's DEST: a static site
//! with nginx, PHP with Apache and PHP-FPM, a Node app with PM2. Each
//! release is served once the pull that made it live returns (Apache: its
//! graceful reload, a few milliseconds later), and a rollback's likewise.

mod common;

use std::collections::BTreeMap;

use common::{publish, run_json, Bucket, Node, Web};

/// Publishes each (id, tree) to `source` under its id.
fn publish_each<'a>(source: &str, releases: impl IntoIterator<Item = (&'a str, BTreeMap<String, Vec<u8>>)>) {
    for (id, tree) in releases {
        let (code, _, stderr) = publish(common::tree_dir(tree).path(), source, &["--release-id", id]);
        assert_eq!(code, 0, "{stderr}");
    }
}

/// Release `id` of a static site: a page and a hashed asset.
fn site(id: &str) -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([
        ("public/index.html".to_string(), format!("<html>release={id}</html>\n").into_bytes()),
        (format!("public/build/app-{id}.js"), format!("// {id}\n").into_bytes()),
    ])
}

#[tokio::test]
async fn the_static_site_recipe_serves_each_release_as_soon_as_it_is_live() {
    let b = Bucket::new("static").await;
    let source = b.url("site");
    publish_each(&source, ["s1", "s2", "s3"].map(|id| (id, site(id))));
    let node = Node::new();
    let pull = |id: &str| {
        let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", id]));
        assert_eq!(code, 0, "{stderr}\n{r}");
    };
    pull("s1");
    let web = tempfile::tempdir().unwrap();
    let root = node.dest.join("current/public").display().to_string();
    let (server, ready) =
        Web::start(&["serve", "--recipe", "nginx-static.conf", "--dir", &web.path().display().to_string(), "--root", &root]);
    let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}")).to_string();
    let serves = |id: &str| {
        assert_eq!(common::http_get(&port, "/"), (200, format!("<html>release={id}</html>\n").into_bytes()), "the page of {id}");
        assert_eq!(common::http_get(&port, &format!("/build/app-{id}.js")).0, 200, "the asset of {id}");
    };
    serves("s1");
    for id in ["s2", "s3"] {
        pull(id);
        serves(id);
    }
    let (code, r, stderr) = run_json(
        std::process::Command::new(common::agent_bin())
            .args(["rollback", "--json", "--dest"])
            .arg(&node.dest)
            .arg("--state-dir")
            .arg(&node.state),
    );
    assert_eq!(code, 0, "{stderr}\n{r}");
    serves("s2");
    assert_eq!(common::http_get(&port, "/build/app-s3.js").0, 404, "the rolled-back release's asset left with it");
    server.stop();
}

/// Release `id` of a PHP site: a page whose included file names the
/// release (the include goes through `__DIR__`, as an application's do).
fn php_site(id: &str) -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([
        ("public/index.php".to_string(), b"<?php echo 'release=', include __DIR__ . '/inc.php', \"\\n\";\n".to_vec()),
        ("public/inc.php".to_string(), format!("<?php return '{id}';\n").into_bytes()),
    ])
}

/// The Apache + PHP-FPM recipe (OPcache on): the after-switch command it
/// documents points Apache at each release a pull or a rollback makes
/// live, and PHP runs that release's scripts, not the ones OPcache
/// compiled from the release before.
#[tokio::test]
async fn the_apache_recipe_serves_each_release_after_its_graceful_reload() {
    let b = Bucket::new("apache").await;
    let source = b.url("php");
    publish_each(&source, ["a1", "a2", "a3"].map(|id| (id, php_site(id))));
    let node = Node::new();
    // Apache's workers are www-data: the node's directory must be theirs to read.
    std::fs::set_permissions(node.tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let web = tempfile::tempdir().unwrap();
    let dir = web.path().display().to_string();
    let releases = node.dest.join("releases").display().to_string();
    let (server, ready) = Web::start(&["serve", "--recipe", "apache-php-fpm.conf", "--dir", &dir, "--root", &releases, "--children", "2"]);
    let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}")).to_string();
    // The recipe's after-switch command, for this Apache.
    let after_switch = format!(
        "printf 'Define FLEETSYNC_LIVE %s\\n' \"$FLEETSYNC_RELEASE_DIR\" > {dir}/live.conf && apache2 -f {dir}/apache.conf -k graceful"
    );
    let serves = |id: &str| {
        let want = format!("release={id}\n").into_bytes();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let got = common::http_get(&port, "/");
            if got == (200, want.clone()) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never served {id}: {got:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    for id in ["a1", "a2", "a3"] {
        let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", id, "--after-switch", &after_switch]));
        assert_eq!(code, 0, "{stderr}\n{r}");
        serves(id);
    }
    let (code, r, stderr) = run_json(
        std::process::Command::new(common::agent_bin())
            .args(["rollback", "--json", "--after-switch", &after_switch, "--dest"])
            .arg(&node.dest)
            .arg("--state-dir")
            .arg(&node.state),
    );
    assert_eq!(code, 0, "{stderr}\n{r}");
    serves("a2");
    server.stop();
}

/// PM2 as a Node app's process manager: it runs until stopped, so each
/// test's PM2 has a home of its own and is killed when the test ends.
struct Pm2 {
    home: tempfile::TempDir,
}

impl Pm2 {
    fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new("pm2");
        c.env("PM2_HOME", self.home.path());
        c
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        let _ = self.command().arg("kill").output();
    }
}

/// Release `id` of a Node app: a server that names the release of the
/// module it loaded (`require` by the real path of server.js), and
/// answers /health with 200, or 500 when not `healthy`.
fn node_app(id: &str, healthy: bool) -> BTreeMap<String, Vec<u8>> {
    let server = "const http = require('http');\n\
                  const { id, healthy } = require('./release.json');\n\
                  http.createServer((req, res) => {\n\
                    if (req.url === '/health' && !healthy) res.statusCode = 500;\n\
                    res.end(`release=${id}\\n`);\n\
                  }).listen(Number(process.env.PORT), '127.0.0.1');\n";
    BTreeMap::from([
        ("server.js".to_string(), server.as_bytes().to_vec()),
        ("release.json".to_string(), format!("{{\"id\": \"{id}\", \"healthy\": {healthy}}}\n").into_bytes()),
    ])
}

/// The Node/PM2 recipe: the after-switch command it documents restarts the
/// app into each release the pull makes live, into the release live again
/// when a new one fails its health check (`--rollback-on-failure`), and
/// into the release a rollback makes live.
#[tokio::test]
async fn the_pm2_recipe_restarts_the_app_into_each_release_and_a_rollback() {
    let b = Bucket::new("pm2").await;
    let source = b.url("node");
    publish_each(&source, [("n1", node_app("n1", true)), ("n2", node_app("n2", true)), ("n3", node_app("n3", false))]);
    let node = Node::new();
    let pm2 = Pm2 { home: tempfile::tempdir().unwrap() };
    // The recipe, with its marked line pointing at this node's DEST.
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/web/pm2-ecosystem.config.js")).unwrap();
    let (config, marked) = recipe.lines().fold((String::new(), 0), |(mut out, n), line| {
        let n = if line.contains("// fleetsync: cwd") {
            out.push_str(&format!("      cwd: {:?}, // fleetsync: cwd\n", node.dest.join("current")));
            n + 1
        } else {
            out.push_str(line);
            out.push('\n');
            n
        };
        (out, n)
    });
    assert_eq!(marked, 1, "infra/web/pm2-ecosystem.config.js lost its line marked `fleetsync: cwd`");
    let conf = pm2.home.path().join("pm2.config.js");
    std::fs::write(&conf, config).unwrap();
    // The recipe's after-switch command is `systemctl reload pm2-root`,
    // whose ExecReload (PM2's own unit) is `pm2 reload all`: that, here,
    // where there is no systemd.
    let after_switch = "pm2 reload all";
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let answers = |id: &str| {
        let want = format!("release={id}\n").into_bytes();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).ok().map(|_| common::http_get(&port, "/"));
            if got.as_ref().is_some_and(|(status, body)| *status == 200 && *body == want) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the app never answered as {id}: {got:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let env = |c: &mut std::process::Command| {
        c.env("PM2_HOME", pm2.home.path()).env("PORT", &port);
    };
    // The first release, then the app started as the recipe says (`pm2
    // start CONFIG`, once), then each pull reloads it.
    let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", "n1"]));
    assert_eq!(code, 0, "{stderr}\n{r}");
    let mut start = pm2.command();
    env(&mut start);
    let out = start.arg("start").arg(&conf).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    answers("n1");
    let mut c = node.agent(&source);
    env(&mut c);
    let (code, r, stderr) = run_json(c.args(["--releases", "--release-id", "n2", "--after-switch", after_switch]));
    assert_eq!(code, 0, "{stderr}\n{r}");
    answers("n2");
    // n3 goes live, the app restarts into it, and its health check fails:
    // n2 is live again, and so is the app's code.
    let health = format!("http://127.0.0.1:{port}/health");
    let mut c = node.agent(&source);
    env(&mut c);
    let (code, r, stderr) = run_json(c.args(["--releases", "--release-id", "n3", "--after-switch", after_switch]).args([
        "--health-url",
        &health,
        "--health-timeout",
        "3s",
        "--rollback-on-failure",
    ]));
    assert_eq!((code, r["release"]["rolled_back"].as_bool()), (1, Some(true)), "{stderr}\n{r}");
    answers("n2");
    let mut c = std::process::Command::new(common::agent_bin());
    env(&mut c);
    c.args(["rollback", "--json", "--after-switch", after_switch, "--dest"]).arg(&node.dest).arg("--state-dir").arg(&node.state);
    let (code, r, stderr) = run_json(&mut c);
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(r["release"]["after_switch"]["ok"], true, "{r}");
    answers("n1");
    drop(pm2);
}
