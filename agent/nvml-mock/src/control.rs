//! The control directory the tests share with the stand-in (`FLOTILLA_NVML_MOCK_DIR`):
//! `config` (read at `nvmlInit_v2`), `commands` (appended to by tests, read as it grows) and
//! `log` (what the library was asked: initialisation, event registrations, deliveries).

use crate::gpus::{Command, Config, Node};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The variable naming the control directory; unset: eight idle H100s, no commands.
pub const CONTROL_DIR_VAR: &str = "FLOTILLA_NVML_MOCK_DIR";
/// Commands are looked for at most this often.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// The library's whole state, behind one lock.
#[derive(Debug)]
pub struct Library {
    node: Option<Node>,
    inits: u32,
    dir: Option<PathBuf>,
    /// Bytes of `commands` already applied.
    offset: u64,
    last_poll: Option<Instant>,
}

static LIBRARY: Mutex<Library> =
    Mutex::new(Library { node: None, inits: 0, dir: None, offset: 0, last_poll: None });

/// Locks the library state (a panic elsewhere does not poison it for good).
pub fn lock() -> MutexGuard<'static, Library> {
    LIBRARY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Library {
    /// The node, once initialised.
    pub fn node_mut(&mut self) -> Option<&mut Node> {
        if self.inits == 0 { None } else { self.node.as_mut() }
    }

    /// `<dir>/config`, or the defaults without one; the directory is named by
    /// [`CONTROL_DIR_VAR`] when the library is first initialised.
    pub fn load_config(&mut self) -> Result<Config, String> {
        if self.node.is_none() {
            self.dir = std::env::var_os(CONTROL_DIR_VAR).map(PathBuf::from);
        }
        let Some(dir) = &self.dir else { return Ok(Config::default()) };
        match std::fs::read_to_string(dir.join("config")) {
            Ok(text) => Config::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(format!("reading {}: {e}", dir.join("config").display())),
        }
    }

    /// `nvmlInit_v2` succeeded: the node is built on the first one and kept after.
    pub fn initialise(&mut self, config: Config) {
        if self.node.is_none() {
            self.log(&format!("init gpus={} model={}", config.gpus, config.model.short));
            self.node = Some(Node::new(config));
        }
        self.inits += 1;
    }

    /// `nvmlShutdown`: false when not initialised.
    pub fn shutdown(&mut self) -> bool {
        if self.inits == 0 {
            return false;
        }
        self.inits -= 1;
        if self.inits == 0 {
            self.log("shutdown");
        }
        true
    }

    /// Appends a line to `<dir>/log`.
    pub fn log(&self, line: &str) {
        let Some(dir) = &self.dir else { return };
        let file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log"));
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{line}");
        }
    }

    /// Applies the complete lines appended to `<dir>/commands` since the last look.
    pub fn poll(&mut self) {
        let now = Instant::now();
        if self.last_poll.is_some_and(|t| now.duration_since(t) < POLL_EVERY) {
            return;
        }
        self.last_poll = Some(now);
        let (Some(dir), Some(_)) = (&self.dir, &self.node) else { return };
        let path = dir.join("commands");
        let Ok(mut file) = std::fs::File::open(&path) else { return };
        let grown = file.metadata().map(|m| m.len() > self.offset).unwrap_or(false);
        if !grown || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut text = String::new();
        if file.read_to_string(&mut text).is_err() {
            return;
        }
        // Only whole lines: a writer may be half-way through one.
        let Some(end) = text.rfind('\n') else { return };
        self.offset += end as u64 + 1;
        for line in text[..end].lines().map(str::trim).filter(|l| !l.is_empty()) {
            let applied = line.parse::<Command>().and_then(|c| match self.node.as_mut() {
                Some(node) => node.apply(c),
                None => Ok(()),
            });
            match applied {
                Ok(()) => self.log(&format!("applied {line}")),
                Err(e) => {
                    eprintln!("flotilla-nvml-mock: {e}");
                    self.log(&format!("rejected {line}: {e}"));
                }
            }
        }
    }
}
