//! The processes nsfail starts (managed encoders' commands, exec probes): what they inherit,
//! how they are stopped, and how a process is recognised again after a daemon restart.
//!
//! Every child gets a cleared environment (a fixed `PATH`, then the encoder's `env`), its own
//! process group, and is stopped as a group: SIGTERM, then SIGKILL after a grace period. Exec
//! probes also die with the daemon (`PR_SET_PDEATHSIG`); managed encoders deliberately do not,
//! so that a restarted daemon adopts them.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    time::Duration,
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, process::Command};

use crate::paths;

/// `PATH` of every child unless the encoder's `env` sets one: nothing is inherited from the
/// daemon's environment.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a stopped managed encoder's group has between SIGTERM and SIGKILL.
pub const ENCODER_GRACE: Duration = Duration::from_secs(5);
/// The same for an abandoned exec probe.
pub const PROBE_GRACE: Duration = Duration::from_secs(1);

/// How a child is set up between fork and exec.
pub struct Setup<'a> {
    /// The encoder's `env`, on top of [`DEFAULT_PATH`].
    pub env: &'a BTreeMap<String, String>,
    /// The network namespace it joins (opened before the fork).
    pub netns: Option<File>,
    /// Killed (SIGKILL) when the daemon's thread that started it dies.
    pub die_with_daemon: bool,
}

/// Applies `setup` to `cmd`: a cleared environment, a process group of its own, the namespace
/// and, for probes, the parent-death signal.
pub fn prepare(cmd: &mut Command, setup: Setup<'_>) {
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .envs(setup.env)
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    let die = setup.die_with_daemon;
    let netns = setup.netns;
    let between = move || -> io::Result<()> {
        if let Some(ns) = &netns {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
        }
        if die {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // The daemon may have died before the prctl: then nobody would send the signal.
            // SAFETY: getppid cannot fail.
            if unsafe { libc::getppid() } != parent {
                return Err(io::Error::other("the daemon exited"));
            }
        }
        Ok(())
    };
    // SAFETY: `between` runs in the forked child before exec and calls only setns(2),
    // prctl(2) and getppid(2), all async-signal-safe, on a descriptor opened before the fork;
    // it neither allocates (io::Error from an errno or a static message does not) nor locks.
    unsafe { cmd.pre_exec(between) };
}

/// Sends `sig` to the process group `pgid`. ESRCH (the group is gone) is not an error.
pub fn signal_group(pgid: i32, sig: Signal) -> io::Result<()> {
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Stops the group led by `leader`: SIGTERM to the group, up to `grace` for the leader to
/// exit, then SIGKILL to whatever is left of the group. `exited` resolves when the leader has
/// exited (and, for our own child, has been reaped: until then its PID, the group's ID,
/// cannot be reused; while any member lives the group ID stays reserved too).
pub async fn stop_group(pgid: i32, grace: Duration, exited: impl Future<Output = ()>) {
    if let Err(e) = signal_group(pgid, Signal::SIGTERM) {
        log::warn!("SIGTERM to process group {pgid}: {e}");
    }
    let _ = tokio::time::timeout(grace, exited).await;
    if let Err(e) = signal_group(pgid, Signal::SIGKILL) {
        log::warn!("SIGKILL to process group {pgid}: {e}");
    }
}

/// A process as it can be recognised again: its PID and its start time (clock ticks after
/// boot, `/proc/PID/stat` field 22), which together never name two processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub pid: i32,
    pub start: u64,
}

impl Identity {
    /// The identity of the live process `pid`; an error when there is none (or a zombie).
    pub fn of(pid: i32) -> io::Result<Self> {
        let stat = std::fs::read_to_string(Path::new(paths::PROC).join(format!("{pid}/stat")))?;
        // The command name (field 2) is in parentheses and may hold anything: fields are
        // counted after the last ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state), so field 22 is fields[19].
        let (Some(state), Some(start)) = (fields.first(), fields.get(19)) else {
            return Err(io::Error::other("short /proc stat"));
        };
        if matches!(*state, "Z" | "X" | "x") {
            return Err(io::Error::other("the process has exited"));
        }
        let start = start
            .parse()
            .map_err(|_| io::Error::other("malformed start time in /proc stat"))?;
        Ok(Self { pid, start })
    }

    /// Whether this process still runs, inside the named network namespace `netns`; a
    /// reason when not.
    pub fn check(&self, netns: &str) -> Result<(), String> {
        let now = Self::of(self.pid).map_err(|e| format!("pid {}: {e}", self.pid))?;
        if now != *self {
            return Err(format!(
                "pid {} is another process now (started at {}, not {})",
                self.pid, now.start, self.start
            ));
        }
        let theirs = std::fs::metadata(Path::new(paths::PROC).join(format!("{}/ns/net", self.pid)))
            .map_err(|e| format!("pid {}'s namespace: {e}", self.pid))?;
        let wanted = std::fs::metadata(paths::netns(netns))
            .map_err(|e| format!("namespace {netns}: {e}"))?;
        if (theirs.dev(), theirs.ino()) != (wanted.dev(), wanted.ino()) {
            return Err(format!(
                "pid {} is not in namespace {netns} any more",
                self.pid
            ));
        }
        Ok(())
    }
}

/// A process that is not (or no longer) our child, watched through a pidfd: it can be
/// signalled and waited for without any risk of the PID meaning another process.
pub struct Pidfd {
    fd: AsyncFd<OwnedFd>,
    pub identity: Identity,
}

impl Pidfd {
    /// Opens a pidfd for `identity` and checks, after opening it, that the PID is still that
    /// process in `netns` (so that a reused PID is never adopted).
    pub fn open(identity: Identity, netns: &str) -> Result<Self, String> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, identity.pid, 0) };
        if raw < 0 {
            return Err(format!(
                "pid {}: {}",
                identity.pid,
                io::Error::last_os_error()
            ));
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        identity.check(netns)?;
        // SAFETY: an OwnedFd keeps its one descriptor open, unchanged, until dropped, which
        // happens only with the AsyncFd.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| format!("watching pid {}: {}", identity.pid, e))?;
        Ok(Self { fd, identity })
    }

    /// Resolves once the process has exited (a pidfd turns readable then).
    pub async fn exited(&self) {
        // Err: the descriptor cannot be polled, which does not happen for a pidfd; treat it
        // as exited rather than wait forever.
        let _ = self.fd.readable().await.map(|mut g| g.retain_ready());
    }

    /// Whether the process has exited, without waiting.
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }
}
