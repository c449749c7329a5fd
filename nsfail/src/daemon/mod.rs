//! `nsfail run`: loads the config, opens (or adopts) the data plane, starts the controller and
//! serves the control socket until SIGTERM or SIGINT; SIGHUP reloads the config file. Under
//! systemd it says READY=1, RELOADING=1, WATCHDOG=1 and STOPPING=1 (see `notify`). Stopping
//! leaves the pinned data plane forwarding.
//!
//! Owns: the serve loop, the control socket, the pin-directory lock, the probe tasks, the
//! link watch and managed encoders' processes. Must not: decide failovers (the controller
//! does) or touch the data plane other than through the controller.

use std::{
    collections::BTreeMap,
    fs,
    os::{
        fd::AsFd,
        unix::fs::{OpenOptionsExt as _, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use futures_util::{FutureExt as _, StreamExt as _};
use log::{info, warn};
use nix::sched::{CloneFlags, setns};
use nsfail_common::RefusalEvent;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::MissedTickBehavior,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Dataplane,
    api::{self, Request, Response},
    config::{Config, HealthCheck},
    control::Controller,
    health::{self, HealthUpdate},
    metrics::{self, Metrics},
    net::provision,
    paths::{self, Pins},
};

mod actor;
mod children;
mod cluster;
mod links;
mod lock;
mod notify;
mod output;
mod probes;
mod records;
mod socket;
mod teardown;

use self::{
    actor::{Actor, ControlHandle, Msg},
    children::Managed,
    links::watch_links,
    lock::lock_pins,
    notify::Notifier,
    probes::Probes,
    socket::{bind, handle},
};
pub use self::{
    records::teardown as teardown_managed,
    teardown::{AnnounceRecord, Removed, teardown},
};

pub struct Options {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pins: Pins,
}

/// Runs the daemon in the foreground. Must be called before any other thread exists: when the
/// config names an ingest namespace, the whole process moves into it first.
pub fn run(opts: Options) -> Result<()> {
    crate::heap::one_arena();
    // SAFETY: no other thread exists yet (see above).
    let (notifier, watchdog) = unsafe { Notifier::from_env() };
    let cfg = Config::load_for_host(&opts.config)?;
    crate::logging::set_level(cfg.ingest.log_level);
    // Before anything is loaded, adopted or changed: a second daemon on the same data plane
    // would reconcile it to its own config, under the first one's feet.
    let _lock = lock_pins(&opts.pins, &opts.socket)?;
    records::make_dir(&opts.pins)
        .with_context(|| format!("creating {}", opts.pins.children_dir().display()))?;
    let leftovers = records::load(&opts.pins);
    let group = cfg
        .daemon
        .socket_group
        .as_deref()
        .map(socket::resolve_group)
        .transpose()?;
    if let Some(ns) = &cfg.ingest.netns {
        let f = fs::File::open(paths::netns(ns))
            .with_context(|| format!("ingest network namespace {ns}"))?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {ns}"))?;
        info!("running in network namespace {ns}");
    }
    if let Some(table) = cfg.cluster.as_ref().and_then(|c| c.announce_table) {
        teardown::record_announce(&opts.pins, cfg.ingest.netns.as_deref(), table)
            .with_context(|| format!("writing {}", opts.pins.announce_record().display()))?;
    }
    // One thread runs every probe, the socket and the metrics endpoint: nothing on it blocks,
    // since everything that touches the controller runs on the controller's own thread (see
    // `actor`); with a thousand probe results a second, one thread spares the cross-thread
    // wake-ups.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A cluster host knows its channels only from etcd: it waits for it before it attaches
    // anything.
    let joined = match &cfg.cluster {
        None => None,
        Some(c) => match rt.block_on(cluster::join_at_start(c, &cfg))? {
            Some(joined) => Some(joined),
            None => {
                info!("stopped while waiting for etcd; nothing was changed");
                return Ok(());
            }
        },
    };
    let mut dp = Dataplane::open(opts.pins.clone())?;
    dp.attach_ingest(&cfg.ingest.interface, cfg.ingest.xdp_mode)?;
    let adopted = dp.adopted();
    // Opened before the controller takes the data plane: read on the runtime thread.
    let refusals = dp.refusals()?;
    let (ctl, cluster) = match joined {
        None => (Controller::start(cfg, &opts.config, dp)?, None),
        Some((me, joined)) => cluster::start_controller(cfg, &opts.config, dp, me, joined)?,
    };
    crate::heap::trim();
    info!(
        "{} the data plane; {} channels, {} encoders",
        if adopted { "adopted" } else { "loaded" },
        ctl.config().channels.len(),
        ctl.config().encoders.len()
    );
    rt.block_on(serve(Serving {
        ctl,
        cluster,
        refusals,
        socket: &opts.socket,
        pins: &opts.pins,
        leftovers,
        group,
        notifier,
        watchdog,
    }))
}

/// What the serve loop starts from: the started controller and what `run` prepared for it.
struct Serving<'a> {
    ctl: Controller,
    /// A cluster host: itself, and what it read from etcd at the start.
    cluster: Option<(cluster::Me, cluster::Joined)>,
    /// The egress programs' refused-stream reports.
    refusals: RingBuf<MapData>,
    socket: &'a Path,
    pins: &'a Pins,
    /// Managed encoders a previous daemon left running, to adopt.
    leftovers: BTreeMap<String, records::Record>,
    /// The group allowed to use the socket.
    group: Option<nix::unistd::Gid>,
    notifier: Notifier,
    watchdog: Option<Duration>,
}

/// The serve loop. Long because its set-up order is the contract with systemd and the tests
/// (SIGHUP handled before anything slow, the socket bound, the actor started, READY=1 last) and
/// its one `select!` names every source of work; the work itself lives elsewhere.
async fn serve(serving: Serving<'_>) -> Result<()> {
    let Serving {
        ctl,
        cluster,
        refusals,
        socket,
        pins,
        leftovers,
        group,
        notifier,
        watchdog,
    } = serving;
    // Before anything can take a while: from here on SIGHUP reloads, and never kills.
    let hangup = signal(SignalKind::hangup())?;
    let listener = bind(socket, group).await?;
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let metrics_addr = ctl.config().ingest.metrics;
    let actor = Actor::spawn(
        ctl,
        metrics.clone(),
        watchdog.map(|w| (notifier.clone(), w)),
    )?;
    let ctl = actor.handle.clone();
    let mut config = actor.config.clone();
    let refresh = {
        let ctl = ctl.clone();
        // On the endpoint's blocking thread: the scrape waits for the actor's copy.
        move || {
            let _ = ctl.ask_blocking(Msg::Observe);
        }
    };
    let served = metrics::serve(
        metrics_addr,
        metrics::Limits::default(),
        metrics.clone(),
        refresh,
        stop.clone(),
    )
    .await;
    let (bound, metrics_task) = match served {
        Ok(s) => s,
        Err(e) => {
            actor.stop();
            return Err(e.into());
        }
    };
    info!(
        "listening on {}; metrics on http://{bound}/metrics",
        socket.display()
    );

    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let mut health_batch = Vec::new();
    let mut probes = Probes::default();
    let mut managed = Managed::new(ctl.clone(), pins, leftovers);
    {
        let followed = config.borrow_and_update().clone();
        probes.sync(&followed.checks, &health_tx, &stop);
        managed.sync(&followed.config);
    }
    let link_watch = tokio::spawn(watch_links(ctl.clone(), stop.clone()));
    let reloads = tokio::spawn(reload_on_hangup(
        hangup,
        ctl.clone(),
        notifier.clone(),
        stop.clone(),
    ));
    let refusal_watch = tokio::spawn(watch_refusals(refusals, ctl.clone(), stop.clone()));
    let (writes, cluster_task) = match cluster {
        None => (None, None),
        Some((me, joined)) => {
            let (writes, task) = cluster::spawn(me, joined, ctl.clone(), stop.clone());
            (Some(writes), Some(task))
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // The data plane is attached (the controller started on it), the socket and the metrics
    // endpoint serve.
    notifier.send("READY=1");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ctl = ctl.clone();
                    let writes = writes.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, ctl, group, writes).await {
                            warn!("client: {e}");
                        }
                    });
                }
                Err(e) => warn!("accept: {e}"),
            },
            // Every result waiting, in one message: one wake-up of the controller's thread
            // for a batch of probes.
            n = health_rx.recv_many(&mut health_batch, 1024) => {
                if n > 0 {
                    for update in &health_batch {
                        metrics.record_probe(&update.encoder, update.latency);
                    }
                    ctl.tell(Msg::Health(std::mem::take(&mut health_batch)));
                }
            },
            // Probes and managed encoders follow the configuration.
            Ok(()) = config.changed() => {
                let followed = config.borrow_and_update().clone();
                crate::logging::set_level(followed.config.ingest.log_level);
                probes.sync(&followed.checks, &health_tx, &stop);
                managed.sync(&followed.config);
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notifier.send("STOPPING=1");
    stop.cancel();
    // They end at the stop; a panic in one was logged by the runtime already.
    let _ = link_watch.await;
    let _ = reloads.await;
    let _ = refusal_watch.await;
    if let Some(task) = cluster_task {
        // It ends at the stop; the host's lease expires by itself.
        let _ = task.await;
    }
    // Managed encoders keep running: the next daemon adopts them.
    managed.detach_all().await;
    let _ = metrics_task.await;
    actor.stop();
    let _ = fs::remove_file(socket);
    info!("stopped; the data plane keeps forwarding (nsfail teardown removes it)");
    Ok(())
}

/// Reloads the config on every SIGHUP, one reload at a time: signals that arrive while a
/// reload runs are one more reload after it (the kernel and tokio coalesce a pending
/// signal), and a reload waits behind whatever the controller is doing (a failover) since it
/// is one more message in its queue.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    ctl: ControlHandle,
    notifier: Notifier,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hangup.recv() => if got.is_none() { return },
        }
        info!("SIGHUP: reloading the config");
        notifier.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::control::monotonic_ns() / 1000
        ));
        // The controller logs the outcome and raises its event.
        let response = ctl.request(api::Command::Reload).await;
        notifier.send("READY=1");
        if let Some(e) = response.error {
            warn!("reload: {e}");
        }
    }
}

/// Reads the egress program's refusal reports as the ring buffer wakes it, and tells the
/// controller, one message per encoder per wake-up. Ends at the daemon's stop.
async fn watch_refusals(ring: RingBuf<MapData>, ctl: ControlHandle, stop: CancellationToken) {
    // SAFETY: the RingBuf owns its map's descriptor (and the consumer/producer mappings),
    // which stays open and the same until the RingBuf is dropped with the AsyncFd.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("refused streams cannot be watched (probes still judge encoders): {e}");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            () = stop.cancelled() => return,
            ready = ring.readable_mut() => match ready {
                Ok(guard) => guard,
                Err(e) => {
                    warn!("watching refused streams: {e}");
                    return;
                }
            },
        };
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            if item.len() >= std::mem::size_of::<RefusalEvent>() {
                // SAFETY: the program writes whole `RefusalEvent`s (plain integers); the length
                // is checked and the read is unaligned.
                let ev: RefusalEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RefusalEvent>()) };
                *seen.entry(ev.encoder_id).or_default() += 1;
            }
        }
        guard.clear_ready();
        for (id, n) in seen {
            ctl.tell(Msg::Refused(id, n));
        }
    }
}
