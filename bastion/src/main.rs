//! `fleetsync`: the operator's and CI's command for a whole Auto Scaling
//! Group. Parsing and printing only; the work is in the library.
//!
//! Today it lists a group's instances (`list`: the discover step) and
//! manages the fleet lock (`lock show`, `lock break`); `sync` (discover ->
//! lock -> trigger -> collect -> report) is issue 3's next step.

mod discover;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetsync::fleet_lock::{self, LockObject};
use fleetsync::source::S3Client;
use fleetsync::{exit, ClientOptions, S3Url};

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  the operation failed (see the message)
  2  usage or configuration error (flags, credentials, bucket, endpoint)";

#[derive(Parser)]
#[command(name = "fleetsync", version, about = "Keeps every instance of an Auto Scaling Group on the same codebase from S3.", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the group's instances: which would be synced, and why the others are skipped.
    List(ListArgs),
    /// Inspect or break the fleet lock that keeps two deploys of a group apart.
    #[command(subcommand)]
    Lock(LockCommand),
}

#[derive(Args)]
struct ListArgs {
    /// The Auto Scaling Group.
    #[arg(long)]
    asg: String,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    /// AWS region of the group (default: the standard AWS chain, then us-east-1).
    #[arg(long)]
    region: Option<String>,
}

#[derive(Subcommand)]
enum LockCommand {
    /// Print who holds the lock, since when, and until when.
    Show(LockArgs),
    /// Delete the lock whoever holds it, and print what was broken. The
    /// holder notices at its next renewal and stops starting nodes.
    Break(LockArgs),
}

#[derive(Args)]
struct LockArgs {
    /// The Auto Scaling Group.
    #[arg(long, required_unless_present = "lock")]
    asg: Option<String>,
    /// The deploy's source; the lock lives in its bucket by default.
    #[arg(long, required_unless_present = "lock")]
    source: Option<String>,
    /// The lock object, when not the default s3://SOURCE_BUCKET/.fleetsync/locks/ASG.json.
    #[arg(long)]
    lock: Option<String>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
    /// AWS region of the bucket (default: the standard AWS chain, then us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Path-style S3 addressing, for S3-compatible servers.
    #[arg(long, env = "FLEETSYNC_S3_PATH_STYLE")]
    path_style: bool,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("fleetsync: {e:#}");
            let code = e.downcast_ref::<fleetsync::Error>().map_or(exit::PARTIAL, fleetsync::Error::exit_code);
            ExitCode::from(code as u8)
        }
    }
}

fn try_main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    match cli.command {
        Command::List(args) => runtime.block_on(list(args)),
        Command::Lock(LockCommand::Show(args)) => runtime.block_on(lock_show(args)),
        Command::Lock(LockCommand::Break(args)) => runtime.block_on(lock_break(args)),
    }
}

/// `list`: the discover step on its own, as a table or JSON.
async fn list(args: ListArgs) -> anyhow::Result<i32> {
    let sdk = fleetsync::source::sdk_config(&ClientOptions { region: args.region.clone(), path_style: false }).await;
    let nodes = discover::discover(&sdk, &args.asg).await?;
    if args.json {
        print_stdout(&serde_json::to_string(&nodes)?);
        return Ok(exit::OK);
    }
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|n| {
            [
                n.instance_id.clone(),
                n.private_ip.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{}/{}", n.lifecycle, n.health, n.state),
                if n.is_target() { "sync".into() } else { "skip".into() },
                n.skipped.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = table(&["INSTANCE", "ADDRESS", "STATE", "ACTION", "REASON"], &rows);
    let targets = nodes.iter().filter(|n| n.is_target()).count();
    out.push_str(&format!("\n{targets} of {} instances would be synced", nodes.len()));
    print_stdout(&out);
    Ok(exit::OK)
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `lock show`: the holder of the group's fleet lock, if any.
async fn lock_show(args: LockArgs) -> anyhow::Result<i32> {
    let (client, object) = lock_target(&args).await?;
    let held = fleet_lock::read(&client, &object).await?;
    if args.json {
        let info = held.as_ref().map(|(info, _)| info);
        print_stdout(&serde_json::json!({ "lock": object.to_string(), "held": info.is_some(), "holder": info }).to_string());
    } else {
        match held {
            None => print_stdout(&format!("{object}: not held")),
            Some((info, _)) => {
                let state = if info.expired() { "lease expired; the next deploy takes it over" } else { "held" };
                print_stdout(&format!("{object}: {state} by {}", info.describe()));
            }
        }
    }
    Ok(exit::OK)
}

/// `lock break`: deletes the group's fleet lock and says whose it was.
async fn lock_break(args: LockArgs) -> anyhow::Result<i32> {
    let (client, object) = lock_target(&args).await?;
    let broken = fleet_lock::break_lock(&client, &object).await?;
    if args.json {
        print_stdout(&serde_json::json!({ "lock": object.to_string(), "broken": broken }).to_string());
    } else {
        match broken {
            None => print_stdout(&format!("{object}: not held; nothing to break")),
            Some(info) => print_stdout(&format!("{object}: broke the lock of {}", info.describe())),
        }
    }
    Ok(exit::OK)
}

async fn lock_target(args: &LockArgs) -> anyhow::Result<(S3Client, LockObject)> {
    let object = match (&args.lock, &args.asg, &args.source) {
        (Some(lock), _, _) => LockObject::parse(lock)?,
        (None, Some(asg), Some(source)) => LockObject::for_group(&S3Url::parse(source)?, asg)?,
        _ => unreachable!("clap requires --lock or both --asg and --source"),
    };
    let client = fleetsync::source::s3_client(&ClientOptions { region: args.region.clone(), path_style: args.path_style }).await;
    Ok((client, object))
}

/// Writes a line to stdout; a closed pipe is a normal end.
fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}").and_then(|()| out.flush());
}
