//! Managed encoders' processes: started inside their namespaces (see [`crate::child`] for
//! what they inherit), restarted with backoff, stopped as a group (and their namespaces
//! removed) when the encoder is removed.
//!
//! They outlive the daemon: a daemon that stops (or is killed) leaves them running, with
//! their identities recorded ([`super::records`]); the next daemon adopts each one that
//! still is the process recorded, in its namespace, for an encoder configured the same
//! way, and watches it through a pidfd. Their output goes to a FIFO of their own, which the
//! next daemon reads on from where the last one stopped.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd as _, unix::fs::FileTypeExt as _},
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::process::{Child, Command};

use super::{
    actor::{ControlHandle, Msg},
    output::log_lossy,
    records::{self, Record, Recorder},
    *,
};
use crate::{
    child::{self, ENCODER_GRACE, Identity, Pidfd, Setup},
    config::{Encoder, Restart, Spawn},
};

/// What a supervisor is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    Run,
    /// The daemon is stopping: leave the process running for the next daemon.
    Detach,
    /// The encoder is removed or changed: stop the process.
    Stop,
}

/// How a supervisor starts.
pub(super) enum Start {
    Fresh,
    /// Adopt the recorded process if it still is that process.
    Adopt(Record),
    /// Stop the recorded process (made for another configuration), then start afresh.
    Replace(Record),
}

/// Whether a process started for `a` is the one `b` wants: same command, environment and
/// plumbing.
fn same_process(a: &Encoder, b: &Encoder) -> bool {
    a.spawn == b.spawn
        && a.env == b.env
        && a.namespace() == b.namespace()
        && a.host_interface() == b.host_interface()
        && a.address == b.address
        && a.prefix == b.prefix
}

type Supervised = (Encoder, watch::Sender<Order>, JoinHandle<()>);

/// The supervised processes of managed encoders.
pub(super) struct Managed {
    ctl: ControlHandle,
    pins: paths::Pins,
    recorder: Option<Recorder>,
    recorder_task: Option<JoinHandle<()>>,
    /// What the previous daemon left running, until the first [`Managed::sync`].
    leftovers: Option<BTreeMap<String, Record>>,
    running: BTreeMap<String, Supervised>,
    /// Stops (and deprovisioning) still under way.
    stopping: Vec<JoinHandle<()>>,
}

impl Managed {
    pub(super) fn new(
        ctl: ControlHandle,
        pins: &paths::Pins,
        leftovers: BTreeMap<String, Record>,
    ) -> Self {
        let (recorder, task) = Recorder::start(pins, leftovers.clone());
        Self {
            ctl,
            pins: pins.clone(),
            recorder: Some(recorder),
            recorder_task: Some(task),
            leftovers: Some(leftovers),
            running: BTreeMap::new(),
            stopping: Vec::new(),
        }
    }

    fn report(&self) -> Report {
        let ctl = self.ctl.clone();
        Arc::new(move |encoder: &str, msg: String| {
            warn!("managed encoder {encoder}: {msg}");
            ctl.tell(Msg::EncoderEvent(encoder.to_owned(), msg));
        })
    }

    pub(super) fn sync(&mut self, cfg: &Config) {
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        self.stopping.retain(|t| !t.is_finished());
        let wanted: BTreeMap<&str, &Encoder> = cfg
            .encoders
            .iter()
            .filter(|e| e.spawn.is_some())
            .map(|e| (e.name.as_str(), e))
            .collect();
        let mut leftovers = self.leftovers.take().unwrap_or_default();
        // Recorded for an encoder that is no longer configured: nobody else will stop it.
        for (name, record) in std::mem::take(&mut leftovers) {
            if wanted.contains_key(name.as_str()) {
                leftovers.insert(name, record);
                continue;
            }
            let recorder = recorder.clone();
            self.stopping.push(tokio::spawn(async move {
                let stop = tokio::task::spawn_blocking(move || {
                    records::stop_recorded(&name, &record);
                    if let Some(plan) = record.encoder.provision_plan() {
                        provision::deprovision_or_warn(&plan);
                    }
                    name
                });
                if let Ok(name) = stop.await {
                    recorder.set(&name, None);
                }
            }));
        }
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, (e, _, _))| wanted.get(name.as_str()) != Some(&e))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let (e, order, task) = self.running.remove(&name).expect("listed above");
            let _ = order.send(Order::Stop);
            let removed = !wanted.contains_key(name.as_str());
            self.stopping.push(tokio::spawn(async move {
                // Err: the supervisor panicked (logged by the runtime); deprovision anyway.
                let _ = task.await;
                if removed && let Some(plan) = e.provision_plan() {
                    let _ =
                        tokio::task::spawn_blocking(move || provision::deprovision_or_warn(&plan))
                            .await;
                }
            }));
        }
        for (name, e) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let start = match leftovers.remove(name) {
                Some(r) if same_process(&r.encoder, e) => Start::Adopt(r),
                Some(r) => Start::Replace(r),
                None => Start::Fresh,
            };
            let (order, orders) = watch::channel(Order::Run);
            let sup = Supervisor {
                e: e.clone(),
                out: self.pins.child_output(name),
                recorder: recorder.clone(),
                report: self.report(),
            };
            let task = tokio::spawn(supervise(sup, start, orders));
            self.running
                .insert(name.to_owned(), (e.clone(), order, task));
        }
    }

    /// The daemon is stopping: every process is left running (recorded for the next daemon).
    pub(super) async fn detach_all(&mut self) {
        for (_, (_, order, task)) in std::mem::take(&mut self.running) {
            let _ = order.send(Order::Detach);
            // Err: the supervisor panicked, which the runtime logged.
            let _ = task.await;
        }
        for task in std::mem::take(&mut self.stopping) {
            let _ = task.await;
        }
        self.recorder = None;
        if let Some(task) = self.recorder_task.take() {
            let _ = task.await;
        }
        // Nothing left running: nothing for the next daemon to find either.
        let pins = self.pins.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if records::load(&pins).is_empty() {
                records::forget(&pins);
            }
        })
        .await;
    }
}

/// Something the supervisor has to say, for the event log.
pub(super) type Report = Arc<dyn Fn(&str, String) + Send + Sync>;

/// Everything one encoder's supervisor works with.
pub(super) struct Supervisor {
    e: Encoder,
    /// Its output FIFO.
    out: PathBuf,
    recorder: Recorder,
    report: Report,
}

/// The process being supervised.
enum Proc {
    Own(Child),
    Adopted(Pidfd),
}

impl Proc {
    /// Resolves when it has exited, with how.
    async fn exited(&mut self) -> String {
        match self {
            Self::Own(c) => c
                .wait()
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string()),
            Self::Adopted(p) => {
                p.exited().await;
                "exited; its status went to the daemon that started it".to_owned()
            }
        }
    }
}

/// Resolves with the first order other than `Run`; a daemon that dropped the sender is
/// stopping, which detaches.
async fn next_order(orders: &mut watch::Receiver<Order>) -> Order {
    match orders.wait_for(|o| *o != Order::Run).await {
        Ok(o) => *o,
        Err(_) => Order::Detach,
    }
}

/// Runs a managed encoder's command inside its namespace until told otherwise, restarting
/// it with exponential backoff (0.5 s doubling to 30 s, back to 0.5 s after 10 s of running)
/// when `restart = "always"`. Its output goes to the log (see [`log_lossy`]).
pub(super) async fn supervise(s: Supervisor, start: Start, mut orders: watch::Receiver<Order>) {
    let Some(spawn) = s.e.spawn.clone() else {
        return;
    };
    let name = s.e.name.clone();
    let ns = s.e.namespace().unwrap_or_default();
    let mut adopt = match start {
        Start::Fresh => None,
        Start::Adopt(r) => Some(r),
        Start::Replace(r) => {
            (s.report)(
                &name,
                "configured differently than its running process: replacing it".into(),
            );
            let who = name.clone();
            let _ = tokio::task::spawn_blocking(move || records::stop_recorded(&who, &r)).await;
            None
        }
    };
    let reader = match open_output(&s.out) {
        Ok(rx) => {
            let report = s.report.clone();
            let who = name.clone();
            Some(tokio::spawn(async move {
                log_lossy(rx, &who, |msg| report(&who, msg)).await;
            }))
        }
        Err(e) => {
            (s.report)(&name, format!("its output cannot be read: {e}"));
            None
        }
    };
    run_loop(&s, &spawn, &ns, &mut adopt, &mut orders).await;
    if let Some(reader) = reader {
        reader.abort();
    }
}

/// A managed process's life: adopt or start it, wait for its exit or an order, back off and
/// restart. Long because adoption, start, exit and orders are one state machine whose
/// transitions read best side by side.
async fn run_loop(
    s: &Supervisor,
    spawn: &Spawn,
    ns: &str,
    adopt: &mut Option<Record>,
    orders: &mut watch::Receiver<Order>,
) {
    let name = &s.e.name;
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut proc = match adopt.take() {
            Some(r) => match Pidfd::open(r.process, ns) {
                Ok(p) => {
                    (s.report)(
                        name,
                        format!(
                            "adopted its running process (pid {}) from the previous daemon",
                            p.identity.pid
                        ),
                    );
                    Proc::Adopted(p)
                }
                Err(why) => {
                    (s.report)(
                        name,
                        format!("its process did not outlive the previous daemon: {why}"),
                    );
                    s.recorder.set(name, None);
                    if s.e.restart == Restart::Never {
                        return;
                    }
                    continue;
                }
            },
            None => match start(&s.e, spawn, ns, &s.out) {
                Ok(c) => Proc::Own(c),
                Err(err) => {
                    (s.report)(name, format!("cannot start {}: {err}", spawn.command));
                    if s.e.restart == Restart::Never || wait_or_stop(orders, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        let started = Instant::now();
        let Some(pid) = supervised_pid(&proc) else {
            continue;
        };
        match Identity::of(pid) {
            Ok(process) => s.recorder.set(
                name,
                Some(Record {
                    encoder: s.e.clone(),
                    process,
                }),
            ),
            Err(e) => warn!("managed encoder {name}: pid {pid}: {e}"),
        }
        info!(
            "managed encoder {name}: running {} (pid {pid})",
            spawn.command
        );
        let order = tokio::select! {
            status = proc.exited() => Err(status),
            order = next_order(orders) => Ok(order),
        };
        let status = match order {
            Err(status) => status,
            Ok(Order::Detach) => {
                info!("managed encoder {name}: left running (pid {pid}) for the next daemon");
                return;
            }
            Ok(_) => {
                child::stop_group(pid, ENCODER_GRACE, async {
                    proc.exited().await;
                })
                .await;
                // Reaps our own child if SIGKILL was needed.
                proc.exited().await;
                s.recorder.set(name, None);
                info!("managed encoder {name}: stopped");
                return;
            }
        };
        // What it left running in its group goes with it.
        if let Err(e) = child::signal_group(pid, nix::sys::signal::Signal::SIGKILL) {
            warn!("managed encoder {name}: what is left of group {pid}: {e}");
        }
        s.recorder.set(name, None);
        if s.e.restart == Restart::Never {
            (s.report)(name, format!("process exited ({status}); restart = never"));
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        (s.report)(
            name,
            format!(
                "process exited ({status}); restarting in {} ms",
                backoff.as_millis()
            ),
        );
        if wait_or_stop(orders, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn supervised_pid(p: &Proc) -> Option<i32> {
    match p {
        Proc::Own(c) => c.id().map(|p| p as i32),
        Proc::Adopted(p) => Some(p.identity.pid),
    }
}

/// Starts the command in its namespace, writing to its output FIFO.
fn start(e: &Encoder, spawn: &Spawn, ns: &str, out: &Path) -> io::Result<Child> {
    let netns = File::open(paths::netns(ns))
        .map_err(|err| io::Error::new(err.kind(), format!("namespace {ns}: {err}")))?;
    // Read and write: the process then holds a reader of its own FIFO, so that a write never
    // fails for want of one (no SIGPIPE) while no daemon reads.
    let fifo = OpenOptions::new().read(true).write(true).open(out)?;
    let mut cmd = Command::new(&spawn.command);
    cmd.args(&spawn.args)
        .stdin(Stdio::null())
        .stdout(fifo.try_clone()?)
        .stderr(fifo);
    child::prepare(
        &mut cmd,
        Setup {
            env: &e.env,
            netns: Some(netns),
            die_with_daemon: false,
        },
    );
    cmd.spawn()
}

/// Room in an output FIFO for a daemon restart's worth of output.
const FIFO_SIZE: libc::c_int = 1 << 20;

/// Makes (or finds) the encoder's output FIFO and opens the daemon's reading end.
fn open_output(path: &Path) -> io::Result<tokio::net::unix::pipe::Receiver> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => {}
        Ok(_) => {
            std::fs::remove_file(path)?;
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        }
        Err(e) => return Err(e),
    }
    // Read-write, so that the reader never sees end-of-file between two processes.
    let rx = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    // SAFETY: F_SETPIPE_SZ on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(rx.as_raw_fd(), libc::F_SETPIPE_SZ, FIFO_SIZE) } < 0 {
        warn!(
            "{}: keeping the default pipe size: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
    Ok(rx)
}

/// Sleeps `d`; true if an order other than `Run` came meanwhile.
pub(super) async fn wait_or_stop(orders: &mut watch::Receiver<Order>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = next_order(orders) => true,
    }
}
