//! A stand-in for `libnvidia-ml.so.1`: the NVML C ABI over scriptable GPUs, so the agent's NVML
//! backend runs in tests exactly as on a GPU node (loaded by `nvml-wrapper` by its library name
//! through `LD_LIBRARY_PATH`, nothing special-cased in the agent).
//!
//! - `config` in the control directory ([`CONTROL_DIR_VAR`]) sets the node: `gpus 8`,
//!   `model H100|H200|A100|L40S`, `seed NODE`, `init ok|driver-not-loaded|no-permission`.
//! - Lines appended to `commands` change it while the agent runs ([`Command`]).
//! - `log` records initialisation, event registrations and deliveries.
//!
//! [`MockNode`] sets a control directory up for a test and writes commands.

#![allow(unsafe_code)] // the C ABI: out-parameters written through raw pointers, in `abi.rs` only
#![warn(clippy::undocumented_unsafe_blocks)]

mod abi;
mod control;
mod gpus;

pub use control::CONTROL_DIR_VAR;
pub use gpus::{Command, Config, InitOutcome, MODELS, Model, NvLinkCounter};

use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the built stand-in, as cargo names the cdylib.
pub const BUILT_NAME: &str = "libflotilla_nvml_mock.so";
/// The name the agent (through `nvml-wrapper`) loads.
pub const NVML_NAME: &str = "libnvidia-ml.so.1";

/// The built stand-in library next to the running executable: cargo puts a dependency's cdylib
/// in `target/<profile>/deps`, beside test binaries; examples sit one level below.
pub fn built_library() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the executable: {e}"))?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        for candidate in [dir.join(BUILT_NAME), dir.join("deps").join(BUILT_NAME)] {
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
    }
    Err(format!(
        "{BUILT_NAME} not found (tried {}): build it with `cargo build -p flotilla-nvml-mock`, or \
         depend on flotilla-nvml-mock so cargo builds it with the tests",
        tried.join(", ")
    ))
}

/// One stand-in node: a control directory and a library directory holding
/// `libnvidia-ml.so.1` → the built stand-in.
#[derive(Debug)]
pub struct MockNode {
    control: PathBuf,
    lib_dir: PathBuf,
}

impl MockNode {
    /// Sets up `dir` (which must exist) with `config` (see [`Config::parse`]).
    pub fn new(dir: &Path, config: &str) -> Result<Self, String> {
        Config::parse(config)?;
        let library = built_library()?;
        let control = dir.join("control");
        let lib_dir = dir.join("lib");
        let io = |what: &str, e: std::io::Error| format!("{what} under {}: {e}", dir.display());
        std::fs::create_dir_all(&control).map_err(|e| io("control dir", e))?;
        std::fs::create_dir_all(&lib_dir).map_err(|e| io("lib dir", e))?;
        std::fs::write(control.join("config"), config).map_err(|e| io("config", e))?;
        std::fs::write(control.join("commands"), "").map_err(|e| io("commands", e))?;
        std::os::unix::fs::symlink(&library, lib_dir.join(NVML_NAME))
            .map_err(|e| io("library link", e))?;
        Ok(Self { control, lib_dir })
    }

    /// Environment that makes a process load this stand-in as NVML.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [("LD_LIBRARY_PATH", self.lib_dir.clone()), (CONTROL_DIR_VAR, self.control.clone())]
    }

    /// Appends a command; the library applies it within tens of milliseconds.
    pub fn send(&self, command: Command) -> std::io::Result<()> {
        let mut file =
            std::fs::OpenOptions::new().append(true).open(self.control.join("commands"))?;
        writeln!(file, "{command}")
    }

    /// The library's log so far (empty before initialisation).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.control.join("log")).unwrap_or_default()
    }
}
