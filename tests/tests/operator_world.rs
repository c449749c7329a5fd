//! nsfail in the operator's world: encoder namespaces and veths made with `ip` and `unshare`
//! (GRO at its default, off; no XDP on the peer), one of them a namespace with no name;
//! interfaces deleted and re-created under a running daemon; a peer that stops receiving.
//! Nothing counted as forwarded may be lost, and nothing may fail silently.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use nsfail::{EncoderLink, EncoderSpec, XdpMode, net::netns};
use nsfail_common::{drop_reason, xdp_reason};
use nsfail_tests::{
    Entered, Netns, PinDir,
    daemon::{Daemon, TempDir, cli, events, status},
    foreign::{ForeignEncoder, Home, Unnamed},
    srt,
    traffic::{Echo, Receiver, send_burst, spawn_burst},
    wait_for,
};

const INGEST: &str = "10.88.0.1";
const SRC: &str = "10.88.0.2";
const GAP: Duration = Duration::from_millis(1);
const LINGER: Duration = Duration::from_secs(2);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// An ingest namespace (`ing`, where XDP goes) and a source namespace (`s0`), both made with
/// `ip`, and two encoders made with `ip` too: enc-a in a named namespace, enc-b in one with
/// no name.
struct World {
    rt: Netns,
    src: Netns,
    enc: Vec<ForeignEncoder>,
}

impl World {
    fn new() -> Self {
        let rt = Netns::new("owr");
        let src = Netns::new("ows");
        let w = Self {
            enc: vec![
                ForeignEncoder::new(&rt, Home::Named(Netns::new("owa").0), 1),
                ForeignEncoder::new(&rt, Home::Unnamed(Unnamed::new()), 2),
            ],
            rt,
            src,
        };
        w.plug_ingest();
        w
    }

    /// The ingest veth pair, addressed; the sender's transmit checksums done in software, as
    /// a wire delivers them.
    fn plug_ingest(&self) {
        self.rt
            .ip(&[
                "link",
                "add",
                "ing",
                "type",
                "veth",
                "peer",
                "name",
                "s0",
                "netns",
                &self.src.name,
            ])
            .expect("ingest veth");
        self.rt
            .ip(&["addr", "add", "10.88.0.1/24", "dev", "ing"])
            .unwrap();
        self.rt.ip(&["link", "set", "ing", "up"]).unwrap();
        self.src
            .ip(&["addr", "add", "10.88.0.2/24", "dev", "s0"])
            .unwrap();
        self.src.ip(&["link", "set", "s0", "up"]).unwrap();
        self.src
            .exec("ethtool", &["-K", "s0", "tx", "off"])
            .unwrap();
    }

    /// Deletes the ingest veth pair (a driver reload, a container restart).
    fn unplug_ingest(&self) {
        self.rt.ip(&["link", "del", "ing"]).expect("delete ing");
    }

    /// The daemon's config: cam1 (SRT) and cam2 (UDP) on enc-a then enc-b, cam9 (UDP) on
    /// enc-a alone. enc-b has no `netns` (it has no name) and no `mac`.
    fn config(&self) -> String {
        let (a, b) = (&self.enc[0], &self.enc[1]);
        let Home::Named(a_ns) = &a.home else {
            unreachable!()
        };
        let health = "{ kind = \"udp\", port = 9000, fall = 5 }";
        format!(
            "[ingest]\ninterface = \"ing\"\nnetns = \"{rt}\"\nmetrics = \"127.0.0.1:0\"\n\n\
             [[encoder]]\nname = \"enc-a\"\naddress = \"{aa}\"\ninterface = \"{ai}\"\n\
             netns = \"{an}\"\nhealth = {health}\n\n\
             [[encoder]]\nname = \"enc-b\"\naddress = \"{ba}\"\ninterface = \"{bi}\"\n\
             health = {health}\n\n\
             [[channel]]\nname = \"cam1\"\nlisten = \"{INGEST}:5000\"\nencoders = [\"enc-a\", \"enc-b\"]\n\
             port = 7000\nprotocol = \"srt\"\n\n\
             [[channel]]\nname = \"cam2\"\nlisten = \"{INGEST}:5002\"\nencoders = [\"enc-a\", \"enc-b\"]\n\
             port = 7002\n\n\
             [[channel]]\nname = \"cam9\"\nlisten = \"{INGEST}:5009\"\nencoders = [\"enc-a\"]\nport = 7009\n",
            rt = self.rt.name,
            aa = a.addr,
            ai = a.host_if,
            an = a_ns.name,
            ba = b.addr,
            bi = b.host_if,
        )
    }
}

/// A daemon on a [`World`], with UDP health responders in both encoders.
struct Running {
    daemon: Daemon,
    _echoes: Vec<Echo>,
    config: PathBuf,
    pins: PinDir,
    dir: TempDir,
}

impl Running {
    fn start(w: &World) -> Self {
        let echoes = w
            .enc
            .iter()
            .map(|e| Echo::start_at(&e.home.path(), sa(&e.addr, 9000)))
            .collect();
        let dir = TempDir::new();
        let config = dir.path.join("nsfail.toml");
        fs::write(&config, w.config()).unwrap();
        let pins = PinDir::new();
        let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
        Self {
            daemon,
            _echoes: echoes,
            config,
            pins,
            dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.daemon.socket.clone()
    }

    fn encoder(&self, name: &str) -> serde_json::Value {
        status(&self.socket())["encoders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no encoder {name}"))
    }

    fn active(&self, channel: &str) -> String {
        nsfail_tests::daemon::active(&self.socket(), channel)
    }

    /// Events of encoder `name` whose reason contains `text`.
    fn events_about(&self, name: &str, text: &str) -> usize {
        events(&self.socket())
            .iter()
            .filter(|e| {
                (e["to"] == name || e["from"] == name)
                    && e["reason"].as_str().unwrap_or("").contains(text)
            })
            .count()
    }

    fn remap(&self, channel: &str, encoder: &str) {
        let out = cli(&self.socket(), &["remap", channel, encoder]);
        assert_eq!(out.code, 0, "remap {channel} {encoder}: {}", out.stderr);
    }
}

/// Must-show 1: UDP and a real SRT session reach encoders whose namespaces and veths were made
/// with `ip` and `unshare` (GRO off), replies come back from the ingest address, and a remap
/// moves the streams, to the encoder in the namespace with no name and back.
#[test]
fn ip_made_encoders_receive_udp_and_srt_and_remap_moves_them() {
    let w = World::new();
    assert!(
        !w.enc[0].peer_gro() && !w.enc[1].peer_gro(),
        "the operator's veths start with GRO off"
    );
    let r = Running::start(&w);
    for (i, name) in ["enc-a", "enc-b"].iter().enumerate() {
        let e = r.encoder(name);
        assert_eq!(e["can_receive"], true, "{name}: {e}");
        assert!(
            w.enc[i].peer_gro(),
            "{name}: nsfail turned GRO on at the peer"
        );
        assert_eq!(
            r.events_about(name, "turned GRO on"),
            1,
            "{name}: one repair event"
        );
    }
    let unnamed = r.encoder("enc-b");
    assert!(
        unnamed["receive"].as_str().unwrap().contains("veth"),
        "{unnamed}"
    );

    // UDP to cam2: at enc-a, answered from the ingest address.
    let cam2 = sa(INGEST, 5002);
    let rx_a = Receiver::start_at(&w.enc[0].home.path(), sa(&w.enc[0].addr, 7002));
    let rx_b = Receiver::start_at(&w.enc[1].home.path(), sa(&w.enc[1].addr, 7002));
    let replies = send_burst(&w.src, sa(SRC, 41000), cam2, 0..200, GAP, LINGER);
    assert_eq!(rx_a.settled(), (0..200).collect(), "enc-a got cam2");
    assert!(rx_b.settled().is_empty());
    assert_eq!(replies.seqs(), (0..200).collect(), "every packet answered");
    assert!(replies.from_only(cam2), "answers from the ingest address");
    let a = r.encoder("enc-a");
    assert_eq!(a["packets"], 200, "forwarded = delivered: {a}");
    assert_eq!(a["redirect_failed"], 0);

    // A remap to the encoder in the namespace with no name.
    r.remap("cam2", "enc-b");
    let replies = send_burst(&w.src, sa(SRC, 41000), cam2, 200..400, GAP, LINGER);
    assert_eq!(
        rx_b.settled(),
        (200..400).collect(),
        "enc-b got cam2 after the remap"
    );
    assert_eq!(rx_a.settled(), (0..200).collect(), "enc-a got nothing more");
    assert_eq!(replies.seqs(), (200..400).collect());
    assert!(
        replies.from_only(cam2),
        "enc-b's answers from the ingest address too"
    );
    assert_eq!(r.encoder("enc-b")["packets"], 200);

    // A real SRT session on cam1: a listener in each encoder, a caller at the source.
    let Home::Named(a_ns) = &w.enc[0].home else {
        unreachable!()
    };
    let out: Vec<PathBuf> = (0..2).map(|i| srt::output(&r.dir.path, i)).collect();
    let _la = srt::listener(a_ns, 7000, &out[0], None);
    let shell = format!(
        "exec srt-live-transmit -q 'srt://:7000?mode=listener' file://con > {}",
        out[1].display()
    );
    let Home::Unnamed(b_ns) = &w.enc[1].home else {
        unreachable!()
    };
    let _lb = b_ns.spawn("sh", &["-c", &shell]);
    let _caller = srt::caller(&w.src, &format!("{INGEST}:5000"), None);
    let _feed = srt::Feeder::start(&w.src.name);
    let grown = |i: usize, from: u64| {
        wait_for(Duration::from_secs(15), || {
            (srt::size(&out[i]) >= from + 100 * srt::DATAGRAM as u64).then_some(())
        })
        .is_some()
    };
    assert!(
        grown(0, 0),
        "the SRT session reached enc-a (handshake answered from the ingest address)"
    );
    r.remap("cam1", "enc-b");
    assert!(
        grown(1, 0),
        "the SRT stream moved to enc-b, in the namespace with no name"
    );
    let at_b = srt::size(&out[1]);
    r.remap("cam1", "enc-a");
    let at_a = srt::size(&out[0]);
    assert!(grown(0, at_a), "and back to enc-a");
    assert!(at_b > 0);
}

/// Must-show 2, the counting half: with no daemon to repair it, a veth whose peer cannot
/// take redirected frames gets none, and every packet is counted as `redirect_failed`, none
/// as forwarded. Then the peer is made able to receive, and everything arrives.
#[test]
fn refused_redirects_are_counted_and_never_forwarded() {
    let w = World::new();
    let enc = &w.enc[0];
    let Home::Named(ns) = &enc.home else {
        unreachable!()
    };
    let pins = PinDir::new();
    let listen = sa(INGEST, 5002);
    let mac = netns::link_in(Some(&ns.name), enc.inner_if).unwrap().mac;
    // The data plane in the ingest namespace, on this thread; no daemon.
    let dp = {
        let _in = Entered::new(&w.rt);
        let mut dp = pins.open();
        dp.attach_ingest("ing", XdpMode::Native).unwrap();
        dp.upsert_encoder(&EncoderSpec {
            name: "ea".into(),
            addr: enc.addr.parse().unwrap(),
            mac,
            link: EncoderLink::Local {
                ifname: enc.host_if.clone(),
            },
        })
        .unwrap();
        dp.set_channel(listen, 7002, "ea", &["ea"], false).unwrap();
        dp
    };
    assert!(!enc.peer_gro());
    let rx = Receiver::start_at(&enc.home.path(), sa(&enc.addr, 7002));
    const N: u32 = 300;
    let replies = send_burst(
        &w.src,
        sa(SRC, 41001),
        listen,
        0..N,
        GAP,
        Duration::from_millis(300),
    );
    assert!(
        rx.settled().is_empty(),
        "a peer without GRO receives nothing"
    );
    assert!(replies.acks.is_empty());
    let stats = dp.encoder_stats("ea").unwrap();
    assert_eq!(
        stats.drops[drop_reason::REDIRECT_FAILED],
        u64::from(N),
        "every refusal counted"
    );
    assert_eq!(
        stats.rx.packets - stats.drops[drop_reason::REDIRECT_FAILED],
        0,
        "none counted as forwarded"
    );
    assert_eq!(
        dp.xdp_count(xdp_reason::REDIRECT_FAILED).unwrap(),
        u64::from(N)
    );
    let drops: Vec<_> = dp.encoder_drops("ea").unwrap();
    assert!(
        drops.contains(&("redirect_failed", u64::from(N))),
        "{drops:?}"
    );

    // What the daemon does: the kernel's verdict, then GRO on at the peer.
    let verdict = {
        let _in = Entered::new(&w.rt);
        nsfail::net::receive::ensure(&enc.host_if, None)
    };
    assert!(verdict.can_receive, "{verdict:?}");
    assert!(
        verdict
            .repaired
            .as_deref()
            .unwrap_or("")
            .contains("turned GRO on"),
        "{verdict:?}"
    );
    assert!(enc.peer_gro());
    send_burst(&w.src, sa(SRC, 41001), listen, N..2 * N, GAP, LINGER);
    assert_eq!(
        rx.settled(),
        (N..2 * N).collect(),
        "everything arrives once it can receive"
    );
    let stats = dp.encoder_stats("ea").unwrap();
    assert_eq!(
        stats.drops[drop_reason::REDIRECT_FAILED],
        u64::from(N),
        "no new refusals"
    );
    assert_eq!(
        stats.rx.packets - stats.drops[drop_reason::REDIRECT_FAILED],
        u64::from(N)
    );
}

/// Must-show 2, under a running daemon: a peer whose GRO is turned off is repaired (an event
/// says so), a peer that is brought down is reported (`can_receive: false`, a critical event)
/// and its channel fails over; across it all, every packet sent is either delivered or
/// counted as refused, and what is counted as forwarded is exactly what arrived.
#[test]
fn a_peer_that_stops_receiving_is_reported_and_nothing_is_lost_silently() {
    let w = World::new();
    let r = Running::start(&w);
    let cam2 = sa(INGEST, 5002);
    let rx_a = Receiver::start_at(&w.enc[0].home.path(), sa(&w.enc[0].addr, 7002));
    let rx_b = Receiver::start_at(&w.enc[1].home.path(), sa(&w.enc[1].addr, 7002));
    const N: u32 = 6000;
    let burst = spawn_burst(&w.src.name, sa(SRC, 41002), cam2, 0..N, GAP, LINGER);
    assert!(
        wait_for(Duration::from_secs(5), || (rx_a.seen().len() > 300)
            .then_some(()))
        .is_some()
    );

    // GRO off at enc-a's peer: repaired within 2 s, and said.
    let before = r.events_about("enc-a", "turned GRO on");
    w.enc[0].peer_gro_off();
    let t = Instant::now();
    let repaired = wait_for(Duration::from_secs(2), || {
        (r.events_about("enc-a", "turned GRO on") > before && w.enc[0].peer_gro()).then_some(())
    });
    assert!(
        repaired.is_some(),
        "GRO turned back on, with an event, within 2 s"
    );
    eprintln!("GRO repaired after {:?}", t.elapsed());

    // enc-a's peer down: reported and failed over within 2 s.
    let Home::Named(a_ns) = &w.enc[0].home else {
        unreachable!()
    };
    a_ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let t = Instant::now();
    let reported = wait_for(Duration::from_secs(2), || {
        let e = r.encoder("enc-a");
        (e["can_receive"] == false && r.events_about("enc-a", "cannot receive (critical)") >= 1)
            .then_some(e)
    });
    let e = reported.expect("can_receive: false and a critical event within 2 s");
    eprintln!(
        "peer down reported after {:?}: {}",
        t.elapsed(),
        e["receive"]
    );
    assert!(e["receive"].as_str().unwrap().contains("down"), "{e}");
    assert_eq!(
        e["healthy"], false,
        "an encoder that cannot receive is down"
    );
    assert!(
        wait_for(Duration::from_secs(2), || (r.active("cam2") == "enc-b")
            .then_some(()))
        .is_some(),
        "cam2 failed over to enc-b"
    );
    let replies = burst.join().unwrap();

    // Every packet is accounted for: delivered at enc-a, at enc-b, or refused and counted.
    let (got_a, got_b) = (rx_a.settled(), rx_b.settled());
    let a = r.encoder("enc-a");
    let refused = a["redirect_failed"].as_u64().unwrap();
    assert_eq!(
        got_a.len() as u64 + got_b.len() as u64 + refused,
        u64::from(N),
        "sent = delivered + counted refusals (a: {}, b: {}, refused: {refused})",
        got_a.len(),
        got_b.len()
    );
    assert_eq!(
        a["packets"].as_u64().unwrap(),
        got_a.len() as u64,
        "forwarded to enc-a = arrived"
    );
    assert_eq!(
        r.encoder("enc-b")["packets"].as_u64().unwrap(),
        got_b.len() as u64
    );
    assert!(!got_b.is_empty(), "the stream went on at enc-b");
    assert!(replies.from_only(cam2));
    eprintln!("{} refused while the peer was down or without GRO", refused);

    // Up again: it can receive again, and says so.
    a_ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(3), || {
            (r.encoder("enc-a")["can_receive"] == true
                && r.events_about("enc-a", "can receive again") >= 1)
                .then_some(())
        })
        .is_some(),
        "enc-a can receive again"
    );
}

/// Must-show 3: interfaces deleted and re-created under a running daemon get their programs
/// back without a restart, and a daemon started after a re-creation replaces the dead pin.
#[test]
fn interfaces_recreated_under_a_running_daemon_get_their_programs_back() {
    let w = World::new();
    let mut r = Running::start(&w);
    let enc = &w.enc[0];
    let cam9 = sa(INGEST, 5009);
    let rx = Receiver::start_at(&enc.home.path(), sa(&enc.addr, 7009));

    // 1. enc-a's veth deleted and re-created, with a stream running at 1000 packets/s.
    const N: u32 = 6000;
    let burst = spawn_burst(&w.src.name, sa(SRC, 41003), cam9, 0..N, GAP, LINGER);
    assert!(
        wait_for(Duration::from_secs(5), || (rx.seen().len() > 300)
            .then_some(()))
        .is_some()
    );
    enc.unplug(&w.rt);
    // Gone: cam2 (which has a backup) fails over; the encoder is said not to receive.
    assert!(
        wait_for(Duration::from_secs(3), || (r.active("cam2") == "enc-b"
            && r.encoder("enc-a")["can_receive"] == false)
            .then_some(()))
        .is_some(),
        "a vanished interface marks its encoder down and its channels fail over"
    );
    std::thread::sleep(Duration::from_millis(500));
    let seen_before = rx.seen();
    let before = seen_before.len();
    enc.plug(&w.rt);
    let back = Instant::now();
    let resumed = wait_for(Duration::from_secs(5), || {
        (rx.seen().len() > before).then(|| back.elapsed())
    });
    let resumed = resumed.expect("the stream resumes at the re-created veth, no restart");
    eprintln!("stream at enc-a resumed {resumed:?} after its veth came back");
    assert!(
        r.events_about("enc-a", "re-attached to") >= 1,
        "the re-attach is an event"
    );
    let replies = burst.join().unwrap();
    let arrived_after: std::collections::BTreeSet<u32> =
        rx.settled().difference(&seen_before).copied().collect();
    assert!(
        replies
            .acks
            .iter()
            .any(|(_, seq)| arrived_after.contains(seq)),
        "replies come back through the re-attached TC program"
    );
    assert!(replies.from_only(cam9), "from the ingest address");
    assert_eq!(r.encoder("enc-a")["can_receive"], true);

    // The egress policy is back too: enc-a may not reach the ingest host's port 9999.
    let drops = |r: &Running| r.encoder("enc-a")["drops"].as_u64().unwrap();
    let denied_before = drops(&r);
    let target = sa(&enc.host_addr, 9999);
    let bind = sa(&enc.addr, 0);
    let Home::Named(a_ns) = &enc.home else {
        unreachable!()
    };
    a_ns.run(move || {
        let s = std::net::UdpSocket::bind(bind).unwrap();
        for _ in 0..5 {
            s.send_to(b"not allowed", target).unwrap();
        }
    })
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || (drops(&r) >= denied_before + 5)
            .then_some(()))
        .is_some(),
        "the re-attached egress policy drops what is not allowed"
    );

    // 2. The ingest veth deleted and re-created.
    w.unplug_ingest();
    std::thread::sleep(Duration::from_millis(300));
    w.plug_ingest();
    let back = Instant::now();
    let before = rx.seen().len();
    let burst = spawn_burst(&w.src.name, sa(SRC, 41004), cam9, N..N + 3000, GAP, LINGER);
    let resumed = wait_for(Duration::from_secs(5), || {
        (rx.seen().len() > before).then(|| back.elapsed())
    })
    .expect("the stream resumes through the re-created ingest veth, no restart");
    eprintln!("stream resumed {resumed:?} after the ingest veth came back");
    let replies = burst.join().unwrap();
    assert!(
        !replies.acks.is_empty() && replies.from_only(cam9),
        "replies leave by the new ingest veth"
    );
    assert!(
        events(&r.socket()).iter().any(|e| e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("XDP re-attached to ingest")),
        "the re-attach is an event"
    );

    // 3. Stopped, the ingest veth re-created, started again: the dead pin is replaced.
    assert_eq!(r.daemon.stop(), Some(0));
    w.unplug_ingest();
    w.plug_ingest();
    r.daemon = Daemon::start(&r.config, &r.dir.path.join("nsfail2.sock"), &r.pins);
    let before = rx.settled().len();
    send_burst(&w.src, sa(SRC, 41005), cam9, 20_000..20_200, GAP, LINGER);
    assert_eq!(
        rx.settled().len(),
        before + 200,
        "a daemon started after the re-creation attaches to the new interface"
    );
}

/// Bad input: an encoder `interface` that is not in the ingest namespace is an error naming
/// its line, at `nsfail check` and at start.
#[test]
fn an_interface_that_does_not_exist_is_refused_with_its_line() {
    let w = World::new();
    let dir = TempDir::new();
    let config = dir.path.join("bad.toml");
    let text = w.config().replace(&w.enc[1].host_if, "nsf-nowhere0");
    let line = text
        .lines()
        .position(|l| l.contains("nsf-nowhere0"))
        .unwrap()
        + 1;
    fs::write(&config, &text).unwrap();
    let socket = dir.path.join("none.sock");
    let out = cli(&socket, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!("bad.toml:{line}:")) && out.stderr.contains("nsf-nowhere0"),
        "{}",
        out.stderr
    );
    let run = std::process::Command::new(nsfail_tests::daemon::nsfail_bin())
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "run",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains(&format!("bad.toml:{line}:")), "{stderr}");
    // The good one passes, checked against this host.
    fs::write(&config, w.config()).unwrap();
    let out = cli(&socket, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}
