//! `nsfail lab up` / `nsfail lab down`: the demo lab as something that stays up. `up` builds the
//! namespaces of [`crate::lab`], starts real processes in them (per encoder a stream receiver,
//! which answers the daemon's `srt` health check itself, or for a UDP lab a UDP echo responder
//! beside it; in the source namespace a live MPEG-TS test stream), writes a daemon config for the lab and records all of it; `down` removes exactly
//! what was recorded and nothing else (the daemon's pins are the daemon's).
//!
//! The record (`lab.json`) is claimed before anything is made and rewritten after each step, so
//! a `lab up` killed half-way leaves a record that `lab down` can act on. A recorded process is
//! signalled only while its PID still names it (same start time, same command line), through a
//! pidfd, so a PID that the system has since reused is never signalled.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::Signal,
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};
use serde::{Deserialize, Serialize};

use crate::{
    lab::{self, INGEST_IF, INGEST4, Lab, LabError},
    paths::{self, LabDir},
};

mod build;

pub(in crate::lab) use self::build::{
    Builder, srt_receiver, start, test_stream, udp_echo, udp_receiver,
};

/// The channel's ingest port, and the port each encoder receives on.
const STREAM_PORT: u16 = 5000;
/// Each encoder's UDP echo port, for the daemon's health probes.
const ECHO_PORT: u16 = 9000;
/// Where the source's ffmpeg hands its stream to the SRT caller (loopback of the source
/// namespace).
const RELAY: &str = "udp://127.0.0.1:9100";
const METRICS: &str = "127.0.0.1:9464";
/// The most encoder namespaces [`Lab`] builds.
const MAX_ENCODERS: usize = 8;
/// How long every started process must stay up before `up` believes it started.
const SETTLE: Duration = Duration::from_millis(500);
/// How long a process gets to exit after SIGTERM (then after SIGKILL).
const GRACE: Duration = Duration::from_secs(2);
/// How long `ip netns exec` may take to exec a lab process in place (a loaded host is slow).
const EXEC_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum LabCtlError {
    #[error("lab is already up (nsfail lab down removes it)")]
    AlreadyUp,
    #[error("a cluster lab is already up (nsfail lab cluster down removes it)")]
    ClusterAlreadyUp,
    #[error(
        "network namespace {0} exists but no lab is recorded; if it is a leftover, `ip netns del {0}` removes it"
    )]
    NamespaceExists(String),
    #[error("{tool} not found on PATH: `cargo xtask setup` installs it (Debian package {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("lab options: {0}")]
    Options(String),
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{name} did not start: {detail}")]
    Start { name: String, detail: String },
    #[error("{cause}; undoing it failed too: {cleanup} (nsfail lab down retries)")]
    Rollback {
        cause: Box<LabCtlError>,
        cleanup: String,
    },
    #[error("the lab is not completely down: {0} (nsfail lab down retries)")]
    Down(String),
}

type Result<T> = std::result::Result<T, LabCtlError>;

pub(in crate::lab) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LabCtlError {
    let what = what.into();
    move |source| LabCtlError::Io { what, source }
}

/// What the source sends and the encoders receive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LabProtocol {
    /// SRT: the source calls the ingest address, each encoder listens.
    #[default]
    Srt,
    /// Plain MPEG-TS over UDP.
    Udp,
}

impl LabProtocol {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Srt => "srt",
            Self::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Encoder namespaces, 1 to 8: enc-a, enc-b, ...
    pub encoders: usize,
    pub protocol: LabProtocol,
    /// Every namespace's name starts with this (`nsf-rt`, `nsf-src`, `nsf-ea`, ...).
    pub prefix: String,
    /// The lab's own directory, removed whole by `down`.
    pub dir: PathBuf,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            encoders: 2,
            protocol: LabProtocol::Srt,
            prefix: "nsf-".to_owned(),
            dir: PathBuf::from(paths::LAB_DIR),
        }
    }
}

/// One process the lab started, and how to recognise it later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabProcess {
    /// Its role: `enc-a-receiver`, `enc-a-echo`, `src-relay`, `src-ffmpeg`.
    pub name: String,
    pub netns: String,
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat`): with the PID, names the process.
    pub start_time: u64,
    /// The command line, as `/proc/PID/cmdline` shows it.
    pub cmdline: Vec<String>,
    /// Its stderr (and its stdout, unless that is a received stream).
    pub log: PathBuf,
}

/// What a recorded process has become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Still the recorded process, running.
    Running,
    /// The recorded process, exited and not yet reaped.
    Zombie,
    /// Gone or on its way out (its command line already empty), or its PID now names another
    /// process.
    Gone,
}

impl LabProcess {
    /// Whether the recorded process is still running (not merely a process with its PID).
    pub fn is_running(&self) -> bool {
        self.fate() == Fate::Running
    }

    fn fate(&self) -> Fate {
        match proc_stat(self.pid) {
            Some((_, start)) if start != self.start_time => Fate::Gone,
            Some(('Z' | 'X', _)) => Fate::Zombie,
            Some(_) if proc_cmdline(self.pid).as_ref() == Some(&self.cmdline) => Fate::Running,
            _ => Fate::Gone,
        }
    }

    /// Sends `sig` if, and only if, the PID still names the recorded process. A pidfd pins one
    /// process, so the check made after opening it holds until the signal is sent.
    fn signal(&self, sig: Signal) {
        // SAFETY: pidfd_open(2) takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            return;
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        if self.fate() != Fate::Running {
            return;
        }
        // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Reaps the process if it is this process's own exited child (`lab up` and `lab down` in
    /// one process, as in tests); otherwise its parent does.
    fn reap(&self) {
        if self.fate() == Fate::Zombie {
            let _ = waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Everything a lab is: what `up` made and `down` removes. Persisted as `lab.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabInfo {
    pub dir: PathBuf,
    pub protocol: LabProtocol,
    /// The config written for the daemon (`nsfail run --config` it).
    pub config: PathBuf,
    /// The namespaces: the ingest host (rt) first, then the source, then the encoders.
    pub namespaces: Vec<String>,
    pub processes: Vec<LabProcess>,
    /// Each encoder and the file its received stream grows in.
    pub outputs: Vec<(String, PathBuf)>,
}

/// What a lab's record holds that `down` must undo: the processes it started and the
/// namespaces it made, and anything else of its own ([`Record::release`]).
pub(in crate::lab) trait Record: Serialize {
    fn processes(&mut self) -> &mut Vec<LabProcess>;
    fn namespaces(&mut self) -> &mut Vec<String>;
    /// Removes the lab's other state, after its processes stopped and before its namespaces
    /// go; returns what resisted (kept in the record for a retry).
    fn release(&mut self) -> Vec<String> {
        Vec::new()
    }
}

impl Record for LabInfo {
    fn processes(&mut self) -> &mut Vec<LabProcess> {
        &mut self.processes
    }

    fn namespaces(&mut self) -> &mut Vec<String> {
        &mut self.namespaces
    }
}

/// Builds the lab, starts its processes and writes its daemon config; refuses if a lab is
/// recorded already. On failure, undoes what it did before returning the error.
pub fn up(opts: &LabOptions) -> Result<LabInfo> {
    check_options(opts)?;
    require("socat", "socat")?;
    require("ffmpeg", "ffmpeg")?;
    if opts.protocol == LabProtocol::Srt {
        require("srt-live-transmit", "srt-tools")?;
    }
    let dir = LabDir::new(&opts.dir);
    let info = LabInfo {
        dir: opts.dir.clone(),
        protocol: opts.protocol,
        config: dir.config(),
        namespaces: Vec::new(),
        processes: Vec::new(),
        outputs: Vec::new(),
    };
    claim(&dir, &info)?;
    let mut builder = Builder {
        dir,
        info,
        children: Vec::new(),
    };
    match builder.build(opts) {
        Ok(()) => Ok(builder.info),
        Err(cause) => Err(builder.undo(cause)),
    }
}

/// Removes the lab recorded in [`paths::LAB_DIR`]; nothing to do if none is.
pub fn down() -> Result<()> {
    down_with(&LabOptions::default())
}

/// Removes the lab recorded in `opts.dir`: stops its processes, deletes its namespaces and the
/// directory. Anything that resists stays recorded, so that a retry can finish the job.
pub fn down_with(opts: &LabOptions) -> Result<()> {
    let dir = LabDir::new(&opts.dir);
    let Some(mut info) = load::<LabInfo>(&dir)? else {
        let strays = namespaces_with_prefix(&opts.prefix);
        if !strays.is_empty() {
            log::warn!(
                "no lab is recorded in {}, so nothing is removed; namespaces {} exist \
                 (`ip netns del NAME` removes a leftover)",
                dir.root().display(),
                strays.join(", ")
            );
        }
        return Ok(());
    };
    teardown(&dir, &mut info)
}

/// Kills (SIGKILL) encoder `encoder`'s stream receiver in the lab recorded in `opts.dir`, as
/// if it crashed: its namespace, veth and everything else stay. Returns the process killed.
pub fn kill_with(opts: &LabOptions, encoder: &str) -> Result<LabProcess> {
    let info: LabInfo = load(&LabDir::new(&opts.dir))?
        .ok_or_else(|| LabCtlError::Options("no lab is up (nsfail lab up builds it)".to_owned()))?;
    let role = format!("{encoder}-receiver");
    let p = info
        .processes
        .iter()
        .find(|p| p.name == role)
        .ok_or_else(|| LabCtlError::Options(format!("the lab has no encoder {encoder:?}")))?;
    if !p.is_running() {
        return Err(LabCtlError::Options(format!(
            "{role} (pid {}) is not running any more",
            p.pid
        )));
    }
    p.signal(Signal::SIGKILL);
    Ok(p.clone())
}

/// [`kill_with`] on the lab recorded in [`paths::LAB_DIR`].
pub fn kill(encoder: &str) -> Result<LabProcess> {
    kill_with(&LabOptions::default(), encoder)
}

/// The lab recorded in [`paths::LAB_DIR`], if any.
pub fn status() -> Result<Option<LabInfo>> {
    status_with(&LabOptions::default())
}

/// The lab recorded in `opts.dir`, if any.
pub fn status_with(opts: &LabOptions) -> Result<Option<LabInfo>> {
    load(&LabDir::new(&opts.dir))
}

fn check_options(opts: &LabOptions) -> Result<()> {
    if !(1..=MAX_ENCODERS).contains(&opts.encoders) {
        return Err(LabCtlError::Options(format!(
            "{} encoders: a lab has 1 to {MAX_ENCODERS}",
            opts.encoders
        )));
    }
    check_prefix(&opts.prefix)
}

/// A lab's namespace prefix: 1 to 32 of A-Z a-z 0-9 - _ . (it also names pin directories).
pub(in crate::lab) fn check_prefix(prefix: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if prefix.is_empty() || prefix.len() > 32 || !prefix.chars().all(allowed) {
        return Err(LabCtlError::Options(format!(
            "namespace prefix {prefix:?}: 1 to 32 of A-Z a-z 0-9 - _ ."
        )));
    }
    Ok(())
}

pub(in crate::lab) fn require(tool: &'static str, package: &'static str) -> Result<()> {
    which::which(tool)
        .map(drop)
        .map_err(|_| LabCtlError::MissingTool { tool, package })
}

/// Claims `dir` for a new lab: the record is created exclusively, so of two `up`s one wins.
pub(in crate::lab) fn claim(dir: &LabDir, info: &impl Serialize) -> Result<()> {
    fs::create_dir_all(dir.root()).map_err(io_err(format!("create {}", dir.root().display())))?;
    let file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.record())
    {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(LabCtlError::AlreadyUp),
        other => other.map_err(io_err(format!("create {}", dir.record().display())))?,
    };
    serde_json::to_writer_pretty(file, info).map_err(|source| LabCtlError::Record {
        path: dir.record(),
        source,
    })
}

/// Replaces the record whole (write, then rename), so a reader never sees half of one.
pub(in crate::lab) fn save(dir: &LabDir, info: &impl Serialize) -> Result<()> {
    let json = serde_json::to_vec_pretty(info).map_err(|source| LabCtlError::Record {
        path: dir.record(),
        source,
    })?;
    let tmp = dir.record_tmp();
    fs::write(&tmp, json).map_err(io_err(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, dir.record()).map_err(io_err(format!("write {}", dir.record().display())))
}

pub(in crate::lab) fn load<T: serde::de::DeserializeOwned>(dir: &LabDir) -> Result<Option<T>> {
    let path = dir.record();
    let text = match fs::read(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(io_err(format!("read {}", path.display())))?,
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| LabCtlError::Record { path, source })
}

/// Stops the recorded processes, releases the lab's other state, deletes the recorded
/// namespaces, then the lab directory. What resists stays in the record.
pub(in crate::lab) fn teardown(dir: &LabDir, info: &mut impl Record) -> Result<()> {
    let mut failures = Vec::new();
    let survivors = stop(info.processes());
    for p in &survivors {
        failures.push(format!(
            "process {} (pid {}) survived SIGKILL",
            p.name, p.pid
        ));
    }
    *info.processes() = survivors;
    failures.extend(info.release());
    info.namespaces().retain(|ns| match delete_netns(ns) {
        Ok(()) => false,
        Err(e) => {
            failures.push(e.to_string());
            true
        }
    });
    if !failures.is_empty() {
        save(dir, info)?;
        return Err(LabCtlError::Down(failures.join("; ")));
    }
    match fs::remove_dir_all(dir.root()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("remove {}", dir.root().display()))(e))
        }
        _ => Ok(()),
    }
}

/// SIGTERM, then SIGKILL for what is left after [`GRACE`]; returns the processes still running.
pub(in crate::lab) fn stop(procs: &[LabProcess]) -> Vec<LabProcess> {
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        for p in procs {
            p.signal(sig);
        }
        let start = Instant::now();
        loop {
            procs.iter().for_each(LabProcess::reap);
            if !procs.iter().any(LabProcess::is_running) || start.elapsed() > GRACE {
                break;
            }
            thread::sleep(POLL);
        }
    }
    procs.iter().filter(|p| p.is_running()).cloned().collect()
}

pub(in crate::lab) fn delete_netns(name: &str) -> Result<()> {
    if !paths::netns(name).exists() {
        return Ok(());
    }
    crate::net::provision::delete_netns(name).map_err(io_err(format!("delete namespace {name}")))
}

pub(in crate::lab) fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(paths::NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// `(state, start time)` from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(paths::proc_file(pid, "stat")).ok()?;
    // The command name in field 2 may hold spaces and parentheses: count from the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; field 22 the start time.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

fn proc_cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(paths::proc_file(pid, "cmdline")).ok()?;
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    Some(
        raw.split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))
}

/// The last lines of a log, for an error message.
pub(in crate::lab) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return format!("no output in {}", path.display());
    }
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// The TCP port of the lab's host service.
pub const SERVICE_PORT: u16 = 8080;

/// An encoder's gateway in the lab: the ingest host's side of the encoder's link in the
/// address plan (`lab::v4`); an address outside the plan is returned as it is.
pub fn lab_gateway(addr4: &str) -> String {
    match addr4.parse::<std::net::Ipv4Addr>() {
        Ok(a) if lab::v4(a.octets()[2], a.octets()[3]) == a => {
            lab::v4(a.octets()[2], 1).to_string()
        }
        _ => addr4.to_owned(),
    }
}
