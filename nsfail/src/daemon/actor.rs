//! The controller as an actor: one thread owns it and does everything that touches it, one
//! message at a time; the runtime thread (probes, the socket, the metrics endpoint, the link
//! watch) only sends messages and awaits `oneshot` replies. A failover's map writes and
//! fsync, a reconcile's netlink calls, an `add encoder`'s provisioning: all of it happens on
//! the actor's thread, so a probe never waits for it and nothing else ever locks the
//! controller.
//!
//! Between messages the actor runs the periodic work every [`TICK`] (automatic failback,
//! input loss, switchover timing, flow checks) and publishes the effective configuration
//! whenever it changes, for the probes and managed encoders to follow.

use std::{
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use log::{info, warn};
use tokio::sync::{oneshot, watch};

use crate::{
    api::{Command, Response},
    config::Config,
    control::{ControlError, Controller},
    health::{HealthUpdate, judge::Judge},
    metrics::Metrics,
    net::receive::Verdict,
};

/// How often the controller's periodic work runs (failback, input loss, switchover
/// measurement, flow checks).
const TICK: Duration = Duration::from_millis(10);

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
    /// End the actor; the data plane stays as it is.
    Stop,
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
    /// The effective configuration, republished whenever it changes.
    pub(super) config: watch::Receiver<Arc<Config>>,
    thread: thread::JoinHandle<()>,
}

impl Actor {
    /// Starts the actor's thread with `ctl`.
    pub(super) fn spawn(ctl: Controller, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (config_tx, config) = watch::channel(Arc::new(ctl.config().clone()));
        let thread = thread::Builder::new()
            .name("nsfail-control".into())
            .spawn(move || run(ctl, rx, metrics, config_tx))?;
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
    config_tx: watch::Sender<Arc<Config>>,
) {
    let mut judge = Judge::default();
    judge.sync(c.config());
    let mut seen = c.generation();
    let mut next_tick = Instant::now();
    loop {
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(msg) => handle(&mut c, &mut judge, msg, &metrics),
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + TICK;
            judge.run(&mut c);
            match c.tick() {
                Ok(report) => {
                    for channel in &report.moved {
                        metrics.record_failover(channel, None);
                    }
                    for s in &report.switchovers {
                        metrics.record_switchover(s.gap);
                    }
                }
                Err(e) => warn!("periodic work: {e}"),
            }
        }
        if c.generation() != seen {
            seen = c.generation();
            judge.sync(c.config());
            // Err: the daemon's loop is gone, which only happens while stopping.
            let _ = config_tx.send(Arc::new(c.config().clone()));
        }
    }
    info!("controller stopped");
}

fn handle(c: &mut Controller, judge: &mut Judge, msg: Msg, metrics: &Metrics) {
    match msg {
        Msg::Request(command, reply) => {
            // Err: the client hung up; the request was carried out all the same.
            let _ = reply.send(execute(c, *command));
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
    match command {
        Command::Status => match c.status() {
            Ok(s) => Response::ok(s),
            Err(e) => Response::error(e.to_string()),
        },
        Command::Events => Response::ok(c.events()),
        Command::Remap { channel, encoder } => done(c.remap(&channel, &encoder)),
        Command::Drain { encoder } => done(c.drain(&encoder)),
        Command::Undrain { encoder } => done(c.undrain(&encoder)),
        Command::AddChannel { channel } => done(c.add_channel(channel)),
        Command::AddEncoder { encoder } => done(c.add_encoder(encoder)),
        Command::RemoveChannel { name } => done(c.remove_channel(&name)),
        Command::RemoveEncoder { name } => done(c.remove_encoder(&name)),
    }
}

fn observe(c: &Controller, metrics: &Metrics) {
    let Ok(status) = c.status() else { return };
    let dp = c.dataplane();
    let drops: Vec<_> = status
        .encoders
        .iter()
        .filter_map(|e| Some((e.name.clone(), dp.encoder_drops(&e.name).ok()?)))
        .collect();
    metrics.observe(
        &status,
        &drops,
        &dp.xdp_stats().unwrap_or_default(),
        &dp.tc_stats().unwrap_or_default(),
    );
}
