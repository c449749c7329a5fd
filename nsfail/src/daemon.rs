//! `nsfail run`: loads the config, opens (or adopts) the data plane, starts the controller and
//! serves the control socket until SIGTERM or SIGINT. Stopping leaves the pinned data plane
//! forwarding.

use std::{
    collections::BTreeMap,
    fs,
    os::{
        fd::AsFd,
        unix::fs::{OpenOptionsExt as _, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures_util::{FutureExt as _, StreamExt as _};
use log::{info, warn};
use nix::sched::{CloneFlags, setns};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::MissedTickBehavior,
};

use crate::{
    Dataplane,
    api::{self, Command, Request, Response},
    config::{self, Config, Health, HealthKind},
    control::{self, Controller},
    health::{self, Counter, HealthUpdate},
    managed,
    metrics::{self, Metrics},
    paths::{self, Pins},
};

pub struct Options {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pins: Pins,
}

/// Runs the daemon in the foreground. Must be called before any other thread exists: when the
/// config names an ingest namespace, the whole process moves into it first.
pub fn run(opts: Options) -> Result<()> {
    let cfg = Config::load_for_host(&opts.config)?;
    // Before anything is loaded, adopted or changed: a second daemon on the same data plane
    // would reconcile it to its own config, under the first one's feet.
    let _lock = lock_pins(&opts.pins, &opts.socket)?;
    if let Some(ns) = &cfg.ingest.netns {
        let f = fs::File::open(paths::netns(ns))
            .with_context(|| format!("ingest network namespace {ns}"))?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {ns}"))?;
        info!("running in network namespace {ns}");
    }
    let mut dp = Dataplane::open(opts.pins.clone())?;
    dp.attach_ingest(&cfg.ingest.interface, cfg.ingest.xdp_mode)?;
    let adopted = dp.adopted();
    let ctl = Controller::start(cfg, &opts.config, dp)?;
    info!(
        "{} the data plane; {} channels, {} encoders",
        if adopted { "adopted" } else { "loaded" },
        ctl.config().channels.len(),
        ctl.config().encoders.len()
    );
    let ctl = Arc::new(Mutex::new(ctl));
    // One thread runs every probe, the socket and the periodic work: nothing on it blocks
    // (controller calls are short map operations; requests run on the blocking pool), and
    // with a thousand probe results a second, one thread spares the cross-thread wake-ups.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(ctl, &opts.socket))
}

/// Takes the pin directory's lock (held until the process exits) and writes this daemon's
/// PID and socket into it; refuses, naming the daemon that holds it, when another one does.
fn lock_pins(pins: &Pins, socket: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = pins.lock_file();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            // What the holder wrote; a read error leaves the message without it.
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "another nsfail daemon serves the data plane at {} ({}); nothing was changed",
                pins.root().display(),
                if holder.is_empty() {
                    format!("it holds {}", path.display())
                } else {
                    holder.to_owned()
                }
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    lock.set_len(0)?;
    lock.rewind()?;
    writeln!(
        lock,
        "pid {}, socket {}",
        std::process::id(),
        socket.display()
    )?;
    Ok(lock)
}

/// How often the controller's periodic work runs (failback, input loss, switchover
/// measurement, flow checks).
const TICK: Duration = Duration::from_millis(10);

async fn serve(ctl: Arc<Mutex<Controller>>, socket: &Path) -> Result<()> {
    let listener = bind(socket).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let metrics_addr = lock(&ctl).config().ingest.metrics;
    let refresh = {
        let (ctl, metrics) = (ctl.clone(), metrics.clone());
        move || refresh_metrics(&ctl, &metrics)
    };
    let (bound, metrics_task) = metrics::serve(
        metrics_addr,
        metrics::Limits::default(),
        metrics.clone(),
        refresh,
        stop_rx.clone(),
    )
    .await?;
    info!(
        "listening on {}; metrics on http://{bound}/metrics",
        socket.display()
    );

    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let mut probes = Probes::default();
    let mut flows = FlowChecks::default();
    let mut managed = Managed::new(ctl.clone());
    let mut seen_generation = {
        let c = lock(&ctl);
        probes.sync(c.config(), &health_tx, &stop_rx);
        managed.sync(c.config());
        flows.sync(c.config());
        c.generation()
    };
    let link_watch = tokio::spawn(watch_links(ctl.clone(), stop_rx.clone()));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ctl = ctl.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, ctl).await {
                            warn!("client: {e}");
                        }
                    });
                }
                Err(e) => warn!("accept: {e}"),
            },
            Some(update) = health_rx.recv() => {
                metrics.record_probe(&update.encoder, update.latency);
                if update.ok {
                    lock(&ctl).note_alive(&update.encoder);
                }
                if let Some(healthy) = update.transition {
                    if let Some(e) = &update.error {
                        info!("encoder {} probe: {e}", update.encoder);
                    }
                    if let Err(e) = lock(&ctl).on_health(&update.encoder, healthy) {
                        warn!("acting on {}'s health: {e}", update.encoder);
                    }
                }
            },
            _ = tick.tick() => {
                let mut c = lock(&ctl);
                flows.run(&mut c);
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
                // Probes and managed encoders follow the configuration: re-read it only when
                // it changed.
                if c.generation() != seen_generation {
                    seen_generation = c.generation();
                    probes.sync(c.config(), &health_tx, &stop_rx);
                    managed.sync(c.config());
                    flows.sync(c.config());
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = stop_tx.send(true);
    // It ends at the stop signal; a panic in it was logged by the runtime already.
    let _ = link_watch.await;
    managed.stop_all().await;
    let _ = metrics_task.await;
    let _ = fs::remove_file(socket);
    info!("stopped; the data plane keeps forwarding (nsfail teardown removes it)");
    Ok(())
}

fn lock(ctl: &Mutex<Controller>) -> MutexGuard<'_, Controller> {
    ctl.lock().unwrap_or_else(|p| p.into_inner())
}

fn refresh_metrics(ctl: &Mutex<Controller>, metrics: &Metrics) {
    let c = lock(ctl);
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

/// How often attachments and receive readiness are checked when no link event says so
/// sooner.
const LINK_SWEEP: Duration = Duration::from_millis(500);

/// Keeps the data plane on the interfaces that exist now, and every local encoder able to
/// receive: on every link event in this namespace (an interface deleted, re-created, brought
/// up or down) and every [`LINK_SWEEP`] (a peer's GRO turned off in another namespace makes
/// no event here). The checks run on the blocking pool, one round at a time; the
/// controller is locked only to apply what they found.
async fn watch_links(ctl: Arc<Mutex<Controller>>, mut stop: watch::Receiver<bool>) {
    let mut events = match rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]) {
        Ok((conn, _handle, events)) => {
            tokio::spawn(conn);
            Some(events)
        }
        Err(e) => {
            warn!("link events unavailable ({e}); checking links every {LINK_SWEEP:?} only");
            None
        }
    };
    let mut sweep = tokio::time::interval(LINK_SWEEP);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sweep.tick() => {},
            Some(_) = async {
                match events.as_mut() {
                    Some(ev) => ev.next().await,
                    None => std::future::pending().await,
                }
            } => {
                // A burst of events (a veth pair made, addressed, brought up) is one round.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(ev) = events.as_mut() {
                    while let Some(Some(_)) = ev.next().now_or_never() {}
                }
            },
            _ = async {
                // Err: the daemon is gone, which is a stop too.
                let _ = stop.wait_for(|s| *s).await;
            } => return,
        }
        let ctl = ctl.clone();
        let round = tokio::task::spawn_blocking(move || {
            let targets = lock(&ctl).receive_targets();
            let verdicts: Vec<_> = targets
                .into_iter()
                .map(|(name, ifname, ns)| (name, crate::receive::ensure(&ifname, ns.as_deref())))
                .collect();
            let mut c = lock(&ctl);
            c.check_attachments();
            for (name, verdict) in verdicts {
                if let Err(e) = c.set_receive(&name, verdict) {
                    warn!("acting on {name}'s interface: {e}");
                }
            }
        });
        if let Err(e) = round.await {
            warn!("link check: {e}");
        }
    }
}

/// One probe task per encoder with a network health check, restarted when its check changes
/// and stopped when the encoder goes away.
#[derive(Default)]
struct Probes {
    running: BTreeMap<String, (ProbeTarget, watch::Sender<bool>)>,
}

/// Everything a probe task was made from: a change to any of it replaces the task.
#[derive(Debug, Clone, PartialEq)]
struct ProbeTarget {
    health: Health,
    address: std::net::IpAddr,
    netns: Option<String>,
}

impl ProbeTarget {
    fn of(e: &config::Encoder) -> Self {
        Self {
            health: e.health.clone(),
            address: e.address,
            netns: e.netns.clone(),
        }
    }
}

impl Probes {
    fn sync(
        &mut self,
        cfg: &Config,
        tx: &mpsc::Sender<HealthUpdate>,
        stop: &watch::Receiver<bool>,
    ) {
        let wanted: BTreeMap<&str, &config::Encoder> = cfg
            .encoders
            .iter()
            .filter(|e| e.health.kind != HealthKind::Flow)
            .map(|e| (e.name.as_str(), e))
            .collect();
        self.running.retain(|name, (target, cancel)| {
            let keep = wanted
                .get(name.as_str())
                .is_some_and(|e| ProbeTarget::of(e) == *target);
            if !keep {
                let _ = cancel.send(true);
            }
            keep
        });
        for (name, e) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let Some(probe) = health::probe_for(e) else {
                continue;
            };
            let (cancel_tx, cancel_rx) = watch::channel(false);
            // The daemon's own stop also stops every probe.
            let mut stop = stop.clone();
            let cancel_on_stop = cancel_tx.clone();
            tokio::spawn(async move {
                let _ = stop.wait_for(|s| *s).await;
                let _ = cancel_on_stop.send(true);
            });
            health::spawn(name.to_owned(), probe, &e.health, tx.clone(), cancel_rx);
            self.running
                .insert(name.to_owned(), (ProbeTarget::of(e), cancel_tx));
        }
    }
}

/// The supervised processes of managed encoders. A removed encoder's process is stopped, then
/// its namespace and veth are removed; at shutdown processes stop and namespaces stay (a
/// restarted daemon finds them in place).
struct Managed {
    ctl: Arc<Mutex<Controller>>,
    running: BTreeMap<String, (config::Encoder, watch::Sender<bool>, JoinHandle<()>)>,
}

impl Managed {
    fn new(ctl: Arc<Mutex<Controller>>) -> Self {
        Self {
            ctl,
            running: BTreeMap::new(),
        }
    }

    fn sync(&mut self, cfg: &Config) {
        let wanted: BTreeMap<&str, &config::Encoder> = cfg
            .encoders
            .iter()
            .filter(|e| e.spawn.is_some())
            .map(|e| (e.name.as_str(), e))
            .collect();
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, (e, _, _))| wanted.get(name.as_str()) != Some(&e))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let (e, stop, task) = self.running.remove(&name).expect("listed above");
            let _ = stop.send(true);
            let removed = !wanted.contains_key(name.as_str());
            tokio::spawn(async move {
                let _ = task.await;
                if removed && let Some(plan) = managed::Plan::of(&e) {
                    let _ =
                        tokio::task::spawn_blocking(move || managed::deprovision_or_warn(&plan))
                            .await;
                }
            });
        }
        for (name, e) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(false);
            let ctl = self.ctl.clone();
            let report: managed::Report = Arc::new(move |encoder: &str, msg: String| {
                warn!("managed encoder {encoder}: {msg}");
                lock(&ctl).encoder_event(encoder, msg);
            });
            let task = tokio::spawn(managed::supervise(e.clone(), stop_rx, report));
            self.running
                .insert(name.to_owned(), (e.clone(), stop, task));
        }
    }

    async fn stop_all(&mut self) {
        for (_, (_, stop, task)) in std::mem::take(&mut self.running) {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }
}

/// The `flow` check: an encoder is failing when a channel it is active for has moving input
/// but the encoder has sent nothing back (replies) for `timeout_ms`. Judged every
/// `interval_ms` and counted with rise/fall like a probe. With no input, nothing is judged.
#[derive(Default)]
struct FlowChecks {
    /// Encoders with a flow check: their settings, counter and last evaluation.
    state: BTreeMap<String, (Health, Counter, Instant)>,
}

impl FlowChecks {
    /// Follows the configuration: flow-checked encoders added, changed or gone.
    fn sync(&mut self, cfg: &Config) {
        let now = Instant::now();
        let wanted: BTreeMap<&str, &Health> = cfg
            .encoders
            .iter()
            .filter(|e| e.health.kind == HealthKind::Flow)
            .map(|e| (e.name.as_str(), &e.health))
            .collect();
        self.state
            .retain(|n, (h, _, _)| wanted.get(n.as_str()).is_some_and(|w| *w == h));
        for (name, h) in wanted {
            self.state
                .entry(name.to_owned())
                .or_insert_with(|| (h.clone(), Counter::new(h.rise, h.fall, true), now));
        }
    }

    fn run(&mut self, c: &mut Controller) {
        let now = Instant::now();
        for (name, (h, counter, last)) in &mut self.state {
            if now.duration_since(*last) < Duration::from_millis(h.interval_ms) {
                continue;
            }
            *last = now;
            let window = Duration::from_millis(h.timeout_ms);
            let fed = c
                .channels_on(name)
                .iter()
                .any(|ch| c.input_moving(ch, window));
            if !fed {
                continue;
            }
            let idle_ns = c
                .dataplane()
                .encoder_stats(name)
                .map(|s| control::monotonic_ns().saturating_sub(s.tx.last_seen_ns))
                .unwrap_or(u64::MAX);
            let ok = idle_ns < window.as_nanos() as u64;
            if let Some(healthy) = counter.record(ok)
                && let Err(err) = c.on_health(name, healthy)
            {
                warn!("acting on {name}'s flow check: {err}");
            }
        }
    }
}

/// Binds the socket (mode 0600). A socket file nobody answers on is stale and replaced; one
/// that answers belongs to a running daemon, and this one refuses to start.
async fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another nsfail daemon is serving {}", socket.display());
        }
        fs::remove_file(socket).with_context(|| format!("removing stale {}", socket.display()))?;
    }
    // Created 0600: there is no moment at which another user could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves one connection: requests one per line until the client closes. A malformed or
/// oversized request gets an error answer; an oversized one also ends the connection.
async fn handle(stream: UnixStream, ctl: Arc<Mutex<Controller>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(api::MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > api::MAX_REQUEST;
        let response = if too_long {
            Response::error(format!("request longer than {} bytes", api::MAX_REQUEST))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) if req.v != api::VERSION => Response::error(format!(
                    "protocol version {} not supported (this daemon speaks {})",
                    req.v,
                    api::VERSION
                )),
                Ok(req) => {
                    let ctl = ctl.clone();
                    tokio::task::spawn_blocking(move || execute(&ctl, req.command)).await?
                }
                Err(e) => Response::error(format!("malformed request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

fn execute(ctl: &Mutex<Controller>, command: Command) -> Response {
    let mut c = lock(ctl);
    let done = |r: Result<(), crate::control::ControlError>| match r {
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

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, watch};

    use super::Probes;
    use crate::config::Config;

    fn config(address: &str) -> Config {
        let text = format!(
            "[ingest]\ninterface = \"eth0\"\n\n[[encoder]]\nname = \"enc-a\"\n\
             address = \"{address}\"\nhealth = {{ kind = \"udp\", port = 9, interval_ms = 60000, \
             timeout_ms = 100 }}\n"
        );
        Config::parse(&text, "t.toml").unwrap()
    }

    #[tokio::test]
    async fn a_probe_follows_its_encoders_address() {
        let (tx, _rx) = mpsc::channel(8);
        let (_stop_tx, stop) = watch::channel(false);
        let mut probes = Probes::default();
        probes.sync(&config("127.0.0.2"), &tx, &stop);
        let first = probes.running["enc-a"].1.subscribe();
        assert!(!*first.borrow());

        // Same settings: the running probe is kept.
        probes.sync(&config("127.0.0.2"), &tx, &stop);
        assert!(!*first.borrow());

        // A new address: the old probe is cancelled and one for the new address runs.
        probes.sync(&config("127.0.0.3"), &tx, &stop);
        assert!(
            *first.borrow(),
            "the probe of the old address was cancelled"
        );
        let (target, cancel) = &probes.running["enc-a"];
        assert_eq!(
            target.address,
            "127.0.0.3".parse::<std::net::IpAddr>().unwrap()
        );
        assert!(!*cancel.subscribe().borrow());
    }
}
