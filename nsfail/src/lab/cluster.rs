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
        fs::write(&h.config, config).map_err(io_err(format!("write {}", h.config.display())))?;
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
        // In the host's namespace: the daemon moves into its ingest namespace itself.
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

/// Links, addresses, routes and switches: the router forwards (ECMP by the L4 hash, no
/// reverse-path filter: replies leave the hosts from the anycast address), no host does.
fn network(rt: &str, etcd_ns: &str, cl: &str, hosts: &[ClusterLabHost]) -> Result<()> {
    sysctls(
        rt,
        &[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/fib_multipath_hash_policy", "1"),
        ],
    )?;
    for (ns, ifname, net) in [(cl, "c0", CALLER_NET), (etcd_ns, "et0", ETCD_NET)] {
        let near = addr(net, NEAR);
        wire(
            rt,
            &format!("r-{}", &ifname[..ifname.len() - 1]),
            &v4(near),
            ns,
            ifname,
            &v4(addr(net, FAR)),
        )?;
        default_route(ns, ifname, near)?;
    }
    // The caller's checksums complete, as from a wire.
    plumb::tx_checksum_off(cl, "c0").map_err(step(format!("tx offload off in {cl}")))?;
    for (h, i) in hosts.iter().zip(1..) {
        sysctls(&h.netns, &[("net/ipv4/ip_forward", "0")])?;
        let router_if = format!("r-{}", h.name);
        let near = addr(uplink_net(i), NEAR);
        wire(rt, &router_if, &v4(near), &h.netns, UPLINK, &v4(h.uplink))?;
        default_route(&h.netns, UPLINK, near)?;
        // What a host's XDP sends back out of its uplink, and its encoders' replies redirected
        // there, reach the router only with GRO on (and an XDP program, see `pass_xdp`).
        plumb::gro_on(rt, &router_if).map_err(step(format!("GRO on in {rt}")))?;
        for (j, letter) in [(0, 'a'), (1, 'b')] {
            let net = encoder_net(i, j);
            let enc_ns = format!("{}{letter}", h.netns);
            wire(
                &h.netns,
                &format!("v{letter}"),
                &v4(addr(net, NEAR)),
                &enc_ns,
                "e0",
                &v4(addr(net, FAR)),
            )?;
            default_route(&enc_ns, "e0", addr(net, NEAR))?;
            // XDP_REDIRECT into a veth delivers only when the receiving peer has GRO on.
            plumb::gro_on(&enc_ns, "e0").map_err(step(format!("GRO on in {enc_ns}")))?;
            netns::quicken_icmp_errors(&enc_ns)
                .map_err(step(format!("ICMP error rate limit in {enc_ns}")))?;
            let subnet = format!("{}/24", addr(net, 0));
            ctl_cmd(&[
                "-n",
                rt,
                "route",
                "add",
                &subnet,
                "via",
                &h.uplink.to_string(),
            ])?;
        }
    }
    Ok(())
}

fn sysctls(ns: &str, values: &[(&str, &str)]) -> Result<()> {
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| (format!("/proc/sys/{k}"), (*v).to_owned()))
        .collect();
    netns::in_netns(ns, move || {
        values.iter().try_for_each(|(k, v)| fs::write(k, v))
    })
    .and_then(|r| r)
    .map_err(step(format!("sysctls in {ns}")))
}

fn default_route(ns: &str, ifname: &str, gateway: Ipv4Addr) -> Result<()> {
    plumb::default_route(Some(ns), ifname, IpAddr::V4(gateway))
        .map_err(step(format!("default route via {gateway} in {ns}")))
}

fn ctl_cmd(args: &[&str]) -> Result<()> {
    super::cmd("ip", args).map(drop).map_err(LabCtlError::from)
}

fn step(what: String) -> impl FnOnce(std::io::Error) -> LabCtlError {
    move |source| LabCtlError::Io { what, source }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> LabCtlError {
    step(what)
}

/// An XDP_PASS program on the router's side of every uplink, pinned in `pins` (links, as a
/// data plane's are). veth wakes the receiver of a host's `XDP_TX` only when the receiver has
/// an XDP program (a physical uplink has no such condition), and a host refuses to route to
/// another host's encoder through a veth uplink whose peer has none.
fn pass_xdp(rt: &str, hosts: &[ClusterLabHost], pins: PathBuf) -> Result<()> {
    let ifaces: Vec<String> = hosts.iter().map(|h| format!("r-{}", h.name)).collect();
    let what = format!("XDP pass programs on the router's uplinks in {rt}");
    let attach = move || -> std::result::Result<(), String> {
        let pins = Pins::new(pins);
        crate::dataplane::ensure_bpffs(pins.root()).map_err(|e| e.to_string())?;
        fs::create_dir_all(pins.links()).map_err(|e| e.to_string())?;
        let mut obj = aya::Ebpf::load(bench_object::OBJECT).map_err(|e| e.to_string())?;
        let prog: &mut aya::programs::Xdp = obj
            .program_mut("bench_pass")
            .ok_or("no bench_pass program")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| e.to_string())?;
        for ifname in &ifaces {
            let id = prog
                .attach(ifname, aya::programs::XdpMode::Driver)
                .map_err(|e| format!("{ifname}: {e}"))?;
            let link: aya::programs::links::FdLink = prog
                .take_link(id)
                .map_err(|e| e.to_string())?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
            link.pin(pins.xdp_link(ifname))
                .map_err(|e| format!("pin {}: {e}", pins.xdp_link(ifname).display()))?;
        }
        Ok(())
    };
    netns::in_netns(rt, attach)
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|detail| LabCtlError::Start { name: what, detail })
}

/// etcd in its namespace, then the lab's channels written to it (as `nsfail apply` would).
fn start_etcd(b: &mut Builder<ClusterLabInfo>, ns: &str) -> Result<()> {
    let data = b.dir.etcd_data();
    b.spawn("etcd", ns, etcd::command(&data), None)?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, etcd::PORT));
    let begun = Instant::now();
    while netns::in_netns(ns, move || {
        TcpStream::connect_timeout(&local, Duration::from_millis(200))
    })
    .map_err(step(format!("enter {ns}")))?
    .is_err()
    {
        if begun.elapsed() > ETCD_WAIT {
            return Err(LabCtlError::Start {
                name: "etcd".to_owned(),
                detail: format!(
                    "no answer on port {} after {ETCD_WAIT:?}: {}",
                    etcd::PORT,
                    ctl::log_tail(&b.dir.log("etcd"))
                ),
            });
        }
        thread::sleep(POLL);
    }
    let channels = channels();
    b.info.channels = channels
        .iter()
        .map(|c| ClusterLabChannel {
            name: c.name.clone(),
            listen: c.listen,
            protocol: c.protocol.as_str().to_owned(),
            encoders: c.encoders.clone(),
        })
        .collect();
    b.save()?;
    let cluster = cluster("seed", &format!("http://{local}"));
    let apply = move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut client = crate::cluster::store::connect(&cluster).await?;
            crate::cluster::store::apply(&mut client, &cluster, &channels, false).await
        })
        .map(drop)
        .map_err(|e| format!("{e:#}"))
    };
    netns::in_netns(ns, apply)
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|detail| LabCtlError::Start {
            name: "the lab's channels in etcd".to_owned(),
            detail,
        })
}

/// The lab's channels: `cam-udp` over every host's `a` encoder, `cam-srt` over every `b`.
fn channels() -> Vec<Channel> {
    [
        ("cam-udp", UDP_PORT, UDP_ENCODER_PORT, Protocol::Udp, 'a'),
        ("cam-srt", SRT_PORT, SRT_ENCODER_PORT, Protocol::Srt, 'b'),
    ]
    .into_iter()
    .map(|(name, listen, port, protocol, letter)| Channel {
        name: name.into(),
        listen: SocketAddr::from((INGEST, listen)),
        encoders: (1..=HOSTS).map(|i| format!("h{i}-{letter}")).collect(),
        port: Some(port),
        failback: Failback::Manual,
        hold_down_ms: crate::config::DEFAULT_HOLD_DOWN_MS,
        protocol,
        sources: Vec::new(),
        srt_peer_limit: None,
    })
    .collect()
}

fn cluster(host: &str, endpoint: &str) -> Cluster {
    Cluster {
        name: CLUSTER.to_owned(),
        host: Some(host.to_owned()),
        etcd: vec![endpoint.to_owned()],
        lease_s: 1,
        announce_table: Some(TABLE),
    }
}

/// A host's daemon config: its uplink as the ingest interface, its two encoders (a UDP echo
/// answers each one's health probes), `[cluster]`; no channels (they live in etcd).
fn host_config(h: &ClusterLabHost, etcd: &str) -> String {
    let i: u8 = h.name[1..].parse().expect("hosts are named h1, h2, ...");
    let config = Config {
        ingest: Ingest {
            interface: UPLINK.to_owned(),
            xdp_mode: XdpMode::Native,
            metrics: METRICS.parse().expect("a socket address"),
            netns: Some(h.netns.clone()),
            log_level: None,
        },
        encoders: h
            .encoders
            .iter()
            .zip([('a', 0), ('b', 1)])
            .map(|(name, (letter, j))| Encoder {
                name: name.clone(),
                address: IpAddr::V4(addr(encoder_net(i, j), FAR)),
                interface: Some(format!("v{letter}")),
                netns: Some(format!("{}{letter}", h.netns)),
                mac: None,
                allow: Vec::new(),
                health: Health {
                    kind: HealthKind::Udp,
                    port: Some(ECHO_PORT),
                    rise: 3,
                    fall: 5,
                    ..Health::default()
                },
                spawn: None,
                restart: Restart::default(),
                env: Default::default(),
                prefix: None,
            })
            .collect(),
        channels: Vec::new(),
        daemon: Default::default(),
        cluster: Some(cluster(&h.name, etcd)),
    };
    format!(
        "# Host {} of the cluster lab, written by `nsfail lab cluster up`; `nsfail lab \
         cluster down` removes it.\n\n{}",
        h.name,
        config.to_toml()
    )
}

/// Each encoder's receiver (`a`: UDP on 7000, `b`: SRT listener on 7001; the stream goes to
/// its output file) and its health echo.
fn start_encoders(b: &mut Builder<ClusterLabInfo>, hosts: &[ClusterLabHost]) -> Result<()> {
    for h in hosts {
        for (name, letter) in h.encoders.iter().zip(['a', 'b']) {
            let ns = format!("{}{letter}", h.netns);
            let output = b.dir.output(name);
            fs::File::create(&output).map_err(io_err(format!("create {}", output.display())))?;
            b.info.outputs.push((name.clone(), output.clone()));
            let receiver = match letter {
                'a' => udp_receiver(UDP_ENCODER_PORT),
                _ => srt_receiver(SRT_ENCODER_PORT),
            };
            b.spawn(&format!("{name}-receiver"), &ns, receiver, Some(&output))?;
            b.spawn(&format!("{name}-echo"), &ns, udp_echo(ECHO_PORT), None)?;
        }
    }
    Ok(())
}

/// The router's BIRD and each host's.
fn start_birds(b: &mut Builder<ClusterLabInfo>, rt: &str, hosts: &[ClusterLabHost]) -> Result<()> {
    let peers: Vec<(String, String)> = hosts
        .iter()
        .zip(1..)
        .map(|(h, i)| (addr(uplink_net(i), NEAR).to_string(), h.uplink.to_string()))
        .collect();
    let peers: Vec<(&str, &str)> = peers.iter().map(|(r, h)| (&r[..], &h[..])).collect();
    let router = bird::router_conf(&b.dir.log("bird-router-routes"), &peers, BFD);
    let mut birds = vec![("router".to_owned(), rt.to_owned(), router)];
    for (h, (near, me)) in hosts.iter().zip(&peers) {
        let log = b.dir.log(&format!("bird-{}-routes", h.name));
        let conf = bird::host_conf(&log, me, near, TABLE, BFD);
        birds.push((h.name.clone(), h.netns.clone(), conf));
    }
    for (name, ns, conf) in birds {
        let path = b.dir.bird_config(&name);
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io_err(format!("write {}", path.display())))?;
        let cmdline = [
            "bird".to_owned(),
            "-f".to_owned(),
            "-c".to_owned(),
            path.display().to_string(),
            "-s".to_owned(),
            b.dir.bird_socket(&name).display().to_string(),
        ];
        b.spawn(&format!("bird-{name}"), &ns, cmdline.to_vec(), None)?;
    }
    Ok(())
}

/// Waits until the router's route to the ingest address has every host as a next hop: each
/// daemon is up, has the channels from etcd and announces, and each BGP session is up. A
/// process of the lab that exits meanwhile fails it at once.
fn wait_for_ecmp(
    b: &mut Builder<ClusterLabInfo>,
    rt: &str,
    hosts: &[ClusterLabHost],
) -> Result<()> {
    let all: Vec<IpAddr> = hosts.iter().map(|h| IpAddr::V4(h.uplink)).collect();
    let ingest = INGEST.to_string();
    let begun = Instant::now();
    loop {
        let hops = bird::next_hops(rt, &ingest)?;
        if hops == all {
            return Ok(());
        }
        b.exited()?;
        if begun.elapsed() > ROUTE_WAIT {
            return Err(LabCtlError::Start {
                name: "anycast".to_owned(),
                detail: format!(
                    "the router's next hops for {ingest} after {ROUTE_WAIT:?} are {hops:?}, not \
                     {all:?}; the daemons' and BIRDs' logs are in {}",
                    b.dir.root().display()
                ),
            });
        }
        thread::sleep(POLL);
    }
}

/// The caller: one live test picture, sent as plain UDP to `cam-udp` and through an SRT caller
/// to `cam-srt` (ffmpeg's tee muxer: one encode, two outputs).
fn start_caller(b: &mut Builder<ClusterLabInfo>, cl: &str) -> Result<()> {
    let relay = [
        "srt-live-transmit".to_owned(),
        "-a".to_owned(),
        "yes".to_owned(),
        "-q".to_owned(),
        RELAY.to_owned(),
        format!("srt://{INGEST}:{SRT_PORT}?mode=caller"),
    ];
    b.spawn("caller-srt", cl, relay.to_vec(), None)?;
    let outputs = format!(
        "[f=mpegts:onfail=ignore]udp://{INGEST}:{UDP_PORT}?pkt_size=1316|\
         [f=mpegts:onfail=ignore]{RELAY}?pkt_size=1316"
    );
    let ffmpeg = test_stream(&[
        "-map".to_owned(),
        "0:v".to_owned(),
        "-f".to_owned(),
        "tee".to_owned(),
        outputs,
    ]);
    b.spawn("caller-ffmpeg", cl, ffmpeg, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_config_reads_back_as_built() {
        let h = ClusterLabHost {
            name: "h2".into(),
            netns: "nsfc-h2".into(),
            config: "/l/h2.toml".into(),
            socket: "/l/h2.sock".into(),
            pins: "/sys/fs/bpf/nsfc-h2".into(),
            uplink: addr(2, FAR),
            encoders: vec!["h2-a".into(), "h2-b".into()],
        };
        let text = host_config(&h, "http://10.78.200.2:2379");
        let cfg = Config::parse(&text, "lab").expect("the host's config parses");
        assert_eq!(cfg.ingest.netns.as_deref(), Some("nsfc-h2"));
        assert_eq!(cfg.encoders[1].address.to_string(), "10.78.22.2");
        assert_eq!(cfg.encoders[1].netns.as_deref(), Some("nsfc-h2b"));
        let cluster = cfg.cluster.expect("[cluster]");
        assert_eq!(cluster.host.as_deref(), Some("h2"));
        assert_eq!(cluster.announce_table, Some(TABLE));
        assert!(cfg.channels.is_empty());
        let names: Vec<_> = channels().into_iter().map(|c| c.encoders).collect();
        assert_eq!(names[1], ["h1-b", "h2-b", "h3-b"]);
    }
}
