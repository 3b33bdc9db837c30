//! Progress on stderr: an indicatif bar on a terminal, plain timestamped
//! lines otherwise (systemd journal, SSM output, CI logs), where a redrawn
//! bar would be noise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fleetsync::report::human_bytes;
use fleetsync::Observer;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The observer the agent passes to the library.
pub(crate) struct StderrProgress {
    /// `None` when stderr is not a terminal.
    bar: Option<ProgressBar>,
    started: Instant,
    listed: AtomicU64,
    planned: AtomicU64,
    planned_bytes: AtomicU64,
}

pub(crate) fn for_stderr() -> Arc<StderrProgress> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("template is valid")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    Arc::new(StderrProgress {
        bar,
        started: Instant::now(),
        listed: AtomicU64::new(0),
        planned: AtomicU64::new(0),
        planned_bytes: AtomicU64::new(0),
    })
}

impl StderrProgress {
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn line(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("[{:>7.2}s] {msg}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn refresh(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("listed {}, fetching {}", self.listed.load(Ordering::Relaxed), self.planned.load(Ordering::Relaxed)));
        }
    }
}

impl Observer for StderrProgress {
    fn listed(&self, files: u64) {
        self.listed.fetch_add(files, Ordering::Relaxed);
        self.refresh();
    }

    fn planned(&self, bytes: u64) {
        self.planned.fetch_add(1, Ordering::Relaxed);
        self.planned_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc_length(bytes);
        }
        self.refresh();
    }

    fn listing_done(&self, files: u64) {
        self.line(&format!(
            "listed {files} files; {} to download ({})",
            self.planned.load(Ordering::Relaxed),
            human_bytes(self.planned_bytes.load(Ordering::Relaxed))
        ));
    }

    fn downloaded(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn failed(&self, key: &str, error: &str) {
        self.line(&format!("failed {key}: {error}"));
    }
}
