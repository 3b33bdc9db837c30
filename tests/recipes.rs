//! The web server recipes of infra/web/ other than nginx + PHP-FPM (which
//! tests/visitors.rs runs under load), each run as shipped (only the lines
//! marked `fleetsync:` replaced) in front of a node's `DEST/current`: a
//! release is served as soon as the pull that made it live returns, and a
//! rollback likewise.

mod common;

use std::collections::BTreeMap;

use common::{publish, run_json, Bucket, Node, Web};

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
    for id in ["s1", "s2", "s3"] {
        let (code, _, stderr) = publish(common::tree_dir(site(id)).path(), &source, &["--release-id", id]);
        assert_eq!(code, 0, "{stderr}");
    }
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
/// module it loaded (`require` by the real path of server.js).
fn node_app(id: &str) -> BTreeMap<String, Vec<u8>> {
    let server = "const http = require('http');\n\
                  const { id } = require('./release.json');\n\
                  http.createServer((req, res) => res.end(`release=${id}\\n`)).listen(Number(process.env.PORT), '127.0.0.1');\n";
    BTreeMap::from([
        ("server.js".to_string(), server.as_bytes().to_vec()),
        ("release.json".to_string(), format!("{{\"id\": \"{id}\"}}\n").into_bytes()),
    ])
}

/// The Node/PM2 recipe: the after-switch command it documents restarts the
/// app into each release the pull makes live, and into the release a
/// rollback makes live.
#[tokio::test]
async fn the_pm2_recipe_restarts_the_app_into_each_release_and_a_rollback() {
    let b = Bucket::new("pm2").await;
    let source = b.url("node");
    for id in ["n1", "n2"] {
        let (code, _, stderr) = publish(common::tree_dir(node_app(id)).path(), &source, &["--release-id", id]);
        assert_eq!(code, 0, "{stderr}");
    }
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
    // The after-switch command the recipe documents.
    let after_switch = format!("pm2 startOrReload {} --update-env", conf.display());
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
    for id in ["n1", "n2"] {
        let mut c = node.agent(&source);
        env(&mut c);
        let (code, r, stderr) = run_json(c.args(["--releases", "--release-id", id, "--after-switch", &after_switch]));
        assert_eq!(code, 0, "{stderr}\n{r}");
        answers(id);
    }
    let mut c = std::process::Command::new(common::agent_bin());
    env(&mut c);
    c.args(["rollback", "--json", "--after-switch", &after_switch, "--dest"]).arg(&node.dest).arg("--state-dir").arg(&node.state);
    let (code, r, stderr) = run_json(&mut c);
    assert_eq!(code, 0, "{stderr}\n{r}");
    assert_eq!(r["release"]["after_switch"]["ok"], true, "{r}");
    answers("n1");
    drop(pm2);
}
