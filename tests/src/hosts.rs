//! Several ingest hosts in one machine, for the cluster tests (issue 17): namespaces wired by
//! veths, a router namespace that forwards, and the helpers they share.
//!
//! ```text
//!  cl 10.71.1.2 --- rt --- 10.71.2.2 ha [uplink ua] --- va/ea 10.71.5.2
//!                   |
//!                   +----- 10.71.3.2 hb [uplink ub] --- vb/eb 10.71.4.2
//! ```

use std::fs;

use nsfail::net::netns;

use crate::{ChildGuard, Entered, Netns, daemon::TempDir, ip_in, run, spawn_in};

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

/// A veth `a_if` in `a` to `b_if` in `b`, addressed `a_addr` and `b_addr` (/24), both up.
pub fn wire(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    ip_in(
        &a.name,
        &[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ],
    );
    ip_in(
        &a.name,
        &["addr", "add", &format!("{a_addr}/24"), "dev", a_if],
    );
    ip_in(
        &b.name,
        &["addr", "add", &format!("{b_addr}/24"), "dev", b_if],
    );
    ip_in(&a.name, &["link", "set", a_if, "up"]);
    ip_in(&b.name, &["link", "set", b_if, "up"]);
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

/// A host's BIRD: the announce table learned (routes other programs made in it), exported
/// to the router over BGP with BFD, nothing imported.
pub fn host_conf(dir: &TempDir, name: &str, me: &str, router: &str, bfd: &str) -> String {
    let log = dir.path.join(format!("{name}.log"));
    format!(
        r#"log "{log}" all;
router id {me};
protocol device {{ scan time 1; }}
protocol kernel announce {{
    kernel table {TABLE};
    learn;
    scan time 1;
    ipv4 {{ import all; export none; }};
}}
protocol bfd {{ interface "*" {{ {bfd} }}; }}
protocol bgp up {{
    local {me} as 65001;
    neighbor {router} as 65000;
    bfd on;
    hold time 3;
    connect delay time 1;
    connect retry time 1;
    error wait time 1, 2;
    ipv4 {{ import none; export where proto = "announce"; next hop self; }};
}}
"#,
        log = log.display()
    )
}

/// The router's BIRD: both hosts' routes imported and merged into one multipath kernel
/// route (ECMP).
/// `hosts`: (the router's address on the link, the host's address).
pub fn router_conf(dir: &TempDir, hosts: &[(&str, &str)], bfd: &str) -> String {
    let log = dir.path.join("r.log");
    let mut conf = format!(
        r#"log "{log}" all;
router id {router_id};
protocol device {{ scan time 1; }}
protocol kernel {{
    merge paths on;
    ipv4 {{ import none; export all; }};
}}
protocol bfd {{ interface "*" {{ {bfd} }}; }}
"#,
        log = log.display(),
        router_id = hosts.first().map_or("10.0.0.1", |h| h.0),
    );
    for (i, (local, host)) in hosts.iter().enumerate() {
        conf += &format!(
            r#"protocol bgp h{i} {{
    local {local} as 65000;
    neighbor {host} as 65001;
    bfd on;
    hold time 3;
    connect delay time 1;
    connect retry time 1;
    error wait time 1, 2;
    ipv4 {{ import all; export none; }};
}}
"#
        );
    }
    conf
}

pub fn bird(ns: &Netns, dir: &TempDir, name: &str, conf: &str) -> ChildGuard {
    let path = dir.path.join(format!("{name}.conf"));
    fs::write(&path, conf).unwrap();
    let sock = dir.path.join(format!("{name}.ctl"));
    let (path, sock) = (path.display().to_string(), sock.display().to_string());
    run("bird", &["-p", "-c", &path]);
    spawn_in(ns, "bird", &["-f", "-c", &path, "-s", &sock])
}
