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
    control::Controller,
    health::{self, HealthUpdate},
    metrics::{self, Metrics},
    net::provision,
    paths::{self, Pins},
};

mod children;
mod links;
mod lock;
mod probes;
mod socket;

use self::{
    children::Managed,
    links::watch_links,
    lock::lock_pins,
    probes::Probes,
    socket::{bind, handle},
};
use crate::health::flow::FlowChecks;

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

pub(super) fn lock(ctl: &Mutex<Controller>) -> MutexGuard<'_, Controller> {
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
