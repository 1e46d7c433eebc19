//! Logging set-up: `tracing` to standard error or to a log file that SIGHUP reopens (logrotate).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing_subscriber::EnvFilter;

/// Handle on the installed log output; `reopen` re-opens the log file after rotation.
#[derive(Clone)]
pub struct LogHandle {
    target: Arc<LogTarget>,
}

struct LogTarget {
    path: Option<PathBuf>,
    file: Mutex<Option<File>>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogHandle {
    /// Re-open the log file (no-op when logging to standard error).
    pub fn reopen(&self) -> io::Result<()> {
        if let Some(path) = &self.target.path {
            let f = open(path)?;
            if let Ok(mut guard) = self.target.file.lock() {
                *guard = Some(f);
            }
        }
        Ok(())
    }
}

/// Writer handed to tracing for each event.
pub struct LogWriter {
    target: Arc<LogTarget>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.target.file.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some(f) => f.write(buf),
                None => io::stderr().write(buf),
            },
            Err(_) => io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogHandle {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter { target: self.target.clone() }
    }
}

/// Install the global subscriber. `verbose`: 0 warn, 1 info, 2 debug, 3 trace; `RUST_LOG`
/// overrides. If a subscriber is already installed (several nodes in one test process), the
/// existing one is kept.
pub fn init(logfile: Option<&Path>, verbose: u8) -> io::Result<LogHandle> {
    let file = logfile.map(open).transpose()?;
    let handle =
        LogHandle { target: Arc::new(LogTarget { path: logfile.map(Path::to_path_buf), file: Mutex::new(file) }) };
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(handle.clone())
        .with_ansi(logfile.is_none() && std::env::var_os("NO_COLOR").is_none())
        .try_init();
    Ok(handle)
}
