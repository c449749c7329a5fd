//! The command line: the daemon (`run`), config checking, socket clients, teardown and the
//! lab. Human tables by default, JSON with `--json`. Exit status: 0 success, 1 a refused or
//! failed request (one line on stderr), 2 usage (clap).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::{
    Dataplane,
    api::{self, Command, Event, Response, Status},
    config::Config,
    daemon,
    lab::ctl as labctl,
    paths::{self, Pins},
};

mod doctor;
mod render;

use self::render::{render_event, render_status};

#[derive(Parser)]
#[command(
    name = "nsfail",
    version,
    about = "Keeps live-video contribution streams flowing when their encoder fails"
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = paths::SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// The pin directory of the data plane.
        #[arg(long, default_value = paths::PIN_DIR)]
        pins: PathBuf,
    },
    /// Validate a config file without touching anything: the file, then this host (the
    /// interfaces it names must exist in the ingest namespace).
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Check the file only, not this host (a config written for another machine).
        #[arg(long)]
        portable: bool,
    },
    /// Channels with their active encoder and counters; encoders with health.
    Status,
    /// Channels and encoders, briefly.
    List,
    /// Move a channel to another of its encoders now (manual failover).
    Remap { channel: String, encoder: String },
    /// Move every channel off an encoder and keep them off; `drain host`: withdraw this
    /// cluster host's anycast routes, so that the router moves its flows to the other hosts.
    #[command(
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true,
        disable_help_subcommand = true
    )]
    Drain {
        #[command(subcommand)]
        host: Option<HostTarget>,
        /// The encoder (`nsfail drain -- host` drains an encoder named "host").
        #[arg(required = true)]
        encoder: Option<String>,
    },
    /// Let an encoder receive channels again; `undrain host`: announce this host's routes
    /// again.
    #[command(
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true,
        disable_help_subcommand = true
    )]
    Undrain {
        #[command(subcommand)]
        host: Option<HostTarget>,
        /// The encoder (`nsfail undrain -- host` for an encoder named "host").
        #[arg(required = true)]
        encoder: Option<String>,
    },
    /// Add a channel or an encoder at run time (persisted).
    #[command(subcommand)]
    Add(AddCmd),
    /// Remove a channel or an encoder at run time (persisted).
    #[command(subcommand)]
    Remove(RemoveCmd),
    /// Managed encoders.
    #[command(subcommand)]
    Encoder(EncoderCmd),
    /// Re-read the daemon's config file and apply the difference (as SIGHUP does).
    Reload,
    /// Decisions and observations, oldest first.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
    },
    /// Detach and unpin the whole data plane, with or without a daemon running.
    Teardown {
        #[arg(long, default_value = paths::PIN_DIR)]
        pins: PathBuf,
    },
    /// Check this host (kernel, BTF, bpffs, TCX, pins, socket) and, with --config, the ingest
    /// interface and every local encoder; one line per check, exit 1 when one fails.
    Doctor {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The pin directory of the data plane.
        #[arg(long, default_value = paths::PIN_DIR)]
        pins: PathBuf,
    },
    /// The demo lab.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Write the file's channels (and nothing else) to its [cluster]'s etcd; every daemon of
    /// the cluster applies them.
    Apply {
        #[arg(long)]
        config: PathBuf,
        /// Also delete the cluster's channels the file does not list.
        #[arg(long)]
        prune: bool,
    },
    /// The cluster of a config's [cluster] section.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

/// `drain host` / `undrain host`.
#[derive(Subcommand)]
enum HostTarget {
    /// This cluster host as a whole: its announced ingest addresses (`announce_table`).
    Host,
}

#[derive(Subcommand)]
enum AddCmd {
    Channel(AddChannel),
    Encoder(AddEncoder),
}

#[derive(Args)]
struct AddChannel {
    name: String,
    /// The ingest address senders are given, e.g. 10.200.0.1:5000.
    #[arg(long)]
    listen: String,
    /// Encoders in priority order, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    encoders: Vec<String>,
    /// Encoder-side UDP port (default: the listen port).
    #[arg(long)]
    port: Option<u16>,
    /// manual | auto
    #[arg(long)]
    failback: Option<String>,
    /// udp | srt
    #[arg(long)]
    protocol: Option<String>,
    /// Forward only from these prefixes or addresses, comma separated (default: anywhere).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    /// SRT callers remembered (and told to reconnect on a failover), 1 to 16 (default 8).
    #[arg(long)]
    srt_peer_limit: Option<u32>,
}

#[derive(Args)]
struct AddEncoder {
    name: String,
    #[arg(long)]
    address: String,
    /// Host side of its veth (a local encoder); omit for a remote one.
    #[arg(long)]
    interface: Option<String>,
    /// Its network namespace (local encoder).
    #[arg(long)]
    netns: Option<String>,
    /// Its MAC, when it cannot be looked up in `--netns`.
    #[arg(long)]
    mac: Option<String>,
    /// What it may reach besides replying to sources (repeatable).
    #[arg(long)]
    allow: Vec<String>,
    /// Health check port for udp/tcp probes.
    #[arg(long)]
    health_port: Option<u16>,
}

#[derive(Subcommand)]
enum EncoderCmd {
    /// Add a managed encoder: nsfail makes its namespace, veth, addresses and routes and runs
    /// COMMAND inside, restarting it when it exits.
    Spawn(SpawnEncoder),
}

#[derive(Args)]
struct SpawnEncoder {
    name: String,
    /// Its address inside its namespace; the host side of the veth takes the link's first
    /// address.
    #[arg(long)]
    address: String,
    /// The link's prefix length (default /30 for IPv4, /126 for IPv6).
    #[arg(long)]
    prefix: Option<u8>,
    /// always | never
    #[arg(long)]
    restart: Option<String>,
    /// A udp health check on this port (default: `srt` health on the port of an SRT listener
    /// the command runs, `srt://:PORT?mode=listener`; otherwise the flow check).
    #[arg(long)]
    health_port: Option<u16>,
    /// What it may reach besides replying to sources (repeatable).
    #[arg(long)]
    allow: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum RemoveCmd {
    Channel { name: String },
    Encoder { name: String },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Hosts with the time left on their leases, their encoders, etcd's health.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the demo lab: namespaces, veths, SRT listeners and a live test source.
    Up,
    /// Remove exactly what `lab up` made.
    Down,
    /// `lab up`, then the daemon on the lab in the foreground; on Ctrl-C the daemon stops and
    /// the lab and the data plane are removed.
    Run,
    /// Kill -9 an encoder's stream receiver (`nsfail lab kill enc-a`), as if it crashed: its
    /// channel fails over.
    Kill { encoder: String },
    /// The cluster lab: three ingest hosts (each its own daemon, BIRD and two encoders), a
    /// router with BIRD (ECMP, BFD), etcd, and a caller streaming UDP and SRT.
    #[command(subcommand)]
    Cluster(ClusterLabCmd),
    /// A self-contained data-plane demo: stream, remap half-way, clean up.
    Demo {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=3600))]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum ClusterLabCmd {
    /// Build the cluster lab and start everything in it (about 10-30 s).
    Up(ClusterLabArgs),
    /// Remove exactly what `lab cluster up` made: processes, pin directories, namespaces, files.
    Down(ClusterLabArgs),
}

#[derive(Args)]
struct ClusterLabArgs {
    /// Every namespace's and pin directory's name starts with this.
    #[arg(long, default_value = "nsfc-")]
    prefix: String,
    /// The lab's directory: its record, configs, sockets, logs, etcd's data, the streams.
    #[arg(long, default_value = paths::LAB_CLUSTER_DIR)]
    dir: PathBuf,
}

impl ClusterLabArgs {
    fn options(self) -> Result<crate::lab::cluster::ClusterLabOptions> {
        Ok(crate::lab::cluster::ClusterLabOptions {
            prefix: self.prefix,
            dir: self.dir,
            nsfail: std::env::current_exe().context("locating the nsfail binary")?,
        })
    }
}

pub fn main() -> ExitCode {
    crate::logging::init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsfail: {}", one_line(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// Runs one command. Long because it is the CLI's table of commands: one short arm per
/// subcommand, kept in one match so that every command and what it sends is read in one place.
fn dispatch(cli: Cli) -> Result<()> {
    let json = cli.json;
    let socket = cli.socket.clone();
    // The answer's JSON text ("null" when there is none).
    let request = |command: Command| -> Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let resp: Response = rt.block_on(api::call(&socket, command))?;
        match resp {
            Response { ok: true, data, .. } => {
                Ok(data.map_or_else(|| "null".to_owned(), |d| d.get().to_owned()))
            }
            Response { error, .. } => Err(anyhow!(error.unwrap_or_else(|| "refused".into()))),
        }
    };
    let done = |what: String| {
        if json {
            println!("{}", json!({ "ok": true }));
        } else {
            println!("{what}");
        }
    };
    match cli.command {
        Cmd::Run { config, pins } => daemon::run(daemon::Options {
            config,
            socket: cli.socket,
            pins: Pins::new(pins),
        }),
        Cmd::Check { config, portable } => {
            let cfg = if portable {
                Config::load(&config)?
            } else {
                Config::load_for_host(&config)?
            };
            done(format!(
                "{}: ok ({} channels, {} encoders)",
                config.display(),
                cfg.channels.len(),
                cfg.encoders.len()
            ));
            Ok(())
        }
        Cmd::Status | Cmd::List => {
            let list = matches!(cli.command, Cmd::List);
            let data = request(Command::Status)?;
            if json {
                println!("{data}");
            } else {
                let status: Status = serde_json::from_str(&data)?;
                print!("{}", render_status(&status, list));
            }
            Ok(())
        }
        Cmd::Remap { channel, encoder } => {
            request(Command::Remap {
                channel: channel.clone(),
                encoder: encoder.clone(),
            })?;
            done(format!("{channel} -> {encoder}"));
            Ok(())
        }
        Cmd::Drain {
            host: Some(HostTarget::Host),
            ..
        } => {
            request(Command::DrainHost { drained: true })?;
            done(
                "host drained: its anycast routes withdrawn; it still forwards what arrives".into(),
            );
            Ok(())
        }
        Cmd::Undrain {
            host: Some(HostTarget::Host),
            ..
        } => {
            request(Command::DrainHost { drained: false })?;
            done("host undrained: its anycast routes announced again".into());
            Ok(())
        }
        Cmd::Drain {
            encoder: Some(encoder),
            ..
        } => {
            request(Command::Drain {
                encoder: encoder.clone(),
            })?;
            done(format!("{encoder} drained"));
            Ok(())
        }
        Cmd::Undrain {
            encoder: Some(encoder),
            ..
        } => {
            request(Command::Undrain {
                encoder: encoder.clone(),
            })?;
            done(format!("{encoder} undrained"));
            Ok(())
        }
        Cmd::Drain { .. } | Cmd::Undrain { .. } => {
            unreachable!("clap requires an encoder or `host`")
        }
        Cmd::Add(AddCmd::Channel(a)) => {
            let mut v = json!({ "name": a.name, "listen": a.listen, "encoders": a.encoders });
            for (k, val) in [
                ("port", a.port.map(|p| json!(p))),
                ("failback", a.failback.map(|f| json!(f))),
                ("protocol", a.protocol.map(|p| json!(p))),
                ("srt_peer_limit", a.srt_peer_limit.map(|l| json!(l))),
                ("sources", (!a.sources.is_empty()).then(|| json!(a.sources))),
            ] {
                if let Some(val) = val {
                    v[k] = val;
                }
            }
            let channel = serde_json::from_value(v).context("channel")?;
            request(Command::AddChannel { channel })?;
            done(format!("channel {} added", a.name));
            Ok(())
        }
        Cmd::Add(AddCmd::Encoder(a)) => {
            let mut v = json!({ "name": a.name, "address": a.address, "allow": a.allow });
            for (k, val) in [
                ("interface", a.interface),
                ("netns", a.netns),
                ("mac", a.mac),
            ] {
                if let Some(val) = val {
                    v[k] = json!(val);
                }
            }
            if let Some(port) = a.health_port {
                v["health"] = json!({ "kind": "udp", "port": port });
            }
            let encoder = serde_json::from_value(v).context("encoder")?;
            request(Command::AddEncoder { encoder })?;
            done(format!("encoder {} added", a.name));
            Ok(())
        }
        Cmd::Encoder(EncoderCmd::Spawn(a)) => {
            let (command, args) = a.command.split_first().expect("clap requires a command");
            let mut v = json!({
                "name": a.name,
                "address": a.address,
                "allow": a.allow,
                "spawn": { "command": command, "args": args },
                "health": match (a.health_port, srt_listener_port(&a.command)) {
                    (Some(port), _) => json!({ "kind": "udp", "port": port }),
                    // An SRT listener answers its own health check.
                    (None, Some(port)) => json!({ "kind": "srt", "port": port }),
                    (None, None) => json!({ "kind": "flow" }),
                },
            });
            if let Some(p) = a.prefix {
                v["prefix"] = json!(p);
            }
            if let Some(r) = a.restart {
                v["restart"] = json!(r);
            }
            let encoder = serde_json::from_value(v).context("encoder")?;
            request(Command::AddEncoder { encoder })?;
            done(format!("managed encoder {} spawned", a.name));
            Ok(())
        }
        Cmd::Remove(RemoveCmd::Channel { name }) => {
            request(Command::RemoveChannel { name: name.clone() })?;
            done(format!("channel {name} removed"));
            Ok(())
        }
        Cmd::Remove(RemoveCmd::Encoder { name }) => {
            request(Command::RemoveEncoder { name: name.clone() })?;
            done(format!("encoder {name} removed"));
            Ok(())
        }
        Cmd::Reload => {
            let data = request(Command::Reload)?;
            if json {
                println!("{data}");
            } else {
                let report: api::ReloadReport = serde_json::from_str(&data)?;
                if report.changes.is_empty() {
                    println!("reloaded: no changes");
                } else {
                    println!("reloaded: {}", report.changes.join(", "));
                }
                if !report.at_restart.is_empty() {
                    println!(
                        "changed in the file, applied at the next start: {}",
                        report.at_restart.join(", ")
                    );
                }
            }
            Ok(())
        }
        Cmd::Events { follow } => {
            let mut last: Option<Event> = None;
            loop {
                let events: Vec<Event> = serde_json::from_str(&request(Command::Events)?)?;
                // The ring may have rotated: continue after the last event printed.
                let start = match &last {
                    Some(l) => events.iter().position(|e| e == l).map_or(0, |i| i + 1),
                    None => 0,
                };
                for e in &events[start.min(events.len())..] {
                    if json {
                        println!("{}", serde_json::to_string(e)?);
                    } else {
                        println!("{}", render_event(e));
                    }
                }
                last = events.last().cloned().or(last);
                if !follow {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Cmd::Doctor { config, pins } => {
            let checks = doctor::run(config.as_deref(), &Pins::new(pins), &socket);
            for c in &checks {
                if json {
                    println!("{}", serde_json::to_string(c)?);
                } else {
                    println!("{}", c.line());
                }
            }
            let failed = checks.iter().filter(|c| c.failed()).count();
            if failed > 0 {
                return Err(anyhow!("{failed} of {} checks failed", checks.len()));
            }
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "nsfail", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Cmd::Teardown { pins } => {
            let removed = crate::daemon::teardown(&Pins::new(pins))?;
            let routes = match &removed.withdrawn {
                Some((table, addrs)) => {
                    format!(
                        "; {} announced route(s) withdrawn from table {table}",
                        addrs.len()
                    )
                }
                None => String::new(),
            };
            done(format!(
                "data plane detached and unpinned; {} managed encoder(s) stopped{routes}",
                removed.managed
            ));
            Ok(())
        }
        Cmd::Lab(LabCmd::Up) => {
            let info = labctl::up(&labctl::LabOptions::default())?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("lab up: namespaces {}", info.namespaces.join(", "));
                println!("config for the daemon: {}", info.config.display());
            }
            Ok(())
        }
        Cmd::Apply { config, prune } => crate::cluster::cli::apply(&config, prune, cli.json),
        Cmd::Cluster(ClusterCmd::Status { config }) => {
            crate::cluster::cli::status(&config, cli.json)
        }
        Cmd::Lab(LabCmd::Run) => lab_run(&cli.socket),
        Cmd::Lab(LabCmd::Down) => {
            labctl::down()?;
            done("lab removed".into());
            Ok(())
        }
        Cmd::Lab(LabCmd::Cluster(ClusterLabCmd::Up(args))) => {
            let info = crate::lab::cluster::up(&args.options()?)?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                print_cluster_lab(&info);
            }
            Ok(())
        }
        Cmd::Lab(LabCmd::Cluster(ClusterLabCmd::Down(args))) => {
            let opts = args.options()?;
            if crate::lab::cluster::down(&opts)? {
                done("cluster lab removed".into());
            } else {
                done(format!(
                    "no cluster lab is recorded in {}: nothing to remove",
                    opts.dir.display()
                ));
            }
            Ok(())
        }
        Cmd::Lab(LabCmd::Demo { seconds }) => crate::lab::demo::run(seconds),
        Cmd::Lab(LabCmd::Kill { encoder }) => {
            let p = labctl::kill(&encoder)?;
            done(format!(
                "killed {} (pid {}, kill -9); its namespace stays",
                p.name, p.pid
            ));
            Ok(())
        }
    }
}

/// The port of the first SRT listener URI (`srt://[HOST]:PORT?...mode=listener...`) among a
/// command's arguments (inside a shell line too).
fn srt_listener_port(command: &[String]) -> Option<u16> {
    command
        .iter()
        .flat_map(|arg| arg.split(['\'', '"', ' ']))
        .filter_map(|word| word.strip_prefix("srt://"))
        .filter(|rest| rest.contains("mode=listener"))
        .find_map(|rest| {
            let authority = rest.split(['?', '/']).next()?;
            authority.rsplit_once(':')?.1.parse().ok()
        })
}

/// What `lab cluster up` made, and how to look at it.
fn print_cluster_lab(info: &crate::lab::cluster::ClusterLabInfo) {
    use crate::lab::cluster::INGEST;
    println!("cluster lab up: namespaces {}", info.namespaces.join(", "));
    for c in &info.channels {
        println!(
            "channel {} on {} ({}), encoders {}",
            c.name,
            c.listen,
            c.protocol,
            c.encoders.join(", ")
        );
    }
    let h1 = &info.hosts[0];
    println!(
        "etcd at {}; the caller ({}) streams to {INGEST}, which the router ({}) spreads over \
         the hosts.\nLook at it (as root):",
        info.etcd, info.caller, info.router
    );
    for h in &info.hosts {
        println!(
            "  nsfail --socket {} status    # host {}",
            h.socket.display(),
            h.name
        );
    }
    println!(
        "  ip netns exec {} nsfail cluster status --config {}\n  \
         ip -n {} route show {INGEST}    # one next hop per host (ECMP)\n  \
         ls -l {}    # what each encoder received\n  \
         nsfail lab cluster down{}",
        h1.netns,
        h1.config.display(),
        info.router,
        info.dir.join("*.ts").display(),
        if info.dir == std::path::Path::new(paths::LAB_CLUSTER_DIR) {
            String::new()
        } else {
            format!(" --dir {}", info.dir.display())
        }
    );
}

/// The demo: lab up, daemon in the foreground (a child process, since the daemon moves into
/// the lab's ingest namespace), then everything removed.
fn lab_run(socket: &std::path::Path) -> Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};

    let info = labctl::up(&labctl::LabOptions::default())?;
    let outputs: Vec<String> = info
        .outputs
        .iter()
        .map(|(enc, file)| format!("{enc}: {}", file.display()))
        .collect();
    println!(
        "\nThe lab is up: a live test stream (ffmpeg testsrc, MPEG-TS over SRT) is sent from \
         namespace {} to {}:5000, channel cam1, on encoder enc-a.\n\
         In another terminal, as root:\n  \
         target/debug/nsfail status          # cam1's counters move; enc-a receives\n  \
         target/debug/nsfail remap cam1 enc-b\n  \
         target/debug/nsfail status          # now enc-b receives\n  \
         target/debug/nsfail remap cam1 enc-a\n  \
         target/debug/nsfail lab kill enc-a  # kill -9 of enc-a's SRT listener: cam1 fails over\n  \
         target/debug/nsfail events          # the failover and its switchover time\n  \
         ls -l {}   # each encoder's received stream\n\
         Ctrl-C here stops the daemon and removes the lab.\n",
        info.namespaces.get(1).map_or("nsf-src", String::as_str),
        crate::lab::INGEST4,
        info.dir.join("*.ts").display(),
    );
    println!("stream outputs: {}\n", outputs.join(", "));
    let exe = std::env::current_exe().context("locating the nsfail binary")?;
    // Ctrl-C goes to the whole foreground group: the daemon stops on it, this process waits
    // and then cleans up.
    // SAFETY: replacing the SIGINT disposition before any thread of ours handles signals.
    unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) }.context("ignoring SIGINT")?;
    let mut daemon = std::process::Command::new(exe)
        .arg("--socket")
        .arg(socket)
        .arg("run")
        .arg("--config")
        .arg(&info.config)
        .spawn();
    // Once the daemon is up: one allowed and one denied attempt from enc-a to the ingest
    // host, so that the egress policy shows in the counters.
    if let (Ok(_), Some(ea)) = (&daemon, info.namespaces.get(2)) {
        let ea = ea.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(3));
            let gateway = crate::lab::v4(1, 1);
            for port in [labctl::SERVICE_PORT, labctl::SERVICE_PORT + 1] {
                let target: std::net::SocketAddr =
                    format!("{gateway}:{port}").parse().expect("address");
                let outcome = crate::net::netns::in_netns(&ea, move || {
                    std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2))
                });
                let verdict = match outcome {
                    Ok(Ok(_)) => "connected (allowed by enc-a's allow-list)".to_owned(),
                    Ok(Err(e)) => {
                        format!("failed: {e} (dropped at enc-a's veth, counted in DROPS)")
                    }
                    Err(e) => format!("could not try: {e}"),
                };
                println!("demo: enc-a -> {target}/tcp: {verdict}");
            }
        });
    }
    let status = daemon
        .as_mut()
        .map_err(|e| anyhow!("{e}"))
        .and_then(|c| Ok(c.wait()?));
    let down = labctl::down();
    let teardown = Dataplane::teardown(&Pins::default());
    println!("lab removed (namespaces, processes), data plane detached and unpinned");
    down?;
    teardown?;
    let status = status.context("running the daemon")?;
    if !status.success() && status.code().is_some() {
        return Err(anyhow!("the daemon exited with {status}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::srt_listener_port;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_srt_listener_command_names_its_port() {
        let slt = args(&[
            "srt-live-transmit",
            "srt://:7000?mode=listener",
            "file://con",
        ]);
        assert_eq!(srt_listener_port(&slt), Some(7000));
        let shell = args(&[
            "sh",
            "-c",
            "exec ffmpeg -i 'srt://0.0.0.0:7100?mode=listener&passphrase=x' -f mpegts out.ts",
        ]);
        assert_eq!(srt_listener_port(&shell), Some(7100));
        let caller = args(&[
            "srt-live-transmit",
            "udp://:9000",
            "srt://10.0.0.1:7000?mode=caller",
        ]);
        assert_eq!(srt_listener_port(&caller), None);
        assert_eq!(srt_listener_port(&args(&["sleep", "600"])), None);
    }
}
