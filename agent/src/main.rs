//! `fleetsync-agent`: runs on each instance and pulls `s3://bucket/prefix`
//! into local disk. Parsing and printing only; the work is in the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fleetsync::man::Extra;
use fleetsync::pull::{DEFAULT_CONCURRENCY, DEFAULT_STATE_DIR};
use fleetsync::{exit, ClientOptions, IfBusy, PullOptions, PullReport, S3Url};

mod config;
mod lifeline;
mod metrics;
mod progress;

use config::{AgentConfig, Mode};

/// Blocking-pool threads beyond the working ones (see the runtime's setup).
const WAITING_BLOCKING_TASKS: usize = 4;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok: DEST matches the source
  1  partial failure: some files failed (see the report), or the pull failed as a whole
  2  usage or configuration error (flags, credentials, bucket, endpoint, permissions); nothing changed
  3  busy: another pull holds the node lock and --if-busy fail was given";

#[derive(Parser)]
#[command(name = "fleetsync-agent", version = fleetsync::VERSION, about = "Pulls s3://BUCKET/PREFIX into a local directory, fast and safely.", after_help = EXIT_CODES)]
struct Cli {
    /// The node's config file (keys are the long flag names); default
    /// /etc/fleetsync/agent.toml when it exists. Flags override it.
    #[arg(long, global = true, env = "FLEETSYNC_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (-v info, -vv debug). RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Stop (exit code 130) when stdin closes: how the bastion's SSH
    /// sessions make sure no agent outlives them.
    #[arg(long, global = true, hide = true)]
    exit_with_stdin: bool,
}

// Parsed once per process: pull's many flags in place cost nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Make DEST match the source: download what changed, delete what was removed.
    #[command(after_help = EXIT_CODES)]
    Pull(PullArgs),
    /// Release mode: make an earlier release live again (default: the one before the live one).
    #[command(after_help = ROLLBACK_EXIT_CODES)]
    Rollback(RollbackArgs),
    /// Release mode: the live release, the one before it, the kept releases and the last pull.
    #[command(after_help = STATUS_EXIT_CODES)]
    Status(StatusArgs),
    /// Answer this instance's Auto Scaling launch hook, signed with its
    /// role's credentials: `complete` once the first pull made the code
    /// live (or `--result abandon`), `heartbeat` while a long one runs.
    /// What the template's user-data runs once the agent is installed.
    #[command(after_help = LIFECYCLE_EXIT_CODES)]
    Lifecycle(LifecycleArgs),
    /// Print the shell completion script, e.g. `fleetsync-agent completions bash`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (fleetsync-agent.1, one per command) into DIR; the packages ship them.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// `pull`'s flags. Those that agent.toml may supply are optional here;
/// `apply` fills them from the file, then from the defaults.
#[derive(clap::Args)]
struct PullArgs {
    /// The source, s3://BUCKET[/PREFIX] (or `source` in agent.toml).
    source: Option<String>,
    /// The directory to keep in sync with the source.
    #[arg(long)]
    dest: Option<PathBuf>,
    /// Where the node lock and the record of placed files live (outside
    /// DEST) [default: /var/lib/fleetsync].
    #[arg(long, env = "FLEETSYNC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Downloads in flight [default: 64].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Keep files the source no longer has.
    #[arg(long)]
    no_delete: bool,
    /// Let an empty source delete everything (in release mode: go live as
    /// an empty release). Refused by default: an empty listing is usually a
    /// wrong prefix or a build not yet published.
    #[arg(long)]
    allow_empty: bool,
    /// Print the plan and touch nothing.
    #[arg(long)]
    dry_run: bool,
    /// Release mode (recommended): build each release in DEST/releases/ID,
    /// sharing unchanged files by hard link, and switch DEST/current to it
    /// atomically once complete.
    #[arg(long, conflicts_with = "in_place")]
    releases: bool,
    /// In-place mode: DEST itself is the tree (overrides `mode` in agent.toml).
    #[arg(long)]
    in_place: bool,
    /// Release mode: the release to make live: one in the release store
    /// (`fleetsync publish`), or the name to give a plain prefix's release;
    /// default: the group's deployed release, else the latest published,
    /// else (a plain prefix) a hash of the content.
    #[arg(long)]
    release_id: Option<String>,
    /// Release mode, with --release-id: the SHA-256 of that release's
    /// manifest, as `fleetsync sync` read it (it passes it). A copy of the
    /// release on this node recorded with another digest is checked
    /// against the store's before it goes live; without it, a live copy
    /// is trusted by its id.
    /// (The bastion passes it in the environment, which an older agent
    /// ignores, so a new bastion can deploy to nodes not yet upgraded.)
    #[arg(long, env = "FLEETSYNC_MANIFEST_DIGEST", value_name = "SHA256", requires = "release_id")]
    manifest_digest: Option<fleetsync::store::Digest>,
    /// Release mode: the Auto Scaling Group this node belongs to; the node
    /// follows the release `fleetsync sync` deployed to it (not merely the
    /// latest published). Remembered for later pulls.
    #[arg(long)]
    group: Option<String>,
    /// Release mode: releases kept besides the live one and the one before it [default: 5].
    #[arg(long)]
    keep: Option<usize>,
    /// Release mode: a shell command run in the new release's directory
    /// once it is complete (shared links made), before it goes live, e.g.
    /// `php artisan config:cache`; it fails or times out: nothing switches,
    /// the pull exits 1 with its last lines (FLEETSYNC_RELEASE,
    /// FLEETSYNC_RELEASE_DIR, FLEETSYNC_PREVIOUS_RELEASE are set).
    #[arg(long, value_name = "CMD")]
    before_switch: Option<String>,
    /// Release mode: how long --before-switch or --after-switch may run
    /// before it is killed with its process group, e.g. 90s, 10m [default: 10m].
    #[arg(long, value_name = "DURATION")]
    hook_timeout: Option<fleetsync::duration::Seconds>,
    /// Release mode: a shell command run after each switch, e.g. a restart
    /// of an app that loads its code at start (FLEETSYNC_RELEASE,
    /// FLEETSYNC_RELEASE_DIR, FLEETSYNC_PREVIOUS_RELEASE are set; PHP behind
    /// the nginx recipe in infra/web needs none).
    #[arg(long, value_name = "CMD")]
    after_switch: Option<String>,
    /// Release mode: after each switch (and --after-switch), GET this URL on
    /// the node, e.g. http://127.0.0.1/health, until it answers 2xx (a redirect is not followed);
    /// when it does not within --health-timeout the pull fails (exit 1).
    #[arg(long, value_name = "URL")]
    health_url: Option<String>,
    /// How long the release has to answer --health-url, e.g. 30s, 2m [default: 30s].
    #[arg(long, value_name = "DURATION")]
    health_timeout: Option<fleetsync::duration::Seconds>,
    /// Release mode: when the after-switch command or the health check
    /// fails, make the previous release live again.
    #[arg(long)]
    rollback_on_failure: bool,
    /// Release mode: a path that outlives releases (uploads, storage/,
    /// .env): in every release a symlink to DEST/shared/PATH, or to TARGET
    /// (an absolute path, e.g. an EFS mount), made before the release goes
    /// live; seeded once from the live release, else from the new one.
    /// Repeatable; adds to `shared` in agent.toml. Store releases only.
    #[arg(long, value_name = "PATH[=TARGET]")]
    shared: Vec<String>,
    /// Release mode: a file that outlives releases (.env, wp-config.php),
    /// linked as --shared links a directory; seeded once from the live
    /// release or the new one, never made empty: with neither, the pull
    /// fails naming it. Repeatable; adds to `shared-files` in agent.toml.
    #[arg(long, value_name = "PATH[=TARGET]")]
    shared_file: Vec<String>,
    /// Release mode: files of the live release matching GLOB (e.g.
    /// 'public/build/**') that the new release lacks are hard-linked into
    /// it, so that pages of either release find their assets on every node
    /// while a rolling deploy runs. Repeatable; adds to `keep-assets` in
    /// agent.toml. Store releases only.
    #[arg(long, value_name = "GLOB")]
    keep_assets: Vec<String>,
    /// Release mode: how long a full check of the live release for drift
    /// (a stat per file) is trusted; a pull within it costs one request
    /// and no stat. A release built from the staged copy is checked by the
    /// first pull after its switch. 0 checks on every pull [default: 15m].
    #[arg(long, value_name = "DURATION")]
    verify_every: Option<fleetsync::duration::Seconds>,
    /// Print one JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// When another pull is running: wait for it (and coalesce), or fail with exit code 3.
    #[arg(long, value_enum, default_value = "wait")]
    if_busy: IfBusyArg,
    /// AWS region of the bucket (default: the standard AWS chain, then us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Path-style S3 addressing, for S3-compatible servers.
    #[arg(long, env = "FLEETSYNC_S3_PATH_STYLE")]
    path_style: bool,
    /// How long a response may stay silent before the request is retried, e.g. 30s, 2m [default: 30s].
    #[arg(long, value_name = "DURATION")]
    read_timeout: Option<fleetsync::duration::Seconds>,
    /// Write the pull's result as Prometheus metrics into FILE (for
    /// node_exporter's textfile collector, e.g.
    /// /var/lib/prometheus/node-exporter/fleetsync.prom); off by default.
    /// (Set empty, as a unit drop-in may, it turns them off: clap's path
    /// parser would refuse the empty value.)
    #[arg(long, env = "FLEETSYNC_METRICS_FILE", value_name = "FILE", value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from))]
    metrics_file: Option<PathBuf>,
    /// CPU and I/O priority: low (nice 10, lowest best-effort I/O: the
    /// server keeps serving while it pulls), idle (low, and only the CPU
    /// nothing else wants: the server notices less, and a pull on a node
    /// whose cores are all busy waits) or normal [default: low].
    #[arg(long, value_enum)]
    priority: Option<PriorityArg>,
    /// Threads for downloads, decompression, hashing and writing [default:
    /// one per core; at --priority normal, as many writers as the downloads need].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Who owns the files and directories placed in DEST, USER[:GROUP]
    /// (names or numbers; e.g. the web server's user); default: the agent's
    /// (root). Applied as each is placed; needs the agent to run as root.
    #[arg(long, value_name = "USER[:GROUP]")]
    owner: Option<String>,
}

impl PullArgs {
    /// Fills what the flags left out from agent.toml; checks what is required.
    fn apply(&mut self, cfg: AgentConfig) -> anyhow::Result<()> {
        self.source = self.source.take().or(cfg.source);
        self.dest = self.dest.take().or(cfg.dest);
        self.state_dir = self.state_dir.take().or(cfg.state_dir);
        self.concurrency = self.concurrency.or(cfg.concurrency);
        self.keep = self.keep.or(cfg.keep);
        self.group = self.group.take().or(cfg.group);
        self.after_switch = self.after_switch.take().or(cfg.after_switch);
        self.before_switch = self.before_switch.take().or(cfg.before_switch);
        self.hook_timeout = self.hook_timeout.or(cfg.hook_timeout);
        self.rollback_on_failure |= cfg.rollback_on_failure.unwrap_or(false);
        self.health_url = self.health_url.take().or(cfg.health_url);
        self.health_timeout = self.health_timeout.or(cfg.health_timeout);
        self.region = self.region.take().or(cfg.region);
        self.owner = self.owner.take().or(cfg.owner);
        self.shared.extend(cfg.shared.unwrap_or_default());
        self.shared_file.extend(cfg.shared_files.unwrap_or_default());
        self.keep_assets.extend(cfg.keep_assets.unwrap_or_default());
        self.verify_every = self.verify_every.or(cfg.verify_every);
        self.path_style |= cfg.path_style.unwrap_or(false);
        // The unit sets FLEETSYNC_METRICS_FILE; set empty (a drop-in), it
        // turns the metrics off whatever agent.toml says.
        self.metrics_file = match self.metrics_file.take() {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(path),
            None => cfg.metrics_file,
        };
        // A release id means release mode: `--release-id ID` without
        // `--releases` is not an error.
        if !self.in_place && (cfg.mode == Some(Mode::Releases) || self.release_id.is_some()) {
            self.releases = true;
        }
        if self.source.is_none() {
            return Err(missing("the source (s3://BUCKET/PREFIX)", "source"));
        }
        if self.dest.is_none() {
            return Err(missing("--dest", "dest"));
        }
        let release_only = [
            ("--release-id", self.release_id.is_some()),
            ("--group", self.group.is_some()),
            ("--keep", self.keep.is_some()),
            ("--after-switch", self.after_switch.is_some()),
            ("--before-switch", self.before_switch.is_some()),
            ("--hook-timeout", self.hook_timeout.is_some()),
            ("--rollback-on-failure", self.rollback_on_failure),
            ("--health-url", self.health_url.is_some()),
            ("--health-timeout", self.health_timeout.is_some()),
            ("--shared", !self.shared.is_empty()),
            ("--shared-file", !self.shared_file.is_empty()),
            ("--keep-assets", !self.keep_assets.is_empty()),
            ("--verify-every", self.verify_every.is_some()),
        ];
        if let Some((flag, _)) = release_only.iter().find(|(_, set)| *set).filter(|_| !self.releases) {
            return Err(fleetsync::Error::Config(format!(
                "{flag} applies to release mode: add --releases (or mode = \"releases\" in agent.toml)"
            ))
            .into());
        }
        check_hook_timeout(self.hook_timeout)?;
        if self.rollback_on_failure && self.after_switch.is_none() && self.health_url.is_none() {
            return Err(fleetsync::Error::Config("--rollback-on-failure needs --after-switch CMD or --health-url URL".into()).into());
        }
        if let Some(url) = &self.health_url {
            fleetsync::release::health::parse(url)?;
        }
        Ok(())
    }

    fn source(&self) -> &str {
        self.source.as_deref().expect("checked by apply")
    }

    fn dest(&self) -> &std::path::Path {
        self.dest.as_deref().expect("checked by apply")
    }

    /// The flag's or agent.toml's state dir, else the default.
    fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }
}

/// A required value missing from both the flags and agent.toml.
fn missing(what: &str, key: &str) -> anyhow::Error {
    fleetsync::Error::Config(format!("missing {what}: give it on the command line or as `{key} = ...` in {}", config::FILE.default)).into()
}

/// The state dir: the flag (or FLEETSYNC_STATE_DIR), agent.toml, the default.
fn state_dir(flag: Option<PathBuf>, cfg: &AgentConfig) -> PathBuf {
    flag.or_else(|| cfg.state_dir.clone()).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

#[derive(clap::Args)]
struct RollbackArgs {
    /// The release-mode DEST (default: `dest` in agent.toml).
    #[arg(long)]
    dest: Option<PathBuf>,
    /// The release to make live (default: the one live before the current one).
    #[arg(long)]
    to: Option<String>,
    /// A command run once the release is live, as after a pull's switch
    /// (default: `after-switch` in agent.toml): a Node app restarted into
    /// the release made live. Failing, exit 1; the release stays live.
    #[arg(long, value_name = "CMD")]
    after_switch: Option<String>,
    /// How long --after-switch may run [default: 10m].
    #[arg(long, value_name = "DURATION")]
    hook_timeout: Option<fleetsync::duration::Seconds>,
    /// A URL the release made live must answer with 2xx, as after a pull
    /// (default: `health-url` in agent.toml); failing, exit 1, the
    /// release stays live.
    #[arg(long, value_name = "URL")]
    health_url: Option<String>,
    /// How long the release has to answer --health-url [default: 30s].
    #[arg(long, value_name = "DURATION")]
    health_timeout: Option<fleetsync::duration::Seconds>,
    #[arg(long, env = "FLEETSYNC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print one JSON report on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The release-mode DEST (default: `dest` in agent.toml).
    #[arg(long)]
    dest: Option<PathBuf>,
    #[arg(long, env = "FLEETSYNC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

const ROLLBACK_EXIT_CODES: &str = "\
Exit codes:
  0  the release is live
  1  the release is live, but its --after-switch command failed or it did not answer --health-url with 2xx
  2  usage or configuration error (no such release, nothing to roll back to); nothing changed
  3  busy: another pull holds the node lock";

const STATUS_EXIT_CODES: &str = "\
Exit codes:
  0  a release is live
  1  DEST holds no release yet
  2  usage or configuration error";

const LIFECYCLE_EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  the Auto Scaling API failed (see the message); try again
  2  configuration: no credentials or permission, no route to the API, or no launch waiting on that hook";

#[derive(clap::Args)]
struct LifecycleArgs {
    #[arg(value_enum)]
    action: LifecycleAction,
    /// The Auto Scaling Group the instance belongs to.
    #[arg(long)]
    group: String,
    /// The launch lifecycle hook's name (the template's: fleetsync-first-pull).
    #[arg(long)]
    hook: String,
    /// The instance (default: this one, from the instance metadata, IMDSv2).
    #[arg(long)]
    instance_id: Option<String>,
    /// `complete`: CONTINUE puts the instance in service, ABANDON has the
    /// group replace it.
    #[arg(long, value_enum, default_value = "continue")]
    result: LifecycleResult,
    /// The group's region (default: the standard AWS chain, which on an
    /// instance is its own region).
    #[arg(long)]
    region: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LifecycleAction {
    Complete,
    Heartbeat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LifecycleResult {
    Continue,
    Abandon,
}

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    Low,
    Idle,
    Normal,
}

#[derive(Clone, Copy, ValueEnum)]
enum IfBusyArg {
    Wait,
    Fail,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("fleetsync-agent: {e:#}");
            ExitCode::from(exit::CONFIG as u8)
        }
    }
}

fn try_main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    fleetsync::logging::init(cli.verbose, "fleetsync_agent");
    if cli.exit_with_stdin {
        lifeline::exit_when_stdin_closes(exit::INTERRUPTED);
    }
    // Before the config file: a broken agent.toml must not stop these.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Man { dir } => return man(dir),
        _ => {}
    }
    let cfg: AgentConfig = config::FILE.load(cli.config.as_deref())?;
    // Before the threads that work start: each inherits the priority (the
    // stdin watcher above only waits).
    let (priority, threads) = match &cli.command {
        Command::Pull(args) => (
            match args.priority {
                Some(PriorityArg::Normal) => fleetsync::priority::Priority::Normal,
                Some(PriorityArg::Low) => fleetsync::priority::Priority::Low,
                Some(PriorityArg::Idle) => fleetsync::priority::Priority::Idle,
                None => cfg.priority.unwrap_or_default(),
            },
            args.threads.or(cfg.threads),
        ),
        _ => (fleetsync::priority::Priority::Normal, None),
    };
    fleetsync::priority::apply(priority)?;
    // Nice is per thread: a low-priority pull with tokio's default blocking
    // pool (up to 512 threads writing, decompressing and hashing for 64
    // downloads) has dozens runnable at once, and their weights add up to
    // a good share of the cores however low each is. At low (and idle)
    // priority the pull therefore runs on one thread per core, workers
    // and blocking pool alike (measured in BENCHMARKS.md, "What a pull
    // costs a serving web server"); --threads sets another count. The
    // blocking pool gets a few threads more than that: some of its tasks
    // wait rather than work (the in-place planner holds one for the whole
    // listing, each DNS lookup takes one), and a pool of one would leave
    // them waiting on each other on a one-core node.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cap = threads.filter(|n| *n > 0).or((priority != fleetsync::priority::Priority::Normal).then_some(cores));
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cap {
        runtime.worker_threads(n).max_blocking_threads(n + WAITING_BLOCKING_TASKS);
    }
    let runtime = runtime.enable_all().build().context("starting the async runtime")?;
    match cli.command {
        Command::Pull(mut args) => {
            if let Err(e) = args.apply(cfg) {
                // The bastion parses stdout: a configuration error is a report too.
                let err = e.downcast::<fleetsync::Error>().unwrap_or_else(|e| fleetsync::Error::Config(format!("{e:#}")));
                let (source, dest) = (args.source.clone().unwrap_or_default(), args.dest.clone().unwrap_or_default());
                return Ok(fail(args.json, source, dest.display().to_string(), err));
            }
            runtime.block_on(pull(args))
        }
        Command::Rollback(mut args) => {
            args.dest = args.dest.take().or(cfg.dest.clone());
            args.after_switch = args.after_switch.take().or(cfg.after_switch.clone());
            args.hook_timeout = args.hook_timeout.or(cfg.hook_timeout);
            args.health_url = args.health_url.take().or(cfg.health_url.clone());
            args.health_timeout = args.health_timeout.or(cfg.health_timeout);
            args.state_dir = Some(state_dir(args.state_dir.take(), &cfg));
            runtime.block_on(rollback(args))
        }
        Command::Status(mut args) => {
            args.dest = args.dest.take().or(cfg.dest.clone());
            args.state_dir = Some(state_dir(args.state_dir.take(), &cfg));
            status(args)
        }
        Command::Lifecycle(mut args) => {
            args.region = args.region.take().or(cfg.region);
            runtime.block_on(lifecycle(args))
        }
        Command::Completions { .. } | Command::Man { .. } => unreachable!("answered before the config file is read"),
    }
}

/// `lifecycle complete|heartbeat`: one call to the Auto Scaling API.
async fn lifecycle(args: LifecycleArgs) -> anyhow::Result<i32> {
    use fleetsync::lifecycle::{self, Hook, Outcome};
    let sdk = fleetsync::source::sdk_config(&ClientOptions { region: args.region.clone(), ..ClientOptions::default() }).await;
    let instance_id = match args.instance_id {
        Some(id) => id,
        None => lifecycle::this_instance().await?,
    };
    let hook = Hook { group: args.group, hook: args.hook, instance_id };
    let done = match args.action {
        LifecycleAction::Complete => {
            let outcome = match args.result {
                LifecycleResult::Continue => Outcome::Continue,
                LifecycleResult::Abandon => Outcome::Abandon,
            };
            lifecycle::complete(&sdk, &hook, outcome)
                .await
                .map(|()| format!("completed the launch hook {} of {}: {outcome:?}", hook.hook, hook.instance_id))
        }
        LifecycleAction::Heartbeat => lifecycle::heartbeat(&sdk, &hook)
            .await
            .map(|()| format!("recorded a heartbeat on the launch hook {} of {}", hook.hook, hook.instance_id)),
    };
    match done {
        Ok(line) => {
            eprintln!("{line}");
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("fleetsync-agent: {e}");
            Ok(e.exit_code())
        }
    }
}

/// `completions SHELL`: the completion script, from the clap definitions.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<i32> {
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "fleetsync-agent", &mut std::io::stdout());
    Ok(exit::OK)
}

/// `man DIR`: fleetsync-agent.1 and a page per command.
/// The man page's EXAMPLES.
const MAN_EXAMPLES: &str = "\
Pull in release mode (the web root is /var/www/app/current), see what is live, go back:

  fleetsync-agent pull s3://code/app --dest /var/www/app --releases
  fleetsync-agent status --dest /var/www/app
  fleetsync-agent rollback --dest /var/www/app

With /etc/fleetsync/agent.toml written, as the boot unit and the timer run it; what would change, without changing it:

  fleetsync-agent pull --json
  fleetsync-agent pull --dry-run";

/// The man page's FILES.
const MAN_FILES: &str = "\
/etc/fleetsync/agent.toml (or --config FILE, FLEETSYNC_AGENT_CONFIG): the node's settings, keys named as the long flags of pull; flags override it.

/var/lib/fleetsync/ (--state-dir): the node lock, the release registry, the node's group, the last pointer seen, in-place state.

DEST/current, DEST/releases/ID/, DEST/shared/: the live release (a symlink), the kept releases, what outlives them.

/var/lib/prometheus/node-exporter/fleetsync.prom (metrics-file, FLEETSYNC_METRICS_FILE): the last pull as Prometheus gauges.

fleetsync-agent.service, fleetsync-agent.timer: the boot pull and the five-minute timer.";

fn man(dir: &std::path::Path) -> anyhow::Result<i32> {
    let extra = Extra {
        examples: MAN_EXAMPLES,
        files: MAN_FILES,
        exit_codes: EXIT_CODES,
        see_also: "fleetsync(1), fleetsync-agent-pull(1); docs/agent.md in the repository.",
    };
    fleetsync::man::write(dir, "fleetsync-agent.1", &extra, |dir| clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), dir))
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    Ok(exit::OK)
}

/// `pull`: one sync of DEST from the source. Prints the summary on stderr,
/// the plan (dry run) on stdout, or the JSON report with `--json`.
async fn pull(args: PullArgs) -> anyhow::Result<i32> {
    let dest_label = args.dest().display().to_string();
    let source = match S3Url::parse(args.source()) {
        Ok(s) => s,
        Err(e) => return Ok(fail_pull(&args, args.source().to_string(), dest_label, e)),
    };
    let owner = match args.owner.as_deref().map(fleetsync::Owner::parse).transpose() {
        Ok(owner) => owner,
        Err(e) => return Ok(fail_pull(&args, source.to_string(), dest_label, e)),
    };
    let dirs = args.shared.iter().map(|s| fleetsync::release::Shared::parse(s));
    let files = args.shared_file.iter().map(|s| fleetsync::release::Shared::parse_file(s));
    let shared = match dirs.chain(files).collect::<fleetsync::Result<Vec<_>>>() {
        Ok(shared) => shared,
        Err(e) => return Ok(fail_pull(&args, source.to_string(), dest_label, e)),
    };
    let keep_assets = match fleetsync::release::KeepAssets::parse(&args.keep_assets) {
        Ok(keep) => keep,
        Err(e) => return Ok(fail_pull(&args, source.to_string(), dest_label, e)),
    };
    let opts = PullOptions {
        source: source.clone(),
        dest: args.dest().to_path_buf(),
        state_dir: args.state_dir(),
        concurrency: args.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        delete: !args.no_delete,
        allow_empty: args.allow_empty,
        dry_run: args.dry_run,
        if_busy: match args.if_busy {
            IfBusyArg::Wait => IfBusy::Wait,
            IfBusyArg::Fail => IfBusy::Fail,
        },
        client: ClientOptions { region: args.region.clone(), path_style: args.path_style, read_timeout: args.read_timeout.map(|t| t.0) },
        owner,
    };
    let observer = progress::for_stderr();
    let result = if args.releases {
        let release = fleetsync::ReleaseOptions {
            pull: opts,
            release_id: args.release_id.clone(),
            manifest: args.manifest_digest,
            group: args.group.clone(),
            keep: args.keep.unwrap_or(fleetsync::release::DEFAULT_KEEP),
            after_switch: args.after_switch.clone(),
            before_switch: args.before_switch.clone(),
            hook_timeout: args.hook_timeout.map_or(fleetsync::release::DEFAULT_HOOK_TIMEOUT, |t| t.0),
            health_url: args.health_url.clone(),
            health_timeout: args.health_timeout.map_or(fleetsync::release::health::DEFAULT_TIMEOUT, |t| t.0),
            rollback_on_failure: args.rollback_on_failure,
            shared,
            keep_assets,
            verify_every: args.verify_every.map_or(fleetsync::release::DEFAULT_VERIFY_EVERY, |t| t.0),
        };
        fleetsync::pull_release(&release, observer.clone()).await
    } else {
        fleetsync::pull(&opts, observer.clone()).await
    };
    observer.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => return Ok(fail_pull(&args, source.to_string(), dest_label, e)),
    };
    record_metrics(&args, &report);
    eprintln!("{}", report.summary());
    // What failed the pull as a whole (a hook, a release not switched).
    if let Some(e) = &report.error {
        eprintln!("fleetsync-agent: {e}");
    }
    for e in &report.errors {
        eprintln!("  failed: {}: {}", e.key, e.error);
    }
    if report.errors_omitted > 0 {
        eprintln!("  ... and {} more failures", report.errors_omitted);
    }
    if args.json {
        print_stdout(&serde_json::to_string(&report)?);
    } else if let Some(plan) = &report.plan {
        print_plan(&report, plan);
    }
    Ok(report.exit_code)
}

/// A hook timeout of zero would kill every hook as it starts (pull's and
/// rollback's alike).
fn check_hook_timeout(timeout: Option<fleetsync::duration::Seconds>) -> anyhow::Result<()> {
    if timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(fleetsync::Error::Config(
            "--hook-timeout 0 would kill every hook as it starts: give how long a hook may run, e.g. 2m".into(),
        )
        .into());
    }
    Ok(())
}

/// `rollback`: makes an earlier release live again.
async fn rollback(args: RollbackArgs) -> anyhow::Result<i32> {
    let dest = args.dest.clone().ok_or_else(|| missing("--dest", "dest"))?;
    let state_dir = args.state_dir.clone().expect("resolved in try_main");
    if let Some(url) = &args.health_url {
        fleetsync::release::health::parse(url)?;
    }
    check_hook_timeout(args.hook_timeout)?;
    let then = fleetsync::release::AfterLive {
        after_switch: args.after_switch.clone(),
        hook_timeout: args.hook_timeout.map_or(fleetsync::release::DEFAULT_HOOK_TIMEOUT, |t| t.0),
        health_url: args.health_url.clone(),
        health_timeout: args.health_timeout.map_or(fleetsync::release::health::DEFAULT_TIMEOUT, |t| t.0),
    };
    let report = fleetsync::release::rollback(&dest, &state_dir, args.to.as_deref(), &then, IfBusy::Wait).await?;
    let release = report.release.as_ref().expect("a rollback report names its release");
    match (&release.previous, release.switched) {
        (Some(from), true) => eprintln!("rolled back {} from {from} to {}", dest.display(), release.id),
        _ => eprintln!("{} is live in {} already", release.id, dest.display()),
    }
    if let Some(e) = &report.error {
        eprintln!("fleetsync-agent: {e}");
    }
    if args.json {
        print_stdout(&serde_json::to_string(&report)?);
    }
    Ok(report.exit_code)
}

/// `status`: what is live, what could be rolled back to, the last pull.
fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let dest = args.dest.clone().ok_or_else(|| missing("--dest", "dest"))?;
    let st = fleetsync::release::status(&dest, args.state_dir.as_deref().expect("resolved in try_main"))?;
    // Nothing live is a node that cannot serve: say so, in the exit code too.
    let code = if st.current.is_some() { exit::OK } else { exit::PARTIAL };
    if code != exit::OK {
        eprintln!("fleetsync-agent: {} holds no release yet: pull one with --releases (or deploy with fleetsync sync --releases)", st.dest);
    }
    if args.json {
        print_stdout(&serde_json::to_string(&st)?);
        return Ok(code);
    }
    let mut out = format!(
        "{}: current {}, previous {}\n",
        st.dest,
        st.current.as_deref().unwrap_or("(none)"),
        st.previous.as_deref().unwrap_or("(none)")
    );
    for r in st.releases.iter().rev() {
        let mark = if Some(&r.id) == st.current.as_ref() { "*" } else { " " };
        let note = if r.rolled_back { " (rolled back)" } else { "" };
        out.push_str(&format!("{mark} {}  {} files{note}\n", r.id, r.files));
    }
    if let Some(last) = &st.last_pull {
        out.push_str(&format!("last pull: {}", last.summary()));
    }
    print_stdout(out.trim_end());
    Ok(code)
}

/// A pull that failed as a whole, with its metrics.
fn fail_pull(args: &PullArgs, source: String, dest: String, err: fleetsync::Error) -> i32 {
    record_metrics(args, &PullReport::failed(source.clone(), dest.clone(), &err));
    fail(args.json, source, dest, err)
}

/// Writes the metrics file, when asked for one, for a pull that ran (not a
/// dry run, not a request that found another pull busy). A failure to
/// write is a warning: the pull's own result stands.
fn record_metrics(args: &PullArgs, report: &PullReport) {
    let Some(path) = &args.metrics_file else { return };
    if report.dry_run || report.status == fleetsync::PullStatus::Busy {
        return;
    }
    let live = if args.releases { fleetsync::release::status(args.dest(), &args.state_dir()).ok().and_then(|s| s.current) } else { None };
    if let Err(e) = metrics::write(path, &metrics::render(report, live.as_deref())) {
        eprintln!("fleetsync-agent: warning: metrics not written to {}: {e} (the pull itself is unaffected)", path.display());
    }
}

/// Reports a pull that failed as a whole: one line on stderr, and the JSON
/// report too when asked, so that the bastion always has something to parse.
fn fail(json: bool, source: String, dest: String, err: fleetsync::Error) -> i32 {
    eprintln!("fleetsync-agent: {err}");
    let report = PullReport::failed(source, dest, &err);
    if json {
        print_stdout(&serde_json::to_string(&report).expect("reports serialize"));
    }
    report.exit_code
}

fn print_plan(report: &PullReport, plan: &fleetsync::report::Plan) {
    let mut out = String::new();
    for p in &plan.fetch {
        out.push_str(&format!("fetch  {p}\n"));
    }
    if report.counts.downloaded > plan.fetch.len() as u64 {
        out.push_str(&format!("fetch  ... and {} more\n", report.counts.downloaded - plan.fetch.len() as u64));
    }
    for p in &plan.delete {
        out.push_str(&format!("delete {p}\n"));
    }
    if report.counts.deleted > plan.delete.len() as u64 {
        out.push_str(&format!("delete ... and {} more\n", report.counts.deleted - plan.delete.len() as u64));
    }
    print_stdout(out.trim_end());
}

/// Writes a line to stdout; a closed pipe (`| head`) is a normal end, not
/// an error worth a panic.
fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}").and_then(|()| out.flush());
}
