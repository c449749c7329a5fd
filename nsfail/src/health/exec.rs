//! Command: run a program inside the encoder's network namespace; exit status 0 is healthy.

use std::{fs::File, io, os::fd::AsFd, process::Stdio, time::Duration};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::{
    process::{Child, Command},
    time::Instant,
};

use super::{Probe, ProbeError, ProbeFuture};
use crate::paths;

/// Command probe. Each attempt runs the command afresh in a process group of its own, joined
/// to the named namespace (or in the daemon's own without one); abandoning the attempt kills
/// the whole group.
pub struct ExecProbe {
    program: String,
    args: Vec<String>,
    netns: Option<String>,
}

impl ExecProbe {
    pub fn new(program: String, args: Vec<String>, netns: Option<String>) -> Self {
        Self {
            program,
            args,
            netns,
        }
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(name) = &self.netns {
            // Opened afresh each attempt, so a namespace that was recreated is followed. The
            // open happens before the fork: after it, only async-signal-safe calls may run.
            let netns = File::open(paths::netns(name)).map_err(|source| ProbeError::Netns {
                name: name.clone(),
                source,
            })?;
            let join =
                move || setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
            // SAFETY: `join` runs in the forked child before exec and only calls setns(2), which is
            // async-signal-safe, on a descriptor opened before the fork; turning its errno
            // into an io::Error neither allocates nor locks.
            unsafe { command.pre_exec(join) };
        }
        let start = Instant::now();
        let child = command.spawn().map_err(|source| ProbeError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let mut group = Group(child);
        let status = group.0.wait().await.map_err(|source| ProbeError::Io {
            op: "wait for the command",
            source,
        })?;
        if status.success() {
            Ok(start.elapsed())
        } else {
            Err(ProbeError::Exit(status))
        }
    }
}

impl Probe for ExecProbe {
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(self.attempt())
    }

    fn kind(&self) -> &'static str {
        "exec"
    }
}

/// A command's process group, killed if dropped before its leader exits (the attempt timed
/// out or was cancelled), so a shell's children die with it. tokio's `kill_on_drop` then
/// reaps the leader.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // `id` is `None` once the leader is reaped; until then its pid, which is the group id,
        // cannot be reused, so this never signals a stranger.
        if let Some(pid) = self.0.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}
