//! Command: run a program inside the encoder's network namespace; exit status 0 is healthy.

use std::{collections::BTreeMap, fs::File, process::Stdio, time::Duration};

use tokio::{
    process::{Child, Command},
    time::Instant,
};

use super::{Probe, ProbeError, ProbeFuture};
use crate::{
    child::{self, PROBE_GRACE, Setup},
    paths,
};

/// Command probe. Each attempt runs the command afresh (see [`crate::child`]: a cleared
/// environment plus the encoder's `env`, a process group of its own, killed if the daemon
/// dies), joined to the named namespace (or in the daemon's own without one); abandoning the
/// attempt stops the whole group.
pub struct ExecProbe {
    program: String,
    args: Vec<String>,
    netns: Option<String>,
    env: BTreeMap<String, String>,
}

impl ExecProbe {
    pub fn new(
        program: String,
        args: Vec<String>,
        netns: Option<String>,
        env: BTreeMap<String, String>,
    ) -> Self {
        Self {
            program,
            args,
            netns,
            env,
        }
    }

    async fn attempt(&self) -> Result<Duration, ProbeError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let netns = match &self.netns {
            // Opened afresh each attempt, so a namespace that was recreated is followed; before
            // the fork, since after it only async-signal-safe calls may run.
            Some(name) => {
                Some(
                    File::open(paths::netns(name)).map_err(|source| ProbeError::Netns {
                        name: name.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        child::prepare(
            &mut command,
            Setup {
                env: &self.env,
                netns,
                die_with_daemon: true,
            },
        );
        let start = Instant::now();
        let child = command.spawn().map_err(|source| ProbeError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let pgid = child.id().map(|p| p as i32);
        let mut group = Group(Some(child));
        let leader = group.0.as_mut().expect("set above");
        let status = leader.wait().await.map_err(|source| ProbeError::Io {
            op: "wait for the command",
            source,
        })?;
        group.0 = None;
        // The leader is reaped; whatever it left running in its group goes too. (Its PID
        // stays reserved while any member of its group lives.)
        if let Some(pgid) = pgid
            && let Err(e) = child::signal_group(pgid, nix::sys::signal::Signal::SIGKILL)
        {
            log::warn!("exec probe: SIGKILL to what is left of group {pgid}: {e}");
        }
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

/// A command's process group, stopped if dropped before its leader exits (the attempt timed
/// out or was cancelled): SIGTERM to the group, SIGKILL after [`PROBE_GRACE`], so a shell's
/// children go with it.
struct Group(Option<Child>);

impl Drop for Group {
    fn drop(&mut self) {
        let Some(mut leader) = self.0.take() else {
            return;
        };
        // `id` is `None` once the leader is reaped; until then its PID, which is the group's
        // ID, cannot be reused, so this never signals a stranger.
        let Some(pid) = leader.id() else { return };
        let pgid = pid as i32;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    child::stop_group(pgid, PROBE_GRACE, async {
                        // Err: it cannot be waited for; SIGKILL follows after the grace.
                        let _ = leader.wait().await;
                    })
                    .await;
                    // Reaps it if SIGKILL was needed.
                    let _ = leader.wait().await;
                });
            }
            Err(_) => {
                // No runtime to wait on (it is shutting down): no grace period.
                if let Err(e) = child::signal_group(pgid, nix::sys::signal::Signal::SIGKILL) {
                    log::warn!("exec probe: SIGKILL to process group {pgid}: {e}");
                }
            }
        }
    }
}
