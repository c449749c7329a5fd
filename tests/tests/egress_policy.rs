//! The egress policy end to end, on the lab: real sockets inside encoder A's namespace, the TC
//! program on A's host-side veth, services in the rt namespace (the ingest host, where the
//! services an encoder uses live).
//!
//! - A reaches an allowed host service, and neither another port nor another address of the
//!   host; a policy change lets the other port through without re-attaching anything.
//! - A flood of 100,000 disallowed UDP packets delivers nothing and is counted exactly.
//! - With an empty allow-list, replies to the channel's source and health-probe answers still
//!   get through.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use nsfail::{
    Dataplane, EncoderLink, EncoderSpec, XdpMode,
    config::{AllowProto, AllowRule},
    dataplane::{EgressPolicy, HealthAnswers},
    lab::{INGEST_IF, INGEST4, Lab, SRC4},
    net::netns,
};
use nsfail_tests::{
    Entered, PinDir, lab,
    traffic::{Echo, Receiver, ask, send_burst},
    wait_for,
};

const ENCODER: &str = "ea";
/// The host side of A's veth: where the host services listen.
const HOST: &str = "10.77.1.1";
const ENC_ADDR: &str = "10.77.1.2";
const CHANNEL: &str = "10.77.0.1:5000";
const ENC_PORT: u16 = 7000;
const HEALTH_PORT: u16 = 9000;
const FLOOD: u64 = 100_000;
/// For connections that must succeed: a dropped SYN is retransmitted after 1 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Encoder A of a one-encoder lab, registered in a data plane opened in the rt namespace (the
/// calling thread stays in rt until the `Entered` guard drops) with one channel.
struct Setup {
    dp: Dataplane,
    pins: PinDir,
    _entered: Entered,
    lab: Lab,
}

impl Setup {
    fn new() -> Self {
        let lab = lab(1);
        let entered = Entered::new(&lab.rt);
        let pins = PinDir::new();
        let mut dp = pins.open();
        dp.attach_ingest(INGEST_IF, XdpMode::Native).unwrap();
        let a = &lab.encoders[0];
        dp.upsert_encoder(&EncoderSpec {
            name: ENCODER.into(),
            addr: a.addr4.parse().unwrap(),
            mac: lab.encoder_mac(0).unwrap(),
            link: EncoderLink::Local {
                ifname: a.host_if.clone(),
            },
        })
        .unwrap();
        dp.set_channel(sa(CHANNEL), ENC_PORT, ENCODER, &[ENCODER], false)
            .unwrap();
        Self {
            dp,
            pins,
            _entered: entered,
            lab,
        }
    }

    fn set_policy(&mut self, allow: &[&str], health: Option<(AllowProto, u16)>) {
        let policy = EgressPolicy {
            allow: allow
                .iter()
                .map(|r| r.parse::<AllowRule>().unwrap())
                .collect(),
            health: health.map(|(proto, port)| HealthAnswers {
                proto,
                port,
                prober: None,
            }),
        };
        self.dp.set_policy(ENCODER, &policy).unwrap();
    }

    fn drops(&self, reason: &str) -> u64 {
        self.dp
            .encoder_drops(ENCODER)
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == reason)
            .unwrap_or_else(|| panic!("no drop reason {reason}"))
            .1
    }

    /// Runs `f` on a thread inside encoder A's namespace.
    fn in_a<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.lab.encoders[0].ns.run(f).expect("enter A's namespace")
    }

    /// A TCP connection from inside A: `Ok` with what the service sent first, or the error.
    fn connect_from_a(&self, to: &str) -> Result<Vec<u8>, std::io::Error> {
        let to = sa(to);
        self.in_a(move || {
            let mut s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut greeting = vec![0u8; 7];
            s.read_exact(&mut greeting)?;
            Ok(greeting)
        })
    }

    /// The id of the TC link on A's veth (a re-attach would make a new one).
    fn tc_link_id(&self) -> u32 {
        let pin = self.pins.pins.tc_link(&self.lab.encoders[0].host_if);
        let pinned = PinnedLink::from_pin(pin).expect("TC link pin");
        FdLink::from(pinned).info().expect("link info").id()
    }
}

/// A TCP service in the calling thread's namespace that greets each connection with
/// `nsfail\n`. Stops when dropped (or after a minute).
struct Greeter {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Greeter {
    fn start(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).expect("bind service");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(b"nsfail\n");
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn allowed_host_service_is_reachable_and_nothing_else() {
    let mut s = Setup::new();
    s.set_policy(
        &[&format!("{HOST}:8080/tcp")],
        Some((AllowProto::Udp, HEALTH_PORT)),
    );
    // Services on every address of the host: only one address and port is allowed.
    let _allowed = Greeter::start("0.0.0.0:8080");
    let _other_port = Greeter::start("0.0.0.0:8081");

    let got = s.connect_from_a(&format!("{HOST}:8080"));
    assert_eq!(got.unwrap(), b"nsfail\n", "allowed service");
    assert_eq!(s.drops("denied"), 0);

    let err = s.connect_from_a(&format!("{HOST}:8081")).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "other port: {err}"
    );
    let after_port = s.drops("denied");
    assert!(after_port >= 1, "the SYN was dropped as denied");
    let err = s.connect_from_a(&format!("{INGEST4}:8080")).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "other address: {err}"
    );
    assert!(s.drops("denied") > after_port);
    // (No assertion on forged_source here: A's kernel sends MLD reports from :: and its
    // link-local address when its veth comes up, and the policy counts them as forged.)

    // One policy update, no re-attach: the other port is allowed now.
    let link = s.tc_link_id();
    s.set_policy(
        &[&format!("{HOST}:8080/tcp"), &format!("{HOST}:8081/tcp")],
        Some((AllowProto::Udp, HEALTH_PORT)),
    );
    let got = s.connect_from_a(&format!("{HOST}:8081"));
    assert_eq!(got.unwrap(), b"nsfail\n", "newly allowed service");
    assert_eq!(s.tc_link_id(), link, "the TC program stayed attached");
    assert!(s.connect_from_a(&format!("{INGEST4}:8080")).is_err());
}

#[test]
fn disallowed_flood_is_dropped_and_counted_exactly() {
    let mut s = Setup::new();
    s.set_policy(&[], Some((AllowProto::Udp, HEALTH_PORT)));
    let target = sa(&format!("{HOST}:9999"));
    let sink = UdpSocket::bind(target).expect("bind sink in rt");
    sink.set_nonblocking(true).unwrap();
    // A's neighbour entry for the host, fixed: packets waiting on ARP resolution could be
    // dropped before they ever reach the veth.
    let a = &s.lab.encoders[0];
    let host_mac = netns::link(&a.host_if).unwrap().mac;
    let mac = host_mac.map(|b| format!("{b:02x}")).join(":");
    a.ns.ip(&[
        "neigh",
        "replace",
        HOST,
        "lladdr",
        &mac,
        "dev",
        &a.inner_if,
        "nud",
        "permanent",
    ])
    .unwrap();
    let denied_before = s.drops("denied");

    let sent = s.in_a(move || flood(target, FLOOD));
    assert_eq!(sent, FLOOD);
    let counted = wait_for(Duration::from_secs(10), || {
        let n = s.drops("denied") - denied_before;
        (n >= FLOOD).then_some(n)
    });
    // Give any straggler time to be (wrongly) counted or delivered.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(counted, Some(FLOOD));
    assert_eq!(s.drops("denied") - denied_before, FLOOD, "counted exactly");
    assert_eq!(drain(&sink), 0, "nothing reached the destination namespace");

    // The sink does receive what the policy allows: one update, and 100 packets arrive.
    s.set_policy(
        &[&format!("{HOST}:9999/udp")],
        Some((AllowProto::Udp, HEALTH_PORT)),
    );
    assert_eq!(s.in_a(move || flood(target, 100)), 100);
    let got = wait_for(Duration::from_secs(5), || {
        thread::sleep(Duration::from_millis(100));
        let n = drain(&sink);
        (n > 0).then_some(n)
    });
    assert_eq!(got, Some(100), "allowed packets delivered");
    assert_eq!(
        s.drops("denied") - denied_before,
        FLOOD,
        "none of them denied"
    );
}

/// Sends `n` 64-byte UDP packets from A's address to `target`, as fast as the stack takes
/// them. Bounded in time (60 s) and attempts. Returns how many the kernel accepted; with
/// `IP_RECVERR` a packet the veth could not take is reported (ENOBUFS) and sent again, so
/// every accepted packet reached the veth's peer, where TC runs.
fn flood(target: SocketAddr, n: u64) -> u64 {
    let sock = UdpSocket::bind(sa(&format!("{ENC_ADDR}:0"))).expect("bind in A");
    sock.connect(target).unwrap();
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv4RecvErr, &true)
        .expect("IP_RECVERR");
    let payload = [0x42u8; 64];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    let mut attempts = 0u64;
    while sent < n && attempts < 20 * n && Instant::now() < deadline {
        attempts += 1;
        match sock.send(&payload) {
            Ok(_) => sent += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                thread::sleep(Duration::from_micros(50));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    sent
}

/// Packets waiting on a non-blocking socket, read and counted.
fn drain(sock: &UdpSocket) -> u64 {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while sock.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn replies_and_health_answers_pass_with_an_empty_allow_list() {
    let mut s = Setup::new();
    s.set_policy(&[], Some((AllowProto::Udp, HEALTH_PORT)));
    let a = &s.lab.encoders[0];
    let addr = a.addr4.clone();

    // The return path: every packet answered, every answer from the channel's address.
    let rx = Receiver::start(&a.ns, sa(&format!("{addr}:{ENC_PORT}")));
    let replies = send_burst(
        &s.lab.src,
        sa(&format!("{SRC4}:40000")),
        sa(CHANNEL),
        0..50,
        Duration::from_millis(1),
        Duration::from_secs(2),
    );
    assert_eq!(rx.settled().len(), 50, "stream delivered");
    assert_eq!(replies.seqs().len(), 50, "every reply came back");
    assert!(replies.from_only(sa(CHANNEL)), "{:?}", replies.acks);

    // A UDP health probe from the ingest host (this thread is in rt) is answered.
    let _echo = Echo::start(&a.ns, sa(&format!("{addr}:{HEALTH_PORT}")));
    let probe = sa(&format!("{addr}:{HEALTH_PORT}"));
    assert!(udp_probe(probe), "UDP health answer passes");
    let denied = s.drops("denied");

    // A TCP check on another port: its answers pass, and the UDP echo's no longer do.
    let tcp_port = 9100;
    let _service = s.in_a(move || Greeter::start(&format!("0.0.0.0:{tcp_port}")));
    s.set_policy(&[], Some((AllowProto::Tcp, tcp_port)));
    let mut c = TcpStream::connect_timeout(&sa(&format!("{addr}:{tcp_port}")), CONNECT_TIMEOUT)
        .expect("TCP health check connects");
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut greeting = [0u8; 7];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"nsfail\n");
    assert!(!udp_probe(probe), "UDP answers are not health answers now");
    assert!(s.drops("denied") > denied, "the echo's answer was denied");

    // Without a health check nothing answers a probe.
    s.set_policy(&[], None);
    assert!(
        TcpStream::connect_timeout(&sa(&format!("{addr}:{tcp_port}")), Duration::from_secs(1))
            .is_err()
    );
}

/// Up to five UDP echo probes, 300 ms apart, from the calling thread's namespace: whether
/// one was answered.
fn udp_probe(to: SocketAddr) -> bool {
    let bind = sa(&format!("{HOST}:0"));
    ask(bind, to, b"probe", 5, Duration::from_millis(300)).is_some_and(|a| a == b"probe")
}

/// Sends ICMPv6 messages of `icmp_type` from inside the calling thread's namespace to `to`
/// (a raw socket: the kernel fills in the source and the checksum); returns how many went.
fn send_icmp6(to: &str, icmp_type: u8, n: usize) -> usize {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn6, sendto, socket,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::IcmpV6,
    )
    .expect("raw ICMPv6 socket");
    let to: std::net::SocketAddrV6 = format!("[{to}]:0").parse().unwrap();
    // Type, code, checksum, then a router advertisement's hop limit, flags, lifetime,
    // reachable time and retrans timer.
    let mut msg = vec![0u8; 16];
    msg[0] = icmp_type;
    msg[5] = 0x00;
    msg[6..8].copy_from_slice(&1800u16.to_be_bytes());
    (0..n)
        .filter(|_| {
            sendto(
                fd.as_raw_fd(),
                &msg,
                &SockaddrIn6::from(to),
                MsgFlags::empty(),
            )
            .is_ok()
        })
        .count()
}

/// Issue 13, fault case 9: a packet from the health port to another address than the
/// prober's, a forged router advertisement, and traffic sent while the encoder is being added
/// are all dropped and counted; the TC program is attached only once the encoder's policy is
/// in its map, so nothing passes fail-open.
#[test]
fn health_port_to_others_forged_ra_and_traffic_during_the_add_are_dropped() {
    let lab = lab(1);
    let entered = Entered::new(&lab.rt);
    let pins = PinDir::new();
    let mut dp = pins.open();
    dp.attach_ingest(INGEST_IF, XdpMode::Native).unwrap();
    let a = &lab.encoders[0];

    // A floods a host port it may not reach, from before it is added until after.
    let sink = UdpSocket::bind(format!("{HOST}:9999")).unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = {
        let on = flooding.clone();
        a.ns.run(move || {
            let s = UdpSocket::bind(format!("{ENC_ADDR}:0")).unwrap();
            thread::spawn(move || {
                let mut sent = 0u64;
                let deadline = Instant::now() + Duration::from_secs(10);
                while on.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if s.send_to(b"early", format!("{HOST}:9999")).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .unwrap()
    };
    // The flood reaches the host while A is not an encoder of the data plane yet.
    let mut buf = [0u8; 16];
    sink.recv_from(&mut buf)
        .expect("the flood reaches the host");
    let tc_before = dp.tc_stats().unwrap();
    let policy = EgressPolicy {
        allow: Vec::new(),
        health: Some(HealthAnswers {
            proto: AllowProto::Udp,
            port: HEALTH_PORT,
            prober: None,
        }),
    };
    dp.upsert_encoder_policed(
        &EncoderSpec {
            name: ENCODER.into(),
            addr: a.addr4.parse().unwrap(),
            mac: lab.encoder_mac(0).unwrap(),
            link: EncoderLink::Local {
                ifname: a.host_if.clone(),
            },
        },
        Some(&policy),
    )
    .unwrap();
    thread::sleep(Duration::from_millis(100));
    flooding.store(false, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    // Whatever the program saw, it judged by the policy: nothing went the fail-open way.
    let tc_after = dp.tc_stats().unwrap();
    for ((name, before), (_, after)) in tc_before.iter().zip(&tc_after) {
        if name.starts_with("pass_") && *name != "pass_neighbour" {
            assert_eq!(after, before, "{name}: a packet passed during the add");
        }
    }
    let drops = |reason: &str| {
        dp.encoder_drops(ENCODER)
            .unwrap()
            .into_iter()
            .find(|(n, _)| *n == reason)
            .unwrap()
            .1
    };
    let denied = drops("denied");
    println!("flood: {sent} sent, {denied} dropped by the policy after the add");
    assert!(
        denied > 0,
        "the flood after the add was dropped and counted"
    );
    // Drain what reached the host before the add; nothing more comes.
    while sink.recv_from(&mut buf).is_ok() {}
    let late =
        a.ns.run(|| {
            let s = UdpSocket::bind(format!("{ENC_ADDR}:0")).unwrap();
            (0..100)
                .filter(|_| s.send_to(b"late", format!("{HOST}:9999")).is_ok())
                .count()
        })
        .unwrap();
    assert_eq!(late, 100);
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "a denied packet reached the host"
    );
    assert_eq!(drops("denied"), denied + 100);

    // Health answers pass to the prober (this host's address facing A) and to nobody else.
    let other = UdpSocket::bind(format!("{INGEST4}:9998")).unwrap();
    other
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let prober = UdpSocket::bind(format!("{HOST}:9998")).unwrap();
    prober
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let denied = drops("denied");
    a.ns.run(|| {
        let s = UdpSocket::bind(format!("{ENC_ADDR}:{HEALTH_PORT}")).unwrap();
        s.send_to(b"to another", format!("{INGEST4}:9998")).unwrap();
        s.send_to(b"to the prober", format!("{HOST}:9998")).unwrap();
    })
    .unwrap();
    let (n, _) = prober
        .recv_from(&mut buf)
        .expect("the answer to the prober passes");
    assert_eq!(&buf[..n], b"to the prober");
    assert!(
        other.recv_from(&mut buf).is_err(),
        "a packet from the health port reached another address"
    );
    assert_eq!(drops("denied"), denied + 1);

    // A forged router advertisement (and a redirect) never leaves A.
    let router = drops("router");
    let sent =
        a.ns.run(|| send_icmp6("fd77:1::1", 134, 3) + send_icmp6("fd77:1::1", 137, 2))
            .unwrap();
    assert_eq!(sent, 5);
    assert!(
        wait_for(Duration::from_secs(2), || (drops("router") == router + 5)
            .then_some(()))
        .is_some(),
        "5 dropped as router traffic, counted {}",
        drops("router") - router
    );
    drop(entered);
}
