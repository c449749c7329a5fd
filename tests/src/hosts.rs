//! Several ingest hosts in one machine, for the cluster tests (issue 17): namespaces wired by
//! veths, a router namespace that forwards, and the helpers they share.
//!
//! ```text
//!  cl 10.71.1.2 --- rt --- 10.71.2.2 ha [uplink ua] --- va/ea 10.71.5.2
//!                   |
//!                   +----- 10.71.3.2 hb [uplink ub] --- vb/eb 10.71.4.2
//! ```

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use nsfail::{
    Dataplane, EncoderLink, EncoderSpec, XdpMode,
    net::{announce, netns},
};

use crate::{
    ChildGuard, Entered, Netns, PinDir,
    daemon::TempDir,
    ip_in, run, spawn_in,
    traffic::{Receiver, send_burst, spawn_burst},
    wait_for,
};

/// The kernel table the hosts announce the ingest addresses in.
pub const TABLE: u32 = 2345;

pub const INGEST: &str = "203.0.113.77";
pub const CALLER: &str = "10.71.1.2";
pub const EA: &str = "10.71.5.2";
pub const EB: &str = "10.71.4.2";

pub fn exec(ns: &Netns, args: &[&str]) {
    let mut full = vec!["netns", "exec", &ns.name];
    full.extend_from_slice(args);
    run("ip", &full);
}

pub fn sysctl(ns: &Netns, key: &str, value: &str) {
    exec(ns, &["sysctl", "-qw", &format!("{key}={value}")]);
}

/// A veth `a_if` in `a` to `b_if` in `b`, addressed `a_addr` and `b_addr` (/24), both up
/// ([`nsfail::lab::wire`]).
pub fn wire(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    let v4 = |addr: &str| [(addr.parse::<IpAddr>().expect("an address"), 24)];
    nsfail::lab::wire(&a.name, a_if, &v4(a_addr), &b.name, b_if, &v4(b_addr)).expect("wire");
}

pub fn gro_on(ns: &Netns, dev: &str) {
    exec(ns, &["ethtool", "-K", dev, "gro", "on"]);
}

pub fn mac(ns: &Netns, dev: &str) -> [u8; 6] {
    netns::link_in(Some(&ns.name), dev).unwrap().mac
}

/// The namespaces of the two-host lab, deleted on drop.
pub struct World {
    /// An XDP_PASS program on the router's side of A's uplink, held for the test.
    pub router_xdp: aya::Ebpf,
    pub cl: Netns,
    pub rt: Netns,
    pub ha: Netns,
    pub hb: Netns,
    pub ea: Netns,
    pub eb: Netns,
}

/// Puts an XDP_PASS program on `dev` in `ns`. veth schedules the receiving side of an XDP_TX
/// (the peer's NAPI) only when the peer has an XDP program of its own; with GRO alone the
/// frames wait in its ring (verified here: the host's `xdp_tx` counts them, the router never
/// sees them). A physical uplink has no such condition.
pub fn router_xdp(ns: &Netns, dev: &str) -> aya::Ebpf {
    let _in = Entered::new(ns);
    let mut obj = aya::Ebpf::load(nsfail::lab::bench_object::OBJECT).unwrap();
    let prog: &mut aya::programs::Xdp = obj.program_mut("bench_pass").unwrap().try_into().unwrap();
    prog.load().unwrap();
    prog.attach(dev, aya::programs::XdpMode::Driver).unwrap();
    obj
}

pub fn world(router_routes_ingest: bool) -> World {
    let (cl, rt, ha, hb, ea, eb) = (
        Netns::new("xcl"),
        Netns::new("xrt"),
        Netns::new("xha"),
        Netns::new("xhb"),
        Netns::new("xea"),
        Netns::new("xeb"),
    );
    sysctl(&rt, "net.ipv4.ip_forward", "1");
    // Replies leave B from the ingest address, which the router routes to A: anycast needs
    // loose or no reverse-path filtering upstream.
    sysctl(&rt, "net.ipv4.conf.all.rp_filter", "0");
    sysctl(&rt, "net.ipv4.conf.default.rp_filter", "0");
    for h in [&ha, &hb] {
        sysctl(h, "net.ipv4.ip_forward", "0");
    }
    wire(&rt, "rc", "10.71.1.1", &cl, "c0", CALLER);
    wire(&rt, "ra", "10.71.2.1", &ha, "ua", "10.71.2.2");
    wire(&rt, "rb", "10.71.3.1", &hb, "ub", "10.71.3.2");
    wire(&ha, "va", "10.71.5.1", &ea, "a0", EA);
    wire(&hb, "vb", "10.71.4.1", &eb, "b0", EB);
    // The caller's checksums complete, as from a wire.
    exec(&cl, &["ethtool", "-K", "c0", "tx", "off"]);
    // Frames XDP redirects into a veth reach the peer only with GRO on (or an XDP program)
    // there; frames it sends back out of a veth (XDP_TX, A's uplink) only with an XDP
    // program on the peer (`router_xdp`).
    gro_on(&rt, "rb");
    gro_on(&ea, "a0");
    gro_on(&eb, "b0");
    let router_xdp = router_xdp(&rt, "ra");
    ip_in(&cl.name, &["route", "add", "default", "via", "10.71.1.1"]);
    ip_in(&ha.name, &["route", "add", "default", "via", "10.71.2.1"]);
    ip_in(&hb.name, &["route", "add", "default", "via", "10.71.3.1"]);
    ip_in(&ea.name, &["route", "add", "default", "via", "10.71.5.1"]);
    ip_in(&eb.name, &["route", "add", "default", "via", "10.71.4.1"]);
    // The router: B's encoder network to host B, and (unless BGP will) the ingest address to
    // host A, as ECMP would for one flow.
    if router_routes_ingest {
        ip_in(&rt.name, &["route", "add", INGEST, "via", "10.71.2.2"]);
    }
    ip_in(
        &rt.name,
        &["route", "add", "10.71.4.0/24", "via", "10.71.3.2"],
    );
    World {
        router_xdp,
        cl,
        rt,
        ha,
        hb,
        ea,
        eb,
    }
}

/// A host's BIRD config (the product's, [`nsfail::lab::bird::host_conf`]), logging to
/// `dir/NAME.log`, announcing [`TABLE`].
pub fn host_conf(dir: &TempDir, name: &str, me: &str, router: &str, bfd: &str) -> String {
    let log = dir.path.join(format!("{name}.log"));
    nsfail::lab::bird::host_conf(&log, me, router, TABLE, bfd)
}

/// The router's BIRD config ([`nsfail::lab::bird::router_conf`]), logging to `dir/r.log`.
/// `hosts`: (the router's address on the link, the host's address).
pub fn router_conf(dir: &TempDir, hosts: &[(&str, &str)], bfd: &str) -> String {
    nsfail::lab::bird::router_conf(&dir.path.join("r.log"), hosts, bfd)
}

/// The anycast world's three BIRDs, configs and logs in `dir`: the router's (`r`, a BGP
/// session with BFD to each host over 10.71.2.0/24 and 10.71.3.0/24) and one per host (`ha`,
/// `hb`), exporting the announce table.
pub fn anycast_birds(
    rt: &Netns,
    ha: &Netns,
    hb: &Netns,
    dir: &TempDir,
    bfd: &str,
) -> [ChildGuard; 3] {
    let router = bird(
        rt,
        dir,
        "r",
        &router_conf(
            dir,
            &[("10.71.2.1", "10.71.2.2"), ("10.71.3.1", "10.71.3.2")],
            bfd,
        ),
    );
    let bird_a = bird(
        ha,
        dir,
        "ha",
        &host_conf(dir, "ha", "10.71.2.2", "10.71.2.1", bfd),
    );
    let bird_b = bird(
        hb,
        dir,
        "hb",
        &host_conf(dir, "hb", "10.71.3.2", "10.71.3.1", bfd),
    );
    [router, bird_a, bird_b]
}

pub fn bird(ns: &Netns, dir: &TempDir, name: &str, conf: &str) -> ChildGuard {
    let path = dir.path.join(format!("{name}.conf"));
    fs::write(&path, conf).unwrap();
    let sock = dir.path.join(format!("{name}.ctl"));
    let (path, sock) = (path.display().to_string(), sock.display().to_string());
    run("bird", &["-p", "-c", &path]);
    spawn_in(ns, "bird", &["-f", "-c", &path, "-s", &sock])
}

/// A local encoder `name` at `addr`, behind host-side veth `ifname` whose peer is `dev` in
/// `ns`.
pub fn local(name: &str, addr: &str, ns: &Netns, dev: &str, ifname: &str) -> EncoderSpec {
    EncoderSpec {
        name: name.into(),
        addr: addr.parse().unwrap(),
        mac: mac(ns, dev),
        link: EncoderLink::Local {
            ifname: ifname.into(),
        },
    }
}

/// An encoder on another host, reached through the routing table (its `mac` is not used).
pub fn routed(name: &str, addr: &str) -> EncoderSpec {
    EncoderSpec {
        name: name.into(),
        addr: addr.parse().unwrap(),
        mac: [0; 6],
        link: EncoderLink::Routed,
    }
}

/// Makes `addrs` the announced ingest addresses of the host in `ns` (its ingest on `dev`).
pub fn announce_in(ns: &Netns, dev: &str, addrs: &[&str]) {
    let _in = Entered::new(ns);
    let ifindex = netns::link(dev).unwrap().ifindex;
    let set: BTreeSet<IpAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    announce::sync(TABLE, ifindex, &set).unwrap();
}

/// The router's next hops for `addr` ([`nsfail::lab::bird::next_hops`]).
pub fn next_hops(r: &Netns, addr: &str) -> BTreeSet<String> {
    nsfail::lab::bird::next_hops(&r.name, addr)
        .expect("ip route show")
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// The two-host lab under anycast: both hosts' data planes serve the channel on
/// [`INGEST`]:5000, whose encoder is `eb` on host B (host A reaches it as a routed encoder, B
/// takes it in by its transit entry); both announce the ingest address through their BIRD to
/// the router's, which spreads flows over them by the L4 hash.
pub struct AnycastLab {
    pub a: Dataplane,
    pub b: Dataplane,
    pub rx: Receiver,
    pub bird_a: ChildGuard,
    _bird_b: ChildGuard,
    _router: ChildGuard,
    _pins: (PinDir, PinDir),
    pub w: World,
    _dir: TempDir,
}

/// What one freeze of host A did to each flow.
#[derive(Debug)]
pub struct FreezeRun {
    /// Flows the router sent through A before the freeze.
    pub via_a: BTreeSet<u32>,
    /// Per flow: packets sent, lost, whether its last 100 arrived, and its send interval.
    pub flows: Vec<FlowResult>,
    /// From the freeze to the router's route without A.
    pub withdrawn: Option<Duration>,
}

#[derive(Debug)]
pub struct FlowResult {
    pub flow: u32,
    pub lost: u32,
    pub tail_arrived: bool,
    /// The flow's mean interval between packets (what a lost packet is worth in time).
    pub interval: Duration,
}

pub const FLOWS: u32 = 12;
const PACKETS: u32 = 1500;

impl AnycastLab {
    /// `bfd`: the BIRD BFD options of every session.
    pub fn new(bfd: &str) -> Self {
        let dir = TempDir::new();
        let w = world(false);
        // ECMP by the L4 hash.
        sysctl(&w.rt, "net.ipv4.fib_multipath_hash_policy", "1");
        let channel = sa(INGEST, 5000);
        let pins = (PinDir::new(), PinDir::new());
        let a = {
            let _in = Entered::new(&w.ha);
            let mut dp = pins.0.open();
            dp.attach_ingest("ua", XdpMode::Native).unwrap();
            for spec in [routed("eb", EB), local("ea", EA, &w.ea, "a0", "va")] {
                dp.upsert_encoder(&spec).unwrap();
            }
            dp.set_channel(channel, 7000, "eb", &["eb", "ea"], false)
                .unwrap();
            dp
        };
        let b = {
            let _in = Entered::new(&w.hb);
            let mut dp = pins.1.open();
            dp.attach_ingest("ub", XdpMode::Native).unwrap();
            dp.upsert_encoder(&local("eb", EB, &w.eb, "b0", "vb"))
                .unwrap();
            dp.set_channel(channel, 7000, "eb", &["eb"], false).unwrap();
            dp.set_transit(channel, "eb").unwrap();
            dp
        };
        announce_in(&w.ha, "ua", &[INGEST]);
        announce_in(&w.hb, "ub", &[INGEST]);
        let [router, bird_a, bird_b] = anycast_birds(&w.rt, &w.ha, &w.hb, &dir, bfd);
        let both: BTreeSet<String> = ["10.71.2.2", "10.71.3.2"].map(String::from).into();
        let up = wait_for(Duration::from_secs(30), || {
            (next_hops(&w.rt, INGEST) == both).then_some(())
        });
        assert!(
            up.is_some(),
            "router's next hops {:?}; its log: {}",
            next_hops(&w.rt, INGEST),
            fs::read_to_string(dir.path.join("r.log")).unwrap_or_default()
        );
        let rx = Receiver::start(&w.eb, sa(EB, 7000));
        Self {
            a,
            b,
            rx,
            bird_a,
            _bird_b: bird_b,
            _router: router,
            _pins: pins,
            w,
            _dir: dir,
        }
    }

    /// Which flows (caller ports 41000 + flow) the router sends through A: A's channel counter
    /// moves for them. Each flow is answered, whichever host it goes through.
    pub fn flows_via_a(&self) -> BTreeSet<u32> {
        let channel = sa(INGEST, 5000);
        let mut via_a = BTreeSet::new();
        for f in 0..FLOWS {
            let before = self.a.channel_stats(channel).unwrap().packets;
            let r = send_burst(
                &self.w.cl,
                sa(CALLER, 41000 + f as u16),
                channel,
                f * 100_000..f * 100_000 + 10,
                Duration::from_millis(1),
                Duration::from_secs(2),
            );
            assert_eq!(r.seqs().len(), 10, "flow {f} answered");
            if self.a.channel_stats(channel).unwrap().packets > before {
                via_a.insert(f);
            }
        }
        via_a
    }

    /// All flows at once, 1,500 packets each at 1 per ms; 500 ms in, host A freezes: its BIRD
    /// stopped (SIGSTOP) and everything to and from it dropped at the router, the link up.
    /// Consumes the lab: a frozen host does not come back.
    pub fn freeze_a(mut self) -> FreezeRun {
        let via_a = self.flows_via_a();
        let channel = sa(INGEST, 5000);
        let start = 1000;
        let bursts: Vec<_> = (0..FLOWS)
            .map(|f| {
                spawn_burst(
                    &self.w.cl.name,
                    sa(CALLER, 41000 + f as u16),
                    channel,
                    f * 100_000 + start..f * 100_000 + start + PACKETS,
                    Duration::from_millis(1),
                    Duration::from_secs(2),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let frozen = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.bird_a.pid()),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        exec(
            &self.w.rt,
            &[
                "nft",
                "add table netdev freeze; add chain netdev freeze in { type filter hook \
                 ingress device \"ra\" priority 0; policy drop; }; add chain netdev freeze out \
                 { type filter hook egress device \"ra\" priority 0; policy drop; }",
            ],
        );
        let only_b: BTreeSet<String> = ["10.71.3.2"].map(String::from).into();
        let withdrawn = wait_for(Duration::from_secs(5), || {
            (next_hops(&self.w.rt, INGEST) == only_b).then(|| frozen.elapsed())
        });
        let sent: Vec<_> = bursts.into_iter().map(|b| b.join().unwrap()).collect();
        let seen = self.rx.settled();
        let flows = (0..FLOWS)
            .map(|f| {
                let range = f * 100_000 + start..f * 100_000 + start + PACKETS;
                let got = range.clone().filter(|s| seen.contains(s)).count() as u32;
                let tail = range
                    .clone()
                    .rev()
                    .take(100)
                    .filter(|s| seen.contains(s))
                    .count();
                FlowResult {
                    flow: f,
                    lost: PACKETS - got,
                    tail_arrived: tail == 100,
                    interval: sent[f as usize].sending / (PACKETS - 1),
                }
            })
            .collect();
        let _ = self.bird_a.child.kill();
        FreezeRun {
            via_a,
            flows,
            withdrawn,
        }
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}
