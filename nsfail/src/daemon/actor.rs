//! The controller as an actor: one thread owns it and does everything that touches it, one
//! message at a time; the runtime thread (probes, the socket, the metrics endpoint, the link
//! watch) only sends messages and awaits `oneshot` replies. A failover's map writes and
//! fsync, a reconcile's netlink calls, an `add encoder`'s provisioning: all of it happens on
//! the actor's thread, so a probe never waits for it and nothing else ever locks the
//! controller.
//!
//! Between messages the actor runs the periodic work (automatic failback, input loss,
//! switchover timing, flow and SRT session checks): every [`TICK`] while a switchover is being
//! timed or a decision waits to be written again, otherwise when the next reply-watching check
//! is due and at least every [`IDLE_TICK`]. It publishes the effective configuration
//! whenever it changes, for the probes and managed encoders to follow: its ingest and
//! encoders, without the channels (nothing that follows it needs them, and with 100,000
//! channels a copy per change would cost more than the change).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use tokio::sync::{oneshot, watch};

use super::notify::Notifier;
use crate::{
    api::{Command, Response},
    cluster::{self, Change},
    config::{self, Config, HealthCheck},
    control::{ControlError, Controller, SharedReport},
    health::{HealthUpdate, judge::Judge},
    metrics::Metrics,
    net::receive::Verdict,
};

/// How often the controller's periodic work runs while it is busy (a switchover being timed,
/// decisions to write again), and the shortest wait between two runs.
const TICK: Duration = Duration::from_millis(10);
/// The longest wait between two runs when nothing is due: failback after its hold-down, the
/// input watch and the audit are late by this much at most.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// Events logged, kept and written per turn of the actor's loop while a failover's are
/// pending: requests are answered in between.
const EVENTS_PER_TURN: usize = 32;

/// A local encoder whose readiness the link watch checks: (name, host interface, the
/// namespace to look for its peer in first).
pub(super) type ReceiveTarget = (String, String, Option<String>);

/// What the actor is asked to do.
pub(super) enum Msg {
    /// A control-socket request.
    Request(Box<Command>, oneshot::Sender<Response>),
    /// Probe results, in the order they came.
    Health(Vec<HealthUpdate>),
    /// The kernel of encoder (id) refused this many channel packets (ICMP port unreachable),
    /// as the egress program reported them.
    Refused(u32, u32),
    /// Something a managed encoder's supervisor has to say (for the events).
    EncoderEvent(String, String),
    /// The local encoders the link watch is to check.
    ReceiveTargets(oneshot::Sender<Vec<ReceiveTarget>>),
    /// What a link-watch round found: re-attach where interfaces were re-created, and record
    /// each encoder's receive readiness.
    Links(Vec<(String, Verdict)>, oneshot::Sender<()>),
    /// Copy the data plane's counters into the metrics registry (a scrape is coming).
    Observe(oneshot::Sender<()>),
    /// Changes read from etcd (`resync`: a whole new snapshot), to apply.
    Cluster {
        changes: Vec<Change>,
        resync: bool,
        reply: oneshot::Sender<Result<SharedReport, String>>,
    },
    /// This host's encoders with their health and drain, to publish in etcd.
    LocalHealth(oneshot::Sender<Vec<(config::Encoder, bool, bool)>>),
    /// The SRT callers this host learned, to publish in etcd.
    LocalCallers(oneshot::Sender<Vec<(String, SocketAddr, cluster::CallerRecord)>>),
    /// Whether a channel read from etcd is applied here (or why it is skipped).
    SharedChannel(String, oneshot::Sender<Result<(), String>>),
    /// Whether a new channel fits the effective configuration (before it is written to etcd).
    CheckChannel(Box<config::Channel>, oneshot::Sender<Result<(), String>>),
    /// Something the cluster's task has to say (for the events).
    ClusterEvent(String),
    /// The election and etcd as the cluster's task sees them.
    ClusterView {
        leading: bool,
        leader: Option<String>,
        etcd_up: bool,
    },
    /// Whether a drain of this encoder may be written to etcd (see `Controller::check_drain`).
    CheckDrain(String, oneshot::Sender<Result<(), String>>),
    /// Whether this encoder is drained here (after a drain was written to etcd).
    DrainState(String, oneshot::Sender<Result<(), String>>),
    /// Leader: at most this many active encoders to write to etcd.
    TakeOutbox(usize, oneshot::Sender<Vec<crate::control::Placed>>),
    /// End the actor; the data plane stays as it is.
    Stop,
}

impl Msg {
    /// What the message asks, for the log.
    fn kind(&self) -> &'static str {
        match self {
            Msg::Request(..) => "a control-socket request",
            Msg::Health(_) => "probe results",
            Msg::Refused(..) => "refusals",
            Msg::EncoderEvent(..) => "an encoder's event",
            Msg::ReceiveTargets(_) => "the link watch's targets",
            Msg::Links(..) => "the link watch's round",
            Msg::Observe(_) => "copying counters for a scrape",
            Msg::Cluster { .. } => "changes from etcd",
            Msg::LocalHealth(_) => "the local encoders' health",
            Msg::LocalCallers(_) => "the SRT callers to publish",
            Msg::SharedChannel(..) => "a channel's state in etcd",
            Msg::CheckChannel(..) => "checking a new channel",
            Msg::ClusterEvent(_) => "a cluster event",
            Msg::ClusterView { .. } => "the election's view",
            Msg::TakeOutbox(..) => "the leader's outbox",
            Msg::CheckDrain(..) => "checking a drain",
            Msg::DrainState(..) => "a drain's state",
            Msg::Stop => "stopping",
        }
    }
}

/// How the rest of the daemon talks to the controller.
#[derive(Clone)]
pub(super) struct ControlHandle {
    tx: mpsc::Sender<Msg>,
}

impl ControlHandle {
    /// Sends a message and waits for its reply; `None` when the actor has stopped.
    pub(super) async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).ok()?;
        rx.await.ok()
    }

    /// [`ControlHandle::ask`] from a blocking thread (never the runtime's).
    pub(super) fn ask_blocking<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).ok()?;
        rx.blocking_recv().ok()
    }

    /// Sends a message that needs no reply. After the actor has stopped (the daemon is
    /// stopping) there is nobody to tell, and nothing is lost by that.
    pub(super) fn tell(&self, msg: Msg) {
        let _ = self.tx.send(msg);
    }

    /// Runs a socket request.
    pub(super) async fn request(&self, command: Command) -> Response {
        self.ask(|reply| Msg::Request(Box::new(command), reply))
            .await
            .unwrap_or_else(|| Response::error("the daemon is stopping"))
    }
}

/// The running actor.
pub(super) struct Actor {
    pub(super) handle: ControlHandle,
    /// The effective configuration's ingest and encoders (no channels), republished
    /// whenever it changes.
    pub(super) config: watch::Receiver<Arc<Followed>>,
    thread: thread::JoinHandle<()>,
}

impl Actor {
    /// Starts the actor's thread with `ctl`; with `watchdog`, it sends WATCHDOG=1 that often
    /// from its periodic work, so that systemd restarts a controller that stopped working.
    pub(super) fn spawn(
        ctl: Controller,
        metrics: Arc<Metrics>,
        watchdog: Option<(Notifier, Duration)>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (config_tx, config) = watch::channel(Arc::new(Followed::of(&ctl)));
        let thread = thread::Builder::new()
            .name("nsfail-control".into())
            .spawn(move || run(ctl, rx, metrics, config_tx, watchdog))?;
        Ok(Self {
            handle: ControlHandle { tx },
            config,
            thread,
        })
    }

    /// Stops the actor and waits for its thread.
    pub(super) fn stop(self) {
        self.handle.tell(Msg::Stop);
        if self.thread.join().is_err() {
            warn!("the controller thread panicked");
        }
    }
}

fn run(
    mut c: Controller,
    rx: mpsc::Receiver<Msg>,
    metrics: Arc<Metrics>,
    config_tx: watch::Sender<Arc<Followed>>,
    watchdog: Option<(Notifier, Duration)>,
) {
    let mut judge = Judge::default();
    judge.sync(&config_tx.borrow().checks);
    let mut seen = c.generation();
    let mut next_tick = Instant::now();
    let mut next_watchdog = Instant::now();
    loop {
        // Pending events are drained a few per turn: come back at once while some are left.
        let wait = if c.events_pending() > 0 {
            Duration::ZERO
        } else {
            next_tick.saturating_duration_since(Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(msg) => {
                let what = msg.kind();
                let started = Instant::now();
                handle(&mut c, &mut judge, msg, &metrics);
                report_slow(what, started.elapsed());
                // A failover started by the message is timed from the next tick on.
                if c.busy() {
                    next_tick = next_tick.min(Instant::now() + TICK);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if now >= next_tick {
            judge.run(&mut c);
            report_slow("the health checks' verdicts", now.elapsed());
            match c.tick() {
                Ok(report) => {
                    let (part, took) = report.slowest;
                    report_slow(part, took);
                    for channel in &report.moved {
                        metrics.record_failover(channel, None);
                    }
                    for s in &report.switchovers {
                        metrics.record_switchover(s.gap);
                    }
                }
                Err(e) => warn!("periodic work: {e}"),
            }
            next_tick = next_run(&c, &judge, Instant::now());
            // Only a controller whose periodic work runs tells systemd it is alive.
            if let Some((notifier, every)) = &watchdog
                && now >= next_watchdog
            {
                next_watchdog = now + *every;
                notifier.send("WATCHDOG=1");
            }
        }
        c.drain_events(EVENTS_PER_TURN);
        if c.generation() != seen {
            seen = c.generation();
            let followed = Followed::of(&c);
            judge.sync(&followed.checks);
            // Err: the daemon's loop is gone, which only happens while stopping.
            let _ = config_tx.send(Arc::new(followed));
        }
    }
    c.flush();
    info!("controller stopped");
}

/// Work on the controller's thread longer than this is logged (debug): nothing else runs on
/// it meanwhile, failovers and changes from etcd included.
const SLOW_WORK: Duration = Duration::from_millis(20);

fn report_slow(what: &str, took: Duration) {
    if took >= SLOW_WORK {
        debug!(
            "controller: {what} took {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
    }
}

/// When the periodic work runs next: after [`TICK`] while the controller is busy, otherwise
/// when the judge next has a check to run, within [`TICK`]..=[`IDLE_TICK`].
fn next_run(c: &Controller, judge: &Judge, now: Instant) -> Instant {
    if c.busy() {
        return now + TICK;
    }
    let due = judge
        .next_due()
        .map_or(IDLE_TICK, |t| t.saturating_duration_since(now));
    now + due.clamp(TICK, IDLE_TICK)
}

/// What the probes and managed encoders follow: the effective configuration without its
/// channels (a copy of 100,000 channels at every change would cost more than all the rest),
/// and every encoder's health check, which an `srt` or `flow` check derives from the channels.
pub(super) struct Followed {
    pub(super) config: Config,
    pub(super) checks: Vec<(String, HealthCheck)>,
}

impl Followed {
    fn of(c: &Controller) -> Self {
        let cfg = c.config();
        Self {
            config: Config {
                ingest: cfg.ingest.clone(),
                encoders: cfg.encoders.clone(),
                channels: Vec::new(),
                daemon: cfg.daemon.clone(),
                cluster: cfg.cluster.clone(),
            },
            // Other hosts' encoders are judged by their hosts (their health is in etcd).
            checks: cfg
                .health_checks()
                .into_iter()
                .filter(|(name, _)| !c.shared().is_some_and(|s| s.is_remote(name)))
                .collect(),
        }
    }
}

fn handle(c: &mut Controller, judge: &mut Judge, msg: Msg, metrics: &Metrics) {
    match msg {
        Msg::Request(command, reply) => {
            // Requests that build large transient values (an answer covering every channel,
            // a reload's parse and the configs compared with it): their memory goes back to
            // the system once the answer is sent.
            let whole = matches!(*command, Command::Status | Command::Reload);
            // Err: the client hung up; the request was carried out all the same.
            let _ = reply.send(execute(c, *command));
            if whole {
                crate::heap::trim();
            }
        }
        Msg::Health(updates) => {
            for update in updates {
                on_probe(c, judge, update);
            }
        }
        Msg::Refused(id, n) => {
            let Some(name) = c.dataplane().encoder_name(id) else {
                return;
            };
            if let Some(healthy) = judge.on_refusal(&name, n) {
                info!("encoder {name}: its kernel refuses the stream (nothing listens)");
                if let Err(e) = c.on_health(&name, healthy) {
                    warn!("acting on {name}'s health: {e}");
                }
            }
        }
        Msg::EncoderEvent(encoder, reason) => c.encoder_event(&encoder, reason),
        Msg::ReceiveTargets(reply) => {
            // Err: the link watch is stopping.
            let _ = reply.send(c.receive_targets());
        }
        Msg::Links(verdicts, reply) => {
            c.check_attachments();
            for (name, verdict) in verdicts {
                if let Err(e) = c.set_receive(&name, verdict) {
                    warn!("acting on {name}'s interface: {e}");
                }
            }
            // Err: the link watch is stopping.
            let _ = reply.send(());
        }
        Msg::Observe(reply) => {
            observe(c, metrics);
            // Err: the scrape was abandoned.
            let _ = reply.send(());
            crate::heap::trim();
        }
        Msg::Cluster {
            changes,
            resync,
            reply,
        } => {
            let report = c.apply_shared(changes, resync).map_err(|e| e.to_string());
            c.flush();
            // Err: the cluster task is stopping; the changes were applied all the same.
            let _ = reply.send(report);
        }
        Msg::LocalHealth(reply) => {
            // Err: the cluster task is stopping.
            let _ = reply.send(c.local_health());
        }
        Msg::LocalCallers(reply) => {
            // Err: the cluster task is stopping.
            let _ = reply.send(c.local_callers());
        }
        Msg::SharedChannel(name, reply) => {
            // Err: the client hung up.
            let _ = reply.send(c.shared_channel(&name));
        }
        Msg::CheckChannel(ch, reply) => {
            // Err: the client hung up.
            let _ = reply.send(c.check_new_channel(&ch));
        }
        Msg::CheckDrain(encoder, reply) => {
            let _ = reply.send(c.check_drain(&encoder));
        }
        Msg::DrainState(encoder, reply) => {
            let _ = reply.send(c.drain_state(&encoder));
        }
        Msg::ClusterEvent(reason) => c.cluster_event(&reason),
        Msg::ClusterView {
            leading,
            leader,
            etcd_up,
        } => c.set_cluster_view(leading, leader, etcd_up),
        Msg::TakeOutbox(limit, reply) => {
            // Err: the cluster task is stopping; the outbox is filled again at the next
            // election.
            let _ = reply.send(c.take_outbox(limit));
        }
        Msg::Stop => unreachable!("handled by the loop"),
    }
}

fn on_probe(c: &mut Controller, judge: &mut Judge, update: HealthUpdate) {
    if update.ok {
        c.note_alive(&update.encoder);
    }
    if let Some(healthy) = judge.on_probe(&update, c) {
        if let Some(e) = &update.error {
            info!("encoder {} probe: {e}", update.encoder);
        }
        if let Err(e) = c.on_health(&update.encoder, healthy) {
            warn!("acting on {}'s health: {e}", update.encoder);
        }
    }
}

fn execute(c: &mut Controller, command: Command) -> Response {
    let done = |r: Result<(), ControlError>| match r {
        Ok(()) => Response::ok(()),
        Err(e) => Response::error(e.to_string()),
    };
    let result = match command {
        Command::Status => {
            return match c.status_view() {
                Ok(s) => Response::ok(s),
                Err(e) => Response::error(e.to_string()),
            };
        }
        Command::Events => {
            c.drain_events(usize::MAX);
            return Response::ok(c.events());
        }
        Command::Remap { channel, encoder } => c.remap(&channel, &encoder),
        Command::Drain { encoder } => c.drain(&encoder),
        Command::Undrain { encoder } => c.undrain(&encoder),
        Command::DrainHost { drained } => c.drain_host(drained),
        Command::AddChannel { channel } => match config::Channel::try_from(channel) {
            Ok(channel) => c.add_channel(channel),
            Err(e) => return Response::error(e.to_string()),
        },
        Command::AddEncoder { encoder } => match config::Encoder::try_from(encoder) {
            Ok(encoder) => c.add_encoder(encoder),
            Err(e) => return Response::error(e.to_string()),
        },
        Command::RemoveChannel { name } => c.remove_channel(&name),
        Command::RemoveEncoder { name } => c.remove_encoder(&name),
        Command::Reload => {
            let outcome = c.reload();
            c.flush();
            return match outcome {
                Ok(report) => Response::ok(report),
                Err(e) => Response::error(e.to_string()),
            };
        }
    };
    // A change is answered once it is on disk (or its failure to get there is reported).
    c.flush();
    done(result)
}

fn observe(c: &Controller, metrics: &Metrics) {
    let Ok(status) = c.status_view() else { return };
    let dp = c.dataplane();
    let drops: Vec<_> = status
        .encoders
        .iter()
        .filter_map(|e| Some((e.name.clone(), dp.encoder_drops(&e.name).ok()?)))
        .collect();
    metrics.observe_channels(
        status.channels(),
        &status.encoders,
        &drops,
        &dp.xdp_stats().unwrap_or_default(),
        &dp.tc_stats().unwrap_or_default(),
    );
}
