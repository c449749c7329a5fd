//! Faults injected into a running daemon, each with a stream running and an exact outcome: a
//! second daemon started by mistake, a read-only config directory during a failover, a
//! corrupt state file, an unprivileged client, a flood of spoofed SRT handshakes, maps written by
//! something else.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nsfail::lab::{INGEST4, SRC4};
use nsfail_tests::{
    ChildGuard, PinDir,
    daemon::{
        Bed, Daemon, HEALTH_DESIGN, HEALTH_TOLERANT, Policy, TempDir, active, cli, events,
        lab_config_with, nsfail_bin, placement, status,
    },
    frames::{Frame, inject},
    lab, run,
    traffic::{Echo, Receiver, send_burst, spawn_burst},
    wait_for,
};

const GAP: Duration = Duration::from_millis(1);
const LINGER: Duration = Duration::from_secs(2);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn reasons(socket: &Path) -> Vec<String> {
    events(socket)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// 1. A second `nsfail run` on the same data plane (another socket, a config without the
///    channels) is refused before it touches anything: the stream keeps every packet, and
///    the first daemon's channels are where they were.
#[test]
fn a_second_daemon_is_refused_before_it_touches_anything() {
    let bed = Bed::new(&Policy::tolerant());
    let enc = &bed.lab.encoders[0];
    let rx = Receiver::start(&enc.ns, sa(&enc.addr4, 7002));
    let before = placement(&bed.socket());
    let cam2 = sa(INGEST4, 5002);
    let burst = spawn_burst(
        &bed.lab.src.name,
        sa(SRC4, 41100),
        cam2,
        0..2000,
        GAP,
        LINGER,
    );

    let other = bed.dir.path.join("other.toml");
    let text = fs::read_to_string(&bed.config).unwrap();
    let no_channels = &text[..text.find("[[channel]]").unwrap()];
    fs::write(&other, no_channels).unwrap();
    let second = Command::new(nsfail_bin())
        .args(["--socket"])
        .arg(bed.dir.path.join("other.sock"))
        .args(["run", "--config"])
        .arg(&other)
        .arg("--pins")
        .arg(bed.pins.pins.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = ChildGuard { child: second };
    let code = wait_for(Duration::from_secs(10), || second.child.try_wait().unwrap())
        .expect("the second daemon exits by itself");
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(code.code(), Some(1), "{stderr}");
    let first_pid = bed.daemon.child.pid();
    assert!(
        stderr.contains("another nsfail daemon serves the data plane")
            && stderr.contains(&format!("pid {first_pid}")),
        "names the running daemon: {stderr}"
    );

    let replies = burst.join().unwrap();
    assert_eq!(
        rx.settled(),
        (0..2000).collect(),
        "every packet of the stream arrived"
    );
    assert_eq!(replies.seqs(), (0..2000).collect());
    assert_eq!(
        placement(&bed.socket()),
        before,
        "the first daemon's channels are unchanged"
    );
    assert!(!bed.dir.path.join("other.sock").exists());
}

/// A bind mount of `dir` over itself, read-only: root gets EROFS as anyone would. Undone on
/// drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        let d = dir.to_str().unwrap();
        run("mount", &["--bind", d, d]);
        let ro = Self(dir.to_owned());
        run("mount", &["-o", "remount,bind,ro", d]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// 2. The config directory read-only, then the active encoder of three channels dies: every
///    channel moves (packets arrive at the backup), a critical event says persisting failed,
///    and persisting works again once the directory is writable.
#[test]
fn a_failover_finishes_on_a_read_only_disk() {
    let lab = lab(2);
    let echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
        .collect();
    let mut echoes = echoes.into_iter();
    let mut echo_a = echoes.next().unwrap();
    let _echo_b = echoes.next().unwrap();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    let policy = Policy {
        health: [HEALTH_DESIGN, HEALTH_TOLERANT],
        ..Policy::default()
    };
    let text = lab_config_with(&lab, &policy)
        + "\n[[channel]]\nname = \"cam3\"\nlisten = \"10.77.0.1:5004\"\n\
           encoders = [\"enc-a\", \"enc-b\"]\nport = 7004\n";
    fs::write(&config, text).unwrap();
    // The socket lives elsewhere: only the config, state and events are read-only.
    let sockdir = TempDir::new();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &sockdir.path.join("nsfail.sock"), &pins);
    let socket = daemon.socket.clone();
    for cam in ["cam1", "cam2", "cam3"] {
        assert_eq!(active(&socket, cam), "enc-a");
    }

    let ro = ReadOnly::new(&dir.path);
    echo_a.stop();
    let moved = wait_for(Duration::from_secs(5), || {
        placement(&socket)
            .iter()
            .all(|(_, a)| a == "enc-b")
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "every channel moved: {:?}",
        placement(&socket)
    );
    let eb = &lab.encoders[1];
    for (cam, port) in [(5000u16, 7000u16), (5002, 7002), (5004, 7004)] {
        let rx = Receiver::start(&eb.ns, sa(&eb.addr4, port));
        send_burst(
            &lab.src,
            sa(SRC4, 41200),
            sa(INGEST4, cam),
            0..100,
            GAP,
            LINGER,
        );
        assert_eq!(
            rx.settled(),
            (0..100).collect(),
            "channel on port {cam} reaches enc-b"
        );
    }
    assert!(
        reasons(&socket)
            .iter()
            .any(|r| r.contains("persisting runtime state failed (critical)")),
        "{:?}",
        reasons(&socket)
    );

    drop(ro);
    let again = wait_for(Duration::from_secs(5), || {
        reasons(&socket)
            .iter()
            .any(|r| r == "runtime state persisted again")
            .then_some(())
    });
    assert!(
        again.is_some(),
        "persisting works again: {:?}",
        reasons(&socket)
    );
    let state = fs::read_to_string(dir.path.join("nsfail.state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    for cam in ["cam1", "cam2", "cam3"] {
        assert_eq!(state["active"][cam], "enc-b", "{state}");
    }
}

/// 6. A corrupt state file: the daemon starts from the config, moves the file aside and says
///    so.
#[test]
fn a_corrupt_state_file_is_moved_aside() {
    let lab = lab(2);
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
        .collect();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    fs::write(&config, lab_config_with(&lab, &Policy::tolerant())).unwrap();
    let state = dir.path.join("nsfail.state.json");
    fs::write(&state, "{\"v\": 1, \"active\": {\"cam1\": ").unwrap();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
    assert_eq!(
        active(&daemon.socket, "cam1"),
        "enc-a",
        "started from the config"
    );
    let aside: Vec<_> = fs::read_dir(&dir.path)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("nsfail.state.json.bad-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "moved aside");
    assert_eq!(
        fs::read_to_string(aside[0].path()).unwrap(),
        "{\"v\": 1, \"active\": {\"cam1\": ",
        "kept as it was"
    );
    assert!(
        reasons(&daemon.socket)
            .iter()
            .any(|r| r.contains("unusable (critical)") && r.contains("bad-")),
        "{:?}",
        reasons(&daemon.socket)
    );
}

/// 7. The control socket is root's from the moment it exists: another user cannot connect.
///    State and events files are root's only.
#[test]
fn an_unprivileged_user_cannot_use_the_socket() {
    let bed = Bed::new(&Policy::tolerant());
    let socket = bed.socket();
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(nsfail_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ermission denied"), "{stderr}");
    // A change, so that the state file exists.
    let out = cli(&socket, &["remap", "cam2", "enc-b"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for file in ["nsfail.state.json", "nsfail.events.jsonl"] {
        let mode = fs::metadata(bed.dir.path.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file} mode {mode:o}");
    }
}

/// An SRT handshake's first 64 bytes: the control header addressed to `dest_id`, then the
/// CIF with `version`, Handshake Type `kind` (1 induction, -1 conclusion), socket ID `id` and
/// SYN cookie `cookie`.
fn srt_handshake(version: u32, kind: u32, dest_id: u32, id: u32, cookie: u32) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = 0x80;
    p[12..16].copy_from_slice(&dest_id.to_be_bytes());
    p[16..20].copy_from_slice(&version.to_be_bytes());
    p[28..32].copy_from_slice(&1500u32.to_be_bytes());
    p[32..36].copy_from_slice(&8192u32.to_be_bytes());
    p[36..40].copy_from_slice(&kind.to_be_bytes());
    p[40..44].copy_from_slice(&id.to_be_bytes());
    p[44..48].copy_from_slice(&cookie.to_be_bytes());
    p
}

/// cam1's learnt SRT callers, from `status --json`.
fn srt_callers(socket: &Path) -> Vec<(String, u64)> {
    status(socket)["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "cam1"))
        .and_then(|c| c["srt_peers"].as_array())
        .map(|peers| {
            peers
                .iter()
                .map(|p| {
                    let caller = p["caller"].as_str().unwrap_or_default().to_owned();
                    (caller, p["socket_id"].as_u64().unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A sample of the metrics endpoint (in the lab's ingest namespace).
fn metric(bed: &Bed, line_start: &str) -> Option<f64> {
    let out = bed
        .lab
        .rt
        .exec("curl", &["-sf", "http://127.0.0.1:9464/metrics"])
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// 8. 100,000 SRT handshakes from 10,000 spoofed sources (crafted frames into the ingest
///    veth, half inductions and half conclusions with a made-up cookie) while the encoder
///    answers every one of them as a listener answers an induction (crafted frames out of
///    the encoder's veth): the caller table never holds more than the channel's limit and
///    ends holding the real caller alone, who still gets its SHUTDOWN on failover. Packets
///    to cam2 from outside its `sources` are never forwarded: they reach the ingest host
///    untouched and are counted.
#[test]
fn spoofed_srt_handshakes_do_not_fill_the_caller_table() {
    const LIMIT: usize = 4;
    const SOURCES: u32 = 10_000;
    const ROUNDS: u32 = 10;
    let cam1_extra =
        format!("sources = [\"10.77.0.0/24\", \"198.18.0.0/15\"]\nsrt_peer_limit = {LIMIT}");
    let mut bed = Bed::new(&Policy {
        cam1_extra: &cam1_extra,
        cam2_extra: "sources = [\"192.0.2.0/24\"]",
        ..Policy::tolerant()
    });
    let sock = bed.socket();
    let mut session = nsfail_tests::srt::Session::start(&bed, None);
    assert!(
        session.growth(0, 50_000, Duration::from_secs(15)).is_some(),
        "enc-a receives the SRT stream"
    );
    let caller = session.caller_on_wire();
    println!("the real caller: {caller:?}");
    let real = vec![(caller.0.to_string(), u64::from(caller.1))];
    assert_eq!(srt_callers(&sock), real, "the real caller is learnt");

    let (ing, enc_inner) = {
        let rt = bed.lab.rt.name.clone();
        let ns = bed.lab.encoders[0].ns.name.clone();
        let inner = bed.lab.encoders[0].inner_if.clone();
        (
            nsfail::net::netns::in_netns(&rt, || nsfail::net::netns::link("ing"))
                .unwrap()
                .unwrap(),
            nsfail::net::netns::in_netns(&ns, move || nsfail::net::netns::link(&inner))
                .unwrap()
                .unwrap(),
        )
    };
    let host_side = bed.lab.encoders[0].host_if.clone();
    let host_mac = nsfail::net::netns::in_netns(&bed.lab.rt.name, move || {
        nsfail::net::netns::link(&host_side)
    })
    .unwrap()
    .unwrap()
    .mac;
    let spoofed = |i: u32| -> SocketAddr {
        SocketAddr::new(
            std::net::Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8).into(),
            40_000,
        )
    };
    // Answers to the spoofed sources leave towards the source's namespace (which drops them),
    // as a real ingest host's answers leave by its gateway: with no route, the redirect would
    // take each of 10,000 destinations as on-link and queue its answers behind an ARP request.
    bed.lab
        .rt
        .exec(
            "ip",
            &["route", "add", "198.18.0.0/15", "via", SRC4, "dev", "ing"],
        )
        .expect("ip route");
    let ingest = sa(INGEST4, 5000);
    let encoder = sa(&bed.lab.encoders[0].addr4, 7000);
    let mut injected = (0usize, 0usize);
    let mut most = 0usize;
    for round in 0..ROUNDS {
        let to_ingest = (0..SOURCES).map(|i| {
            let id = round * SOURCES + i + 1;
            let hs = if i % 2 == 0 {
                srt_handshake(4, 1, 0, id, 0)
            } else {
                srt_handshake(5, u32::MAX, 0, id, 0x5eed_0000 ^ id)
            };
            let mut f = Frame::udp(spoofed(i), ingest, &hs);
            f.dmac = ing.mac;
            f.bytes()
        });
        let t0 = std::time::Instant::now();
        injected.0 += inject(&bed.lab.src, "s0", to_ingest).expect("inject into the ingest");
        let t1 = t0.elapsed();
        // The encoder answers each as a listener answers an induction (its cookie), which a
        // spoofed caller never sees: nothing of this may add a caller.
        let answers = (0..SOURCES).map(|i| {
            let id = round * SOURCES + i + 1;
            let mut f = Frame::udp(encoder, spoofed(i), &srt_handshake(5, 1, id, 77, 0xc00c));
            f.smac = enc_inner.mac;
            f.dmac = host_mac;
            f.bytes()
        });
        injected.1 += inject(
            &bed.lab.encoders[0].ns,
            &bed.lab.encoders[0].inner_if,
            answers,
        )
        .expect("inject from the encoder");
        let t2 = t0.elapsed();
        let held = srt_callers(&sock);
        println!(
            "round {round}: {injected:?} frames injected ({t1:?}, {t2:?}, status at {:?}), {} \
             callers held",
            t0.elapsed(),
            held.len()
        );
        most = most.max(held.len());
        assert!(
            held.len() <= LIMIT,
            "round {round}: {} callers: {held:?}",
            held.len()
        );
    }
    assert_eq!(
        injected,
        ((SOURCES * ROUNDS) as usize, (SOURCES * ROUNDS) as usize),
        "every crafted frame was sent"
    );
    assert_eq!(
        srt_callers(&sock),
        real,
        "the real caller alone (at most {most} held)"
    );

    // cam2 accepts 192.0.2.0/24 only: the lab's sender is outside.
    let mut rx = Receiver::start(
        &bed.lab.encoders[0].ns,
        sa(&bed.lab.encoders[0].addr4, 7002),
    );
    let on_host =
        nsfail_tests::srt::Capture::start(&bed.lab.rt, "10.77.0.2:40002".parse().unwrap());
    let before =
        metric(&bed, "nsfail_xdp_packets_total{reason=\"pass_not_source\"}").unwrap_or(0.0);
    send_burst(
        &bed.lab.src,
        sa(SRC4, 40002),
        sa(INGEST4, 5002),
        0..200,
        GAP,
        LINGER,
    );
    let host = wait_for(Duration::from_secs(5), || {
        let d = on_host.datagrams();
        (d.len() >= 200).then_some(d)
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of 200 reached the ingest host",
            on_host.datagrams().len()
        )
    });
    assert!(
        host.iter()
            .all(|d| d.to.to_string() == format!("{INGEST4}:5002")),
        "untouched: still addressed to the ingest address"
    );
    assert!(
        rx.settled().is_empty(),
        "nothing from outside cam2's sources reached enc-a"
    );
    rx.kill();
    let counted = wait_for(Duration::from_secs(5), || {
        let now = metric(&bed, "nsfail_xdp_packets_total{reason=\"pass_not_source\"}")?;
        (now - before >= 200.0).then_some(now - before)
    });
    assert!(counted.is_some(), "pass_not_source counted the 200 packets");

    // A reload that admits the sender's network: the same sender now reaches enc-a.
    let text = fs::read_to_string(&bed.config).unwrap().replace(
        "sources = [\"192.0.2.0/24\"]",
        "sources = [\"192.0.2.0/24\", \"10.77.0.0/24\"]",
    );
    fs::write(&bed.config, text).unwrap();
    let out = cli(&sock, &["reload"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "reloaded: channel cam2 changed");
    let rx = Receiver::start(
        &bed.lab.encoders[0].ns,
        sa(&bed.lab.encoders[0].addr4, 7002),
    );
    send_burst(
        &bed.lab.src,
        sa(SRC4, 40002),
        sa(INGEST4, 5002),
        1000..1200,
        GAP,
        LINGER,
    );
    assert_eq!(
        rx.settled(),
        (1000..1200).collect(),
        "after the reload, all 200 from 10.77.0.2 reach enc-a"
    );

    // The flood moved nothing: cam1 is still on enc-a. Then the real caller is told on
    // failover.
    assert_eq!(
        active(&sock, "cam1"),
        "enc-a",
        "the flood caused a failover: {:?}",
        events(&sock)
    );
    // (The kill is the cause: a refused packet can fail enc-a over within milliseconds,
    // before the health responder has even stopped.)
    let killed = std::time::Instant::now();
    session.kill(0);
    bed.echoes[0].stop();
    wait_for(Duration::from_secs(5), || {
        (active(&sock, "cam1") == "enc-b").then_some(())
    })
    .unwrap_or_else(|| panic!("cam1 did not fail over: {:?}", events(&sock)));
    session.assert_told_to_reconnect(caller, killed);
}

/// Cases 4, 5 and 7 of issue 13: managed encoders across a daemon restart, a child's
/// unruly output, the socket's peers, the events file's rotation.
mod children {
    use std::collections::BTreeSet;

    use nsfail::{child::Identity, lab::Lab};
    use nsfail_tests::{
        traffic::{check_seqs, payload},
        unique,
    };

    use super::*;

    /// Stops whatever managed encoders the test's daemons recorded (as `nsfail teardown`
    /// does), on every path out of the test. Declared before the daemons, so dropped after.
    struct ManagedCleanup<'a>(&'a PinDir);

    impl Drop for ManagedCleanup<'_> {
        fn drop(&mut self) {
            nsfail::daemon::teardown_managed(&self.0.pins);
        }
    }

    /// A daemon config for `lab` with one managed encoder, `mgd` (address 10.78.7.2 in
    /// namespace `ns`, host side `host_if`), running `sh -c SCRIPT`, and channel `cam`
    /// (10.77.0.1:5002, UDP, encoder port 7002) on it.
    fn managed_config(lab: &Lab, ns: &str, host_if: &str, script: &str, extra: &str) -> String {
        assert!(
            !script.contains('\''),
            "the script goes in a TOML literal string"
        );
        format!(
            "[ingest]\ninterface = \"ing\"\nnetns = \"{rt}\"\nmetrics = \"127.0.0.1:9464\"\n\n\
             [[encoder]]\nname = \"mgd\"\naddress = \"10.78.7.2\"\ninterface = \"{host_if}\"\n\
             netns = \"{ns}\"\nspawn = {{ command = \"sh\", args = [\"-c\", '{script}'] }}\n\
             health = {{ kind = \"exec\", command = [\"true\"], interval_ms = 500, \
             timeout_ms = 400, fall = 10 }}\n\n\
             [[channel]]\nname = \"cam\"\nlisten = \"10.77.0.1:5002\"\nencoders = [\"mgd\"]\n\
             port = 7002\n{extra}",
            rt = lab.rt.name,
        )
    }

    /// The process the daemon recorded for `mgd`.
    fn recorded(pins: &PinDir) -> Option<Identity> {
        let text = fs::read_to_string(pins.pins.children_record()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        serde_json::from_value(v["running"]["mgd"]["process"].clone()).ok()
    }

    /// The intact test packets a `socat -u UDP-RECV ... OPEN:FILE` wrote into `file`.
    fn seqs_in(file: &Path) -> BTreeSet<u32> {
        let len = payload(0).len();
        fs::read(file)
            .unwrap_or_default()
            .chunks_exact(len)
            .filter_map(|c| {
                let seq = u32::from_be_bytes(c[..4].try_into().unwrap());
                (c == payload(seq).as_slice()).then_some(seq)
            })
            .collect()
    }

    /// Waits until the encoder's receiver is up: warm-up packets (sequence numbers from
    /// 50,000) sent until one lands in `file`.
    fn warm_up(lab: &Lab, file: &Path) {
        let mut next = 50_000;
        let up = wait_for(Duration::from_secs(10), || {
            send_burst(
                &lab.src,
                sa(SRC4, 41299),
                sa(INGEST4, 5002),
                next..next + 5,
                GAP,
                Duration::from_millis(50),
            );
            next += 5;
            seqs_in(file).iter().any(|s| *s >= 50_000).then_some(())
        });
        assert!(up.is_some(), "the managed encoder's receiver came up");
    }

    /// The measured stream's packets in `file` (those below 50,000).
    fn measured(file: &Path) -> BTreeSet<u32> {
        seqs_in(file).into_iter().filter(|s| *s < 50_000).collect()
    }

    fn alive(p: Identity) -> bool {
        Identity::of(p.pid).is_ok_and(|now| now == p)
    }

    fn count(socket: &Path, needle: &str) -> usize {
        reasons(socket)
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }

    /// 5. A managed encoder that prints 1 MiB of random bytes (invalid UTF-8) without a
    ///    newline, three times, while a stream runs into it: it keeps running (same process,
    ///    never restarted), the stream loses nothing, the line after each burst is logged
    ///    intact, each long line is cut and the drop reported once.
    #[test]
    fn a_child_printing_a_mebibyte_of_junk_without_a_newline_keeps_running() {
        let lab = lab(1);
        let dir = TempDir::new();
        let out = dir.path.join("mgd.udp");
        let (ns, host_if) = (unique("mg"), unique("mh"));
        let script = format!(
            "socat -u UDP-RECV:7002 OPEN:{},creat,append & for i in 1 2 3; do sleep 1; \
             head -c 1048576 /dev/urandom | tr -d \"\\n\"; printf \"\\nMARKER-AFTER-JUNK\\n\"; \
             done; wait",
            out.display()
        );
        let config = dir.path.join("nsfail.toml");
        fs::write(&config, managed_config(&lab, &ns, &host_if, &script, "")).unwrap();
        let pins = PinDir::new();
        let _cleanup = ManagedCleanup(&pins);
        let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
        let leader = wait_for(Duration::from_secs(5), || recorded(&pins)).expect("recorded");
        warm_up(&lab, &out);

        let burst = spawn_burst(
            &lab.src.name,
            sa(SRC4, 41300),
            sa(INGEST4, 5002),
            0..4000,
            GAP,
            Duration::from_millis(300),
        );
        burst.join().unwrap();
        let log = config.with_extension("log");
        let text = wait_for(Duration::from_secs(15), || {
            let text = String::from_utf8_lossy(&fs::read(&log).unwrap_or_default()).into_owned();
            (text.matches("] MARKER-AFTER-JUNK").count() == 3).then_some(text)
        })
        .unwrap_or_else(|| panic!("three markers logged: {:?}", reasons(&daemon.socket)));
        let mgd: Vec<String> = text
            .lines()
            .filter(|l| l.contains("[mgd]"))
            .map(|l| {
                let tail: String = l
                    .chars()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("{} chars, ends {tail:?}", l.chars().count())
            })
            .collect();
        assert_eq!(
            text.matches("[cut at 4096 bytes]").count(),
            3,
            "each mebibyte line is cut: {mgd:#?}"
        );
        let got = wait_for(Duration::from_secs(5), || {
            let s = measured(&out);
            (s.len() == 4000).then_some(s)
        });
        assert_eq!(
            got.unwrap_or_else(|| measured(&out)),
            (0..4000).collect(),
            "every packet of the stream reached the encoder's process"
        );
        assert!(alive(leader), "the same process still runs");
        assert_eq!(recorded(&pins), Some(leader));
        assert_eq!(
            count(&daemon.socket, "is dropped (counted"),
            1,
            "reported once"
        );
        assert_eq!(
            count(&daemon.socket, "process exited"),
            0,
            "never restarted"
        );
    }

    /// 4. A managed encoder survives `kill -9` of the daemon, and a clean stop too: the next
    ///    daemon adopts it and its stream (1000 packets/s into the encoder's own process)
    ///    loses nothing across the restart. When the adopted process dies it is restarted
    ///    (event), and `remove` stops an adopted process and removes its namespace.
    #[test]
    fn a_managed_encoder_outlives_its_daemon_and_is_adopted() {
        let lab = lab(1);
        let dir = TempDir::new();
        let out = dir.path.join("mgd.udp");
        let (ns, host_if) = (unique("mg"), unique("mh"));
        let script = format!(
            "exec socat -u UDP-RECV:7002 OPEN:{},creat,append",
            out.display()
        );
        let config = dir.path.join("nsfail.toml");
        fs::write(&config, managed_config(&lab, &ns, &host_if, &script, "")).unwrap();
        let socket = dir.path.join("nsfail.sock");
        let pins = PinDir::new();
        let _cleanup = ManagedCleanup(&pins);
        let mut first = Daemon::start(&config, &socket, &pins);
        let p = wait_for(Duration::from_secs(5), || recorded(&pins)).expect("recorded");
        warm_up(&lab, &out);

        let burst = spawn_burst(
            &lab.src.name,
            sa(SRC4, 41400),
            sa(INGEST4, 5002),
            0..6000,
            GAP,
            Duration::from_millis(300),
        );
        std::thread::sleep(Duration::from_secs(1));
        first.child.child.kill().unwrap();
        first.child.child.wait().unwrap();
        let killed = std::time::Instant::now();
        let at_kill = measured(&out).len();
        assert!(alive(p), "kill -9 of the daemon leaves the encoder running");
        let second = Daemon::start(&config, &socket, &pins);
        let at_up = measured(&out).len();
        eprintln!(
            "no daemon answered for {} ms; meanwhile the encoder received {} packets",
            killed.elapsed().as_millis(),
            at_up - at_kill
        );
        assert!(
            at_up > at_kill,
            "the stream flowed into the encoder while no daemon ran"
        );
        burst.join().unwrap();
        let got = wait_for(Duration::from_secs(5), || {
            let s = measured(&out);
            (s.len() == 6000).then_some(s)
        });
        let got = got.unwrap_or_else(|| measured(&out));
        assert_eq!(
            check_seqs(&got, 0..6000),
            Ok(()),
            "the stream never stopped across the restart"
        );
        assert!(alive(p), "the same process");
        assert_eq!(recorded(&pins), Some(p));
        assert_eq!(
            count(
                &second.socket,
                &format!("adopted its running process (pid {})", p.pid)
            ),
            1,
            "{:?}",
            reasons(&second.socket)
        );

        // The adopted process dies: detected, restarted, said.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let q = wait_for(Duration::from_secs(10), || {
            recorded(&pins).filter(|q| *q != p && alive(*q))
        })
        .unwrap_or_else(|| panic!("restarted: {:?}", reasons(&second.socket)));
        assert_eq!(count(&second.socket, "process exited"), 1);
        assert_eq!(count(&second.socket, "restarting in"), 1);

        // A clean stop leaves it running too; the third daemon adopts it, and `remove`
        // stops it.
        drop(second);
        assert!(alive(q), "SIGTERM of the daemon leaves the encoder running");
        let third = Daemon::start(&config, &socket, &pins);
        assert_eq!(
            count(
                &third.socket,
                &format!("adopted its running process (pid {})", q.pid)
            ),
            1,
            "{:?}",
            reasons(&third.socket)
        );
        let rx = spawn_burst(
            &lab.src.name,
            sa(SRC4, 41401),
            sa(INGEST4, 5002),
            10_000..10_200,
            GAP,
            Duration::from_millis(300),
        );
        rx.join().unwrap();
        let after = wait_for(Duration::from_secs(5), || {
            let s = seqs_in(&out);
            (10_000..10_200).all(|x| s.contains(&x)).then_some(())
        });
        assert!(after.is_some(), "the adopted process receives the stream");
        assert_eq!(cli(&third.socket, &["remove", "channel", "cam"]).code, 0);
        let removed = cli(&third.socket, &["remove", "encoder", "mgd"]);
        assert_eq!(removed.code, 0, "{}", removed.stderr);
        let stopped = wait_for(Duration::from_secs(10), || {
            (!alive(q) && !nsfail::paths::netns(&ns).exists()).then_some(())
        });
        assert!(stopped.is_some(), "remove stops the adopted process");
        assert_eq!(recorded(&pins), None);
    }

    /// `nsfail ARGS...` on `socket` as uid 65534 through `setpriv` with `privs` (group and
    /// capability options).
    fn as_nobody(socket: &Path, privs: &[&str], args: &[&str]) -> (i32, String, String) {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534"])
            .args(privs)
            .arg("--")
            .arg(nsfail_bin())
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// 7. With `daemon.socket_group`, the socket is 0660 with that group; a member may read
    ///    (status, events) but not change anything; a user outside it cannot connect, and
    ///    one who gets past the file's mode (CAP_DAC_OVERRIDE) is refused by the daemon's
    ///    peer check. The stream keeps every packet. The events file rotates before a line
    ///    would take it past `events_max_bytes`, keeping `events_keep` old files.
    #[test]
    fn socket_peers_are_checked_and_events_rotate_at_the_size_limit() {
        const GID: u32 = 64_999;
        const MAX: u64 = 1024;
        let lab = lab(2);
        let _echoes: Vec<Echo> = lab
            .encoders
            .iter()
            .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
            .collect();
        let dir = TempDir::new();
        let config = dir.path.join("nsfail.toml");
        let text = lab_config_with(&lab, &Policy::tolerant())
            + &format!(
                "\n[daemon]\nsocket_group = \"{GID}\"\nevents_max_bytes = {MAX}\n\
                 events_keep = 2\n"
            );
        fs::write(&config, text).unwrap();
        let pins = PinDir::new();
        let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
        let socket = daemon.socket.clone();
        let meta = fs::metadata(&socket).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
        assert_eq!(meta.gid(), GID);

        let enc = &lab.encoders[0];
        let rx = Receiver::start(&enc.ns, sa(&enc.addr4, 7002));
        let before = placement(&socket);
        let burst = spawn_burst(
            &lab.src.name,
            sa(SRC4, 41500),
            sa(INGEST4, 5002),
            0..2000,
            GAP,
            LINGER,
        );
        let member = ["--groups=64999"];
        let (code, out, err) = as_nobody(&socket, &member, &["status", "--json"]);
        assert_eq!(code, 0, "a member may read the status: {err}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["channels"].as_array().unwrap().len(), 2);
        let (code, _, err) = as_nobody(&socket, &member, &["events", "--json"]);
        assert_eq!(code, 0, "a member may read the events: {err}");
        let (code, _, err) = as_nobody(&socket, &member, &["remap", "cam2", "enc-b"]);
        assert_eq!(code, 1);
        assert!(
            err.contains("permission denied: uid 65534 may only run status and events"),
            "{err}"
        );
        let (code, _, err) = as_nobody(&socket, &["--clear-groups"], &["status"]);
        assert_eq!(code, 1);
        assert!(err.contains("ermission denied"), "the file's mode: {err}");
        let past_mode = [
            "--clear-groups",
            "--inh-caps=+dac_override",
            "--ambient-caps=+dac_override",
        ];
        let (code, _, err) = as_nobody(&socket, &past_mode, &["status"]);
        assert_eq!(code, 1);
        assert!(
            err.contains("permission denied: uid 65534 is neither root nor in group 64999"),
            "the daemon's peer check: {err}"
        );
        let log = fs::read_to_string(config.with_extension("log")).unwrap();
        assert!(log.contains("(2 refused since start)"), "counted: {log}");

        let replies = burst.join().unwrap();
        assert_eq!(rx.settled(), (0..2000).collect(), "every packet arrived");
        assert_eq!(replies.seqs(), (0..2000).collect());
        assert_eq!(placement(&socket), before, "nothing was changed");

        // Events: enough remaps to rotate a few times.
        for i in 0..24 {
            let to = if i % 2 == 0 { "enc-b" } else { "enc-a" };
            let out = cli(&socket, &["remap", "cam1", to]);
            assert_eq!(out.code, 0, "{}", out.stderr);
        }
        let file = dir.path.join("nsfail.events.jsonl");
        let rotated = |n: u32| nsfail::control::rotated(&file, n);
        assert!(!rotated(3).exists(), "only events_keep = 2 old files");
        let mut kept = Vec::new();
        let mut sizes = Vec::new();
        for path in [rotated(2), rotated(1), file.clone()] {
            let text = fs::read_to_string(&path).unwrap();
            let mode = fs::metadata(&path).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} mode {mode:o}", path.display());
            assert!(
                text.len() as u64 <= MAX,
                "{} is {} bytes",
                path.display(),
                text.len()
            );
            sizes.push(text.len() as u64);
            kept.push(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                    .collect::<Vec<_>>(),
            );
        }
        // A file was rotated only when the next line would not fit.
        for w in 0..2 {
            let next = serde_json::to_string(&kept[w + 1][0]).unwrap().len() as u64 + 1;
            assert!(sizes[w] + next > MAX, "rotated at the limit: {sizes:?}");
        }
        let ring = events(&socket);
        let on_disk: Vec<_> = kept.into_iter().flatten().collect();
        assert!(on_disk.len() < ring.len(), "the oldest were rotated out");
        assert_eq!(
            on_disk,
            ring[ring.len() - on_disk.len()..],
            "the files hold the newest events, in order"
        );
    }

    /// A managed encoder left running by a stopped daemon is replaced when the next daemon's
    /// config runs another command for it, and stopped (namespace removed) when its encoder
    /// is gone from the config.
    #[test]
    fn a_left_running_encoder_is_replaced_or_stopped_by_the_next_config() {
        let lab = lab(1);
        let dir = TempDir::new();
        let (ns, host_if) = (unique("mg"), unique("mh"));
        let config = dir.path.join("nsfail.toml");
        let socket = dir.path.join("nsfail.sock");
        let pins = PinDir::new();
        let _cleanup = ManagedCleanup(&pins);
        fs::write(
            &config,
            managed_config(&lab, &ns, &host_if, "exec sleep 600", ""),
        )
        .unwrap();
        let mut daemon = Daemon::start(&config, &socket, &pins);
        let p = wait_for(Duration::from_secs(5), || recorded(&pins)).expect("recorded");
        assert_eq!(daemon.stop(), Some(0));
        assert!(alive(p));

        fs::write(
            &config,
            managed_config(&lab, &ns, &host_if, "exec sleep 601", ""),
        )
        .unwrap();
        let mut daemon = Daemon::start(&config, &socket, &pins);
        let q = wait_for(Duration::from_secs(10), || {
            recorded(&pins).filter(|q| *q != p)
        })
        .expect("a new process recorded");
        assert!(!alive(p), "the old command's process was stopped");
        assert!(alive(q));
        assert_eq!(count(&daemon.socket, "replacing it"), 1);
        assert_eq!(daemon.stop(), Some(0));

        let text = fs::read_to_string(&config).unwrap();
        let without = &text[..text.find("[[encoder]]").unwrap()];
        fs::write(&config, without).unwrap();
        let _daemon = Daemon::start(&config, &socket, &pins);
        let stopped = wait_for(Duration::from_secs(10), || {
            (!alive(q) && !nsfail::paths::netns(&ns).exists() && recorded(&pins).is_none())
                .then_some(())
        });
        assert!(stopped.is_some(), "stopped with its encoder gone");
    }
}

/// 3. A failover of 300 channels while 100 encoders are probed every 100 ms: no probe is late
///    by more than one interval (the gaps between one encoder's probes, as the kernel
///    timestamped their arrival, stay within two intervals), a `status` asked all along is
///    answered within 50 ms, every channel moves, and the stream on one of them reaches the
///    backup.
mod failover_under_probes {
    use std::{
        collections::BTreeMap,
        fs,
        io::{BufRead as _, BufReader, Write as _},
        net::{SocketAddr, UdpSocket},
        os::unix::net::UnixStream,
        path::{Path, PathBuf},
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, Ordering},
        },
        thread,
        time::{Duration, Instant},
    };

    use nix::sys::{
        socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt},
        time::TimeSpec,
    };
    use nsfail::lab::{INGEST4, SRC4};
    use nsfail_tests::{
        PinDir,
        daemon::{Daemon, TempDir, status},
        lab,
        traffic::{Receiver, spawn_burst},
        unique, wait_for,
    };

    const ENCODERS: usize = 100;
    const CHANNELS: u16 = 300;
    const INTERVAL: Duration = Duration::from_millis(100);

    /// Answers every encoder's probes from one thread, recording when each probe arrived (the
    /// kernel's receive timestamp); an encoder marked dead records but does not answer.
    struct Recorder {
        stop: Arc<AtomicBool>,
        dead: Arc<Mutex<Vec<bool>>>,
        arrivals: Arc<Mutex<Vec<Vec<Duration>>>>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Recorder {
        fn start(sockets: Vec<UdpSocket>) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let dead = Arc::new(Mutex::new(vec![false; sockets.len()]));
            let arrivals = Arc::new(Mutex::new(vec![Vec::new(); sockets.len()]));
            for s in &sockets {
                s.set_nonblocking(true).unwrap();
                setsockopt(s, sockopt::ReceiveTimestampns, &true).unwrap();
            }
            let thread = {
                let (stop, dead, arrivals) = (stop.clone(), dead.clone(), arrivals.clone());
                thread::spawn(move || serve(&sockets, &stop, &dead, &arrivals))
            };
            Self {
                stop,
                dead,
                arrivals,
                thread: Some(thread),
            }
        }

        fn kill(&self, encoder: usize) {
            self.dead.lock().unwrap()[encoder] = true;
        }

        /// Each encoder's probe arrivals (CLOCK_REALTIME since the epoch).
        fn arrivals(&self) -> Vec<Vec<Duration>> {
            self.arrivals.lock().unwrap().clone()
        }
    }

    impl Drop for Recorder {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(
        sockets: &[UdpSocket],
        stop: &AtomicBool,
        dead: &Mutex<Vec<bool>>,
        arrivals: &Mutex<Vec<Vec<Duration>>>,
    ) {
        // Bounded: at most 10 minutes, normally stopped by the test.
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            // The arrival times are the kernel's: this loop's own latency only delays the
            // answers, by a millisecond at most.
            thread::sleep(Duration::from_millis(1));
            for (i, sock) in sockets.iter().enumerate() {
                loop {
                    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                    let mut cmsg = nix::cmsg_space!(TimeSpec);
                    let Ok(msg) = recvmsg::<SockaddrStorage>(
                        std::os::fd::AsRawFd::as_raw_fd(sock),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_DONTWAIT,
                    ) else {
                        break;
                    };
                    let at = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            ControlMessageOwned::ScmTimestampns(t) => {
                                Some(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
                            }
                            _ => None,
                        })
                    });
                    let (n, from) = (msg.bytes, msg.address);
                    if let Some(at) = at {
                        arrivals.lock().unwrap()[i].push(at);
                    }
                    let from = from.and_then(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                    });
                    if !dead.lock().unwrap()[i]
                        && let Some(from) = from
                    {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        }
    }

    /// A `status` request on the socket, as the CLI sends it: its round trip, and whether
    /// every channel is on `encoder` by the answer.
    fn status_time(socket: &Path, encoder: &str) -> (Duration, bool) {
        let t = Instant::now();
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let took = t.elapsed();
        let answer: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(answer["ok"], true, "status: {line}");
        let all_on = answer["data"]["channels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["active"] == encoder);
        (took, all_on)
    }

    fn remote_addr(i: usize) -> String {
        format!("10.79.{}.{}", i / 200, 2 + i % 200)
    }

    fn placement(socket: &Path) -> BTreeMap<String, String> {
        status(socket)["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["active"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_300_channel_failover_keeps_every_probe_on_time() {
        let lab = lab(2);
        // enc-a and enc-b are the lab's encoders; 98 more are addresses in one namespace
        // behind a veth of the ingest host, reached through the ingest namespace's routes.
        let echo_ns = nsfail_tests::Netns::new("ech");
        let (host, peer) = (unique("ec"), unique("ep"));
        lab.rt
            .ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])
            .unwrap();
        lab.rt
            .ip(&["link", "set", &peer, "netns", &echo_ns.name])
            .unwrap();
        lab.rt
            .ip(&["addr", "add", "10.79.0.1/16", "dev", &host])
            .unwrap();
        lab.rt.ip(&["link", "set", &host, "up"]).unwrap();
        echo_ns.ip(&["link", "set", &peer, "up"]).unwrap();
        let mut sockets = Vec::new();
        for e in &lab.encoders {
            let bind: SocketAddr = format!("{}:9000", e.addr4).parse().unwrap();
            sockets.push(
                nsfail::net::netns::in_netns(&e.ns.name, move || UdpSocket::bind(bind))
                    .unwrap()
                    .unwrap(),
            );
        }
        for i in 2..ENCODERS {
            echo_ns
                .ip(&[
                    "addr",
                    "add",
                    &format!("{}/16", remote_addr(i)),
                    "dev",
                    &peer,
                ])
                .unwrap();
            let bind: SocketAddr = format!("{}:9000", remote_addr(i)).parse().unwrap();
            sockets.push(
                nsfail::net::netns::in_netns(&echo_ns.name, move || UdpSocket::bind(bind))
                    .unwrap()
                    .unwrap(),
            );
        }
        let recorder = Recorder::start(sockets);

        let health =
            "health = { kind = \"udp\", port = 9000, interval_ms = 100, timeout_ms = 100 }";
        let mut config = format!(
            "[ingest]\ninterface = \"ing\"\nnetns = \"{}\"\nmetrics = \"127.0.0.1:0\"\n\n",
            lab.rt.name
        );
        for (k, e) in lab.encoders.iter().enumerate() {
            config += &format!(
                "[[encoder]]\nname = \"enc-{}\"\naddress = \"{}\"\ninterface = \"{}\"\n\
                 netns = \"{}\"\n{health}\n\n",
                ["a", "b"][k],
                e.addr4,
                e.host_if,
                e.ns.name
            );
        }
        for i in 2..ENCODERS {
            config += &format!(
                "[[encoder]]\nname = \"e{i:03}\"\naddress = \"{}\"\nmac = \"02:00:00:00:00:01\"\n\
                 {health}\n\n",
                remote_addr(i)
            );
        }
        for c in 0..CHANNELS {
            config += &format!(
                "[[channel]]\nname = \"cam{c}\"\nlisten = \"{INGEST4}:{}\"\n\
                 encoders = [\"enc-a\", \"enc-b\"]\nport = {}\n\n",
                5000 + c,
                7000 + c
            );
        }
        let dir = TempDir::new();
        let path: PathBuf = dir.path.join("nsfail.toml");
        fs::write(&path, config).unwrap();
        let pins = PinDir::new();
        let daemon = Daemon::start(&path, &dir.path.join("nsfail.sock"), &pins);
        let socket = daemon.socket.clone();
        let healthy = wait_for(Duration::from_secs(10), || {
            let s = status(&socket);
            let n = s["encoders"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["healthy"] == true)
                .count();
            (n == ENCODERS).then_some(())
        });
        assert!(
            healthy.is_some(),
            "every encoder healthy: {}",
            status(&socket)
        );
        assert!(placement(&socket).values().all(|a| a == "enc-a"));

        // A stream on the last channel, running across the failover.
        let eb = &lab.encoders[1];
        let last = CHANNELS - 1;
        let rx = Receiver::start(
            &eb.ns,
            format!("{}:{}", eb.addr4, 7000 + last).parse().unwrap(),
        );
        let burst = spawn_burst(
            &lab.src.name,
            format!("{SRC4}:41300").parse().unwrap(),
            format!("{INGEST4}:{}", 5000 + last).parse().unwrap(),
            0..3000,
            Duration::from_millis(1),
            Duration::from_secs(2),
        );
        // Status before the failover, for comparison.
        let mut before = Duration::ZERO;
        for _ in 0..20 {
            before = before.max(status_time(&socket, "enc-a").0);
            thread::sleep(Duration::from_millis(20));
        }

        // enc-a stops answering; status is asked every 10 ms until every channel has moved
        // and a second more has passed.
        let killed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        recorder.kill(0);
        let start = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut moved_at = None;
        // Nothing else runs here meanwhile (no CLI process): only the daemon is measured.
        while start.elapsed() < Duration::from_secs(10) {
            let (took, all_on_b) = status_time(&socket, "enc-b");
            slowest = slowest.max(took);
            if moved_at.is_none() && all_on_b {
                moved_at = Some(start.elapsed());
            }
            if moved_at.is_some_and(|t| start.elapsed() > t + Duration::from_secs(1)) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let moved_at = moved_at.unwrap_or_else(|| {
            panic!("not every channel moved to enc-b: {:?}", placement(&socket))
        });
        let _ = burst.join().expect("sender");
        let arrivals = recorder.arrivals();
        drop(recorder);

        // Every encoder's probes, from half a second before the kill to the end.
        let from = killed.saturating_sub(Duration::from_millis(500));
        let mut worst = (Duration::ZERO, 0);
        for (i, times) in arrivals.iter().enumerate() {
            let times: Vec<Duration> = times.iter().copied().filter(|t| *t >= from).collect();
            assert!(
                times.len() >= 10,
                "encoder {i}: only {} probes",
                times.len()
            );
            for w in times.windows(2) {
                let gap = w[1].saturating_sub(w[0]);
                if gap > worst.0 {
                    worst = (gap, i);
                }
            }
        }
        eprintln!(
            "slowest status before the failover {before:?}; 300 channels moved after \
             {moved_at:?}; slowest status {slowest:?}; longest gap \
             between two probes of one encoder {:?} (encoder {})",
            worst.0, worst.1
        );
        assert!(
            worst.0 <= 2 * INTERVAL,
            "encoder {}'s probes were {:?} apart: one was late by more than an interval",
            worst.1,
            worst.0
        );
        assert!(
            slowest < Duration::from_millis(50),
            "a status request took {slowest:?} during the failover"
        );
        // The stream reached enc-b once its channel moved: its last second all arrived.
        let seen = rx.settled();
        let tail: Vec<u32> = (2000..3000).filter(|s| !seen.contains(s)).collect();
        assert!(
            tail.is_empty(),
            "packets missing at enc-b after the failover: {tail:?}"
        );
    }
}

/// 10. Something else writes the channel map under a running daemon (a second writer, as
///     `bpftool map update` or a stray process would be): one channel repointed, one
///     channel's entries deleted, one entry nsfail never wrote added. The audit puts the
///     decided entries back, removes the foreign one, and says so in critical events; the
///     streams then reach the decided encoder again.
#[test]
fn the_audit_puts_back_what_something_else_wrote_to_the_maps() {
    let bed = Bed::new(&Policy::tolerant());
    let socket = bed.socket();
    let (ea, eb) = (&bed.lab.encoders[0], &bed.lab.encoders[1]);
    assert_eq!(active(&socket, "cam1"), "enc-a");
    assert_eq!(active(&socket, "cam2"), "enc-a");
    let channels_map = bed.pins.pins.map("CHANNELS_V4");
    let entries = |map: &Path| -> Vec<serde_json::Value> {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(map)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(entries(&channels_map).len(), 2, "cam1 and cam2");

    // The intruder: a second writer of the same pinned maps.
    let mut intruder = bed.pins.open();
    intruder.activate(sa(INGEST4, 5000), "enc-b").unwrap();
    intruder.remove_channel(sa(INGEST4, 5002)).unwrap();
    let hex = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().trim_start_matches("0x").to_owned())
            .collect()
    };
    let first = entries(&channels_map).remove(0);
    let mut key = hex(&first["key"]);
    // Another address (its first byte changed): a channel nsfail never had.
    key[0] = if key[0] == "c6" {
        "c7".into()
    } else {
        "c6".into()
    };
    let value = hex(&first["value"]);
    let mut update = Command::new("bpftool");
    update
        .args(["map", "update", "pinned"])
        .arg(&channels_map)
        .arg("key")
        .arg("hex")
        .args(&key)
        .arg("value")
        .arg("hex")
        .args(&value);
    let out = update.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(entries(&channels_map).len(), 2, "cam1 and the foreign one");

    let repaired = wait_for(Duration::from_secs(10), || {
        let r = reasons(&socket);
        let rewritten = r
            .iter()
            .filter(|r| r.contains("differed from what nsfail wrote"))
            .count();
        let removed = r.iter().any(|r| r.contains("nsfail never wrote"));
        (rewritten >= 2 && removed).then_some(r)
    });
    assert!(repaired.is_some(), "{:?}", reasons(&socket));
    assert_eq!(entries(&channels_map).len(), 2, "cam1 and cam2 again");
    drop(intruder);

    // Both streams reach enc-a, as decided, and nothing reaches enc-b.
    for (cam, port) in [(5000u16, 7000u16), (5002, 7002)] {
        let on_a = Receiver::start(&ea.ns, sa(&ea.addr4, port));
        let on_b = Receiver::start(&eb.ns, sa(&eb.addr4, port));
        send_burst(
            &bed.lab.src,
            sa(SRC4, 41300),
            sa(INGEST4, cam),
            0..200,
            GAP,
            LINGER,
        );
        assert_eq!(
            on_a.settled(),
            (0..200).collect(),
            "port {cam} reaches enc-a"
        );
        assert!(on_b.seen().is_empty(), "port {cam}: nothing at enc-b");
    }
    assert_eq!(active(&socket, "cam1"), "enc-a");
    assert_eq!(active(&socket, "cam2"), "enc-a");
}
