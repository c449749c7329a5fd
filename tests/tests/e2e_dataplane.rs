//! End-to-end tests of the data plane in real namespaces: native XDP on a veth, real sockets,
//! a real SRT session.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use nsfail::{
    control::monotonic_ns,
    lab::{INGEST4, INGEST6, Lab, SRC4, SRC6},
    net::netns,
};
use nsfail_tests::{
    ChildGuard, Entered, PinDir, lab, spawn_in,
    traffic::{Receiver, send_burst},
    wait_for,
};

const ENC_PORT: u16 = 7000;
const GAP: Duration = Duration::from_millis(1);
/// At most: a burst ends as soon as every packet is answered.
const LINGER: Duration = Duration::from_secs(2);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Starts the stand-in controller inside the lab's rt namespace (nsenter, not `ip netns exec`,
/// which would hide bpffs) and waits for it to report that the data plane is configured.
fn start_holder(lab: &Lab, pins: &PinDir, extra: &[String]) -> ChildGuard {
    let holder = env!("CARGO_BIN_EXE_dp-holder");
    let netns_arg = format!("--net={}", nsfail::paths::netns(&lab.rt.name).display());
    let mut args = vec![
        netns_arg,
        holder.to_string(),
        pins.pins.root().display().to_string(),
        "ing".to_string(),
    ];
    args.extend_from_slice(extra);
    let mut child = Command::new("nsenter")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn dp-holder");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read dp-holder");
    let guard = ChildGuard { child };
    assert_eq!(line.trim(), "ready", "dp-holder did not come up");
    guard
}

fn encoder_args(lab: &Lab, i: usize, name: &str, v6: bool) -> Vec<String> {
    let e = &lab.encoders[i];
    vec![
        "encoder".into(),
        name.into(),
        if v6 { e.addr6.clone() } else { e.addr4.clone() },
        e.host_if.clone(),
        mac_str(lab.encoder_mac(i).expect("encoder MAC")),
    ]
}

#[test]
fn udp_forwarding_replies_remap_and_adoption() {
    let lab = lab(2);
    let pins = PinDir::new();
    let ch4 = sa(INGEST4, 5000);
    let ch6 = sa(INGEST6, 5000);
    let mut args = Vec::new();
    args.extend(encoder_args(&lab, 0, "ea", false));
    args.extend(encoder_args(&lab, 1, "eb", false));
    args.extend(encoder_args(&lab, 0, "ea6", true));
    args.extend(encoder_args(&lab, 1, "eb6", true));
    args.extend(["channel", &ch4.to_string(), "7000", "ea", "ea,eb"].map(String::from));
    args.extend(["channel", &ch6.to_string(), "7000", "ea6", "ea6,eb6"].map(String::from));
    let mut holder = start_holder(&lab, &pins, &args);

    let (ea, eb) = (&lab.encoders[0], &lab.encoders[1]);
    let rx_a = Receiver::start(&ea.ns, sa(&ea.addr4, ENC_PORT));
    let rx_b = Receiver::start(&eb.ns, sa(&eb.addr4, ENC_PORT));
    let src = sa(SRC4, 40000);

    // 1. The stream reaches encoder A intact (the kernel drops bad checksums, the receiver
    //    checks every byte), and A's answers reach the source from the ingest address.
    let r = send_burst(&lab.src, src, ch4, 0..200, GAP, LINGER);
    assert_eq!(
        rx_a.settled(),
        (0..200).collect(),
        "encoder A got the stream"
    );
    assert!(rx_b.settled().is_empty(), "encoder B got nothing");
    assert_eq!(r.seqs(), (0..200).collect(), "every packet answered");
    assert!(
        r.from_only(ch4),
        "answers come from the ingest address: {:?}",
        &r.acks[..3]
    );

    // 2. The process that loaded the data plane dies hard; forwarding goes on.
    holder.child.kill().expect("SIGKILL dp-holder");
    holder.child.wait().expect("reap dp-holder");
    let r = send_burst(&lab.src, src, ch4, 200..400, GAP, LINGER);
    assert_eq!(
        rx_a.settled(),
        (0..400).collect(),
        "forwarding continued after SIGKILL"
    );
    assert_eq!(r.seqs(), (200..400).collect());

    // 3. A second load adopts the pins, and one map write moves the stream to B.
    let entered = Entered::new(&lab.rt);
    let mut dp = pins.open();
    assert!(dp.adopted(), "second load adopts the pinned data plane");
    let channels = dp.channels().unwrap();
    assert_eq!(channels.len(), 2, "{channels:?}");
    assert_eq!(
        channels.iter().find(|c| c.listen == ch4).unwrap().encoder,
        "ea"
    );
    dp.activate(ch4, "eb").expect("remap to eb");
    let burst_from = monotonic_ns();
    let r = send_burst(&lab.src, src, ch4, 400..600, GAP, LINGER);
    let burst_to = monotonic_ns();
    assert_eq!(
        rx_b.settled(),
        (400..600).collect(),
        "encoder B got the rest"
    );
    assert_eq!(
        rx_a.settled(),
        (0..400).collect(),
        "encoder A got nothing more"
    );
    assert_eq!(r.seqs(), (400..600).collect());
    assert!(
        r.from_only(ch4),
        "B's answers also come from the ingest address"
    );
    assert_eq!(rx_a.corrupt() + rx_b.corrupt(), 0);

    // 4. Counters: summed per-CPU values match what was sent.
    assert_eq!(dp.channel_stats(ch4).unwrap().packets, 600);
    let (sa_, sb_) = (
        dp.encoder_stats("ea").unwrap(),
        dp.encoder_stats("eb").unwrap(),
    );
    assert_eq!((sa_.rx.packets, sb_.rx.packets), (400, 200));
    assert_eq!((sa_.tx.packets, sb_.tx.packets), (400, 200));
    assert_eq!(sa_.rx.bytes, 400 * (20 + 8 + 200));
    assert!(sb_.rx.last_seen_ns > sa_.rx.last_seen_ns);
    // Last-seen times are CLOCK_MONOTONIC at tick resolution (jiffies scaled at load): B's
    // last packet went during the burst, stamped with the start of its tick (at most 10 ms
    // before it at HZ=100, plus a late tick interrupt).
    let seen = sb_.rx.last_seen_ns;
    assert!(
        seen <= burst_to && seen + 20_000_000 >= burst_from,
        "B last seen at {seen} ns, the burst ran from {burst_from} to {burst_to}"
    );
    let ch_seen = dp.channel_stats(ch4).unwrap().last_seen_ns;
    assert!(
        ch_seen <= burst_to && ch_seen + 20_000_000 >= burst_from,
        "the channel last seen at {ch_seen} ns, the burst ran from {burst_from} to {burst_to}"
    );

    // 5. IPv6: the same path.
    let rx_a6 = Receiver::start(&ea.ns, sa(&ea.addr6, ENC_PORT));
    let r = send_burst(&lab.src, sa(SRC6, 40000), ch6, 0..100, GAP, LINGER);
    assert_eq!(rx_a6.settled(), (0..100).collect(), "IPv6 stream reached A");
    assert_eq!(r.seqs(), (0..100).collect());
    assert!(
        r.from_only(ch6),
        "IPv6 answers come from the ingest address"
    );
    drop(entered);

    // 6. Traffic that is not for a channel is untouched: ping, UDP to another port, TCP to
    //    the channel's own port number, all answered by the ingest host's own stack.
    lab.src
        .exec("ping", &["-c", "2", "-W", "2", "-i", "0.2", INGEST4])
        .expect("IPv4 ping of the ingest host");
    lab.src
        .exec("ping", &["-6", "-c", "2", "-W", "2", "-i", "0.2", INGEST6])
        .expect("IPv6 ping of the ingest host");
    let udp_other = lab
        .rt
        .run(|| UdpSocket::bind(sa(INGEST4, 5001)).unwrap())
        .unwrap();
    udp_other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    lab.src
        .run(|| {
            let s = UdpSocket::bind(sa(SRC4, 0)).unwrap();
            s.send_to(b"hello", sa(INGEST4, 5001)).unwrap();
        })
        .unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = udp_other
        .recv_from(&mut buf)
        .expect("UDP to another port arrives");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"hello"[..], SRC4.parse().unwrap())
    );
    let tcp = lab
        .rt
        .run(|| TcpListener::bind(sa(INGEST4, 5000)).unwrap())
        .unwrap();
    lab.src
        .run(|| {
            std::net::TcpStream::connect_timeout(&sa(INGEST4, 5000), Duration::from_secs(5))
                .expect("TCP to the ingest host")
        })
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || tcp.accept().ok()).is_some(),
        "TCP connection accepted by the ingest host"
    );
    // The ingest host never had to forward anything.
    let forwarding = lab
        .rt
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
        .unwrap();
    assert_eq!(forwarding.unwrap().trim(), "0");
    let xdp = dp.xdp_stats().unwrap();
    let count = |name: &str| xdp.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_eq!(count("redirected"), 700);
    assert_eq!(
        dp.xdp_count(nsfail_common::xdp_reason::REDIRECTED).unwrap(),
        700
    );
    assert!(count("pass_not_udp") >= 2, "pings and TCP passed: {xdp:?}");
    assert!(count("pass_no_channel") >= 1, "UDP to 5001 passed: {xdp:?}");
}

#[test]
fn srt_session_through_the_redirector() {
    let lab = lab(1);
    let pins = PinDir::new();
    let ch = sa(INGEST4, 5000);
    let mut args = encoder_args(&lab, 0, "ea", false);
    args.extend(["channel", &ch.to_string(), "7000", "ea", "ea"].map(String::from));
    let _holder = start_holder(&lab, &pins, &args);

    let ea = &lab.encoders[0];
    // Listener in encoder A: SRT in on 7000, out to a local UDP socket we count.
    let out = ea
        .ns
        .run(|| {
            let s = UdpSocket::bind("127.0.0.1:9001").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        })
        .unwrap();
    let _listener = spawn_in(
        &ea.ns,
        "srt-live-transmit",
        &["-q", "srt://:7000?mode=listener", "udp://127.0.0.1:9001"],
    );
    // Caller in the source namespace: UDP in on 9000, SRT out to the ingest address.
    let _caller = spawn_in(
        &lab.src,
        "srt-live-transmit",
        &[
            "-q",
            "udp://127.0.0.1:9000",
            &format!("srt://{ch}?mode=caller"),
        ],
    );
    // Feed the caller MPEG-TS sized datagrams (at most 1500, 10 ms apart) while counting
    // what comes out at A.
    let src_ns = lab.src.name.clone();
    let feeder = std::thread::spawn(move || {
        netns::in_netns(&src_ns, || {
            let feed = UdpSocket::bind("127.0.0.1:0").unwrap();
            for i in 0..1500u32 {
                let mut p = vec![0x47u8; 1316];
                p[1..5].copy_from_slice(&i.to_be_bytes());
                feed.send_to(&p, "127.0.0.1:9000").unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    });
    let mut received = 0usize;
    let mut buf = [0u8; 2048];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && !feeder.is_finished() {
        if let Ok(n) = out.recv(&mut buf) {
            assert_eq!(n, 1316, "TS datagram size kept");
            assert_eq!(buf[0], 0x47);
            received += 1;
        }
    }
    feeder.join().unwrap().unwrap();
    assert!(
        received > 100,
        "only {received} datagrams came out of the SRT listener"
    );

    // The session was two-way through nsfail: the listener's handshake answers and ACKs
    // were rewritten by TC and redirected out of the ingest NIC.
    let _e = Entered::new(&lab.rt);
    let dp = pins.open();
    let tc = dp.tc_stats().unwrap();
    let redirected = tc.iter().find(|(n, _)| *n == "reply_redirected").unwrap().1;
    assert!(redirected >= 2, "SRT control replies went back: {tc:?}");
    let sources = dp.sources().unwrap();
    assert!(
        sources
            .iter()
            .any(|s| s.channel == ch && s.peer.ip() == SRC4.parse::<std::net::IpAddr>().unwrap()),
        "{sources:?}"
    );
}
