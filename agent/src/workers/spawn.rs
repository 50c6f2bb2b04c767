//! The one piece of the agent that needs `unsafe`: code that runs in a worker between fork and
//! exec. `nix` makes the calls themselves safe; registering a hook that runs in the forked
//! child (`CommandExt::pre_exec`) cannot be, and `process-wrap` offers no parent-death wrapper.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use nix::sys::signal::Signal;
use std::os::unix::process::CommandExt;

/// Makes the worker `command` starts die (SIGKILL) when the agent dies, and refuses to start it
/// if the agent is already gone by the time the child runs.
pub(super) fn die_with_agent(command: &mut std::process::Command) {
    let agent_pid = std::process::id();
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: `die_with_parent` makes only prctl and getppid system calls and allocates
    // nothing (its error is built from a raw errno).
    unsafe {
        command.pre_exec(move || die_with_parent(agent_pid));
    }
}

/// In a worker between fork and exec: ask for SIGKILL when the agent dies, and fail the spawn if
/// it already died (then the child was re-parented before the request could take effect).
///
/// Linux sends the signal when the *thread* that forked the child ends. Workers are forked by
/// the agent's runtime worker threads (the link task), which live as long as the agent.
fn die_with_parent(agent_pid: u32) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
    if nix::unistd::getppid().as_raw() as u32 != agent_pid {
        // The spawn fails and the child exits without running the worker.
        return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
    }
    Ok(())
}
