//! `nsfail run`: loads the config, opens (or adopts) the data plane, starts the controller and
//! serves the control socket until SIGTERM or SIGINT. Stopping leaves the pinned data plane
//! forwarding.

use std::{
    fs,
    os::{fd::AsFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, bail};
use log::{info, warn};
use nix::sched::{CloneFlags, setns};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    Dataplane,
    api::{self, Command, Request, Response},
    config::Config,
    controller::Controller,
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
    let cfg = Config::load(&opts.config)?;
    if let Some(ns) = &cfg.ingest.netns {
        let f = fs::File::open(paths::netns(ns))
            .with_context(|| format!("ingest network namespace {ns}"))?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {ns}"))?;
        info!("running in network namespace {ns}");
    }
    let mut dp = Dataplane::open(opts.pins.clone())?;
    dp.attach_ingest(&cfg.ingest.interface, cfg.ingest.xdp_mode.into())?;
    let adopted = dp.adopted();
    let ctl = Controller::start(cfg, &opts.config, dp)?;
    info!(
        "{} the data plane; {} channels, {} encoders",
        if adopted { "adopted" } else { "loaded" },
        ctl.config().channels.len(),
        ctl.config().encoders.len()
    );
    let ctl = Arc::new(Mutex::new(ctl));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(ctl, &opts.socket))
}

async fn serve(ctl: Arc<Mutex<Controller>>, socket: &Path) -> Result<()> {
    let listener = bind(socket).await?;
    info!("listening on {}", socket.display());
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
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = fs::remove_file(socket);
    info!("stopped; the data plane keeps forwarding (nsfail teardown removes it)");
    Ok(())
}

/// Binds the socket (mode 0600). A socket file nobody answers on is stale and replaced; one
/// that answers belongs to a running daemon, and this one refuses to start.
async fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("another nsfail daemon is serving {}", socket.display());
        }
        fs::remove_file(socket).with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
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
    let mut c = ctl.lock().unwrap_or_else(|p| p.into_inner());
    let done = |r: Result<(), crate::controller::ControlError>| match r {
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
