//! A rolling deploy as a site's visitors get it: two nodes of a group, each
//! with a real nginx serving its `DEST/current`, behind an nginx load
//! balancer that keeps each visitor on one node (as an ALB with stickiness
//! does), deployed by `fleetsync sync --batch 1` through the SSM emulator
//! while visitors load a page and, a second later, the hashed assets it
//! names (a lazily loaded chunk, a tab left open).
//!
//! A visitor whose page came from a node just before that node switched
//! asks it for assets its new release does not have: a 404, unless the
//! nodes keep the live release's assets for one deploy (`keep-assets` in
//! agent.toml).

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
fn roll(asg: &str, source: &str, nodes: &Nodes, url: &str, id: &str) -> (Vec<Visit>, Vec<u64>) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = log.path().display().to_string();
    let (browsers, _) = Web::start(&["browse", "--url", url, "--clients", "8", "--think", "1", "--out", &out]);
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
    assert!(visits.len() > 40, "the visitors kept browsing: {} pages", visits.len());
    for v in visits {
        assert!(v.error.is_none() && v.status == 200 && v.ids.len() == 1, "{:?} {} {:?}", v.error, v.status, v.ids);
    }
    visits.iter().flat_map(|v| v.assets.values()).filter(|s| **s == 404).count()
}

#[tokio::test]
async fn a_rolling_deploy_serves_every_pages_assets_with_keep_assets_and_404s_without() {
    let b = Bucket::new("rolling").await;
    let source = b.url("app");
    for id in ["a", "b", "c"] {
        let dir = common::tree_dir(release(id));
        let (code, _, stderr) = publish(dir.path(), &source, &["--release-id", id]);
        assert_eq!(code, 0, "{stderr}");
    }
    let (asg, nodes) = Nodes::group_ssm("rolling", 2, 9);
    let (code, report, stderr) = common::deploy(&asg, &source, "/srv/www", &nodes, "ssm", &["--releases", "--release-id", "a"]);
    assert_eq!(code, 0, "{stderr}\n{report}");

    // A web server per node, and the balancer in front of them.
    let web = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    let mut upstreams = Vec::new();
    for (i, (_, root)) in nodes.list().iter().enumerate() {
        let dir = web.path().join(format!("node{i}")).display().to_string();
        let docroot = root.join("www/current/public").display().to_string();
        let (server, ready) = Web::start(&["serve", "--dir", &dir, "--root", &docroot, "--children", "2"]);
        let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}")).to_string();
        upstreams.extend(["--upstream".to_string(), format!("127.0.0.1:{port}")]);
        servers.push(server);
    }
    let lb_dir = web.path().join("balancer").display().to_string();
    let mut args = vec!["balance", "--dir", lb_dir.as_str()];
    args.extend(upstreams.iter().map(String::as_str));
    let (balancer, ready) = Web::start(&args);
    let url = format!("http://127.0.0.1:{}/", ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py balance said {ready:?}")));

    // a -> b as the nodes are: the assets leave with their release.
    let (visits, kept) = roll(&asg, &source, &nodes, &url, "b");
    assert_eq!(kept, [0, 0], "nothing kept without keep-assets");
    let without = asset_404s(&visits);
    // b -> c with keep-assets in every node's agent.toml.
    for (_, root) in nodes.list() {
        std::fs::write(root.join("etc/fleetsync/agent.toml"), "keep-assets = [\"public/build/**\"]\n").unwrap();
    }
    let (visits, kept) = roll(&asg, &source, &nodes, &url, "c");
    assert_eq!(kept, [2, 2], "each node carried b's two assets into c");
    let with = asset_404s(&visits);
    eprintln!("asset 404s during a rolling deploy: {without} without keep-assets, {with} with");

    balancer.stop();
    for s in servers {
        s.stop();
    }
    assert!(without > 0, "without keep-assets, a page loaded just before its node switched misses its assets");
    assert_eq!(with, 0, "with keep-assets, every page finds its assets");
}
