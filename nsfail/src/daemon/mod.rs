//! `nsfail run`: loads the config, opens (or adopts) the data plane, starts the controller and
//! serves the control socket until SIGTERM or SIGINT. Stopping leaves the pinned data plane
//! forwarding.
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

use crate::{
    Dataplane,
    api::{self, Request, Response},
    config::{self, Config, HealthCheck},
    control::Controller,
    health::{self, HealthUpdate},
    metrics::{self, Metrics},
    net::provision,
    paths::{self, Pins},
};

mod actor;
mod children;
mod links;
mod lock;
mod probes;
mod socket;

use self::{
    actor::{Actor, Msg},
    children::Managed,
    links::watch_links,
    lock::lock_pins,
    probes::Probes,
    socket::{bind, handle},
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
    // Opened before the controller takes the data plane: read on the runtime thread.
    let refusals = dp.refusals()?;
    let ctl = Controller::start(cfg, &opts.config, dp)?;
    info!(
        "{} the data plane; {} channels, {} encoders",
        if adopted { "adopted" } else { "loaded" },
        ctl.config().channels.len(),
        ctl.config().encoders.len()
    );
    // One thread runs every probe, the socket and the metrics endpoint: nothing on it blocks,
    // since everything that touches the controller runs on the controller's own thread (see
    // `actor`); with a thousand probe results a second, one thread spares the cross-thread
    // wake-ups.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(ctl, refusals, &opts.socket))
}

async fn serve(ctl: Controller, refusals: RingBuf<MapData>, socket: &Path) -> Result<()> {
    let listener = bind(socket).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let metrics_addr = ctl.config().ingest.metrics;
    let actor = Actor::spawn(ctl, metrics.clone())?;
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
        stop_rx.clone(),
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
    let mut managed = Managed::new(ctl.clone());
    {
        let cfg = config.borrow_and_update().clone();
        probes.sync(&cfg, &health_tx, &stop_rx);
        managed.sync(&cfg);
    }
    let link_watch = tokio::spawn(watch_links(ctl.clone(), stop_rx.clone()));
    let refusal_watch = tokio::spawn(watch_refusals(refusals, ctl.clone(), stop_rx.clone()));
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
                let cfg = config.borrow_and_update().clone();
                probes.sync(&cfg, &health_tx, &stop_rx);
                managed.sync(&cfg);
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = stop_tx.send(true);
    // It ends at the stop signal; a panic in it was logged by the runtime already.
    let _ = link_watch.await;
    let _ = refusal_watch.await;
    managed.stop_all().await;
    let _ = metrics_task.await;
    actor.stop();
    let _ = fs::remove_file(socket);
    info!("stopped; the data plane keeps forwarding (nsfail teardown removes it)");
    Ok(())
}

/// Reads the egress program's refusal reports as the ring buffer wakes it, and tells the
/// controller, one message per encoder per wake-up. Ends at the daemon's stop.
async fn watch_refusals(
    ring: RingBuf<MapData>,
    ctl: actor::ControlHandle,
    mut stop: watch::Receiver<bool>,
) {
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
            _ = stop.wait_for(|s| *s) => return,
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
