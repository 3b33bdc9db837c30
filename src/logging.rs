//! Log output on stderr for both commands: `-v` (info), `-vv` (debug), or
//! RUST_LOG. By default only fleetsync's own warnings: the AWS SDK logs its
//! configuration lookups (a missing config file, an unreachable instance
//! metadata service) as warnings that bury the one line that says what is
//! wrong and how to fix it; `-v` shows them. ANSI colours only on a
//! terminal (CI logs keep plain text).

use std::io::IsTerminal;

/// Starts logging at `verbose` (the count of `-v`) for the binary `crate_name`.
pub fn init(verbose: u8, crate_name: &str) {
    let default = match verbose {
        0 => format!("error,fleetsync=warn,{crate_name}=warn"),
        1 => "info".to_string(),
        _ => "debug".to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}
