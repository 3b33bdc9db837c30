//! What a site's visitors get while deploys run: a real nginx and PHP-FPM
//! with OPcache (infra/local/web.py, serving with the shipped recipe,
//! infra/web/nginx-php-fpm.conf and php-opcache.ini) in front of a node's
//! `DEST/current`, eight clients requesting a page without pause, and the
//! agent switching releases under them.
//!
//! Each release's page includes 40 PHP files that each return the
//! release's id, so one response shows what a visitor got: an error, a mix
//! of two releases, or the old release after the switch.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{publish, run_json, Bucket, Node, Web};

/// PHP files each page includes.
const INCLUDES: usize = 40;
/// Static files besides the page: the 1% of a change is one of these and
/// the page's own files.
const STATIC: usize = 300;

/// One response as web.py recorded it.
#[derive(serde::Deserialize)]
struct Response {
    start: f64,
    status: u16,
    ids: Vec<String>,
    error: Option<String>,
}

/// Release `id`'s tree: the page, its includes, the static files (of
/// which `changed` carry this release's id, the rest never change).
fn release(id: &str, changed: usize) -> BTreeMap<String, Vec<u8>> {
    let mut tree = BTreeMap::new();
    let page = format!(
        "<?php\n$ids = [];\nfor ($i = 1; $i <= {INCLUDES}; $i++) {{ $ids[] = 'release=' . (include __DIR__ . \"/inc/f$i.php\"); }}\necho implode(' ', array_unique($ids)), \"\\n\";\n"
    );
    tree.insert("public/index.php".to_string(), page.into_bytes());
    for i in 1..=INCLUDES {
        tree.insert(format!("public/inc/f{i}.php"), format!("<?php return '{id}';\n").into_bytes());
    }
    for i in 0..STATIC {
        let body = if i < changed { format!("asset {i} of {id}\n") } else { format!("asset {i}, the same in every release\n") };
        tree.insert(format!("public/assets/a{i:04}.css"), body.into_bytes());
    }
    tree
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// What one deploy made live, when the agent started and when it returned.
struct Deployed {
    id: String,
    started: f64,
    returned: f64,
}

/// 24 deploys under load: the first cold (every file new), then 1%
/// changes, with a rollback after every fourth, one whose before-switch
/// command fails (nothing switches), and some built from the staged next
/// release (a timer's pull between deploys stages it). Not one visitor
/// gets an error, a page of two releases, or the old release once the
/// pull has returned and a second has passed.
#[tokio::test]
async fn visitors_get_no_error_no_mix_and_no_stale_page_across_24_deploys() {
    let b = Bucket::new("visitors").await;
    let source = b.url("app");
    let ids: Vec<String> = (0..=19).map(|i| format!("v{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        // v00 lives before the load starts; v01 changes every file (a cold
        // build beside it); the rest change 1% of the tree.
        let changed = if i == 1 { STATIC } else { 3 };
        let dir = common::tree_dir(release(id, changed));
        let (code, _, stderr) = publish(dir.path(), &source, &["--release-id", id]);
        assert_eq!(code, 0, "{stderr}");
    }
    let node = Node::new();
    let mut staged = 0;
    let mut pull = |id: &str| {
        let started = now();
        let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", id]));
        assert_eq!(code, 0, "{stderr}\n{r}");
        staged += usize::from(r["release"]["staged"] == true);
        Deployed { id: id.to_string(), started, returned: now() }
    };
    pull(&ids[0]);

    let web = tempfile::tempdir().unwrap();
    let root = node.dest.join("current/public");
    let (server, ready) = Web::start(&["serve", "--dir", &web.path().display().to_string(), "--root", &root.display().to_string()]);
    let port = ready.strip_prefix("ready ").unwrap_or_else(|| panic!("web.py serve said {ready:?}"));
    let log = web.path().join("responses.jsonl");
    let (visitors, _) =
        Web::start(&["visit", "--url", &format!("http://127.0.0.1:{port}/"), "--clients", "8", "--out", &log.display().to_string()]);
    std::thread::sleep(Duration::from_millis(500));

    let mut deployed = vec![Deployed { id: ids[0].clone(), started: 0.0, returned: 0.0 }];
    for (n, id) in ids.iter().enumerate().skip(1) {
        if n == 10 {
            // A before-switch command that fails: the pull exits 1 and the
            // release before stays live.
            let started = now();
            let (code, r, stderr) = run_json(node.agent(&source).args(["--releases", "--release-id", id, "--before-switch", "exit 3"]));
            assert_eq!(code, 1, "{stderr}\n{r}");
            deployed.push(Deployed { id: ids[n - 1].clone(), started, returned: now() });
            std::thread::sleep(Duration::from_millis(1300));
        }
        deployed.push(pull(id));
        std::thread::sleep(Duration::from_millis(1300));
        if n % 4 == 2 {
            // The timer's pull of the live release, which stages the next
            // one: the deploy after it is built from that.
            pull(id);
        }
        if n % 4 == 0 {
            // Back to the release before: the agent's rollback.
            let started = now();
            let (code, r, stderr) = run_json(
                Command::new(common::agent_bin())
                    .arg("rollback")
                    .arg("--dest")
                    .arg(&node.dest)
                    .arg("--state-dir")
                    .arg(&node.state)
                    .arg("--json"),
            );
            assert_eq!(code, 0, "{stderr}\n{r}");
            deployed.push(Deployed { id: ids[n - 1].clone(), started, returned: now() });
            std::thread::sleep(Duration::from_millis(1300));
        }
    }
    visitors.stop();
    server.stop();
    assert!(staged >= 4, "{staged} deploys were built from a staged next release");

    let responses: Vec<Response> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let failed: Vec<&Response> = responses.iter().filter(|r| r.status != 200).collect();
    let mixed: Vec<&Response> = responses.iter().filter(|r| r.status == 200 && r.ids.len() != 1).collect();
    // A request started more than a second after a pull returned, and
    // before the next deploy started, gets that pull's release.
    let mut stale = Vec::new();
    for (i, d) in deployed.iter().enumerate().skip(1) {
        let until = deployed.get(i + 1).map_or(f64::MAX, |next| next.started);
        for r in responses.iter().filter(|r| r.status == 200 && r.start > d.returned + 1.0 && r.start < until) {
            if r.ids != [d.id.clone()] {
                stale.push((d.id.clone(), r.ids.clone()));
            }
        }
    }
    eprintln!(
        "{} responses over {} deploys: {} failed, {} mixed, {} stale",
        responses.len(),
        deployed.len() - 1,
        failed.len(),
        mixed.len(),
        stale.len()
    );
    assert!(responses.len() > 1000, "the clients kept requesting: {}", responses.len());
    assert!(failed.is_empty(), "{:?}", failed.iter().take(5).map(|r| (r.status, r.error.clone())).collect::<Vec<_>>());
    assert!(mixed.is_empty(), "{:?}", mixed.iter().take(5).map(|r| r.ids.clone()).collect::<Vec<_>>());
    assert!(stale.is_empty(), "{:?}", &stale[..stale.len().min(5)]);
}
