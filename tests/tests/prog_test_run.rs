//! BPF_PROG_TEST_RUN tables over the loaded XDP ingress and TC egress programs: each row an
//! input frame, the expected verdict, the exact expected output bytes and the reason counted.
//! Expected outputs are built from scratch (checksums computed over the whole header), never
//! with the incremental arithmetic under test.
//!
//! The TC program finds the encoder a packet leaves by the skb's ingress ifindex: rows run
//! without a context (ifindex 0) exercise the fail-open path of a veth without a policy; the
//! egress policy rows give the test run a `__sk_buff` naming the encoder's veth.

use std::net::{IpAddr, SocketAddr};

use aya::programs::{
    ProgramError, TestRun, TestRunOptions,
    links::{FdLink, PinnedLink},
};
use nsfail::{
    Dataplane, DataplaneError, EncoderLink, EncoderSpec, XdpMode,
    config::{AllowProto, AllowRule},
    dataplane::{ChannelOptions, EgressPolicy, HealthAnswers, SourcePrefix},
    net::netns,
};
use nsfail_common::{
    csum, rewrite,
    srt::{HANDSHAKE_TYPE_OFFSET, HS_CONCLUSION},
};
use nsfail_tests::{
    Entered, Netns, PinDir,
    frames::{Frame, arp, verify_udp},
    ip_in,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CH4: &str = "10.77.0.1:5000";
const CH6: &str = "[fd77::1]:5000";
const CH_REMOTE: &str = "10.77.0.1:6000";
const ENC4: &str = "10.77.1.2";
const ENC6: &str = "fd77:1::2";
const REMOTE4: &str = "10.77.0.9";
const SRC4: &str = "10.77.0.2:40000";
const SRC6: &str = "[fd77::2]:40000";
const ENC_PORT: u16 = 7000;
const REMOTE_MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
/// enc4's egress policy: its allow-list, and UDP health probes answered from port 9000.
const ENC4_ALLOW: [&str; 3] = [
    "10.77.9.1:443/tcp",
    "10.77.9.0/24:5000-5010/udp",
    "10.77.9.5/icmp",
];
const ENC4_HEALTH: u16 = 9000;
/// enc6's: one IPv6 service, and TCP health probes answered from port 9100.
const ENC6_ALLOW: [&str; 1] = ["[fd77:9::/64]:443/tcp"];
const ENC6_HEALTH: u16 = 9100;

/// A namespace with an ingest veth and two encoder veths, and a data plane attached in it;
/// enc4 and enc6 have egress policies, `remote` (no veth) has none.
struct Fixture {
    dp: Dataplane,
    pins: PinDir,
    _ns: Netns,
    _entered: Entered,
    ingest: netns::Link,
    enc4: (netns::Link, netns::Link),
    enc6: (netns::Link, netns::Link),
}

/// A veth pair `a`/`b` in namespace `ns`, both ends up and without addresses: no DAD, router
/// solicitation or MLD report can cross the attached programs while a row compares counters.
fn quiet_veth(ns: &str, a: &str, b: &str) {
    ip_in(ns, &["link", "add", a, "type", "veth", "peer", "name", b]);
    for end in [a, b] {
        ip_in(ns, &["link", "set", end, "addrgenmode", "none"]);
        ip_in(ns, &["link", "set", end, "up"]);
    }
}

fn policy(allow: &[&str], proto: AllowProto, port: u16) -> EgressPolicy {
    EgressPolicy {
        allow: allow
            .iter()
            .map(|r| r.parse::<AllowRule>().unwrap())
            .collect(),
        health: Some(HealthAnswers {
            proto,
            port,
            // The ingest host's address facing each encoder: where probes come from.
            prober: Some(if port == ENC4_HEALTH {
                "10.77.0.1".parse().unwrap()
            } else {
                "fd77::1".parse().unwrap()
            }),
        }),
    }
}

impl Fixture {
    fn new() -> Self {
        let ns = Netns::new("ptr");
        for (a, b) in [("ing", "ingp"), ("ve4", "ve4p"), ("ve6", "ve6p")] {
            quiet_veth(&ns.name, a, b);
        }
        let entered = Entered::new(&ns);
        let pins = PinDir::new();
        let mut dp = pins.open();
        dp.attach_ingest("ing", XdpMode::Native).expect("attach");
        let ingest = netns::link("ing").unwrap();
        let enc4 = (netns::link("ve4").unwrap(), netns::link("ve4p").unwrap());
        let enc6 = (netns::link("ve6").unwrap(), netns::link("ve6p").unwrap());
        for (name, addr, mac, link) in [
            (
                "enc4",
                ENC4,
                enc4.1.mac,
                EncoderLink::Local {
                    ifname: "ve4".into(),
                },
            ),
            (
                "enc6",
                ENC6,
                enc6.1.mac,
                EncoderLink::Local {
                    ifname: "ve6".into(),
                },
            ),
            ("remote", REMOTE4, REMOTE_MAC, EncoderLink::Remote),
        ] {
            dp.upsert_encoder(&EncoderSpec {
                name: name.into(),
                addr: addr.parse().unwrap(),
                mac,
                link,
            })
            .expect("encoder");
        }
        dp.set_channel(CH4.parse().unwrap(), ENC_PORT, "enc4", &["enc4"], true)
            .expect("channel v4");
        dp.set_channel(CH6.parse().unwrap(), ENC_PORT, "enc6", &["enc6"], false)
            .expect("channel v6");
        dp.set_channel(
            CH_REMOTE.parse().unwrap(),
            ENC_PORT,
            "remote",
            &["remote"],
            false,
        )
        .expect("channel remote");
        dp.set_policy("enc4", &policy(&ENC4_ALLOW, AllowProto::Udp, ENC4_HEALTH))
            .expect("enc4 policy");
        dp.set_policy("enc6", &policy(&ENC6_ALLOW, AllowProto::Tcp, ENC6_HEALTH))
            .expect("enc6 policy");
        Self {
            dp,
            pins,
            _ns: ns,
            _entered: entered,
            ingest,
            enc4,
            enc6,
        }
    }

    /// Runs one frame through the TC program as if it had arrived on interface `ifindex`:
    /// verdict and output bytes.
    fn tc_run_on(&self, ifindex: u32, input: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        // A `struct __sk_buff` (192 bytes) with `ingress_ifindex` (offset 36) and `ifindex`
        // (offset 40) set; a test run accepts these fields and wants the others zero.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; input.len() + 64];
        let res = self.dp.egress_program().test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Every TC outcome (`tc/REASON`) and every egress-policy drop of enc4 and enc6
    /// (`enc4/REASON`), so that a row can say exactly which one moved.
    fn tc_counters(&self) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .dp
            .tc_stats()
            .unwrap()
            .into_iter()
            .map(|(n, v)| (format!("tc/{n}"), v))
            .collect();
        for enc in ["enc4", "enc6"] {
            all.extend(
                self.dp
                    .encoder_drops(enc)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (format!("{enc}/{n}"), v)),
            );
        }
        all
    }

    /// The id of the TC link pinned for `ifname` (a re-attach would make a new link).
    fn tc_link_id(&self, ifname: &str) -> u32 {
        let pinned = PinnedLink::from_pin(self.pins.pins.tc_link(ifname)).expect("TC link pin");
        FdLink::from(pinned).info().expect("link info").id()
    }

    /// Runs one frame through the XDP (`xdp`) or TC program: verdict and output bytes.
    fn test_run(&self, xdp: bool, input: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; input.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let res = if xdp {
            self.dp.ingress_program().test_run(opts)
        } else {
            self.dp.egress_program().test_run(opts)
        }?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Panics unless SOURCES holds `src` as a source of channel `ch`.
    fn assert_learnt(&self, src: &str, ch: &str) {
        let learnt = self.dp.sources().unwrap();
        assert!(
            learnt
                .iter()
                .any(|s| s.peer == sa(src) && s.channel == sa(ch)),
            "{src} -> {ch} not learnt: {learnt:?}"
        );
    }

    fn stats(&self, xdp: bool) -> Vec<(&'static str, u64)> {
        if xdp {
            self.dp.xdp_stats().unwrap()
        } else {
            self.dp.tc_stats().unwrap()
        }
    }
}

/// One table row.
struct Row {
    name: String,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the output must equal the input.
    output: Option<Vec<u8>>,
    reason: &'static str,
}

impl Row {
    fn pass(name: impl Into<String>, input: Vec<u8>, reason: &'static str) -> Self {
        Self {
            name: name.into(),
            input,
            verdict: XDP_PASS,
            output: None,
            reason,
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Runs `rows` through a program; each row checks verdict, output bytes and the counter.
fn run_rows(fx: &Fixture, xdp: bool, rows: &[Row]) {
    for row in rows {
        let before = fx.stats(xdp);
        let (verdict, got) = fx
            .test_run(xdp, &row.input)
            .unwrap_or_else(|e| panic!("{}: test_run failed: {e}", row.name));
        assert_eq!(verdict, row.verdict, "{}: verdict", row.name);
        let want = row.output.as_ref().unwrap_or(&row.input);
        assert_eq!(got, *want, "{}: output bytes", row.name);
        let moved: Vec<_> = moved(&before, &fx.stats(xdp))
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(moved, vec![row.reason], "{}: counters that moved", row.name);
    }
}

/// The frame the XDP program must produce for a channel packet: addresses, port, TTL and MACs
/// rewritten, checksums from scratch, VLAN tag gone when redirected into a veth.
fn rewritten(input: &Frame, enc: &str, dmac: [u8; 6], smac: [u8; 6], keep_vlan: bool) -> Vec<u8> {
    let mut f = input.clone();
    f.dst = SocketAddr::new(enc.parse().unwrap(), ENC_PORT);
    f.ttl -= 1;
    f.dmac = dmac;
    f.smac = smac;
    if !keep_vlan {
        f.vlans.clear();
    }
    f.bytes()
}

#[test]
fn xdp_ingress_table() {
    let fx = Fixture::new();
    let payload: Vec<u8> = (0..188u32).map(|i| (i * 7) as u8).collect();
    let (ve4, ve4p) = fx.enc4;
    let (ve6, ve6p) = fx.enc6;
    let v4 = Frame::udp(sa(SRC4), sa(CH4), &payload);
    let v6 = Frame::udp(sa(SRC6), sa(CH6), &payload);
    let mut rows = Vec::new();

    rows.push(Row {
        name: "channel IPv4".into(),
        input: v4.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(rewritten(&v4, ENC4, ve4p.mac, ve4.mac, false)),
        reason: "redirected",
    });
    rows.push(Row {
        name: "channel IPv6".into(),
        input: v6.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(rewritten(&v6, ENC6, ve6p.mac, ve6.mac, false)),
        reason: "redirected",
    });
    let mut tagged = v4.clone();
    tagged.vlans = vec![100];
    rows.push(Row {
        name: "channel IPv4, VLAN tag (stripped into the veth)".into(),
        input: tagged.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(rewritten(&tagged, ENC4, ve4p.mac, ve4.mac, false)),
        reason: "redirected",
    });
    let mut zero = v4.clone();
    zero.zero_csum = true;
    rows.push(Row {
        name: "channel IPv4, UDP checksum 0 stays 0".into(),
        input: zero.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(rewritten(&zero, ENC4, ve4p.mac, ve4.mac, false)),
        reason: "redirected",
    });
    let mut opts = v4.clone();
    opts.options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, end
    rows.push(Row {
        name: "channel IPv4 with options".into(),
        input: opts.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(rewritten(&opts, ENC4, ve4p.mac, ve4.mac, false)),
        reason: "redirected",
    });
    let remote = Frame::udp(sa(SRC4), sa(CH_REMOTE), &payload);
    let mut remote_tagged = remote.clone();
    remote_tagged.vlans = vec![7];
    rows.push(Row {
        name: "channel to a remote encoder: XDP_TX, tag kept".into(),
        input: remote_tagged.bytes(),
        verdict: XDP_TX,
        output: Some(rewritten(
            &remote_tagged,
            REMOTE4,
            REMOTE_MAC,
            fx.ingest.mac,
            true,
        )),
        reason: "tx",
    });
    let jumbo_payload: Vec<u8> = (0..8972u32).map(|i| (i % 251) as u8).collect();
    let jumbo = Frame::udp(sa(SRC4), sa(CH4), &jumbo_payload);
    assert_eq!(jumbo.bytes().len(), 9014);
    rows.push(Row {
        name: "channel IPv4 jumbo 9000 B".into(),
        input: jumbo.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(rewritten(&jumbo, ENC4, ve4p.mac, ve4.mac, false)),
        reason: "redirected",
    });

    rows.push(Row::pass(
        "UDP to another port",
        Frame::udp(sa(SRC4), sa("10.77.0.1:5001"), &payload).bytes(),
        "pass_no_channel",
    ));
    rows.push(Row::pass(
        "UDP to another address",
        Frame::udp(sa(SRC4), sa("10.77.0.3:5000"), &payload).bytes(),
        "pass_no_channel",
    ));
    rows.push(Row::pass(
        "IPv6 UDP to another port",
        Frame::udp(sa(SRC6), sa("[fd77::1]:5001"), &payload).bytes(),
        "pass_no_channel",
    ));
    let mut opts_other = opts.clone();
    opts_other.dst = sa("10.77.0.1:5002");
    rows.push(Row::pass(
        "IPv4 with options, not a channel",
        opts_other.bytes(),
        "pass_no_channel",
    ));
    let mut tcp = v4.clone();
    tcp.proto = 6;
    rows.push(Row::pass(
        "TCP to the channel's address and port",
        tcp.bytes(),
        "pass_not_udp",
    ));
    let mut icmp = v4.clone();
    icmp.proto = 1;
    rows.push(Row::pass(
        "ICMP echo to the ingest address",
        icmp.bytes(),
        "pass_not_udp",
    ));
    rows.push(Row::pass(
        "ARP request",
        arp([2, 0, 0, 0, 0, 0xbb], [10, 77, 0, 2], [10, 77, 0, 1]),
        "pass_not_ip",
    ));
    let mut first = v4.clone();
    first.frag = 0x2000; // MF, offset 0
    rows.push(Row::pass("first fragment", first.bytes(), "pass_fragment"));
    let mut later = v4.clone();
    later.frag = 0x00b9; // offset 1480
    rows.push(Row::pass("later fragment", later.bytes(), "pass_fragment"));
    let mut ttl = v4.clone();
    ttl.ttl = 1;
    rows.push(Row::pass(
        "channel IPv4 with TTL 1",
        ttl.bytes(),
        "pass_ttl",
    ));
    let mut hop = v6.clone();
    hop.ttl = 1;
    rows.push(Row::pass(
        "channel IPv6 with hop limit 1",
        hop.bytes(),
        "pass_ttl",
    ));
    let mut ext = v6.clone();
    ext.hop_by_hop = true;
    rows.push(Row::pass(
        "IPv6 with an extension header",
        ext.bytes(),
        "pass_not_udp",
    ));
    let mut qinq = v4.clone();
    qinq.vlans = vec![10, 20];
    rows.push(Row::pass("two VLAN tags", qinq.bytes(), "pass_not_ip"));
    let mut bad_ihl = v4.bytes();
    bad_ihl[14] = 0x44; // IHL 4
    rows.push(Row::pass("IPv4 IHL below 5", bad_ihl, "pass_malformed"));
    let mut long_udp = v4.bytes();
    long_udp[38..40].copy_from_slice(&2000u16.to_be_bytes()); // UDP length beyond the packet
    rows.push(Row::pass(
        "UDP length beyond IP length",
        long_udp,
        "pass_malformed",
    ));
    rows.push(Row::pass(
        "Ethernet header only",
        v4.bytes()[..14].to_vec(),
        "pass_malformed",
    ));
    // Frames shorter than Ethernet, IPv4 and UDP headers together are still told apart by
    // what they are, not all called malformed.
    let mut lldp = v4.bytes()[..20].to_vec();
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    rows.push(Row::pass(
        "non-IP frame of 20 B",
        lldp.clone(),
        "pass_not_ip",
    ));
    let mut tagged_lldp = tagged.bytes()[..24].to_vec();
    tagged_lldp[16..18].copy_from_slice(&0x88ccu16.to_be_bytes());
    rows.push(Row::pass(
        "VLAN-tagged non-IP frame of 24 B",
        tagged_lldp,
        "pass_not_ip",
    ));
    let mut short_icmp = v4.bytes()[..38].to_vec();
    short_icmp[16..18].copy_from_slice(&24u16.to_be_bytes()); // IPv4 header and 4 bytes
    short_icmp[23] = 1; // ICMP
    rows.push(Row::pass("IPv4 ICMP of 38 B", short_icmp, "pass_not_udp"));
    let mut short_fragment = v4.bytes()[..40].to_vec();
    short_fragment[20..22].copy_from_slice(&0x2000u16.to_be_bytes()); // MF
    rows.push(Row::pass(
        "IPv4 UDP first fragment of 40 B",
        short_fragment,
        "pass_fragment",
    ));

    // Truncated at every byte up to the end of the UDP header, for each kind of channel frame.
    for (kind, frame, l4_end) in [
        ("IPv4", v4.bytes(), 14 + 20 + 8),
        ("VLAN IPv4", tagged.bytes(), 18 + 20 + 8),
        ("IPv4 options", opts.bytes(), 14 + 28 + 8),
        ("IPv6", v6.bytes(), 14 + 40 + 8),
    ] {
        for len in (14..l4_end).chain([l4_end + 1, frame.len() - 1]) {
            rows.push(Row::pass(
                format!("{kind} truncated to {len} B"),
                frame[..len].to_vec(),
                "pass_malformed",
            ));
        }
    }
    run_rows(&fx, true, &rows);

    // The kernel refuses frames shorter than an Ethernet header before the program sees them.
    assert!(fx.test_run(true, &[]).is_err(), "zero-length frame");
}

/// Source learning on one CPU: each frame's source is compared with the last one that CPU
/// learned for the channel, and a different one is written to SOURCES at once (the same one
/// only once a second). Each source below differs from the one before on its channel in one
/// part only (the port, one address byte, one word of an IPv6 address), so a comparison that
/// missed that part would leave it unlearnt, and replies to it would be refused. The
/// sequence must take less than the once-a-second refresh, or it would prove nothing.
#[test]
fn every_new_source_is_learnt_at_once_on_one_cpu() {
    let fx = Fixture::new();
    // One CPU (the one this thread is on), so that every frame meets the last-source slot
    // the one before it wrote; the thread's own affinity is given back at the end.
    let me = nix::unistd::Pid::from_raw(0);
    let before = nix::sched::sched_getaffinity(me).expect("affinity");
    let here = nix::sched::sched_getcpu().expect("CPU");
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(here).expect("this CPU");
    nix::sched::sched_setaffinity(me, &cpu).expect("pinning");
    let started = std::time::Instant::now();
    let payload: Vec<u8> = (0..64u32).map(|i| i as u8).collect();
    let sequence = [
        (SRC4, CH4),
        ("10.77.0.2:40001", CH4),
        ("10.77.0.3:40001", CH4),
        ("11.77.0.3:40001", CH4),
        ("11.77.0.3:40002", CH4),
        // Each IPv6 one differs from the one before in one 4-byte word of the address:
        // the fourth, third, second and first, then in the port.
        (SRC6, CH6),
        ("[fd77::3]:40000", CH6),
        ("[fd77::1:0:0:3]:40000", CH6),
        ("[fd77:0:0:1:1::3]:40000", CH6),
        ("[fd77:1:0:1:1::3]:40000", CH6),
        ("[fd77:1:0:1:1::3]:40001", CH6),
    ];
    let mut seen = Vec::new();
    for (src, ch) in sequence {
        let input = Frame::udp(sa(src), sa(ch), &payload).bytes();
        assert_eq!(
            fx.test_run(true, &input).unwrap().0,
            XDP_REDIRECT,
            "{src} -> {ch}"
        );
        fx.assert_learnt(src, ch);
        seen.push((sa(src), sa(ch)));
    }
    let took = started.elapsed();
    nix::sched::sched_setaffinity(me, &before).expect("unpinning");
    assert!(
        took < std::time::Duration::from_millis(900),
        "the sequence took {took:?}: the once-a-second refresh may have learnt the sources"
    );
    // Nothing learnt that was not sent.
    for s in fx.dp.sources().unwrap() {
        assert!(seen.contains(&(s.peer, s.channel)), "learnt {s:?}");
    }
}

/// A channel whose encoder's veth is gone: the kernel removed the encoder's DEVMAP slot with
/// the device, so the redirect helper refuses and the frame passes to the host untouched,
/// counted `pass_no_device` (no channel or encoder counter moves: it was not forwarded).
/// Checked on each parse the program has (the plain frame, a VLAN tag, IP options, IPv6),
/// first redirected while the veths are there.
#[test]
fn a_channel_whose_encoder_veth_is_gone_passes_untouched() {
    let mut fx = Fixture::new();
    let ns = fx._ns.name.clone();
    quiet_veth(&ns, "vg", "vgp");
    quiet_veth(&ns, "vg6", "vg6p");
    let (vg, vgp) = (netns::link("vg").unwrap(), netns::link("vgp").unwrap());
    let (vg6, vg6p) = (netns::link("vg6").unwrap(), netns::link("vg6p").unwrap());
    for (name, addr, mac, ifname) in [
        ("gone", "10.77.1.7", vgp.mac, "vg"),
        ("gone6", "fd77:1::7", vg6p.mac, "vg6"),
    ] {
        fx.dp
            .upsert_encoder(&EncoderSpec {
                name: name.into(),
                addr: addr.parse().unwrap(),
                mac,
                link: EncoderLink::Local {
                    ifname: ifname.into(),
                },
            })
            .expect("encoder");
    }
    let (ch, ch6) = ("10.77.0.1:5100", "[fd77::1]:5100");
    fx.dp
        .set_channel(sa(ch), 5100, "gone", &["gone"], false)
        .expect("channel");
    fx.dp
        .set_channel(sa(ch6), 5100, "gone6", &["gone6"], false)
        .expect("channel v6");
    let payload: Vec<u8> = (0..188u32).map(|i| (i * 3) as u8).collect();
    let plain = Frame::udp(sa(SRC4), sa(ch), &payload);
    let mut tagged = plain.clone();
    tagged.vlans = vec![100];
    let mut options = plain.clone();
    options.options = vec![0x94, 0x04, 0, 0];
    let v6 = Frame::udp(sa(SRC6), sa(ch6), &payload);
    let frames = [
        ("plain", plain, "10.77.1.7", (vg.mac, vgp.mac)),
        ("VLAN tag", tagged, "10.77.1.7", (vg.mac, vgp.mac)),
        ("IP options", options, "10.77.1.7", (vg.mac, vgp.mac)),
        ("IPv6", v6, "fd77:1::7", (vg6.mac, vg6p.mac)),
    ];
    let mut rows = Vec::new();
    for (what, f, enc, (host, peer)) in &frames {
        let mut want = f.clone();
        want.dst = SocketAddr::new(enc.parse().unwrap(), 5100);
        want.ttl -= 1;
        want.dmac = *peer;
        want.smac = *host;
        want.vlans.clear();
        rows.push(Row {
            name: format!("{what}, veth there"),
            input: f.bytes(),
            verdict: XDP_REDIRECT,
            output: Some(want.bytes()),
            reason: "redirected",
        });
    }
    run_rows(&fx, true, &rows);

    ip_in(&ns, &["link", "del", "vg"]);
    ip_in(&ns, &["link", "del", "vg6"]);
    let rows: Vec<Row> = frames
        .iter()
        .map(|(what, f, _, _)| Row::pass(format!("{what}, veth gone"), f.bytes(), "pass_no_device"))
        .collect();
    let counters = |fx: &Fixture| {
        (
            fx.dp.channel_stats(sa(ch)).expect("channel stats"),
            fx.dp.channel_stats(sa(ch6)).expect("channel stats v6"),
            fx.dp.encoder_stats("gone").expect("encoder stats").rx,
            fx.dp.encoder_stats("gone6").expect("encoder stats v6").rx,
        )
    };
    let before = counters(&fx);
    run_rows(&fx, true, &rows);
    assert_eq!(
        counters(&fx),
        before,
        "channel or encoder counters moved for frames that passed"
    );
}

/// A random sample of channel packets through the loaded XDP program: the output is exactly
/// the input with the MACs replaced and `nsfail_common::rewrite` applied to its headers (the
/// function the host property tests in `nsfail-common/tests/csum.rs` check), and its
/// checksums verify from scratch. One case in eight is built so that the UDP checksum updates
/// to 0 and must go out as all ones; one IPv4 case in eight has no UDP checksum.
#[test]
fn xdp_rewrite_is_the_tested_rewrite_on_random_frames() {
    const CASES: u64 = 400;
    let fx = Fixture::new();
    let mut rng = StdRng::seed_from_u64(0x6e73_6661_696c_0018);
    let mut all_ones = 0;
    for case in 0..CASES {
        let v6 = case % 2 == 1;
        let (channel, enc, (host, peer)) = if v6 {
            (sa(CH6), ENC6.parse().unwrap(), fx.enc6)
        } else {
            (sa(CH4), ENC4.parse().unwrap(), fx.enc4)
        };
        let src = if v6 {
            SocketAddr::new(IpAddr::V6(rng.random::<u128>().into()), rng.random())
        } else {
            SocketAddr::new(IpAddr::V4(rng.random::<u32>().into()), rng.random())
        };
        let len = rng.random_range(2..1400);
        let mut payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let to_zero = case % 8 < 2;
        if to_zero {
            // The first payload word that makes the rewritten packet's checksum compute to
            // 0: the from-scratch checksum over it with that word zeroed.
            payload[..2].fill(0);
            let mut udp = Frame::udp(src, SocketAddr::new(enc, ENC_PORT), &payload).bytes();
            let l4 = udp.len() - payload.len() - 8;
            udp.drain(..l4);
            udp[6..8].fill(0);
            let c = csum::udp_checksum(&ip_octets(src.ip()), &ip_octets(enc), &udp);
            payload[..2].copy_from_slice(&c.to_be_bytes());
        }
        let mut frame = Frame::udp(src, channel, &payload);
        frame.ttl = rng.random_range(2..=255);
        if !v6 {
            frame.options = (0..4 * rng.random_range(0..=10))
                .map(|_| rng.random())
                .collect();
            frame.zero_csum = case % 8 == 4;
        }
        let input = frame.bytes();
        let (verdict, out) = fx
            .test_run(true, &input)
            .unwrap_or_else(|e| panic!("case {case}: test_run: {e}"));
        assert_eq!(verdict, XDP_REDIRECT, "case {case}: verdict");

        let mut want = input.clone();
        want[..6].copy_from_slice(&peer.mac);
        want[6..12].copy_from_slice(&host.mac);
        let l4 = 14 + if v6 { 40 } else { 20 + frame.options.len() };
        let (ip, udp) = want.split_at_mut(l4);
        let udp: &mut [u8; rewrite::UDP_LEN] = (&mut udp[..8]).try_into().unwrap();
        let computed = match enc {
            IpAddr::V4(a) => rewrite::ipv4(
                (&mut ip[14..34]).try_into().unwrap(),
                udp,
                a.octets(),
                ENC_PORT,
            ),
            IpAddr::V6(a) => Some(rewrite::ipv6(
                (&mut ip[14..54]).try_into().unwrap(),
                udp,
                &a.octets(),
                ENC_PORT,
            )),
        };
        assert_eq!(
            out, want,
            "case {case}: the program's rewrite is not the tested one"
        );
        verify_udp(&out).unwrap_or_else(|e| panic!("case {case}: {e}"));
        if to_zero {
            assert_eq!(computed, Some(0), "case {case}: built to update to 0");
            assert_eq!(
                out[l4 + 6..l4 + 8],
                [0xff, 0xff],
                "case {case}: sent as all ones"
            );
            all_ones += 1;
        }
        if frame.zero_csum {
            assert_eq!(
                out[l4 + 6..l4 + 8],
                [0, 0],
                "case {case}: no checksum stays none"
            );
        }
    }
    assert_eq!(all_ones, CASES / 4);
}

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Without a context the skb's ingress ifindex is 0, which names no encoder: the fail-open
/// path of a veth without a policy.
#[test]
fn tc_egress_table() {
    let fx = Fixture::new();
    let payload: Vec<u8> = (0..100u32).map(|i| i as u8).collect();
    let (_, ve4p) = fx.enc4;
    let (_, ve6p) = fx.enc6;

    // Sources become known by sending to the channel through XDP.
    for (src, ch) in [(SRC4, CH4), (SRC6, CH6)] {
        let input = Frame::udp(sa(src), sa(ch), &payload).bytes();
        assert_eq!(fx.test_run(true, &input).unwrap().0, XDP_REDIRECT);
    }
    fx.assert_learnt(SRC4, CH4);
    fx.assert_learnt(SRC6, CH6);

    let enc4_ep = SocketAddr::new(ENC4.parse().unwrap(), ENC_PORT);
    let enc6_ep = SocketAddr::new(ENC6.parse().unwrap(), ENC_PORT);
    let reply = |from: SocketAddr, to: &str, mac: [u8; 6]| {
        let mut f = Frame::udp(from, sa(to), &payload);
        f.smac = mac;
        f
    };
    let restored = |f: &Frame, ingest: &str| {
        let mut g = f.clone();
        g.src = sa(ingest);
        g.bytes()
    };
    let r4 = reply(enc4_ep, SRC4, ve4p.mac);
    let r6 = reply(enc6_ep, SRC6, ve6p.mac);
    let mut r4_zero = r4.clone();
    r4_zero.zero_csum = true;
    let mut rows = vec![
        Row {
            name: "IPv4 reply to the source".into(),
            input: r4.bytes(),
            verdict: TC_ACT_REDIRECT,
            output: Some(restored(&r4, CH4)),
            reason: "reply_redirected",
        },
        Row {
            name: "IPv6 reply to the source".into(),
            input: r6.bytes(),
            verdict: TC_ACT_REDIRECT,
            output: Some(restored(&r6, CH6)),
            reason: "reply_redirected",
        },
        Row {
            name: "IPv4 reply, UDP checksum 0 stays 0".into(),
            input: r4_zero.bytes(),
            verdict: TC_ACT_REDIRECT,
            output: Some(restored(&r4_zero, CH4)),
            reason: "reply_redirected",
        },
    ];
    let mut pass = |name: &str, input: Vec<u8>, reason: &'static str| {
        rows.push(Row {
            name: name.into(),
            input,
            verdict: TC_ACT_OK,
            output: None,
            reason,
        })
    };
    pass(
        "reply to a peer that never sent to the channel",
        reply(enc4_ep, "10.77.0.50:40000", ve4p.mac).bytes(),
        "pass_unknown_peer",
    );
    pass(
        "reply to the source's other port",
        reply(enc4_ep, "10.77.0.2:40001", ve4p.mac).bytes(),
        "pass_unknown_peer",
    );
    pass(
        "UDP from another encoder port",
        reply(sa("10.77.1.2:7001"), SRC4, ve4p.mac).bytes(),
        "pass_no_channel",
    );
    let mut tcp = r4.clone();
    tcp.proto = 6;
    pass("TCP from the encoder", tcp.bytes(), "pass_other");
    pass(
        "ARP from the encoder",
        arp(ve4p.mac, [10, 77, 1, 2], [10, 77, 1, 1]),
        "pass_other",
    );
    let mut frag = r4.clone();
    frag.frag = 0x2000;
    pass("fragmented reply", frag.bytes(), "pass_malformed");
    // Shorter IPv4 skbs are refused by the kernel's test-run itself (checked below).
    for len in [34, 38, 40, 41] {
        pass(
            &format!("IPv4 reply truncated to {len} B"),
            r4.bytes()[..len].to_vec(),
            "pass_malformed",
        );
    }
    run_rows(&fx, false, &rows);
    assert!(
        fx.test_run(false, &r4.bytes()[..20]).is_err(),
        "20-byte IPv4 skb"
    );
    // Replies that are not the listener's answer to a conclusion handshake add no SRT caller
    // (issue 13: a spoofed caller never gets that far).
    assert_eq!(
        fx.dp.srt_peers().unwrap(),
        vec![],
        "no caller from data replies"
    );
    // The SRT channel (CH4) learns its caller's socket ID from the listener's conclusion: the
    // Destination Socket ID, bytes 12..16 of the UDP payload; the plain channel (CH6) does not.
    for (from, to, mac) in [(enc4_ep, SRC4, ve4p.mac), (enc6_ep, SRC6, ve6p.mac)] {
        let mut f = Frame::udp(from, sa(to), &srt_handshake(HS_CONCLUSION, 0x0c0d_0e0f));
        f.smac = mac;
        assert_eq!(fx.test_run(false, &f.bytes()).unwrap().0, TC_ACT_REDIRECT);
    }
    let peers = fx.dp.srt_peers().unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(
        (peers[0].channel, peers[0].peer, peers[0].socket_id),
        (sa(CH4), sa(SRC4), u32::from_be_bytes([12, 13, 14, 15]))
    );
    let tx = fx.dp.encoder_stats("enc4").unwrap().tx;
    assert_eq!(tx.packets, 3, "enc4 replies counted");
}

/// One row of an egress policy table: a frame leaving an encoder's veth.
struct PolicyRow {
    name: String,
    /// The interface the frame arrives on (the skb's ingress ifindex).
    ifindex: u32,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the output must equal the input.
    output: Option<Vec<u8>>,
    /// The one counter that must move: `tc/REASON` or `ENCODER/DROP_REASON`.
    counter: &'static str,
}

/// Runs `rows` through the TC program; each row checks verdict, output bytes and that exactly
/// its counter moved, by exactly one.
fn run_policy_rows(fx: &Fixture, rows: &[PolicyRow]) {
    for row in rows {
        let before = fx.tc_counters();
        let (verdict, got) = fx
            .tc_run_on(row.ifindex, &row.input)
            .unwrap_or_else(|e| panic!("{}: test_run failed: {e}", row.name));
        assert_eq!(verdict, row.verdict, "{}: verdict", row.name);
        let want = row.output.as_ref().unwrap_or(&row.input);
        assert_eq!(got, *want, "{}: output bytes", row.name);
        let moved = moved(&before, &fx.tc_counters());
        let moved: Vec<_> = moved.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        assert_eq!(moved, vec![(row.counter, 1)], "{}: counters", row.name);
    }
}

fn packet(proto: u8, src: &str, dst: &str) -> Frame {
    let mut f = Frame::udp(sa(src), sa(dst), &[0x5a; 32]);
    f.proto = proto;
    f
}

/// An ICMP error (`icmp_type`, `code`) from `from` to `to` that quotes the IP and transport
/// headers of `quoted` (a frame from `to`), as the kernel of a host without a listener
/// sends. The programs do not check ICMP checksums.
fn icmp_error(icmp_type: u8, code: u8, from: &str, to: &str, quoted: &Frame) -> Vec<u8> {
    let v6 = quoted.dst.is_ipv6();
    let (quote_len, l4) = if v6 {
        (40 + 8, 14 + 40)
    } else {
        (20 + quoted.options.len() + 8, 14 + 20)
    };
    let (from, to) = if v6 {
        (format!("[{from}]:0"), format!("[{to}]:0"))
    } else {
        (format!("{from}:0"), format!("{to}:0"))
    };
    let mut f = packet(if v6 { 58 } else { 1 }, &from, &to);
    f.payload = quoted.bytes()[14..14 + quote_len].to_vec();
    // The frame's ICMP header (an echo request's, then 4 bytes of ids) becomes the error's:
    // type, code, checksum, unused.
    let mut b = f.bytes();
    b[l4..l4 + 8].copy_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    b
}

/// An ICMPv6 message of `icmp_type` (the frame's ICMP type byte rewritten; the programs do
/// not check ICMP checksums).
fn icmp6(icmp_type: u8, src: &str, dst: &str) -> Vec<u8> {
    // The hop limit the RFCs require: 255 for neighbour discovery, 1 for MLD.
    let hops = match icmp_type {
        133..=137 => 255,
        130..=132 | 143 => 1,
        _ => 64,
    };
    icmp6_hops(icmp_type, src, dst, hops)
}

/// [`icmp6`] with this hop limit.
fn icmp6_hops(icmp_type: u8, src: &str, dst: &str, hops: u8) -> Vec<u8> {
    let mut f = packet(58, &format!("[{src}]:0"), &format!("[{dst}]:0"));
    f.ttl = hops;
    let mut b = f.bytes();
    b[14 + 40] = icmp_type;
    b
}

/// An IPv6 frame whose hop-by-hop header is turned into a fragment header with this
/// offset-and-flags word.
fn v6_fragment(f: &Frame, frag: u16) -> Vec<u8> {
    let mut g = f.clone();
    g.hop_by_hop = true;
    let mut b = g.bytes();
    b[14 + 6] = 44;
    b[14 + 40 + 1] = 0;
    b[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&frag.to_be_bytes());
    b[14 + 40 + 4..14 + 40 + 8].copy_from_slice(&[0, 0, 0x12, 0x34]);
    b
}

#[test]
fn tc_egress_policy_table() {
    let fx = Fixture::new();
    let payload: Vec<u8> = (0..100u32).map(|i| i as u8).collect();
    // Sources become known by sending to the channel through XDP.
    for (src, ch) in [(SRC4, CH4), (SRC6, CH6)] {
        let input = Frame::udp(sa(src), sa(ch), &payload).bytes();
        assert_eq!(fx.test_run(true, &input).unwrap().0, XDP_REDIRECT);
    }
    let ve4 = fx.enc4.0.ifindex;
    let ve6 = fx.enc6.0.ifindex;
    let ch4_reply = Frame::udp(sa("10.77.1.2:7000"), sa(SRC4), &payload);
    let ch6_reply = Frame::udp(sa("[fd77:1::2]:7000"), sa(SRC6), &payload);
    let restored = |f: &Frame, ingest: &str| {
        let mut g = f.clone();
        g.src = sa(ingest);
        g.bytes()
    };
    let mut rows = vec![
        PolicyRow {
            name: "IPv4 reply to the source: rewritten and redirected".into(),
            ifindex: ve4,
            input: ch4_reply.bytes(),
            verdict: TC_ACT_REDIRECT,
            output: Some(restored(&ch4_reply, CH4)),
            counter: "tc/reply_redirected",
        },
        PolicyRow {
            name: "IPv6 reply to the source: rewritten and redirected".into(),
            ifindex: ve6,
            input: ch6_reply.bytes(),
            verdict: TC_ACT_REDIRECT,
            output: Some(restored(&ch6_reply, CH6)),
            counter: "tc/reply_redirected",
        },
    ];
    let mut row = |name: &str, ifindex: u32, input: Vec<u8>, counter: &'static str| {
        let verdict = if counter.starts_with("tc/") {
            TC_ACT_OK
        } else {
            TC_ACT_SHOT
        };
        rows.push(PolicyRow {
            name: name.into(),
            ifindex,
            input,
            verdict,
            output: None,
            counter,
        });
    };
    let (tcp, udp, icmp) = (6, 17, 1);
    let e4 = "10.77.1.2:40000";
    let e6 = "[fd77:1::2]:40000";

    // enc4: allow 10.77.9.1:443/tcp, 10.77.9.0/24:5000-5010/udp, 10.77.9.5/icmp; UDP health 9000.
    row(
        "allowed TCP to 10.77.9.1:443",
        ve4,
        packet(tcp, e4, "10.77.9.1:443").bytes(),
        "tc/pass_allowed",
    );
    row(
        "allowed UDP, first port of the range, in the /24",
        ve4,
        packet(udp, e4, "10.77.9.77:5000").bytes(),
        "tc/pass_allowed",
    );
    row(
        "allowed UDP, last port of the range",
        ve4,
        packet(udp, e4, "10.77.9.254:5010").bytes(),
        "tc/pass_allowed",
    );
    row(
        "allowed ICMP echo to 10.77.9.5",
        ve4,
        packet(icmp, "10.77.1.2:0", "10.77.9.5:0").bytes(),
        "tc/pass_allowed",
    );
    row(
        "denied destination: TCP to 10.77.9.2:443",
        ve4,
        packet(tcp, e4, "10.77.9.2:443").bytes(),
        "enc4/denied",
    );
    row(
        "denied port: TCP to 10.77.9.1:444",
        ve4,
        packet(tcp, e4, "10.77.9.1:444").bytes(),
        "enc4/denied",
    );
    row(
        "denied port: UDP just past the range",
        ve4,
        packet(udp, e4, "10.77.9.1:5011").bytes(),
        "enc4/denied",
    );
    row(
        "denied port: UDP just below the range",
        ve4,
        packet(udp, e4, "10.77.9.1:4999").bytes(),
        "enc4/denied",
    );
    row(
        "denied destination: UDP outside the /24",
        ve4,
        packet(udp, e4, "10.77.8.1:5000").bytes(),
        "enc4/denied",
    );
    row(
        "denied protocol of a rule: TCP to the UDP range",
        ve4,
        packet(tcp, e4, "10.77.9.1:5000").bytes(),
        "enc4/denied",
    );
    row(
        "denied ICMP to 10.77.9.6",
        ve4,
        packet(icmp, "10.77.1.2:0", "10.77.9.6:0").bytes(),
        "enc4/denied",
    );
    row(
        "forged source to an allowed destination",
        ve4,
        packet(tcp, "10.77.1.3:40000", "10.77.9.1:443").bytes(),
        "enc4/forged_source",
    );
    row(
        "forged source: a channel reply from another encoder's address",
        ve4,
        packet(udp, "10.77.2.2:7000", SRC4).bytes(),
        "enc4/forged_source",
    );
    row(
        "forged source: enc6's address on enc4's veth",
        ve4,
        packet(tcp, e6, "[fd77:9::1]:443").bytes(),
        "enc4/forged_source",
    );
    row(
        "channel port to a peer that never sent to the channel",
        ve4,
        packet(udp, "10.77.1.2:7000", "10.77.0.50:40000").bytes(),
        "enc4/unknown_peer",
    );
    row(
        "health answer: UDP from 9000 to the ingest host",
        ve4,
        packet(udp, "10.77.1.2:9000", "10.77.0.1:51515").bytes(),
        "tc/pass_health",
    );
    row(
        "health answer: UDP from 9000 to another address than the prober's",
        ve4,
        packet(udp, "10.77.1.2:9000", "192.0.2.1:51515").bytes(),
        "enc4/denied",
    );
    // A dead receiver: its kernel's port unreachable for a channel packet is the stream
    // refused, counted, dropped, and reported to the daemon.
    let stream4 = packet(udp, "10.77.0.50:40000", "10.77.1.2:7000");
    row(
        "port unreachable quoting a channel packet (nothing receives the stream)",
        ve4,
        icmp_error(3, 3, "10.77.1.2", "10.77.0.50", &stream4),
        "enc4/refused",
    );
    row(
        "port unreachable quoting a packet to a port of no channel",
        ve4,
        icmp_error(
            3,
            3,
            "10.77.1.2",
            "10.77.0.50",
            &packet(udp, "10.77.0.50:40000", "10.77.1.2:7001"),
        ),
        "enc4/denied",
    );
    row(
        "host unreachable (code 1) quoting a channel packet",
        ve4,
        icmp_error(3, 1, "10.77.1.2", "10.77.0.50", &stream4),
        "enc4/denied",
    );
    // A dead health responder: its kernel's port unreachable answers the probe.
    let probe4 = |to: &str, proto: u8| packet(proto, "10.77.0.1:51515", to);
    let unreach4 = |code: u8, quoted: Frame| icmp_error(3, code, "10.77.1.2", "10.77.0.1", &quoted);
    row(
        "port unreachable for a UDP probe of the health port",
        ve4,
        unreach4(3, probe4("10.77.1.2:9000", udp)),
        "tc/pass_health",
    );
    row(
        "port unreachable for UDP to another port",
        ve4,
        unreach4(3, probe4("10.77.1.2:9001", udp)),
        "enc4/denied",
    );
    row(
        "port unreachable for a probe of another address",
        ve4,
        unreach4(3, probe4("10.77.1.9:9000", udp)),
        "enc4/denied",
    );
    row(
        "port unreachable for TCP to the health port",
        ve4,
        unreach4(3, probe4("10.77.1.2:9000", tcp)),
        "enc4/denied",
    );
    row(
        "host unreachable (code 1) for a probe of the health port",
        ve4,
        unreach4(1, probe4("10.77.1.2:9000", udp)),
        "enc4/denied",
    );
    let mut with_options = probe4("10.77.1.2:9000", udp);
    with_options.options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, end of options
    row(
        "port unreachable quoting a probe with IP options",
        ve4,
        unreach4(3, with_options),
        "tc/pass_health",
    );
    row(
        "port unreachable sent to someone other than the probe's sender",
        ve4,
        icmp_error(
            3,
            3,
            "10.77.1.2",
            "192.0.2.1",
            &probe4("10.77.1.2:9000", udp),
        ),
        "enc4/denied",
    );
    let mut cut = unreach4(3, probe4("10.77.1.2:9000", udp));
    cut.truncate(14 + 20 + 8 + 20 + 3);
    row(
        "port unreachable whose quote stops inside the UDP ports",
        ve4,
        cut,
        "enc4/denied",
    );
    row(
        "TCP from the health port (the check is UDP)",
        ve4,
        packet(tcp, "10.77.1.2:9000", "10.77.0.1:51515").bytes(),
        "enc4/denied",
    );
    row(
        "UDP to port 9000 (answers come from it, not to it)",
        ve4,
        packet(udp, e4, "10.77.0.1:9000").bytes(),
        "enc4/denied",
    );
    row(
        "ARP request",
        ve4,
        arp(fx.enc4.1.mac, [10, 77, 1, 2], [10, 77, 1, 1]),
        "tc/pass_neighbour",
    );
    row(
        "ARP with a forged sender address (ARP is not policed)",
        ve4,
        arp(fx.enc4.1.mac, [10, 77, 1, 99], [10, 77, 1, 1]),
        "tc/pass_neighbour",
    );
    let mut first = packet(udp, e4, "10.77.9.1:5001");
    first.frag = 0x2000; // MF, offset 0
    row(
        "first fragment to an allowed destination: judged by its ports",
        ve4,
        first.bytes(),
        "tc/pass_allowed",
    );
    let mut first_denied = packet(udp, e4, "10.77.9.1:6000");
    first_denied.frag = 0x2000;
    row(
        "first fragment to a denied port",
        ve4,
        first_denied.bytes(),
        "enc4/denied",
    );
    let mut later = packet(udp, e4, "10.77.9.1:5001");
    later.frag = 0x00b9; // offset 1480, last
    row(
        "later fragment (no ports to judge by)",
        ve4,
        later.bytes(),
        "enc4/fragment",
    );
    let mut later_mf = later.clone();
    later_mf.frag = 0x20b9;
    row("middle fragment", ve4, later_mf.bytes(), "enc4/fragment");
    let mut frag_reply = ch4_reply.clone();
    frag_reply.frag = 0x2000;
    row(
        "first fragment of a reply: not rewritten, and not allowed",
        ve4,
        frag_reply.bytes(),
        "enc4/denied",
    );
    row(
        "GRE (unknown protocol)",
        ve4,
        packet(47, e4, "10.77.9.1:443").bytes(),
        "enc4/protocol",
    );
    row(
        "ICMPv6 inside IPv4",
        ve4,
        packet(58, "10.77.1.2:0", "10.77.9.5:0").bytes(),
        "enc4/protocol",
    );
    let mut tagged = packet(tcp, e4, "10.77.9.1:443");
    tagged.vlans = vec![100];
    row("VLAN-tagged frame", ve4, tagged.bytes(), "enc4/not_ip");
    let mut lldp = arp(fx.enc4.1.mac, [10, 77, 1, 2], [10, 77, 1, 1]);
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    row("LLDP", ve4, lldp, "enc4/not_ip");
    let allowed_tcp = packet(tcp, e4, "10.77.9.1:443").bytes();
    let mut bad_ihl = allowed_tcp.clone();
    bad_ihl[14] = 0x44;
    row("IPv4 IHL below 5", ve4, bad_ihl, "enc4/malformed");
    let mut bad_version = allowed_tcp.clone();
    bad_version[14] = 0x65;
    row(
        "IPv4 ethertype, version 6",
        ve4,
        bad_version,
        "enc4/malformed",
    );
    for len in [34, 36, 38, 40, 53] {
        row(
            &format!("allowed TCP truncated to {len} B"),
            ve4,
            allowed_tcp[..len].to_vec(),
            "enc4/malformed",
        );
    }
    let allowed_udp = packet(udp, e4, "10.77.9.1:5000").bytes();
    for len in [38, 41] {
        row(
            &format!("allowed UDP truncated to {len} B"),
            ve4,
            allowed_udp[..len].to_vec(),
            "enc4/malformed",
        );
    }
    row(
        "ICMP truncated after the IPv4 header",
        ve4,
        packet(icmp, "10.77.1.2:0", "10.77.9.5:0").bytes()[..34].to_vec(),
        "enc4/malformed",
    );

    // enc6: allow [fd77:9::/64]:443/tcp; TCP health 9100.
    row(
        "IPv6 allowed TCP to [fd77:9::1]:443",
        ve6,
        packet(tcp, e6, "[fd77:9::1]:443").bytes(),
        "tc/pass_allowed",
    );
    row(
        "IPv6 allowed TCP anywhere in the /64",
        ve6,
        packet(tcp, e6, "[fd77:9::ffff:1:2:3]:443").bytes(),
        "tc/pass_allowed",
    );
    row(
        "IPv6 denied port",
        ve6,
        packet(tcp, e6, "[fd77:9::1]:80").bytes(),
        "enc6/denied",
    );
    row(
        "IPv6 denied destination: outside the /64",
        ve6,
        packet(tcp, e6, "[fd77:9:0:1::1]:443").bytes(),
        "enc6/denied",
    );
    row(
        "IPv6 denied UDP to an allowed address and port",
        ve6,
        packet(udp, e6, "[fd77:9::1]:443").bytes(),
        "enc6/denied",
    );
    row(
        "IPv6 forged source",
        ve6,
        packet(tcp, "[fd77:1::3]:40000", "[fd77:9::1]:443").bytes(),
        "enc6/forged_source",
    );
    row(
        "IPv4 from the IPv6 encoder",
        ve6,
        packet(tcp, e4, "10.77.9.1:443").bytes(),
        "enc6/forged_source",
    );
    row(
        "IPv6 health answer: TCP from 9100",
        ve6,
        packet(tcp, "[fd77:1::2]:9100", "[fd77::1]:51515").bytes(),
        "tc/pass_health",
    );
    row(
        "IPv6 health answer: TCP from 9100 to another address than the prober's",
        ve6,
        packet(tcp, "[fd77:1::2]:9100", "[fd77:9::1]:51515").bytes(),
        "enc6/denied",
    );
    row(
        "ICMPv6 port unreachable quoting a channel packet (nothing receives the stream)",
        ve6,
        icmp_error(
            1,
            4,
            "fd77:1::2",
            "fd77::50",
            &packet(udp, "[fd77::50]:40000", "[fd77:1::2]:7000"),
        ),
        "enc6/refused",
    );
    row(
        "ICMPv6 port unreachable for UDP to 9100 (the check is TCP)",
        ve6,
        icmp_error(
            1,
            4,
            "fd77:1::2",
            "fd77::1",
            &packet(udp, "[fd77::1]:51515", "[fd77:1::2]:9100"),
        ),
        "enc6/denied",
    );
    row(
        "ND: neighbour solicitation (135) from the link-local address",
        ve6,
        icmp6(135, "fe80::2", "ff02::1:ff00:1"),
        "tc/pass_neighbour",
    );
    row(
        "ND: neighbour advertisement (136) from the encoder's address",
        ve6,
        icmp6(136, "fd77:1::2", "fd77:1::1"),
        "tc/pass_neighbour",
    );
    row(
        "ND: router solicitation (133) from ::",
        ve6,
        icmp6(133, "::", "ff02::2"),
        "tc/pass_neighbour",
    );
    row(
        "ND: redirect (137)",
        ve6,
        icmp6(137, "fe80::2", "fe80::1"),
        "enc6/router",
    );
    row(
        "ND: router advertisement (134), forged by the encoder",
        ve6,
        icmp6(134, "fe80::2", "ff02::1"),
        "enc6/router",
    );
    row(
        "ND: neighbour advertisement with hop limit 64 (off-link, forged)",
        ve6,
        icmp6_hops(136, "fd77:1::2", "fd77:1::1", 64),
        "enc6/router",
    );
    row(
        "MLD report with hop limit 255",
        ve6,
        icmp6_hops(131, "::", "ff02::16", 255),
        "enc6/router",
    );
    for (kind, what) in [
        (130, "query"),
        (131, "report"),
        (132, "done"),
        (143, "v2 report"),
    ] {
        row(
            &format!("MLD {what} ({kind}) from :: (a new interface's)"),
            ve6,
            icmp6(kind, "::", "ff02::16"),
            "tc/pass_neighbour",
        );
    }
    row(
        "ICMPv6 type 129 (echo reply, just below MLD) from ::",
        ve6,
        icmp6(129, "::", "ff02::16"),
        "enc6/forged_source",
    );
    row(
        "ICMPv6 type 144 (just past the MLDv2 report) from ::",
        ve6,
        icmp6(144, "::", "ff02::16"),
        "enc6/forged_source",
    );
    row(
        "ICMPv6 echo from the link-local address (not ND)",
        ve6,
        icmp6(128, "fe80::2", "fd77:9::1"),
        "enc6/forged_source",
    );
    row(
        "ICMPv6 type 138 (just past ND) from the link-local address",
        ve6,
        icmp6(138, "fe80::2", "fe80::1"),
        "enc6/forged_source",
    );
    row(
        "ICMPv6 echo to a destination without an icmp rule",
        ve6,
        icmp6(128, "fd77:1::2", "fd77:9::1"),
        "enc6/denied",
    );
    let mut hop = packet(tcp, e6, "[fd77:9::1]:443");
    hop.hop_by_hop = true;
    row(
        "IPv6 hop-by-hop header, then allowed TCP",
        ve6,
        hop.bytes(),
        "tc/pass_allowed",
    );
    let mut hop_denied = packet(tcp, e6, "[fd77:9::1]:444");
    hop_denied.hop_by_hop = true;
    row(
        "IPv6 hop-by-hop header, then denied TCP",
        ve6,
        hop_denied.bytes(),
        "enc6/denied",
    );
    let v6_allowed = packet(tcp, e6, "[fd77:9::1]:443");
    row(
        "IPv6 first fragment of allowed TCP",
        ve6,
        v6_fragment(&v6_allowed, 0x0001),
        "tc/pass_allowed",
    );
    row(
        "IPv6 later fragment",
        ve6,
        v6_fragment(&v6_allowed, 0x05c8),
        "enc6/fragment",
    );
    let mut chain = packet(tcp, e6, "[fd77:9::1]:443").bytes();
    // Five hop-by-hop-shaped headers: one more than the program walks.
    chain[14 + 6] = 0;
    let l4 = chain.split_off(54);
    for _ in 0..5 {
        chain.extend_from_slice(&[0, 0, 1, 4, 0, 0, 0, 0]);
    }
    let last = chain.len() - 8;
    chain[last] = 6;
    chain.extend_from_slice(&l4);
    let plen = (chain.len() - 54) as u16;
    chain[18..20].copy_from_slice(&plen.to_be_bytes());
    row(
        "IPv6 extension header chain longer than the walk",
        ve6,
        chain,
        "enc6/protocol",
    );
    let v6_bytes = v6_allowed.bytes();
    for len in [54, 58, 73] {
        row(
            &format!("IPv6 allowed TCP truncated to {len} B"),
            ve6,
            v6_bytes[..len].to_vec(),
            "enc6/malformed",
        );
    }

    // A veth without a policy (the ingest NIC's, no encoder): fail-open, as before policies.
    row(
        "no policy for the interface: a denied-looking TCP packet passes",
        fx.ingest.ifindex,
        packet(tcp, e4, "10.77.9.2:443").bytes(),
        "tc/pass_other",
    );
    row(
        "no policy for the interface: forged UDP passes",
        fx.ingest.ifindex,
        packet(udp, "10.77.1.3:40000", "10.77.9.2:80").bytes(),
        "tc/pass_no_channel",
    );
    run_policy_rows(&fx, &rows);
    // Shorter IPv6 skbs are refused by the kernel's test run itself.
    assert!(
        fx.tc_run_on(ve6, &v6_bytes[..40]).is_err(),
        "40-byte IPv6 skb"
    );
}

/// One verdict for a frame on enc4's veth, and the counter that moved.
fn verdict_on_enc4(fx: &Fixture, frame: &[u8]) -> (u32, String) {
    verdict_on(fx, fx.enc4.0.ifindex, frame)
}

/// One verdict for a frame on interface `ifindex`, and the counter that moved.
fn verdict_on(fx: &Fixture, ifindex: u32, frame: &[u8]) -> (u32, String) {
    let before = fx.tc_counters();
    let (verdict, _) = fx.tc_run_on(ifindex, frame).unwrap();
    let moved = moved(&before, &fx.tc_counters());
    assert_eq!(moved.len(), 1, "{moved:?}");
    (verdict, moved[0].0.clone())
}

/// The counters that differ between two readings of the same list, with how much they grew.
fn moved<N: Clone>(before: &[(N, u64)], after: &[(N, u64)]) -> Vec<(N, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0.clone(), a.1.wrapping_sub(b.1)))
        .collect()
}

#[test]
fn tc_egress_policy_is_replaced_atomically_without_reattaching() {
    let mut fx = Fixture::new();
    let mut dp_policy = policy(&ENC4_ALLOW, AllowProto::Udp, ENC4_HEALTH);
    let to_444 = packet(6, "10.77.1.2:40000", "10.77.9.1:444").bytes();
    let link = fx.tc_link_id("ve4");
    let denied = (TC_ACT_SHOT, "enc4/denied".to_owned());
    let allowed = (TC_ACT_OK, "tc/pass_allowed".to_owned());
    assert_eq!(verdict_on_enc4(&fx, &to_444), denied);

    // One map update lets port 444 through; the program was not touched.
    dp_policy
        .allow
        .push("10.77.9.1:444/tcp".parse::<AllowRule>().unwrap());
    fx.dp.set_policy("enc4", &dp_policy).unwrap();
    assert_eq!(verdict_on_enc4(&fx, &to_444), allowed);
    assert_eq!(fx.tc_link_id("ve4"), link, "the TC link is the same");

    // Refused updates leave the policy in force.
    let mut too_many = dp_policy.clone();
    for port in 1..=14u16 {
        too_many
            .allow
            .push(format!("10.77.10.1:{port}/udp").parse().unwrap());
    }
    assert_eq!(too_many.allow.len(), 18);
    let err = fx.dp.set_policy("enc4", &too_many).unwrap_err();
    assert!(
        matches!(
            err,
            DataplaneError::TooManyRules {
                count: 18,
                max: 16,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "encoder \"enc4\" has 18 allow rules; the kernel policy holds at most 16"
    );
    too_many.allow.truncate(16);
    let mut v6_rule = too_many.clone();
    v6_rule.allow[15] = "[fd77:9::/64]:443/tcp".parse().unwrap();
    let err = fx.dp.set_policy("enc4", &v6_rule).unwrap_err();
    assert!(matches!(err, DataplaneError::Invalid { .. }), "{err}");
    assert!(
        err.to_string().contains("IPv6 rule for an IPv4 encoder"),
        "{err}"
    );
    let err = fx.dp.set_policy("nope", &dp_policy).unwrap_err();
    assert!(matches!(err, DataplaneError::UnknownEncoder(_)), "{err}");
    assert_eq!(verdict_on_enc4(&fx, &to_444), allowed);

    // Sixteen rules is the limit, and the sixteenth is walked.
    dp_policy.allow.pop();
    let mut sixteen = dp_policy.clone();
    while sixteen.allow.len() < 15 {
        let port = 20000 + sixteen.allow.len() as u16;
        sixteen
            .allow
            .push(format!("10.77.10.1:{port}/udp").parse().unwrap());
    }
    sixteen.allow.push("10.77.9.1:444/tcp".parse().unwrap());
    assert_eq!(sixteen.allow.len(), 16);
    fx.dp.set_policy("enc4", &sixteen).unwrap();
    assert_eq!(verdict_on_enc4(&fx, &to_444), allowed);
    fx.dp.set_policy("enc4", &dp_policy).unwrap();
    assert_eq!(verdict_on_enc4(&fx, &to_444), denied);

    // A new address for the encoder becomes the only source it may use.
    let moved = EncoderSpec {
        name: "enc4".into(),
        addr: "10.77.1.20".parse().unwrap(),
        mac: fx.enc4.1.mac,
        link: EncoderLink::Local {
            ifname: "ve4".into(),
        },
    };
    fx.dp.upsert_encoder(&moved).unwrap();
    let allowed_from = |src: &str| packet(6, src, "10.77.9.1:443").bytes();
    assert_eq!(
        verdict_on_enc4(&fx, &allowed_from("10.77.1.20:40000")),
        allowed
    );
    assert_eq!(
        verdict_on_enc4(&fx, &allowed_from("10.77.1.2:40000")),
        (TC_ACT_SHOT, "enc4/forged_source".to_owned())
    );

    // The policy goes with the encoder: its veth is no longer policed, and an encoder added
    // again under the name starts without one.
    fx.dp.remove_channel(sa(CH4)).unwrap();
    fx.dp.remove_encoder("enc4").unwrap();
    let (verdict, _) = fx.tc_run_on(fx.enc4.0.ifindex, &to_444).unwrap();
    assert_eq!(verdict, TC_ACT_OK, "no encoder for the veth: fail-open");
    fx.dp.upsert_encoder(&moved).unwrap();
    assert_eq!(
        verdict_on_enc4(&fx, &to_444),
        (TC_ACT_OK, "tc/pass_other".to_owned()),
        "re-added without a policy: fail-open"
    );
}

/// A process forked at the wrong moment holds a copy of every descriptor until it execs.
/// Removing an encoder or tearing down must detach the links even so, or the next attach on
/// the same interface fails with EEXIST.
#[test]
fn links_are_detached_while_another_process_holds_them() {
    let mut fx = Fixture::new();
    let old = fx.tc_link_id("ve4");
    // What a forked child would hold: a descriptor of the pinned TC link.
    let held_tc = PinnedLink::from_pin(fx.pins.pins.tc_link("ve4")).expect("TC link pin");
    fx.dp.remove_channel(sa(CH4)).unwrap();
    fx.dp.remove_encoder("enc4").unwrap();
    assert!(!fx.pins.pins.tc_link("ve4").exists(), "TC link unpinned");
    fx.dp
        .upsert_encoder(&EncoderSpec {
            name: "enc4".into(),
            addr: ENC4.parse().unwrap(),
            mac: fx.enc4.1.mac,
            link: EncoderLink::Local {
                ifname: "ve4".into(),
            },
        })
        .expect("the encoder's veth takes a new TC link");
    assert_ne!(fx.tc_link_id("ve4"), old, "a new link");
    drop(held_tc);

    let held_xdp = PinnedLink::from_pin(fx.pins.pins.xdp_link("ing")).expect("XDP link pin");
    Dataplane::teardown(&fx.pins.pins).unwrap();
    let again = PinDir::new();
    let mut dp = again.open();
    dp.attach_ingest("ing", XdpMode::Native)
        .expect("the ingest NIC takes a new XDP link after teardown");
    drop(held_xdp);
}

#[test]
fn icmpv6_port_unreachable_answers_a_udp_health_check() {
    let mut fx = Fixture::new();
    fx.dp
        .set_policy("enc6", &policy(&ENC6_ALLOW, AllowProto::Udp, ENC6_HEALTH))
        .unwrap();
    let unreach = |port: u16| {
        let probe = packet(17, "[fd77::1]:51515", &format!("[fd77:1::2]:{port}"));
        icmp_error(1, 4, "fd77:1::2", "fd77::1", &probe)
    };
    let ve6 = fx.enc6.0.ifindex;
    assert_eq!(
        verdict_on(&fx, ve6, &unreach(ENC6_HEALTH)),
        (TC_ACT_OK, "tc/pass_health".to_owned())
    );
    assert_eq!(
        verdict_on(&fx, ve6, &unreach(ENC6_HEALTH + 1)),
        (TC_ACT_SHOT, "enc6/denied".to_owned())
    );
}

/// An SRT handshake control packet's first bytes (header and the CIF up to and including the
/// Handshake Type), addressed to socket `dest_id`: `kind` 1 is an induction, `HS_CONCLUSION`
/// a conclusion.
fn srt_handshake(kind: u32, dest_id: u32) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = 0x80;
    p[12..16].copy_from_slice(&dest_id.to_be_bytes());
    p[16..20].copy_from_slice(&5u32.to_be_bytes());
    p[HANDSHAKE_TYPE_OFFSET..HANDSHAKE_TYPE_OFFSET + 4].copy_from_slice(&kind.to_be_bytes());
    p
}

/// Channels with `sources` (issue 13): packets from inside them are forwarded as any channel
/// packet; from anywhere else they pass to the host untouched, counted `pass_not_source`,
/// and their sender is not learnt. Without `sources` again, everyone is forwarded.
#[test]
fn xdp_sources_table() {
    let mut fx = Fixture::new();
    let (ve4, ve4p) = fx.enc4;
    let (ve6, ve6p) = fx.enc6;
    let (ch4, ch6) = ("10.77.0.1:5100", "[fd77::1]:5100");
    let restricted = |nets: &[&str]| ChannelOptions {
        sources: nets
            .iter()
            .map(|n| n.parse::<SourcePrefix>().unwrap())
            .collect(),
        ..ChannelOptions::default()
    };
    let v4_nets = ["10.77.0.0/30", "192.0.2.7"];
    let v6_nets = ["fd77::/126"];
    fx.dp
        .set_channel_with(sa(ch4), 7100, "enc4", &["enc4"], &restricted(&v4_nets))
        .unwrap();
    fx.dp
        .set_channel_with(sa(ch6), 7100, "enc6", &["enc6"], &restricted(&v6_nets))
        .unwrap();
    assert_eq!(
        fx.dp.channel_sources(sa(ch4)).unwrap(),
        vec![
            "10.77.0.0/30".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap()
        ]
    );
    let to = |f: &Frame, enc: &str, dmac: [u8; 6], smac: [u8; 6]| {
        let mut g = f.clone();
        g.dst = SocketAddr::new(enc.parse().unwrap(), 7100);
        g.ttl -= 1;
        g.dmac = dmac;
        g.smac = smac;
        g.bytes()
    };
    let payload = [0x47u8; 188];
    let mut rows = Vec::new();
    for src in ["10.77.0.2:40000", "10.77.0.3:1", "192.0.2.7:9"] {
        let f = Frame::udp(sa(src), sa(ch4), &payload);
        rows.push(Row {
            name: format!("IPv4 from {src}, inside the sources"),
            input: f.bytes(),
            verdict: XDP_REDIRECT,
            output: Some(to(&f, ENC4, ve4p.mac, ve4.mac)),
            reason: "redirected",
        });
    }
    let f6 = Frame::udp(sa("[fd77::3]:40000"), sa(ch6), &payload);
    rows.push(Row {
        name: "IPv6 from inside the sources".into(),
        input: f6.bytes(),
        verdict: XDP_REDIRECT,
        output: Some(to(&f6, ENC6, ve6p.mac, ve6.mac)),
        reason: "redirected",
    });
    for src in ["10.77.0.4:40000", "192.0.2.6:9", "203.0.113.9:5"] {
        rows.push(Row::pass(
            format!("IPv4 from {src}, outside the sources"),
            Frame::udp(sa(src), sa(ch4), &payload).bytes(),
            "pass_not_source",
        ));
    }
    let mut tagged = Frame::udp(sa("10.77.0.9:1"), sa(ch4), &payload);
    tagged.vlans = vec![100];
    rows.push(Row::pass(
        "IPv4 with a VLAN tag, outside the sources",
        tagged.bytes(),
        "pass_not_source",
    ));
    rows.push(Row::pass(
        "IPv6 from outside the sources",
        Frame::udp(sa("[fd77::4]:40000"), sa(ch6), &payload).bytes(),
        "pass_not_source",
    ));
    run_rows(&fx, true, &rows);
    let learnt: Vec<SocketAddr> = fx
        .dp
        .sources()
        .unwrap()
        .into_iter()
        .map(|s| s.peer)
        .collect();
    for outside in ["10.77.0.4:40000", "203.0.113.9:5", "[fd77::4]:40000"] {
        assert!(
            !learnt.contains(&sa(outside)),
            "{outside} learnt: {learnt:?}"
        );
    }
    assert!(learnt.contains(&sa("10.77.0.2:40000")), "{learnt:?}");

    // A failover keeps the restriction.
    fx.dp.activate(sa(ch4), "enc4").unwrap();
    let outside = Frame::udp(sa("203.0.113.9:5"), sa(ch4), &payload).bytes();
    run_rows(
        &fx,
        true,
        &[Row::pass(
            "outside, after activate",
            outside.clone(),
            "pass_not_source",
        )],
    );
    // Without sources, everyone is forwarded and no prefix is left behind.
    fx.dp
        .set_channel_with(sa(ch4), 7100, "enc4", &["enc4"], &ChannelOptions::default())
        .unwrap();
    assert_eq!(fx.dp.channel_sources(sa(ch4)).unwrap(), vec![]);
    assert_eq!(fx.test_run(true, &outside).unwrap().0, XDP_REDIRECT);
    // Bad options are refused and change nothing.
    let v6_on_v4 = restricted(&["fd77::/64"]);
    assert!(
        fx.dp
            .set_channel_with(sa(ch4), 7100, "enc4", &["enc4"], &v6_on_v4)
            .is_err()
    );
    assert_eq!(fx.test_run(true, &outside).unwrap().0, XDP_REDIRECT);
    // Removing the channel removes its prefixes.
    fx.dp.remove_channel(sa(ch6)).unwrap();
    fx.dp
        .set_channel(sa(ch6), 7100, "enc6", &["enc6"], false)
        .unwrap();
    assert_eq!(fx.dp.channel_sources(sa(ch6)).unwrap(), vec![]);
}

/// SRT callers (issue 13): the return path adds a caller only when its listener answers the
/// caller's conclusion handshake (inductions, their answers and data add none), refreshes
/// known ones, and a channel holds at most its limit, the least recently seen giving way.
#[test]
fn tc_egress_srt_callers_only_on_conclusion_and_capped() {
    let mut fx = Fixture::new();
    let (_, ve4p) = fx.enc4;
    let opts = ChannelOptions {
        srt: true,
        srt_peer_limit: 4,
        ..ChannelOptions::default()
    };
    fx.dp
        .set_channel_with(sa(CH4), ENC_PORT, "enc4", &["enc4"], &opts)
        .unwrap();
    let enc4_ep = SocketAddr::new(ENC4.parse().unwrap(), ENC_PORT);
    let caller = |i: u32| sa(&format!("10.77.0.2:{}", 41_000 + i));
    let answer = |fx: &Fixture, to: SocketAddr, payload: &[u8]| {
        let mut f = Frame::udp(enc4_ep, to, payload);
        f.smac = ve4p.mac;
        let (verdict, _) = fx.test_run(false, &f.bytes()).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT, "a reply to a known source");
    };
    let peers = |fx: &Fixture| -> Vec<(SocketAddr, u32)> {
        let mut p: Vec<_> = fx
            .dp
            .srt_peers()
            .unwrap()
            .into_iter()
            .map(|p| (p.peer, p.socket_id))
            .collect();
        p.sort();
        p
    };
    for i in 0..10 {
        let hello = Frame::udp(caller(i), sa(CH4), &srt_handshake(1, 0)).bytes();
        assert_eq!(fx.test_run(true, &hello).unwrap().0, XDP_REDIRECT);
        answer(&fx, caller(i), &srt_handshake(1, 100 + i));
        answer(&fx, caller(i), &[0x11; 64]);
    }
    assert_eq!(peers(&fx), vec![], "inductions, data: no caller");
    answer(&fx, caller(0), &srt_handshake(HS_CONCLUSION, 100));
    assert_eq!(peers(&fx), vec![(caller(0), 100)]);
    answer(&fx, caller(0), &srt_handshake(1003, 999));
    answer(&fx, caller(0), &srt_handshake(1, 999));
    assert_eq!(
        peers(&fx),
        vec![(caller(0), 100)],
        "a rejection or induction changes nothing"
    );
    answer(&fx, caller(0), &srt_handshake(HS_CONCLUSION, 101));
    assert_eq!(
        peers(&fx),
        vec![(caller(0), 101)],
        "a new session's conclusion"
    );
    for i in 1..10 {
        answer(&fx, caller(i), &srt_handshake(HS_CONCLUSION, 100 + i));
        assert!(peers(&fx).len() <= 4, "capped: {:?}", peers(&fx));
    }
    let held = peers(&fx);
    assert_eq!(held.len(), 4, "{held:?}");
    assert!(
        held.contains(&(caller(9), 109)),
        "the latest caller holds a slot: {held:?}"
    );
    // Reconfigured with a limit of 2: two of the callers stay.
    let opts2 = ChannelOptions {
        srt_peer_limit: 2,
        ..opts.clone()
    };
    fx.dp
        .set_channel_with(sa(CH4), ENC_PORT, "enc4", &["enc4"], &opts2)
        .unwrap();
    assert_eq!(peers(&fx).len(), 2);
    // Not SRT any more: no caller is kept, none is learnt.
    let udp = ChannelOptions { srt: false, ..opts };
    fx.dp
        .set_channel_with(sa(CH4), ENC_PORT, "enc4", &["enc4"], &udp)
        .unwrap();
    answer(&fx, caller(3), &srt_handshake(HS_CONCLUSION, 7));
    assert_eq!(peers(&fx), vec![]);
}

#[test]
fn a_refused_channel_packet_is_reported_on_the_ring_buffer() {
    let fx = Fixture::new();
    let mut ring = fx.dp.refusals().expect("REFUSALS ring buffer");
    while ring.next().is_some() {}
    let enc4 = fx
        .dp
        .encoders()
        .unwrap()
        .into_iter()
        .find(|e| e.name == "enc4")
        .unwrap()
        .id;
    let stream = packet(17, "10.77.0.50:40000", "10.77.1.2:7000");
    let refusal = icmp_error(3, 3, "10.77.1.2", "10.77.0.50", &stream);
    for _ in 0..3 {
        assert_eq!(
            verdict_on_enc4(&fx, &refusal),
            (TC_ACT_SHOT, "enc4/refused".to_owned())
        );
    }
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), 8, "one RefusalEvent");
        let encoder = u32::from_ne_bytes(item[0..4].try_into().unwrap());
        let channel = u32::from_ne_bytes(item[4..8].try_into().unwrap());
        events.push((encoder, channel));
    }
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|(e, _)| *e == enc4), "{events:?}");
    // A refusal of a packet of no channel is no report.
    let other = packet(17, "10.77.0.50:40000", "10.77.1.2:7001");
    verdict_on_enc4(&fx, &icmp_error(3, 3, "10.77.1.2", "10.77.0.50", &other));
    assert!(ring.next().is_none());
}
