//! BPF_PROG_TEST_RUN tables over the loaded XDP ingress and TC egress programs: each row an
//! input frame, the expected verdict, the exact expected output bytes and the reason counted.
//! Expected outputs are built from scratch (checksums computed over the whole header), never
//! with the incremental arithmetic under test.

use std::net::SocketAddr;

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use nsfail::{Dataplane, EncoderLink, EncoderSpec, XdpModeSetting, netns};
use nsfail_tests::{
    Entered, Netns, PinDir,
    frames::{Frame, arp, verify_udp},
    ip_in,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
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

/// A namespace with an ingest veth and two encoder veths, and a data plane attached in it.
struct Fixture {
    dp: Dataplane,
    _pins: PinDir,
    _ns: Netns,
    _entered: Entered,
    ingest_mac: [u8; 6],
    enc4: (netns::Link, netns::Link),
    enc6: (netns::Link, netns::Link),
}

impl Fixture {
    fn new() -> Self {
        let ns = Netns::new("ptr");
        for (a, b) in [("ing", "ingp"), ("ve4", "ve4p"), ("ve6", "ve6p")] {
            ip_in(
                &ns.name,
                &["link", "add", a, "type", "veth", "peer", "name", b],
            );
            ip_in(&ns.name, &["link", "set", a, "up"]);
            ip_in(&ns.name, &["link", "set", b, "up"]);
        }
        let entered = Entered::new(&ns);
        let pins = PinDir::new();
        let mut dp = pins.open();
        dp.attach_ingest("ing", XdpModeSetting::Native)
            .expect("attach");
        let ingest_mac = netns::link("ing").unwrap().mac;
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
        Self {
            dp,
            _pins: pins,
            _ns: ns,
            _entered: entered,
            ingest_mac,
            enc4,
            enc6,
        }
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
        let after = fx.stats(xdp);
        let moved: Vec<_> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1 != b.1)
            .map(|(_, a)| a.0)
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
            fx.ingest_mac,
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

    // Every redirected output also verifies on its own terms.
    for row in rows.iter().filter(|r| r.verdict != XDP_PASS) {
        let out = row.output.as_ref().unwrap();
        if out[12..14] != [0x81, 0x00] {
            verify_udp(out).unwrap_or_else(|e| panic!("{}: {e}", row.name));
        }
    }

    // The kernel refuses frames shorter than an Ethernet header before the program sees them.
    assert!(fx.test_run(true, &[]).is_err(), "zero-length frame");
}

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
    let sources = fx.dp.sources().unwrap();
    assert!(
        sources
            .iter()
            .any(|s| s.peer == sa(SRC4) && s.channel == sa(CH4)),
        "{sources:?}"
    );
    assert!(
        sources
            .iter()
            .any(|s| s.peer == sa(SRC6) && s.channel == sa(CH6)),
        "{sources:?}"
    );

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
    for row in rows.iter().filter(|r| r.verdict == TC_ACT_REDIRECT) {
        verify_udp(row.output.as_ref().unwrap()).unwrap_or_else(|e| panic!("{}: {e}", row.name));
    }
    assert!(
        fx.test_run(false, &r4.bytes()[..20]).is_err(),
        "20-byte IPv4 skb"
    );
    // The SRT channel (CH4) learnt its caller's socket ID from the listener's replies: the
    // Destination Socket ID, bytes 12..16 of the UDP payload; the plain channel (CH6) did not.
    let peers = fx.dp.srt_peers().unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(
        (peers[0].channel, peers[0].peer, peers[0].socket_id),
        (sa(CH4), sa(SRC4), u32::from_be_bytes([12, 13, 14, 15]))
    );
    let tx = fx.dp.encoder_stats("enc4").unwrap().tx;
    assert_eq!(tx.packets, 2, "enc4 replies counted");
}
