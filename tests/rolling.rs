//! A rolling deploy as a site's visitors get it: two nodes of a group, each
//! with a real nginx serving its `DEST/current`, behind an nginx load
//! balancer, deployed by `fleetsync sync --batch 1` through the SSM
//! emulator while visitors load a page and, a second later, the hashed
//! assets it names (a lazily loaded chunk, a tab left open). Two
//! balancers: one that keeps each visitor on one node (as an ALB with
//! stickiness does), and the shipped round-robin recipe
//! (infra/web/nginx-balancer.conf).
//!
//! A visitor whose page came from the release before asks for its assets
//! after its node switched (sticky), or after the last node switched
//! (round robin, which asks every node): a 404, unless the nodes keep the
//! live release's assets for one deploy (`keep-assets` in agent.toml).

mod common;

use std::collections::BTreeMap;

use common::{publish, Bucket, Nodes, Web};

/// One page a visitor loaded, as web.py recorded it.
#[derive(serde::Deserialize)]
struct Visit {
    status: u16,
    ids: Vec<String>,
    assets: BTreeMap<String, u16>,
    error: Option<String>,
}

/// Release `id`: a page naming its hashed assets, and the assets.
fn release(id: &str) -> BTreeMap<String, Vec<u8>> {
    let page = format!(
        "<html>release={id}\n<script src=\"/build/app-{id}.js\"></script>\n<link rel=\"stylesheet\" href=\"/build/app-{id}.css\">\n</html>\n"
    );
    BTreeMap::from([
        ("public/index.html".to_string(), page.into_bytes()),
        (format!("public/build/app-{id}.js"), format!("// {id}\n").into_bytes()),
        (format!("public/build/app-{id}.css"), format!("/* {id} */\n").into_bytes()),
        ("public/robots.txt".to_string(), b"User-agent: *\n".to_vec()),
    ])
}

/// Rolls the group from its live release to `id` with visitors browsing
/// through the balancer at `url`; returns the pages they loaded and the
/// assets each node carried from the release before (`kept_assets`).
fn roll(asg: &str, source: &str, nodes: &Nodes, url: &str, id: &str, think: &str) -> (Vec<Visit>, Vec<u64>) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = log.path().display().to_string();
    let (browsers, _) = Web::start(&["browse", "--url", url, "--clients", "8", "--think", think, "--out", &out]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (code, report, stderr) =
        common::deploy(asg, source, "/srv/www", nodes, "ssm", &["--releases", "--release-id", id, "--batch", "1", "--bake", "3s"]);
    assert_eq!(code, 0, "{stderr}\n{report}");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    browsers.stop();
    let kept = report["nodes"].as_array().unwrap().iter().map(|n| n["agent"]["release"]["kept_assets"].as_u64().unwrap_or(0)).collect();
    (std::fs::read_to_string(log.path()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect(), kept)
}

/// Asset requests answered 404, after checking that every page loaded.
fn asset_404s(visits: &[Visit]) -> usize {
    assert!(visits.len() > 20, "the visitors kept browsing: {} pages", visits.len());
    for v in visits {
        assert!(v.error.is_none() && v.status == 200 && v.ids.len() == 1, "{:?} {} {:?}", v.error, v.status, v.ids);
    }
    visits.iter().flat_map(|v| v.assets.values()).filter(|s| **s == 404).count()
}

/// A group of two nodes on release `a` (b and c published), a web server
/// per node, and a balancer (`balance` arguments) in front of them.
struct Site {
    asg: String,
    source: String,
    nodes: Nodes,
    servers: Vec<Web>,
    balancer: Web,
    url: String,
    /// The balancer's directory (its logs).
    lb_dir: String,
    /// Seconds a visitor waits between a page and its assets.
    think: &'static str,
    _dirs: tempfile::TempDir,
}

impl Site {
    async fn new(name: &str, subnet: u32, balance: &[&str], think: &'static str) -> Site {
        let b = Bucket::new(name).await;
        let source = b.url("app");
        for id in ["a", "b", "c"] {
            let dir = common::tree_dir(release(id));
            let (code, _, stderr) = publish(dir.path(), &source, &["--release-id", id]);
            assert_eq!(code, 0, "{stderr}");
        }
        let (asg, nodes) = Nodes::group_ssm(name, 2, subnet);
        let (code, report, stderr) = common::deploy(&asg, &source, "/srv/www", &nodes, "ssm", &["--releases", "--release-id", "a"]);
        assert_eq!(code, 0, "{stderr}\n{report}");

        let dirs = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let mut upstreams = Vec::new();
        for (i, (_, root)) in nodes.list().iter().enumerate() {
            let dir = dirs.path().join(format!("node{i}")).display().to_string();
            let docroot = root.join("www/current/public").display().to_string();
            let (server, ready) = Web::start(&["serve", "--dir", &dir, "--root", &docroot, "--children", "2"]);
            let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}")).to_string();
            upstreams.extend(["--upstream".to_string(), format!("127.0.0.1:{port}")]);
            servers.push(server);
        }
        let lb_dir = dirs.path().join("balancer").display().to_string();
        let mut args = vec!["balance", "--dir", lb_dir.as_str()];
        args.extend(upstreams.iter().map(String::as_str));
        args.extend(balance);
        let (balancer, ready) = Web::start(&args);
        let url = format!("http://127.0.0.1:{}/", ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py balance said {ready:?}")));
        Site { asg, source, nodes, servers, balancer, url, lb_dir, think, _dirs: dirs }
    }

    /// Rolls to `id` (see [`roll`]).
    fn roll(&self, id: &str) -> (Vec<Visit>, Vec<u64>) {
        roll(&self.asg, &self.source, &self.nodes, &self.url, id, self.think)
    }

    fn keep_assets(&self) {
        for (_, root) in self.nodes.list() {
            std::fs::write(root.join("etc/fleetsync/agent.toml"), "keep-assets = [\"public/build/**\"]\n").unwrap();
        }
    }

    /// Asset requests the balancer asked of a node that answered 404 and
    /// then of one that had it (the recipe's balancer logs each request's
    /// upstream answers).
    fn retried_assets(&self) -> usize {
        let log = std::fs::read_to_string(std::path::Path::new(&self.lb_dir).join("upstream.log")).unwrap_or_default();
        log.lines().filter(|l| l.starts_with("/build/") && l.contains("404, 200")).count()
    }

    fn stop(self) {
        self.balancer.stop();
        for s in self.servers {
            s.stop();
        }
    }
}

/// Behind a balancer that keeps each visitor on one node (an ALB with
/// stickiness): a page loaded just before its node switched misses its
/// assets unless the nodes keep them.
#[tokio::test]
async fn a_rolling_deploy_serves_every_pages_assets_with_keep_assets_and_404s_without() {
    let site = Site::new("rolling", 9, &[], "1").await;
    // a -> b as the nodes are: the assets leave with their release.
    let (visits, kept) = site.roll("b");
    assert_eq!(kept, [0, 0], "nothing kept without keep-assets");
    let without = asset_404s(&visits);
    // b -> c with keep-assets in every node's agent.toml.
    site.keep_assets();
    let (visits, kept) = site.roll("c");
    assert_eq!(kept, [2, 2], "each node carried b's two assets into c");
    let with = asset_404s(&visits);
    eprintln!("asset 404s during a rolling deploy (sticky balancer): {without} without keep-assets, {with} with");
    site.stop();
    assert!(without > 0, "without keep-assets, a page loaded just before its node switched misses its assets");
    assert_eq!(with, 0, "with keep-assets, every page finds its assets");
}

/// Behind a round-robin balancer (infra/web/nginx-balancer.conf): a page's
/// assets go to any node, of either release, while the deploy rolls. The
/// recipe asks the next node for an asset one answers 404, so pages of both
/// releases find theirs while a node of each is left; an old page's assets
/// after the last switch need keep-assets.
#[tokio::test]
async fn behind_the_round_robin_recipe_every_pages_assets_are_found_with_keep_assets() {
    // Only pages loaded just before the last switch miss their assets
    // here: visitors wait 2 s, so that there are always some.
    let site = Site::new("roundrobin", 10, &["--recipe", "nginx-balancer.conf"], "2").await;
    let (visits, _) = site.roll("b");
    let without = asset_404s(&visits);
    site.keep_assets();
    let (visits, kept) = site.roll("c");
    assert_eq!(kept, [2, 2], "each node carried b's two assets into c");
    let with = asset_404s(&visits);
    let retried = site.retried_assets();
    eprintln!(
        "asset 404s during a rolling deploy (round robin, infra/web/nginx-balancer.conf): {without} without keep-assets, {with} with; {retried} asset requests found on a second node"
    );
    site.stop();
    assert!(retried > 0, "the balancer asked a second node for assets the first lacked");
    assert!(without > 0, "without keep-assets, a page loaded just before the last switch misses its assets");
    assert_eq!(with, 0, "with keep-assets, every page finds its assets on some node");
}
