//! The commands' vocabulary, as a user meets it in `--help` and errors:
//! flags that mean nothing to a command are refused, each command's help
//! lists its own exit codes, internal flags stay out of sight. No world
//! needed: nothing here reaches AWS.

mod common;

use std::process::Command;

fn run(bin: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn status_refuses_the_flags_that_only_steer_a_deploy() {
    let fleetsync = common::bin("fleetsync-bastion", "fleetsync");
    let (code, _, stderr) = run(&fleetsync, &["status", "--asg", "web", "--canary", "3", "--lock-wait", "5m", "--max-errors", "2"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--canary, --max-errors, --lock-wait mean nothing to it") && stderr.lines().count() == 2, "{stderr}");
    // --asg, the old spelling of --group, still works and says so once.
    assert!(stderr.contains("fleetsync: --asg is deprecated, use --group"), "{stderr}");
}

/// `--release ID` (the bastion) and `--release-id ID` (the agent) mean
/// release mode: no "add --releases" for the flag one letter away. Both
/// then fail on the endpoint, which refuses connections.
#[test]
fn a_release_id_implies_release_mode() {
    let dest = tempfile::tempdir().unwrap();
    let dest = dest.path().join("www");
    let agent = ["pull", "s3://bucket-x/app", "--dest", dest.to_str().unwrap(), "--release-id", "r1", "--json"];
    // -v, as the agent takes it.
    let bastion = ["-v", "sync", "--group", "web", "--source", "s3://bucket-x/app", "--release", "r1", "--keep", "3", "--dry-run"];
    for (bin, args) in [(common::agent_bin(), &agent[..]), (common::bin("fleetsync-bastion", "fleetsync"), &bastion[..])] {
        let out = Command::new(bin)
            .args(args)
            .envs(["", "_S3", "_EC2", "_AUTO_SCALING", "_SSM"].map(|s| (format!("AWS_ENDPOINT_URL{s}"), "http://127.0.0.1:9")))
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("release mode") && stderr.contains("127.0.0.1:9"), "{args:?}: {stderr}");
        // A refused connection says so and names what it tried, not the
        // credentials.
        assert!(stderr.contains("cannot connect to") && !stderr.contains("check the AWS credentials"), "{args:?}: {stderr}");
    }
}

/// A hook timeout of zero would kill every hook as it starts: refused in
/// one line before anything is read or written.
#[test]
fn a_zero_hook_timeout_is_refused() {
    let dest = tempfile::tempdir().unwrap();
    let dest = dest.path().join("www");
    let args =
        ["pull", "s3://bucket/app", "--releases", "--dest", dest.to_str().unwrap(), "--before-switch", "true", "--hook-timeout", "0"];
    let (code, _, stderr) = run(&common::agent_bin(), &args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--hook-timeout 0") && stderr.trim().lines().count() == 1, "{stderr}");
    assert!(!dest.exists(), "nothing written");
}

#[test]
fn each_agent_command_lists_its_own_exit_codes_and_hides_internal_flags() {
    let agent = common::agent_bin();
    let (_, rollback, _) = run(&agent, &["rollback", "--help"]);
    assert!(rollback.contains("nothing to roll back to") && !rollback.contains("some files failed"), "{rollback}");
    let (_, status, _) = run(&agent, &["status", "--help"]);
    assert!(status.contains("DEST holds no release yet"), "{status}");
    for args in [&["--help"][..], &["pull", "--help"], &["status", "--help"]] {
        let (_, help, _) = run(&agent, args);
        assert!(!help.contains("exit-with-stdin"), "{args:?}: {help}");
    }
}

/// Every relative link in README.md and docs/ names a file that exists (an
/// anchor after `#` is not checked), and every command the quick start
/// shows is a script in the repository.
#[test]
fn the_docs_links_resolve_and_the_quick_start_commands_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    let link = markdown_links;
    let mut broken = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for target in link(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let path = target.split('#').next().unwrap();
            if !doc.parent().unwrap().join(path).exists() {
                broken.push(format!("{}: {target}", doc.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to nothing: {broken:?}");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let quick = readme.split("## Quick start").nth(1).unwrap().split("```sh").nth(1).unwrap().split("```").next().unwrap();
    for line in quick.lines().filter(|l| !l.trim().is_empty()) {
        let cmd = line.split_whitespace().next().unwrap();
        assert!(root.join(cmd).is_file(), "the quick start runs {cmd}, which is not in the repository");
    }
    // Every `fleetsync` and `fleetsync-agent` command shown in a shell block
    // of the docs is a subcommand, and each of its flags is in that
    // subcommand's --help.
    let bins = [("fleetsync", common::bin("fleetsync-bastion", "fleetsync")), ("fleetsync-agent", common::agent_bin())];
    let mut wrong = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for block in text.split("```sh").skip(1).filter_map(|b| b.split("```").next()) {
            for line in block.lines() {
                let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
                let Some(at) = words.iter().position(|w| bins.iter().any(|(name, _)| w == name)) else { continue };
                let (_, bin) = bins.iter().find(|(name, _)| *name == words[at]).unwrap();
                let Some(sub) = words.get(at + 1).filter(|w| !w.starts_with('-')) else { continue };
                let mut path: Vec<&str> = sub.split('|').take(1).collect();
                if let Some(action) = words.get(at + 2).filter(|w| matches!(**w, "show" | "break" | "upload")) {
                    path.push(action);
                }
                let (code, help, _) = run(bin, &[&path[..], &["--help"]].concat());
                if code != Some(0) {
                    wrong.push(format!("{}: `{line}`: no subcommand {path:?}", doc.strip_prefix(root).unwrap().display()));
                    continue;
                }
                for flag in words[at..].iter().map(|w| w.trim_start_matches('[')).filter(|w| w.starts_with("--")) {
                    let flag = flag.split(['=', ']', '|']).next().unwrap();
                    // A flag's own line, or its alias: `[alias: --release]`.
                    if ![" ", "\n", ",", "]"].iter().any(|end| help.contains(&format!("{flag}{end}"))) {
                        wrong.push(format!("{}: `{line}`: {path:?} has no {flag}", doc.strip_prefix(root).unwrap().display()));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "commands the docs show that do not exist:\n{}", wrong.join("\n"));
}

/// The targets of Markdown links `[text](target)` in `text`.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            let target = &rest[..end];
            if !target.contains(char::is_whitespace) {
                out.push(target.to_string());
            }
            rest = &rest[end..];
        }
    }
    out
}

/// docs/configuration.md's table is true: every flag is in its command's
/// `--help`, every key is one its file accepts, every template parameter
/// is in the template.
#[test]
fn the_configuration_table_names_real_flags_keys_and_parameters() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let ticked = |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(str::to_string).collect() };
    let fleetsync = common::bin("fleetsync-bastion", "fleetsync");
    let agent = common::agent_bin();
    let bastion_help: String =
        ["sync", "rollback", "status"].iter().map(|c| run(&fleetsync, &[c, "--help"]).1).collect::<Vec<_>>().join("\n");
    let agent_help = run(&agent, &["pull", "--help"]).1;
    let template = std::fs::read_to_string(root.join("infra/aws/fleetsync.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let accepted = |bin: &std::path::Path, command: &str, key: &str| {
        let file = dir.path().join(format!("{command}.toml"));
        std::fs::write(&file, format!("{key} = \"x\"\n")).unwrap();
        let (_, _, stderr) = run(bin, &["--config", file.to_str().unwrap(), command]);
        !stderr.contains("unknown field")
    };
    let mut rows = 0;
    for line in table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| setting")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, _, flag, file, agent_flag, agent_key, param, _] = cells[..] else { panic!("a row of 6 cells: {line}") };
        rows += 1;
        for f in ticked(flag) {
            match f.split_once(' ') {
                // `publish --shared`: a flag of that command alone.
                Some((command, f)) if f.starts_with('-') => {
                    assert!(run(&fleetsync, &[command, "--help"]).1.contains(f), "fleetsync {command} has no {f}")
                }
                _ if f.starts_with('-') => assert!(bastion_help.contains(f.as_str()), "fleetsync has no {f}"),
                _ => {}
            }
        }
        for k in ticked(file) {
            let key = k.split(" =").next().unwrap();
            assert!(accepted(&fleetsync, "sync", key), "fleetsync.toml refuses {key}");
        }
        for f in ticked(agent_flag).iter().filter(|f| f.starts_with('-')) {
            assert!(agent_help.contains(f.as_str()), "fleetsync-agent pull has no {f}");
        }
        for k in ticked(agent_key) {
            let key = k.split(" =").next().unwrap();
            assert!(accepted(&agent, "pull", key), "agent.toml refuses {key}");
        }
        for p in ticked(param).iter().filter(|p| !p.contains(' ') && !p.contains('-')) {
            assert!(template.contains(&format!("\n  {p}:\n")), "the template has no parameter {p}");
        }
    }
    assert!(rows > 30, "{rows} rows read");
}

/// The store commands take the source as the fleet commands do
/// (`--source`), besides their argument; none is a usage error naming both.
#[test]
fn the_store_commands_take_the_source_as_the_fleet_commands_do() {
    let fleetsync = common::bin("fleetsync-bastion", "fleetsync");
    let empty = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(&fleetsync, &["releases"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("give --source s3://BUCKET[/PREFIX]") && stderr.lines().count() == 1, "{stderr}");
    for args in [
        &["releases", "--source", "s3://bucket-x/app"][..],
        &["history", "--source", "s3://bucket-x/app"],
        &["prune", "--source", "s3://bucket-x/app", "--keep", "3", "--dry-run"],
        &["publish", empty.path().to_str().unwrap(), "--source", "s3://bucket-x/app", "--dry-run"],
    ] {
        let (_, _, stderr) = run(&fleetsync, args);
        assert!(!stderr.contains("unexpected argument") && !stderr.contains("missing"), "{args:?}: {stderr}");
        assert!(!stderr.contains("deprecated"), "{args:?}: {stderr}");
    }
    // The old spelling, the source as an argument, still works, with a
    // line that names the new one.
    for args in [&["releases", "s3://bucket-x/app"][..], &["publish", empty.path().to_str().unwrap(), "s3://bucket-x/app", "--dry-run"]] {
        let (_, _, stderr) = run(&fleetsync, args);
        assert!(!stderr.contains("missing"), "{args:?}: {stderr}");
        assert!(stderr.contains("is deprecated, use --source"), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = run(&fleetsync, &["history", "s3://a/p", "--source", "s3://b/p"]);
    assert_eq!(code, Some(2), "one source, not two: {stderr}");
}

/// The man pages the packages ship: both commands' top pages have
/// EXAMPLES, FILES and EXIT STATUS besides what clap generates from the
/// flags, and the commands they show exist.
#[test]
fn the_man_pages_have_examples_files_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, page) in [(common::bin("fleetsync-bastion", "fleetsync"), "fleetsync.1"), (common::agent_bin(), "fleetsync-agent.1")] {
        let (code, _, stderr) = run(&bin, &["man", dir.path().to_str().unwrap()]);
        assert_eq!(code, Some(0), "{stderr}");
        let roff = std::fs::read_to_string(dir.path().join(page)).unwrap();
        for section in [".SH \"EXAMPLES\"", ".SH \"FILES\"", ".SH \"EXIT STATUS\"", ".SH \"SEE ALSO\""] {
            assert!(roff.contains(section), "{page} has no {section}");
        }
        let status = roff.split(".SH \"EXIT STATUS\"").nth(1).unwrap();
        assert!(status.contains("\n  0  ") && status.contains("\n  2  "), "{page}: {status}");
        // Each example is a subcommand of its binary.
        let examples = roff.split(".SH \"EXAMPLES\"").nth(1).unwrap().split(".SH ").next().unwrap();
        for line in examples.lines().filter(|l| l.starts_with("  fleetsync")) {
            let sub = line.split_whitespace().nth(1).unwrap();
            assert_eq!(run(&bin, &[sub, "--help"]).0, Some(0), "{page}: {line}");
        }
    }
}
