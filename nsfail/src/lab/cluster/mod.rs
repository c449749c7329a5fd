//! `nsfail lab cluster up` / `down` (issue 17): a cluster of three ingest hosts in network
//! namespaces, each with its own daemon (own config, pin directory and control socket), its own
//! BIRD and two local encoders; an upstream router with BIRD (ECMP over the hosts, BFD); etcd;
//! and a caller sending a live UDP stream and a live SRT stream to the anycast ingest address.
//!
//! ```text
//!  {p}cl  c0 10.78.100.2 ── r-cl .1 ┐            ┌ up0 10.78.1.2  {p}h1 ── va/vb ── {p}h1a, {p}h1b
//!  {p}etcd et0 10.78.200.2 ─ r-et .1 ┤ {p}rt (BIRD) ┼ up0 10.78.2.2  {p}h2 ── va/vb ── {p}h2a, {p}h2b
//!                                   ┘            └ up0 10.78.3.2  {p}h3 ── va/vb ── {p}h3a, {p}h3b
//! ```
//!
//! Host `i`'s uplink is `10.78.i.0/24` (the router `.1`, the host `.2`), its encoders `a` and `b`
//! sit on `10.78.(10i+1).0/24` and `10.78.(10i+2).0/24` (the host `.1`, the encoder `.2`), and
//! the router routes those statically to the host. Channels (in etcd, written by `up`):
//! `cam-udp` on [`INGEST`]`:5000` over the `a` encoders, `cam-srt` on `:5001` over the `b`
//! encoders; the leader places each on one of them. Each host announces the ingest address in table
//! [`TABLE`]; the router spreads the caller's flows over the three by the L4 hash, and a host
//! that is not the active encoder's sends the flow on to that host (see README, "Across hosts").
//!
//! As with `nsfail lab up`, the record (`lab.json` in the lab's directory) is claimed before
//! anything is made and rewritten after each step; `down` stops exactly the recorded processes
//! (by PID, while the PID still names them), tears down the recorded pin directories (the
//! hosts' data planes, their announced routes, locks and records, and the router's own XDP
//! programs), deletes the recorded namespaces and removes the directory.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    Netns, bench_object, bird,
    ctl::{
        self, Builder, LabCtlError, LabProcess, Record, srt_receiver, test_stream, udp_echo,
        udp_receiver,
    },
    etcd, wire,
};
use crate::{
    config::{
        Channel, Cluster, Config, Encoder, Failback, Health, HealthKind, Ingest, Protocol, Restart,
    },
    dataplane::XdpMode,
    net::{netns, plumb},
    paths::{self, LabDir, Pins},
};

mod network;
mod start;

use self::{network::*, start::*};

type Result<T> = std::result::Result<T, LabCtlError>;

/// Ingest hosts in the lab.
pub const HOSTS: u8 = 3;
/// The anycast ingest address every host serves (TEST-NET-3: inside the lab only).
pub const INGEST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
/// `cam-udp`'s ingest port, and its encoders' port.
pub const UDP_PORT: u16 = 5000;
const UDP_ENCODER_PORT: u16 = 7000;
/// `cam-srt`'s ingest port, and its encoders' port.
pub const SRT_PORT: u16 = 5001;
const SRT_ENCODER_PORT: u16 = 7001;
/// Each encoder's UDP echo, for its host's health probes.
const ECHO_PORT: u16 = 9000;
/// The kernel table each host announces the ingest address in, for its BIRD to export.
pub const TABLE: u32 = 2345;
/// The cluster's name: its keys live under `/nsfail/lab/`.
const CLUSTER: &str = "lab";
/// BFD on every BGP session: 100 ms, down after 3 missed.
const BFD: &str = "min rx interval 100 ms; min tx interval 100 ms; multiplier 3;";
/// Every host's uplink (its ingest interface), in its own namespace.
const UPLINK: &str = "up0";
/// Where the caller's ffmpeg hands the SRT half of its stream to its SRT caller.
const RELAY: &str = "udp://127.0.0.1:9100";
const METRICS: &str = "127.0.0.1:9464";
/// How long `up` waits for etcd to answer, and for the router's route over every host.
const ETCD_WAIT: Duration = Duration::from_secs(15);
const ROUTE_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// `10.78.NET.HOST`: the lab's address plan (see the module's diagram).
const fn addr(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, net, host)
}

/// The uplink network of host `i` (1-based).
const fn uplink_net(i: u8) -> u8 {
    i
}

/// The network of encoder `j` (0 or 1) of host `i`.
const fn encoder_net(i: u8, j: u8) -> u8 {
    10 * i + 1 + j
}

const CALLER_NET: u8 = 100;
const ETCD_NET: u8 = 200;
/// On every link, the router's (or the host's, towards its encoders) side and the far side.
const NEAR: u8 = 1;
const FAR: u8 = 2;

fn v4(a: Ipv4Addr) -> [(IpAddr, u8); 1] {
    [(IpAddr::V4(a), 24)]
}

#[derive(Clone, Debug)]
pub struct ClusterLabOptions {
    /// Every namespace's and pin directory's name starts with this.
    pub prefix: String,
    /// The lab's own directory, removed whole by `down`.
    pub dir: PathBuf,
    /// The nsfail binary the hosts' daemons run.
    pub nsfail: PathBuf,
}

impl Default for ClusterLabOptions {
    fn default() -> Self {
        Self {
            prefix: "nsfc-".to_owned(),
            dir: PathBuf::from(paths::LAB_CLUSTER_DIR),
            nsfail: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nsfail")),
        }
    }
}

/// One ingest host of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLabHost {
    /// `h1`, `h2`, `h3`: its name in the cluster.
    pub name: String,
    pub netns: String,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pins: PathBuf,
    /// Its uplink address, the router's next hop for the ingest address through it.
    pub uplink: Ipv4Addr,
    /// Its encoders, `h1-a` and `h1-b`.
    pub encoders: Vec<String>,
}

/// One channel of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLabChannel {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: String,
    pub encoders: Vec<String>,
}

/// Everything a cluster lab is: what `up` made and `down` removes. Persisted as `lab.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLabInfo {
    pub dir: PathBuf,
    /// The router's namespace (`ip -n ROUTER route show 203.0.113.80` shows the ECMP route).
    pub router: String,
    /// The caller's namespace.
    pub caller: String,
    /// etcd's endpoint as the hosts reach it.
    pub etcd: String,
    pub hosts: Vec<ClusterLabHost>,
    pub channels: Vec<ClusterLabChannel>,
    /// Every namespace, in the order made.
    pub namespaces: Vec<String>,
    /// Every pin directory (the hosts' data planes, the router's XDP programs).
    pub pins: Vec<PathBuf>,
    pub processes: Vec<LabProcess>,
    /// Each encoder and the file its received stream grows in.
    pub outputs: Vec<(String, PathBuf)>,
}

impl Record for ClusterLabInfo {
    fn processes(&mut self) -> &mut Vec<LabProcess> {
        &mut self.processes
    }

    fn namespaces(&mut self) -> &mut Vec<String> {
        &mut self.namespaces
    }

    /// Tears down every recorded pin directory as `nsfail teardown` does: data plane, announced
    /// routes (while the host's namespace still exists), lock and records.
    fn release(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        self.pins
            .retain(|pins| match crate::daemon::teardown(&Pins::new(pins)) {
                Ok(_) => false,
                Err(e) => {
                    failures.push(format!("teardown of {}: {e:#}", pins.display()));
                    true
                }
            });
        failures
    }
}

/// Builds the cluster lab and starts everything in it; refuses if one is recorded already. On
/// failure, undoes what it did before returning the error.
pub fn up(opts: &ClusterLabOptions) -> Result<ClusterLabInfo> {
    ctl::check_prefix(&opts.prefix)?;
    for (tool, package) in [
        ("etcd", "etcd-server"),
        ("bird", "bird2"),
        ("socat", "socat"),
        ("ffmpeg", "ffmpeg"),
        ("srt-live-transmit", "srt-tools"),
    ] {
        ctl::require(tool, package)?;
    }
    let dir = LabDir::new(&opts.dir);
    let p = &opts.prefix;
    let info = ClusterLabInfo {
        dir: opts.dir.clone(),
        router: format!("{p}rt"),
        caller: format!("{p}cl"),
        etcd: format!("http://{}:{}", addr(ETCD_NET, FAR), etcd::PORT),
        hosts: (1..=HOSTS)
            .map(|i| {
                let name = format!("h{i}");
                ClusterLabHost {
                    netns: format!("{p}{name}"),
                    config: dir.host_config(&name),
                    socket: dir.socket(&name),
                    pins: paths::lab_pins(&format!("{p}{name}")),
                    uplink: addr(uplink_net(i), FAR),
                    encoders: vec![format!("{name}-a"), format!("{name}-b")],
                    name,
                }
            })
            .collect(),
        channels: Vec::new(),
        namespaces: Vec::new(),
        pins: Vec::new(),
        processes: Vec::new(),
        outputs: Vec::new(),
    };
    match ctl::claim(&dir, &info) {
        Err(LabCtlError::AlreadyUp) => return Err(LabCtlError::ClusterAlreadyUp),
        other => other?,
    }
    let mut builder = Builder {
        dir,
        info,
        children: Vec::new(),
    };
    match build(&mut builder, opts) {
        Ok(()) => Ok(builder.info),
        Err(cause) => Err(builder.undo(cause)),
    }
}

/// Removes the cluster lab recorded in `opts.dir`: stops its processes, tears down its pin
/// directories, deletes its namespaces and the directory. Returns `false` when none is
/// recorded (nothing is removed then). What resists stays recorded, so that a retry can finish.
pub fn down(opts: &ClusterLabOptions) -> Result<bool> {
    let dir = LabDir::new(&opts.dir);
    let Some(mut info) = ctl::load::<ClusterLabInfo>(&dir)? else {
        let strays = ctl::namespaces_with_prefix(&opts.prefix);
        if !strays.is_empty() {
            log::warn!(
                "no cluster lab is recorded in {}, so nothing is removed; namespaces {} exist \
                 (`ip netns del NAME` removes a leftover)",
                dir.root().display(),
                strays.join(", ")
            );
        }
        return Ok(false);
    };
    ctl::teardown(&dir, &mut info)?;
    Ok(true)
}

/// The cluster lab recorded in `opts.dir`, if any.
pub fn status(opts: &ClusterLabOptions) -> Result<Option<ClusterLabInfo>> {
    ctl::load(&LabDir::new(&opts.dir))
}

fn build(b: &mut Builder<ClusterLabInfo>, opts: &ClusterLabOptions) -> Result<()> {
    let p = &opts.prefix;
    let hosts = b.info.hosts.clone();
    let mut planned = vec![
        b.info.router.clone(),
        format!("{p}etcd"),
        b.info.caller.clone(),
    ];
    for h in &hosts {
        planned.push(h.netns.clone());
        planned.extend(["a", "b"].map(|e| format!("{}{e}", h.netns)));
    }
    for name in &planned {
        if paths::netns(name).exists() {
            return Err(LabCtlError::NamespaceExists(name.clone()));
        }
    }
    for name in &planned {
        let ns = Netns::new(name)?;
        b.info.namespaces.push(ns.keep());
        b.save()?;
    }
    let [rt, etcd_ns, cl] = [0, 1, 2].map(|i| planned[i].clone());
    network(&rt, &etcd_ns, &cl, &hosts)?;
    let router_pins = paths::lab_pins(&rt);
    b.info.pins.push(router_pins.clone());
    b.save()?;
    pass_xdp(&rt, &hosts, router_pins)?;

    start_etcd(b, &etcd_ns)?;
    start_encoders(b, &hosts)?;
    for h in &hosts {
        let config = host_config(h, &b.info.etcd);
        fs::write(&h.config, config)
            .map_err(ctl::io_err(format!("write {}", h.config.display())))?;
        b.info.pins.push(h.pins.clone());
        b.save()?;
        let daemon = [
            opts.nsfail.display().to_string(),
            "--socket".to_owned(),
            h.socket.display().to_string(),
            "run".to_owned(),
            "--config".to_owned(),
            h.config.display().to_string(),
            "--pins".to_owned(),
            h.pins.display().to_string(),
        ];
        // Started here: the daemon moves into its host's namespace itself (`ingest.netns`).
        let process = ctl::start(
            &b.dir,
            &mut b.children,
            &format!("{}-daemon", h.name),
            None,
            daemon.to_vec(),
            None,
        )?;
        b.info.processes.push(process);
        b.save()?;
    }
    start_birds(b, &rt, &hosts)?;
    wait_for_ecmp(b, &rt, &hosts)?;
    start_caller(b, &cl)?;
    b.settle()
}
